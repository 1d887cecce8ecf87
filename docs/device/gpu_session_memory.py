"""GPU memory of one artifact graph's CUDA session under different ORT settings, each in a fresh process.

    python docs/device/gpu_session_memory.py GRAPH.onnx
"""
import os
import subprocess
import sys

VARIANTS = {
    "defaults (a session arena, kNextPowerOfTwo)": {},
    "no prepacking": {"session.disable_prepacking": "1"},
    "initializers on the device allocator": {"session.use_device_allocator_for_initializers": "1"},
    "no graph optimizations": {"level": "0"},
}

if len(sys.argv) == 3:  # one variant, in this process
    import onnxruntime as ort

    options = ort.SessionOptions()
    for key, value in VARIANTS[sys.argv[2]].items():
        if key == "level":
            options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        else:
            options.add_session_config_entry(key, value)
    session = ort.InferenceSession(sys.argv[1], options, providers=["CUDAExecutionProvider"])
    out = subprocess.run(["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"],
                         capture_output=True, text=True, check=True).stdout
    used = next(int(u) for p, u in (line.split(",") for line in out.splitlines()) if int(p) == os.getpid())
    print(f"{sys.argv[2]:<48} {used:>6} MiB", flush=True)
else:
    for name in VARIANTS:
        subprocess.run([sys.executable, __file__, sys.argv[1], name], check=False)
