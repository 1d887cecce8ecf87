"""GPU kernel time of a 32-token prefill and 32 greedy decode steps, by kernel (torch.profiler over CUPTI sees
ORT's kernels in the same process): `python3 docs/device/decode_profile.py tandem|genai DIR`."""
from __future__ import annotations

import sys
import time

import numpy as np
import torch
from torch.profiler import ProfilerActivity, profile

STEPS, PROMPT = 32, list(range(100, 132))


def runner(kind: str, path: str):
    if kind == "tandem":
        from runtime.engine import Engine

        engine = Engine(path, slots=1)

        def run() -> None:
            engine.reset(0)
            token = int(np.argmax(engine.forward(0, PROMPT)))
            for _ in range(STEPS):
                token = int(np.argmax(engine.forward(0, [token])))

        return run
    import onnxruntime_genai as og

    model = og.Model(path)

    def run() -> None:
        params = og.GeneratorParams(model)
        params.set_search_options(max_length=4096, do_sample=False)
        generator = og.Generator(model, params)
        generator.append_tokens([PROMPT])
        for _ in range(STEPS):
            generator.generate_next_token()

    return run


def main(kind: str, path: str) -> None:
    run = runner(kind, path)
    run(), run()  # warm: CUDA graphs captured, kernels loaded
    start = time.perf_counter()
    run()
    wall = time.perf_counter() - start
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        run()
    rows = sorted(((e.self_device_time_total, e.count, e.key) for e in prof.key_averages()), reverse=True)
    print(f"{kind} {path}: {wall * 1e3:.1f} ms wall for the prefill and {STEPS} steps (unprofiled); "
          f"GPU kernels {sum(r[0] for r in rows) / 1e3:.1f} ms (profiled)")
    for us, count, key in rows[:16]:
        if us:
            print(f"{us / 1e3:9.2f} ms {count:6d}  {key[:100]}")


if __name__ == "__main__":
    main(*sys.argv[1:3])
