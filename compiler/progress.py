"""Progress bars for long compiler steps (tqdm on stderr; off for tests and non-interactive use)."""
from __future__ import annotations

from typing import Iterable, TypeVar

T = TypeVar("T")


def progress(items: Iterable[T], enabled: bool, desc: str) -> Iterable[T]:
    if not enabled:
        return items
    from tqdm import tqdm

    return tqdm(items, desc=desc)
