"""fusions: node patterns that only appear once blocks are linked, rewritten into ORT's fused contrib ops.

Each block ends with its residual Add and the next block starts with its RMSNorm of that sum. Linked, the two
are one SkipSimplifiedLayerNormalization, which returns the normalised sum and the sum itself (for the next
residual). That is two nodes fewer per layer. Batch-1 decode pays per node: a GPU EP launches a kernel and ORT
does its own bookkeeping for each one, and the CPU EP dispatches each op.
"""
from __future__ import annotations

import onnx
from onnx import helper


def fuse_skip_norms(graph: onnx.GraphProto) -> int:
    """Add(a, b) -> SimplifiedLayerNormalization becomes SkipSimplifiedLayerNormalization(a, b), in place.

    The sum keeps its name as the fused node's fourth output, for its other readers. Only an Add of two
    activations qualifies (a residual), not one with a weight. Returns how many were fused."""
    weights = {i.name for i in graph.initializer}
    producer = {o: n for n in graph.node for o in n.output}
    fused: dict[str, onnx.NodeProto | None] = {}  # the Add's name -> the fused node; the norm's name -> None (dropped)
    for norm in graph.node:
        add = producer.get(norm.input[0]) if norm.op_type == "SimplifiedLayerNormalization" else None
        if add is None or add.op_type != "Add" or any(x in weights for x in add.input) or add.name in fused:
            continue
        epsilon = next((a.f for a in norm.attribute if a.name == "epsilon"), 1e-5)
        fused[add.name] = helper.make_node(
            "SkipSimplifiedLayerNormalization", [add.input[0], add.input[1], norm.input[1]],
            [norm.output[0], "", "", add.output[0]], name=f"{norm.name}/skip", domain="com.microsoft", epsilon=epsilon,
        )
        fused[norm.name] = None  # dropped: the fused node stands where the Add was
    nodes = [fused.get(n.name, n) for n in graph.node]
    del graph.node[:]
    graph.node.extend(n for n in nodes if n is not None)
    return sum(1 for n in fused.values() if n is not None)
