"""runtime.qdq_cpu: QDQ graphs on the CPU EP, their int8 weights kept as MatMulNBits instead of folded to float32."""
from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from runtime.manifest import load_manifest
from runtime.providers import session_options
from runtime.qdq_cpu import BLOCK, blocks, cpu_form


@pytest.mark.parametrize("dtype, per_channel, k", [(np.int8, True, 3 * BLOCK), (np.uint8, False, BLOCK + 40)])
def test_blocks_hold_the_dequantized_weights_exactly(dtype, per_channel, k):
    rng = np.random.default_rng(0)
    n = 24
    info = np.iinfo(dtype)
    q = rng.integers(info.min, info.max + 1, (k, n), dtype=dtype)
    scale = (rng.random(n if per_channel else (), dtype=np.float32) + 0.5) * 0.01
    zero_point = rng.integers(info.min, info.max + 1, n if per_channel else (), dtype=dtype)
    b, scales, zero_points = blocks(q, scale, zero_point)
    count = -(-k // BLOCK)
    assert b.shape == (n, count, BLOCK) and b.dtype == np.uint8
    assert scales.shape == zero_points.shape == (n * count,)
    weights = (b.astype(np.float32) - zero_points.reshape(n, count, 1)) * scales.reshape(n, count, 1)
    weights = weights.reshape(n, count * BLOCK)
    np.testing.assert_array_equal(weights[:, :k].T, (q.astype(np.float32) - zero_point) * scale)
    assert not weights[:, k:].any()  # K's padding adds nothing


def test_a16w8_graph_runs_its_weights_as_matmulnbits(static_artifacts):
    artifact = static_artifacts["a16w8"]
    spec = next(g for g in load_manifest(artifact).graphs if g.dialect == "static")
    path = artifact / spec.file
    original = onnx.load(path, load_external_data=False)
    int8 = {t.name for t in original.graph.initializer if t.data_type == onnx.TensorProto.INT8 and len(t.dims) == 2}
    weight_matmuls = sum(1 for n in original.graph.node if n.op_type == "DequantizeLinear" and n.input[0] in int8)
    with cpu_form(path) as rewritten:
        assert rewritten != path
        model = onnx.load(rewritten)
        ops = [n.op_type for n in model.graph.node]
        assert ops.count("MatMulNBits") == weight_matmuls == 2  # QKV and the output projection
        assert ops.count("DequantizeLinear") == dequantizers(original) - weight_matmuls  # the activations' stay
        assert not any(t.data_type == onnx.TensorProto.INT8 for t in model.graph.initializer)
        ours = session(rewritten)
    assert not rewritten.parent.exists()  # made for the session, gone after
    feeds = inputs(ours)
    expected, actual = session(path).run(None, feeds), ours.run(None, feeds)
    for e, a in zip(expected, actual):
        # int8 activations a block at a time: within 2 % on an AVX2 CPU, 2.2 % on AVX-512 VNNI (MLAS's kernels differ)
        assert np.abs(a - e).max() <= 0.03 * np.abs(e).max()


def test_a_graph_without_qdq_weights_loads_as_it_is(artifacts):
    spec = load_manifest(artifacts["split"]).graphs[1]
    with cpu_form(artifacts["split"] / spec.file) as path:
        assert path == artifacts["split"] / spec.file


def dequantizers(model: onnx.ModelProto) -> int:
    return sum(1 for n in model.graph.node if n.op_type == "DequantizeLinear")


def session(path) -> ort.InferenceSession:
    return ort.InferenceSession(str(path), session_options(1, "CPUExecutionProvider"), providers=["CPUExecutionProvider"])


def inputs(session: ort.InferenceSession) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(1)
    return {i.name: rng.standard_normal(i.shape).astype(np.float32) for i in session.get_inputs()}
