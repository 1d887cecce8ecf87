"""The shared KV cache: preallocated once, owned by the runtime, written in place by the attention graphs."""
from __future__ import annotations

import numpy as np
import onnxruntime as ort

from runtime.errors import TandemError
from runtime.manifest import KVCacheSpec, past_name


class KVCache:
    """K and V for every layer and slot ([layers, slots, kv_heads, capacity, head_dim]).

    A run of slots [start, stop) is a batch: its per-layer views are wrapped once as OrtValues over the same memory,
    so binding the cache into a graph as past_* input and present_* output copies nothing.
    """

    def __init__(self, spec: KVCacheSpec, slots: int = 1) -> None:
        shape = (spec.layers, slots, spec.kv_heads, spec.capacity, spec.head_dim)
        self.spec = spec
        self.keys = np.zeros(shape, dtype=np.float32)
        self.values = np.zeros(shape, dtype=np.float32)
        self.lengths = np.zeros(slots, dtype=np.int64)
        self._bindings: dict[tuple[int, int], dict[str, ort.OrtValue]] = {}

    @property
    def slots(self) -> int:
        return len(self.lengths)

    @property
    def capacity(self) -> int:
        return self.spec.capacity

    def bindings(self, start: int, stop: int) -> dict[str, ort.OrtValue]:
        """The past_* OrtValues of slots [start, stop) as one batch (graphs write present_* into the same memory)."""
        if (start, stop) not in self._bindings:
            self._bindings[start, stop] = {
                past_name(kind, layer): ort.OrtValue.ortvalue_from_numpy(store[layer, start:stop])
                for layer in range(self.spec.layers)
                for kind, store in (("key", self.keys), ("value", self.values))
            }
        return self._bindings[start, stop]

    def usage(self) -> float:
        """Fraction of the cache's token positions in use."""
        return float(self.lengths.sum()) / (self.capacity * self.slots)

    def update(self, slot: int, new_tokens: int) -> int:
        """Account for new_tokens written at the end of the slot; returns the slot's new length."""
        length = int(self.lengths[slot]) + new_tokens
        if length > self.capacity:
            raise TandemError(f"context of {length} tokens does not fit the KV cache capacity of {self.capacity}")
        self.lengths[slot] = length
        return length

    def reset(self, slot: int) -> None:
        self.lengths[slot] = 0
