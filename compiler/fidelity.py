"""Fidelity of a candidate model (e.g. quantized) against its fp32 reference: perplexity, top-1 agreement, KL.

Accumulated window by window and, within a window, `chunk_rows` rows at a time: a 152K vocab in float64 is
1.2 MB per row, so whole-window log-softmaxes would not fit in memory.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from runtime.errors import TandemError

Model = Callable[[list[int]], np.ndarray]


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise log-softmax in float64, stable by subtracting the row maximum."""
    x = logits.astype(np.float64)
    x -= x.max(axis=-1, keepdims=True)
    x -= np.log(np.exp(x).sum(axis=-1, keepdims=True))
    return x


@dataclass
class FidelityAccumulator:
    """Sums over every scored prediction; logits[i] predicts tokens[i + 1], so the last row of a window is unused."""

    chunk_rows: int = 64
    predictions: int = 0
    reference_nll: float = 0.0
    candidate_nll: float = 0.0
    top1_agreements: int = 0
    kl: float = 0.0
    with_candidate: bool | None = None  # set by the first add; every window must then do the same

    def add(self, tokens: Sequence[int], reference_logits: np.ndarray, candidate_logits: np.ndarray | None = None) -> None:
        score(tokens, reference_logits, [(self, candidate_logits)])

    def result(self) -> dict[str, Any]:
        """Totals as a report: perplexity = exp(mean NLL of the true next token); KL(reference || candidate) in nats."""
        if self.predictions == 0:
            raise TandemError("no predictions were scored: every window needs at least 2 tokens")
        n = self.predictions
        reference_ppl = math.exp(self.reference_nll / n)
        out: dict[str, Any] = {"tokens": n, "reference_perplexity": reference_ppl}
        if self.with_candidate:
            ppl = math.exp(self.candidate_nll / n)
            out |= {
                "perplexity": ppl,
                "perplexity_delta": ppl / reference_ppl - 1.0,
                "top1_agreement": self.top1_agreements / n,
                "kl_mean": self.kl / n,
            }
        return out


def score(tokens: Sequence[int], reference_logits: np.ndarray, candidates: list[tuple[FidelityAccumulator, np.ndarray | None]]) -> None:
    """Score one window for several candidates against one reference, computing the reference's log-softmax once."""
    _check_logits("reference", reference_logits, len(tokens))
    for acc, candidate_logits in candidates:
        with_candidate = candidate_logits is not None
        if acc.with_candidate not in (None, with_candidate):
            raise TandemError("every window must be scored with a candidate, or none")
        if candidate_logits is not None:
            _check_logits("candidate", candidate_logits, len(tokens))
            if candidate_logits.shape != reference_logits.shape:
                raise TandemError(
                    f"candidate logits {candidate_logits.shape} and reference logits {reference_logits.shape} differ in shape"
                )
        acc.with_candidate = with_candidate
    targets = np.asarray(tokens[1:], dtype=np.int64)
    for start in range(0, len(targets), candidates[0][0].chunk_rows):
        rows = slice(start, min(start + candidates[0][0].chunk_rows, len(targets)))
        picked = np.arange(rows.stop - rows.start), targets[rows]
        ref = log_softmax(reference_logits[rows])
        ref_nll, ref_top1, ref_p = -float(ref[picked].sum()), ref.argmax(axis=-1), np.exp(ref)
        for acc, candidate_logits in candidates:
            acc.reference_nll += ref_nll
            if candidate_logits is not None:
                cand = log_softmax(candidate_logits[rows])
                acc.candidate_nll -= float(cand[picked].sum())
                acc.top1_agreements += int((ref_top1 == cand.argmax(axis=-1)).sum())
                acc.kl += float((ref_p * (ref - cand)).sum())
    for acc, _ in candidates:
        acc.predictions += len(targets)


def evaluate(windows: list[list[int]], references: Iterable[np.ndarray], candidate: Model | None) -> dict[str, Any]:
    """Score the candidate on every window against the reference's logits for it (given in window order)."""
    acc = FidelityAccumulator()
    for tokens, reference in zip(windows, references, strict=True):
        acc.add(tokens, reference, candidate(tokens) if candidate is not None else None)
    return acc.result()


def _check_logits(which: str, logits: np.ndarray, length: int) -> None:
    if logits.ndim != 2 or logits.shape[0] != length:
        raise TandemError(f"{which} logits have shape {logits.shape}, expected [{length}, vocab]")
