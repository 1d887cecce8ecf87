"""Where an artifact's GPU memory goes: the process's GPU memory (nvidia-smi's figure) after each stage of loading
and running it, and ORT's shared CUDA arena's own count where it reports one.

    python docs/device/gpu_memory.py ARTIFACT
"""
import os
import subprocess
import sys

import numpy as np


def used_mib() -> int:
    out = subprocess.run(["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"],
                         capture_output=True, text=True, check=True).stdout
    return next((int(u) for p, u in (line.split(",") for line in out.splitlines()) if int(p) == os.getpid()), 0)


def stage(name: str) -> None:
    print(f"{name:<48} {used_mib():>6} MiB", flush=True)


import onnxruntime as ort
from onnx import TensorProto, helper

stage("onnxruntime imported")
identity = helper.make_model(helper.make_graph(  # a one-node CUDA session: the CUDA context and the EP's handles
    [helper.make_node("Identity", ["x"], ["y"])], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
    [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])]), ir_version=10,
    opset_imports=[helper.make_opsetid("", 17)])
ort.InferenceSession(identity.SerializeToString(), providers=["CUDAExecutionProvider"]).run(None, {"x": np.zeros(1, np.float32)})
stage("a one-node CUDA session run")

from runtime.engine import Engine

engine = Engine(sys.argv[1], slots=1)
stage(f"engine loaded (KV cache {engine.capacity} positions)")
engine.forward(0, [1, 2, 3])
stage("a 3-token prompt")
for _ in range(3):
    engine.forward(0, [5])
stage("3 decode steps")
engine.reset(0)
engine.forward(0, list(range(100, 132)))
stage("a 32-token prompt")
engine.reset(0)
engine.forward(0, list(range(100, 1124)))
stage("a 1024-token prompt")
for _ in range(3):
    engine.forward(0, [5])
stage("3 decode steps after it")
