"""The KV cache's host memory: resident as far as positions are written, whatever its capacity."""
from __future__ import annotations

import sys

import pytest

from runtime.kv_cache import KVCache
from runtime.manifest import KVCacheSpec

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")


def resident_mib() -> float:
    return int(open("/proc/self/status").read().split("VmRSS:")[1].split()[0]) / 1024


def test_only_the_written_positions_are_resident():
    """A 7B's cache shape, 8 layers (128 MiB at 4096 positions): 256 positions written, all of them read."""
    before = resident_mib()
    cache = KVCache(KVCacheSpec(layers=8, kv_heads=4, head_dim=128, capacity=4096))
    for view in cache.bindings(0, 1).values():
        view.array[0, :, :256] = 1.0
        assert float(view.array.sum()) == 4 * 256 * 128  # the rest reads as zeros
    written = 16 * 4 * 256 * 128 * 4 / 2**20  # 8 MiB
    assert resident_mib() - before < 2 * written + 4
