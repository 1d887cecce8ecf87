"""The CUDA recipe's GPU memory and speed under runtime variants, each in a fresh process: `own-arena` (no shared
env arena for CUDA), `noprepack` (session.disable_prepacking), `same` (the shared arena grows by what is asked,
kSameAsRequested), or `as-is`; names combine with +. Prints GPU memory after load and after the runs, TTFT at 32 and
1024 tokens, decode tokens/s over 128 steps (argmax on the host).

    python docs/device/engine_memory_variants.py ARTIFACT VARIANT
"""
import os
import subprocess
import sys
import time

import numpy as np

variant = sys.argv[2]
import runtime.providers as p

if "own-arena" in variant:
    p.ARENA_DEVICES.pop("CUDAExecutionProvider")
if "noprepack" in variant:
    orig = p.session_options
    def so(threads, provider):
        o = orig(threads, provider)
        if provider == "CUDAExecutionProvider": o.add_session_config_entry("session.disable_prepacking", "1")
        return o
    p.session_options = so
if "same" in variant:
    import functools

    import onnxruntime as ort

    def arena(provider: str) -> None:
        info = ort.OrtMemoryInfo(p.ARENA_DEVICES[provider], ort.OrtAllocatorType.ORT_ARENA_ALLOCATOR, 0, ort.OrtMemType.DEFAULT)
        ort.create_and_register_allocator_v2(provider, info, {}, ort.OrtArenaCfg(0, 1, -1, -1))

    p._shared_arena = functools.cache(arena)
from runtime.engine import Engine

e = Engine(sys.argv[1], slots=1)
def used():
    out = subprocess.run(["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"], capture_output=True, text=True, check=True).stdout
    return next(int(u) for q, u in (l.split(",") for l in out.splitlines()) if int(q) == os.getpid())
loaded = used()
ttft = []
for _ in range(4):
    e.reset(0); t = time.perf_counter(); tok = int(np.argmax(e.forward(0, list(range(100, 132))))); ttft.append(time.perf_counter() - t)
t = time.perf_counter()
for _ in range(128): tok = int(np.argmax(e.forward(0, [tok])))
dec = 128 / (time.perf_counter() - t)
e.reset(0); t = time.perf_counter(); e.forward(0, list(range(100, 1124))); t1024 = time.perf_counter() - t
e.reset(0); t = time.perf_counter(); e.forward(0, list(range(100, 1124))); t1024 = min(t1024, time.perf_counter() - t)
print(f"{variant:<22} loaded {loaded} MiB, after runs {used()} MiB, TTFT32 {min(ttft[1:])*1e3:.1f} ms, TTFT1024 {t1024*1e3:.1f} ms, decode {dec:.1f} tok/s", flush=True)
