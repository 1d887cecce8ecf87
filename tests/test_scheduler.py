"""Continuous batching on the tiny model: joins at step boundaries, chunked prefill beside running decodes."""
from __future__ import annotations

import queue

from runtime.generate import Chunk, Generator
from runtime.scheduler import QueueFull, Request, Scheduler


def test_a_long_prompt_is_prefilled_between_decode_steps(artifacts):
    gen = Generator.load(artifacts["split"], slots=2)
    scheduler = Scheduler(gen.engine, max_waiting=1)
    events: queue.Queue = queue.Queue()
    greedy = gen.sampling(temperature=0)
    try:
        short = Request(gen.sequence([5, 6, 7], 60, greedy), lambda c: events.put(("short", c)))
        scheduler.submit(short)
        assert events.get(timeout=30)[0] == "short"  # short is decoding
        long_prompt = list(range(10, 90))  # 10 prefill chunks of 8
        scheduler.submit(Request(gen.sequence(long_prompt, 2, greedy), lambda c: events.put(("long", c))))
        order = []
        while len([t for t, c in order if t == "long" and c.finish_reason]) < 1:
            tag, chunk = events.get(timeout=30)
            assert isinstance(chunk, Chunk)
            order.append((tag, chunk))
        first_long = next(i for i, (t, _) in enumerate(order) if t == "long")
        short_done = any(t == "short" and c.finish_reason for t, c in order[:first_long])
        assert short_done or first_long >= 9  # a short token per prefill chunk of the long prompt
    finally:
        scheduler.close()


def test_the_waiting_queue_is_bounded(artifacts):
    gen = Generator.load(artifacts["split"], slots=1)
    scheduler = Scheduler(gen.engine, max_waiting=1)
    greedy = gen.sampling(temperature=0)
    try:
        refused = 0
        for _ in range(3):
            try:
                scheduler.submit(Request(gen.sequence([5, 6, 7], 80, greedy), lambda c: None))
            except QueueFull:
                refused += 1
        assert refused >= 1  # one slot + one waiting place for three long requests
    finally:
        scheduler.close()
