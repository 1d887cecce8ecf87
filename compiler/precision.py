"""precision: a finished float32 graph carried over to float16 activations, for GPU execution providers.

CUDA runs GroupQueryAttention in half precision only, and half activations halve the KV cache and the bytes
every step moves. The graph is built, calibrated and quantized in float32 (the CPU EP runs those passes), then
every float tensor becomes float16 here: weights left unquantized, MatMulNBits scales, graph inputs and outputs
(hidden states, KV cache, RoPE tables). Logits stay float32 behind one Cast, so sampling is unchanged.
"""
from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from runtime import manifest as names

FLOAT, HALF = TensorProto.FLOAT, TensorProto.FLOAT16


def to_float16(model: onnx.ModelProto) -> onnx.ModelProto:
    """The same graph in float16, changed in place (initializers are rewritten one at a time: a 7B's fp32
    embedding is 2.2 GB)."""
    graph = model.graph
    for tensor in graph.initializer:
        if tensor.data_type == FLOAT:
            half = numpy_helper.to_array(tensor).astype(np.float16)
            tensor.ClearField("float_data")
            tensor.data_type, tensor.raw_data = HALF, half.tobytes()
    for node in graph.node:
        for attr in node.attribute:
            if node.op_type == "Cast" and attr.name == "to" and attr.i == FLOAT:
                attr.i = HALF
            elif attr.type == onnx.AttributeProto.TENSOR and attr.t.data_type == FLOAT:
                attr.t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(attr.t).astype(np.float16), attr.t.name))
    for value in [*graph.input, *graph.output, *graph.value_info]:
        if value.type.tensor_type.elem_type == FLOAT:
            value.type.tensor_type.elem_type = HALF
    for output in graph.output:
        if output.name == names.LOGITS:
            _cast_output(graph, output)
    return model


def _cast_output(graph: onnx.GraphProto, output: onnx.ValueInfoProto) -> None:
    """Produce the output in float32 from its float16 value through a Cast."""
    half = f"{output.name}_float16"
    for node in graph.node:
        node.output[:] = [half if o == output.name else o for o in node.output]
    graph.node.append(helper.make_node("Cast", [half], [output.name], name=f"/{output.name}/Cast", to=FLOAT))
    output.type.tensor_type.elem_type = FLOAT
