"""The static dialect's step inputs, made on the host for every row of a step: RoPE values at the new positions and
the attention bias over the fixed cache capacity plus the new positions (compiler.graphs.make_static_attention)."""
from __future__ import annotations

import numpy as np

from runtime import manifest as names


def static_inputs(tables: np.ndarray, lengths: np.ndarray, sequence: int, capacity: int, dtype: np.dtype) -> dict[str, np.ndarray]:
    """For rows whose caches hold `lengths` positions, a step of `sequence` new positions (padding included):
    rope_cos, rope_sin [rows, sequence, head_dim] and attention_bias [rows, sequence, capacity + sequence].

    tables: the artifact's RoPE tables [2, positions, head_dim / 2]. Position i of the step attends each row's
    cached positions below its length, and new positions up to i."""
    return {**rope_rows(tables, lengths, sequence, dtype),
            names.ATTENTION_BIAS: attention_bias(lengths, sequence, capacity, dtype)}


def rope_rows(tables: np.ndarray, lengths: np.ndarray, sequence: int, dtype: np.dtype) -> dict[str, np.ndarray]:
    positions = np.minimum(lengths[:, None] + np.arange(sequence), len(tables[0]) - 1)  # padding past the end: any row
    cos, sin = tables[0][positions], tables[1][positions]
    return {names.ROPE_COS: np.concatenate([cos, cos], -1).astype(dtype),
            names.ROPE_SIN: np.concatenate([-sin, sin], -1).astype(dtype)}


def attention_bias(lengths: np.ndarray, sequence: int, capacity: int, dtype: np.dtype) -> np.ndarray:
    bias = np.full((len(lengths), sequence, capacity + sequence), np.finfo(dtype).min, dtype)
    bias[:, :, :capacity][np.broadcast_to(np.arange(capacity) < lengths[:, None, None], bias[:, :, :capacity].shape)] = 0
    bias[:, :, capacity:][:, np.tri(sequence, dtype=bool)] = 0
    return bias
