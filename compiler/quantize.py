"""quantize: a built fp32 graph's weights as the recipe says, per block kind, with ONNX Runtime's own tools.

Nodes are selected by the block that made them (node names start with `/<block>/`, see graphs.GraphBuilder):
MatMuls of attention and FFN blocks, the lm_head MatMul of the head block, the embedding's Gather.
"""
from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Iterable

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper
from onnx.external_data_helper import load_external_data_for_tensor, uses_external_data

from compiler.blockquant import GPTQFactor, Quantized, gptq_factor, pack, quantize_weight, unpack
from compiler.graphs import NORM_MEAN
from compiler.recipe import Quantization, QuantSpec
from compiler.smoothing import smooth

KINDS = {"embed": "embedding", "attention": "attention", "ffn": "ffn", "head": "lm_head"}
QUANTIZABLE = {"MatMul", "Gather"}


def node_kind(node: onnx.NodeProto) -> str | None:
    """The quantization kind of a weight-bearing node, or None for nodes quantization leaves alone."""
    if node.op_type not in QUANTIZABLE or node.input[-1].endswith(NORM_MEAN):  # an RMSNorm's mean, not a projection
        return None
    return KINDS.get(node.name.split("/")[1].split(".")[0])


def describe(spec: QuantSpec) -> str:
    if spec.scheme in ("int4", "int8"):
        rtn = "" if spec.gptq else " rtn"  # GPTQ is the default; embeddings are always rounded (RTN)
        return f"{spec.scheme} block {spec.block_size} {'sym' if spec.symmetric else 'asym'} acc{spec.accuracy_level}{rtn}"
    if spec.scheme == "int8-qdq":
        weights = "" if spec.per_channel else ", per-tensor weights"
        return f"int8-qdq {spec.activations} activations{weights}, {spec.calibration}, smoothing {spec.smoothing}"
    return spec.scheme


def graph_quantization(model: onnx.ModelProto, quantization: Quantization) -> dict[str, str]:
    """Kind -> scheme description for the kinds present in this graph (what the manifest records)."""
    weights = {i.name for i in model.graph.initializer}
    kinds = {node_kind(n) for n in model.graph.node if any(i in weights for i in n.input)} - {None}
    return {kind: describe(getattr(quantization, kind)) for kind in sorted(kinds)}


def _by_scheme(model: onnx.ModelProto, quantization: Quantization) -> dict[tuple, list[str]]:
    """(scheme, spec) -> the names of the weight-bearing nodes it applies to (fp32 kinds left out)."""
    weights = {i.name for i in model.graph.initializer}
    by_scheme: dict[tuple, list[str]] = {}
    for node in model.graph.node:
        kind = node_kind(node)
        if kind and any(i in weights for i in node.input):
            spec = getattr(quantization, kind)
            if spec.scheme != "fp32":
                by_scheme.setdefault((spec.scheme, spec), []).append(node.name)
    return by_scheme


def gptq_inputs(model: onnx.ModelProto, quantization: Quantization) -> set[str]:
    """The values whose Gram matrices GPTQ needs: the inputs of the MatMuls it rounds."""
    gptq = {n for (scheme, spec), nodes in _by_scheme(model, quantization).items()
            if scheme in ("int4", "int8") and spec.gptq for n in nodes}
    return {n.input[0] for n in model.graph.node if n.name in gptq and n.op_type == "MatMul"}


