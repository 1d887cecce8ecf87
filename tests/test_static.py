"""The static dialect: NPU-bound graphs of standard ops with every shape fixed (a decode form and a prefill form over
one weights file, and a dynamic form for the CPU EP), checked against the NPUs of their role's chain; the runtime
stores the K/V they output."""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import onnx
import pytest

from compiler.build import compile_recipe
from compiler.npu_check import check, targets, violations
from runtime.engine import Engine, StaticRunner
from runtime.errors import TandemError
from runtime.generate import Generator
from runtime.manifest import ProviderSpec, load_manifest
from tests.conftest import LOOSE, RECIPE, edited_copy, retarget, write_recipe
from tests.test_fallback import CHAIN, fail_once, greedy

def forms(artifact: Path) -> list[onnx.ModelProto]:
    manifest = load_manifest(artifact)
    files = [f for g in manifest.graphs if g.dialect == "static" for f in (g.file, g.prefill.file)]
    return [onnx.load(artifact / f, load_external_data=False) for f in files]


@pytest.mark.parametrize("kind", ["fp32", "a16w8"])
def test_static_graphs_have_standard_ops_and_fixed_shapes_only(static_artifacts, kind):
    models = forms(static_artifacts[kind])
    assert len(models) == 4  # two attention blocks, a decode and a prefill form each
    for model in models:
        assert {n.domain for n in model.graph.node} <= {""}
        assert violations(model, []) == []  # every value's shape fixed
        inferred = onnx.shape_inference.infer_shapes(model)
        for value in [*inferred.graph.input, *inferred.graph.output, *inferred.graph.value_info]:
            assert all(d.HasField("dim_value") for d in value.type.tensor_type.shape.dim), value.name
    chain = [ProviderSpec(name="VitisAI" if kind == "a16w8" else "QNN")]
    assert all(violations(m, targets(chain)) == [] for m in models)
    if kind == "a16w8":
        assert all(any(n.op_type == "QuantizeLinear" for n in m.graph.node) for m in models)
    # the two forms of a graph name one weights file
    decode, prefill = models[:2]
    locations = {e.value for m in (decode, prefill) for t in m.graph.initializer for e in t.external_data if e.key == "location"}
    assert locations == {"attention.0.onnx.data"}
    assert decode.graph.input[0].type.tensor_type.shape.dim[1].dim_value == 1
    assert prefill.graph.input[0].type.tensor_type.shape.dim[1].dim_value == RECIPE["prefill_chunk"]


def test_static_artifact_gives_the_contrib_artifacts_tokens(static_artifacts, artifacts):
    """Prefill chunks on the prefill forms, decode steps on the decode forms, K/V stored by the runtime: the same
    greedy tokens as GroupQueryAttention over the cache in place; logits within float32 rounding."""
    assert greedy(Generator.load(static_artifacts["fp32"]), count=16) == greedy(Generator.load(artifacts["split"]), count=16)
    ours, theirs = Engine(static_artifacts["fp32"], slots=3), Engine(artifacts["split"], slots=3)
    assert any(isinstance(r, StaticRunner) for r in ours.runners)
    for engine in (ours, theirs):
        engine.forward(0, list(range(5, 25)))  # 3 chunks, the last one padded
        engine.forward(2, list(range(30, 33)))
    steps = [engine.extend([0, 2], [[7], [8]]) for engine in (ours, theirs)]  # two rows, one slot between them idle
    np.testing.assert_allclose(steps[0], steps[1], atol=1e-4)
    np.testing.assert_allclose(ours.forward(2, [9, 10]), theirs.forward(2, [9, 10]), atol=1e-4)


def without_dynamic_forms(manifest: dict) -> None:
    """As format 2 wrote it: every phase loads its fixed form."""
    for graph in manifest["graphs"]:
        graph.pop("dynamic", None)


@pytest.mark.parametrize("kind", ["fp32", "a16w8"])
def test_the_cpu_runs_both_phases_on_one_session_of_the_dynamic_form(static_artifacts, tmp_path, kind):
    """On the CPU EP a static graph's decode steps and prefill chunks share one session of the graph with its sequence
    open (its weights packed once), and give what the fixed forms give."""
    artifact = static_artifacts[kind]
    dynamic = [g.dynamic for g in load_manifest(artifact).graphs if g.dialect == "static"]
    assert dynamic == ["graphs/attention.0.dynamic.onnx", "graphs/attention.1.dynamic.onnx"]
    model = onnx.load(artifact / dynamic[0], load_external_data=False)
    assert model.graph.input[0].type.tensor_type.shape.dim[1].dim_param == "sequence"
    assert {e.value for t in model.graph.initializer for e in t.external_data if e.key == "location"} == {"attention.0.onnx.data"}
    shared, fixed = Engine(artifact), Engine(edited_copy(artifact, tmp_path / "fixed", without_dynamic_forms))
    static = [i for i, r in enumerate(shared.graphs) if isinstance(r, StaticRunner)]
    assert len(static) == 2
    assert all(shared.graphs[i].session is shared.prefill[i].session for i in static)
    assert all(fixed.graphs[i].session is not fixed.prefill[i].session for i in static)
    for engine in (shared, fixed):
        engine.forward(0, list(range(5, 25)))  # 3 chunks, the last one padded
    np.testing.assert_allclose(shared.forward(0, [7]), fixed.forward(0, [7]), atol=1e-4)
    assert greedy(Generator.load(artifact), count=12) == greedy(Generator.load(tmp_path / "fixed"), count=12)


