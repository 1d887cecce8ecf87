"""Slow tier: the server on real artifacts of the default model, the customer's curl lines verbatim."""
from __future__ import annotations

import json
import shutil
import subprocess
import time

import openai
import pytest

from runtime.generate import Generator
from runtime.server_process import ServerProcess

pytestmark = pytest.mark.slow
FIB = [{"role": "user", "content": "Write a Python function to calculate fibonacci"}]

# The customer's review commands (the first two send no Content-Type: curl labels the JSON as a form).
CURL = [
    """curl -X POST http://localhost:{port}/v1/chat/completions \\
  -d '{{"model":"qwen2.5-7b","messages":[{{"role":"user","content":"Hello!"}}]}}'""",
    """curl -X POST http://localhost:{port}/v1/chat/completions \\
  -d '{{"model":"qwen2.5-7b","messages":[{{"role":"user","content":"Count to 10"}}],"stream":true}}'""",
    """curl -X POST http://localhost:{port}/v1/chat/completions \\
  -H "Content-Type: application/json" \\
  -d '{{"model":"qwen2.5-7b","messages":[{{"role":"user","content":"Hello, test message"}}],"max_tokens":50}}'""",
]


def curl(server: ServerProcess, command: str) -> str:
    """Run a review command verbatim where curl exists, else the same request through urllib."""
    command = command.format(port=server.port)
    if shutil.which("curl"):
        return subprocess.run(["bash", "-c", command + " -sS"], capture_output=True, text=True, check=True, timeout=600).stdout
    body = command.split("-d '")[1].rstrip("'").encode()
    headers = {"Content-Type": "application/json"} if "Content-Type" in command else {}
    status, _, raw = server.request("POST", "/v1/chat/completions", body, headers)
    assert status == 200, raw
    return raw.decode()


def test_the_customers_curl_lines_against_the_7b_recipe(real_artifacts):
    """The 7B (Ryzen AI) recipe compiled with the default model's weights: served as qwen2.5-7b."""
    server = ServerProcess(real_artifacts["ryzen-ai"])
    try:
        assert server.health[0] == 503 and server.health[-1] == 200  # 503 while loading, then ready
        hello = json.loads(curl(server, CURL[0]))
        assert hello["model"] == "qwen2.5-7b" and hello["choices"][0]["message"]["content"].strip()
        assert hello["choices"][0]["finish_reason"] == "stop"
        events = [e for e in curl(server, CURL[1]).split("\n\n") if e]
        assert events[-1] == "data: [DONE]"
        chunks = [json.loads(e[len("data: "):]) for e in events[:-1]]
        assert len({c["id"] for c in chunks}) == 1 and chunks[0]["choices"][0]["delta"]["role"] == "assistant"
        text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks)
        assert "1" in text and "10" in text, text
        assert chunks[-1]["choices"][0]["finish_reason"] == "stop"
        limited = json.loads(curl(server, CURL[2]))
        assert limited["usage"]["completion_tokens"] <= 50 and limited["choices"][0]["message"]["content"].strip()
    finally:
        server.stop()


@pytest.fixture(scope="module")
def default_server(real_artifacts):
    server = ServerProcess(real_artifacts["cpu"])
    yield server
    server.stop()


@pytest.fixture(scope="module")
def client(default_server) -> openai.OpenAI:
    return openai.OpenAI(base_url=default_server.url + "/v1", api_key="none", max_retries=0, timeout=600)


def test_greedy_chat_equals_the_runtime_and_writes_code(real_artifacts, client):
    gen = Generator.load(real_artifacts["cpu"], threads=1)
    expected = "".join(c.text for c in gen.stream(gen.chat_prompt(FIB), 64, gen.sampling(temperature=0)))
    r = client.chat.completions.create(model="qwen2.5-coder-0.5b-instruct", messages=FIB, max_tokens=64, temperature=0)
    assert r.choices[0].message.content == expected and "def fibonacci" in expected


