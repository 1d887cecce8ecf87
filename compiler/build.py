"""compile: recipe -> plan -> graphs -> artifact files -> manifest -> verify, written atomically."""
from __future__ import annotations

import json
import logging
import multiprocessing
import os
import shutil
from concurrent.futures import FIRST_COMPLETED, Executor, Future, ProcessPoolExecutor, wait
from functools import cache
from pathlib import Path

import numpy as np
import onnx
import yaml
from pydantic import ValidationError

from compiler.build_state import STATE, BlockResult, BuildState, resumable
from compiler.calibrate import feeds, first_samples, propagate
from compiler.graphs import build_graph, rope_tables
from compiler.int8_prefill import KINDS as INT8_KINDS
from compiler.int8_prefill import write_form as write_int8_form
from compiler.link import link
from compiler.npu_check import check
from compiler.plan import GraphPlan, plan
from compiler.precision import to_float16
from compiler.progress import progress
from compiler.quantize import gptq_inputs, graph_quantization, quantize
from compiler.recipe import Quantization, Recipe, load_recipe
from compiler.source import ModelSource, open_source
from compiler.static_forms import dynamic_path, prefill_path, write_forms
from runtime import manifest as names
from runtime.errors import TandemError
from runtime.manifest import (
    FORMAT_VERSION,
    GraphSpec,
    KVCacheSpec,
    Manifest,
    TensorSpec,
    file_entry,
    format_validation_error,
)
from runtime.tokenizer import Tokenizer

log = logging.getLogger("tandem")


def compile_recipe(
    recipe_path: Path | str, model: str | None = None, out: Path | str | None = None, show_progress: bool = True,
    max_context: int | None = None, jobs: int = 1, resume: bool = False, fuse: bool | None = None,
    gate: bool = True,
) -> Path:
    """Compile a recipe into an artifact directory; nothing appears at `out` unless every step, verify included, passed.

    gate=False: a verify check that fails is reported (in verify.json and the log) but the artifact is written, e.g.
    for a random-weight stand-in, whose errors the recipe's gates (set for real weights) do not describe.

    max_context overrides the recipe's (the KV cache capacity), e.g. for a long-context build of the same recipe;
    fuse overrides its layout (one linked graph, or a graph per block alternating between roles).
    jobs: graphs quantized at once, each in its own process (memory grows with it: one graph's worth each).
    resume: go on from the blocks an interrupted build of `out` (same recipe and model) finished.
    """
    from compiler.verify import verify_artifact

    if jobs < 1:
        raise TandemError(f"--jobs {jobs}: at least 1")
    recipe = load_recipe(recipe_path)
    if changes := {k: v for k, v in {"max_context": max_context, "fuse": fuse}.items() if v is not None}:
        try:
            recipe = Recipe.model_validate({**recipe.model_dump(), **changes})
        except ValidationError as e:
            flags = ", ".join(f"{k} {v}" for k, v in changes.items())
            raise TandemError(format_validation_error(f"{recipe_path} with {flags}", e)) from None
    source = open_source(model or recipe.model)
    out = Path(out or Path("artifacts") / recipe.name)
    work = out.parent / f".{out.name}.partial-{os.getpid()}"
    resumed = resume and _adopt(out, work)
    _recover(out)
    if not resumed:
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
    (work / names.UNFINISHED).write_text(f"{os.getpid()}\n")
    keep = False
    try:
        write_artifact(work, recipe, source, show_progress, jobs)
        report = verify_artifact(work, source, show_progress=show_progress)
        (work / names.VERIFY_REPORT).write_text(json.dumps(report, indent=2) + "\n")
        if report["failures"]:
            failures = "\n  ".join(report["failures"])
            if gate:
                raise TandemError(f"verify failed, artifact not written:\n  {failures}")
            log.warning("verify failed; the artifact is written all the same (--verify report):\n  %s", failures)
        (work / names.UNFINISHED).unlink()
        _replace(work, out)
    except KeyboardInterrupt:
        keep = resumable(work)
        if keep:
            log.warning("interrupted: the finished blocks are kept in %s; the same command with --resume goes on from them", work)
        raise
    finally:
        if not keep:
            shutil.rmtree(work, ignore_errors=True)
    return out


