"""Next-token sampling from one sequence's logits (HF / vLLM semantics), vectorised numpy."""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from runtime.errors import TandemError


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 1.0  # 0 -> greedy
    top_k: int = 0  # 0 or -1 -> off
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0  # HF: over prompt + generated, logit > 0 -> / p, else * p
    presence_penalty: float = 0.0  # OpenAI: logit -= presence * (count > 0)
    frequency_penalty: float = 0.0  # OpenAI: logit -= frequency * count
    seed: int | None = None

    def validate(self) -> None:
        # Each check states the valid range, so NaN (false in every comparison) is rejected too.
        checks = {
            "temperature": (self.temperature >= 0, ">= 0"),
            "top_k": (self.top_k >= -1, ">= -1 (0 or -1 disables it)"),
            "top_p": (0 < self.top_p <= 1, "in (0, 1]"),
            "min_p": (0 <= self.min_p <= 1, "in [0, 1]"),
            "repetition_penalty": (self.repetition_penalty > 0, "> 0"),
            "presence_penalty": (-2 <= self.presence_penalty <= 2, "in [-2, 2]"),
            "frequency_penalty": (-2 <= self.frequency_penalty <= 2, "in [-2, 2]"),
        }
        for name, (ok, expected) in checks.items():
            if not ok:
                raise TandemError(f"sampling parameter {name} must be {expected}, got {getattr(self, name)!r}")


class Sampler:
    """Chooses the next token from one sequence's logits; owns its seeded RNG."""

    def __init__(self, params: SamplingParams) -> None:
        params.validate()
        self.params = params
        self._rng = np.random.default_rng(None if params.seed is None else params.seed % 2**64)  # any int, as OpenAI takes

    def __call__(self, logits: np.ndarray, history: Sequence[int]) -> int:
        p = self.params
        scores = self._penalize(np.array(logits, dtype=np.float32), history)
        if p.temperature == 0:
            return int(np.argmax(scores))

        # Top-k shrinks the candidate set first, so the sort below only sees k entries.
        candidates: np.ndarray | None = None
        if 0 < p.top_k < scores.size:
            candidates = np.argpartition(scores, -p.top_k)[-p.top_k:]
            scores = scores[candidates]

        # Softmax in place on our own float32 copy: 600 KB temporaries and float64 maths cost milliseconds at 152K.
        probs = scores
        probs /= np.float32(p.temperature)
        probs -= probs.max()
        np.exp(probs, out=probs)
        probs /= probs.sum()
        if p.top_p < 1:
            _apply_top_p(probs, p.top_p)
        if p.min_p > 0:
            probs[probs < p.min_p * probs.max()] = 0

        cdf = np.cumsum(probs, out=probs)
        index = min(int(np.searchsorted(cdf, self._rng.random() * cdf[-1], side="right")), cdf.size - 1)
        return int(candidates[index]) if candidates is not None else index

    def _penalize(self, scores: np.ndarray, history: Sequence[int]) -> np.ndarray:
        """Applies the penalties in place to `scores`, which must be the sampler's own copy."""
        p = self.params
        penalized = p.repetition_penalty != 1 or p.presence_penalty != 0 or p.frequency_penalty != 0
        if not penalized or len(history) == 0:
            return scores
        ids, counts = np.unique(np.asarray(history, dtype=np.int64), return_counts=True)
        seen = scores[ids]
        if p.repetition_penalty != 1:
            seen = np.where(seen > 0, seen / p.repetition_penalty, seen * p.repetition_penalty)
        seen = seen - p.frequency_penalty * counts - p.presence_penalty
        scores[ids] = seen
        return scores


def _apply_top_p(probs: np.ndarray, top_p: float) -> None:
    """Zeroes all but the smallest set of most likely tokens whose mass reaches top_p (ties at the cut are kept)."""
    descending = np.sort(probs)[::-1]
    cutoff = min(int(np.searchsorted(np.cumsum(descending), top_p)), descending.size - 1)
    probs[probs < descending[cutoff]] = 0