def test_tool_calls(client):
    tools = [{"type": "function", "function": {
        "name": "get_weather", "description": "Current weather of a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    }}]
    ask = [{"role": "user", "content": "What is the weather in Paris right now?"}]
    for tool_choice in ("auto", "required", {"type": "function", "function": {"name": "get_weather"}}):
        r = client.chat.completions.create(
            model="qwen2.5-coder-0.5b-instruct", messages=ask, tools=tools, tool_choice=tool_choice, temperature=0, max_tokens=64,
        )
        choice = r.choices[0]
        assert choice.finish_reason == "tool_calls", (tool_choice, choice)
        call = choice.message.tool_calls[0]
        assert call.function.name == "get_weather" and "paris" in json.loads(call.function.arguments)["city"].lower()
    # the call and its result go back in: the model answers from the tool's result
    follow = ask + [
        {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
        {"role": "tool", "tool_call_id": call.id, "content": json.dumps({"temperature_c": 21, "sky": "sunny"})},
    ]
    r = client.chat.completions.create(model="qwen2.5-coder-0.5b-instruct", messages=follow, tools=tools, temperature=0, max_tokens=64)
    assert r.choices[0].finish_reason == "stop" and "21" in r.choices[0].message.content
    # streamed, the call arrives as a tool_calls delta, never as content
    chunks = list(client.chat.completions.create(
        model="qwen2.5-coder-0.5b-instruct", messages=ask, tools=tools, temperature=0, max_tokens=64, stream=True,
    ))
    assert not "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    deltas = [d for c in chunks if c.choices for d in c.choices[0].delta.tool_calls or []]
    assert deltas[0].function.name == "get_weather" and chunks[-1].choices[0].finish_reason == "tool_calls"


def test_json_mode(client):
    r = client.chat.completions.create(
        model="qwen2.5-coder-0.5b-instruct", temperature=0, max_tokens=128, response_format={"type": "json_object"},
        messages=[{"role": "user", "content": "Describe a user with a name and an age as JSON."}],
    )
    assert r.choices[0].finish_reason == "stop"
    assert isinstance(json.loads(r.choices[0].message.content), dict)


def test_disconnect_mid_stream_frees_the_slot(default_server, client):
    finished = default_server.metric("tandem:request_success_total")
    stream = client.chat.completions.create(
        model="qwen2.5-coder-0.5b-instruct", messages=FIB, max_tokens=400, temperature=0, stream=True
    )
    for i, _ in enumerate(stream):
        if i == 5:
            break
    stream.close()
    deadline = time.monotonic() + 30
    while default_server.metric("tandem:num_requests_running") and time.monotonic() < deadline:
        time.sleep(0.1)
    assert default_server.metric("tandem:num_requests_running") == 0
    abort = 'tandem:request_success_total{model_name="qwen2.5-coder-0.5b-instruct",finished_reason="abort"}'
    assert default_server.metric(abort) >= 1 and default_server.metric("tandem:request_success_total") == finished + 1
    r = client.chat.completions.create(model="qwen2.5-coder-0.5b-instruct", messages=FIB, max_tokens=8)
    assert r.choices[0].message.content


def test_completions_stop_length_usage_seed_and_bad_input(default_server, client):
    model = "qwen2.5-coder-0.5b-instruct"
    full = client.completions.create(model=model, prompt="def fibonacci(n):", max_tokens=24, temperature=0)
    text = full.choices[0].text
    assert full.choices[0].finish_reason == "length" and full.usage.completion_tokens == 24
    stop = text[text.index("return") :][:6] if "return" in text else text[4:7]
    cut = client.completions.create(model=model, prompt="def fibonacci(n):", max_tokens=24, temperature=0, stop=stop)
    assert cut.choices[0].text == text[: text.index(stop)] and cut.choices[0].finish_reason == "stop"
    chunks = list(client.chat.completions.create(
        model=model, messages=FIB, max_tokens=8, temperature=0, stream=True, stream_options={"include_usage": True},
    ))
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 8
    sample = lambda seed: client.chat.completions.create(  # noqa: E731
        model=model, messages=FIB, max_tokens=12, temperature=1.0, seed=seed).choices[0].message.content
    assert sample(3) == sample(3) != sample(4)
    for body, status in (({"model": model, "messages": FIB, "max_tokens": 5000}, 400), ({"model": "gpt-4", "messages": FIB}, 404),
                         ({"model": model, "messages": FIB, "logit_bias": {}}, 400), (b"{", 400)):
        got, _, raw = default_server.request("POST", "/v1/chat/completions", body)
        assert got == status and set(json.loads(raw)["error"]) == {"message", "type", "param", "code"}
