"""Slow tier: the real default model (Qwen2.5-Coder-0.5B-Instruct GGUF) through the README's commands."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

RECIPES = Path(__file__).parent.parent / "recipes"
FIB = "Write a Python function to calculate fibonacci"
pytestmark = pytest.mark.slow


def tandem(*args: str) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "compiler.cli", *args], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@pytest.fixture(scope="module")
def compiled(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("real")
    out = {"cpu": root / "cpu", "ryzen-ai": root / "ryzen-ai"}
    tandem("compile", str(RECIPES / "qwen2.5-coder-0.5b-instruct.cpu.yaml"), "-o", str(out["cpu"]), "--quiet")
    tandem("compile", str(RECIPES / "qwen2.5-7b-instruct.ryzen-ai.yaml"), "--model", "default", "-o", str(out["ryzen-ai"]), "--quiet")
    return out


def greedy(artifact: Path) -> str:
    return tandem("generate", str(artifact), "--chat", "--prompt", FIB, "--max-tokens", "64", "--temperature", "0").stdout


def test_default_model_matches_transformers(compiled):
    report = json.loads((compiled["cpu"] / "verify.json").read_text())
    assert report["failures"] == [] and report["greedy_agreement"] == 1.0
    assert max(g["max_rel_error"] for g in report["graphs"]) < 1e-4
    fib = next(c for c in report["chain"] if c["prompt"] == FIB)
    assert fib["new_tokens"] == 64 and fib["text"] == fib["reference_text"]
    text = greedy(compiled["cpu"])
    assert text.rstrip("\n") == fib["reference_text"]  # the CLI prints transformers' greedy answer
    assert "def fibonacci" in text


def test_ryzen_ai_recipe_falls_back_to_cpu_with_the_same_output(compiled):
    info = tandem("info", str(compiled["ryzen-ai"])).stdout
    rows = [line.split() for line in info.splitlines() if line.startswith(("attention.", "ffn."))]
    assert len(rows) == 48
    assert all(r[1:4] == ["npu", "VitisAI", "CPU"] for r in rows if r[0].startswith("attention."))
    assert all(r[1:4] == ["igpu", "MIGraphX", "CPU"] for r in rows if r[0].startswith("ffn."))
    report = json.loads((compiled["ryzen-ai"] / "verify.json").read_text())
    assert report["failures"] == [] and report["greedy_agreement"] == 1.0
    assert greedy(compiled["ryzen-ai"]) == greedy(compiled["cpu"])
