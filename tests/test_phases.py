"""Phase-specialised sessions: a role whose prompt chunks run on a session of its `prefill` chain, decode steps on
its own, over one KV cache. Run here on what this onnxruntime build has (the OpenVINO EP where it is installed)."""
from __future__ import annotations

import json
from types import SimpleNamespace

import onnxruntime as ort
import pytest
import yaml

from runtime.engine import Engine
from runtime.errors import TandemError
from runtime.generate import Generator
from tests.conftest import retarget

# OpenVINO in float32: where the CPU has bf16 units, OpenVINO computes in bf16 unless told otherwise
OPENVINO = {"name": "OpenVINO", "options": {"device_type": "CPU", "load_config": json.dumps({"CPU": {"INFERENCE_PRECISION_HINT": "f32"}})}}


def test_prefill_chain_runs_prompt_chunks_and_gives_the_same_tokens(artifacts, tmp_path):
    """The FFN and head graphs (role igpu) prefill on OpenVINO (or, without it, on a CPU session of their own) and
    decode on the CPU EP: greedy tokens equal the single-session artifact's, and each session ran its phase only."""
    phased = retarget(artifacts["split"], tmp_path / "phased", igpu={"providers": ["CPU"], "prefill": [OPENVINO, "CPU"]})
    plain, split = Generator.load(artifacts["split"]), Generator.load(phased)
    ids = plain.chat_prompt([{"role": "user", "content": "def fibonacci(n):"}])  # 3 prefill chunks of 8
    greedy = lambda gen: [c.token_id for c in gen.stream(ids, 16, gen.sampling(temperature=0)) if c.token_id is not None]  # noqa: E731
    assert greedy(split) == greedy(plain)

    engine = split.engine
    prefill = [p for p in engine.placements if p.phase == "prefill"]
    assert sorted(p.graph for p in prefill) == sorted(g.name for g in engine.manifest.graphs if g.role == "igpu")
    assert {p.provider for p in prefill} == {"OpenVINO" if "OpenVINOExecutionProvider" in ort.get_available_providers() else "CPU"}
    assert {p.phase for p in engine.placements if p.graph.startswith("ffn")} == {"prefill", "decode"}
    assert all(p.phase == "" for p in engine.placements if p.graph.startswith(("embed", "attention")))
    for runner in engine.runners:
        assert runner.seconds > 0, runner.placement  # every session ran: the prefill ones on the prompt, the rest on decode
    decode_only = Engine(phased)
    decode_only.forward(0, [5])
    assert all(r.seconds == 0 for r in decode_only.runners if r.placement.phase == "prefill")
    # embed and attention stay on the CPU EP, so a prefill chunk on OpenVINO hands over at each graph after them
    traffic = engine.traffic_report()
    assert traffic["bytes_moved_per_token"] == 0  # host memory throughout
    assert (traffic["cross_ep_hops_per_step"] > 0) == (prefill[0].provider == "OpenVINO")


def test_hops_count_hand_overs_between_eps():
    from runtime.engine import hops

    assert hops(["CPU", "CPU"]) == 0 and hops([]) == 0
    assert hops(["CPU", "OpenVINO", "CPU", "OpenVINO", "OpenVINO"]) == 3


def test_prefill_somewhere_the_cache_is_not_is_refused():
    """Attention graphs bind the KV cache in place: their prefill must run on the device the cache is on."""
    from runtime.engine import _same_cache_device

    def runner(provider: str, device: str, inputs: list[str]) -> SimpleNamespace:
        spec = SimpleNamespace(name="attention.0", inputs=dict.fromkeys(inputs))
        return SimpleNamespace(spec=spec, placement=SimpleNamespace(provider=provider, device=device))

    with pytest.raises(TandemError, match="attention.0 reads the KV cache"):
        _same_cache_device(runner("CPU", "cpu", ["hidden", "past_key.0"]), runner("CUDA", "cuda", ["hidden", "past_key.0"]))
    _same_cache_device(runner("CPU", "cpu", ["hidden"]), runner("CUDA", "cuda", ["hidden"]))  # an FFN graph may
    _same_cache_device(runner("CPU", "cpu", ["past_key.0"]), runner("OpenVINO", "cpu", ["past_key.0"]))


def test_prefill_chain_in_the_recipe_reaches_the_manifest(tmp_path):
    from compiler.recipe import load_recipe
    from tests.conftest import RECIPE, write_recipe

    roles = {**RECIPE["roles"], "cpu": {"providers": ["CPU"], "prefill": ["OpenVINO", "CPU"]}}
    recipe = load_recipe(write_recipe(tmp_path, roles=roles))
    assert [p.name for p in recipe.roles["cpu"].prefill] == ["OpenVINO", "CPU"]
    with pytest.raises(TandemError, match=r"roles.cpu.prefill.0.name: .*unknown execution provider 'Quantum'"):
        load_recipe(write_recipe(tmp_path, roles={**roles, "cpu": {"providers": ["CPU"], "prefill": ["Quantum"]}}))


def test_info_and_stats_show_each_phase_placement(artifacts, tmp_path):
    from tests.conftest import tandem

    phased = retarget(artifacts["split"], tmp_path / "phased", igpu={"providers": ["CPU"], "prefill": ["CPU"]})
    info = tandem("info", str(phased)).stdout
    assert "igpu: prefill CPU, decode CPU" in info
    rows = [line.split() for line in info.splitlines() if line.startswith("ffn.0 ")]
    assert [row[1:3] for row in rows] == [["igpu", "decode"], ["igpu", "prefill"]]
    stats = tandem("generate", str(phased), "--prompt", "def fib", "--max-tokens", "4", "--stats").stderr
    n = yaml.safe_load((phased / "manifest.yaml").read_text())["model"]["num_layers"] + 1  # graphs of each role
    assert f"graphs on CPU x{n}, CPU (decode) x{n}, CPU (prefill) x{n}; time CPU " in stats


def test_static_graphs_on_openvino_give_the_contrib_artifacts_tokens(static_artifacts, artifacts, tmp_path):
    """The static dialect's attention graphs (fixed-shape decode and prefill forms, as NPU plugins take them) on the
    OpenVINO EP, FFN and head on the CPU EP: two EPs alternating over one host KV cache that the runtime writes the
    attention's new K/V into. Greedy tokens equal the contrib artifact's (GroupQueryAttention on the CPU EP)."""
    from tests.test_fallback import greedy

    moved = retarget(static_artifacts["fp32"], tmp_path / "ov", npu={"providers": [OPENVINO, "CPU"], "dialect": "static"})
    gen = Generator.load(moved)
    assert greedy(gen, count=16) == greedy(Generator.load(artifacts["split"]), count=16)
    attention = {p.provider for p in gen.engine.placements if p.role == "npu"}
    assert attention == {"OpenVINO" if "OpenVINOExecutionProvider" in ort.get_available_providers() else "CPU"}
    assert {p.phase for p in gen.engine.placements if p.role == "npu"} == {"prefill", "decode"}
