"""A copy of an int8-prefill artifact with its prefill form changed, for a side-by-side `tandem bench` (--peer
tandem:COPY): `unsmoothed` writes the form again from the artifact's own int4 graph without the channels' smoothing
(compiler.int8_prefill as before it took GPTQ's statistics); `int4` drops the forms, so prompt chunks run the int4
decode graph as in a recipe without prefill_weights.

    python docs/probes/form_variants.py ARTIFACT COPY unsmoothed|int4
"""
from __future__ import annotations

import shutil
import sys
from pathlib import Path

import onnx
import yaml

from compiler.int8_prefill import rewrite
from runtime.manifest import MANIFEST, file_entry, load_manifest

BLOCKS = ("/attention.", "/ffn.")  # node names start with their block's (compiler.graphs.GraphBuilder.scope)


def main(source: Path, copy: Path, variant: str) -> None:
    manifest = load_manifest(source)
    shutil.copytree(source, copy)  # copies: onnx refuses external data with several hard links
    graphs = []
    for graph in manifest.graphs:
        if graph.prefill is not None and variant == "int4":
            graph = graph.model_copy(update={"prefill": None})
        elif graph.prefill is not None:
            model = onnx.load(copy / graph.file, load_external_data=False)
            kept = [n for n in model.graph.node if n.op_type == "MatMulNBits" and not n.name.startswith(BLOCKS)]
            for node in kept:  # the head's lm_head keeps its int4 kernel, as the build's forms do
                node.op_type = "Kept"
            rewrite(model, (copy / graph.file).parent, f"/{graph.name}/int8_prefill")
            for node in model.graph.node:  # rewrite made new node messages
                if node.op_type == "Kept":
                    node.op_type = "MatMulNBits"
            out = copy / graph.prefill.file
            for old in (out, out.with_name(out.name + ".data")):
                old.unlink(missing_ok=True)  # a linked form reads its blocks' data files
            onnx.save_model(model, out, save_as_external_data=True, location=f"{out.name}.data", size_threshold=1024)
        graphs.append(graph)
    files = [file_entry(copy, copy / f.path) for f in manifest.files if (copy / f.path).exists()]
    updated = manifest.model_copy(update={"graphs": graphs, "files": files})
    (copy / MANIFEST).write_text(yaml.safe_dump(updated.model_dump(mode="json"), sort_keys=False, width=120,
                                                default_flow_style=None))
    load_manifest(copy)  # every file as listed


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3])
