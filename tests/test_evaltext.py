"""evaltext: the Python docs' help topics split by whole topics into calibration and evaluation text."""
from __future__ import annotations

import pytest

from compiler import evaltext
from runtime.errors import TandemError
from runtime.tokenizer import Tokenizer
from tests.tiny import make_tokenizer

CHARS_PER_TOKEN = 4  # roughly, for a Qwen-style BPE on English and code
MIN_TOKENS = {"calibration": 8_000, "evaluation": 25_000}


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory) -> Tokenizer:
    directory = tmp_path_factory.mktemp("tok")
    make_tokenizer(directory)
    return Tokenizer.from_dir(directory)


def test_corpus_is_sorted_and_deterministic():
    pairs = evaltext.corpus()
    names = [name for name, _ in pairs]
    assert names == sorted(names) and len(set(names)) == len(names)
    assert pairs == evaltext.corpus()
    assert all(text.strip() for _, text in pairs)


def test_parts_partition_the_corpus_by_whole_topics():
    texts = {part: evaltext.split(part) for part in evaltext.PARTS}
    owners = {part: [name for name, text in evaltext.corpus() if text in texts[part]] for part in evaltext.PARTS}
    assert not set(owners["calibration"]) & set(owners["evaluation"])
    assert sorted(owners["calibration"] + owners["evaluation"]) == [name for name, _ in evaltext.corpus()]
    joined = {part: evaltext.SEPARATOR.join(t for n, t in evaltext.corpus() if n in owners[part]) for part in evaltext.PARTS}
    assert joined == texts


def test_split_is_deterministic_and_large_enough():
    for part in evaltext.PARTS:
        text = evaltext.split(part)
        assert text == evaltext.split(part)
        assert len(text) >= MIN_TOKENS[part] * CHARS_PER_TOKEN


def test_unknown_part():
    with pytest.raises(TandemError, match="unknown text part"):
        evaltext.split("training")


def test_windows_are_exact_and_consecutive(tokenizer):
    ids = tokenizer.encode(evaltext.split("calibration"))
    got = evaltext.windows(tokenizer, "calibration", window=50, count=7)
    assert [len(w) for w in got] == [50] * 7
    assert sum(got, []) == ids[:350]


def test_windows_error_when_too_few_tokens(tokenizer):
    total = len(tokenizer.encode(evaltext.split("calibration")))
    assert len(evaltext.windows(tokenizer, "calibration", window=total, count=1)[0]) == total
    with pytest.raises(TandemError, match=f"has {total} tokens"):
        evaltext.windows(tokenizer, "calibration", window=total // 2 + 1, count=2)