def _adopt(out: Path, work: Path) -> bool:
    """Move the newest resumable build of `out` left by a dead process to `work` (this process's)."""
    left = [p for p in out.parent.glob(f".{out.name}.partial-*") if resumable(p) and _abandoned(p)]
    if not left:
        return False
    os.replace(max(left, key=lambda p: (p / STATE).stat().st_mtime), work)
    return True


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        pass
    return True


def _abandoned(partial: Path) -> bool:
    """A build's directory whose process is dead (or is this one, which is not building it now)."""
    pid = partial.name.rpartition("-")[2]
    return pid.isdigit() and (int(pid) == os.getpid() or not _alive(int(pid)))


def _recover(out: Path) -> None:
    """Clear what builds of `out` killed midway left beside it; a previous artifact moved aside comes back."""
    for kind in ("old", "partial"):  # an artifact moved aside first: it is complete, a partial one never is
        for leftover in out.parent.glob(f".{out.name}.{kind}-*"):
            pid = leftover.name.rpartition("-")[2]
            if not pid.isdigit() or _alive(int(pid)):
                continue
            if kind == "old" and not out.exists():
                os.replace(leftover, out)
            else:
                shutil.rmtree(leftover, ignore_errors=True)


def _replace(work: Path, out: Path) -> None:
    old = out.parent / f".{out.name}.old-{os.getpid()}"
    if out.exists():
        os.replace(out, old)
    os.replace(work, out)
    shutil.rmtree(old, ignore_errors=True)


def _save(model: onnx.ModelProto, file: Path) -> None:
    """Save with the weights in one external data file beside it (replacing an earlier version)."""
    data = file.with_name(file.name + ".data")
    data.unlink(missing_ok=True)  # onnx appends to an existing data file
    onnx.save_model(model, file, save_as_external_data=True, all_tensors_to_one_file=True, location=data.name, size_threshold=1024)


def _write_graph(unit: GraphPlan, source: ModelSource, file: Path, form: tuple) -> onnx.ModelProto:
    """Build a block's float32 graph into `file`, its weights written to the data file beside it as they are made
    (as _save lays them out); the model returned holds none of them."""
    with file.with_name(file.name + ".data").open("wb") as data:
        model = build_graph(unit, source.tensor, source.config, *form, data)
    onnx.save_model(model, file)
    return model


def tensor_specs(values) -> dict[str, TensorSpec]:
    """Name -> dtype and shape of a graph's inputs or outputs, as the manifest records them."""
    return {
        v.name: TensorSpec(
            dtype=onnx.helper.tensor_dtype_to_np_dtype(v.type.tensor_type.elem_type).name,
            shape=[d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim],
        )
        for v in values
    }


def finish_graph(
    file: Path, quantization: Quantization, calibration: list[dict[str, np.ndarray]] | None, dtype: str,
    hessians: Path | None = None, int8_form: bool = False,
) -> BlockResult:
    """Quantize a saved fp32 block graph and carry it to the artifact's dtype, in place. hessians: a file of
    GPTQ's statistics for it (_spill_hessians), read and removed here. int8_form: also write its integer-GEMM
    prefill form (compiler.int8_prefill), smoothed by the channels' RMS those statistics give."""
    model = onnx.load(file, load_external_data=False)
    described = graph_quantization(model, quantization)
    grams = _load_hessians(hessians)
    channels = {x: np.sqrt(np.maximum(np.diagonal(h), 0)) for x, h in grams.items()} if int8_form else {}
    if any(d != "fp32" for d in described.values()) or dtype != "float32":
        model = quantize(model, quantization, calibration, grams, file.parent)
        if dtype == "float16":
            model = to_float16(model)
        _save(model, file)
    if int8_form:
        write_int8_form(file, channels)
    return tensor_specs(model.graph.input), tensor_specs(model.graph.output), described


def _io(model: onnx.ModelProto) -> dict[str, dict[str, TensorSpec]]:
    return {"inputs": tensor_specs(model.graph.input), "outputs": tensor_specs(model.graph.output)}


