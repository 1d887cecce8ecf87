"""`tandem bench`: TTFT, prefill and decode speed and memory of an artifact, and of peers on the same weights.

Every system runs in its own process (so memory is its own), one after another, on the same prompt token ids:
greedy, batch 1, the median of `repeats` runs per prompt length. TTFT is prompt in -> first token chosen; decode
tokens/s is over the `new_tokens` after it, so "decode at 1K" is the row whose prompt had 1024 tokens.
Peers are optional: `tandem:DIR` (another artifact: a layout or recipe against this one), `genai:DIR` (an ONNX
Runtime GenAI model folder, e.g. its builder's output),
`llamacpp:FILE.gguf` (llama.cpp through llama-cpp-python; `llamacpp:default` is the default model's own GGUF),
`transformers:CHECKPOINT[:DTYPE]` (eager attention, on CUDA when torch sees a GPU) and `optimum:DIR` (optimum's
ORTModelForCausalLM, from its export or a checkpoint); a missing package skips it. A peer whose package cannot share
this environment (optimum-onnx pins an older transformers) runs under another environment's interpreter.
"""
from __future__ import annotations

import functools
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from datetime import date
from pathlib import Path

import numpy as np

from runtime.errors import TandemError
from runtime.manifest import load_manifest
from runtime.roofline import bytes_per_token, memory_bandwidth

CONTEXT = 4096  # the least KV cache a system is given (more where the longest prompt and its reply need it)
TEXT = "The quick brown fox jumps over the lazy dog while the compiler schedules attention and feed-forward blocks. "

EXTRA: dict[str, Callable[[], object]] = {}  # more figures a system reports after its runs

# a system: prefill(ids) -> first token; step(token) -> next token; reset()
Runner = tuple[Callable[[list[int]], int], Callable[[int], int], Callable[[], None]]


@functools.cache
def _text_ids(tokenizer_dir: Path) -> tuple[int, ...]:
    """TEXT's ids, the tokenizer loaded once a process, as a server loads it (each load adds to the peak RSS measured)."""
    from runtime.tokenizer import Tokenizer

    return tuple(Tokenizer.from_dir(tokenizer_dir).encode(TEXT))


