"""The `tandem` command: output of info/generate, and one-line errors instead of tracebacks."""
from __future__ import annotations

import subprocess
import sys

from compiler.cli import main
from tests.conftest import tandem


def test_info_shows_requested_and_resolved(artifacts, capsys):
    assert main(["info", str(artifacts["split"])]) == 0
    out = capsys.readouterr().out
    assert "attention.0 npu VitisAI CPU" in " ".join(out.split())
    assert "ffn.1 igpu MIGraphX CPU" in " ".join(out.split())
    assert "fallback: VitisAI: not in this onnxruntime build" in out
    assert "graphs run on: CPU" in out


def test_info_counts_a_linked_graphs_weights(artifacts, capsys):
    """A fused graph reads its blocks' data files: its size is theirs, most of the artifact."""
    assert main(["info", str(artifacts["fused"])]) == 0
    lines = capsys.readouterr().out.splitlines()
    graph = next(line for line in lines if line.startswith("embed-to-head"))
    total = next(line for line in lines if line.startswith("total"))
    assert float(graph.split()[4]) > 0.5 * float(total.split()[1])


def test_generate_greedy(artifacts):
    argv = ["generate", str(artifacts["fused"]), "--prompt", "def fib", "--chat", "--max-tokens", "8", "--temperature", "0", "--stats"]
    first, second = tandem(*argv), tandem(*argv)  # each its own process: generate shares one thread pool process-wide
    assert first.stdout == second.stdout
    assert "prompt tokens" in first.stderr and "tok/s" in first.stderr
    assert "[graphs on CPU x1; time CPU " in first.stderr  # the fused artifact: one graph
    assert "0.0 cross-EP hops a step, 0.0 kB a token between devices]" in first.stderr


def test_errors_are_one_line(tmp_path):
    cases = [
        ["info", str(tmp_path / "nothing")],
        ["compile", str(tmp_path / "missing.yaml")],
        ["generate", str(tmp_path), "--prompt", "x"],
    ]
    for argv in cases:
        proc = subprocess.run([sys.executable, "-m", "compiler.cli", *argv], capture_output=True, text=True)
        assert proc.returncode == 2, proc.stderr
        assert proc.stderr.startswith("error: ") and "Traceback" not in proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1


def test_chat_streams_and_keeps_history(artifacts):
    proc = subprocess.run(
        [sys.executable, "-m", "compiler.cli", "chat", str(artifacts["fused"]), "--max-tokens", "6", "--temperature", "0"],
        input="hello\nSELECT id\n\n", capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("> ") == 3  # two turns answered, then the empty line ends the chat


def test_runtime_imports_no_torch(artifacts):
    code = (
        "import sys; from runtime.generate import Generator; g = Generator.load(sys.argv[1]); "
        "list(g.stream(g.chat_prompt([{'role': 'user', 'content': 'hi'}]), 4, g.sampling(temperature=0))); "
        "bad = [m for m in ('torch', 'transformers', 'compiler', 'onnx') if m in sys.modules]; "
        "assert not bad, bad"
    )
    proc = subprocess.run([sys.executable, "-c", code, str(artifacts["fused"])], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_max_context_beyond_the_artifacts_is_one_line(artifacts):
    argv = ["generate", str(artifacts["fused"]), "--prompt", "x", "--max-context", "1000"]
    proc = subprocess.run([sys.executable, "-m", "compiler.cli", *argv], capture_output=True, text=True)
    assert proc.returncode == 2 and proc.stderr.strip().endswith("error: KV cache capacity 1000: must be 1 to the artifact's 96")


def test_layout_flag_compiles_the_fused_recipe_alternating(artifacts, checkpoint, tmp_path):
    """--layout alternating: the fused recipe's blocks as graphs of their own, the same greedy reply."""
    import yaml

    from runtime.manifest import load_manifest

    recipe = tmp_path / "fused.yaml"
    recipe.write_text(yaml.safe_dump(load_manifest(artifacts["fused"]).recipe))
    out = tmp_path / "alternating"
    tandem("compile", str(recipe), "--model", str(checkpoint), "-o", str(out), "--layout", "alternating", "--quiet")
    fused, alternating = load_manifest(artifacts["fused"]), load_manifest(out)
    assert len(fused.graphs) == 1 and [g.blocks for g in alternating.graphs][:3] == [["embed"], ["attention.0"], ["ffn.0"]]
    argv = ["--prompt", "def fib", "--max-tokens", "8", "--temperature", "0"]
    assert tandem("generate", str(out), *argv).stdout == tandem("generate", str(artifacts["fused"]), *argv).stdout
