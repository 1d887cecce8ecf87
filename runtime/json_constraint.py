"""response_format json_object: decoding constrained to one JSON object, checked character by character.

A pushdown recognizer of JSON prefixes decides whether a candidate token's text can extend the reply; the
sampler draws, and a token that cannot is masked and the draw repeated (the same distribution as masking the
whole vocabulary first, at the cost of the few draws that fail). End of sequence is allowed once the object
is complete, and then it is the only choice.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

from runtime.tokenizer import Tokenizer

_NUMBER_PREFIX = re.compile(r"-?(0|[1-9]\d*)?(\.\d*)?([eE][+-]?\d*)?")
_NUMBER = re.compile(r"-?(0|[1-9]\d*)(\.\d+)?([eE][+-]?\d+)?")
_LITERALS = {"t": "true", "f": "false", "n": "null"}
_WS = " \t\n\r"


@dataclass
class _State:
    stack: list[str] = field(default_factory=list)  # "{" or "[" per open container
    expect: str = "start"  # start | value | key | key_or_end | colon | comma_or_end | value_or_end | done
    token: str = ""  # the string, number or literal being read
    mode: str = ""  # "", "string", "key", "escape", "unicode", "number", "literal"
    unicode_left: int = 0

    def copy(self) -> _State:
        return _State(list(self.stack), self.expect, self.token, self.mode, self.unicode_left)


class JsonObject:
    """Accepts exactly the texts that start (or are) one JSON object, optionally surrounded by whitespace."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self._tokenizer = tokenizer
        self._state = _State()

    @property
    def complete(self) -> bool:
        return self._state.expect == "done"

    def token_text(self, token_id: int) -> str:
        return self._tokenizer.token_texts()[token_id] if token_id < self._tokenizer.vocab_size else ""

    def allows(self, text: str) -> bool:
        return bool(text) and _feed(self._state.copy(), text)

    def advance(self, text: str) -> None:
        if not _feed(self._state, text):
            raise ValueError(f"{text!r} does not continue the JSON object")


def _feed(s: _State, text: str) -> bool:
    return all(_char(s, c) for c in text)


def _char(s: _State, c: str) -> bool:
    if s.mode in ("string", "key"):
        if c == "\\":
            s.mode, s.token = ("escape", s.mode)  # remember which kind of string the escape is in
            return True
        if c == '"':
            s.expect = "colon" if s.mode == "key" else _after_value(s)
            s.mode = ""
            return True
        return c >= " "  # control characters must be escaped ("\ufffd" of a split UTF-8 character is fine)
    if s.mode == "escape":
        if c == "u":
            s.mode, s.unicode_left = "unicode", 4
            return True
        s.mode = s.token
        return c in '"\\/bfnrt'
    if s.mode == "unicode":
        if c not in "0123456789abcdefABCDEF":
            return False
        s.unicode_left -= 1
        if not s.unicode_left:
            s.mode = s.token
        return True
    if s.mode == "number":
        if _NUMBER_PREFIX.fullmatch(s.token + c):
            s.token += c
            return True
        if not _NUMBER.fullmatch(s.token):
            return False
        s.mode, s.expect = "", _after_value(s)
        return _char(s, c)
    if s.mode == "literal":  # token: the literal's characters still to come
        if c != s.token[0]:
            return False
        s.token = s.token[1:]
        if not s.token:
            s.mode, s.expect = "", _after_value(s)
        return True
    if c in _WS:
        return True
    e = s.expect
    if e == "start":
        if c != "{":
            return False
        s.stack.append("{")
        s.expect = "key_or_end"
        return True
    if e == "done":
        return False
    if e in ("key", "key_or_end"):
        if c == '"':
            s.mode = "key"
            return True
        return e == "key_or_end" and c == "}" and _close(s, "{")
    if e == "colon":
        if c == ":":
            s.expect = "value"
            return True
        return False
    if e == "comma_or_end":
        if c == ",":
            s.expect = "key" if s.stack[-1] == "{" else "value"
            return True
        return c in "}]" and _close(s, "{" if c == "}" else "[")
    # value or value_or_end
    if e == "value_or_end" and c == "]":
        return _close(s, "[")
    if c in "{[":
        s.stack.append(c)
        s.expect = "key_or_end" if c == "{" else "value_or_end"
        return True
    if c == '"':
        s.mode = "string"
        return True
    if c in "-0123456789":
        s.mode, s.token = "number", c
        return True
    if c in _LITERALS:
        s.mode, s.token = "literal", _LITERALS[c][1:]
        return True
    return False


def _after_value(s: _State) -> str:
    return "comma_or_end" if s.stack else "done"


def _close(s: _State, opener: str) -> bool:
    if not s.stack or s.stack[-1] != opener:
        return False
    s.stack.pop()
    s.expect = _after_value(s)
    return True
