"""Give back the pages of weight files ORT keeps mapped after a session has packed them.

ORT maps a graph's external data file and reads its initializers from there. Where a kernel prepacks a weight
(MatMulNBits at accuracy level 4 copies its quantized values, scales and block sums into a buffer of its own), the
original mapping of the scales and zero points stays, and the pages read while packing stay resident: 27 MiB for
one FFN graph of a 7B, 81 MiB for its int8 lm_head, about 0.85 GB over the model. Such a page, never written
through the mapping, is the file's page-cache page; dropping it from the mapping (madvise MADV_DONTNEED) changes no
value: a later read maps it again. A mapping with a page of its own (written, so copied: smaps' Anonymous) is left
alone. Linux only: elsewhere this does nothing.
"""
from __future__ import annotations

import ctypes
import sys
from functools import cache
from pathlib import Path

MADV_DONTNEED = 4
SMAPS = Path("/proc/self/smaps")


@cache
def _madvise():
    libc = ctypes.CDLL(None, use_errno=True)
    libc.madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
    return libc.madvise


def clean_mappings(directory: Path) -> list[tuple[int, int]]:
    """The [start, end) address ranges of this process's mappings of files in `directory` with resident pages, none
    of them copied on write."""
    ranges: list[tuple[int, int]] = []
    current: tuple[int, int] | None = None
    resident = copied = 0
    prefix = str(directory.resolve()) + "/"

    def close() -> None:
        if current and resident and not copied:
            ranges.append(current)

    for line in SMAPS.read_text().splitlines():
        head, _, rest = line.partition(" ")
        if "-" in head and not head.endswith(":"):  # a mapping's first line: range perms offset dev inode [path]
            close()
            fields = rest.split(maxsplit=4)
            path = fields[4].removesuffix(" (deleted)") if len(fields) == 5 else ""
            start, end = (int(a, 16) for a in head.split("-"))
            current, resident, copied = ((start, end) if path.startswith(prefix) else None), 0, 0
        elif head == "Rss:":
            resident = int(rest.split()[0])
        elif head == "Anonymous:":
            copied = int(rest.split()[0])
    close()
    return ranges


def release(directory: Path) -> int:
    """Drop the clean resident pages of files in `directory` that this process maps; returns the bytes of address
    range advised (not all of it was resident)."""
    if not sys.platform.startswith("linux") or not SMAPS.exists():
        return 0
    advised = 0
    for start, end in clean_mappings(directory):
        if _madvise()(start, end - start, MADV_DONTNEED) == 0:
            advised += end - start
    return advised
