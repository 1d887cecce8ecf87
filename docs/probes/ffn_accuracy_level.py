"""One 7B FFN graph at another MatMulNBits accuracy level (rewritten into a temporary copy): the RSS its session
adds and the median time of 1 and 256 rows, 2 threads. BENCHMARKS.md's level 1 against level 4.

    python docs/probes/ffn_accuracy_level.py ARTIFACT/graphs/ffn.0.onnx LEVEL
"""
import ctypes
import sys
import tempfile
import time

import numpy as np
import onnx
import onnxruntime as ort

from runtime.providers import session_options

src, acc = sys.argv[1], int(sys.argv[2])
m=onnx.load(src)
for n in m.graph.node:
    if n.op_type=='MatMulNBits':
        for a in n.attribute:
            if a.name=='accuracy_level': a.i=acc
d=tempfile.mkdtemp(); onnx.save_model(m, d+'/f.onnx', save_as_external_data=True, location='f.data'); del m
ctypes.CDLL("libc.so.6").malloc_trim(0)
rss=lambda: int(__import__("pathlib").Path("/proc/self/status").read_text().split("VmRSS:")[1].split()[0])//1024
b=rss(); s=ort.InferenceSession(d+'/f.onnx', session_options(2,'CPUExecutionProvider'), providers=['CPUExecutionProvider']); print('acc',acc,'RSS +',rss()-b,'MB')
i=s.get_inputs(); print([(x.name,x.shape) for x in i])
for S in (1,256):
    f={x.name: np.random.default_rng(0).standard_normal([1,S,3584]).astype(np.float32) for x in i}
    for _ in range(3): s.run(None,f)
    t=time.perf_counter(); n=10 if S==1 else 3
    for _ in range(n): s.run(None,f)
    print(S,'rows ms',(time.perf_counter()-t)/n*1e3)