def build_block(unit: GraphPlan, location: str, file: Path, quantization: Quantization, dtype: str, form: tuple,
                int8_form: bool) -> BlockResult:
    """A block no calibration ties to the others: built from the source at `location` and finished, in this process.
    form: build_graph's dialect and capacity."""
    _write_graph(unit, _open(location), file, form)
    return finish_graph(file, quantization, None, dtype, None, int8_form)


def _int8_form(recipe: Recipe, kind: str) -> bool:
    return recipe.prefill_weights == "int8" and kind in INT8_KINDS


def _spill_hessians(hessians: dict[str, np.ndarray], file: Path) -> Path | None:
    """GPTQ's statistics wait on disk beside the block until its quantization runs (a 7B FFN's are 1.4 GB, and a
    worker process would otherwise receive them pickled)."""
    if not hessians:
        return None
    path = file.with_name(f".{file.stem}.hessians.npz")
    np.savez(path, names=np.array(list(hessians)), *hessians.values())
    return path


def _load_hessians(path: Path | None) -> dict[str, np.ndarray]:
    if path is None:
        return {}
    with np.load(path) as data:
        hessians = {str(name): data[f"arr_{i}"] for i, name in enumerate(data["names"])}
    path.unlink()
    return hessians


_open = cache(open_source)  # one per worker process


def _executor(jobs: int) -> Executor:
    """Worker processes for graphs' quantization (each holds one graph); jobs 1 runs it in this process, in order."""
    if jobs > 1:
        return ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn"))
    return _Inline()


class _Inline(Executor):
    def submit(self, fn, /, *args, **kwargs) -> Future:
        return _done(fn(*args, **kwargs))


def _done(value) -> Future:
    future: Future = Future()
    future.set_result(value)
    return future


def _calibrated(
    unit: GraphPlan, file: Path, samples: list[np.ndarray], source: ModelSource, rope: np.ndarray,
    quantization: Quantization, recipe: Recipe, pool: Executor, done: dict[str, Future], form: tuple[str, int],
) -> list[np.ndarray]:
    """Build a block (form: build_graph's dialect and capacity), run the calibration text through it in float32 and
    submit its quantization; returns the samples it carries on to the next block."""
    model = _write_graph(unit, source, file, form)
    inputs, grams = tensor_specs(model.graph.input), gptq_inputs(model, quantization)
    calibration = [feeds(inputs, x, rope) for x in samples]
    # one float32 pass over the calibration text: the next block's samples and this one's GPTQ statistics
    carried, hessians = propagate(file, calibration, grams)
    hessians_file = _spill_hessians(hessians, file)
    del hessians
    # later blocks calibrate on this one's fp32 outputs, so its quantization can run beside them
    done[unit.name] = pool.submit(finish_graph, file, quantization, calibration, recipe.dtype, hessians_file,
                                  _int8_form(recipe, unit.blocks[0].kind))
    return carried if carried is not None else samples


