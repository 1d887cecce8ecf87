"""`tandem bench-serve`: the server under concurrent streaming clients, against one client at a time.

Starts `tandem serve` on a free port and sends the same greedy chat requests twice: one after another, then
`clients` at once through the official `openai` async client. Reports aggregate completion tokens/s, TTFT and
inter-token latency percentiles, how many concurrent outputs differ from the sequential ones, and then, from the
engine alone, one decode step's time by batch size (the ceiling that batching can reach on this machine).
"""
from __future__ import annotations

import asyncio
import json
import platform
import time
from datetime import date
from pathlib import Path

import numpy as np

from runtime.errors import TandemError
from runtime.server_process import ServerProcess
from runtime.tokenizer import Tokenizer

PROMPTS = [
    "Write a Python function to calculate fibonacci",
    "Write a SQL query that returns the ten most recent orders.",
    "What is the difference between a list and a tuple in Python?",
    "Write a bash one-liner that counts lines in all .py files.",
    "Explain what a Python decorator is, with an example.",
    "Write a JavaScript function that debounces another function.",
    "Write a C function that reverses a string in place.",
    "How do I read a CSV file with pandas and drop empty rows?",
    "Write a Rust function that returns the largest element of a slice.",
    "Write a Go HTTP handler that returns JSON.",
    "Write a regular expression that matches an IPv4 address.",
    "Write a Python class for a stack with push, pop and peek.",
    "Explain big-O notation in three sentences.",
    "Write a Dockerfile for a small Flask app.",
    "Write a unit test with pytest for a function add(a, b).",
    "What does `git rebase -i` do?",
]


async def _one(client, model: str, prompt: str, max_tokens: int) -> dict:
    start = time.perf_counter()
    stamps, text = [], ""
    stream = await client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": prompt}], max_tokens=max_tokens, temperature=0,
        stream=True, stream_options={"include_usage": True},
    )
    usage = None
    async for chunk in stream:
        if chunk.usage:
            usage = chunk.usage
        if chunk.choices and chunk.choices[0].delta.content:
            stamps.append(time.perf_counter())
            text += chunk.choices[0].delta.content
    gaps = np.diff(stamps) if len(stamps) > 1 else np.array([])
    return {"text": text, "tokens": usage.completion_tokens, "ttft_s": stamps[0] - start if stamps else None,
            "gaps_s": gaps.tolist(), "seconds": time.perf_counter() - start}


async def _phase(url: str, model: str, prompts: list[str], max_tokens: int, concurrent: bool) -> tuple[list[dict], float]:
    import openai

    async with openai.AsyncOpenAI(base_url=url + "/v1", api_key="bench", max_retries=0, timeout=3600) as client:
        await _one(client, model, "Hi", 4)  # warm-up
        start = time.perf_counter()
        if concurrent:
            results = list(await asyncio.gather(*(_one(client, model, p, max_tokens) for p in prompts)))
        else:
            results = [await _one(client, model, p, max_tokens) for p in prompts]
        return results, time.perf_counter() - start


def decode_scaling(artifact: Path, clients: int, threads: int, context: int = 64, steps: int = 10) -> list[dict]:
    """The engine alone: one batched decode step's time for 1, 2, 4 .. `clients` sequences of `context` tokens,
    and how far batched logits drift from batch-1 logits of the same sequence (float summation order)."""
    from runtime.engine import Engine

    engine = Engine(artifact, slots=clients, threads=threads)
    vocab = engine.manifest.model.vocab_size
    prompt = [(1000 + 7 * i) % vocab for i in range(context)]
    rows = []
    for batch in sorted({1, *[2**i for i in range(1, clients.bit_length())], clients}):
        slots = list(range(batch))
        for slot in slots:
            engine.reset(slot)
            engine.forward(slot, prompt)
        first = engine.extend(slots, [[42]] * batch)  # also the warm-up
        start = time.perf_counter()
        for _ in range(steps):
            engine.extend(slots, [[42]] * batch)
        seconds = (time.perf_counter() - start) / steps
        if batch == 1:
            alone = first[0]
        rows.append({"batch": batch, "ms_per_step": seconds * 1000, "tokens_per_s": batch / seconds,
                     "max_logit_diff_vs_batch_1": float(np.abs(first - alone).max())})
    return rows


def _summary(results: list[dict], seconds: float) -> dict:
    tokens = sum(r["tokens"] for r in results)
    ttft = [r["ttft_s"] for r in results if r["ttft_s"] is not None]
    gaps = [g for r in results for g in r["gaps_s"]]
    pct = lambda xs, q: float(np.percentile(xs, q)) * 1000 if xs else None
    return {
        "requests": len(results), "completion_tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds,
        "ttft_ms_p50": pct(ttft, 50), "ttft_ms_p99": pct(ttft, 99), "itl_ms_p50": pct(gaps, 50), "itl_ms_p99": pct(gaps, 99),
    }


NEEDLE = "Remember this: the secret word is tangerine.\n\n"
QUESTION = "\n\nWhat is the secret word mentioned at the very beginning? Answer with one word."


