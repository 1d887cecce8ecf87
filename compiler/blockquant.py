"""Block-wise weight-only quantization (clipping search + GPTQ error feedback), packed in MatMulNBits' layout.

Written by hand because ORT's quantizers cannot do it: the RTN quantizer takes each block's min/max as is
(an outlier then costs the whole block its resolution), HQQ finds better ranges but with float zero points,
which MatMulNBits' CPU kernel runs 25-50x slower at decode, and ORT's GPTQ path needs a torch model and its
own data loader. Here each block tries a range of shrunken ranges and keeps the one with the least
activation-weighted squared error, refitting its scale for the integer zero point. With calibration
statistics (H = X^T X of the MatMul's input on real text), the columns are then rounded one at a time in the
order of K and each rounding error is pushed onto the columns not rounded yet, as GPTQ does (Frantar et al.,
2022), so that the layer's output error, not the weight error, is minimised.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

SHRINK = np.linspace(1.0, 0.6, 17)  # fractions of the block's range tried as the clipping range
DAMP = 0.01  # GPTQ's dampening of H, as a fraction of its mean diagonal
WEIGHTS_AT_ONCE = 1 << 25  # output columns are independent: quantize ~32M weights at a time (a 7B's lm_head has 545M)
FIT_WEIGHTS = 1 << 18  # weights whose clipping ranges are searched at once (1 MB of float32 each)
LAZY = 128  # columns rounded between two updates of the rest of the matrix (a multiple of the block sizes <= 128)


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
        q = unpack(self.packed, self.bits)
        n, blocks, _ = q.shape
        zp = 2 ** (self.bits - 1) if self.zero_points is None else unpack(self.zero_points, self.bits)[:, :blocks]
        zp = np.broadcast_to(zp, (n, blocks)) if np.ndim(zp) == 0 else zp
        w = (q.astype(np.float32) - zp[..., None]) * self.scales[..., None]
        return w.reshape(n, -1)[:, :k].T


@dataclass
class GPTQFactor:
    """What GPTQ needs of a MatMul input's Hessian H = mean x^T x [K, K]; shared by every weight that reads the input.

    u: the upper Cholesky factor of the dampened H^-1 (H^-1 = u^T u); importance: H's diagonal before damping
    (each input channel's activation energy); dead: channels that were zero on every calibration token.
    """

    u: np.ndarray
    importance: np.ndarray
    dead: np.ndarray


def gptq_factor(hessian: np.ndarray) -> GPTQFactor:
    """The factor, computed in the Hessian's own memory (which it overwrites): a 7B's down projection has
    K = 18944, so each K x K float32 copy would cost 1.4 GB.

    With J the reversal permutation, LAPACK's upper Cholesky J H J = V^T V gives H = (J V J)^T (J V J), so
    H^-1 = u^T u with u = J V^-T J upper triangular: one factorisation and one triangular inverse (2/3 K^3),
    where inverting H and factorising the inverse would take 2 K^3.
    """
    from scipy.linalg import lapack

    h = hessian if hessian.dtype == np.float32 and hessian.flags.c_contiguous else np.ascontiguousarray(hessian, np.float32)
    k = len(h)
    diagonal = np.einsum("ii->i", h)  # a writable view
    importance = diagonal.copy()
    dead = importance == 0
    diagonal[dead] = 1.0
    diagonal += DAMP * diagonal.mean()
    _reverse(h)
    # h.T is the same symmetric matrix in Fortran order, so LAPACK works in place on h's memory
    factor, info = lapack.spotrf(h.T, lower=0, overwrite_a=1, clean=1)
    if info == 0:
        factor, info = lapack.strtri(factor, lower=0, overwrite_c=1)
    if info != 0 or not np.shares_memory(factor, h):
        raise ValueError(f"GPTQ: the {k} x {k} calibration Hessian could not be factorised in place (LAPACK info {info})")
    _reverse(h)  # h (C order) now holds J V^-T J = u
    return GPTQFactor(h, importance, dead)


def _reverse(m: np.ndarray) -> None:
    """m <- J m J in place, two rows at a time (m[::-1, ::-1] would make a whole temporary copy)."""
    k = len(m)
    for i in range(k // 2):
        top = m[i, ::-1].copy()
        m[i] = m[k - 1 - i, ::-1]
        m[k - 1 - i] = top
    if k % 2:
        m[k // 2] = m[k // 2, ::-1].copy()


def quantize_weight(w: np.ndarray, bits: int, block_size: int, symmetric: bool, gptq: GPTQFactor | None = None) -> Quantized:
    """w: [K, N] (x @ w). Blocks run along K for each output column, as MatMulNBits expects.

    gptq: the factor of the input's calibration Hessian. Without it every input channel counts the same and
    each block is rounded on its own; with it, errors on channels that carry more activation energy cost more
    (as in AWQ or llama.cpp's imatrix) and GPTQ compensates each rounding error.
    """
    k, n = w.shape
    step = max(1, WEIGHTS_AT_ONCE // k)
    blocks = -(-k // block_size)
    # filled a slab of columns at a time: only the packed result is held whole (a 7B lm_head's is 0.5 GB in int8)
    packed = np.empty((n, blocks, block_size * bits // 8), np.uint8)
    scales = np.empty((n, blocks), np.float32)
    zp8 = np.empty((n, blocks), np.uint8)
    for i in range(0, n, step):
        q, scales[i : i + step], zp8[i : i + step] = _quantize_columns(w[:, i : i + step], bits, block_size, symmetric, gptq)
        packed[i : i + step] = pack(q, bits)
    zero_points = None if symmetric else pack(_pad_even(zp8) if bits == 4 else zp8, bits)
    return Quantized(packed, scales, zero_points, bits, block_size)


def _quantize_columns(
    w: np.ndarray, bits: int, block_size: int, symmetric: bool, gptq: GPTQFactor | None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Some output columns of w [K, n] -> integers [n, blocks, block], scales and zero points [n, blocks]."""
    if gptq is not None:
        return _gptq(w, gptq, bits, block_size, symmetric)
    k, n = w.shape
    blocks = -(-k // block_size)
    rows = np.zeros((n, blocks * block_size), dtype=np.float32)
    rows[:, :k] = w.T
    return _fit(rows.reshape(n, blocks, block_size), np.ones((blocks, block_size), np.float32), bits, symmetric)


def _fit(x: np.ndarray, weight: np.ndarray, bits: int, symmetric: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """x [n, blocks, block], weight [blocks, block] -> integers, scales [n, blocks], zero points [n, blocks].

    Fitted FIT_WEIGHTS at a time, so that the search's temporaries stay in the processor's cache."""
    weight = (weight / weight.mean() + 1e-3).astype(np.float32)
    rows = max(1, FIT_WEIGHTS // (x.shape[1] * x.shape[2]))
    parts = [_fit_rows(x[i : i + rows], weight, bits, symmetric) for i in range(0, len(x), rows)]
    q, scale, zp = (np.concatenate(part) for part in zip(*parts))
    return q, scale, zp


def _fit_rows(x: np.ndarray, weight: np.ndarray, bits: int, symmetric: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Each block tries every clipping range in SHRINK: integers q = round(x / step + zp), then the scale s that
    minimises sum weight * (x - s (q - zp))^2 for them; the range with the least such error wins. With
    c = q - zp the error is sum(w x x) - 2 s sum(w x c) + s^2 sum(w c c), so each range costs two sums."""
    levels = 2**bits - 1
    lo, hi = x.min(-1), x.max(-1)
    wx = weight * x
    xx = np.einsum("nbk,nbk->nb", wx, x)
    best_err = np.full(x.shape[:2], np.inf, dtype=np.float32)
    best_step, best_scale, best_zp = (np.zeros(x.shape[:2], dtype=np.float32) for _ in range(3))
    c, wc = np.empty_like(x), np.empty_like(x)
    for shrink in SHRINK:
        if symmetric:
            zp = np.full_like(lo, 2 ** (bits - 1))
            step = np.maximum(np.abs(lo), np.abs(hi)) * shrink / 2 ** (bits - 1)
        else:
            step = (hi - lo) * shrink / levels
            zp = np.clip(np.round(-lo * shrink / np.where(step == 0, 1, step)), 0, levels)
        step = np.where(step == 0, 1e-8, step)
        _round(x, step, zp, levels, out=c)
        c -= zp[..., None]
        xc = np.einsum("nbk,nbk->nb", wx, c)
        np.multiply(c, weight, out=wc)
        cc = np.einsum("nbk,nbk->nb", wc, c)
        scale = np.where(cc > 0, xc / np.where(cc > 0, cc, 1), step)
        err = xx - 2 * scale * xc + scale * scale * cc
        better = err < best_err
        best_err = np.where(better, err, best_err)
        best_step = np.where(better, step, best_step)
        best_scale = np.where(better, scale, best_scale)
        best_zp = np.where(better, zp, best_zp)
    q = _round(x, best_step, best_zp, levels, out=c).astype(np.uint8)
    return q, np.where(best_scale == 0, 1e-8, best_scale), best_zp


def _round(x: np.ndarray, step: np.ndarray, zp: np.ndarray, levels: int, out: np.ndarray) -> np.ndarray:
    """round(x / step + zp) clipped to the integer range, per block, into `out`."""
    np.divide(x, step[..., None], out=out)
    out += zp[..., None]
    np.round(out, out=out)
    return np.clip(out, 0, levels, out=out)


def _gptq(w: np.ndarray, gptq: GPTQFactor, bits: int, block_size: int, symmetric: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """w [K, n] -> integers [n, blocks, block] (the last block padded with zeros), scales, zero points [n, blocks].

    Each block's scale and zero point come from _fit on the block as GPTQ has updated it so far; then its
    columns are rounded in turn, each error divided by u's diagonal and subtracted from the remaining columns
    through u. The paper's lazy batches, in two levels: rank-1 updates reach the rest of the quantization
    block, one product per block the rest of the LAZY rows, one per LAZY rows the rest of W. The loop runs
    over K with W held as [K, n], so every step touches contiguous rows.
    """
    k, n = w.shape
    levels = 2**bits - 1
    u = gptq.u
    w = np.array(w, dtype=np.float32)  # a copy: updated as rounding errors are pushed on
    w[gptq.dead] = 0.0
    blocks = -(-k // block_size)
    q = np.zeros((blocks * block_size, n), dtype=np.uint8)
    scales, zps = np.zeros((blocks, n), np.float32), np.zeros((blocks, n), np.float32)
    lazy = max(LAZY, block_size)
    for start in range(0, k, lazy):
        end = min(start + lazy, k)
        chunk = w[start:end].copy()
        errors = np.zeros_like(chunk)
        for first in range(start, end, block_size):  # one quantization block: rank-1 updates inside it only
            last = min(first + block_size, end)
            b = first // block_size
            _, scale, zp = _fit(chunk[first - start : last - start].T[:, None, :], gptq.importance[None, first:last], bits, symmetric)
            scales[b], zps[b] = scale[:, 0], zp[:, 0]
            for row in range(first, last):
                i = row - start
                qi = np.clip(np.round(chunk[i] / scales[b] + zps[b]), 0, levels)
                q[row] = qi
                errors[i] = (chunk[i] - (qi - zps[b]) * scales[b]) / u[row, row]
                chunk[i + 1 : last - start] -= u[row, row + 1 : last, None] * errors[i][None, :]
            chunk[last - start :] -= u[first:last, last:end].T @ errors[first - start : last - start]
        w[end:] -= u[start:end, end:].T @ errors
    return q.T.reshape(n, blocks, block_size), scales.T, zps.T


def _pad_even(zp: np.ndarray) -> np.ndarray:
    """4-bit zero points are packed per row: an odd block count gets one padding nibble."""
    return np.pad(zp, ((0, 0), (0, zp.shape[1] % 2))) if zp.shape[1] % 2 else zp


def pack(q: np.ndarray, bits: int) -> np.ndarray:
    if bits == 8:
        return q.astype(np.uint8, copy=False)
    return (q[..., 0::2] & 0xF) | ((q[..., 1::2] & 0xF) << 4)  # element 2i in the low nibble


def unpack(packed: np.ndarray, bits: int) -> np.ndarray:
    if bits == 8:
        return packed
    out = np.empty(packed.shape[:-1] + (packed.shape[-1] * 2,), dtype=np.uint8)
    out[..., 0::2], out[..., 1::2] = packed & 0xF, packed >> 4
    return out
