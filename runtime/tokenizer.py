"""Tokenizer, chat template and streaming detokenizer of an artifact, built on tokenizers + jinja2 (no transformers)."""
from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer as _RustTokenizer

from runtime.errors import TandemError

TOKENIZER_JSON = "tokenizer.json"
TOKENIZER_CONFIG = "tokenizer_config.json"
CHAT_TEMPLATE = "chat_template.jinja"


class Tokenizer:
    """Tokenizer + chat template of an artifact, from tokenizers + jinja2 (no transformers)."""

    def __init__(self, tokenizer: _RustTokenizer, config: dict[str, Any], chat_template: str | None) -> None:
        self._tok = tokenizer
        self.bos_token = _token_content(config.get("bos_token"))
        self.eos_token = _token_content(config.get("eos_token"))
        self._template = _compile_template(chat_template) if chat_template is not None else None
        self._token_texts: list[str] | None = None

    @classmethod
    def from_dir(cls, path: Path) -> Tokenizer:
        path = Path(path)
        tokenizer_file = path / TOKENIZER_JSON
        if not tokenizer_file.is_file():
            raise TandemError(f"tokenizer file not found: {tokenizer_file}")
        try:
            tokenizer = _RustTokenizer.from_file(str(tokenizer_file))
        except Exception as e:  # tokenizers raises a bare Exception on malformed files
            raise TandemError(f"cannot load {tokenizer_file}: {e}") from e
        config_file = path / TOKENIZER_CONFIG
        config = _read_json(config_file) if config_file.is_file() else {}
        template_file = path / CHAT_TEMPLATE
        if template_file.is_file():
            template = template_file.read_text(encoding="utf-8")
        else:
            template = config.get("chat_template")
        return cls(tokenizer, config, template)

    @property
    def vocab_size(self) -> int:
        """Size of the tokenizer's vocabulary including added tokens (the model's logits may be padded beyond it)."""
        return self._tok.get_vocab_size(with_added_tokens=True)

    @property
    def eos_token_id(self) -> int | None:
        return self.token_id(self.eos_token) if self.eos_token is not None else None

    def token_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def token_texts(self) -> list[str]:
        """Every token's text on its own as streamed output shows it (special tokens are empty), decoded once."""
        if self._token_texts is None:
            self._token_texts = self._tok.decode_batch([[i] for i in range(self.vocab_size)], skip_special_tokens=True)
        return self._token_texts

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def apply_chat_template(
        self,
        messages: list[dict],
        add_generation_prompt: bool = True,
        tools: list[dict] | None = None,
        **extra: Any,
    ) -> str:
        if self._template is None:
            raise TandemError("this model has no chat template; use a plain prompt instead")
        variables = {"bos_token": self.bos_token, "eos_token": self.eos_token, **extra}
        try:
            return self._template.render(
                messages=messages, tools=tools, add_generation_prompt=add_generation_prompt, **variables
            )
        except jinja2.TemplateError as e:
            raise TandemError(f"chat template error: {e}") from e


class StreamDecoder:
    """Turns a growing list of token ids into text deltas that never split a UTF-8 character.

    Incremental detokenization as in vLLM / text-generation-inference: decode the window
    tokens[prefix_offset:] against tokens[prefix_offset:read_offset] and emit only the new
    suffix, holding it back while it ends in an incomplete character (U+FFFD).
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = True) -> None:
        self._tokenizer = tokenizer
        self._skip = skip_special_tokens
        self._ids: list[int] = []
        self._prefix_offset = 0
        self._read_offset = 0

    def push(self, token_id: int) -> str:
        self._ids.append(token_id)
        prefix_text, new_text = self._window()
        if len(new_text) <= len(prefix_text) or new_text.endswith("\ufffd"):
            return ""
        self._prefix_offset, self._read_offset = self._read_offset, len(self._ids)
        return new_text[len(prefix_text):]

    def flush(self) -> str:
        prefix_text, new_text = self._window()
        self._prefix_offset = self._read_offset = len(self._ids)
        return new_text[len(prefix_text):]

    def _window(self) -> tuple[str, str]:
        decode = self._tokenizer.decode
        prefix_text = decode(self._ids[self._prefix_offset:self._read_offset], skip_special_tokens=self._skip)
        new_text = decode(self._ids[self._prefix_offset:], skip_special_tokens=self._skip)
        return prefix_text, new_text


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise TandemError(f"cannot read {path}: {e}") from e


def _token_content(value: str | dict | None) -> str | None:
    """Special tokens in tokenizer_config.json are either a string or a serialized AddedToken {"content": ...}."""
    if isinstance(value, dict):
        return value.get("content")
    return value


def _raise_exception(message: str) -> None:
    raise TandemError(message)


def _tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None,
            separators: tuple[str, str] | None = None, sort_keys: bool = False) -> str:
    """Like transformers' override: no HTML escaping (unlike jinja2's built-in tojson)."""
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


def _compile_template(source: str) -> jinja2.Template:
    """Same environment as transformers' apply_chat_template, so templates render identically."""
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    try:
        return env.from_string(source)
    except jinja2.TemplateError as e:
        raise TandemError(f"chat template error: {e}") from e
