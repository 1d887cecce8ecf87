"""One graph on the OpenVINO EP under several configs against the CPU EP: RSS after load and after a run, and time.

python docs/device/ov_ffn.py GRAPH.onnx [ROWS]: each config in a fresh process (RSS is per process).
"""
from __future__ import annotations

import json
import subprocess
import sys
import time

CONFIGS = {
    "CPU EP": None,
    "OpenVINO bf16": {"INFERENCE_PRECISION_HINT": "bf16"},
    "OpenVINO f32": {"INFERENCE_PRECISION_HINT": "f32"},
    "OpenVINO default": {},
    "OpenVINO bf16, no dynamic quantization": {"INFERENCE_PRECISION_HINT": "bf16", "DYNAMIC_QUANTIZATION_GROUP_SIZE": "0"},
}


def rss_mb() -> int:
    return int(open("/proc/self/status").read().split("VmRSS:")[1].split()[0]) // 1024


def one(path: str, rows: int, name: str) -> None:
    import numpy as np
    import onnxruntime as ort

    config = CONFIGS[name]
    providers = ["CPUExecutionProvider"] if config is None else [
        ("OpenVINOExecutionProvider", {"device_type": "CPU", "load_config": json.dumps({"CPU": config})})]
    before = rss_mb()
    session = ort.InferenceSession(path, providers=providers)
    loaded = rss_mb()
    x = np.random.default_rng(0).standard_normal((1, rows, 3584)).astype(np.float32)
    feed = {session.get_inputs()[0].name: x}
    start = time.perf_counter(); session.run(None, feed); first = time.perf_counter() - start
    times = []
    for _ in range(3):
        start = time.perf_counter(); session.run(None, feed); times.append(time.perf_counter() - start)
    print(f"{name:<40} load +{loaded - before} MB, after runs +{rss_mb() - before} MB; {rows} rows: first {first * 1e3:.0f} ms, "
          f"then {sorted(times)[1] * 1e3:.0f} ms; {session.get_providers()[0]}", flush=True)


if __name__ == "__main__":
    if len(sys.argv) > 3:
        one(sys.argv[1], int(sys.argv[2]), sys.argv[3])
    else:
        for rows in (1024, 32):
            for name in CONFIGS:
                subprocess.run([sys.executable, __file__, sys.argv[1], str(rows), name])
