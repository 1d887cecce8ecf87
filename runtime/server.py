"""The OpenAI-compatible HTTP server: /v1/chat/completions, /v1/completions, /v1/models, /health, /metrics.

Requests become sequences in the continuous-batching scheduler; their chunks come back from its worker thread
through an asyncio queue per HTTP request and leave as one JSON response or as OpenAI's server-sent events.
"""
from __future__ import annotations

import asyncio
import hmac
import json
import logging
import secrets
import threading
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import (
    JSONResponse,
    PlainTextResponse,
    Response,
    StreamingResponse,
)
from starlette.exceptions import HTTPException as StarletteHTTPException

from runtime.errors import TandemError
from runtime.generate import Chunk, Generator
from runtime.json_constraint import JsonObject
from runtime.metrics import Metrics
from runtime.openai_protocol import (
    APIError,
    ChatCompletionRequest,
    CompletionRequest,
    GenerationRequest,
    NamedToolChoice,
    parse,
)
from runtime.scheduler import QueueFull, Scheduler
from runtime.scheduler import Request as Job
from runtime.tool_calls import (
    CLOSE,
    OPEN,
    parse_tool_calls,
    streamable,
    template_messages,
)

log = logging.getLogger("tandem")


@dataclass
class ServerConfig:
    artifact: Path
    served_names: list[str] = field(default_factory=list)  # added to the artifact's own names
    api_key: str | None = None
    max_num_seqs: int = 8  # KV cache slots: sequences decoded together
    max_waiting: int = 64
    threads: int = 0
    max_body_bytes: int = 8 << 20
    max_messages: int = 1024  # chat messages, or prompts of one completions request
    max_tokens: int | None = None  # the most a request may generate; None: whatever fits the context
    max_context: int | None = None  # KV cache positions per slot, at most the artifact's


class Service:
    """The model behind the server. It loads on a background thread, so /health answers 503 until it is ready."""

    def __init__(self, config: ServerConfig, on_failure: Callable[[str], None]) -> None:
        self.config = config
        self.generator: Generator | None = None
        self.scheduler: Scheduler | None = None
        self.names: list[str] = list(config.served_names)
        self.metrics = Metrics()
        self.created = int(time.time())
        self._on_failure = on_failure

    def start(self) -> None:
        threading.Thread(target=self._load, name="tandem-load", daemon=True).start()

    def close(self) -> None:
        if self.scheduler is not None:
            self.scheduler.close()

    def _load(self) -> None:
        try:
            generator = Generator.load(self.config.artifact, threads=self.config.threads, slots=self.config.max_num_seqs,
                                       capacity=self.config.max_context)
        except Exception as e:  # noqa: BLE001 - reported as one line, then the server stops
            self._on_failure(str(e) if isinstance(e, TandemError) else f"{type(e).__name__}: {e}")
            return
        manifest = generator.engine.manifest
        self.names = list(dict.fromkeys([*manifest.served_names, manifest.name, *self.config.served_names]))
        self.metrics.model_name = self.names[0]
        self.scheduler = Scheduler(generator.engine, self.config.max_waiting, self.metrics)
        self.generator = generator
        log.warning("serving %s as %s (%d slots of %d tokens)", self.config.artifact, ", ".join(self.names),
                    self.config.max_num_seqs, generator.engine.capacity)

    def ready(self) -> Generator:
        if self.generator is None:
            raise APIError("the model is still loading", 503, "service_unavailable", headers={"Retry-After": "5"})
        return self.generator

    def check_model(self, name: str) -> None:
        if name not in self.names:
            raise APIError(f"The model `{name}` does not exist.", 404, "invalid_request_error", "model", "model_not_found")


@dataclass
class Choice:
    """One choice of a response as it accumulates: text, logprobs, how it ended."""

    index: int
    prompt_tokens: int
    job: Job | None = None
    text: str = ""
    shown: int = 0  # characters of text already streamed
    logprobs: list[tuple[int, Any]] = field(default_factory=list)  # (token id, TokenLogprob)
    finish_reason: str | None = None
    completion_tokens: int = 0
    tool_calls: list[dict] = field(default_factory=list)


