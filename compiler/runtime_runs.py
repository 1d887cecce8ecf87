"""The artifact's side of verify, run as a service runs it: in a fresh process that imports the runtime only.

verify compares these outputs with the torch reference. Run in the compiler's own process, the engine's memory
came on top of torch's and of what the build had left: on the Ryzen AI 7B that process peaked at 7.56 GiB, this
one peaks at 6.88 GiB (BENCHMARKS.md). `python -m compiler.runtime_runs DIR FOLDER` reads FOLDER/request.json and
writes the results there; the parent maps them back.
"""
from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np

from compiler.progress import progress
from runtime import manifest as names
from runtime.engine import Engine
from runtime.errors import TandemError
from runtime.manifest import load_manifest

Run = tuple[str, list[int], list[int], np.ndarray]  # prompt, its ids, our greedy tokens, our logits at each [tokens, vocab]


def runtime_peak_rss(directory: Path) -> int:
    """Peak RSS of a fresh runtime process that loads the artifact and generates 16 tokens after a 256-token prompt."""
    code = (
        "import sys; from runtime.generate import Generator; g = Generator.load(sys.argv[1]); "
        "ids = (g.tokenizer.encode('The quick brown fox jumps over the lazy dog. ') * 256)[: min(256, g.engine.capacity // 2)]; "
        "list(g.stream(ids, 16, g.sampling(temperature=0))); "
        "print(open('/proc/self/status').read().split('VmHWM:')[1].split()[0])"
    )
    return int(_fresh_process(["-c", code, str(directory)]).split()[-1]) * 1024


def artifact_runs(
    directory: Path, prompts: list[tuple[str, list[int]]], texts: list[list[int]], new_tokens: int, folder: Path,
    show_progress: bool = False,
) -> tuple[list[Run], list[list[Path]]]:
    """Our greedy continuation of each prompt with its logits at every step, and our logits at every position of
    each text (a file per prefill chunk, in order), from one fresh runtime process; arrays are mapped, not read."""
    request = {"prompts": prompts, "texts": texts, "new_tokens": new_tokens, "show_progress": show_progress}
    (folder / "request.json").write_text(json.dumps(request))
    _fresh_process(["-m", __name__, str(directory), str(folder)], show_progress)
    result = json.loads((folder / "result.json").read_text())
    runs = [(prompt, ids, tokens, np.load(folder / f"run.{i}.npy", mmap_mode="r"))
            for i, ((prompt, ids), tokens) in enumerate(zip(prompts, result["tokens"]))]
    return runs, [[folder / f for f in files] for files in result["windows"]]


def _fresh_process(args: list[str], show_progress: bool = False) -> str:
    """stdout of `python ARGS`; a failure raises the child's last line of stderr (shown as it came if show_progress)."""
    proc = subprocess.run([sys.executable, *args], stdout=subprocess.PIPE, stderr=None if show_progress else subprocess.PIPE, text=True)
    if proc.returncode:
        last = (proc.stderr or "").strip().splitlines()[-1:]
        raise TandemError(f"the artifact's runtime process failed (exit {proc.returncode}){': ' + last[0] if last else ''}")
    return proc.stdout


def _run(directory: Path, folder: Path) -> None:
    """The child's side of artifact_runs."""
    request = json.loads((folder / "request.json").read_text())
    prompts, texts, new_tokens, show = request["prompts"], request["texts"], request["new_tokens"], request["show_progress"]
    manifest = load_manifest(directory)
    static = any(g.dialect == "static" for g in manifest.graphs)  # their cache is the compiled one
    longest = max([len(t) for t in texts] + [len(ids) + new_tokens for _, ids in prompts])
    # the KV cache holds only what verify runs
    engine = Engine(directory, capacity=None if static else min(longest, manifest.kv_cache.capacity))
    generation = json.loads((directory / names.GENERATION_CONFIG).read_text())
    eos = set(np.atleast_1d(generation.get("eos_token_id", [])).tolist())
    tokens = []
    for i, (_, ids) in enumerate(progress(prompts, show, "verifying chain")):
        engine.reset(0)
        ours, logits = _greedy(lambda t: engine.forward(0, t), ids, new_tokens, eos)
        tokens.append(ours)
        np.save(folder / f"run.{i}.npy", np.stack(logits))
    windows = [_spilled_logits(engine, t, folder, f"window.{i}") for i, t in enumerate(progress(texts, show, "evaluating"))]
    (folder / "result.json").write_text(json.dumps({"tokens": tokens, "windows": windows}))


def _spilled_logits(engine: Engine, tokens: list[int], folder: Path, stem: str) -> list[str]:
    """Logits at every position of a window from a fresh sequence in slot 0, saved a prefill chunk at a time
    (a 152K vocabulary makes a 512-token window's 311 MB): memory holds one chunk's."""
    engine.reset(0)
    chunk, files = engine.manifest.prefill_chunk, []
    for start in range(0, len(tokens), chunk):
        files.append(f"{stem}.{len(files)}.npy")
        np.save(folder / files[-1], engine.forward(0, tokens[start : start + chunk], all_logits=True))
    return files


def _greedy(step: Callable[[list[int]], np.ndarray], ids: list[int], new_tokens: int, eos: set[int]) -> tuple[list[int], list[np.ndarray]]:
    """Greedy tokens after ids, and the logits ([vocab]) each was picked from."""
    tokens: list[int] = []
    logits = [step(ids)]
    while len(tokens) < new_tokens:
        token = int(np.argmax(logits[-1]))
        tokens.append(token)
        if token in eos or len(tokens) == new_tokens:
            break
        logits.append(step([token]))
    return tokens, logits


if __name__ == "__main__":
    try:
        _run(Path(sys.argv[1]), Path(sys.argv[2]))
    except TandemError as e:
        sys.exit(f"error: {e}")
