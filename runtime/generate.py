"""Generation: prompt -> chunked prefill -> sampled decode steps -> streamed text deltas, with stats."""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from runtime import manifest as names
from runtime.engine import Engine
from runtime.errors import TandemError
from runtime.sampling import Sampler, SamplingParams
from runtime.tokenizer import StreamDecoder, Tokenizer


@dataclass
class Stats:
    prompt_tokens: int = 0
    completion_tokens: int = 0
    ttft_s: float = 0.0      # prompt in -> first token sampled
    decode_s: float = 0.0    # first token -> last token

    @property
    def decode_tokens_per_s(self) -> float:
        return (self.completion_tokens - 1) / self.decode_s if self.completion_tokens > 1 and self.decode_s else 0.0

    @property
    def prefill_tokens_per_s(self) -> float:
        return self.prompt_tokens / self.ttft_s if self.ttft_s else 0.0


@dataclass
class Chunk:
    """One streamed piece: new text (may be empty) and, on the last chunk, why generation ended."""

    text: str
    token_id: int | None = None
    finish_reason: str | None = None  # "stop" (EOS) or "length"
    stats: Stats | None = None


@dataclass
class Generator:
    """An artifact ready to generate: its engine, tokenizer and generation defaults."""

    engine: Engine
    tokenizer: Tokenizer
    defaults: dict = field(default_factory=dict)

    @classmethod
    def load(cls, directory: Path | str, threads: int = 0) -> "Generator":
        directory = Path(directory)
        engine = Engine(directory, threads=threads)
        defaults = json.loads((directory / names.GENERATION_CONFIG).read_text())
        return cls(engine, Tokenizer.from_dir(directory), defaults)

    @property
    def eos_token_ids(self) -> set[int]:
        return {int(t) for t in np.atleast_1d(self.defaults.get("eos_token_id", []))}

    def sampling(self, **overrides) -> SamplingParams:
        """Sampling parameters: the caller's non-None values over the model's sampling defaults.

        temperature 0 is greedy decoding, the argmax of the model's logits: the model's default sampling
        settings (top-k/p, repetition penalty) are then not applied; only the caller's explicit ones are.
        """
        explicit = {k: v for k, v in overrides.items() if v is not None}
        greedy = explicit.get("temperature", self.defaults.get("temperature", 1.0)) == 0
        keys = ("temperature", "top_k", "top_p", "min_p", "repetition_penalty")
        defaults = {} if greedy else {k: self.defaults[k] for k in keys if self.defaults.get(k) is not None}
        params = SamplingParams(**{**defaults, **explicit})
        params.validate()
        return params

    def chat_prompt(self, messages: list[dict]) -> list[int]:
        return self.tokenizer.encode(self.tokenizer.apply_chat_template(messages, add_generation_prompt=True))

    def stream(self, prompt_ids: Sequence[int], max_tokens: int, sampling: SamplingParams, slot: int = 0) -> Iterator[Chunk]:
        """Generate up to max_tokens after the prompt; the last chunk carries finish_reason and stats."""
        capacity = self.engine.capacity
        if len(prompt_ids) >= capacity:
            raise TandemError(f"prompt of {len(prompt_ids)} tokens does not fit the context of {capacity} tokens")
        if max_tokens < 1:
            raise TandemError("max_tokens must be at least 1")
        budget = min(max_tokens, capacity - len(prompt_ids))
        stats = Stats(prompt_tokens=len(prompt_ids))
        sampler, decoder, history = Sampler(sampling), StreamDecoder(self.tokenizer), list(prompt_ids)
        eos = self.eos_token_ids
        start = time.perf_counter()
        self.engine.reset(slot)
        logits = self.engine.forward(slot, list(prompt_ids))
        while True:
            token = sampler(logits, history)
            now = time.perf_counter()
            if not stats.completion_tokens:
                stats.ttft_s, first = now - start, now
            stats.decode_s = now - first
            if token in eos:
                yield Chunk(decoder.flush(), finish_reason="stop", stats=stats)
                return
            stats.completion_tokens += 1
            history.append(token)
            if stats.completion_tokens == budget:
                yield Chunk(decoder.push(token) + decoder.flush(), token, "length", stats)
                return
            yield Chunk(decoder.push(token), token)
            logits = self.engine.forward(slot, [token])
