"""Reliability (fast tier, tiny model): load/soak/disconnects and fuzzing in small counts, tampered artifacts
refused in one line, a build killed midway, and request fields kept away from templates and files."""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from runtime.errors import TandemError
from runtime.manifest import UNFINISHED, load_manifest
from runtime.stress import divergence, markdown, stress, verdict
from runtime.tokenizer import Tokenizer
from tests.conftest import write_recipe


def test_load_soak_and_disconnects(chat_artifact):
    report = stress(chat_artifact, clients=4, requests=6, soak_requests=60, cuts=8, threads=1)
    assert verdict(report) == [], markdown(report)
    load = report["load"]
    assert load["requests"] == 24 and load["equal_to_sequential"] == 24  # fp32 tiny model: batching changes nothing
    assert load["latency_s"]["p99"] >= load["latency_s"]["p50"] > 0 and load["ttft_s"]["p50"] > 0
    soak = report["soak"]
    assert soak["requests"] == 60 and soak["after_warmup"]["rss_bytes"] > 0
    cut = report["disconnects"]
    assert cut["ended"] == 8 and cut["aborts"] >= 1 and cut["followup_served"] == 8 and cut["still_running"] == 0


def test_divergence_is_measured_where_replies_part():
    ref = {"text": "ab", "tokens": ["a", "b"], "top": [[("a", -0.1), ("x", -3.0)], [("b", -0.6), ("c", -0.8)]]}
    assert divergence(ref, dict(ref)) is None
    assert divergence(ref, {"text": "ac", "tokens": ["a", "c"], "top": []}) == pytest.approx(0.2)
    assert divergence(ref, {"text": "xb", "tokens": ["x", "b"], "top": []}) == pytest.approx(2.9)
    assert divergence(ref, {"text": "a", "tokens": ["a"], "top": []}) == float("inf")


def test_fuzzing_finds_no_server_errors(chat_artifact):
    from runtime.fuzz import fuzz

    report = fuzz(chat_artifact, max_examples=15, seconds=40)
    assert report["schemathesis_exit"] == 0 and report["server_alive"], report["output_tail"]
    assert report["generated"] > 100 and report["passed"] == report["generated"]


def _tandem_info(artifact: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "compiler.cli", "info", str(artifact)], capture_output=True, text=True, check=False)


def _flip_byte(path: Path) -> None:
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0x01
    path.write_bytes(bytes(raw))


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _edit_manifest(**changes):
    def edit(path: Path) -> None:
        path.write_text(yaml.safe_dump({**yaml.safe_load(path.read_text()), **changes}, sort_keys=False))
    return edit


TAMPER = [
    ("graphs/attention.0.onnx.data", _flip_byte, "attention.0.onnx.data: sha256 mismatch"),
    ("graphs/ffn.1.onnx", _truncate, "ffn.1.onnx: {size} bytes where the manifest lists"),
    ("rope.npy", Path.unlink, "rope.npy: missing (listed in manifest.yaml)"),
    ("manifest.yaml", _edit_manifest(format_version=4), "format_version 4 is newer than this runtime supports"),
    ("manifest.yaml", _edit_manifest(shiny=True), "manifest.yaml: shiny: unknown key"),
    ("manifest.yaml", Path.unlink, "not an artifact (no manifest.yaml)"),
]


@pytest.mark.parametrize("file,damage,expected", TAMPER, ids=[f"{f}-{d.__name__}" for f, d, _ in TAMPER])
def test_damaged_artifact_is_refused_in_one_line(artifacts, tmp_path, file, damage, expected):
    copy = shutil.copytree(artifacts["split"], tmp_path / "copy")
    damage(copy / file)
    expected = expected.format(size=(copy / file).stat().st_size if (copy / file).exists() else 0)
    proc = _tandem_info(copy)
    assert proc.returncode == 2 and proc.stderr.startswith("error: ") and expected in proc.stderr, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and "Traceback" not in proc.stderr


def test_build_killed_midway_leaves_nothing_that_loads(checkpoint, artifacts, tmp_path):
    """SIGKILL while the graphs are written: the previous artifact stays, the leftovers refuse to load, and a
    re-run succeeds and clears them."""
    recipe = write_recipe(tmp_path, name="split")
    out = shutil.copytree(artifacts["split"], tmp_path / "out")
    before = (out / "manifest.yaml").read_text()
    build = subprocess.Popen([sys.executable, "-m", "compiler.cli", "compile", str(recipe), "--model", str(checkpoint),
                              "-o", str(out), "--quiet"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    partial = tmp_path / f".out.partial-{build.pid}"
    deadline = time.monotonic() + 120
    while not list(partial.glob("graphs/*.onnx")) and time.monotonic() < deadline and build.poll() is None:
        time.sleep(0.01)
    os.kill(build.pid, signal.SIGKILL)
    build.wait()
    assert partial.is_dir() and (partial / UNFINISHED).exists()
    with pytest.raises(TandemError, match="an unfinished build"):
        load_manifest(partial)
    assert (out / "manifest.yaml").read_text() == before and load_manifest(out)
    proc = subprocess.run([sys.executable, "-m", "compiler.cli", "compile", str(recipe), "--model", str(checkpoint),
                           "-o", str(out), "--quiet"], capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stderr
    assert load_manifest(out) and sorted(p.name for p in tmp_path.iterdir()) == ["out", "split.yaml"]


def test_request_text_never_reaches_the_template_engine(artifacts, tmp_path):
    """Message content and tool schemas are data to the sandboxed chat template, never template code; a template
    that reaches for Python internals is refused."""
    tokenizer = Tokenizer.from_dir(artifacts["split"])
    hostile = "{{ 7 * 7 }} {% include '/etc/passwd' %} {{ ''.__class__.__mro__ }}"
    text = tokenizer.apply_chat_template([{"role": "user", "content": hostile}])
    assert hostile in text and "49" not in text and "root:" not in text
    copy = shutil.copytree(artifacts["split"], tmp_path / "copy")
    (copy / "chat_template.jinja").write_text("{{ ''.__class__.__mro__[1].__subclasses__() }}")
    with pytest.raises(TandemError, match="chat template error"):
        Tokenizer.from_dir(copy).apply_chat_template([{"role": "user", "content": "hi"}])
