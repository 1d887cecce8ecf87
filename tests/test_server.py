"""The OpenAI-compatible server as a subprocess, driven by the official `openai` client (fast tier: tiny model)."""
from __future__ import annotations

import asyncio
import json
import socket
import time
from pathlib import Path

import openai
import pytest

from runtime.generate import Generator
from runtime.json_constraint import _feed, _State
from runtime.server_process import ServerProcess

KEY = "test-key"
NAME = "tiny-chat"


@pytest.fixture(scope="module")
def served(chat_artifact):
    """The tiny model with a 512-token context behind `tandem serve --api-key`."""
    server = ServerProcess(chat_artifact, "--api-key", KEY, "--threads", "1")
    yield server, chat_artifact
    server.stop()


@pytest.fixture(scope="module")
def client(served) -> openai.OpenAI:
    return openai.OpenAI(base_url=served[0].url + "/v1", api_key=KEY, max_retries=0)


@pytest.fixture(scope="module")
def reference(served) -> Generator:
    return Generator.load(served[1], threads=1)


def greedy_reference(gen: Generator, messages: list[dict], max_tokens: int) -> str:
    return "".join(c.text for c in gen.stream(gen.chat_prompt(messages), max_tokens, gen.sampling(temperature=0)))


USER = [{"role": "user", "content": "def fibonacci(n):"}]


def test_models_and_health(served, client):
    server, _ = served
    status, _, body = server.request("GET", "/health")
    health = json.loads(body)
    assert status == 200 and health["status"] == "ok"
    assert {p["provider"] for p in health["placement"]} == {"CPU"} and health["placement"][0]["graph"] == "embed"
    assert any(p["passed_over"] for p in health["placement"])  # the tiny recipe's NPU/iGPU chains fell back to the CPU
    assert health["traffic"]["cross_ep_hops_per_step"] == 0
    models = client.models.list().data
    assert [m.id for m in models] == [NAME, "served"]
    assert models[0].model_extra["max_model_len"] == 512


def test_chat_equals_the_generator_and_counts_usage(client, reference):
    r = client.chat.completions.create(model=NAME, messages=USER, max_tokens=12, temperature=0)
    assert r.object == "chat.completion" and r.id.startswith("chatcmpl-")
    choice = r.choices[0]
    assert choice.message.role == "assistant" and choice.finish_reason in ("length", "stop")
    assert choice.message.content == greedy_reference(reference, USER, 12)
    assert r.usage.prompt_tokens == len(reference.chat_prompt(USER))
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    if choice.finish_reason == "length":
        assert r.usage.completion_tokens == 12


def test_stream_is_openai_sse(served, client):
    full = client.chat.completions.create(model=NAME, messages=USER, max_tokens=20, temperature=0)
    chunks = list(client.chat.completions.create(
        model=NAME, messages=USER, max_tokens=20, temperature=0, stream=True, stream_options={"include_usage": True}
    ))
    assert len({c.id for c in chunks}) == 1
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == full.choices[0].message.content
    finals = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finals) == 1 and finals[0].choices[0].finish_reason == full.choices[0].finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == full.usage.completion_tokens
    # on the wire: every event is `data: {json}`, the last one `data: [DONE]`
    status, headers, body = served[0].request(
        "POST", "/v1/completions", {"model": NAME, "prompt": "SELECT", "max_tokens": 3, "stream": True},
        {"Authorization": f"Bearer {KEY}"},
    )
    events = [e for e in body.decode().split("\n\n") if e]
    assert status == 200 and headers["content-type"].startswith("text/event-stream")
    assert events[-1] == "data: [DONE]" and all(e.startswith("data: {") for e in events[:-1])


def test_max_tokens_stop_strings_and_completions(client):
    text = client.completions.create(model=NAME, prompt="SELECT id", max_tokens=16, temperature=0)
    out = text.choices[0].text
    assert text.object == "text_completion" and text.choices[0].finish_reason == "length"
    assert text.usage.completion_tokens == 16
    stop = out[5:8]
    assert stop and out.find(stop) == 5
    for stream in (False, True):
        r = client.completions.create(model=NAME, prompt="SELECT id", max_tokens=16, temperature=0, stop=[stop, "\x00"], stream=stream)
        chunks = list(r) if stream else [r]
        got = "".join(c.choices[0].text for c in chunks if c.choices)
        assert got == out[:5], stream  # the stop string itself is never sent
        assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"


