"""RSS a static graph's CPU-EP sessions add: its decode form, its prefill form, and the decode form again with QDQ
unfused (`session.disable_quant_qdq`, as the engine runs QDQ graphs where ORT's integer MatMul is not exact).

    python docs/probes/session_rss.py ARTIFACT/graphs/attention.0
"""
import sys

import onnxruntime as ort


def rss_mb() -> int:
    return int(open("/proc/self/status").read().split("VmRSS:")[1].split()[0]) // 1024


def options(unfused: bool) -> ort.SessionOptions:
    o = ort.SessionOptions()
    o.intra_op_num_threads = 1
    if unfused:
        o.add_session_config_entry("session.disable_quant_qdq", "1")
    return o


graph, base, sessions = sys.argv[1], rss_mb(), []
for form, unfused in ((".onnx", False), (".prefill.onnx", False), (".onnx", True)):
    sessions.append(ort.InferenceSession(graph + form, options(unfused), providers=["CPUExecutionProvider"]))
    print(f"+ {form}{' unfused' if unfused else ''}: {rss_mb() - base} MB above the start")
