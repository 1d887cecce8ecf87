"""A decode step of an artifact on the CPU EP: its wall time against the time inside ORT's session runs
(Engine.runners[i].seconds), 64 steps after a 36-token prompt, 2 threads. BENCHMARKS.md's fused-vs-alternating table.

    python docs/probes/decode_step.py ARTIFACT
"""
import sys
import time

from runtime.providers import share_threads

share_threads(2)
from runtime.engine import Engine

e = Engine(sys.argv[1], slots=1, threads=2)
e.forward(0, list(range(100, 136)))
tok = 5
for _ in range(5): e.forward(0, [tok])
for r in e.runners: r.seconds = 0.0
n = 64; t = time.perf_counter()
for _ in range(n): e.forward(0, [tok])
total = (time.perf_counter() - t) / n
inside = sum(r.seconds for r in e.runners) / n
print(f"{sys.argv[1]}: step {total*1e3:.2f} ms, in ORT runs {inside*1e3:.2f} ms, outside {1e3*(total-inside):.2f} ms, graphs {len(e.runners)}")