def quantize(
    model: onnx.ModelProto, quantization: Quantization, calibration: list[dict[str, np.ndarray]] | None,
    hessians: dict[str, np.ndarray], weights_dir: Path | None = None,
) -> onnx.ModelProto:
    """Return the graph with each kind's nodes in its scheme (fp32 kinds untouched).

    hessians: GPTQ's statistics, gptq_inputs -> mean Gram matrix over the calibration tokens (from the build's
    calibration pass; empty: round without GPTQ). One K x K matrix per distinct input of the block is held while
    quantizing: its Hessian, then GPTQ's factor in the same memory.
    weights_dir: the model was loaded without its external data, which is there: the weights quantized weight-only
    are read from it one at a time as they are quantized, the rest loaded here."""
    by_scheme = _by_scheme(model, quantization)
    if weights_dir is not None:
        streamed = {_weight_name(n) for (scheme, _), nodes in by_scheme.items() if scheme in ("int4", "int8")
                    for n in model.graph.node if n.name in set(nodes)}
        for tensor in model.graph.initializer:
            if uses_external_data(tensor) and tensor.name not in streamed:
                load_external_data_for_tensor(tensor, str(weights_dir))
                tensor.data_location = TensorProto.DEFAULT
                del tensor.external_data[:]
    factors = {name: gptq_factor(hessian) for name, hessian in hessians.items()}
    for (scheme, spec), nodes in by_scheme.items():
        if scheme in ("int4", "int8"):
            model = _weight_only(model, spec, nodes, factors, weights_dir)
    for (scheme, spec), nodes in by_scheme.items():
        if scheme == "int8-qdq":
            model = _static_qdq(model, spec, nodes, calibration or [])
    fp16 = [n for (scheme, _), nodes in by_scheme.items() if scheme == "fp16" for n in nodes]
    if fp16:
        model = _fp16(model, fp16)
    return model


def _weight_only(
    model: onnx.ModelProto, spec: QuantSpec, nodes: list[str], factors: dict[str, GPTQFactor], weights_dir: Path | None,
) -> onnx.ModelProto:
    """MatMuls -> MatMulNBits, the embedding's Gather -> GatherBlockQuantized, by compiler.blockquant (clipping
    search; GPTQ where `factors` has the MatMul's input). One weight in float32 is held at a time."""
    initializers = {i.name: i for i in model.graph.initializer}
    bits = 4 if spec.scheme == "int4" else 8
    for node in [n for n in model.graph.node if n.name in set(nodes)]:
        gather = node.op_type == "Gather"
        base = _weight_name(node)
        weight = initializers.pop(base)
        w = _array(weight, weights_dir)
        model.graph.initializer.remove(weight)  # before quantizing: a 7B's lm_head is 2.2 GB in each form
        del weight
        # a Gather's table is [vocab, hidden]: its rows are quantized as a MatMul's output columns are
        w = w.T if gather else w
        (k, n), q = w.shape, quantize_weight(w, bits, spec.block_size, spec.symmetric, None if gather else factors.get(node.input[0]))
        del w
        if gather:
            node.CopyFrom(_gather_block_quantized(node, q, k, n, model.graph))
            continue
        extra = [numpy_helper.from_array(q.packed, f"{base}.q"), numpy_helper.from_array(q.scales, f"{base}.scales")]
        if q.zero_points is not None:
            extra.append(numpy_helper.from_array(q.zero_points, f"{base}.zero_points"))
        model.graph.initializer.extend(extra)
        replacement = helper.make_node(
            "MatMulNBits", [node.input[0], *(t.name for t in extra)], list(node.output), name=node.name,
            domain="com.microsoft", K=k, N=n, bits=q.bits, block_size=q.block_size,
            accuracy_level=spec.accuracy_level,
        )
        node.CopyFrom(replacement)
    return model


def _weight_name(node: onnx.NodeProto) -> str:
    return node.input[0] if node.op_type == "Gather" else node.input[1]


