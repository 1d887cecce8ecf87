"""smoothing: SmoothQuant's per-channel scales folded exactly into the fp32 graph before int8 QDQ.

Static int8 activations get one scale per tensor, and Qwen's MatMul inputs have a few channels a hundred
times larger than the rest: those channels take the whole int8 range. SmoothQuant (Xiao et al., 2022) divides
each input channel by s = max|x|^a / max|w|^(1-a) and multiplies the weight row by s, which leaves x @ W
unchanged and moves the outliers' difficulty into the weights (per-channel int8, where it costs little).
The division is folded into the op that makes x, so the graph gains no op:

- RMSNorm -> q/k/v (packed) or gate and up: the norm's weight;
- SiLU(gate) * up -> down: up_proj's output columns;
- attention -> o_proj: v_proj's output columns and bias, one scale per kv-head channel shared by the query
  heads that read it (grouped-query attention averages v rows, so a channel's scale passes through it).

ORT's own SmoothQuant (quantize_static's extra option) needs Intel Neural Compressor and folds only
LayerNorm-fed MatMuls; these three patterns are Qwen's.
"""
from __future__ import annotations

import numpy as np
import onnx
from onnx import numpy_helper

from compiler.calibrate import statistics


NORM_WEIGHT = {"SimplifiedLayerNormalization": 1, "SkipSimplifiedLayerNormalization": 2}  # the input holding gamma


def smooth(model: onnx.ModelProto, matmuls: set[str], samples: list[dict[str, np.ndarray]], alpha: float) -> onnx.ModelProto:
    """Fold scales for every input of the named MatMuls whose producer is one of the patterns above."""
    nodes = [n for n in model.graph.node if n.name in matmuls and n.op_type == "MatMul"]
    inits = {i.name: i for i in model.graph.initializer}
    producer = {o: n for n in model.graph.node for o in n.output}
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for n in model.graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    amax = statistics(model, {n.input[0] for n in nodes}, samples, "absmax")
    for x, act in amax.items():
        readers = consumers[x]
        if not all(r.name in matmuls and r.op_type == "MatMul" and r.input[1] in inits for r in readers):
            continue
        weights = [_array(inits, r.input[1]) for r in readers]
        fold = _folder(producer.get(x), producer, consumers, inits, matmuls)
        if fold is None:
            continue
        wmax = np.max([np.abs(w).max(1) for w in weights], axis=0)
        scale = fold(act, wmax, alpha)
        for r, w in zip(readers, weights):
            _set(inits, r.input[1], w * scale[:, None])
    return model


def factors(act: np.ndarray, wmax: np.ndarray, alpha: float) -> np.ndarray:
    scale = np.power(np.maximum(act, 1e-5), alpha) / np.power(np.maximum(wmax, 1e-5), 1 - alpha)
    return np.clip(scale, 1e-4, 1e4).astype(np.float32)


def _folder(node, producer, consumers, inits, matmuls):
    """The function that picks the scales for this producer and divides them out of it, or None."""
    if node is None:
        return None
    gamma = node.input[NORM_WEIGHT[node.op_type]] if node.op_type in NORM_WEIGHT else None
    if gamma in inits:

        def fold_norm(act, wmax, alpha):
            scale = factors(act, wmax, alpha)
            _set(inits, gamma, _array(inits, gamma) / scale)
            return scale

        return fold_norm
    if node.op_type == "Mul":
        for i in node.input:
            up = producer.get(i)
            if up is not None and up.op_type == "MatMul" and up.name in matmuls and up.input[1] in inits and len(consumers[i]) == 1:

                def fold_up(act, wmax, alpha, up=up):
                    scale = factors(act, wmax, alpha)
                    _set(inits, up.input[1], _array(inits, up.input[1]) / scale[None, :])
                    return scale

                return fold_up
        return None
    if node.op_type == "GroupQueryAttention":
        return _fold_attention(node, producer, inits, matmuls)
    return None


def _fold_attention(gqa, producer, inits, matmuls):
    """o_proj's input is a weighted sum of v rows: scale v_proj's columns (and bias) per kv-head channel."""
    attrs = {a.name: a.i for a in gqa.attribute}
    heads, kv_heads = attrs["num_heads"], attrs["kv_num_heads"]
    add = producer.get(gqa.input[0])
    if add is None or add.op_type != "Add" or add.input[1] not in inits:
        return None
    qkv = producer.get(add.input[0])
    if qkv is None or qkv.op_type != "MatMul" or qkv.name not in matmuls or qkv.input[1] not in inits:
        return None

    def fold_v(act, wmax, alpha):
        head_dim = act.size // heads
        group = heads // kv_heads
        kv_act = act.reshape(kv_heads, group, head_dim).max(1)
        kv_w = wmax.reshape(kv_heads, group, head_dim).max(1)
        kv_scale = factors(kv_act, kv_w, alpha).reshape(-1)
        v = slice((heads + kv_heads) * head_dim, (heads + 2 * kv_heads) * head_dim)
        w, b = _array(inits, qkv.input[1]), _array(inits, add.input[1])
        w[:, v] /= kv_scale
        b[v] /= kv_scale
        _set(inits, qkv.input[1], w)
        _set(inits, add.input[1], b)
        return np.repeat(kv_scale.reshape(kv_heads, 1, head_dim), group, axis=1).reshape(-1)

    return fold_v


def _array(inits: dict[str, onnx.TensorProto], name: str) -> np.ndarray:
    return numpy_helper.to_array(inits[name]).copy()


def _set(inits: dict[str, onnx.TensorProto], name: str, value: np.ndarray) -> None:
    inits[name].CopyFrom(numpy_helper.from_array(value.astype(np.float32), name))
