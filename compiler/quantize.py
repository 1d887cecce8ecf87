"""quantize: a built fp32 graph's weights as the recipe says, per block kind, with ONNX Runtime's own tools.

Nodes are selected by the block that made them (node names start with `/<block>/`, see graphs.GraphBuilder):
MatMuls of attention and FFN blocks, the lm_head MatMul of the head block, the embedding's Gather.
"""
from __future__ import annotations

import logging
import tempfile
from pathlib import Path
from typing import Iterable

import numpy as np
import onnx
from onnx import helper, numpy_helper

from compiler.blockquant import GPTQFactor, gptq_factor, quantize_weight
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
    weights_dir: the model was loaded without its external data, which is there (loaded here)."""
    by_scheme = _by_scheme(model, quantization)
    if weights_dir is not None:
        onnx.load_external_data_for_model(model, str(weights_dir))
    factors = {name: gptq_factor(hessian) for name, hessian in hessians.items()}
    for (scheme, spec), nodes in by_scheme.items():
        if scheme in ("int4", "int8"):
            model = _weight_only(model, spec, nodes, factors)
    for (scheme, spec), nodes in by_scheme.items():
        if scheme == "int8-qdq":
            model = _static_qdq(model, spec, nodes, calibration or [])
    fp16 = [n for (scheme, _), nodes in by_scheme.items() if scheme == "fp16" for n in nodes]
    if fp16:
        model = _fp16(model, fp16)
    return model


def _weight_only(model: onnx.ModelProto, spec: QuantSpec, nodes: list[str], factors: dict[str, GPTQFactor]) -> onnx.ModelProto:
    """MatMuls -> MatMulNBits (compiler.blockquant: clipping search, and GPTQ where `factors` has the input);
    the embedding Gather -> GatherBlockQuantized via ORT's MatMulNBitsQuantizer (RTN)."""
    matmuls = [n for n in model.graph.node if n.name in set(nodes) and n.op_type == "MatMul"]
    initializers = {i.name: i for i in model.graph.initializer}
    for node in matmuls:
        weight = initializers.pop(node.input[1])
        w = numpy_helper.to_array(weight)
        model.graph.initializer.remove(weight)  # before quantizing: a 7B's lm_head is 2.2 GB in each form
        del weight
        q = quantize_weight(w, 4 if spec.scheme == "int4" else 8, spec.block_size, spec.symmetric, factors.get(node.input[0]))
        base = node.input[1]
        extra = [numpy_helper.from_array(q.packed, f"{base}.q"), numpy_helper.from_array(q.scales, f"{base}.scales")]
        if q.zero_points is not None:
            extra.append(numpy_helper.from_array(q.zero_points, f"{base}.zero_points"))
        model.graph.initializer.extend(extra)
        replacement = helper.make_node(
            "MatMulNBits", [node.input[0], *(t.name for t in extra)], list(node.output), name=node.name,
            domain="com.microsoft", K=w.shape[0], N=w.shape[1], bits=q.bits, block_size=q.block_size,
            accuracy_level=spec.accuracy_level,
        )
        node.CopyFrom(replacement)
    gathers = [n.name for n in model.graph.node if n.name in set(nodes) and n.op_type == "Gather"]
    if gathers:
        from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

        logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer").setLevel(logging.WARNING)
        quantizer = MatMulNBitsQuantizer(
            model, bits=4, block_size=spec.block_size, is_symmetric=spec.symmetric, accuracy_level=spec.accuracy_level,
            nodes_to_include=gathers,
            # the quantizer ORs nodes_to_include with op_types_to_quantize: name no op type so only `gathers` change
            op_types_to_quantize=("NoSuchOp",), quant_axes=(("Gather", 1),),
        )
        quantizer.process()
        model = quantizer.model.model
    return model


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
