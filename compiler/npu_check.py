"""The static checker: a static-dialect graph against the rules every NPU compiler imposes (standard ops, every shape
fixed) and those of each NPU in its role's chain (npu_targets.yaml: op sets, ranks, quantized types, and the
documents they are written down in). The compile fails naming the offending nodes."""
from __future__ import annotations

from dataclasses import dataclass
from functools import cache
from pathlib import Path

import onnx
from onnx import numpy_helper, shape_inference

from runtime.errors import TandemError
from runtime.manifest import ProviderSpec
from runtime.yamlfile import load_mapping

RULES = Path(__file__).with_name("npu_targets.yaml")


@dataclass(frozen=True)
class Target:
    name: str
    sources: tuple[str, ...]
    ops: dict[str, frozenset[str]]  # precision -> op types (one set where the source gives one list)
    precision: dict[str, str]  # the graph's activation QDQ type (or "float") -> the precision whose op set applies
    max_rank: int | None  # None: not published, not checked
    activation_types: frozenset[str]
    weight_types: frozenset[str]
    per_channel_matmul: bool
    reshape_zero: bool  # a Reshape target may contain 0 (copy the input's dimension)


@cache
def _targets() -> dict[str, Target]:
    data = load_mapping(RULES)
    return {
        name: Target(
            name=name, sources=tuple(t["sources"]), ops={p: frozenset(ops) for p, ops in t["ops"].items()},
            precision=t["precision"], max_rank=t["max_rank"], activation_types=frozenset(t["activation_types"]),
            weight_types=frozenset(t["weight_types"]), per_channel_matmul=t["per_channel_matmul"],
            reshape_zero=t["reshape_zero"],
        )
        for name, t in data.items()
    }


def targets(chain: list[ProviderSpec]) -> list[Target]:
    """The NPUs a role's chain names: VitisAI, QNN (its HTP backend, the default), OpenVINO with device_type NPU."""
    found = []
    for spec in chain:
        device = str(spec.options.get("device_type", "CPU"))
        backend = str(spec.options.get("backend_type", "htp"))
        key = {"VitisAI": "VitisAI", "QNN": "QNN HTP" if backend == "htp" else None,
               "OpenVINO": "OpenVINO NPU" if "NPU" in device else None}.get(spec.name)
        if key and _targets()[key] not in found:
            found.append(_targets()[key])
    return found


def check(model: onnx.ModelProto, chain: list[ProviderSpec]) -> None:
    """Raise naming each rule a static graph breaks; `model` is a fixed-shape form (static_forms.fixed)."""
    problems = violations(model, targets(chain))
    if problems:
        shown = problems[:12] + ([f"... and {len(problems) - 12} more"] if len(problems) > 12 else [])
        raise TandemError(f"graph {model.graph.name} breaks the static dialect's rules (compiler/npu_targets.yaml):\n  "
                          + "\n  ".join(shown))


def violations(model: onnx.ModelProto, npus: list[Target]) -> list[str]:
    inferred = shape_inference.infer_shapes(model, data_prop=True)
    graph = inferred.graph
    values = {v.name: v for v in [*graph.input, *graph.output, *graph.value_info]}
    weights = {t.name: t for t in graph.initializer}
    problems = []
    for node in graph.node:
        where = f"node {node.name} ({node.op_type})"
        if not onnx.defs.has(node.op_type, node.domain):  # ORT registers some contrib ops in the ONNX domain
            problems.append(f"{where}: not a standard ONNX op{f' (domain {node.domain})' if node.domain else ''}")
        for name in node.output:
            shape = _shape(values.get(name))
            if shape is None or not all(isinstance(d, int) and d > 0 for d in shape):
                problems.append(f"{where}: output {name} has no fixed shape ({shape or 'unknown'})")
    precision = _activation_type(graph)
    for npu in npus:
        ops = npu.ops[npu.precision[precision]] if npu.precision else next(iter(npu.ops.values()))
        label = f"{npu.name}" + (f" ({npu.precision[precision]})" if npu.precision else "")
        for node in graph.node:
            where = f"node {node.name} ({node.op_type})"
            if node.op_type not in ops:
                problems.append(f"{label}: {where}: not in its op set ({npu.sources[0]})")
            for name in node.output:
                shape = _shape(values.get(name))
                if shape and npu.max_rank and len(shape) > npu.max_rank:
                    problems.append(f"{label}: {where}: output {name} has rank {len(shape)}, over {npu.max_rank}")
            target = weights.get(node.input[1]) if node.op_type == "Reshape" else None
            if target is not None and not npu.reshape_zero and 0 in numpy_helper.to_array(target).tolist():
                problems.append(f"{label}: {where}: a 0 in its target shape")
            problems += [f"{label}: {where}: {p}" for p in _qdq_problems(node, weights, npu, graph)]
    return problems


def _qdq_problems(node: onnx.NodeProto, weights: dict, npu: Target, graph: onnx.GraphProto) -> list[str]:
    """Quantized types: a QuantizeLinear's (activations) and a weight's DequantizeLinear's, per-channel MatMul weights."""
    if node.op_type not in ("QuantizeLinear", "DequantizeLinear") or len(node.input) < 3 or node.input[2] not in weights:
        return []
    kind = onnx.helper.tensor_dtype_to_np_dtype(weights[node.input[2]].data_type).name
    problems = []
    if node.op_type == "QuantizeLinear" and kind not in npu.activation_types:
        problems.append(f"{kind} activations (it takes {', '.join(sorted(npu.activation_types))})")
    if node.op_type == "DequantizeLinear" and node.input[0] in weights:
        if kind not in npu.weight_types:
            problems.append(f"{kind} weights (it takes {', '.join(sorted(npu.weight_types))})")
        per_channel = len(weights[node.input[1]].dims) > 0 and weights[node.input[1]].dims[0] > 1
        feeds_matmul = any(n.op_type == "MatMul" and node.output[0] in n.input for n in graph.node)
        if per_channel and feeds_matmul and not npu.per_channel_matmul:
            problems.append("per-channel weights into a MatMul (it takes one scale per tensor there)")
    return problems


def _activation_type(graph: onnx.GraphProto) -> str:
    """The type of the graph's quantized activations (its QuantizeLinear zero points), or float."""
    weights = {t.name: t for t in graph.initializer}
    for node in graph.node:
        if node.op_type == "QuantizeLinear" and len(node.input) > 2 and node.input[2] in weights:
            return onnx.helper.tensor_dtype_to_np_dtype(weights[node.input[2]].data_type).name
    return "float"


def _shape(value: onnx.ValueInfoProto | None) -> list[int | str] | None:
    if value is None or not value.type.tensor_type.HasField("shape"):
        return None
    return [d.dim_value if d.HasField("dim_value") else d.dim_param or "?" for d in value.type.tensor_type.shape.dim]
