"""calibrate: real text carried through the fp32 graphs one graph at a time, giving each graph its input samples.

Each sample is a fresh prefill (empty KV cache), so graphs can be calibrated alone, in build order, with only
one graph in memory: the 7B path needs that.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort

from compiler.evaltext import windows
from compiler.recipe import CalibrationSpec
from runtime import manifest as names
from runtime.manifest import TensorSpec
from runtime.tokenizer import Tokenizer


def first_samples(tokenizer: Tokenizer, spec: CalibrationSpec) -> list[np.ndarray]:
    """Token windows of the calibration text (never the evaluation text), as input_ids [1, window]."""
    return [np.array([w], dtype=np.int64) for w in windows(tokenizer, "calibration", spec.window, spec.windows)]


def feeds(inputs: dict[str, TensorSpec], x: np.ndarray, rope: np.ndarray) -> dict[str, np.ndarray]:
    """A graph's inputs for one prefill sample x (input_ids or hidden states), starting from an empty cache."""
    count = x.shape[1]
    values: dict[str, np.ndarray] = {}
    for name, spec in inputs.items():
        if name in (names.INPUT_IDS, names.HIDDEN):
            values[name] = x
        elif name.startswith("past_"):
            _, kv_heads, _, head_dim = spec.shape
            values[name] = np.zeros((1, kv_heads, count, head_dim), dtype=np.float32)
        elif name == names.SEQLENS_K:
            values[name] = np.array([count - 1], dtype=np.int32)
        elif name == names.TOTAL_SEQUENCE_LENGTH:
            values[name] = np.array(count, dtype=np.int32)
        elif name in (names.COS_CACHE, names.SIN_CACHE):
            values[name] = rope[0 if name == names.COS_CACHE else 1]
        elif name == names.LOGITS_INDEX:
            values[name] = np.array([[count - 1]], dtype=np.int64)
        else:
            raise KeyError(f"no calibration feed for graph input {name}")
    return values


def propagate(path: Path, inputs: dict[str, TensorSpec], samples: list[np.ndarray], rope: np.ndarray) -> list[np.ndarray]:
    """Run the fp32 graph on every sample; its hidden_next outputs are the next graph's samples."""
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return [session.run([names.HIDDEN_NEXT], feeds(inputs, x, rope))[0] for x in samples]
