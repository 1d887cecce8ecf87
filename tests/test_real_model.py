"""Slow tier: the real default model (Qwen2.5-Coder-0.5B-Instruct GGUF) through the README's commands."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import tandem

FIB = "Write a Python function to calculate fibonacci"
pytestmark = pytest.mark.slow


def greedy(artifact: Path) -> str:
    return tandem("generate", str(artifact), "--chat", "--prompt", FIB, "--max-tokens", "64", "--temperature", "0").stdout


def test_default_model_matches_transformers(real_artifacts):
    report = json.loads((real_artifacts["cpu"] / "verify.json").read_text())
    assert report["failures"] == [] and report["greedy_agreement"] == 1.0
    assert max(g["max_rel_error"] for g in report["graphs"]) < 1e-4
    fib = next(c for c in report["chain"] if c["prompt"] == FIB)
    assert fib["new_tokens"] == 64 and fib["text"] == fib["reference_text"]
    text = greedy(real_artifacts["cpu"])
    assert text.rstrip("\n") == fib["reference_text"]  # the CLI prints transformers' greedy answer
    assert "def fibonacci" in text


def test_ryzen_ai_recipe_falls_back_to_cpu_with_the_same_output(real_artifacts):
    info = tandem("info", str(real_artifacts["ryzen-ai"])).stdout
    rows = [line.split() for line in info.splitlines() if line.startswith(("attention.", "ffn."))]
    assert len(rows) == 48
    assert all(r[1:4] == ["npu", "VitisAI", "CPU"] for r in rows if r[0].startswith("attention."))
    assert all(r[1:4] == ["igpu", "MIGraphX", "CPU"] for r in rows if r[0].startswith("ffn."))
    report = json.loads((real_artifacts["ryzen-ai"] / "verify.json").read_text())
    assert report["failures"] == [] and report["greedy_agreement"] == 1.0
    assert greedy(real_artifacts["ryzen-ai"]) == greedy(real_artifacts["cpu"])


def test_int4_recipe_on_the_real_model(real_artifacts):
    report = json.loads((real_artifacts["int4"] / "verify.json").read_text())
    fp32 = json.loads((real_artifacts["cpu"] / "verify.json").read_text())
    assert report["failures"] == []
    fidelity = report["fidelity"]
    assert fidelity["tokens"] >= 2000 and 0 < fidelity["perplexity_delta"] < 0.15 and fidelity["top1_agreement"] > 0.8
    assert abs(fp32["fidelity"]["perplexity_delta"]) < 1e-3  # the fp32 artifact is the reference, to rounding
    assert report["size_bytes"] < 0.6 * fp32["size_bytes"]
    assert report["runtime_peak_rss_bytes"] < fp32["runtime_peak_rss_bytes"]
    assert "def fibonacci" in greedy(real_artifacts["int4"])
