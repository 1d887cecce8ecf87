"""Qwen2.5's tool calls: `<tool_call>{"name": ..., "arguments": {...}}</tool_call>` blocks in the reply text."""
from __future__ import annotations

import json
import re
import secrets
from typing import Any

OPEN, CLOSE = "<tool_call>", "</tool_call>"
_BLOCK = re.compile(re.escape(OPEN) + r"\s*(.*?)\s*(?:" + re.escape(CLOSE) + r"|$)", re.DOTALL)


def parse_tool_calls(text: str) -> tuple[str | None, list[dict[str, Any]]]:
    """Split a reply into its content and its OpenAI `tool_calls`. A block that is not a JSON call (e.g. cut
    short by max_tokens) leaves the whole reply as content."""
    start = text.find(OPEN)
    if start < 0:
        return text, []
    calls = []
    for match in _BLOCK.finditer(text, start):
        try:
            call = json.loads(match.group(1))
            name, arguments = call["name"], call.get("arguments", {})
        except (ValueError, KeyError, TypeError):
            return text, []
        if not isinstance(name, str):
            return text, []
        arguments = arguments if isinstance(arguments, str) else json.dumps(arguments, ensure_ascii=False)
        calls.append({"id": f"call_{secrets.token_hex(12)}", "type": "function", "function": {"name": name, "arguments": arguments}})
    content = text[:start].strip()
    return content or None, calls


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
