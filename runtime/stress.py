"""`tandem stress`: the server under load, a long soak and cut streams, each judged by what it must not lose.

- load: `clients` concurrent clients each send `requests` mixed chat requests (streamed or not, short or long
  prompts, some with stop strings), all greedy. Every reply must equal the same request's reply when run alone;
  a reply that differs must part from it at a near-tie of the two top tokens (batched and single-row matrix
  kernels sum in different orders), never elsewhere.
- soak: `requests` short requests; the server's RSS, open file descriptors and threads after a warm-up
  tenth against the end.
- disconnects: streams cut at random points after 1..N events; every request ends (as an abort, or finished if
  it completed before the server saw the cut), every slot is freed, and the next requests are served.
"""
from __future__ import annotations

import asyncio
import json
import os
import random
import socket
import time
from pathlib import Path
from typing import Any

import numpy as np

from runtime.server_process import ServerProcess

TOPICS = ["fibonacci", "binary search", "a stack", "JSON parsing", "SQL joins", "regular expressions",
          "unit tests", "HTTP caching", "hash maps", "recursion", "sorting", "Docker"]
NEAR_TIE = 0.5  # nats between the reference's top two tokens where batched numerics may pick the other one
KEY = "stress"


def mixed_requests(count: int, long_chars: int) -> list[dict[str, Any]]:
    """`count` distinct greedy chat requests: streamed or not, short or long prompts, some with stop strings."""
    out = []
    for i in range(count):
        topic = TOPICS[i % len(TOPICS)]
        prompt = f"Explain {topic} briefly."
        if i % 2:
            prompt = f"Here are some notes on {topic}: " + " ".join(TOPICS * (long_chars // 40 + 1))[:long_chars] + f"\nNow explain {topic}."
        request = {"messages": [{"role": "user", "content": prompt}], "max_tokens": 16 if i % 3 else 40,
                   "temperature": 0, "stream": i % 4 < 2, "logprobs": True, "top_logprobs": 2}
        if i % 3 == 0:
            request["stop"] = ["\n\n", "."]
        out.append(request)
    return out


async def _chat(client, model: str, request: dict) -> dict[str, Any]:
    """Send one request; its text, token logprobs, TTFT (streamed) and latency."""
    start = time.perf_counter()
    ttft, text, tokens = None, "", []
    if request["stream"]:
        stream = await client.chat.completions.create(model=model, **request)
        async for chunk in stream:
            if not chunk.choices:
                continue
            choice = chunk.choices[0]
            if choice.delta.content and ttft is None:
                ttft = time.perf_counter() - start
            text += choice.delta.content or ""
            tokens += choice.logprobs.content if choice.logprobs else []
    else:
        response = await client.chat.completions.create(model=model, **request)
        choice = response.choices[0]
        text = choice.message.content or ""
        tokens = choice.logprobs.content if choice.logprobs else []
    top = [[(t.token, t.logprob) for t in lp.top_logprobs] for lp in tokens]
    return {"text": text, "tokens": [lp.token for lp in tokens], "top": top, "ttft_s": ttft,
            "seconds": time.perf_counter() - start}


def divergence(reference: dict, got: dict) -> float | None:
    """None when the replies are equal; else the reference's top-2 margin where they part (inf: not at a token)."""
    if got["text"] == reference["text"]:
        return None
    for i, (a, b) in enumerate(zip(reference["tokens"], got["tokens"])):
        if a != b:
            top = reference["top"][i]
            return top[0][1] - top[1][1] if len(top) > 1 else float("inf")
    return float("inf")


def _percentiles(values: list[float]) -> dict[str, float]:
    if not values:
        return {}
    return {"p50": float(np.percentile(values, 50)), "p99": float(np.percentile(values, 99)), "max": float(max(values))}


def _client(server: ServerProcess):
    import openai

    return openai.AsyncOpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=3600)


def load(server: ServerProcess, model: str, clients: int, requests: int, long_chars: int, seed: int = 0) -> dict:
    pool = mixed_requests(24, long_chars)
    rng = random.Random(seed)
    plan = [[rng.randrange(len(pool)) for _ in range(requests)] for _ in range(clients)]

    async def run() -> tuple[list[dict], list[list[dict | Exception]], float]:
        async with _client(server) as client:
            alone = [await _chat(client, model, r) for r in pool]

            async def one_client(indices: list[int]) -> list[dict | Exception]:
                results: list[dict | Exception] = []
                for i in indices:
                    try:
                        results.append(await _chat(client, model, pool[i]))
                    except Exception as e:  # noqa: BLE001 - counted as a failure and reported
                        results.append(e)
                return results

            start = time.perf_counter()
            together = await asyncio.gather(*(one_client(p) for p in plan))
            return alone, list(together), time.perf_counter() - start

    alone, together, seconds = asyncio.run(run())
    failures, margins, latencies, ttfts, exact = [], [], [], [], 0
    for indices, results in zip(plan, together):
        for i, result in zip(indices, results):
            if isinstance(result, Exception):
                failures.append(f"{type(result).__name__}: {result}")
                continue
            latencies.append(result["seconds"])
            if result["ttft_s"] is not None:
                ttfts.append(result["ttft_s"])
            margin = divergence(alone[i], result)
            exact += margin is None
            if margin is not None:
                margins.append(margin)
    return {
        "clients": clients, "requests": clients * requests, "seconds": seconds, "failures": len(failures),
        "failure_examples": failures[:5], "equal_to_sequential": exact,
        "differ_at_near_tie": sum(m < NEAR_TIE for m in margins), "differ_elsewhere": sum(m >= NEAR_TIE for m in margins),
        "largest_margin_where_differing": max(margins, default=None), "latency_s": _percentiles(latencies),
        "ttft_s": _percentiles(ttfts),
    }


def process_state(pid: int) -> dict[str, int]:
    """RSS (bytes), open file descriptors and threads of a process, from /proc."""
    status = Path(f"/proc/{pid}/status").read_text()
    fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
    return {"rss_bytes": int(fields["VmRSS"].split()[0]) * 1024, "fds": len(os.listdir(f"/proc/{pid}/fd")),
            "threads": int(fields["Threads"])}


def soak(server: ServerProcess, model: str, requests: int, concurrency: int = 4) -> dict:
    pool = mixed_requests(12, 200)
    for r in pool:
        r["max_tokens"] = 8

    async def batch(start: int, stop: int) -> int:
        async with _client(server) as client:
            queue = list(range(start, stop))
            failures = 0

            async def worker() -> None:
                nonlocal failures
                while queue:
                    i = queue.pop()
                    try:
                        await _chat(client, model, pool[i % len(pool)])
                    except Exception:  # noqa: BLE001 - counted
                        failures += 1

            await asyncio.gather(*(worker() for _ in range(concurrency)))
            return failures

    def settled() -> dict[str, int]:
        time.sleep(0.5)  # closed connections leave the server's event loop
        return process_state(server.proc.pid)

    warm = max(1, requests // 10)
    start = time.perf_counter()
    failures = asyncio.run(batch(0, warm))
    after_warmup = settled()
    failures += asyncio.run(batch(warm, requests))
    end = settled()
    growth = end["rss_bytes"] / after_warmup["rss_bytes"] - 1
    return {"requests": requests, "failures": failures, "seconds": time.perf_counter() - start,
            "after_warmup": after_warmup, "end": end, "rss_growth": growth,
            "fds_leaked": end["fds"] - after_warmup["fds"], "threads_leaked": end["threads"] - after_warmup["threads"]}


def _cut_stream(server: ServerProcess, model: str, events: int) -> tuple[int, bool]:
    """Open a long streamed request, read `events` SSE events, then drop the connection.

    Returns the events read and whether the reply had already finished (then it is not an abort)."""
    body = json.dumps({"model": model, "messages": [{"role": "user", "content": "Count from one to one thousand."}],
                       "temperature": 0, "stream": True})
    head = (f"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n")
    with socket.create_connection(("127.0.0.1", server.port), timeout=120) as sock:
        sock.sendall(head.encode() + body.encode())
        received = b""
        while received.count(b"data: ") < events:
            part = sock.recv(4096)
            if not part:
                break
            received += part
    if not received.startswith(b"HTTP/1.1 200"):
        raise RuntimeError(f"stream refused: {received[:300]!r}")
    return received.count(b"data: "), b"[DONE]" in received


def disconnects(server: ServerProcess, model: str, count: int, max_events: int = 20, seed: int = 0) -> dict:
    """`count` streams cut after 1..max_events events, four at a time; then the slots must all be free."""
    from concurrent.futures import ThreadPoolExecutor

    ended = "tandem:request_success_total"
    aborts = f'{ended}{{model_name="{model}",finished_reason="abort"}}'
    before = server.metric(ended), server.metric(aborts)
    rng = random.Random(seed)
    cuts = [rng.randint(1, max_events) for _ in range(count)]
    start = time.perf_counter()
    with ThreadPoolExecutor(4) as pool:
        read, finished = zip(*pool.map(lambda n: _cut_stream(server, model, n), cuts))
    deadline = time.monotonic() + 60
    while (server.metric("tandem:num_requests_running") or server.metric("tandem:num_requests_waiting")) \
            and time.monotonic() < deadline:
        time.sleep(0.05)
    running = server.metric("tandem:num_requests_running") + server.metric("tandem:num_requests_waiting")
    counted = server.metric(ended) - before[0], server.metric(aborts) - before[1]
    followup = asyncio.run(_followup(server, model))
    return {"cut": count - sum(finished), "finished_before_cut": sum(finished), "events_read": _percentiles([float(n) for n in read]), "seconds": time.perf_counter() - start,
            "still_running": running, "ended": counted[0], "aborts": counted[1],
            "followup_served": followup}


async def _followup(server: ServerProcess, model: str, count: int = 8) -> int:
    """How many of `count` concurrent short requests are served after the cuts."""
    request = {"messages": [{"role": "user", "content": "Say hi."}], "max_tokens": 4, "temperature": 0, "stream": False}
    async with _client(server) as client:
        results = await asyncio.gather(*(_chat(client, model, request) for _ in range(count)), return_exceptions=True)
    return sum(not isinstance(r, Exception) for r in results)


def stress(
    artifact: Path, clients: int, requests: int, soak_requests: int, cuts: int, threads: int = 0,
    out: Path | None = None,
) -> dict:
    """Run load, soak and disconnects against one `tandem serve` process; a count of 0 skips that part."""
    from runtime.manifest import load_manifest

    manifest = load_manifest(artifact, check_files=False)
    model = (manifest.served_names or [manifest.name])[0]
    server = ServerProcess(artifact, "--api-key", KEY, "--threads", str(threads), "--max-num-seqs", "8")
    report: dict[str, Any] = {"artifact": str(artifact), "model": model, "date": time.strftime("%Y-%m-%d")}
    try:
        if clients and requests:
            report["load"] = load(server, model, clients, requests, long_chars=min(1024, manifest.kv_cache.capacity // 2))
        if soak_requests:
            report["soak"] = soak(server, model, soak_requests)
        if cuts:
            report["disconnects"] = disconnects(server, model, cuts)
        report["server_alive"] = server.proc.poll() is None and server.request("GET", "/health")[0] == 200
    finally:
        server.stop()
    if out:
        out.write_text(json.dumps(report, indent=2) + "\n")
    return report


def verdict(report: dict) -> list[str]:
    """What the report shows went wrong (empty when it passed)."""
    problems = []
    if not report.get("server_alive"):
        problems.append("the server did not stay up")
    if load := report.get("load"):
        if load["failures"]:
            problems.append(f"load: {load['failures']} failed requests, e.g. {load['failure_examples'][0]}")
        if load["differ_elsewhere"]:
            problems.append(f"load: {load['differ_elsewhere']} replies differ from the sequential run away from a near-tie")
    if soak := report.get("soak"):
        if soak["failures"]:
            problems.append(f"soak: {soak['failures']} failed requests")
        if soak["rss_growth"] >= 0.05 or soak["fds_leaked"] > 0 or soak["threads_leaked"] > 0:
            problems.append(f"soak: RSS grew {soak['rss_growth']:.1%}, {soak['fds_leaked']} fds and "
                            f"{soak['threads_leaked']} threads leaked")
    cut = report.get("disconnects")
    if cut and (cut["still_running"] or cut["ended"] != cut["cut"] + cut["finished_before_cut"] or cut["followup_served"] < 8):
        problems.append(f"disconnects: {cut['still_running']:.0f} still running, {cut['ended']:.0f} of "
                            f"{cut['cut'] + cut['finished_before_cut']} ended, {cut['followup_served']} of 8 follow-ups served")
    return problems


def markdown(report: dict) -> str:
    lines = [f"# tandem stress: {report['model']} ({report['date']})", ""]
    if load := report.get("load"):
        lines += [
            (f"- load: {load['clients']} clients x {load['requests'] // load['clients']} mixed requests in "
             f"{load['seconds']:.1f} s: {load['failures']} failures; {load['equal_to_sequential']} equal to the "
             f"sequential run, {load['differ_at_near_tie']} part at a near-tie (< {NEAR_TIE} nats), "
             f"{load['differ_elsewhere']} elsewhere"),
            (f"  - latency p50 {load['latency_s']['p50']:.3f} s, p99 {load['latency_s']['p99']:.3f} s; "
             f"TTFT (streamed) p50 {load['ttft_s'].get('p50', 0):.3f} s, p99 {load['ttft_s'].get('p99', 0):.3f} s"),
        ]
    if soak := report.get("soak"):
        lines.append(
            f"- soak: {soak['requests']} requests in {soak['seconds']:.1f} s, {soak['failures']} failures; RSS "
            f"{soak['after_warmup']['rss_bytes'] / 2**20:.0f} -> {soak['end']['rss_bytes'] / 2**20:.0f} MiB "
            f"({soak['rss_growth']:+.2%}); fds {soak['after_warmup']['fds']} -> {soak['end']['fds']}; "
            f"threads {soak['after_warmup']['threads']} -> {soak['end']['threads']}"
        )
    if cut := report.get("disconnects"):
        lines.append(
            f"- disconnects: {cut['cut']} streams cut after 1-{cut['events_read'].get('max', 0):.0f} events: "
            f"{cut['ended']:.0f} ended ({cut['aborts']:.0f} as aborts, {cut['ended'] - cut['aborts']:.0f} finished before "
            "the server saw the cut), "
            f"{cut['still_running']:.0f} still running, "
            f"{cut['followup_served']} of 8 follow-up requests served"
        )
    problems = verdict(report)
    lines += ["", "PASS" if not problems else "FAIL:\n" + "\n".join(f"- {p}" for p in problems)]
    return "\n".join(lines)
