"""Real text for calibration and fidelity evaluation, with no download: the help topics of the Python docs.

`pydoc_data.topics` ships with CPython, so its content is fixed per Python version (not across versions).
"""
from __future__ import annotations

import hashlib
from typing import Literal

from pydoc_data.topics import topics

from runtime.errors import TandemError
from runtime.tokenizer import Tokenizer

Part = Literal["calibration", "evaluation"]
PARTS: tuple[Part, ...] = ("calibration", "evaluation")
CALIBRATION_PERCENT = 20  # share of topics (by stable hash of the name) that go to calibration
SEPARATOR = "\n\n"


def corpus() -> list[tuple[str, str]]:
    """(topic name, help text) pairs, sorted by topic name."""
    return sorted(topics.items())


def part_of(name: str) -> Part:
    """The part a topic belongs to; a stable hash of its name, so the split never depends on the corpus order."""
    bucket = int.from_bytes(hashlib.sha256(name.encode("utf-8")).digest()[:8], "big") % 100
    return "calibration" if bucket < CALIBRATION_PERCENT else "evaluation"


def split(part: Part) -> str:
    """The texts of the part's topics, in name order, joined with a blank line."""
    if part not in PARTS:
        raise TandemError(f"unknown text part {part!r}; expected one of {', '.join(PARTS)}")
    return SEPARATOR.join(text for name, text in corpus() if part_of(name) == part)


def windows(tokenizer: Tokenizer, part: Part, window: int, count: int) -> list[list[int]]:
    """The first `count` consecutive, non-overlapping windows of exactly `window` tokens of the part's text."""
    if window < 1 or count < 1:
        raise TandemError(f"window and count must be positive, got window={window}, count={count}")
    ids = tokenizer.encode(split(part))
    if len(ids) < window * count:
        raise TandemError(
            f"the {part} text has {len(ids)} tokens, fewer than {count} windows of {window} ({window * count})"
        )
    return [ids[i * window:(i + 1) * window] for i in range(count)]
