import time

import numpy as np
import pytest

from runtime.errors import TandemError
from runtime.sampling import Sampler, SamplingParams

VOCAB = 152_064


def random_logits(vocab: int = VOCAB, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(0, 3, vocab).astype(np.float32)


def draws(params: SamplingParams, logits: np.ndarray, n: int, history: list[int] | None = None) -> list[int]:
    sampler = Sampler(params)
    return [sampler(logits, history or []) for _ in range(n)]


def frequencies(params: SamplingParams, logits: np.ndarray, history: list[int], n: int = 4000) -> np.ndarray:
    return np.bincount(draws(params, logits, n, history), minlength=logits.size) / n


def test_greedy_is_argmax() -> None:
    logits = random_logits()
    assert set(draws(SamplingParams(temperature=0), logits, 5)) == {int(np.argmax(logits))}


def test_same_seed_same_tokens() -> None:
    logits = random_logits(1000)
    params = SamplingParams(temperature=1.0, top_p=0.9, seed=42)
    first = draws(params, logits, 50)
    assert draws(params, logits, 50) == first
    assert draws(SamplingParams(temperature=1.0, top_p=0.9, seed=43), logits, 50) != first
    assert len(set(first)) > 1


@pytest.mark.parametrize("params", [SamplingParams(top_k=1, seed=0), SamplingParams(top_p=1e-6, seed=0)])
def test_degenerate_filters_are_greedy(params: SamplingParams) -> None:
    logits = random_logits()
    assert set(draws(params, logits, 20)) == {int(np.argmax(logits))}


def test_top_k_keeps_only_the_k_best() -> None:
    logits = random_logits(1000)
    best = set(np.argsort(logits)[-5:].tolist())
    assert set(draws(SamplingParams(top_k=5, seed=0), logits, 500)) == best


def test_top_p_keeps_smallest_set_reaching_p() -> None:
    logits = np.log(np.array([0.5, 0.3, 0.15, 0.05], dtype=np.float32))
    assert set(draws(SamplingParams(top_p=0.75, seed=0), logits, 500)) == {0, 1}
    assert set(draws(SamplingParams(top_p=0.85, seed=0), logits, 500)) == {0, 1, 2}


def test_min_p_filters_relative_to_the_best() -> None:
    logits = np.log(np.array([0.5, 0.3, 0.15, 0.05], dtype=np.float32))
    assert set(draws(SamplingParams(min_p=0.5, seed=0), logits, 500)) == {0, 1}
    assert set(draws(SamplingParams(min_p=0.2, seed=0), logits, 500)) == {0, 1, 2}


def test_temperature_sharpens() -> None:
    logits = np.array([1.0, 0.0], dtype=np.float32)
    hot = frequencies(SamplingParams(temperature=2.0, seed=0), logits, [])[0]
    cold = frequencies(SamplingParams(temperature=0.25, seed=0), logits, [])[0]
    assert cold > 0.95 and 0.55 < hot < 0.7  # softmax([0.5, 0]) ~ 0.62


@pytest.mark.parametrize("logit", [2.0, -2.0])
def test_repetition_penalty_lowers_seen_tokens(logit: float) -> None:
    logits = np.array([logit, logit, logit], dtype=np.float32)
    plain = frequencies(SamplingParams(seed=0), logits, [0, 0])
    penalized = frequencies(SamplingParams(repetition_penalty=1.5, seed=0), logits, [0, 0])
    assert penalized[0] < plain[0] - 0.1
    # HF semantics: positive logits divided, negative multiplied.
    expected = np.exp([logit / 1.5 if logit > 0 else logit * 1.5, logit, logit])
    assert penalized[0] == pytest.approx(expected[0] / expected.sum(), abs=0.03)


def test_presence_and_frequency_penalties() -> None:
    logits = np.zeros(3, dtype=np.float32)
    history = [0, 0, 0, 1]
    presence = frequencies(SamplingParams(presence_penalty=1.0, seed=0), logits, history)
    assert presence[0] == pytest.approx(presence[1], abs=0.03) and presence[0] < presence[2] - 0.3
    frequency = frequencies(SamplingParams(frequency_penalty=0.5, seed=0), logits, history)
    expected = np.exp([-1.5, -0.5, 0.0])
    assert frequency == pytest.approx(expected / expected.sum(), abs=0.03)
    # Penalties also steer greedy decoding.
    assert Sampler(SamplingParams(temperature=0, presence_penalty=0.1))(np.array([1.0, 0.95], np.float32), [0]) == 1


@pytest.mark.parametrize(
    "field, value",
    [
        ("temperature", -0.1),
        ("top_k", -2),
        ("top_p", 0.0),
        ("top_p", 1.5),
        ("min_p", -0.1),
        ("min_p", 1.1),
        ("repetition_penalty", 0.0),
        ("presence_penalty", 2.5),
        ("frequency_penalty", -2.5),
        ("temperature", float("nan")),
    ],
)
def test_validate_names_the_bad_field(field: str, value: float) -> None:
    params = SamplingParams(**{field: value})
    with pytest.raises(TandemError, match=field):
        params.validate()
    with pytest.raises(TandemError, match=field):
        Sampler(params)


def test_defaults_and_boundaries_are_valid() -> None:
    SamplingParams().validate()
    SamplingParams(temperature=0, top_k=-1, top_p=1, min_p=1, presence_penalty=-2, frequency_penalty=2).validate()


def test_input_logits_untouched() -> None:
    logits = random_logits()
    before = logits.copy()
    params = SamplingParams(temperature=0.7, top_k=50, top_p=0.9, min_p=0.05, repetition_penalty=1.3,
                            presence_penalty=0.5, frequency_penalty=0.5, seed=0)
    Sampler(params)(logits, [1, 2, 3, 3, int(np.argmax(logits))])
    Sampler(SamplingParams(temperature=0, repetition_penalty=1.3))(logits, [1, 2, 3])
    np.testing.assert_array_equal(logits, before)


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(temperature=0.7, top_p=0.9, repetition_penalty=1.1, seed=0),
        SamplingParams(temperature=0.7, top_k=50, top_p=0.8, min_p=0.05, presence_penalty=0.5, seed=0),
        SamplingParams(temperature=0, repetition_penalty=1.1),
    ],
)
def test_full_vocab_is_fast(params: SamplingParams) -> None:
    logits = random_logits()
    history = np.random.default_rng(1).integers(0, VOCAB, 2000).tolist()
    sampler = Sampler(params)
    sampler(logits, history)  # warm-up
    start = time.perf_counter()
    for _ in range(10):
        sampler(logits, history)
    assert (time.perf_counter() - start) / 10 < 0.05
