"""A QDQ graph in the form the CPU EP runs: each int8 weight's DequantizeLinear -> MatMul as one 8-bit MatMulNBits.

ORT's CPU EP has no kernel for the uint16 activations of an A16W8 graph (the NPU's form), and where its u8s8 integer
MatMul saturates (x86 without VNNI) the engine runs QDQ unfused: either way ORT folds every weight's
DequantizeLinear into a float32 copy, 4x the int8 file, and each static form (decode, prefill) holds its own. On a
7B that was 6.5 GB of the runtime's 14.3. MatMulNBits keeps the int8 weights as they are (the per-channel scale
repeated over each column's blocks: the same weight values) and multiplies at accuracy level 4, which quantizes the
activations to int8 a block at a time (level 0 dequantizes the whole matrix at every call: 70 ms for one row of a
7B's QKV). The activations' own Q/DQ stay; verify measures what the extra rounding costs."""
from __future__ import annotations

import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

BLOCK = 128  # 8-bit blocks: also the activations' quantization block at accuracy level 4
ACCURACY_LEVEL = 4


@contextmanager
def cpu_form(path: Path) -> Iterator[Path]:
    """The graph file to load on the CPU EP: `path` itself, or where it has int8 weight DequantizeLinear ->
    MatMul pairs, a rewritten copy with external data in a temporary directory that lasts as long as the context
    (ORT reads the weights while it makes the session). A copy given to ORT as bytes would stay in memory beside
    the session's own: +60 MB per 7B attention graph."""
    model = onnx.load(path, load_external_data=False)
    if not _candidates(model.graph):
        yield path
        return
    onnx.load_external_data_for_model(model, str(path.parent))
    rewrite(model)
    with tempfile.TemporaryDirectory(prefix="tandem-cpu-", ignore_cleanup_errors=True) as directory:
        target = Path(directory) / path.name
        onnx.save_model(model, target, save_as_external_data=True, location=f"{path.name}.data")
        del model
        yield target


def rewrite(model: onnx.ModelProto) -> None:
    """Replace, in place, each candidate pair by a MatMulNBits over the same weight values."""
    graph = model.graph
    initializers = {t.name: t for t in graph.initializer}
    candidates, producers = _candidates(graph), _producers(graph)
    replaced: set[str] = set()
    nodes = []
    for node in graph.node:
        if node.op_type == "DequantizeLinear" and node.output[0] in candidates:
            replaced.update(node.input)
            continue
        dq = producers.get(node.input[1]) if node.op_type == "MatMul" else None
        if dq is None or dq.output[0] not in candidates:
            nodes.append(node)
            continue
        prefix = dq.input[0]
        converted = [f"{prefix}/nbits", f"{prefix}/nbits_scales", f"{prefix}/nbits_zero_points"]
        if converted[0] not in initializers:  # a weight two MatMuls share is converted once
            tensors = map(numpy_helper.from_array, blocks(*(numpy_helper.to_array(initializers[i]) for i in dq.input)), converted)
            graph.initializer.extend(tensors)
            initializers.update((t.name, t) for t in graph.initializer[-3:])
        k, n = initializers[prefix].dims
        nodes.append(helper.make_node(
            "MatMulNBits", [node.input[0], *converted], list(node.output), name=f"{node.name}/nbits",
            domain="com.microsoft", K=k, N=n, bits=8, block_size=BLOCK, accuracy_level=ACCURACY_LEVEL))
    del graph.node[:]
    graph.node.extend(nodes)
    kept = [t for t in graph.initializer if t.name not in replaced]
    del graph.initializer[:]
    graph.initializer.extend(kept)
    if not any(o.domain == "com.microsoft" for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid("com.microsoft", 1))


def blocks(q: np.ndarray, scale: np.ndarray, zero_point: np.ndarray | None = None) -> tuple[np.ndarray, ...]:
    """MatMulNBits' B [N, blocks, BLOCK] (uint8, K padded with the zero point), scales and zero points [N * blocks]
    from an int8/uint8 weight [K, N] with a per-tensor or per-column scale and zero point."""
    k, n = q.shape
    count = -(-k // BLOCK)
    zero_point = np.zeros_like(scale, q.dtype) if zero_point is None else zero_point
    offset = 128 if q.dtype == np.int8 else 0  # MatMulNBits' weights are unsigned
    zp = (np.broadcast_to(zero_point, (n,)).astype(np.int16) + offset).astype(np.uint8)
    b = np.empty((n, count * BLOCK), np.uint8)
    b[:, :k] = (q.T.astype(np.int16) + offset).astype(np.uint8)
    b[:, k:] = zp[:, None]
    return (b.reshape(n, count, BLOCK), np.repeat(np.broadcast_to(scale, (n,)).astype(np.float32), count),
            np.repeat(zp, count))


def _candidates(graph: onnx.GraphProto) -> set[str]:
    """Outputs of DequantizeLinear nodes over a rank-2 int8/uint8 initializer that feed only MatMuls' weight input."""
    initializers = {t.name: t for t in graph.initializer}
    consumers = _consumers(graph)
    found = set()
    for node in graph.node:
        if node.op_type != "DequantizeLinear" or not all(name in initializers for name in node.input):
            continue
        weight = initializers[node.input[0]]
        if len(weight.dims) != 2 or weight.data_type not in (onnx.TensorProto.INT8, onnx.TensorProto.UINT8):
            continue
        scale = initializers[node.input[1]].dims
        if len(scale) > 1 or (scale and (_axis(node) != 1 or scale[0] != weight.dims[1])):
            continue  # blockwise, or per row: not one scale per tensor or per column
        users = consumers.get(node.output[0], [])
        if users and all(u.op_type == "MatMul" and list(u.input).index(node.output[0]) == 1 for u in users):
            found.add(node.output[0])
    return found


def _axis(node: onnx.NodeProto) -> int:
    return next((a.i for a in node.attribute if a.name == "axis"), 1)


def _consumers(graph: onnx.GraphProto) -> dict[str, list[onnx.NodeProto]]:
    users: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            users.setdefault(name, []).append(node)
    return users


def _producers(graph: onnx.GraphProto) -> dict[str, onnx.NodeProto]:
    return {out: node for node in graph.node for out in node.output}