def test_seed_n_and_logprobs(client):
    ask = dict(model=NAME, prompt="def", max_tokens=8, temperature=1.0, n=3, logprobs=2)
    a, b = (client.completions.create(seed=7, **ask) for _ in range(2))
    c = client.completions.create(seed=8, **ask)
    texts = lambda r: [ch.text for ch in sorted(r.choices, key=lambda ch: ch.index)]
    assert texts(a) == texts(b) != texts(c)
    assert len(set(texts(a))) > 1  # each choice draws its own sample
    assert len(client.completions.create(seed=-1, **ask).choices) == 3  # any int64 seed
    lp = a.choices[0].logprobs
    assert 0 < len(lp.tokens) == len(lp.token_logprobs) <= 8 and all(v <= 0 for v in lp.token_logprobs)
    assert all(len(top) <= 2 for top in lp.top_logprobs)
    chat = client.chat.completions.create(model=NAME, messages=USER, max_tokens=4, temperature=0, logprobs=True, top_logprobs=3)
    content = chat.choices[0].logprobs.content
    assert len(content) == 4 and all(len(t.top_logprobs) == 3 for t in content)
    assert all(t.logprob == pytest.approx(t.top_logprobs[0].logprob) for t in content)  # greedy takes the argmax


def test_concurrent_streams_equal_one_at_a_time(served):
    """8 async streaming clients at once (one batched decode step for all) get what each gets alone."""
    prompts = [[{"role": "user", "content": f"request {i}: " + "word " * i}] for i in range(8)]

    async def one(client: openai.AsyncOpenAI, messages: list[dict]) -> str:
        stream = await client.chat.completions.create(model=NAME, messages=messages, max_tokens=24, temperature=0, stream=True)
        return "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])

    async def run() -> tuple[list[str], list[str]]:
        async with openai.AsyncOpenAI(base_url=served[0].url + "/v1", api_key=KEY, max_retries=0) as client:
            alone = [await one(client, p) for p in prompts]
            together = await asyncio.gather(*(one(client, p) for p in prompts))
        return alone, list(together)

    alone, together = asyncio.run(run())
    assert together == alone and len(set(alone)) > 1


def test_json_object_and_forced_tool_call(client):
    r = client.chat.completions.create(
        model=NAME, messages=USER, max_tokens=40, temperature=0, response_format={"type": "json_object"}
    )
    content = r.choices[0].message.content
    state = _State()
    assert _feed(state, content) and content.lstrip().startswith("{")
    if r.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(content), dict) and state.expect == "done"
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]
    r = client.chat.completions.create(
        model=NAME, messages=USER, max_tokens=60, temperature=0, tools=tools,
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
    )
    choice = r.choices[0]
    if choice.finish_reason == "tool_calls":  # the tiny random model may run out of tokens inside the arguments
        call = choice.message.tool_calls[0]
        assert call.function.name == "get_weather" and isinstance(json.loads(call.function.arguments), dict)
    else:
        assert choice.finish_reason == "length" and choice.message.content.startswith("<tool_call>")


def envelope(status: int, body: bytes) -> dict:
    error = json.loads(body)["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"], body
    return error


