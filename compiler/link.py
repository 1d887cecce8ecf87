"""link: consecutive finished graphs of one role joined into one graph, their weights left in their own files.

Graphs are built, calibrated and quantized one block at a time (memory: one block), then each run of blocks the
plan fuses is linked: one block's hidden_next feeds the next one's hidden, the step inputs they share (KV cache,
RoPE tables, sequence lengths) are read once, and every initializer keeps pointing into the data file its block
was saved with. One session call per linked graph instead of one per block is what the alternating layout costs.
"""
from __future__ import annotations

from collections import Counter
from pathlib import Path

import onnx
from onnx import helper

from compiler.fusions import fuse_skip_norms
from runtime import manifest as names
from runtime.errors import TandemError


def link(files: list[Path], out: Path, remove: bool = True) -> onnx.ModelProto:
    """Write the graphs of `files` (in run order, all in out's folder) as one graph at `out`; with `remove`, remove
    the parts' graph files (not their data). Returns the linked model, its weights not loaded."""
    parts = [onnx.load(f, load_external_data=False) for f in files]
    graph = helper.make_graph([], out.stem, [], [])
    seen_inputs: set[str] = set()
    for i, part in enumerate(parts):
        rename = {}
        if i > 0:
            rename[names.HIDDEN] = f"/link/{i - 1}/hidden"
        if i < len(parts) - 1:
            rename[names.HIDDEN_NEXT] = f"/link/{i}/hidden"
        g = part.graph
        for node in g.node:
            node.input[:] = [rename.get(x, x) for x in node.input]
            node.output[:] = [rename.get(x, x) for x in node.output]
        for value in g.value_info:
            value.name = rename.get(value.name, value.name)
        graph.input.extend(v for v in g.input if v.name not in rename and v.name not in seen_inputs)
        seen_inputs.update(v.name for v in g.input)
        graph.output.extend(v for v in g.output if v.name not in rename)
        graph.node.extend(g.node)
        graph.initializer.extend(g.initializer)  # external: location, offset and length into the part's data file
        graph.value_info.extend(g.value_info)
    for kind, values in (("value", [o for n in graph.node for o in n.output if o]), ("weight", [i.name for i in graph.initializer])):
        if twice := sorted(v for v, n in Counter(values).items() if n > 1):
            raise TandemError(f"cannot link {', '.join(f.name for f in files)}: {kind} names made twice: {', '.join(twice[:5])}")
    fuse_skip_norms(graph)
    opsets: dict[str, int] = {}
    for part in parts:
        for opset in part.opset_import:
            opsets[opset.domain] = max(opsets.get(opset.domain, 0), opset.version)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid(d, v) for d, v in opsets.items()],
                              producer_name=parts[0].producer_name)
    model.ir_version = max(p.ir_version for p in parts)
    onnx.save_model(model, out)
    for file in files:
        if remove and file != out:
            file.unlink()
    return model