def write_artifact(root: Path, recipe: Recipe, source: ModelSource, show_progress: bool = True, jobs: int = 1) -> Manifest:
    cfg = source.config
    if recipe.max_context > cfg.max_position_embeddings:
        raise TandemError(f"max_context {recipe.max_context} exceeds the model's {cfg.max_position_embeddings} positions")
    source.save_tokenizer(root)
    rope = rope_tables(source.hf_config, recipe.max_context)
    np.save(root / names.ROPE_FILE, rope)
    quantization = recipe.quantization
    state = BuildState(root, {"recipe": recipe.model_dump(mode="json"), "source": source.spec.model_dump()})
    samples = state.samples() or (first_samples(Tokenizer.from_dir(root), recipe.calibration)
                                  if quantization.needs_calibration() else None)
    graphs_dir = root / "graphs"
    graphs_dir.mkdir(exist_ok=True)
    graphs = plan(recipe, cfg.num_layers)
    # built, calibrated and quantized one block at a time (memory: one block), then linked as the plan fuses them
    units = [GraphPlan(graph.role, (block,)) for graph in graphs for block in graph.blocks]
    # without calibration the blocks are independent: the vocabulary-sized ones start first, not to finish last
    order = units if samples else sorted(units, key=lambda u: u.blocks[0].kind not in ("embed", "head"))
    done: dict[str, Future] = {}
    with _executor(jobs) as pool:
        for unit in progress(order, show_progress, "building graphs"):
            if unit.name in state.finished:  # by the build this one resumes
                done[unit.name] = _done(state.finished[unit.name])
                continue
            # a built block waits on disk in float32 until a worker quantizes it: at most `jobs` wait (a 7B's
            # 58 float32 blocks would take 30 GB)
            while len(running := [f for f in done.values() if not f.done()]) > jobs:
                wait(running, return_when=FIRST_COMPLETED)
            file = graphs_dir / f"{unit.name}.onnx"
            form = (recipe.roles[unit.role].dialect, recipe.max_context)
            if samples:
                samples = _calibrated(unit, file, samples, source, rope, quantization, recipe, pool, done, form)
            else:  # independent blocks: a worker builds it too
                done[unit.name] = pool.submit(build_block, unit, source.location, file, quantization, recipe.dtype, form,
                                              _int8_form(recipe, unit.blocks[0].kind))
            if all(f.done() for f in done.values()):  # always with --jobs 1; with more, when the workers catch up
                state.record({name: f.result() for name, f in done.items()}, samples)
        specs = []
        for graph in progress(graphs, show_progress, "linking graphs"):
            results = [done[b.name].result() for b in graph.blocks]
            inputs, outputs, _ = results[0]
            file = graphs_dir / f"{graph.name}.onnx"
            parts = [graphs_dir / f"{b.name}.onnx" for b in graph.blocks]
            role = recipe.roles[graph.role]
            # the integer-GEMM prefill forms the blocks' quantization wrote, linked as the blocks are
            forms = [prefill_path(part) if _int8_form(recipe, b.kind) and prefill_path(part).exists() else None
                     for b, part in zip(graph.blocks, parts)]
            if len(graph.blocks) > 1:
                if any(forms):
                    link([form or part for form, part in zip(forms, parts)], prefill_path(file), remove=False)
                    for form in filter(None, forms):
                        form.unlink()
                linked = link(parts, file)
                inputs, outputs = tensor_specs(linked.graph.input), tensor_specs(linked.graph.output)
            described = {kind: scheme for _, _, parts in results for kind, scheme in parts.items()}
            spec = GraphSpec(name=graph.name, file=file.relative_to(root).as_posix(), role=graph.role,
                             blocks=[b.name for b in graph.blocks], quantization=dict(sorted(described.items())),
                             inputs=inputs, outputs=outputs)
            if any(forms):
                spec = spec.model_copy(update={"prefill": spec.model_copy(update={"file": prefill_path(file).relative_to(root).as_posix()})})
            if role.dialect == "static":  # the fixed-shape forms, each checked against the NPUs of the role's chains
                decode, prefill = write_forms(file, recipe.prefill_chunk, recipe.max_context)
                for form in (decode, prefill):
                    check(form, role.providers + role.prefill)
                prefill_spec = spec.model_copy(update={"dialect": "static", "file": prefill_path(file).relative_to(root).as_posix(), **_io(prefill)})
                spec = spec.model_copy(update={"dialect": "static", "prefill": prefill_spec, **_io(decode),
                                               "dynamic": dynamic_path(file).relative_to(root).as_posix()})
            specs.append(spec)
    state.clear()
    generation = {**source.generation_config, **recipe.generation.model_dump(exclude_none=True)}
    (root / names.GENERATION_CONFIG).write_text(json.dumps(generation, indent=2) + "\n")
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.name != names.UNFINISHED)
    manifest = Manifest(
        format_version=FORMAT_VERSION,
        name=recipe.name,
        served_names=recipe.served_model_name,
        recipe=recipe.model_dump(mode="json"),
        source=source.spec,
        model=cfg,
        kv_cache=KVCacheSpec(layers=cfg.num_layers, kv_heads=cfg.num_kv_heads, head_dim=cfg.head_dim, capacity=recipe.max_context,
                             dtype=recipe.dtype),
        prefill_chunk=recipe.prefill_chunk,
        roles={role: recipe.roles[role] for role in sorted({g.role for g in specs})},
        graphs=specs,
        schedule=[g.name for g in specs],
        files=[file_entry(root, p) for p in files],
    )
    (root / names.MANIFEST).write_text(yaml.safe_dump(manifest.model_dump(mode="json"), sort_keys=False, width=120, default_flow_style=None))
    return manifest