BAD = [
    # (body, status, param or message fragment)
    (b"{not json", 400, "not a JSON object"),
    (b"[1, 2]", 400, "JSON"),
    ({"model": NAME}, 400, "messages"),
    ({"model": NAME, "messages": []}, 400, "messages"),
    ({"model": NAME, "messages": [{"role": "robot", "content": "x"}]}, 400, "messages.0.role"),
    ({"model": NAME, "messages": [{"role": "user"}]}, 400, "needs content"),
    ({"model": NAME, "messages": USER, "temperature": "hot"}, 400, "temperature"),
    ({"model": NAME, "messages": USER, "temperature": -1}, 400, "temperature"),
    ({"model": NAME, "messages": USER, "max_tokens": 0}, 400, "max_tokens"),
    ({"model": NAME, "messages": USER, "n": 10**9}, 400, "n"),
    ({"model": NAME, "messages": USER, "logit_bias": {"5": 1}}, 400, "unsupported parameter: logit_bias"),
    ({"model": NAME, "messages": USER, "top_logprobs": 2}, 400, "top_logprobs needs logprobs"),
    ({"model": NAME, "messages": USER, "stream_options": {"include_usage": True}}, 400, "stream_options"),
    ({"model": NAME, "messages": USER, "tool_choice": "required"}, 400, "no tools"),
    ({"model": NAME, "messages": USER, "response_format": {"type": "json_schema"}}, 400, "response_format"),
    ({"model": NAME, "messages": USER, "max_tokens": 500}, 400, "maximum context length is 512 tokens"),
    ({"model": NAME, "messages": USER, "max_tokens": 10**12}, 400, "maximum context length"),
    ({"model": NAME, "messages": USER, "stop": ["x"] * 17}, 400, "at most 16"),
    ({"model": NAME, "messages": {"role": "user"}}, 400, "messages"),
    ({"model": NAME, "messages": [{"role": "user", "content": "word " * 600}]}, 400, "maximum context length"),
    ({"model": "gpt-4", "messages": USER}, 404, "model"),
    # hostile: invalid UTF-8 and lone surrogates, deep nesting, huge and negative numbers, odd shapes
    (b'{"model": "tiny-chat", "messages": [{"role": "user", "content": "\xff\xfe"}]}', 400, "not a JSON object"),
    (b'{"model": "tiny-chat", "messages": [{"role": "user", "content": "\\ud800 x"}]}', 400, "not a JSON object"),
    (b'{"model": "tiny-chat", "messages": [], "user": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", 400, "recursion limit"),
    (b'{"model": "tiny-chat", "messages": [{"role": "user", "content": "x"}], "max_tokens": 1' + b"0" * 5000 + b"}", 400, "out of range"),
    (b'{"model": "tiny-chat", "messages": [{"role": "user", "content": "x"}], "temperature": 1e400}', 400, "temperature"),
    (b'{"model": "tiny-chat", "messages": [{"role": "user", "content": "x"}], "temperature": NaN}', 400, "temperature"),
    ({"model": NAME, "messages": USER, "max_tokens": -5}, 400, "max_tokens"),
    ({"model": NAME, "messages": USER, "n": -1}, 400, "n"),
    ({"model": NAME, "messages": USER, "seed": 2**70}, 400, "seed"),
    ({"model": NAME, "messages": USER * 2000}, 400, "above this server's limit of 1024"),
    ({"model": NAME, "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": "x"}]}]}, 400, "messages.0.content"),
    ({"model": NAME, "messages": USER, "tools": [{"type": "function", "function": {"name": "../../etc/passwd"}}]}, 400, "tools.0.function.name"),
    ({"model": "../../etc/passwd", "messages": USER}, 404, "model"),
    (b"model=tiny-chat&messages=hi", 400, "not a JSON object"),
    (b"", 400, "not a JSON object"),
    (b"null", 400, "not a JSON object"),
]


@pytest.mark.parametrize("body,status,expected", BAD, ids=[str(i) for i in range(len(BAD))])
def test_bad_requests_get_an_envelope(served, body, status, expected):
    got, _, raw = served[0].request("POST", "/v1/chat/completions", body, {"Authorization": f"Bearer {KEY}"})
    error = envelope(got, raw)
    assert got == status, raw
    assert expected in error["message"] or (error["param"] or "").startswith(expected), raw


def test_other_bad_requests(served):
    server, _ = served
    auth = {"Authorization": f"Bearer {KEY}"}
    for headers in ({}, {"Authorization": "Bearer wrong"}):
        status, _, raw = server.request("POST", "/v1/chat/completions", {"model": NAME, "messages": USER}, headers)
        assert status == 401 and envelope(status, raw)["code"] == "invalid_api_key"
    status, _, raw = server.request("GET", "/v1/nothing", None, auth)
    assert status == 404 and envelope(status, raw)
    status, _, raw = server.request("GET", "/v1/chat/completions", None, auth)
    assert status == 405 and envelope(status, raw)
    status, _, raw = server.request("POST", "/v1/completions", {"model": NAME, "prompt": [10**9]}, auth)
    assert status == 400 and "token ids" in envelope(status, raw)["message"]
    with socket.create_connection(("127.0.0.1", server.port)) as sock:  # refused on its Content-Length alone
        sock.sendall(f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\n"
                     f"Content-Length: {9 << 20}\r\n\r\n".encode())
        received = b""
        while b"}}" not in received:
            received += sock.recv(65536)
        head, _, raw = received.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 413") and "exceeds the limit" in envelope(413, raw)["message"]
    assert server.request("GET", "/health")[0] == 200  # and the server is still up


def test_binds_loopback_only_by_default(served):
    """Without --host the listening socket is 127.0.0.1 (read from /proc/net/tcp), not every interface."""
    port = f"{served[0].port:04X}"
    rows = [line.split() for line in Path("/proc/net/tcp").read_text().splitlines()[1:]]
    listening = [row[1] for row in rows if row[1].endswith(":" + port) and row[3] == "0A"]
    assert listening == ["0100007F:" + port]


