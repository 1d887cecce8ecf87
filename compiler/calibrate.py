"""calibrate: real text carried through the fp32 graphs one graph at a time, giving each graph its input samples.

Each sample is a fresh prefill (empty KV cache), so graphs can be calibrated alone, in build order, with only
one graph in memory: the 7B path needs that.
"""
from __future__ import annotations

import os
import tempfile
from functools import cache
from pathlib import Path
from typing import Literal

import numpy as np
import onnx
import onnxruntime as ort
from onnx import helper

from compiler.evaltext import windows
from compiler.recipe import CalibrationSpec
from runtime import manifest as names
from runtime.manifest import TensorSpec
from runtime.static_inputs import attention_bias, rope_rows
from runtime.tokenizer import Tokenizer


def first_samples(tokenizer: Tokenizer, spec: CalibrationSpec) -> list[np.ndarray]:
    """Token windows of the calibration text (never the evaluation text), as input_ids [1, window]."""
    return [np.array([w], dtype=np.int64) for w in windows(tokenizer, "calibration", spec.window, spec.windows)]


def feeds(inputs: dict[str, TensorSpec], x: np.ndarray, rope: np.ndarray) -> dict[str, np.ndarray]:
    """A graph's inputs for one prefill sample x (input_ids or hidden states), starting from an empty cache."""
    count = x.shape[1]
    values: dict[str, np.ndarray] = {}
    capacity = next((spec.shape[2] for name, spec in inputs.items() if name.startswith("past_")), None)
    static = rope_rows(rope, np.zeros(1, np.int64), count, np.dtype(np.float32)) if names.ROPE_COS in inputs else {}
    for name, spec in inputs.items():
        if name in (names.INPUT_IDS, names.HIDDEN):
            values[name] = x
        elif name.startswith("past_"):  # a static graph's: its fixed capacity, none of it attended
            _, kv_heads, _, head_dim = spec.shape
            values[name] = _empty((1, kv_heads, capacity if static else count, head_dim))
        elif name == names.ATTENTION_BIAS:
            values[name] = _bias(count, capacity)
        elif name in static:
            values[name] = static[name]
        elif name == names.SEQLENS_K:
            values[name] = np.array([count - 1], dtype=np.int32)
        elif name == names.TOTAL_SEQUENCE_LENGTH:
            values[name] = np.array(count, dtype=np.int32)
        elif name in (names.COS_CACHE, names.SIN_CACHE):
            values[name] = rope[0 if name == names.COS_CACHE else 1]
        elif name == names.LOGITS_INDEX:
            values[name] = np.arange(count, dtype=np.int64)[None]  # every position: lm_head statistics need them all
        else:
            raise KeyError(f"no calibration feed for graph input {name}")
    return values


@cache
def _empty(shape: tuple[int, ...]) -> np.ndarray:
    """One array of zeros per shape: every sample's cache (a static graph's is the full capacity: 8 MB a layer for a 7B)."""
    return np.zeros(shape, np.float32)


@cache
def _bias(count: int, capacity: int) -> np.ndarray:
    return attention_bias(np.zeros(1, np.int64), count, capacity, np.dtype(np.float32))


def propagate(
    path: Path, calibration: list[dict[str, np.ndarray]], grams: set[str]
) -> tuple[list[np.ndarray] | None, dict[str, np.ndarray]]:
    """One run of the saved fp32 graph per calibration sample: its hidden_next outputs (the next graph's samples;
    None for the head) and the mean Gram matrices of the `grams` values (GPTQ's statistics), from the same runs."""
    model = onnx.load(path, load_external_data=False)
    carried: list[np.ndarray] | None = [] if any(o.name == names.HIDDEN_NEXT for o in model.graph.output) else None
    return carried, statistics(model, grams, calibration, "gram", path.parent, carry=carried)


