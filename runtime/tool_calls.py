"""Qwen2.5's tool calls: `<tool_call>{"name": ..., "arguments": {...}}</tool_call>` blocks in the reply text."""
from __future__ import annotations

import json
import re
import secrets
from typing import Any

OPEN, CLOSE = "<tool_call>", "</tool_call>"
_BLOCK = re.compile(re.escape(OPEN) + r"\s*(.*?)\s*(?:" + re.escape(CLOSE) + r"|$)", re.DOTALL)


def parse_tool_calls(text: str, names: set[str]) -> tuple[str | None, list[dict[str, Any]]]:
    """Split a reply into its content and its OpenAI `tool_calls`. A block that is not a JSON call (e.g. cut
    short by max_tokens) leaves the whole reply as content. Small models sometimes drop the tags: a reply that is
    exactly one call object naming one of the tools counts as that call."""
    start = text.find(OPEN)
    if start < 0:
        call = _call(text.strip())
        return (None, [call]) if call and call["function"]["name"] in names else (text, [])
    calls = [_call(match.group(1)) for match in _BLOCK.finditer(text, start)]
    if not all(calls):
        return text, []
    return text[:start].strip() or None, calls  # type: ignore[return-value]


def streamable(text: str) -> str:
    """The part of a reply in progress that is certainly content: up to a tool call, or what may become one
    (a reply that starts as a JSON object, or ends in a partial opening tag)."""
    if text.lstrip().startswith("{"):
        return ""
    start = text.find(OPEN)
    if start >= 0:
        return text[:start]
    return text[: len(text) - max((k for k in range(1, len(OPEN)) if text.endswith(OPEN[:k])), default=0)]


def _call(block: str) -> dict[str, Any] | None:
    try:
        call = json.loads(block)
        name, arguments = call["name"], call.get("arguments", {})
    except (ValueError, KeyError, TypeError, AttributeError):
        return None
    if not isinstance(name, str):
        return None
    arguments = arguments if isinstance(arguments, str) else json.dumps(arguments, ensure_ascii=False)
    return {"id": f"call_{secrets.token_hex(12)}", "type": "function", "function": {"name": name, "arguments": arguments}}


def template_messages(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """OpenAI messages as Qwen's chat template reads them: a tool call's arguments as an object, not a JSON string."""
    out = []
    for message in messages:
        calls = message.get("tool_calls")
        if calls:
            message = {**message, "tool_calls": [
                {**call, "function": {**call["function"], "arguments": _object(call["function"]["arguments"])}} for call in calls
            ]}
        out.append(message)
    return out


def _object(arguments: str) -> Any:
    try:
        return json.loads(arguments)
    except ValueError:
        return arguments
