"""Prometheus metrics in the text exposition format, named after vLLM's (prefix `tandem:`)."""
from __future__ import annotations

import bisect
import threading
import time
from collections.abc import Callable

from runtime.generate import Stats

LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)


class Counter:
    def __init__(self) -> None:
        self.values: dict[str, float] = {}
        self._lock = threading.Lock()

    def inc(self, amount: float = 1, label: str = "") -> None:
        with self._lock:
            self.values[label] = self.values.get(label, 0) + amount


class Gauge:
    def __init__(self, read: Callable[[], float] | None = None) -> None:
        self.value, self.read = 0.0, read

    def set(self, value: float) -> None:
        self.value = value

    def get(self) -> float:
        return self.read() if self.read else self.value


class Histogram:
    def __init__(self, buckets: tuple[float, ...] = LATENCY_BUCKETS) -> None:
        self.buckets = buckets
        self.counts = [0] * (len(buckets) + 1)
        self.sum = 0.0
        self._lock = threading.Lock()

    def observe(self, value: float) -> None:
        with self._lock:
            self.counts[bisect.bisect_left(self.buckets, value)] += 1
            self.sum += value


class Metrics:
    """What the server exports at /metrics; the scheduler feeds it as tokens are produced."""

    def __init__(self, model_name: str = "") -> None:
        self.model_name = model_name
        self.started = time.time()
        self.running = Gauge()
        self.waiting = Gauge()
        self.kv_cache_usage = Gauge()
        self.prompt_tokens = Counter()
        self.generation_tokens = Counter()
        self.request_success = Counter()
        self.ttft = Histogram()
        self.itl = Histogram()
        self.e2e = Histogram()

    def observe_token(self, stats: Stats) -> None:
        if stats.completion_tokens == 1:
            self.ttft.observe(stats.ttft_s)
        else:
            self.itl.observe(stats.gap_s)

    def observe_finish(self, stats: Stats, finish_reason: str) -> None:
        self.e2e.observe(stats.ttft_s + stats.decode_s)
        self.request_success.inc(label=finish_reason)

    def render(self) -> str:
        model = f'model_name="{self.model_name}"'
        out: list[str] = []

        def header(name: str, kind: str, help_: str) -> None:
            out.extend((f"# HELP tandem:{name} {help_}", f"# TYPE tandem:{name} {kind}"))

        for name, gauge, help_ in (
            ("num_requests_running", self.running, "Requests in the decode batch or being prefilled."),
            ("num_requests_waiting", self.waiting, "Requests waiting for a KV cache slot."),
            ("kv_cache_usage_perc", self.kv_cache_usage, "Fraction of KV cache token positions in use (1 = full)."),
        ):
            header(name, "gauge", help_)
            out.append(f"tandem:{name}{{{model}}} {gauge.get():g}")
        for name, counter, help_ in (
            ("prompt_tokens_total", self.prompt_tokens, "Prefilled prompt tokens."),
            ("generation_tokens_total", self.generation_tokens, "Generated tokens."),
        ):
            header(name, "counter", help_)
            out.append(f"tandem:{name}{{{model}}} {counter.values.get('', 0):g}")
        header("request_success_total", "counter", "Finished requests by finish reason.")
        for reason, count in sorted(self.request_success.values.items()):
            out.append(f'tandem:request_success_total{{{model},finished_reason="{reason}"}} {count:g}')
        for name, hist, help_ in (
            ("time_to_first_token_seconds", self.ttft, "Request arrival to first token (queueing included)."),
            ("inter_token_latency_seconds", self.itl, "Time between consecutive tokens of a request."),
            ("e2e_request_latency_seconds", self.e2e, "Request arrival to last token."),
        ):
            header(name, "histogram", help_)
            total = 0
            for bound, count in zip((*hist.buckets, float("inf")), hist.counts):
                total += count
                le = "+Inf" if bound == float("inf") else f"{bound:g}"
                out.append(f'tandem:{name}_bucket{{{model},le="{le}"}} {total}')
            out.append(f"tandem:{name}_sum{{{model}}} {hist.sum:g}")
            out.append(f"tandem:{name}_count{{{model}}} {total}")
        return "\n".join(out) + "\n"
