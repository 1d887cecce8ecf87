"""fidelity: perplexity, top-1 agreement and KL of a candidate against a reference, accumulated in chunks."""
from __future__ import annotations

import math

import numpy as np
import pytest

from compiler.fidelity import FidelityAccumulator, evaluate
from runtime.errors import TandemError


def random_case(seed: int, windows: int = 3, length: int = 40, vocab: int = 1000) -> tuple[list[list[int]], list[np.ndarray]]:
    rng = np.random.default_rng(seed)
    tokens = [rng.integers(0, vocab, length).tolist() for _ in range(windows)]
    logits = [(rng.standard_normal((length, vocab)) * 3).astype(np.float32) for _ in range(windows)]
    return tokens, logits


def test_identical_logits():
    tokens, logits = random_case(0)
    r = evaluate(tokens, logits, lambda t: logits[tokens.index(t)])
    assert r["tokens"] == 3 * 39
    assert r["perplexity"] == r["reference_perplexity"]
    assert r["perplexity_delta"] == 0.0
    assert r["top1_agreement"] == 1.0
    assert abs(r["kl_mean"]) < 1e-12


def test_tiny_case_by_hand():
    tokens = [0, 2, 1]
    ref = np.array([[1.0, 2.0, 3.0], [0.0, 0.0, 1.0], [9.0, 9.0, 9.0]], np.float32)
    cand = np.array([[1.0, 3.0, 2.0], [0.5, 0.0, 1.0], [0.0, 0.0, 0.0]], np.float32)
    acc = FidelityAccumulator()
    acc.add(tokens, ref, cand)
    r = acc.result()

    def logp(x: np.ndarray) -> np.ndarray:
        e = np.exp(x.astype(np.float64))
        return np.log(e / e.sum(axis=1, keepdims=True))

    lr, lc = logp(ref[:2]), logp(cand[:2])
    assert r["tokens"] == 2
    assert r["reference_perplexity"] == pytest.approx(math.exp(-(lr[0, 2] + lr[1, 1]) / 2))
    assert r["perplexity"] == pytest.approx(math.exp(-(lc[0, 2] + lc[1, 1]) / 2))
    assert r["perplexity_delta"] == pytest.approx(r["perplexity"] / r["reference_perplexity"] - 1)
    assert r["top1_agreement"] == 0.5  # row 0: argmax 2 vs 1; row 1: 2 vs 2
    assert r["kl_mean"] == pytest.approx((np.exp(lr) * (lr - lc)).sum() / 2)


def test_noisy_candidate():
    tokens, logits = random_case(1)
    rng = np.random.default_rng(2)
    noisy = [x + rng.standard_normal(x.shape).astype(np.float32) for x in logits]
    r = evaluate(tokens, logits, lambda t: noisy[tokens.index(t)])
    assert r["kl_mean"] > 0.01
    assert r["perplexity"] != r["reference_perplexity"]
    assert 0.0 < r["top1_agreement"] < 1.0


def test_chunked_equals_unchunked():
    tokens, logits = random_case(3, windows=2, length=150)
    noisy = [x[::-1].copy() for x in logits]
    results = []
    for chunk_rows in (7, 64, 10_000):
        acc = FidelityAccumulator(chunk_rows=chunk_rows)
        for t, ref, cand in zip(tokens, logits, noisy):
            acc.add(t, ref, cand)
        results.append(acc.result())
    for r in results[:-1]:
        assert r.keys() == results[-1].keys()
        for key, value in r.items():
            assert value == pytest.approx(results[-1][key], rel=1e-12)


def test_reference_only():
    tokens, logits = random_case(4)
    r = evaluate(tokens, logits, None)
    assert set(r) == {"tokens", "reference_perplexity"}
    acc = FidelityAccumulator()
    for t, x in zip(tokens, logits):
        acc.add(t, x, x)
    assert r["reference_perplexity"] == pytest.approx(acc.result()["reference_perplexity"], rel=1e-12)


def test_errors():
    tokens, logits = random_case(5, windows=1)
    acc = FidelityAccumulator()
    with pytest.raises(TandemError, match="expected"):
        acc.add(tokens[0][:-1], logits[0])
    acc.add(tokens[0], logits[0])
    with pytest.raises(TandemError, match="candidate"):
        acc.add(tokens[0], logits[0], logits[0])
    with pytest.raises(TandemError, match="no predictions"):
        FidelityAccumulator().result()
