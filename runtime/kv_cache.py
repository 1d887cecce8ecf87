"""The shared KV cache: preallocated once, owned by the runtime, written in place by the attention graphs."""
from __future__ import annotations

import mmap
from dataclasses import dataclass, field

import numpy as np
import onnxruntime as ort

from runtime.errors import TandemError
from runtime.manifest import KVCacheSpec, past_name


@dataclass(frozen=True)
class CacheView:
    """A batch's part of one layer's K or V buffer, bound to a graph by address: past_* input and present_* output
    alike, so the graph appends new positions in place and nothing is copied."""

    device: str
    dtype: np.dtype
    shape: tuple[int, ...]
    address: int
    array: np.ndarray | None = field(default=None, compare=False)  # the same memory, where it is the host's


def _zeros(shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    """Zeros that become resident a page at a time as positions are written. numpy advises transparent huge
    pages for an array this large, so a token written to a head's 2 MiB of a 7B's cache could make all of it
    resident: 343 MiB of the 448 for 256 positions over 28 layers, 28 MiB here. A private anonymous mapping reads
    as zeros without memory of its own (the static graphs read every position); a shared one, mmap's default, would not."""
    size = int(np.prod(shape)) * dtype.itemsize
    private = {"flags": mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS} if hasattr(mmap, "MAP_ANONYMOUS") else {}
    return np.frombuffer(mmap.mmap(-1, size, **private), dtype).reshape(shape)


class KVCache:
    """K and V for every layer and slot, one [slots, kv_heads, capacity, head_dim] buffer each, on the device where
    the attention graphs run (host memory for the CPU EP, GPU memory for CUDA). A run of slots [start, stop) is a
    batch: a contiguous part of every buffer."""

    def __init__(self, spec: KVCacheSpec, slots: int = 1, device: str = "cpu") -> None:
        self.spec = spec
        self.device = device
        self.dtype = np.dtype(spec.dtype)
        self.lengths = np.zeros(slots, dtype=np.int64)
        shape = (slots, spec.kv_heads, spec.capacity, spec.head_dim)
        # zeros: on the CPU the OrtValue keeps the array as its memory (written here too, for static graphs);
        # elsewhere it is copied over once
        self._arrays = {past_name(kind, layer): _zeros(shape, self.dtype) for layer in range(spec.layers) for kind in ("key", "value")}
        self._buffers = {name: ort.OrtValue.ortvalue_from_numpy(array, device, 0) for name, array in self._arrays.items()}
        if device != "cpu":
            self._arrays.clear()
        self._views: dict[tuple[int, int], dict[str, CacheView]] = {}

    @property
    def slots(self) -> int:
        return len(self.lengths)

    @property
    def capacity(self) -> int:
        return self.spec.capacity

    def bindings(self, start: int, stop: int) -> dict[str, CacheView]:
        """The past_* views of slots [start, stop) as one batch (graphs write present_* into the same memory)."""
        if (start, stop) not in self._views:  # made once per batch: the buffers never move
            slot_bytes = self.spec.kv_heads * self.capacity * self.spec.head_dim * self.dtype.itemsize
            shape = (stop - start, self.spec.kv_heads, self.capacity, self.spec.head_dim)
            self._views[start, stop] = {
                name: CacheView(self.device, self.dtype, shape, buffer.data_ptr() + start * slot_bytes,
                                self._arrays[name][start:stop] if self._arrays else None)
                for name, buffer in self._buffers.items()
            }
        return self._views[start, stop]

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