@dataclass
class Plan:
    """What one HTTP request asks the scheduler for, and how its output is shaped."""

    kind: str  # "chat" or "text"
    body: GenerationRequest
    prompts: list[list[int]]
    max_tokens: list[int]
    prefix: str = ""  # text forced before the reply (the start of a required tool call), part of its output
    suffix: str = ""  # text that completes the reply (the end of a required tool call)
    tools: set[str] = field(default_factory=set)  # names of the tools whose calls are parsed out of the reply
    json_object: bool = False
    logprobs: int | None = None
    echo: list[str] = field(default_factory=list)


def create_app(service: Service) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        service.start()
        yield
        service.close()

    app = FastAPI(title="tandem", description="OpenAI-compatible server for tandem artifacts", lifespan=lifespan)
    app.openapi = lambda: _openapi(app, service)
    config = service.config
    api_key = config.api_key

    @app.middleware("http")
    async def _auth(request: Request, call_next):
        if api_key and request.url.path.startswith("/v1"):
            given = request.headers.get("authorization", "")
            token = given[7:] if given.lower().startswith("bearer ") else ""
            if not hmac.compare_digest(token.encode(), api_key.encode()):
                return _error(APIError("invalid API key", 401, "invalid_request_error", code="invalid_api_key"))
        return await call_next(request)

    @app.exception_handler(APIError)
    async def _api_error(request: Request, e: APIError) -> JSONResponse:
        return _error(e)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, e: StarletteHTTPException) -> JSONResponse:
        kind = "not_found_error" if e.status_code == 404 else "invalid_request_error"
        return _error(APIError(f"{e.detail}: {request.method} {request.url.path}", e.status_code, kind))

    @app.exception_handler(Exception)
    async def _internal(request: Request, e: Exception) -> JSONResponse:
        log.exception("internal error on %s", request.url.path)
        return _error(APIError(f"internal server error: {type(e).__name__}", 500, "internal_server_error"))

    @app.get("/health")
    async def health() -> Response:
        """Ready, with where each graph runs (after any fallback: the EPs passed over, and why) and the traffic."""
        engine = service.ready().engine
        placement = [{"graph": p.graph, "role": p.role, "phase": p.phase or "all", "provider": p.resolved,
                      "passed_over": p.skipped} for p in engine.placements]
        return JSONResponse({"status": "ok", "placement": placement, "traffic": engine.traffic_report()})

    @app.get("/metrics")
    async def metrics() -> Response:
        return PlainTextResponse(service.metrics.render(), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def models() -> Response:
        capacity = service.ready().engine.capacity
        data = [
            {"id": name, "object": "model", "created": service.created, "owned_by": "tandem", "max_model_len": capacity}
            for name in service.names
        ]
        return JSONResponse({"object": "list", "data": data})

    @app.post("/v1/chat/completions", openapi_extra=_schema(ChatCompletionRequest))
    async def chat_completions(request: Request) -> Response:
        body = parse(await _body(request, config.max_body_bytes), ChatCompletionRequest)
        return await _serve(request, service, _chat_plan(service, body))

    @app.post("/v1/completions", openapi_extra=_schema(CompletionRequest))
    async def completions(request: Request) -> Response:
        body = parse(await _body(request, config.max_body_bytes), CompletionRequest)
        return await _serve(request, service, _completion_plan(service, body))

    return app


REF = "#/components/schemas/{model}"


def _schema(model: type) -> dict:
    """The request body's JSON Schema (the body is parsed by hand, so FastAPI cannot derive it)."""
    schema = model.model_json_schema(ref_template=REF)
    schema.pop("$defs", None)
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": schema}}}}


def _openapi(app: FastAPI, service: Service) -> dict:
    """FastAPI's schema plus the request models' definitions, so that every $ref resolves, and `model` as the
    names served (fuzzers read it to reach past the model check)."""
    if app.openapi_schema is None:
        from fastapi.openapi.utils import get_openapi

        schema = get_openapi(title=app.title, version="1", description=app.description, routes=app.routes)
        components = schema.setdefault("components", {}).setdefault("schemas", {})
        for model in (ChatCompletionRequest, CompletionRequest):
            components.update(model.model_json_schema(ref_template=REF).get("$defs", {}))
        if service.generator is None:
            return schema  # the names are known once the model has loaded
        for path in ("/v1/chat/completions", "/v1/completions"):
            body = schema["paths"][path]["post"]["requestBody"]["content"]["application/json"]["schema"]
            body["properties"]["model"] = {"type": "string", "enum": service.names, "title": "Model"}
        app.openapi_schema = schema
    return app.openapi_schema


def _error(e: APIError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status, headers=e.headers)


async def _body(request: Request, limit: int) -> bytes:
    """The raw body, whatever its Content-Type says (curl -d labels JSON as a form); never more than `limit` bytes."""
    size = request.headers.get("content-length")
    if size and size.isdigit() and int(size) > limit:
        raise APIError(f"request body of {size} bytes exceeds the limit of {limit}", 413)
    body = bytearray()
    async for part in request.stream():  # a chunked body has no Content-Length: count as it arrives
        body += part
        if len(body) > limit:
            raise APIError(f"request body exceeds the limit of {limit} bytes", 413)
    return bytes(body)


def _budgets(service: Service, prompts: list[list[int]], requested: int | None) -> list[int]:
    """max_tokens per prompt; a request that cannot fit the context is a 400 that gives both numbers."""
    capacity, limit = service.ready().engine.capacity, service.config.max_tokens
    if requested is not None and limit is not None and requested > limit:
        raise APIError(f"max_tokens is {requested}, above this server's limit of {limit}", param="max_tokens",
                       code="invalid_value")
    budgets = []
    for ids in prompts:
        if not ids:
            raise APIError("the prompt is empty", param="prompt")
        wanted = requested if requested is not None else min(capacity - len(ids), limit or capacity)
        if len(ids) + max(wanted, 1) > capacity:
            raise APIError(
                f"This model's maximum context length is {capacity} tokens. However, you requested "
                f"{len(ids) + wanted} tokens ({len(ids)} in the prompt, {wanted} in the completion). "
                "Please reduce the length of the prompt or completion.",
                param="messages" if requested is None else "max_tokens", code="context_length_exceeded",
            )
        budgets.append(wanted)
    return budgets


def _check_count(count: int, limit: int, param: str) -> None:
    if count > limit:
        raise APIError(f"{param} has {count} entries, above this server's limit of {limit}", param=param,
                       code="invalid_value")


def _chat_plan(service: Service, body: ChatCompletionRequest) -> Plan:
    generator = service.ready()
    service.check_model(body.model)
    _check_count(len(body.messages), service.config.max_messages, "messages")
    messages = []
    for m in body.messages:
        message: dict[str, Any] = {"role": "system" if m.role == "developer" else m.role, "content": m.text()}
        if m.name:
            message["name"] = m.name
        if m.tool_calls:
            message["tool_calls"] = [c.model_dump() for c in m.tool_calls]
        if m.tool_call_id:
            message["tool_call_id"] = m.tool_call_id
        messages.append(message)
    tools = [t.model_dump(exclude_none=True) for t in body.tools or []] if body.tool_choice != "none" else []
    # A required call is forced: the template's tool-call opening goes into the prompt, and the model writes
    # the call's JSON object (a named call: its arguments) under the JSON constraint.
    prefix = suffix = ""
    if body.tool_choice == "required":
        prefix, suffix = OPEN + "\n", "\n" + CLOSE
    elif isinstance(body.tool_choice, NamedToolChoice):
        prefix, suffix = OPEN + '\n{"name": ' + json.dumps(body.tool_choice.function.name) + ', "arguments": ', "}\n" + CLOSE
    text = generator.tokenizer.apply_chat_template(template_messages(messages), tools=tools or None) + prefix
    prompt = generator.tokenizer.encode(text)
    logprobs = (body.top_logprobs or 0) if body.logprobs else None
    json_object = bool(prefix) or (body.response_format is not None and body.response_format.type == "json_object")
    budgets = _budgets(service, [prompt], body.token_budget())
    names = {t["function"]["name"] for t in tools}
    return Plan("chat", body, [prompt], budgets, prefix, suffix, names, json_object, logprobs)


def _completion_plan(service: Service, body: CompletionRequest) -> Plan:
    generator = service.ready()
    service.check_model(body.model)
    prompts, echo = [], []
    vocab = generator.engine.manifest.model.vocab_size
    _check_count(len(body.prompts()), service.config.max_messages, "prompt")
    for p in body.prompts():
        if isinstance(p, list) and any(not 0 <= t < vocab for t in p):
            raise APIError(f"prompt token ids must be in [0, {vocab})", param="prompt")
        prompts.append(generator.tokenizer.encode(p) if isinstance(p, str) else p)
        echo.append((p if isinstance(p, str) else generator.tokenizer.decode(p)) if body.echo else "")
    return Plan("text", body, prompts, _budgets(service, prompts, body.max_tokens), logprobs=body.logprobs, echo=echo)


def _submit(service: Service, plan: Plan, queue: asyncio.Queue) -> list[Choice]:
    """One scheduler job per choice (n per prompt); their chunks arrive on `queue` as (choice index, chunk)."""
    generator, scheduler = service.ready(), service.scheduler
    loop = asyncio.get_running_loop()
    body = plan.body
    choices = []
    for p, (prompt, budget) in enumerate(zip(plan.prompts, plan.max_tokens)):
        for k in range(body.n):
            index = p * body.n + k
            try:
                sampling = generator.sampling(
                    temperature=body.temperature, top_k=body.top_k, top_p=body.top_p, min_p=body.min_p,
                    repetition_penalty=body.repetition_penalty, presence_penalty=body.presence_penalty,
                    frequency_penalty=body.frequency_penalty, seed=None if body.seed is None else body.seed + index,
                )
                sequence = generator.sequence(
                    prompt, budget, sampling, body.stop_strings(), plan.logprobs,
                    JsonObject(generator.tokenizer) if plan.json_object else None,
                )
            except TandemError as e:
                raise APIError(str(e)) from None
            choice = Choice(index, len(prompt), text=plan.prefix)
            choice.job = Job(sequence, lambda item, i=index: loop.call_soon_threadsafe(queue.put_nowait, (i, item)))
            choices.append(choice)
    for n, choice in enumerate(choices):
        try:
            scheduler.submit(choice.job)
        except QueueFull as e:
            for earlier in choices[:n]:
                scheduler.cancel(earlier.job)
            raise APIError(str(e), 429, "rate_limit_exceeded", code="queue_full", headers={"Retry-After": "1"}) from None
    return choices


def _absorb(plan: Plan, choice: Choice, chunk: Chunk) -> None:
    choice.text += chunk.text
    if chunk.token_id is not None:
        choice.completion_tokens += 1
        if chunk.logprob is not None:
            choice.logprobs.append((chunk.token_id, chunk.logprob))
    if chunk.finish_reason:
        choice.finish_reason = chunk.finish_reason
        if chunk.finish_reason == "stop":
            choice.text += plan.suffix
        if plan.tools:
            content, calls = parse_tool_calls(choice.text, plan.tools)
            if calls:
                choice.text, choice.tool_calls, choice.finish_reason = content or "", calls, "tool_calls"


def _visible(plan: Plan, choice: Choice) -> str:
    """Text that can be streamed now: with tools, nothing from the start of a tool call (or what may be one) on."""
    return streamable(choice.text) if plan.tools and choice.finish_reason is None else choice.text


async def _serve(request: Request, service: Service, plan: Plan) -> Response:
    queue: asyncio.Queue = asyncio.Queue()
    choices = _submit(service, plan, queue)
    ident = ("chatcmpl-" if plan.kind == "chat" else "cmpl-") + secrets.token_hex(12)
    model = plan.body.model
    if plan.body.stream:
        return StreamingResponse(_events(service, plan, choices, queue, ident, model), media_type="text/event-stream")
    try:
        await _collect(request, service, plan, choices, queue)
    finally:
        for choice in choices:
            if choice.finish_reason is None:
                service.scheduler.cancel(choice.job)
    return JSONResponse(_response(service, plan, choices, ident, model))


async def _collect(request: Request, service: Service, plan: Plan, choices: list[Choice], queue: asyncio.Queue) -> None:
    open_ = len(choices)
    while open_:
        try:
            index, item = await asyncio.wait_for(queue.get(), timeout=1.0)
        except asyncio.TimeoutError:
            if await request.is_disconnected():
                raise APIError("client disconnected", 499) from None
            continue
        if isinstance(item, Exception):
            raise APIError(f"generation failed: {item}", 500, "internal_server_error")
        _absorb(plan, choices[index], item)
        open_ -= item.finish_reason is not None


def _usage(choices: list[Choice], plan: Plan) -> dict[str, int]:
    prompt = sum(len(p) for p in plan.prompts)
    completion = sum(c.completion_tokens for c in choices)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _response(service: Service, plan: Plan, choices: list[Choice], ident: str, model: str) -> dict:
    out = []
    for c in choices:
        if plan.kind == "chat":
            message: dict[str, Any] = {"role": "assistant", "content": c.text if c.text or not c.tool_calls else None}
            if c.tool_calls:
                message["tool_calls"] = c.tool_calls
            out.append({"index": c.index, "message": message, "logprobs": _chat_logprobs(service, c.logprobs),
                        "finish_reason": c.finish_reason})
        else:
            echo = plan.echo[c.index // plan.body.n]
            out.append({"index": c.index, "text": echo + c.text, "logprobs": _text_logprobs(service, c.logprobs),
                        "finish_reason": c.finish_reason})
    obj = "chat.completion" if plan.kind == "chat" else "text_completion"
    return {"id": ident, "object": obj, "created": int(time.time()), "model": model, "choices": out,
            "usage": _usage(choices, plan)}


async def _events(
    service: Service, plan: Plan, choices: list[Choice], queue: asyncio.Queue, ident: str, model: str
) -> AsyncIterator[str]:
    """OpenAI's server-sent events: role first, content deltas, finish_reason, usage if asked, [DONE]."""
    created = int(time.time())
    obj = "chat.completion.chunk" if plan.kind == "chat" else "text_completion"
    usage = plan.body.include_usage()

    def event(choice_list: list[dict], **extra: Any) -> str:
        payload = {"id": ident, "object": obj, "created": created, "model": model, "choices": choice_list, **extra}
        if usage and "usage" not in extra:
            payload["usage"] = None
        return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"

    def delta(c: Choice, text: str, logprobs: list, finish: str | None = None, **fields: Any) -> dict:
        if plan.kind == "chat":
            d = {**({"content": text} if text or not fields else {}), **fields}
            return {"index": c.index, "delta": d, "logprobs": _chat_logprobs(service, logprobs), "finish_reason": finish}
        return {"index": c.index, "text": text, "logprobs": _text_logprobs(service, logprobs), "finish_reason": finish}

    try:
        for c in choices:
            first = plan.echo[c.index // plan.body.n] if plan.kind == "text" else ""
            if plan.kind == "chat":
                yield event([{"index": c.index, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                              "finish_reason": None}])
            elif first:
                yield event([delta(c, first, [])])
        open_ = len(choices)
        while open_:
            index, item = await queue.get()
            if isinstance(item, Exception):
                yield f"data: {json.dumps(APIError(f'generation failed: {item}', 500, 'internal_server_error').body())}\n\n"
                break
            c = choices[index]
            logged = len(c.logprobs)
            _absorb(plan, c, item)
            visible = _visible(plan, c)
            text, c.shown = visible[c.shown:], max(c.shown, len(visible))
            new_logprobs = c.logprobs[logged:]
            if text or new_logprobs:
                yield event([delta(c, text, new_logprobs)])
            if item.finish_reason:
                open_ -= 1
                if c.tool_calls:
                    calls = [{"index": i, **call} for i, call in enumerate(c.tool_calls)]
                    yield event([delta(c, "", [], tool_calls=calls)])
                yield event([delta(c, "", [], c.finish_reason)] if plan.kind == "text" else
                            [{"index": c.index, "delta": {}, "logprobs": None, "finish_reason": c.finish_reason}])
        else:
            if usage:
                yield event([], usage=_usage(choices, plan))
        yield "data: [DONE]\n\n"
    finally:  # also on a client disconnect: the scheduler frees the slots at its next step
        for c in choices:
            if c.finish_reason is None:
                service.scheduler.cancel(c.job)


def _token(service: Service, token_id: int) -> str:
    return service.generator.tokenizer.decode([token_id], skip_special_tokens=False)


def _chat_logprobs(service: Service, logprobs: list) -> dict | None:
    if not logprobs:
        return None

    def entry(token_id: int, value: float) -> dict:
        text = _token(service, token_id)
        return {"token": text, "logprob": value, "bytes": list(text.encode("utf-8"))}

    return {"content": [
        {**entry(token_id, lp.logprob), "top_logprobs": [entry(t, v) for t, v in lp.top]} for token_id, lp in logprobs
    ]}


def _text_logprobs(service: Service, logprobs: list) -> dict | None:
    if not logprobs:
        return None
    tokens = [_token(service, t) for t, _ in logprobs]
    offsets = [sum(len(t) for t in tokens[:i]) for i in range(len(tokens))]
    return {
        "tokens": tokens,
        "token_logprobs": [lp.logprob for _, lp in logprobs],
        "top_logprobs": [{_token(service, t): v for t, v in lp.top} for _, lp in logprobs],
        "text_offset": offsets,
    }
