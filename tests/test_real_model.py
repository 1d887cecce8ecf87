"""Slow tier: the real default model (Qwen2.5-Coder-0.5B-Instruct GGUF) through the README's commands."""
from __future__ import annotations

import json
from pathlib import Path

import onnx
import pytest

from compiler.npu_check import targets, violations
from runtime.manifest import load_manifest
from tests.conftest import tandem

FIB = "Write a Python function to calculate fibonacci"
pytestmark = pytest.mark.slow


def greedy(artifact: Path) -> str:
    return tandem("generate", str(artifact), "--chat", "--prompt", FIB, "--max-tokens", "64", "--temperature", "0").stdout


def test_fp32_recipe_matches_transformers(real_artifacts):
    report = json.loads((real_artifacts["fp32"] / "verify.json").read_text())
    assert report["failures"] == [] and report["greedy_agreement"] == 1.0
    assert max(g["max_rel_error"] for g in report["graphs"]) < 1e-4
    assert abs(report["fidelity"]["perplexity_delta"]) < 1e-3  # the fp32 artifact is the reference, to rounding
    fib = next(c for c in report["chain"] if c["prompt"] == FIB)
    assert fib["new_tokens"] == 64 and fib["text"] == fib["reference_text"]
    text = greedy(real_artifacts["fp32"])
    assert text.rstrip("\n") == fib["reference_text"]  # the CLI prints transformers' greedy answer
    assert "def fibonacci" in text


def quantized_report(artifact: Path, fp32: dict, rss_fraction: float) -> dict:
    """verify.json of a quantized artifact, checked against the fp32 one: no failures, smaller, less memory."""
    report = json.loads((artifact / "verify.json").read_text())
    assert report["failures"] == [] and report["fidelity"]["tokens"] >= 2000
    assert report["size_bytes"] < 0.3 * fp32["size_bytes"]
    assert report["runtime_peak_rss_bytes"] < rss_fraction * fp32["runtime_peak_rss_bytes"]
    assert greedy(artifact).strip()
    return report


def test_default_recipe_is_int4_within_the_perplexity_target(real_artifacts):
    fp32 = json.loads((real_artifacts["fp32"] / "verify.json").read_text())
    report = quantized_report(real_artifacts["cpu"], fp32, rss_fraction=0.5)
    fidelity = report["fidelity"]
    assert 0 < fidelity["perplexity_delta"] < 0.05 and fidelity["top1_agreement"] > 0.88
    assert "def fibonacci" in greedy(real_artifacts["cpu"])
    kinds = load_manifest(real_artifacts["cpu"]).graphs[0].quantization
    assert kinds["attention"].startswith("int4 block 32") and kinds["lm_head"].startswith("int4") and kinds["embedding"].startswith("int4")


def test_ryzen_ai_recipe_falls_back_to_cpu_quantized_for_the_npu(real_artifacts):
    info = tandem("info", str(real_artifacts["ryzen-ai"])).stdout
    rows = [line.split() for line in info.splitlines() if line.startswith(("attention.", "ffn."))]
    attention, ffn = [r for r in rows if r[0].startswith("attention.")], [r for r in rows if r[0].startswith("ffn.")]
    assert len(attention) == 48 and len(ffn) == 24  # static attention: a decode and a prefill placement each
    assert all(r[1] == "npu" and r[3:5] == ["VitisAI", "CPU"] for r in attention)
    assert sorted({r[2] for r in attention}) == ["decode", "prefill"]
    assert all(r[1:4] == ["igpu", "MIGraphX", "CPU"] for r in ffn)
    fp32 = json.loads((real_artifacts["fp32"] / "verify.json").read_text())
    quantized_report(real_artifacts["ryzen-ai"], fp32, rss_fraction=1.0)  # 50 sessions: the CPU runs both phases on one
    manifest = load_manifest(real_artifacts["ryzen-ai"])
    attention = next(g for g in manifest.graphs if g.name == "attention.0")
    assert attention.dialect == "static" and attention.prefill is not None
    for file in (attention.file, attention.prefill.file):
        model = onnx.load(real_artifacts["ryzen-ai"] / file, load_external_data=False)
        ops = {n.op_type for n in model.graph.node}
        assert {"QuantizeLinear", "DequantizeLinear", "MatMul"} <= ops and "MatMulNBits" not in ops
        assert violations(model, targets(manifest.roles["npu"].providers)) == []  # A16W8 column, fixed shapes
