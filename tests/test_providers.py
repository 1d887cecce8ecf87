"""Sessions compute what the artifact's quantized graphs mean, on whatever CPU runs them."""
from __future__ import annotations

import numpy as np
import onnxruntime as ort
import onnx
from onnx import TensorProto, helper, numpy_helper

from runtime.manifest import RoleSpec
from runtime.providers import create_session, session_options


def test_cpu_qdq_matmul_is_the_exact_quantized_arithmetic():
    """Full-range uint8 activations times int8 weights: where ORT's integer kernel saturates (x86 without VNNI)
    the session must run the unfused Q/DQ arithmetic instead (5% error otherwise)."""
    rng = np.random.default_rng(0)
    k, n = 896, 256
    w = rng.standard_normal((k, n)).astype(np.float32)
    w_scale = (np.abs(w).max(0) / 127).astype(np.float32)
    w_q = np.round(w / w_scale).astype(np.int8)
    x = (rng.standard_normal((4, k)) * 3).astype(np.float32)
    x_scale = np.float32((x.max() - x.min()) / 255)
    x_zero = np.uint8(np.round(-x.min() / x_scale))
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "xs", "xz"], ["xq"]),
        helper.make_node("DequantizeLinear", ["xq", "xs", "xz"], ["xd"]),
        helper.make_node("DequantizeLinear", ["wq", "ws", "wz"], ["wd"], axis=1),
        helper.make_node("MatMul", ["xd", "wd"], ["y"]),
    ]
    weights = {"xs": np.array(x_scale), "xz": np.array(x_zero), "wq": w_q, "ws": w_scale, "wz": np.zeros(n, np.int8)}
    graph = helper.make_graph(
        nodes, "qdq", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, n])],
        [numpy_helper.from_array(v, name) for name, v in weights.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    session = ort.InferenceSession(
        model.SerializeToString(), session_options(1, "CPUExecutionProvider"), providers=["CPUExecutionProvider"]
    )
    y = session.run(None, {"x": x})[0]
    x_q = np.clip(np.round(x / x_scale) + x_zero, 0, 255)
    expected = ((x_q - x_zero) * x_scale) @ (w_q.astype(np.float32) * w_scale)
    assert np.abs(y - expected).max() < 1e-4 * np.abs(expected).max()


def test_a_chain_entry_applies_its_session_config_entries_to_its_own_sessions(tmp_path):
    """Session config entries belong to one chain entry: here the first asks ORT to read the file in its ORT
    format, which an ONNX file is not, so that entry is passed over and the next one (without it) takes the graph."""
    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"])], "relu",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])], [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])],
    )
    path = tmp_path / "relu.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)]), path)
    chain = RoleSpec(providers=[{"name": "CPU", "session": {"session.load_model_format": "ORT"}}, "CPU"])
    session, placement = create_session("relu", path, "cpu", chain.providers, 1)
    assert placement.provider == "CPU" and len(placement.skipped) == 1 and placement.skipped[0].startswith("CPU: ")
    assert session.run(None, {"x": np.array([-1, 2], np.float32)})[0].tolist() == [0, 2]