def _one_copy() -> ort.SessionOptions:
    """Calibration runs a graph a few times: its weights are kept once, not again packed for faster MatMuls
    (a 7B FFN block's weights are 0.8 GB in float32)."""
    options = ort.SessionOptions()
    options.add_session_config_entry("session.disable_prepacking", "1")
    return options


def statistics(
    model: onnx.ModelProto, values: set[str], samples: list[dict[str, np.ndarray]], kind: Literal["gram", "absmax"],
    weights_dir: Path | None = None, carry: list[np.ndarray] | None = None,
) -> dict[str, np.ndarray]:
    """Intermediate value name -> its statistic over the samples' tokens, from one run of the graph per sample.

    gram: mean x^T x [C, C] (GPTQ's Hessian); absmax: max |x| per channel [C] (SmoothQuant's activation range).
    weights_dir: where the model, loaded without its external data, has it. The probe graph then reads the
    weights from those files, and the only copy in memory is ORT's (a 7B's lm_head is 2.2 GB in float32).
    carry: a list that receives each sample's hidden_next output, from the same runs.
    """
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    wanted = sorted(values - {o.name for o in probe.graph.output})
    probe.graph.output.extend(helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None) for name in wanted)
    fetch = wanted + ([names.HIDDEN_NEXT] if carry is not None else [])
    stats: dict[str, np.ndarray] = {}
    rows = dict.fromkeys(wanted, 0)
    with tempfile.TemporaryDirectory() as tmp:
        if weights_dir is None:
            path = Path(tmp) / "probe.onnx"
            onnx.save_model(probe, path, save_as_external_data=True, location="probe.onnx.data")
        else:  # beside the weights' files, which the initializers name relative to the model
            handle, name = tempfile.mkstemp(suffix=".probe.onnx", dir=weights_dir)
            os.close(handle)
            path = Path(name)
            onnx.save_model(probe, path)
        del probe
        try:
            session = ort.InferenceSession(str(path), _one_copy(), providers=["CPUExecutionProvider"])
        finally:
            if weights_dir is not None:
                path.unlink()
        for sample in samples:
            values_out = session.run(fetch, sample)
            if carry is not None:
                carry.append(values_out.pop())
            for name, value in zip(wanted, values_out):
                flat = value.reshape(-1, value.shape[-1])
                if kind == "gram":
                    stats[name] = _add_gram(stats.get(name), flat)
                elif name not in stats:
                    stats[name] = np.abs(flat).max(0)
                else:
                    np.maximum(stats[name], np.abs(flat).max(0), out=stats[name])
                rows[name] += flat.shape[0]
    if kind == "gram":
        stats = {name: _symmetric(stat, rows[name]) for name, stat in stats.items()}
    return stats


def _add_gram(acc: np.ndarray | None, flat: np.ndarray) -> np.ndarray:
    """acc + flat^T flat by BLAS syrk, which computes one triangle (half a matrix product's work; numpy's
    `flat.T @ flat` took 3.3x as long for a 7B down projection's input) into acc in place. Fortran order,
    the upper triangle filled."""
    from scipy.linalg.blas import ssyrk

    if acc is None:  # syrk's own output takes 5x as long as accumulating into zeros
        acc = np.zeros((flat.shape[1],) * 2, np.float32, order="F")
    return ssyrk(1.0, flat, beta=1.0, c=acc, trans=1, lower=0, overwrite_c=1)


def _symmetric(upper: np.ndarray, rows: int, band: int = 1024) -> np.ndarray:
    """The full mean gram matrix, C order, in the memory of syrk's Fortran-order upper triangle (whose C-order
    view has the lower triangle): mirrored a band of rows at a time, not through a K x K copy."""
    m = upper.T
    m /= rows
    for i in range(0, len(m), band):
        m[i : i + band, i + band :] = m[i + band :, i : i + band].T
        block = m[i : i + band, i : i + band]
        upper = np.triu_indices(len(block), 1)
        block[upper] = block.T[upper]
    return m
