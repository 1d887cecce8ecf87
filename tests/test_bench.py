"""`tandem bench`: ours and a peer on the same weights and prompts, in their own processes (fast tier)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from runtime.bench import bench, markdown
from runtime.manifest import load_manifest
from runtime.roofline import bytes_per_token
from tests.conftest import tandem
from tests.tiny import make_gguf


def test_bench_runs_ours_and_a_peer_side_by_side(artifacts, checkpoint, tmp_path):
    out = tmp_path / "bench"
    proc = tandem("bench", str(artifacts["fused"]), "--prompt-lengths", "8,24", "--new-tokens", "6", "--repeats", "1",
                  "--threads", "1", "--peer", f"transformers:{checkpoint}:float32", "--peer", "genai:nowhere", "--out", str(out))
    report = json.loads((out / "bench.json").read_text())
    ours, peer = report["results"]
    assert (ours["system"], peer["system"]) == ("tandem", "transformers")
    assert [row["prompt_tokens"] for row in ours["rows"]] == [8, 24]
    # the same fp32 weights and prompt: the same greedy reply, token for token
    assert len(ours["tokens"]) == 7 and ours["tokens"] == peer["tokens"]
    assert "transformers (transformers float32 cpu): greedy reply to the first prompt equals tandem's in 7 of 7 tokens" in proc.stdout
    # the graphs ran on the CPU EP, so decode is set against the host's measured memory bandwidth
    bandwidth, manifest = report["memory_bandwidth_bytes_per_s"], load_manifest(artifacts["fused"])
    for row in ours["rows"]:
        assert row["decode_bound_tokens_per_s"] == bandwidth / bytes_per_token(manifest, row["prompt_tokens"])
    assert list(ours["time_by_graph_kind_s"]) == ["attention+embed+ffn+head"] and list(ours["time_by_provider_s"]) == ["CPU"]
    assert [s["system"] for s in report["skipped"]] == ["genai"]  # not installed here: skipped with its reason
    assert (out / "bench.md").read_text().count("| tandem (fused on CPU) |") == 2
    assert (out / "bench-speed.png").read_bytes()[:4] == b"\x89PNG" and (out / "bench-time-share.png").exists()


def test_optimum_peer_gives_our_greedy_reply(artifacts, checkpoint):
    """optimum's ORTModelForCausalLM (the `optimum` extra) on the same checkpoint: here, or run by the interpreter of
    the environment .ci/optimum sets up for it (TANDEM_OPTIMUM_PYTHON), as `--peer-python` does."""
    python = os.environ.get("TANDEM_OPTIMUM_PYTHON")
    if not python:
        pytest.importorskip("optimum.onnxruntime")
    report = bench(artifacts["fused"], [f"optimum:{checkpoint}"], [8], 6, 1, 1, {"optimum": python} if python else None)
    ours, peer = report["results"]
    assert peer["system"] == "optimum" and peer["label"].startswith("optimum-onnx ")
    assert peer["tokens"] == ours["tokens"] and len(ours["tokens"]) == 7


def test_a_peer_python_that_cannot_run_is_skipped_with_the_reason(artifacts, checkpoint, tmp_path):
    report = bench(artifacts["fused"], [f"transformers:{checkpoint}:float32"], [8], 2, 1, 1,
                   {"transformers": str(tmp_path / "no-such-python")})
    assert [r["system"] for r in report["results"]] == ["tandem"]
    (skip,) = report["skipped"]
    assert skip["system"] == "transformers" and "no-such-python: No such file or directory" in skip["reason"]
    proc = subprocess.run([sys.executable, "-m", "compiler.cli", "bench", str(artifacts["fused"]), "--peer-python",
                           "optimum"], capture_output=True, text=True)
    assert proc.returncode == 2 and "--peer-python takes SYSTEM=PYTHON, got 'optimum'" in proc.stderr


def test_llamacpp_peer_gives_our_greedy_reply(artifacts, checkpoint, tmp_path):
    """llama.cpp (the `llamacpp` extra) on the same weights, written as a float32 GGUF of llama.cpp's layout."""
    pytest.importorskip("llama_cpp")
    gguf = make_gguf(checkpoint, tmp_path / "tiny.gguf")
    ours, peer = bench(artifacts["fused"], [f"llamacpp:{gguf}"], [8, 24], 6, 1, 1)["results"]
    assert peer["system"] == "llamacpp" and peer["label"].startswith("llama.cpp ")
    assert [row["prompt_tokens"] for row in peer["rows"]] == [8, 24]
    assert peer["tokens"] == ours["tokens"] and len(ours["tokens"]) == 7


def test_another_artifact_runs_beside_ours(artifacts):
    """`tandem:DIR`: the fused and the one-graph-per-block layouts of one model, told apart by their folders."""
    report = bench(artifacts["fused"], [f"tandem:{artifacts['split']}"], [8], 6, 1, 1)
    fused, split = report["results"]
    assert (fused["label"], split["label"]) == ("fused on CPU", "split on CPU")
    assert split["tokens"] == fused["tokens"] and len(fused["tokens"]) == 7
    assert set(split["time_by_graph_kind_s"]) == {"attention", "embed", "ffn", "head"}
    assert "tandem (split on CPU): greedy reply to the first prompt equals tandem's in 7 of 7 tokens" in markdown(report)
