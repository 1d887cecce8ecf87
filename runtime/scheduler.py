"""Continuous batching: the running sequences share one decode step over the KV cache's slots.

One worker thread owns the engine. Each step it frees the slots of finished and cancelled sequences, admits
waiting requests into free slots, runs one batched prefill step (the next prompt chunks of the newest sequences,
within a budget of prefill_chunk tokens, so a long prompt never stalls the others for more than a chunk), then
one batched decode step for every sequence past its prompt.
"""
from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from runtime.engine import Engine
from runtime.errors import TandemError
from runtime.generate import Chunk, Sequence
from runtime.metrics import Metrics

log = logging.getLogger("tandem")


class QueueFull(TandemError):
    """The waiting queue is at its bound; the caller should retry later."""


@dataclass(eq=False)
class Request:
    """A sequence in the scheduler. `emit` is called on the worker thread with each chunk, or with the error
    that ended the request; it must not block."""

    sequence: Sequence
    emit: Callable[[Chunk | Exception], None]
    slot: int = -1
    fed: int = 0  # prompt tokens already in the KV cache
    next_token: int | None = None  # sampled, not yet fed
    cancelled: bool = False


class Scheduler:
    def __init__(self, engine: Engine, max_waiting: int = 64, metrics: Metrics | None = None) -> None:
        self.engine = engine
        self.max_waiting = max_waiting
        self.metrics = metrics or Metrics()
        self.metrics.running.read = lambda: len(self.running)
        self.metrics.waiting.read = lambda: len(self.waiting)
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self._wake = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._loop, name="tandem-scheduler", daemon=True)
        self._thread.start()

    @property
    def slots(self) -> int:
        return self.engine.cache.slots

    def submit(self, request: Request) -> None:
        with self._wake:
            if self._closed:
                raise TandemError("the server is shutting down")
            if len(self.waiting) >= self.max_waiting:
                raise QueueFull(f"{len(self.waiting)} requests are waiting, the queue's limit; retry later")
            self.waiting.append(request)
            self._wake.notify()

    def cancel(self, request: Request) -> None:
        """Stop a request (e.g. its client went away); its slot is freed at the next step boundary."""
        with self._wake:
            request.cancelled = True
            self._wake.notify()

    def close(self) -> None:
        with self._wake:
            self._closed = True
            self._wake.notify()
        self._thread.join(timeout=30)

    def _loop(self) -> None:
        while True:
            with self._wake:
                while not self._closed and not self.waiting and not self.running:
                    self._wake.wait()
                if self._closed:
                    for request in [*self.waiting, *self.running]:
                        request.emit(TandemError("the server is shutting down"))
                    return
                self._admit()
            self.step()

    def _admit(self) -> None:
        """Drop cancelled requests; move waiting ones into free slots, lowest first (the decode batch is slots
        [0, highest in use], so packing them low keeps it small)."""
        for request in [r for r in self.running if r.cancelled]:
            self.metrics.request_success.inc(label="abort")  # counted before it leaves `running`: scrapes see both
            self._finish(request)
        for request in [r for r in self.waiting if r.cancelled]:
            self.waiting.remove(request)
            self.metrics.request_success.inc(label="abort")
        free = sorted(set(range(self.slots)) - {r.slot for r in self.running})
        while self.waiting and free:
            request = self.waiting.popleft()
            request.slot = free.pop(0)
            self.engine.reset(request.slot)
            self.running.append(request)

    def step(self) -> None:
        prefill = self._prefill_batch()
        if prefill:
            chunks = [r.sequence.prompt_ids[r.fed : r.fed + self.engine.manifest.prefill_chunk] for r in prefill]
            logits = self._guarded(prefill, lambda: self.engine.extend([r.slot for r in prefill], chunks))
            if logits is not None:
                for request, chunk, row in zip(prefill, chunks, logits):
                    request.fed += len(chunk)
                    self.metrics.prompt_tokens.inc(len(chunk))
                    if request.fed == len(request.sequence.prompt_ids):
                        self._accept(request, row)
        batch = [r for r in self.running if r.next_token is not None and not r.cancelled]
        if batch:
            tokens = [[r.next_token] for r in batch]
            logits = self._guarded(batch, lambda: self.engine.extend([r.slot for r in batch], tokens))
            if logits is not None:
                for request, row in zip(batch, logits):
                    self._accept(request, row)
        self.metrics.kv_cache_usage.set(self.engine.cache.usage())

    def _prefill_batch(self) -> list[Request]:
        """Sequences whose next prompt chunks run in this step, oldest first. Prompts that start in this step share
        it while the padded batch (the run of slots they span times the longest chunk) stays within prefill_chunk
        tokens, so short prompts prefill together and a long one takes its chunks alone; a continuing chunk runs
        alone (ORT's GroupQueryAttention takes past context only at batch 1 when a step has several tokens)."""
        budget = self.engine.manifest.prefill_chunk
        pending = [r for r in self.running if r.fed < len(r.sequence.prompt_ids) and not r.cancelled]
        if not pending or pending[0].fed:
            return pending[:1]
        chosen = pending[:1]
        for request in pending[1:]:
            group = [*chosen, request]
            slots = [r.slot for r in group]
            span = range(min(slots), max(slots) + 1)
            width = max(min(len(r.sequence.prompt_ids), budget) for r in group)
            if not request.fed and len(span) * width <= budget and not self.engine.cache.lengths[span.start : span.stop].any():
                chosen = group
        return chosen

    def _guarded(self, requests: list[Request], run: Callable[[], np.ndarray]) -> np.ndarray | None:
        """Run an engine step; if it fails, end its requests with the error and keep serving the others."""
        try:
            return run()
        except Exception as e:  # noqa: BLE001 - one failed step must not take the server down
            log.error("engine step failed for %d request(s): %s", len(requests), e)
            for request in requests:
                request.emit(e if isinstance(e, TandemError) else TandemError(f"generation failed: {e}"))
                self._finish(request)
            return None

    def _accept(self, request: Request, logits: np.ndarray) -> None:
        request.next_token = None
        chunk = request.sequence.accept(logits)
        if chunk.token_id is not None:
            self.metrics.generation_tokens.inc()
            self.metrics.observe_token(request.sequence.stats)
        if chunk.finish_reason:  # counted and freed before its client sees the end: a scrape after the reply shows both
            self.metrics.observe_finish(request.sequence.stats, chunk.finish_reason)
            self._finish(request)
        else:
            request.next_token = chunk.token_id
        request.emit(chunk)

    def _finish(self, request: Request) -> None:
        if request in self.running:
            self.running.remove(request)
            self.engine.reset(request.slot)
