"""One 8-bit MatMulNBits (a 7B's QKV shape, 3584 x 4608, per-column scales repeated per block) against float64:
error and median time at 1 and 256 rows, 2 threads. BENCHMARKS.md's accuracy-level figures for runtime.qdq_cpu.

    python docs/probes/matmulnbits8.py BLOCK ACCURACY_LEVEL
"""
import sys
import time

import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

rng = np.random.default_rng(0)
K, N, block = 3584, 4608, int(sys.argv[1]); acc=int(sys.argv[2])
q = rng.integers(-128, 128, (K, N), dtype=np.int8); s = (rng.random(N, dtype=np.float32)+0.5)*0.01
W = q.astype(np.float32) * s
nb = K // block
B = (q.astype(np.int16) + 128).astype(np.uint8).T.reshape(N, nb, block)
inits = [numpy_helper.from_array(B, "B"), numpy_helper.from_array(np.repeat(s, nb), "scales"),
         numpy_helper.from_array(np.full(N * nb, 128, np.uint8), "zp")]
node = helper.make_node("MatMulNBits", ["x", "B", "scales", "zp"], ["y"], domain="com.microsoft", K=K, N=N, bits=8, block_size=block, accuracy_level=acc)
g = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["s", K])], [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["s", N])], inits)
m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])
rss=lambda: int(__import__("pathlib").Path("/proc/self/status").read_text().split("VmRSS:")[1].split()[0])//1024
o = ort.SessionOptions(); o.intra_op_num_threads = 2
b=rss(); data=m.SerializeToString(); del m, inits, B
b=rss(); sess = ort.InferenceSession(data, o, providers=["CPUExecutionProvider"]); print("session +MB", rss()-b)
for S in (1, 256):
    x = rng.standard_normal((S, K), dtype=np.float32)
    y = sess.run(None, {"x": x})[0]; ref = x.astype(np.float64) @ W.astype(np.float64)
    print(S, "max rel err", np.abs(y-ref).max()/np.abs(ref).max())
    t=[]; 
    for _ in range(20 if S==1 else 5):
        a=time.perf_counter(); sess.run(None, {"x": x}); t.append(time.perf_counter()-a)
    print(S, "ms", np.median(t)*1e3)
# fp32 matmul baseline
x1=rng.standard_normal((1,K),dtype=np.float32); t=[]
for _ in range(20):
    a=time.perf_counter(); x1@W; t.append(time.perf_counter()-a)
print("numpy fp32 1-row ms", np.median(t)*1e3)
