"""The integer-GEMM prefill form of a contrib block: its prompt chunks' MatMuls through the CPU EP's u8 x s8 GEMM.

Decode reads every weight once a token, so its MatMulNBits keeps int4 weights and multiplies them by int8
activations a block at a time. On a prompt chunk that kernel is the ceiling: 220-260 GOP/s on two Zen 4 cores,
against 660-770 for MLAS's integer GEMM on the same shapes (docs/probes/prefill_kernels.py). This form runs each
MatMulNBits of an attention or FFN block as MatMulIntegerToFloat over int8 weights, one scale per output column (from
the block-quantized values: a step about a tenth of int4's, so the weights are int4's to within that), with the
activations quantized to uint8 per row, symmetric around 128 (MLAS's fast path takes one zero point for A; its
s8 x s8 path is 11x slower). The price: a second copy of those weights in memory, int8, and the activations'
rounding, which verify measures on held-out text (its windows run as prompt chunks).

A per-row scale is set by a token's largest channel, and Qwen's MatMul inputs have a few channels far larger than
the rest in every token (on the real 1.5B, per-row int8 alone put 20 % error on layer 26's gate_proj). Where the
build measured the input's channels (GPTQ's statistics: the mean of x^T x, whose diagonal is each channel's mean
square), the form divides x by SmoothQuant's s = rms(x)^a / max|w|^(1-a) per channel before the rows are quantized
and multiplies the weight's rows by s before its columns are: x @ W unchanged, the outliers' range moved into the
per-column weight scales, where it costs little (compiler.smoothing does the same for the static QDQ graphs)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

from compiler.blockquant import unpack
from compiler.smoothing import factors
from compiler.static_forms import prefill_path
from runtime.errors import TandemError

KINDS = ("attention", "ffn")  # the blocks it rewrites: the head multiplies one row a sequence, the embedding none
ALPHA = 0.5  # SmoothQuant's migration strength: the outliers' range split evenly between activations and weights


def write_form(file: Path, channels: dict[str, np.ndarray] | None = None) -> Path | None:
    """Write the prefill form of the block graph at `file` beside it (name.prefill.onnx, its int8 weights in
    name.prefill.onnx.data; the weights it keeps are still read from the block's own file) and return its path;
    None, writing nothing, where the block has no MatMulNBits to rewrite. channels: MatMul input -> the RMS of
    each of its channels over the calibration text (the inputs it names are smoothed)."""
    model = onnx.load(file, load_external_data=False)
    if not rewrite(model, file.parent, f"/{file.name.removesuffix('.onnx')}/int8_prefill", channels or {}):
        return None
    out = prefill_path(file)
    onnx.save_model(model, out, save_as_external_data=True, location=f"{out.name}.data", size_threshold=1024)
    return out


def rewrite(model: onnx.ModelProto, directory: Path, prefix: str, channels: dict[str, np.ndarray] | None = None) -> bool:
    """Replace, in place, each plain MatMulNBits (no g_idx, no bias) by the integer GEMM over int8 weights;
    `directory` holds the external data of the weights it reads, `prefix` starts the names it makes (unique among
    the blocks a graph links), `channels` as write_form's. Returns whether any was replaced."""
    graph = model.graph
    initializers = {t.name: t for t in graph.initializer}

    def weight_of(node: onnx.NodeProto) -> np.ndarray:  # float [K, N], dequantized when asked (a 7B FFN's: 0.5 GB)
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        arrays = [numpy_helper.to_array(initializers[name], str(directory)) for name in node.input[1:]]
        return dequantize(*arrays, attrs["K"], attrs["N"], attrs["bits"], attrs["block_size"])

    chosen = {i for i, node in enumerate(graph.node) if node.op_type == "MatMulNBits" and len(node.input) <= 4
              and all(name in initializers for name in node.input[1:])}
    if not chosen:
        return False
    largest: dict[str, list[np.ndarray]] = {}  # smoothed activation -> each reader's largest |w| per input channel
    for i in sorted(chosen):
        if (x := graph.node[i].input[0]) in (channels or {}):
            largest.setdefault(x, []).append(np.abs(weight_of(graph.node[i])).max(1))
    smoothing = {x: factors(channels[x], np.max(rows, axis=0), ALPHA) for x, rows in largest.items()}
    quantized: dict[str, tuple[str, str]] = {}  # activation -> its uint8 rows and their scales, made once
    nodes, replaced = [], set()
    for i, node in enumerate(graph.node):
        if i not in chosen:
            nodes.append(node)
            continue
        x, w = node.input[0], weight_of(node)
        replaced.update(node.input[1:])
        scale = smoothing.get(x)
        q, columns = per_column(w if scale is None else w * scale[:, None])
        weight = (f"{node.input[1]}/int8", f"{node.input[1]}/int8_scales")
        graph.initializer.extend(map(numpy_helper.from_array, (q, columns), weight))
        if x not in quantized:
            quantized[x] = _quantize_rows(nodes, graph, f"{prefix}/{len(quantized)}", x, w.shape[0],
                                          None if scale is None else (1 / scale).astype(np.float32))
        nodes.extend(_integer_matmul(graph, f"{prefix}/{node.name or node.output[0]}", node, *quantized[x], *weight,
                                     w.shape[1]))
    del graph.node[:]
    graph.node.extend(nodes)
    kept = [t for t in graph.initializer if t.name not in replaced]
    del graph.initializer[:]
    graph.initializer.extend(kept)
    return True


def dequantize(b: np.ndarray, scales: np.ndarray, zero_points: np.ndarray | None, k: int, n: int, bits: int,
               block: int) -> np.ndarray:
    """MatMulNBits' weight [K, N] in float32: B [N, blocks, block * bits / 8] (low bits first), scales [N * blocks],
    zero points packed like B (2 ** (bits - 1) when absent)."""
    if bits not in (4, 8):
        raise TandemError(f"MatMulNBits with {bits}-bit weights: the int8 prefill form takes 4 or 8")
    count = -(-k // block)
    q = unpack(b.reshape(n, -1), bits)[:, : count * block].reshape(n, count, block).astype(np.float32)
    if zero_points is None:
        zp = np.full((n, count), 2 ** (bits - 1), np.float32)
    elif zero_points.dtype == np.uint8:
        zp = unpack(zero_points.reshape(n, -1), bits)[:, :count].astype(np.float32)
    else:  # float zero points (already in the weights' scale units)
        zp = zero_points.reshape(n, count).astype(np.float32)
    w = (q - zp[..., None]) * scales.reshape(n, count, 1).astype(np.float32)
    return np.ascontiguousarray(w.reshape(n, -1)[:, :k].T)


def per_column(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """int8 [K, N] (symmetric, -127..127) and a float32 scale per column."""
    scale = np.abs(w).max(axis=0) / 127
    scale[scale == 0] = 1
    return np.clip(np.rint(w / scale), -127, 127).astype(np.int8), scale.astype(np.float32)


def _constant(graph: onnx.GraphProto, name: str, value: np.ndarray) -> str:
    graph.initializer.append(numpy_helper.from_array(value, name))
    return name


def _quantize_rows(nodes: list, graph: onnx.GraphProto, p: str, x: str, k: int,
                   divide: np.ndarray | None = None) -> tuple[str, str]:
    """Nodes (appended to `nodes`, named from p) quantizing x [..., K] (times `divide` [K], the smoothing's 1/s,
    where given) to uint8 rows [rows, K] around 128, one scale per row. Returns the rows' name and their scales'
    [rows, 1]."""
    if divide is not None:
        nodes.append(helper.make_node("Mul", [x, _constant(graph, f"{p}/smoothing", divide)], [f"{p}/smoothed"],
                                      name=f"{p}/smoothed"))
        x = f"{p}/smoothed"
    shape = _constant(graph, f"{p}/rows_of_k", np.array([-1, k], np.int64))
    last = _constant(graph, f"{p}/last_axis", np.array([-1], np.int64))
    step = _constant(graph, f"{p}/one_127th", np.array(1 / 127, np.float32))
    tiny = _constant(graph, f"{p}/tiny", np.array(1e-12, np.float32))
    middle = _constant(graph, f"{p}/zero_point", np.array([128], np.uint8))
    nodes += [
        helper.make_node("Reshape", [x, shape], [f"{p}/flat"], name=f"{p}/flat"),
        helper.make_node("Abs", [f"{p}/flat"], [f"{p}/abs"], name=f"{p}/abs"),
        helper.make_node("ReduceMax", [f"{p}/abs", last], [f"{p}/max"], name=f"{p}/max", keepdims=0),
        helper.make_node("Mul", [f"{p}/max", step], [f"{p}/step"], name=f"{p}/step"),
        helper.make_node("Max", [f"{p}/step", tiny], [f"{p}/scale"], name=f"{p}/scale"),  # an all-zero row
        helper.make_node("Shape", [f"{p}/scale"], [f"{p}/count"], name=f"{p}/count"),
        helper.make_node("Expand", [middle, f"{p}/count"], [f"{p}/zero_points"], name=f"{p}/zero_points"),
        helper.make_node("QuantizeLinear", [f"{p}/flat", f"{p}/scale", f"{p}/zero_points"], [f"{p}/u8"], name=f"{p}/u8",
                         axis=0),
        helper.make_node("Unsqueeze", [f"{p}/scale", last], [f"{p}/scales"], name=f"{p}/scales"),
    ]
    return f"{p}/u8", f"{p}/scales"


def _integer_matmul(graph: onnx.GraphProto, p: str, node: onnx.NodeProto, rows: str, row_scales: str, weight: str,
                    scales: str, n: int) -> list[onnx.NodeProto]:
    """The uint8 rows times the int8 weight, scaled by the column scales inside the GEMM (MatMulIntegerToFloat, one
    pass over the output fewer than MatMulInteger and its own dequantization: 17 % faster at 1024 rows), then by
    the row scales, in x's shape."""
    x = node.input[0]
    middle = _constant(graph, f"{p}/zero_point", np.array(128, np.uint8))
    one = _constant(graph, f"{p}/one", np.array(1, np.float32))
    width = _constant(graph, f"{p}/width", np.array([n], np.int64))
    return [
        helper.make_node("MatMulIntegerToFloat", [rows, weight, one, scales, middle], [f"{p}/columns"],
                         name=f"{p}/columns", domain="com.microsoft"),
        helper.make_node("Mul", [f"{p}/columns", row_scales], [f"{p}/flat"], name=f"{p}/flat"),
        helper.make_node("Shape", [x], [f"{p}/leading"], name=f"{p}/leading", end=-1),
        helper.make_node("Concat", [f"{p}/leading", width], [f"{p}/shape"], name=f"{p}/shape", axis=0),
        helper.make_node("Reshape", [f"{p}/flat", f"{p}/shape"], list(node.output), name=f"{p}/out"),
    ]
