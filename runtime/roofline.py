"""roofline: how fast decode could be on this machine's memory, to judge a measured decode rate against.

Batch-1 decode reads every weight once per token, plus the KV cache so far; the CPU cannot produce tokens
faster than its memory delivers those bytes. The bandwidth is measured here (threads summing their own part of
a large array), not taken from a datasheet.
"""
from __future__ import annotations

import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from runtime.manifest import PREFILL_SUFFIX, Manifest


def memory_bandwidth(threads: int = 0, size: int = 1 << 28, repeats: int = 5) -> float:
    """Read bandwidth in bytes/s: the best of `repeats` passes of `threads` threads (0: one per core) summing
    disjoint parts of a `size`-byte array (numpy releases the GIL while it sums)."""
    threads = threads or os.cpu_count() or 1
    data = np.ones(size // 4, dtype=np.float32)
    parts = np.array_split(data, threads)
    best = float("inf")
    with ThreadPoolExecutor(threads) as pool:
        for _ in range(repeats):
            start = time.perf_counter()
            list(pool.map(np.sum, parts))
            best = min(best, time.perf_counter() - start)
    return data.nbytes / best


def bytes_per_token(manifest: Manifest, context: int) -> int:
    """Bytes one decode step reads at `context` tokens: every graph file but the embedding's (a step reads one
    row of its table) and the prompt-chunk forms', and the K and V of every layer so far."""
    weights = sum(f.size for f in manifest.files if f.path.startswith("graphs/") and not _unread(Path(f.path).name))
    kv = manifest.kv_cache
    cache = 2 * kv.layers * kv.kv_heads * kv.head_dim * np.dtype(kv.dtype).itemsize * context
    return weights + cache


def _unread(name: str) -> bool:
    """A graph file a decode step does not read: the embedding's, or a prefill form's (graph or weights)."""
    return name.startswith("embed.") or PREFILL_SUFFIX in name
