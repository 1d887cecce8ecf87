"""Fifty one-node MatMulNBits sessions against one fifty-node session on the shared thread pool (`global`) or
per-session pools (`own`): the cost of a session run. BENCHMARKS.md's alternating-layout breakdown.

    python docs/probes/session_runs.py global|own
"""
import sys
import time

import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

glob = sys.argv[1] == "global"
if glob: ort.capi._pybind_state.set_global_thread_pool_sizes(2, 1)
rng = np.random.default_rng(0); K = N = 896; bs = 32
def mm(i, x, y):
    inits = [numpy_helper.from_array(rng.integers(0, 256, (N, K // bs, bs // 2), dtype=np.uint8), f"B{i}"),
             numpy_helper.from_array(rng.random(N * K // bs, dtype=np.float32) * 0.01, f"S{i}")]
    return helper.make_node("MatMulNBits", [x, f"B{i}", f"S{i}"], [y], domain="com.microsoft", K=K, N=N, bits=4, block_size=bs, accuracy_level=4), inits
def model(count):
    nodes, inits = [], []
    for i in range(count):
        n, t = mm(i, "x" if i == 0 else f"t{i}", "y" if i == count - 1 else f"t{i+1}"); nodes.append(n); inits += t
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1, K])], [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 1, N])], inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)]).SerializeToString()
def sess(count):
    o = ort.SessionOptions()
    if glob: o.use_per_session_threads = False
    else: o.intra_op_num_threads = 2
    return ort.InferenceSession(model(count), o, providers=["CPUExecutionProvider"])
x = ort.OrtValue.ortvalue_from_numpy(np.ones((1, 1, K), np.float32)); y = ort.OrtValue.ortvalue_from_numpy(np.ones((1, 1, N), np.float32))
def bind(s):
    b = s.io_binding(); b.bind_ortvalue_input("x", x); b.bind_ortvalue_output("y", y); return b
one = sess(50); b1 = bind(one)
many = [sess(1) for _ in range(50)]; bm = [bind(s) for s in many]
for _ in range(200):
    one.run_with_iobinding(b1)
    for s, b in zip(many, bm): s.run_with_iobinding(b)
for label, f in (("one session, 50 nodes", lambda: one.run_with_iobinding(b1)), ("50 sessions, 1 node each", lambda: [s.run_with_iobinding(b) for s, b in zip(many, bm)])):
    t = time.perf_counter()
    for _ in range(500): f()
    print(sys.argv[1], label, f"{(time.perf_counter() - t) / 500 * 1e3:.3f} ms")
