"""RSS each graph's CPU-EP session adds, loaded as the engine loads it (runtime.providers.model_file, tandem's
session options, 1 thread); `--folded` loads QDQ graphs as they are instead (ORT folds their weights to float32).
BENCHMARKS.md's per-graph figures for the Ryzen AI 7B.

    python docs/probes/graph_rss.py [--folded] ARTIFACT/graphs/attention.0.onnx ARTIFACT/graphs/attention.0.prefill.onnx ...
"""
import ctypes
import sys
from pathlib import Path

import onnx
import onnxruntime as ort

from runtime.providers import model_file, session_options


def rss_mb() -> int:
    return int(open("/proc/self/status").read().split("VmRSS:")[1].split()[0]) // 1024


folded = "--folded" in sys.argv
base, sessions = rss_mb(), []
for graph in (a for a in sys.argv[1:] if a != "--folded"):
    qdq = not folded and "QuantizeLinear" in {n.op_type for n in onnx.load(graph, load_external_data=False).graph.node}
    with model_file(Path(graph), "CPUExecutionProvider", qdq) as path:
        sessions.append(ort.InferenceSession(str(path), session_options(1, "CPUExecutionProvider"), providers=["CPUExecutionProvider"]))
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    print(f"{Path(graph).name}: {rss_mb() - base} MB above the start", flush=True)
