"""Hand-written block quantization: ORT's MatMulNBits computes exactly our dequantized weights, and the
clipping search with GPTQ on calibration statistics beats plain min/max rounding on the layer's output."""
from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from compiler.blockquant import DAMP, gptq_factor, quantize_weight

K, N = 200, 48  # K not a multiple of the block: the last block is padded


def matmulnbits(q, k: int, n: int, accuracy_level: int = 0) -> ort.InferenceSession:
    inits = [numpy_helper.from_array(q.packed, "B"), numpy_helper.from_array(q.scales, "scales")]
    if q.zero_points is not None:
        inits.append(numpy_helper.from_array(q.zero_points, "zp"))
    node = helper.make_node("MatMulNBits", ["A", *(i.name for i in inits)], ["Y"], domain="com.microsoft",
                            K=k, N=n, bits=q.bits, block_size=q.block_size, accuracy_level=accuracy_level)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("A", TensorProto.FLOAT, [None, k])],
                              [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [None, n])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)])
    model.ir_version = 10
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


@pytest.mark.parametrize("bits, block, symmetric", [(4, 32, False), (4, 32, True), (4, 64, False), (8, 32, False), (4, 16, True)])
def test_ort_runs_exactly_our_dequantized_weights(bits, block, symmetric):
    rng = np.random.default_rng(0)
    w = rng.standard_normal((K, N)).astype(np.float32) * 0.05
    q = quantize_weight(w, bits, block, symmetric)
    a = rng.standard_normal((3, K)).astype(np.float32)
    expected = a @ q.dequantize(K)
    got = matmulnbits(q, K, N).run(None, {"A": a})[0]
    assert np.abs(got - expected).max() / np.abs(expected).max() < 1e-5
    relative_rms = np.sqrt(((q.dequantize(K) - w) ** 2).mean() / (w * w).mean())
    assert relative_rms < (0.15 if bits == 4 else 0.01)


def rtn(w: np.ndarray, block: int) -> np.ndarray:
    """Plain asymmetric min/max round-to-nearest (what ORT's default quantizer does)."""
    x = np.zeros((w.shape[1], -(-w.shape[0] // block) * block), dtype=np.float32)
    x[:, : w.shape[0]] = w.T
    x = x.reshape(w.shape[1], -1, block)
    lo, hi = x.min(-1), x.max(-1)
    s = np.where(hi > lo, (hi - lo) / 15, 1e-8)
    zp = np.clip(np.round(-lo / s), 0, 15)
    q = np.clip(np.round(x / s[..., None] + zp[..., None]), 0, 15)
    return ((q - zp[..., None]) * s[..., None]).reshape(w.shape[1], -1)[:, : w.shape[0]].T


def test_calibrated_quantization_beats_rtn_on_output_error():
    rng = np.random.default_rng(1)
    w = rng.standard_normal((K, N)).astype(np.float32) * 0.05
    w[rng.integers(0, K, 30), rng.integers(0, N, 30)] = 0.4  # outliers
    scale = np.ones(K, dtype=np.float32)
    scale[rng.integers(0, K, 6)] = 30.0  # a few channels carry most of the activation energy, as in Qwen
    mix = np.eye(K, dtype=np.float32) + 0.3 * rng.standard_normal((K, K)).astype(np.float32) / np.sqrt(K)
    a = (rng.standard_normal((512, K)).astype(np.float32) * scale) @ mix  # correlated channels, as real activations
    hessian = a.T @ a / len(a)
    out_err = lambda deq: float(((a @ deq - a @ w) ** 2).mean())  # noqa: E731
    ours = out_err(quantize_weight(w, 4, 32, False, gptq_factor(hessian.copy())).dequantize(K))
    unweighted = out_err(quantize_weight(w, 4, 32, False).dequantize(K))
    plain = out_err(rtn(w, 32))
    assert ours < unweighted < plain
    assert ours < 0.7 * plain


@pytest.mark.parametrize("with_hessian", [False, True])
def test_columns_quantized_in_parts_give_the_same_result(with_hessian, monkeypatch):
    """Output columns are independent, so bounding memory by quantizing them in parts changes nothing (with GPTQ,
    nothing beyond float rounding: BLAS sums the error updates in another order for another width)."""
    import compiler.blockquant as bq

    rng = np.random.default_rng(3)
    w = rng.standard_normal((K, N)).astype(np.float32)
    x = rng.standard_normal((500, K)).astype(np.float32)
    factor = gptq_factor(x.T @ x / len(x)) if with_hessian else None
    whole = quantize_weight(w, 4, 32, False, factor)
    monkeypatch.setattr(bq, "WEIGHTS_AT_ONCE", K * 10)  # parts of 10, 10, 10, 10 and 8 columns
    parts = quantize_weight(w, 4, 32, False, factor)
    if not with_hessian:
        for a, b in [(whole.packed, parts.packed), (whole.scales, parts.scales), (whole.zero_points, parts.zero_points)]:
            np.testing.assert_array_equal(a, b)
    np.testing.assert_allclose(parts.dequantize(K), whole.dequantize(K), atol=1e-5)


def test_gptq_factor_is_the_cholesky_factor_of_the_inverse_computed_in_place():
    """u with H^-1 = u^T u (u upper), for the dampened H, in the Hessian's own memory; odd K and a dead channel."""
    rng = np.random.default_rng(4)
    x = rng.standard_normal((300, 101)).astype(np.float32)
    x[:, 7] = 0.0
    hessian = x.T @ x / len(x)
    damped = hessian.astype(np.float64)
    damped[7, 7] = 1.0
    damped[np.diag_indices(101)] += DAMP * np.diagonal(damped).mean()
    factor = gptq_factor(hessian)
    assert np.shares_memory(factor.u, hessian)
    np.testing.assert_array_equal(np.tril(factor.u, -1), 0)
    np.testing.assert_allclose(factor.u.T.astype(np.float64) @ factor.u, np.linalg.inv(damped), rtol=1e-3, atol=1e-4)
    assert factor.dead.tolist() == [i == 7 for i in range(101)]
