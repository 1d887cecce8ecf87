"""Batched decode steps of one artifact with and without overlap (two micro-batches, the second a graph behind the
first, so that where attention and FFN run on different EPs both work at once): ms a step, tokens/s, the time in
each EP, and the largest logits difference between the two. Usage: overlap.py ARTIFACT ROWS[,ROWS...] STEPS"""
import json
import sys
import time

import numpy as np

from runtime.engine import Engine
from runtime.providers import share_threads

artifact, rows_list, steps = sys.argv[1], [int(r) for r in sys.argv[2].split(",")], int(sys.argv[3])
share_threads(0)
report = []
for rows in rows_list:
    logits = {}
    for overlap in (False, True):
        engine = Engine(artifact, slots=rows, overlap=overlap)
        for slot in range(rows):
            engine.forward(slot, list(range(100 + slot, 132 + slot)))  # a 32-token prompt each
        batch = list(range(rows))
        for _ in range(3):  # warm-up: CUDA graphs are captured at a batch's first decode step
            engine.extend(batch, [[7]] * rows)
        share = dict(engine.time_share())
        start = time.perf_counter()
        for _ in range(steps):
            logits[overlap] = engine.extend(batch, [[7]] * rows)
        seconds = (time.perf_counter() - start) / steps
        ep = {k: round(v - share.get(k, 0.0), 4) for k, v in engine.time_share().items()}
        report.append({"rows": rows, "overlap": overlap, "ms_per_step": round(seconds * 1e3, 3),
                       "tokens_per_s": round(rows / seconds, 1), "seconds_in_each_ep": ep})
        print(json.dumps(report[-1]), flush=True)
        del engine
    print(json.dumps({"rows": rows, "max_abs_logits_difference": float(np.abs(logits[True] - logits[False]).max())}), flush=True)
