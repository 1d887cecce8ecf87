"""compile: recipe -> plan -> graphs -> artifact files -> manifest -> verify, written atomically."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import onnx
import yaml

from compiler.graphs import build_graph, rope_tables
from compiler.progress import progress
from compiler.plan import plan
from compiler.recipe import Recipe, load_recipe
from compiler.source import ModelSource, open_source
from runtime import manifest as names
from runtime.errors import TandemError
from runtime.manifest import FORMAT_VERSION, GraphSpec, KVCacheSpec, Manifest, TensorSpec, file_entry


def compile_recipe(recipe_path: Path | str, model: str | None = None, out: Path | str | None = None, show_progress: bool = True) -> Path:
    """Compile a recipe into an artifact directory; nothing appears at `out` unless every step, verify included, passed."""
    from compiler.verify import verify_artifact

    recipe = load_recipe(recipe_path)
    source = open_source(model or recipe.model)
    out = Path(out or Path("artifacts") / recipe.name)
    work = out.parent / f".{out.name}.partial-{os.getpid()}"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    try:
        write_artifact(work, recipe, source, show_progress)
        report = verify_artifact(work, source, show_progress=show_progress)
        (work / names.VERIFY_REPORT).write_text(json.dumps(report, indent=2) + "\n")
        if report["failures"]:
            raise TandemError("verify failed, artifact not written:\n  " + "\n  ".join(report["failures"]))
        _replace(work, out)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return out


def _replace(work: Path, out: Path) -> None:
    old = out.parent / f".{out.name}.old-{os.getpid()}"
    if out.exists():
        os.replace(out, old)
    os.replace(work, out)
    shutil.rmtree(old, ignore_errors=True)


def tensor_specs(values) -> dict[str, TensorSpec]:
    """Name -> dtype and shape of a graph's inputs or outputs, as the manifest records them."""
    return {
        v.name: TensorSpec(
            dtype=onnx.helper.tensor_dtype_to_np_dtype(v.type.tensor_type.elem_type).name,
            shape=[d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim],
        )
        for v in values
    }


def write_artifact(root: Path, recipe: Recipe, source: ModelSource, show_progress: bool = True) -> Manifest:
    cfg = source.config
    if recipe.max_context > cfg.max_position_embeddings:
        raise TandemError(f"max_context {recipe.max_context} exceeds the model's {cfg.max_position_embeddings} positions")
    graphs_dir = root / "graphs"
    graphs_dir.mkdir()
    planned = plan(recipe, cfg.num_layers)
    specs = []
    for graph in progress(planned, show_progress, "building graphs"):
        model = build_graph(graph, source.tensor, cfg)
        file = graphs_dir / f"{graph.name}.onnx"
        onnx.save_model(model, file, save_as_external_data=True, all_tensors_to_one_file=True,
                        location=f"{graph.name}.onnx.data", size_threshold=1024)
        specs.append(GraphSpec(
            name=graph.name,
            file=file.relative_to(root).as_posix(),
            role=graph.role,
            blocks=[b.name for b in graph.blocks],
            inputs=tensor_specs(model.graph.input),
            outputs=tensor_specs(model.graph.output),
        ))
        del model
    source.save_tokenizer(root)
    np.save(root / names.ROPE_FILE, rope_tables(source.hf_config, recipe.max_context))
    generation = {**source.generation_config, **recipe.generation.model_dump(exclude_none=True)}
    (root / names.GENERATION_CONFIG).write_text(json.dumps(generation, indent=2) + "\n")
    files = sorted(p for p in root.rglob("*") if p.is_file())
    manifest = Manifest(
        format_version=FORMAT_VERSION,
        name=recipe.name,
        recipe=recipe.model_dump(mode="json"),
        source=source.spec,
        model=cfg,
        kv_cache=KVCacheSpec(layers=cfg.num_layers, kv_heads=cfg.num_kv_heads, head_dim=cfg.head_dim, capacity=recipe.max_context),
        prefill_chunk=recipe.prefill_chunk,
        roles={role: recipe.roles[role] for role in sorted({g.role for g in specs})},
        graphs=specs,
        schedule=[g.name for g in specs],
        files=[file_entry(root, p) for p in files],
    )
    (root / names.MANIFEST).write_text(yaml.safe_dump(manifest.model_dump(mode="json"), sort_keys=False, width=120, default_flow_style=None))
    return manifest