def prompt_ids(tokenizer_dir: Path, length: int) -> list[int]:
    ids = list(_text_ids(tokenizer_dir))
    return (ids * (length // len(ids) + 1))[:length]


def _ours(directory: str, threads: int, context: int) -> tuple[Runner, str]:
    from runtime.engine import Engine
    from runtime.providers import share_threads

    share_threads(threads)  # this process makes no other sessions
    engine = Engine(directory, slots=1, threads=threads)  # its KV cache: the artifact's max_context
    providers = sorted({p.resolved for p in engine.placements})
    EXTRA["time_by_provider_s"] = engine.time_share  # read when the runs are done
    EXTRA["time_by_graph_kind_s"] = lambda: _by_kind(engine)
    EXTRA["traffic"] = engine.traffic_report
    return (
        lambda ids: int(np.argmax(engine.forward(0, ids))),
        lambda token: int(np.argmax(engine.forward(0, [token]))),
        lambda: engine.reset(0),
    ), f"{Path(directory).name} on {'+'.join(providers)}"  # the folder: two artifacts of one recipe side by side


def _by_kind(engine) -> dict[str, float]:
    """Seconds in graphs by what they hold: attention, ffn, embed, head, or the kinds a linked graph joins."""
    share: dict[str, float] = {}
    for graph in engine.runners:
        kind = "+".join(sorted({block.split(".")[0] for block in graph.spec.blocks}))
        share[kind] = share.get(kind, 0.0) + graph.seconds
    return share


def _genai(directory: str, threads: int, context: int) -> tuple[Runner, str]:
    import onnxruntime_genai as og

    config = og.Config(directory)
    if threads:  # its builder leaves the thread count to ORT, which counts the host's cores, not the process's CPUs
        config.overlay(json.dumps({"model": {"decoder": {"session_options": {"intra_op_num_threads": threads}}}}))
    model = og.Model(config)
    state: dict = {}

    def next_token() -> int:
        state["gen"].generate_next_token()
        return int(state["gen"].get_next_tokens()[0])

    def prefill(ids: list[int]) -> int:
        params = og.GeneratorParams(model)
        params.set_search_options(max_length=context, do_sample=False)  # its KV cache: `context` positions, as ours
        state["gen"] = og.Generator(model, params)
        state["gen"].append_tokens(np.array([ids], dtype=np.int32))
        return next_token()

    # the folder too: two builds (its defaults, prune_lm_head) side by side
    return (prefill, lambda token: next_token(), state.clear), f"{Path(directory).name}, onnxruntime-genai {og.__version__}"


def _llamacpp(path: str, threads: int, context: int) -> tuple[Runner, str]:
    """llama.cpp's own greedy choice: the argmax of the last position's logits, as for every system here."""
    import llama_cpp

    if not path.endswith(".gguf"):  # a packaged model's name, as `tandem compile --model` takes it
        from compiler.packaged_models import DEFAULT, packaged_model_path

        path = str(packaged_model_path(DEFAULT if path == "default" else path))
    threads = threads or os.cpu_count() or 1
    model = llama_cpp.Llama(model_path=path, n_ctx=context, n_batch=512, n_threads=threads, n_threads_batch=threads,
                            verbose=False)
    vocab = model.n_vocab()

    def run(ids: list[int]) -> int:
        model.eval(ids)  # appends to its KV cache; reset() rewinds it
        return int(np.argmax(np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(model.ctx, -1), shape=(vocab,))))

    return (run, lambda token: run([token]), model.reset), f"llama.cpp {llama_cpp.__version__}"


def _transformers(spec: str, threads: int, context: int) -> tuple[Runner, str]:
    import torch
    from transformers import AutoModelForCausalLM

    checkpoint, _, dtype = spec.partition(":")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if threads:
        torch.set_num_threads(threads)
    model = AutoModelForCausalLM.from_pretrained(
        checkpoint, dtype=getattr(torch, dtype or "bfloat16"), attn_implementation="eager", local_files_only=True
    ).to(device).eval()
    state: dict = {}

    @torch.no_grad()
    def run(ids: list[int]) -> int:
        out = model(torch.tensor([ids], device=device), past_key_values=state.get("cache"), use_cache=True)
        state["cache"] = out.past_key_values
        return int(out.logits[0, -1].argmax())  # .item() waits for the GPU

    return (lambda ids: run(ids), lambda token: run([token]), state.clear), f"transformers {dtype or 'bfloat16'} {device}"


def _optimum(directory: str, threads: int, context: int) -> tuple[Runner, str]:
    """optimum's ORTModelForCausalLM on the CPU EP: an optimum-exported model folder, or a checkpoint (exported
    to fp32 ONNX at load, outside the timings)."""
    from importlib.metadata import version

    import onnxruntime as ort
    import torch
    from optimum.onnxruntime import ORTModelForCausalLM

    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    exported = any(Path(directory).glob("*.onnx"))
    model = ORTModelForCausalLM.from_pretrained(directory, export=not exported, use_cache=True, local_files_only=True,
                                                session_options=options)
    state: dict = {}

    def run(ids: list[int]) -> int:
        length = state.get("length", 0) + len(ids)
        out = model(input_ids=torch.tensor([ids]), attention_mask=torch.ones(1, length, dtype=torch.long),
                    past_key_values=state.get("past"), use_cache=True)
        state.update(past=out.past_key_values, length=length)
        return int(out.logits[0, -1].argmax())

    return (run, lambda token: run([token]), state.clear), f"optimum-onnx {version('optimum-onnx')} ORTModelForCausalLM"


SYSTEMS = {"tandem": _ours, "genai": _genai, "llamacpp": _llamacpp, "transformers": _transformers, "optimum": _optimum}


def _memory() -> dict[str, int]:
    """This process's peak RSS and, where a GPU is in use, its GPU memory (nvidia-smi's figure for the process)."""
    out = {"peak_rss_bytes": int(Path("/proc/self/status").read_text().split("VmHWM:")[1].split()[0]) * 1024}
    try:
        smi = subprocess.run(["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=30, check=False).stdout
    except (OSError, subprocess.TimeoutExpired):
        return out
    for line in smi.splitlines():
        pid, _, used = line.partition(",")
        if pid.strip() == str(os.getpid()):
            out["gpu_memory_bytes"] = int(used) << 20
    return out


def measure(system: str, target: str, lengths: list[int], new_tokens: int, repeats: int, tokenizer: Path, threads: int) -> dict:
    """One system, in this process: a warm-up, then each prompt length `repeats` times."""
    context = max(CONTEXT, max(lengths) + new_tokens + 1)
    warm = prompt_ids(tokenizer, 16)  # the tokenizer before the system, as a server loads them
    (prefill, step, reset), label = SYSTEMS[system](target, threads, context)
    token = prefill(warm)
    for _ in range(4):
        token = step(token)
    rows, tokens = [], []
    for length in lengths:
        ids = prompt_ids(tokenizer, length)
        ttfts, rates = [], []
        for _ in range(repeats):
            reset()
            start = time.perf_counter()
            token = prefill(ids)
            ttfts.append(time.perf_counter() - start)
            chosen = [token]
            start = time.perf_counter()
            for _ in range(new_tokens):
                token = step(token)
                chosen.append(token)
            rates.append(new_tokens / (time.perf_counter() - start))
            tokens = tokens or chosen  # the first prompt's greedy reply: systems on the same weights should agree
        ttft = statistics.median(ttfts)
        rows.append({"prompt_tokens": length, "ttft_s": ttft, "prefill_tokens_per_s": length / ttft,
                     "decode_tokens_per_s": statistics.median(rates)})
    extra = {name: read() for name, read in EXTRA.items()}
    return {"system": system, "target": target, "label": label, "rows": rows, "tokens": tokens, **_memory(), **extra}


def bench(artifact: Path, peers: list[str], lengths: list[int], new_tokens: int, repeats: int, threads: int,
          pythons: dict[str, str] | None = None) -> dict:
    """Ours and each peer, each in a fresh process (system -> the interpreter it runs under: `pythons`, else this
    one); a peer whose package is missing is skipped with the reason."""
    results, skipped = [], []
    for system, target in [("tandem", str(artifact)), *(p.split(":", 1) for p in peers)]:
        if system not in SYSTEMS:
            raise TandemError(f"--peer {system}: unknown (known: {', '.join(s for s in SYSTEMS if s != 'tandem')})")
        args = [(pythons or {}).get(system, sys.executable), "-m", "runtime.bench", system, target,
                ",".join(map(str, lengths)), str(new_tokens), str(repeats), str(artifact), str(threads)]
        try:
            proc = subprocess.run(args, capture_output=True, text=True, check=False)
        except OSError as err:  # a --peer-python that is not an interpreter
            skipped.append({"system": system, "target": target, "reason": f"{args[0]}: {err.strerror}"})
            continue
        if proc.returncode == 0:
            results.append(json.loads(proc.stdout.strip().splitlines()[-1]))
        else:
            skipped.append({"system": system, "target": target, "reason": (proc.stderr.strip().splitlines() or ["?"])[-1][:300]})
    report = {"date": date.today().isoformat(), "machine": _machine(), "new_tokens": new_tokens, "repeats": repeats,
              "results": results, "skipped": skipped}
    ours = next((r for r in results if r["system"] == "tandem"), None)
    if ours and ours["label"].endswith(" on CPU"):  # the host's memory bounds decode only where the graphs run on the host
        bandwidth, manifest = memory_bandwidth(threads), load_manifest(artifact, check_files=False)
        report["memory_bandwidth_bytes_per_s"] = bandwidth
        for row in ours["rows"]:
            row["decode_bound_tokens_per_s"] = bandwidth / bytes_per_token(manifest, row["prompt_tokens"])
    return report


def _machine() -> str:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    gpu = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True, text=True,
                         check=False).stdout.strip() if _has("nvidia-smi") else ""
    return f"{cpu}, {os.cpu_count()} cores" + (f", {gpu}" if gpu else "")


def _has(program: str) -> bool:
    return any((Path(d) / program).exists() for d in os.environ.get("PATH", "").split(os.pathsep))


def markdown(report: dict) -> str:
    lines = [f"{report['machine']}, {report['date']}; greedy, batch 1, median of {report['repeats']}, "
             f"decode over {report['new_tokens']} tokens", "",
             "| system | prompt tokens | TTFT | prefill tok/s | decode tok/s | decode bound | GPU memory | peak RSS |",
             "|---|---|---|---|---|---|---|---|"]
    for r in report["results"]:
        gpu = f"{r['gpu_memory_bytes'] / 2**30:.2f} GiB" if "gpu_memory_bytes" in r else "—"
        for row in r["rows"]:
            bound = row.get("decode_bound_tokens_per_s")
            of_bound = f"{bound:.1f} ({row['decode_tokens_per_s'] / bound:.0%} reached)" if bound else "—"
            lines.append(f"| {r['system']} ({r['label']}) | {row['prompt_tokens']} | {row['ttft_s'] * 1e3:.1f} ms | "
                         f"{row['prefill_tokens_per_s']:.0f} | {row['decode_tokens_per_s']:.1f} | {of_bound} | {gpu} | "
                         f"{r['peak_rss_bytes'] / 2**20:.0f} MiB |")
    if bandwidth := report.get("memory_bandwidth_bytes_per_s"):
        lines.append(f"\ndecode bound: measured read bandwidth {bandwidth / 1e9:.1f} GB/s over the bytes a step reads "
                     "(weights but the embedding table, and the KV cache at that context)")
    first = next(iter(report["results"]), None)
    ours = first["tokens"] if first and first["system"] == "tandem" else []
    for r in report["results"]:
        name = f"{r['system']} ({r['label']})"
        for key, what in (("time_by_provider_s", "EP"), ("time_by_graph_kind_s", "graph kind")):
            if share := r.get(key):
                total = sum(share.values()) or 1.0
                lines.append(f"\n{name}: time in graphs by {what}: " + ", ".join(f"{p} {t / total:.0%}" for p, t in share.items()))
        if traffic := r.get("traffic"):
            lines.append(f"\n{name}: {traffic['cross_ep_hops_per_step']:.1f} cross-EP hops a step, "
                         f"{traffic['bytes_moved_per_token'] / 1e3:.1f} kB a token moved between devices")
        if r is not first and ours:
            same = sum(a == b for a, b in zip(ours, r["tokens"]))
            lines.append(f"\n{name}: greedy reply to the first prompt equals tandem's in {same} of "
                         f"{len(ours)} tokens")
    lines += [f"\nskipped {s['system']} ({s['target']}): {s['reason']}" for s in report["skipped"]]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":  # one system in this process: python -m runtime.bench SYSTEM TARGET LENGTHS NEW REPEATS TOKENIZER THREADS
    system, target, lengths, new, repeats, tokenizer, threads = sys.argv[1:8]
    print(json.dumps(measure(system, target, [int(x) for x in lengths.split(",")], int(new), int(repeats), Path(tokenizer), int(threads))))
