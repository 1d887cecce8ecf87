"""Generation: prompt -> chunked prefill -> sampled decode steps -> streamed text deltas (stop strings held back), with stats."""
from __future__ import annotations

import json
import time
from collections.abc import Iterator
from collections.abc import Sequence as Sequence_
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from runtime import manifest as names
from runtime.engine import Engine
from runtime.errors import TandemError
from runtime.json_constraint import JsonObject
from runtime.sampling import Sampler, SamplingParams
from runtime.tokenizer import StreamDecoder, Tokenizer


@dataclass
class Stats:
    prompt_tokens: int = 0
    completion_tokens: int = 0
    ttft_s: float = 0.0      # prompt in -> first token sampled
    decode_s: float = 0.0    # first token -> last token
    gap_s: float = 0.0       # the last token's inter-token latency

    @property
    def decode_tokens_per_s(self) -> float:
        return (self.completion_tokens - 1) / self.decode_s if self.completion_tokens > 1 and self.decode_s else 0.0

    @property
    def prefill_tokens_per_s(self) -> float:
        return self.prompt_tokens / self.ttft_s if self.ttft_s else 0.0


REJECTION_DRAWS = 16  # constrained sampling: draws before checking the whole vocabulary


@dataclass
class TokenLogprob:
    """The chosen token's log-probability under the model, and the most likely alternatives (id, logprob)."""

    logprob: float
    top: list[tuple[int, float]]


@dataclass
class Chunk:
    """One streamed piece: new text (may be empty) and, on the last chunk, why generation ended."""

    text: str
    token_id: int | None = None
    finish_reason: str | None = None  # "stop" (EOS or a stop string) or "length"
    stats: Stats | None = None
    logprob: TokenLogprob | None = None


class Sequence:
    """One request's decoding state: samples each next token from the logits it is given, detokenizes it, holds
    back text that may be the start of a stop string, and decides when the sequence ends."""

    def __init__(
        self,
        prompt_ids: list[int],
        budget: int,
        sampler: Sampler,
        decoder: StreamDecoder,
        eos: set[int],
        stop: Sequence_[str] = (),
        logprobs: int | None = None,
        constraint: JsonObject | None = None,
    ) -> None:
        self.prompt_ids = prompt_ids
        self.stats = Stats(prompt_tokens=len(prompt_ids))
        self._budget, self._sampler, self._decoder, self._eos = budget, sampler, decoder, eos
        self._stop = [s for s in stop if s]
        self._logprobs = logprobs
        self._constraint = constraint
        self._history = list(prompt_ids)
        self._held = ""
        self._start = time.perf_counter()
        self._first = 0.0

    def accept(self, logits: np.ndarray) -> Chunk:
        """Sample the next token from its logits [vocab]; the chunk's finish_reason is set when the sequence ends."""
        token = self._sample(logits)
        now = time.perf_counter()
        if not self.stats.completion_tokens and not self._first:
            self.stats.ttft_s, self._first = now - self._start, now
        self.stats.gap_s = now - self._first - self.stats.decode_s
        self.stats.decode_s = now - self._first
        logprob = _logprob(logits, token, self._logprobs) if self._logprobs is not None else None
        if token in self._eos:
            return Chunk(self._release(self._decoder.flush(), final=True)[0], finish_reason="stop", stats=self.stats)
        self.stats.completion_tokens += 1
        self._history.append(token)
        last = self.stats.completion_tokens == self._budget
        text = self._decoder.push(token) + (self._decoder.flush() if last else "")
        text, stopped = self._release(text, final=last)
        stopped = stopped or (self._constraint is not None and self._constraint.complete)
        if stopped or last:
            return Chunk(text, token, "stop" if stopped else "length", self.stats, logprob)
        return Chunk(text, token, logprob=logprob)

    def _sample(self, logits: np.ndarray) -> int:
        """The sampler's choice. Under a constraint a rejected token is masked and the draw repeated; after a few
        rejections every token is checked once and the draw made from the allowed ones."""
        c = self._constraint
        if c is None:
            return self._sampler(logits, self._history)
        scores = np.array(logits, dtype=np.float32)
        for attempt in range(REJECTION_DRAWS + 1):
            if attempt == REJECTION_DRAWS:
                allowed = np.array([self._allowed(c, t) for t in range(scores.size)])
                if not allowed.any():
                    raise TandemError("no token can continue the constrained output")
                scores[~allowed] = -np.inf
            token = self._sampler(scores, self._history)
            if self._allowed(c, token):
                if token not in self._eos:
                    c.advance(c.token_text(token))
                return token
            scores[token] = -np.inf
        raise AssertionError("unreachable: the last draw is from allowed tokens only")

    def _allowed(self, c: JsonObject, token: int) -> bool:
        return c.complete if token in self._eos else c.allows(c.token_text(token))

    def _release(self, text: str, final: bool) -> tuple[str, bool]:
        """The text that can be shown now, and whether a stop string ended the sequence (it is never shown)."""
        self._held += text
        hits = [i for i in (self._held.find(s) for s in self._stop) if i >= 0]
        if hits:
            return self._held[: min(hits)], True
        keep = 0 if final else max((_overlap(self._held, s) for s in self._stop), default=0)
        out, self._held = self._held[: len(self._held) - keep], self._held[len(self._held) - keep :]
        return out, False


