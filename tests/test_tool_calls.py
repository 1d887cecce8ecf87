"""Qwen2.5 tool-call parsing, and what may be streamed as content while a reply is in progress."""
from __future__ import annotations

import json

from runtime.tool_calls import parse_tool_calls, streamable, template_messages

NAMES = {"get_weather", "search"}


def test_tagged_calls_are_parsed_and_the_text_before_is_content():
    text = 'Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n' \
           '<tool_call>\n{"name": "search", "arguments": {"q": "été"}}\n</tool_call>'
    content, calls = parse_tool_calls(text, NAMES)
    assert content == "Let me check."
    assert [c["function"]["name"] for c in calls] == ["get_weather", "search"]
    assert json.loads(calls[1]["function"]["arguments"]) == {"q": "été"}
    assert calls[0]["id"].startswith("call_") and calls[0]["id"] != calls[1]["id"]


def test_what_is_not_a_call_stays_content():
    truncated = '<tool_call>\n{"name": "get_weather", "argum'
    assert parse_tool_calls(truncated, NAMES) == (truncated, [])
    assert parse_tool_calls("plain answer", NAMES) == ("plain answer", [])
    other = '{"name": "Alice", "arguments": []}'  # JSON that names no tool
    assert parse_tool_calls(other, NAMES) == (other, [])
    content, calls = parse_tool_calls(' {"name": "search", "arguments": {"q": "x"}}\n', NAMES)  # untagged call
    assert content is None and calls[0]["function"]["name"] == "search"


def test_streamable_holds_back_what_may_become_a_call():
    assert streamable("Hello <tool") == "Hello "
    assert streamable("Hello <tool_call>\n{") == "Hello "
    assert streamable("Hello <b>") == "Hello <b>"
    assert streamable('  {"name": "se') == ""
    assert streamable("x = {1: 2}") == "x = {1: 2}"


def test_arguments_reach_the_template_as_objects():
    messages = [{"role": "assistant", "content": "", "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "search", "arguments": '{"q": "x"}'}}]}]
    assert template_messages(messages)[0]["tool_calls"][0]["function"]["arguments"] == {"q": "x"}
    assert messages[0]["tool_calls"][0]["function"]["arguments"] == '{"q": "x"}'  # the caller's copy is untouched
