"""The static dialect's fixed-shape forms: a finished graph, built with a symbolic sequence length, written once per
phase with every shape fixed (a decode step of 1 token, a prefill chunk of N), and kept as built for the CPU EP,
which takes any shape: one session there serves both phases. All three name the one weights file."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper, shape_inference

from compiler.graphs import attended
from runtime.errors import TandemError
from runtime.manifest import DYNAMIC_SUFFIX, PREFILL_SUFFIX

def fixed(model: onnx.ModelProto, sequence: int, capacity: int) -> onnx.ModelProto:
    """A copy with the sequence fixed (the attention bias spans capacity + sequence positions), every value's shape
    inferred, and each Reshape's target written out in full: no -1 or 0 left for an NPU compiler to resolve."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    sizes = {"sequence": sequence, attended(capacity): capacity + sequence}
    for value in [*out.graph.input, *out.graph.output]:
        for dim in value.type.tensor_type.shape.dim:
            if dim.dim_param:
                if dim.dim_param not in sizes:
                    raise TandemError(f"graph {out.graph.name}: input or output {value.name} has dimension "
                                      f"{dim.dim_param!r}, which the static dialect does not fix")
                dim.dim_value = sizes[dim.dim_param]
    del out.graph.value_info[:]
    out = shape_inference.infer_shapes(out, data_prop=True)
    shapes = {v.name: [d.dim_value if d.HasField("dim_value") else None for d in v.type.tensor_type.shape.dim]
              for v in out.graph.value_info}
    for node in out.graph.node:
        target = shapes.get(node.output[0])
        if node.op_type == "Reshape" and target and all(target):
            name = f"{node.name}/shape"
            out.graph.initializer.append(numpy_helper.from_array(np.array(target, dtype=np.int64), name))
            node.input[1] = name
    used = {i for node in out.graph.node for i in node.input}
    kept = [t for t in out.graph.initializer if t.name in used]
    del out.graph.initializer[:]
    out.graph.initializer.extend(kept)
    return out


def write_forms(file: Path, chunk: int, capacity: int) -> tuple[onnx.ModelProto, onnx.ModelProto]:
    """Rewrite `file` as the decode form and write the prefill form (name.prefill.onnx) and the graph as built
    (name.dynamic.onnx) beside it; all keep naming the weights file `file` was saved with. Returns (decode,
    prefill), their weights not loaded."""
    model = onnx.load(file, load_external_data=False)
    decode, prefill = fixed(model, 1, capacity), fixed(model, chunk, capacity)
    onnx.save_model(model, dynamic_path(file))
    onnx.save_model(prefill, prefill_path(file))
    onnx.save_model(decode, file)
    return decode, prefill


def prefill_path(file: Path) -> Path:
    return file.with_name(file.name.removesuffix(".onnx") + PREFILL_SUFFIX)


def dynamic_path(file: Path) -> Path:
    return file.with_name(file.name.removesuffix(".onnx") + DYNAMIC_SUFFIX)
