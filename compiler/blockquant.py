"""Block-wise weight-only quantization with a clipping search, packed in MatMulNBits' layout.

Written by hand because ORT's quantizers cannot do it: the RTN quantizer takes each block's min/max as is
(an outlier then costs the whole block its resolution), and HQQ finds better ranges but with float zero
points, which MatMulNBits' CPU kernel runs 25-50x slower at decode. Here each block tries a range of
shrunken ranges, keeps the one with the least squared error, and refits its scale for the integer zero point.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

SHRINK = np.linspace(1.0, 0.6, 17)  # fractions of the block's range tried as the clipping range


@dataclass
class Quantized:
    """MatMulNBits inputs for y = x @ W with W [K, N]: B [N, blocks, block/2*bits/4] uint8, scales [N, blocks], zero points."""

    packed: np.ndarray
    scales: np.ndarray
    zero_points: np.ndarray | None
    bits: int
    block_size: int

    def dequantize(self, k: int) -> np.ndarray:
        """W [K, N] back in float32 (for tests and error reports)."""
        q = _unpack(self.packed, self.bits)
        n, blocks, _ = q.shape
        zp = 2 ** (self.bits - 1) if self.zero_points is None else _unpack(self.zero_points, self.bits)[:, :blocks]
        zp = np.broadcast_to(zp, (n, blocks)) if np.ndim(zp) == 0 else zp
        w = (q.astype(np.float32) - zp[..., None]) * self.scales[..., None]
        return w.reshape(n, -1)[:, :k].T


def quantize_weight(w: np.ndarray, bits: int, block_size: int, symmetric: bool, importance: np.ndarray | None = None) -> Quantized:
    """w: [K, N] (x @ w). Blocks run along K for each output column, as MatMulNBits expects.

    importance [K]: mean square of each input channel on calibration text; errors on channels that carry
    more activation energy cost more (they move the output more), as in AWQ or llama.cpp's imatrix.
    """
    k, n = w.shape
    blocks = -(-k // block_size)
    rows = np.zeros((n, blocks * block_size), dtype=np.float32)
    rows[:, :k] = w.T
    x = rows.reshape(n, blocks, block_size)
    weight = np.ones(blocks * block_size, dtype=np.float32)
    if importance is not None:
        weight[:k] = importance / importance.mean() + 1e-3
    weight = weight.reshape(blocks, block_size)
    levels = 2**bits - 1
    best_err = np.full((n, blocks), np.inf, dtype=np.float32)
    best_q = np.zeros(x.shape, dtype=np.uint8)
    best_scale = np.zeros((n, blocks), dtype=np.float32)
    best_zp = np.zeros((n, blocks), dtype=np.float32)
    lo, hi = x.min(-1), x.max(-1)
    for shrink in SHRINK:
        if symmetric:
            zp = np.full_like(lo, 2 ** (bits - 1))
            scale = np.maximum(np.abs(lo), np.abs(hi)) * shrink / 2 ** (bits - 1)
        else:
            scale = (hi - lo) * shrink / levels
            zp = np.clip(np.round(-lo * shrink / np.where(scale == 0, 1, scale)), 0, levels)
        scale = np.where(scale == 0, 1e-8, scale)
        q = np.clip(np.round(x / scale[..., None] + zp[..., None]), 0, levels)
        centred = q - zp[..., None]
        # weighted least-squares scale for these integers: min_s sum weight * (x - s * (q - zp))^2
        denom = (weight * centred * centred).sum(-1)
        scale = np.where(denom > 0, (weight * x * centred).sum(-1) / np.where(denom > 0, denom, 1), scale)
        err = (weight * (x - scale[..., None] * centred) ** 2).sum(-1)
        better = err < best_err
        best_err = np.where(better, err, best_err)
        best_scale = np.where(better, scale, best_scale)
        best_zp = np.where(better, zp, best_zp)
        best_q = np.where(better[..., None], q.astype(np.uint8), best_q)
    zp8 = best_zp.astype(np.uint8)
    zero_points = None if symmetric else _pack(_pad_even(zp8) if bits == 4 else zp8, bits)
    return Quantized(_pack(best_q, bits), best_scale.astype(np.float32), zero_points, bits, block_size)


def _pad_even(zp: np.ndarray) -> np.ndarray:
    """4-bit zero points are packed per row: an odd block count gets one padding nibble."""
    return np.pad(zp, ((0, 0), (0, zp.shape[1] % 2))) if zp.shape[1] % 2 else zp


def _pack(q: np.ndarray, bits: int) -> np.ndarray:
    if bits == 8:
        return q.astype(np.uint8)
    return (q[..., 0::2] & 0xF) | ((q[..., 1::2] & 0xF) << 4)  # element 2i in the low nibble


def _unpack(packed: np.ndarray, bits: int) -> np.ndarray:
    if bits == 8:
        return packed
    out = np.empty(packed.shape[:-1] + (packed.shape[-1] * 2,), dtype=np.uint8)
    out[..., 0::2], out[..., 1::2] = packed & 0xF, packed >> 4
    return out
