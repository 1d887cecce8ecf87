"""CUDA graphs, on the lent GPU machine (skipped where onnxruntime has no CUDA EP): decode steps captured once per
batch and replayed give the logits of the same steps run without capture, with prefill chunks run in between."""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import yaml

from tests.conftest import RECIPE, write_recipe

pytestmark = pytest.mark.skipif("CUDAExecutionProvider" not in ort.get_available_providers(), reason="needs the CUDA EP")
RTN = {"scheme": "int4", "block_size": 32, "symmetric": False, "gptq": False}
GRAPHS = {"name": "CUDA", "options": {"enable_cuda_graph": 1}}


@pytest.fixture(scope="module", params=["cpu", "igpu"], ids=["embedding-on-host", "all-on-gpu"])
def cuda_artifacts(request, tmp_path_factory, checkpoint) -> dict[str, Path]:
    """The tiny model as the CUDA recipe builds it, with CUDA graphs, its embedding on the GPU too (the recipe's
    placement) or on the CPU EP (the hidden state a captured decode step starts from is then made on the host); and
    a copy whose chain has no CUDA graphs."""
    from compiler.build import compile_recipe

    root = tmp_path_factory.mktemp("cuda")
    recipe = write_recipe(
        root, name="cuda", dtype="float16", fuse=True,
        roles={"igpu": {"providers": [GRAPHS, "CUDA", "CPU"]}, "cpu": {"providers": ["CPU"]}},
        placement={**dict.fromkeys(RECIPE["placement"], "igpu"), "embed": request.param},
        quantization={"attention": RTN, "ffn": RTN, "lm_head": {**RTN, "scheme": "int8"}, "embedding": RTN},
        # int4 and float16 on a 64-wide model: verify reports its errors against torch, this test compares the runs
        verify={**RECIPE["verify"], "graph_max_rel_error": 10.0, "logits_max_abs_error": 100.0, "greedy_agreement": 0.0,
                "max_perplexity_delta": 100.0},
    )
    graphs = compile_recipe(recipe, model=str(checkpoint), out=root / "graphs", show_progress=False)
    plain = root / "plain"
    shutil.copytree(graphs, plain)
    manifest = yaml.safe_load((plain / "manifest.yaml").read_text())
    manifest["roles"]["igpu"]["providers"] = manifest["roles"]["igpu"]["providers"][1:]
    (plain / "manifest.yaml").write_text(yaml.safe_dump(manifest, sort_keys=False))
    return {"graphs": graphs, "plain": plain}


def decode(directory: Path) -> list[np.ndarray]:
    """Greedy steps: two slots decoding as one batch, then slot 1 prefilled again while slot 0 waits, then each
    slot alone (batches of one: graphs of their own)."""
    from runtime.engine import Engine

    engine = Engine(directory, slots=2)
    prompts = [[5, 17, 42, 8, 99, 3, 61, 7, 12, 30, 2], [77, 4, 19]]
    steps = [np.stack([engine.forward(slot, p) for slot, p in enumerate(prompts)])]
    for _ in range(6):
        steps.append(engine.extend([0, 1], [[int(t)] for t in steps[-1].argmax(-1)]))
    engine.reset(1)
    steps.append(engine.forward(1, prompts[0])[None])
    for slot in (0, 1, 0, 1):
        steps.append(engine.extend([slot], [[int(steps[-1][0].argmax())]]))
    assert [p.captures_graphs for p in engine.placements] == [
        directory.name == "graphs" and p.device != "cpu" for p in engine.placements]
    return steps


def test_replayed_graphs_match_plain_runs(cuda_artifacts):
    captured, plain = decode(cuda_artifacts["graphs"]), decode(cuda_artifacts["plain"])
    for step, (a, b) in enumerate(zip(captured, plain)):
        assert np.array_equal(a.argmax(-1), b.argmax(-1)), f"step {step}"
        np.testing.assert_allclose(a, b, atol=2e-2, err_msg=f"step {step}")


def test_split_placement_decodes_as_all_cpu(tmp_path, checkpoint):
    """Attention on the CPU EP, FFN and head on CUDA, float32 activations everywhere (accuracy level 0): the hidden
    state crosses host and device at every graph, and each decode step must send the new one. A split run's steps
    once reused the device copy ORT had made when the input was first bound: from the second decode step on, the FFN
    graphs computed on stale hidden states. Greedy tokens and logits equal the same graphs all on the CPU."""
    from compiler.build import compile_recipe
    from runtime.engine import Engine
    from tests.conftest import retarget

    rtn = {**RTN, "accuracy_level": 0}
    recipe = write_recipe(
        tmp_path, name="split", roles={"igpu": {"providers": ["CUDA", "CPU"]}, "cpu": {"providers": ["CPU"]}},
        placement={"embed": "igpu", "attention": "cpu", "ffn": "igpu", "head": "igpu"},
        quantization={"attention": rtn, "ffn": rtn, "lm_head": {**rtn, "scheme": "int8"}, "embedding": RTN},
        verify={**RECIPE["verify"], "graph_max_rel_error": 10.0, "logits_max_abs_error": 100.0, "greedy_agreement": 0.0,
                "max_perplexity_delta": 100.0},
    )
    split = compile_recipe(recipe, model=str(checkpoint), out=tmp_path / "split", show_progress=False)
    cpu = retarget(split, tmp_path / "cpu", igpu={"providers": ["CPU"]})
    runs = []
    for directory in (split, cpu):
        engine = Engine(directory)
        logits = [engine.forward(0, [5, 17, 42, 8, 99, 3, 61, 7, 12, 30, 2])]
        for _ in range(12):
            logits.append(engine.forward(0, [int(logits[-1].argmax())]))
        runs.append(np.stack(logits))
    assert {p.provider for p in Engine(split).placements} == {"CUDA", "CPU"}
    assert np.array_equal(runs[0].argmax(-1), runs[1].argmax(-1))
    np.testing.assert_allclose(runs[0], runs[1], atol=1e-3)