def long_prompt(tokenizer: Tokenizer, tokens: int) -> list[int]:
    """A chat prompt of exactly `tokens` tokens: a fact, then Python's own documentation as filler, then a
    question about the fact (so the reply shows whether the start of the context is still used)."""
    from pydoc_data.topics import topics

    def chat(text: str) -> list[int]:
        return tokenizer.encode(tokenizer.apply_chat_template([{"role": "user", "content": text}]))

    overhead = len(chat(NEEDLE + QUESTION))
    filler = tokenizer.encode("\n\n".join(text for _, text in sorted(topics.items())))
    needed = tokens - overhead
    filler = filler * (max(needed, 0) // len(filler) + 1)
    while True:  # re-tokenizing at the seams may add a token or two: drop filler until it fits
        ids = chat(NEEDLE + tokenizer.decode(filler[: max(needed, 0)]) + QUESTION)
        if len(ids) <= tokens or needed <= 0:
            return ids
        needed -= len(ids) - tokens


def prompt_scaling(server: ServerProcess, model: str, tokenizer: Tokenizer, lengths: list[int], new_tokens: int = 16) -> list[dict]:
    """TTFT and decode speed through the server by prompt length, one request at a time."""
    import openai

    client = openai.OpenAI(base_url=server.url + "/v1", api_key="bench", max_retries=0, timeout=7200)
    rows = []
    for length in lengths:
        ids = long_prompt(tokenizer, length)
        start = time.perf_counter()
        stamps, text = [], ""
        for chunk in client.completions.create(model=model, prompt=ids, max_tokens=new_tokens, temperature=0, stream=True):
            if chunk.choices and chunk.choices[0].text:
                stamps.append(time.perf_counter())
                text += chunk.choices[0].text
        ttft = stamps[0] - start if stamps else float("nan")
        decode = (len(stamps) - 1) / (stamps[-1] - stamps[0]) if len(stamps) > 1 else float("nan")
        rows.append({"prompt_tokens": len(ids), "ttft_s": ttft, "prefill_tokens_per_s": len(ids) / ttft,
                     "decode_tokens_per_s": decode, "reply": text})
    return rows


def bench_serve(
    artifact: Path, clients: int, max_tokens: int, threads: int, out: Path | None, prompt_lengths: list[int] = (),
) -> dict:
    if not 0 <= clients <= len(PROMPTS):
        raise TandemError(f"--clients must be between 0 and {len(PROMPTS)}")
    try:
        import openai  # noqa: F401
    except ImportError:
        raise TandemError("bench-serve needs the openai client: pip install 'tandem[dev]'") from None
    report: dict = {
        "date": date.today().isoformat(), "machine": f"{_cpu()}, {_cores()} cores",
        "artifact": str(artifact), "clients": clients, "max_tokens": max_tokens, "threads": threads,
    }
    server = ServerProcess(artifact, "--max-num-seqs", str(max(clients, 1)), "--threads", str(threads))
    try:
        model = json.loads(server.request("GET", "/v1/models")[2])["data"][0]["id"]
        if clients:
            prompts = PROMPTS[:clients]
            alone, alone_s = asyncio.run(_phase(server.url, model, prompts, max_tokens, concurrent=False))
            together, together_s = asyncio.run(_phase(server.url, model, prompts, max_tokens, concurrent=True))
            report.update(one_at_a_time=_summary(alone, alone_s), concurrent=_summary(together, together_s),
                          outputs_differing=sum(a["text"] != b["text"] for a, b in zip(alone, together)))
            report["speedup"] = report["concurrent"]["tokens_per_s"] / report["one_at_a_time"]["tokens_per_s"]
        if prompt_lengths:
            report["prompt_scaling"] = prompt_scaling(server, model, Tokenizer.from_dir(artifact), list(prompt_lengths))
    finally:
        server.stop()
    if clients:
        report["decode_scaling"] = decode_scaling(artifact, clients, threads)
    if out:
        out.write_text(json.dumps(report, indent=2) + "\n")
    return report


def _cpu() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _cores() -> int:
    import os

    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def markdown(report: dict) -> str:
    rows = []
    if "prompt_scaling" in report:
        rows += ["| prompt tokens | TTFT s | prefill tok/s | decode tok/s | reply |", "|---|---|---|---|---|"]
        rows += [f"| {r['prompt_tokens']} | {r['ttft_s']:.2f} | {r['prefill_tokens_per_s']:.0f} | "
                 f"{r['decode_tokens_per_s']:.1f} | {r['reply'].strip()[:40]!r} |" for r in report["prompt_scaling"]]
        rows.append("")
    if not report["clients"]:
        return "\n".join(rows)
    rows += ["| clients | tokens | seconds | tokens/s | TTFT p50 / p99 ms | ITL p50 / p99 ms |", "|---|---|---|---|---|---|"]
    for label, s in (("1 at a time", report["one_at_a_time"]), (f"{report['clients']} at once", report["concurrent"])):
        rows.append(
            f"| {label} | {s['completion_tokens']} | {s['seconds']:.1f} | {s['tokens_per_s']:.1f} | "
            f"{s['ttft_ms_p50']:.0f} / {s['ttft_ms_p99']:.0f} | {s['itl_ms_p50']:.0f} / {s['itl_ms_p99']:.0f} |"
        )
    rows.append(f"\nspeedup {report['speedup']:.2f}x; concurrent outputs differing from one-at-a-time: "
                f"{report['outputs_differing']} of {report['clients']}\n")
    rows += ["| engine decode batch | ms / step | tokens/s | max logit diff vs batch 1 |", "|---|---|---|---|"]
    rows += [f"| {r['batch']} | {r['ms_per_step']:.1f} | {r['tokens_per_s']:.1f} | {r['max_logit_diff_vs_batch_1']:.2e} |"
             for r in report["decode_scaling"]]
    return "\n".join(rows)