def test_static_cache_capacity_is_the_compiled_one(static_artifacts):
    with pytest.raises(TandemError, match="static graphs read a cache of exactly 96 positions"):
        Engine(static_artifacts["fp32"], capacity=48)
    assert Engine(static_artifacts["fp32"], capacity=96).capacity == 96


def test_static_graph_failing_mid_request_falls_back(static_artifacts, tmp_path, caplog):
    expected = greedy(Generator.load(static_artifacts["fp32"]))
    gen = Generator.load(retarget(static_artifacts["fp32"], tmp_path / "chains", npu={**CHAIN, "dialect": "static"}))
    runner = next(r for r in gen.engine.prefill if r.spec.name == "attention.1")
    fail_once(runner, 1)  # the second prefill chunk
    with caplog.at_level(logging.WARNING, logger="tandem"):
        assert greedy(gen) == expected
    assert isinstance(runner, StaticRunner) and (runner.placement.phase, runner.placement.index) == ("prefill", 1)


def test_the_checker_names_the_offending_nodes(static_artifacts, artifacts):
    # float32 attention against the Ryzen AI NPU: its BF16 op table has no Softmax
    model = forms(static_artifacts["fp32"])[0]
    with pytest.raises(TandemError, match=r"VitisAI \(BF16\): node /attention.0/Softmax_\d+ \(Softmax\): not in its op set"):
        check(model, [ProviderSpec(name="VitisAI")])
    # a contrib graph: ORT's fused ops and dynamic shapes
    contrib = onnx.load(artifacts["split"] / "graphs" / "attention.0.onnx", load_external_data=False)
    problems = violations(contrib, [])
    assert any("(GroupQueryAttention): not a standard ONNX op (domain com.microsoft)" in p for p in problems)
    assert any("(SimplifiedLayerNormalization): not a standard ONNX op" in p for p in problems)
    assert any("has no fixed shape" in p and "batch" in p for p in problems)
    # OpenVINO's NPU takes no 0 in a Reshape target; the fixed forms write every target out in full
    zero = onnx.helper.make_graph(
        [onnx.helper.make_node("Reshape", ["x", "shape"], ["y"], name="/attention.0/Reshape_1")], "g",
        [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [2, 3])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [2, 3])],
        [onnx.numpy_helper.from_array(np.array([0, 3], dtype=np.int64), "shape")])
    npu = targets([ProviderSpec(name="OpenVINO", options={"device_type": "NPU"})])
    assert [p for p in violations(onnx.helper.make_model(zero), npu)] == [
        "OpenVINO NPU: node /attention.0/Reshape_1 (Reshape): a 0 in its target shape"]
    assert all(violations(m, npu) == [] for m in forms(static_artifacts["fp32"]))


def test_a_static_graph_that_breaks_a_rule_fails_the_compile(tmp_path, checkpoint):
    roles = {**RECIPE["roles"], "npu": {"providers": ["VitisAI", "CPU"], "dialect": "static"}}
    with pytest.raises(TandemError, match=r"graph attention.0 breaks the static dialect's rules.*\n.*Softmax"):
        compile_recipe(write_recipe(tmp_path, roles=roles), model=str(checkpoint), out=tmp_path / "out", show_progress=False)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("change, message", [
    ({"placement": {**RECIPE["placement"], "head": "npu"}}, "placement.head: role npu has the static dialect"),
    ({"quantization": {"attention": {"scheme": "int4"}}}, "quantization.attention.scheme int4: role npu has the static dialect"),
])
def test_recipes_keep_static_roles_to_what_the_dialect_builds(tmp_path, change, message):
    from compiler.recipe import load_recipe

    roles = {**RECIPE["roles"], "npu": {"providers": ["VitisAI", "CPU"], "dialect": "static"}}
    with pytest.raises(TandemError, match=message):
        load_recipe(write_recipe(tmp_path, roles=roles, **change))


NPU_RECIPES = ["ryzen-ai", "core-ultra", "snapdragon"]


@pytest.mark.parametrize("target", NPU_RECIPES)
def test_npu_recipes_compile_pass_the_checker_and_fall_back_here(target, tmp_path, checkpoint):
    """Each laptop recipe's roles, dialects and quantization, at the tiny model's sizes: the compile checks its NPU
    graphs against the NPU's rules; here (no NPU, no iGPU EP) every graph falls back along its chain and says why."""
    import yaml

    recipe = yaml.safe_load((Path(__file__).parent.parent / "recipes" / f"qwen2.5-7b-instruct.{target}.yaml").read_text())
    recipe.update(name=target, max_context=96, prefill_chunk=8, calibration={"windows": 4, "window": 64}, verify=LOOSE)
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    artifact = compile_recipe(path, model=str(checkpoint), out=tmp_path / target, show_progress=False)
    manifest = load_manifest(artifact)
    assert {g.name for g in manifest.graphs if g.dialect == "static"} == {"attention.0", "attention.1"}
    engine = Engine(artifact)
    for placement in engine.placements:
        assert placement.provider == "CPU"
        assert len(placement.skipped) == len(placement.requested) - 1 and placement.fell_back == (placement.role != "cpu")
    npu = next(p for p in engine.placements if p.role == "npu")
    assert npu.skipped[0].endswith("not in this onnxruntime build") and npu.phase in ("prefill", "decode")