def _gather_block_quantized(node: onnx.NodeProto, q: Quantized, hidden: int, vocab: int, graph: onnx.GraphProto) -> onnx.NodeProto:
    """The Gather of a [vocab, hidden] table quantized along hidden (q, 4 bits, as blockquant packs a MatMul's
    [N = vocab] columns) as GatherBlockQuantized: the table and zero points as int4 tensors (packed two to a byte
    in order, as ONNX lays out int4), signed without zero points when symmetric."""
    base = node.input[0]
    data = q.packed.reshape(vocab, -1)[:, : hidden // 2]  # each row's last block may be padded
    qtype = TensorProto.INT4 if q.zero_points is None else TensorProto.UINT4
    if q.zero_points is None:
        data = data ^ 0x88  # unsigned levels with zero point 8 -> two's-complement nibbles, the same values
    tensors = [helper.make_tensor(f"{base}.q", qtype, [vocab, hidden], np.ascontiguousarray(data).tobytes(), raw=True),
               numpy_helper.from_array(q.scales, f"{base}.scales")]
    if q.zero_points is not None:
        blocks = q.scales.shape[1]
        levels = unpack(q.zero_points, 4)[:, :blocks].reshape(-1)  # packed again without each row's padding nibble
        tensors.append(helper.make_tensor(f"{base}.zero_points", qtype, [vocab, blocks], pack(np.pad(levels, (0, levels.size % 2)), 4).tobytes(), raw=True))
    graph.initializer.extend(tensors)
    axis = next((a.i for a in node.attribute if a.name == "axis"), 0)
    return helper.make_node(
        "GatherBlockQuantized", [tensors[0].name, node.input[1], *(t.name for t in tensors[1:])], list(node.output), name=node.name,
        domain="com.microsoft", gather_axis=axis, quantize_axis=1, block_size=q.block_size,
    )


def _array(tensor: onnx.TensorProto, weights_dir: Path | None) -> np.ndarray:
    """An initializer's values; one in external data read straight from its file (one copy, not the protobuf's too)."""
    if not uses_external_data(tensor):
        return numpy_helper.to_array(tensor)
    info = {entry.key: entry.value for entry in tensor.external_data}
    dtype = np.dtype(helper.tensor_dtype_to_np_dtype(tensor.data_type)).newbyteorder("<")
    values = np.fromfile(Path(weights_dir or "") / info["location"], dtype, int(np.prod(tensor.dims)), offset=int(info.get("offset", 0)))
    return values.astype(dtype.newbyteorder("="), copy=False).reshape(tensor.dims)


def _static_qdq(model: onnx.ModelProto, spec: QuantSpec, nodes: list[str], samples: list[dict[str, np.ndarray]]) -> onnx.ModelProto:
    """QuantizeLinear/DequantizeLinear around the MatMuls: int8 weights (per channel or per tensor), uint8 or uint16
    activations calibrated on samples."""
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    if not samples:
        raise ValueError("int8-qdq needs calibration samples")
    if spec.smoothing:
        model = smooth(model, set(nodes), samples, spec.smoothing)

    class Reader(CalibrationDataReader):
        def __init__(self, items: Iterable[dict[str, np.ndarray]]) -> None:
            self._it = iter(items)

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self._it, None)

    method = {"minmax": CalibrationMethod.MinMax, "percentile": CalibrationMethod.Percentile, "entropy": CalibrationMethod.Entropy}
    with tempfile.TemporaryDirectory() as tmp:
        raw, pre, out = (Path(tmp) / f"{n}.onnx" for n in ("raw", "pre", "out"))
        onnx.save_model(model, raw, save_as_external_data=True, location="raw.onnx.data")
        # ONNX's type inference does not know ORT's contrib ops: without symbolic shape inference first,
        # quantize_static cannot type the activations and quantizes weights only. A graph of standard ops (the
        # static dialect) has ONNX's, which also follows the shapes that symbolic inference loses through a Slice.
        standard = all(onnx.defs.has(node.op_type, node.domain) for node in model.graph.node)
        quant_pre_process(str(raw), str(pre), skip_optimization=True, skip_symbolic_shape=standard, save_as_external_data=True,
                          all_tensors_to_one_file=True, external_data_location="pre.onnx.data")
        quantize_static(
            str(pre), str(out), Reader(samples),
            quant_format=QuantFormat.QDQ, per_channel=spec.per_channel, weight_type=QuantType.QInt8,
            activation_type=QuantType.QUInt8 if spec.activations == "uint8" else QuantType.QUInt16, nodes_to_quantize=nodes, op_types_to_quantize=["MatMul"],
            calibrate_method=method[spec.calibration], use_external_data_format=True,
        )
        return onnx.load(out)


def _fp16(model: onnx.ModelProto, nodes: list[str]) -> onnx.ModelProto:
    """Half-precision weights and compute for `nodes`; everything else (the KV cache included) stays fp32."""
    import os
    import sys

    import onnxruntime.transformers

    sys.path.append(os.path.dirname(onnxruntime.transformers.__file__))  # onnx_model imports its siblings top-level
    from onnxruntime.transformers.onnx_model import OnnxModel

    wrapped = OnnxModel(model)
    keep = [n.name for n in model.graph.node if n.name not in set(nodes)]
    # OnnxModel (unlike the plain converter) inserts the Casts at the boundary of the blocked nodes correctly
    wrapped.convert_float_to_float16(keep_io_types=True, node_block_list=keep, op_block_list=[])
    return wrapped.model
