"""Where prefill's ceiling is on this CPU: one MatMul of the 0.5B model's FFN up-projection shape (K 896, N 4864) at
M prompt rows, 2 threads, median of 20, as each of ORT's CPU kernels that could run it. Reports each one's rate in
GOP/s (2 * M * K * N operations a run). BENCHMARKS.md's prefill analysis.

    python docs/probes/prefill_kernels.py [M ...]    (default: 36 256 1024)

- fp32 MatMul: MLAS's SGEMM, the float ceiling;
- MatMulInteger u8 x s8: MLAS's integer GEMM (VNNI where the CPU has it), the int8 ceiling; dynamic activation
  quantization not included;
- MatMulNBits int4 block 32 asym, accuracy level 4: what the default recipe runs (int8 activations per block);
- the same at accuracy level 1: int4 weights dequantized to float, then float arithmetic.
"""
import sys
import time

import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

K, N, BLOCK = 896, 4864, 32
rng = np.random.default_rng(0)


def session(node: helper.NodeProto, inits: list, x_type: int) -> ort.InferenceSession:
    y_type = TensorProto.INT32 if x_type == TensorProto.UINT8 else TensorProto.FLOAT
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", x_type, ["m", K])],
                              [helper.make_tensor_value_info("y", y_type, ["m", N])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)])
    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def nbits(level: int) -> ort.InferenceSession:
    blocks = K // BLOCK
    packed = rng.integers(0, 256, (N, blocks, BLOCK // 2), dtype=np.uint8)
    inits = [numpy_helper.from_array(packed, "B"), numpy_helper.from_array(rng.random(N * blocks, dtype=np.float32) * 0.01, "scales"),
             numpy_helper.from_array(rng.integers(0, 256, (N * blocks + 1) // 2, dtype=np.uint8), "zp")]
    node = helper.make_node("MatMulNBits", ["x", "B", "scales", "zp"], ["y"], domain="com.microsoft", K=K, N=N, bits=4,
                            block_size=BLOCK, accuracy_level=level)
    return session(node, inits, TensorProto.FLOAT)


KERNELS = {
    "fp32 MatMul (SGEMM)": (lambda: session(helper.make_node("MatMul", ["x", "W"], ["y"]),
                                            [numpy_helper.from_array(rng.standard_normal((K, N), dtype=np.float32), "W")], TensorProto.FLOAT),
                            np.float32),
    "MatMulInteger u8 x s8 (integer GEMM)": (lambda: session(helper.make_node("MatMulInteger", ["x", "W"], ["y"]),
                                                             [numpy_helper.from_array(rng.integers(-128, 128, (K, N), dtype=np.int8), "W")],
                                                             TensorProto.UINT8), np.uint8),
    "MatMulNBits int4, accuracy level 4 (ours)": (lambda: nbits(4), np.float32),
    "MatMulNBits int4, accuracy level 1": (lambda: nbits(1), np.float32),
}

rows = [int(a) for a in sys.argv[1:]] or [36, 256, 1024]
for name, (make, dtype) in KERNELS.items():
    sess = make()
    rates = []
    for m in rows:
        x = (rng.integers(0, 256, (m, K)) if dtype == np.uint8 else rng.standard_normal((m, K))).astype(dtype)
        sess.run(None, {"x": x})
        times = []
        for _ in range(20):
            start = time.perf_counter()
            sess.run(None, {"x": x})
            times.append(time.perf_counter() - start)
        rates.append(f"M={m}: {2 * m * K * N / np.median(times) / 1e9:6.1f} GOP/s")
    print(f"{name:44s} " + "  ".join(rates))