def test_limits_are_configurable(served):
    """--max-body-bytes, --max-messages, --max-tokens and --max-context (a smaller KV cache than the artifact's),
    and a chunked body (no Content-Length) over the limit."""
    server = ServerProcess(served[1], "--max-body-bytes", "2048", "--max-messages", "2", "--max-tokens", "8", "--threads", "1",
                           "--max-context", "100")
    try:
        models = json.loads(server.request("GET", "/v1/models")[2])["data"]
        assert {m["max_model_len"] for m in models} == {100}
        for body, status, expected in [
            ({"model": NAME, "messages": [{"role": "user", "content": "y " * 120}]}, 400, "maximum context length is 100 tokens"),
            ({"model": NAME, "messages": USER * 3}, 400, "messages has 3 entries, above this server's limit of 2"),
            ({"model": NAME, "prompt": ["a", "b", "c"]}, 400, "prompt has 3 entries"),
            ({"model": NAME, "messages": USER, "max_tokens": 9}, 400, "max_tokens is 9, above this server's limit of 8"),
            ({"model": NAME, "messages": [{"role": "user", "content": "x" * 3000}]}, 413, "exceeds the limit of 2048"),
        ]:
            path = "/v1/completions" if "prompt" in body else "/v1/chat/completions"
            got, _, raw = server.request("POST", path, body)
            assert got == status and expected in envelope(got, raw)["message"], raw
        with socket.create_connection(("127.0.0.1", server.port)) as sock:
            sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
                         + b"400\r\n" + b"a" * 1024 + b"\r\n" + b"400\r\n" + b"a" * 1024 + b"\r\n" + b"400\r\n" + b"a" * 1024 + b"\r\n")
            received = b""
            while b"}}" not in received:
                received += sock.recv(65536)
        assert received.startswith(b"HTTP/1.1 413")
        r = openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0).chat.completions.create(model=NAME, messages=USER)
        assert r.usage.completion_tokens <= 8  # no max_tokens: the server's limit applies
    finally:
        server.stop()


def test_disconnect_frees_the_slot(served, client):
    """The tiny model may finish all 480 tokens before the server notices the cut (then it ends as `length`, not
    as an abort; tests/test_reliability.py counts aborts over many cuts): either way the request ends."""
    server, _ = served
    ended = server.metric("tandem:request_success_total")
    body = json.dumps({"model": NAME, "messages": USER, "max_tokens": 480, "temperature": 0, "stream": True}).encode()
    with socket.create_connection(("127.0.0.1", server.port)) as sock:
        sock.sendall(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + KEY.encode()
            + b"\r\nContent-Type: application/json\r\nContent-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body
        )
        received = b""
        while received.count(b"data: ") < 3:
            received += sock.recv(4096)
    deadline = time.monotonic() + 10
    while server.metric("tandem:num_requests_running") and time.monotonic() < deadline:
        time.sleep(0.05)
    assert server.metric("tandem:num_requests_running") == 0
    assert server.metric("tandem:request_success_total") == ended + 1
    r = client.chat.completions.create(model=NAME, messages=USER, max_tokens=4)
    assert r.choices[0].finish_reason in ("length", "stop")


def test_full_queue_is_429_with_retry_after(served):
    """One slot and a waiting queue of one: of four long requests at once, at least one is turned away."""
    server = ServerProcess(served[1], "--max-num-seqs", "1", "--max-waiting", "1", "--threads", "1")
    try:
        async def one(client: openai.AsyncOpenAI) -> int:
            try:
                await client.chat.completions.create(model=NAME, messages=USER, max_tokens=300, temperature=0)
                return 200
            except openai.RateLimitError as e:
                assert e.response.headers["retry-after"] == "1" and e.body["code"] == "queue_full"
                return 429

        async def run() -> list[int]:
            async with openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0) as client:
                return await asyncio.gather(*(one(client) for _ in range(4)))

        statuses = asyncio.run(run())
        assert 429 in statuses and 200 in statuses
    finally:
        server.stop()


def test_bench_serve_runs_and_reports(served, tmp_path):
    from runtime.serve_bench import bench_serve, markdown

    report = bench_serve(served[1], clients=2, max_tokens=4, threads=1, out=tmp_path / "report.json", prompt_lengths=[200])
    assert 190 <= report["prompt_scaling"][0]["prompt_tokens"] <= 200 and report["prompt_scaling"][0]["ttft_s"] > 0
    assert report["concurrent"]["requests"] == report["one_at_a_time"]["requests"] == 2
    assert [r["batch"] for r in report["decode_scaling"]] == [1, 2]
    assert report["decode_scaling"][1]["max_logit_diff_vs_batch_1"] < 1e-3
    assert json.loads((tmp_path / "report.json").read_text())["clients"] == 2 and "speedup" in markdown(report)