def _overlap(text: str, stop: str) -> int:
    """Length of the longest end of `text` that is a proper start of `stop`."""
    for k in range(min(len(text), len(stop) - 1), 0, -1):
        if text.endswith(stop[:k]):
            return k
    return 0


def _logprob(logits: np.ndarray, token: int, top: int) -> TokenLogprob:
    """Log-probabilities of the model's distribution (before sampling settings), as vLLM reports them."""
    x = np.asarray(logits, dtype=np.float64)
    logz = x.max() + np.log(np.exp(x - x.max()).sum())
    best = np.argpartition(x, -top)[-top:] if top else np.array([], dtype=np.int64)
    best = best[np.argsort(-x[best])]
    return TokenLogprob(float(x[token] - logz), [(int(i), float(x[i] - logz)) for i in best])


@dataclass
class Generator:
    """An artifact ready to generate: its engine, tokenizer and generation defaults."""

    engine: Engine
    tokenizer: Tokenizer
    defaults: dict = field(default_factory=dict)

    @classmethod
    def load(cls, directory: Path | str, threads: int = 0, slots: int = 1, capacity: int | None = None) -> Generator:
        directory = Path(directory)
        # the tokenizer first: the sessions then reuse the heap its loading leaves free (the default model at a
        # 4000-token prompt peaks 90 MiB lower than the other way round; docs/probes/rss_stages.py)
        tokenizer = Tokenizer.from_dir(directory)
        engine = Engine(directory, slots=slots, threads=threads, capacity=capacity)
        defaults = json.loads((directory / names.GENERATION_CONFIG).read_text())
        return cls(engine, tokenizer, defaults)

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

    def sequence(
        self, prompt_ids: Sequence_[int], max_tokens: int, sampling: SamplingParams, stop: Sequence_[str] = (),
        logprobs: int | None = None, constraint: JsonObject | None = None,
    ) -> Sequence:
        """A new sequence for the prompt; checks that it fits the context. max_tokens is capped by the context."""
        capacity = self.engine.capacity
        if not prompt_ids:
            raise TandemError("the prompt is empty")
        if len(prompt_ids) >= capacity:
            raise TandemError(f"prompt of {len(prompt_ids)} tokens does not fit the context of {capacity} tokens")
        if max_tokens < 1:
            raise TandemError("max_tokens must be at least 1")
        budget = min(max_tokens, capacity - len(prompt_ids))
        return Sequence(
            list(prompt_ids), budget, Sampler(sampling), StreamDecoder(self.tokenizer), self.eos_token_ids, stop, logprobs,
            constraint,
        )

    def stream(
        self, prompt_ids: Sequence_[int], max_tokens: int, sampling: SamplingParams, slot: int = 0, stop: Sequence_[str] = ()
    ) -> Iterator[Chunk]:
        """Generate up to max_tokens after the prompt on one slot; the last chunk carries finish_reason and stats."""
        seq = self.sequence(prompt_ids, max_tokens, sampling, stop)
        self.engine.reset(slot)
        logits = self.engine.forward(slot, seq.prompt_ids)
        while True:
            chunk = seq.accept(logits)
            yield chunk
            if chunk.finish_reason:
                return
            logits = self.engine.forward(slot, [chunk.token_id])
