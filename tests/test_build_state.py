"""An interrupted compile keeps its finished blocks; `--resume` goes on from them to the same artifact."""
from __future__ import annotations

import json

import pytest

import compiler.build as build
from compiler.build import compile_recipe
from runtime.manifest import load_manifest
from tests.conftest import LOOSE, write_recipe

GPTQ = {"ffn": {"scheme": "int4"}, "attention": {"scheme": "int8-qdq", "activations": "uint16"}}


def test_an_interrupted_compile_resumes_where_it_stopped_and_gives_the_same_artifact(tmp_path, checkpoint, monkeypatch):
    recipe = write_recipe(tmp_path, name="gptq", quantization=GPTQ, calibration={"windows": 2, "window": 32}, verify=LOOSE)
    fresh = load_manifest(compile_recipe(recipe, model=str(checkpoint), out=tmp_path / "fresh", show_progress=False))

    finish, calls = build.finish_graph, []

    def interrupted(file, *args):  # Ctrl-C while the fourth block is quantized
        calls.append(file.stem)
        if len(calls) == 4:
            raise KeyboardInterrupt
        return finish(file, *args)

    monkeypatch.setattr(build, "finish_graph", interrupted)
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        compile_recipe(recipe, model=str(checkpoint), out=out, show_progress=False)
    (partial,) = tmp_path.glob(".out.partial-*")
    assert list(json.loads((partial / ".build-state.json").read_text())["finished"]) == ["embed", "attention.0", "ffn.0"]

    calls.clear()
    monkeypatch.setattr(build, "finish_graph", finish)
    built = []
    real_build = build.build_graph
    monkeypatch.setattr(build, "build_graph", lambda unit, *a: built.append(unit.name) or real_build(unit, *a))
    resumed = load_manifest(compile_recipe(recipe, model=str(checkpoint), out=out, show_progress=False, resume=True))
    assert built == ["attention.1", "ffn.1", "head"]  # the blocks the interrupted build had not finished
    assert [(f.path, f.sha256) for f in resumed.files] == [(f.path, f.sha256) for f in fresh.files]  # byte for byte
    assert not list(tmp_path.glob(".out.partial-*")) and not list(out.glob(".build-*"))


def test_resume_without_an_interrupted_build_compiles_from_the_start(tmp_path, checkpoint):
    recipe = write_recipe(tmp_path, name="plain")
    assert load_manifest(compile_recipe(recipe, model=str(checkpoint), out=tmp_path / "out", show_progress=False, resume=True))


def test_a_build_of_another_recipe_is_not_resumed(tmp_path, checkpoint, monkeypatch):
    """The state names its recipe and model: another recipe (here: other calibration) starts over."""
    first = write_recipe(tmp_path, name="a", quantization=GPTQ, calibration={"windows": 2, "window": 32}, verify=LOOSE)
    finish = build.finish_graph

    def interrupted(file, *args):
        if file.stem == "ffn.0":
            raise KeyboardInterrupt
        return finish(file, *args)

    monkeypatch.setattr(build, "finish_graph", interrupted)
    with pytest.raises(KeyboardInterrupt):
        compile_recipe(first, model=str(checkpoint), out=tmp_path / "out", show_progress=False)
    monkeypatch.setattr(build, "finish_graph", finish)
    second = write_recipe(tmp_path, name="a", quantization=GPTQ, calibration={"windows": 3, "window": 32}, verify=LOOSE)
    built = []
    real_build = build.build_graph
    monkeypatch.setattr(build, "build_graph", lambda unit, *a: built.append(unit.name) or real_build(unit, *a))
    compile_recipe(second, model=str(checkpoint), out=tmp_path / "out", show_progress=False, resume=True)
    assert built[0] == "embed"
