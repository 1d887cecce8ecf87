"""One MatMulNBits node alone at one row (random weights, accuracy level 4): the default 0.5B recipe's lm_head and
FFN shapes by bits, block size and zero points. BENCHMARKS.md's decode-step table.

    python docs/probes/matmulnbits.py [THREADS]
"""
import sys
import time

import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

rng = np.random.default_rng(0)


def median_ms(k: int, n: int, bits: int, block: int, zero_points: bool, threads: int, runs: int = 300) -> float:
    blocks = k // block
    inits = [numpy_helper.from_array(rng.integers(0, 256, (n, blocks, block * bits // 8), dtype=np.uint8), "B"),
             numpy_helper.from_array(rng.random(n * blocks, dtype=np.float32) * 0.01, "scales")]
    if zero_points:
        inits.append(numpy_helper.from_array(rng.integers(0, 256, n * ((blocks * bits + 7) // 8), dtype=np.uint8), "zp"))
    node = helper.make_node("MatMulNBits", ["x"] + [i.name for i in inits], ["y"], domain="com.microsoft", K=k, N=n,
                            bits=bits, block_size=block, accuracy_level=4)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, k])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, n])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    x = {"x": rng.standard_normal((1, k), dtype=np.float32)}
    for _ in range(30):
        session.run(None, x)
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        session.run(None, x)
        times.append(time.perf_counter() - start)
    return float(np.median(times)) * 1e3


if __name__ == "__main__":
    threads = int(sys.argv[1]) if len(sys.argv) > 1 else 2
    for bits in (8, 4):
        print(f"lm_head 896 x 151936, int{bits} block 32 asym: {median_ms(896, 151936, bits, 32, True, threads, 200):.2f} ms")
    for k, n, what in ((896, 9728, "gate+up"), (4864, 896, "down")):
        for block in (32, 64, 128):
            for zero_points in (True, False):
                kind = "asym" if zero_points else "sym"
                print(f"{what} {k} x {n}, int4 block {block} {kind}: {median_ms(k, n, 4, block, zero_points, threads):.3f} ms")
