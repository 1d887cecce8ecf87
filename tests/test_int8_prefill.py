"""The integer-GEMM prefill form (recipe prefill_weights: int8): prompt chunks run a second form of each attention
and FFN graph, MatMulInteger over int8 weights with activations quantized per row; decode steps keep MatMulNBits."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from compiler.blockquant import quantize_weight
from compiler.build import compile_recipe
from compiler.int8_prefill import dequantize, rewrite
from compiler.recipe import load_recipe
from runtime.engine import Engine
from runtime.errors import TandemError
from runtime.roofline import bytes_per_token
from tests.conftest import RECIPE, write_recipe

INT4 = {kind: {"scheme": "int4", "gptq": False} for kind in ("attention", "ffn", "lm_head")}
CPU = {k: "cpu" for k in RECIPE["placement"]}
VERIFY = {**RECIPE["verify"], "graph_max_rel_error": 0.5, "logits_max_abs_error": 5.0, "greedy_agreement": 0.0,
          "max_perplexity_delta": 1.0}


@pytest.mark.parametrize("bits, k, block, zero_points", [(4, 96, 32, True), (4, 80, 32, False), (8, 256, 128, True), (4, 64, 16, True)])
def test_dequantize_gives_matmulnbits_weights(bits, k, block, zero_points):
    """The float weights it requantizes are the ones ORT's MatMulNBits multiplies by (K padded to whole blocks
    included), with packed zero points and without."""
    rng = np.random.default_rng(bits + k)
    n, count = 24, -(-k // block)
    b = rng.integers(0, 256, (n, count, block * bits // 8), dtype=np.uint8)
    scales = rng.random(n * count, dtype=np.float32)
    zp = rng.integers(0, 256, n * -(-count * bits // 8), dtype=np.uint8) if zero_points else None
    inits = [numpy_helper.from_array(a, name) for a, name in ((b, "B"), (scales, "s"), (zp, "z")) if a is not None]
    node = helper.make_node("MatMulNBits", ["x", *(t.name for t in inits)], ["y"], domain="com.microsoft", K=k, N=n,
                            bits=bits, block_size=block, accuracy_level=0)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3, k])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [3, n])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)])
    x = rng.standard_normal((3, k), dtype=np.float32)
    expected = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    np.testing.assert_allclose(x @ dequantize(b, scales, zp, k, n, bits, block), expected, rtol=1e-4, atol=1e-4)


def _matmulnbits(w: np.ndarray) -> onnx.ModelProto:
    """x [rows, K] @ w as one int4 MatMulNBits (block 32, zero points)."""
    k, n = w.shape
    q = quantize_weight(w, 4, 32, False)
    inits = [numpy_helper.from_array(a, name) for a, name in ((q.packed, "B"), (q.scales, "s"), (q.zero_points, "z"))]
    node = helper.make_node("MatMulNBits", ["x", "B", "s", "z"], ["y"], name="proj", domain="com.microsoft", K=k, N=n,
                            bits=4, block_size=32, accuracy_level=4)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["rows", k])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["rows", n])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)])


def test_smoothing_takes_outlier_channels_out_of_the_rows_scales(tmp_path):
    """Inputs with a few channels 60x the rest in every row (Qwen's MatMul inputs have them): per-row int8 alone
    rounds the other channels to a few levels; the channels' RMS from calibration, folded into the weights' rows,
    brings the error down to the int8 grid's, and the product is still x @ W."""
    rng = np.random.default_rng(0)
    k, n = 256, 64
    w = rng.standard_normal((k, n), dtype=np.float32) * 0.05
    x = rng.standard_normal((32, k), dtype=np.float32)
    x[:, [3, 77, 200]] *= 60
    exact = x @ dequantize(*[numpy_helper.to_array(t) for t in _matmulnbits(w).graph.initializer], k, n, 4, 32)
    errors = {}
    for smoothed in (False, True):
        model = _matmulnbits(w)
        channels = {"x": np.sqrt((x ** 2).mean(0))} if smoothed else None
        assert rewrite(model, tmp_path, "/proj/int8_prefill", channels)
        assert any(t.name.endswith("/smoothing") for t in model.graph.initializer) == smoothed
        y = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
        errors[smoothed] = np.abs(y - exact).max() / np.abs(exact).max()
    assert errors[True] < 0.01 < errors[False] and errors[True] < errors[False] / 4, errors


@pytest.fixture(scope="module")
def int8_artifacts(tmp_path_factory, checkpoint) -> dict[str, Path]:
    """The tiny model in int4 on the CPU, one graph per block and fused, each with and without the int8 prefill form."""
    root = tmp_path_factory.mktemp("int8_prefill")
    built = {}
    for fuse in (False, True):
        for weights in ("shared", "int8"):
            name = f"{'fused' if fuse else 'split'}-{weights}"
            recipe = write_recipe(root, name=name, fuse=fuse, placement=CPU, quantization=INT4, prefill_weights=weights,
                                  verify=VERIFY)
            built[name] = compile_recipe(recipe, model=str(checkpoint), out=root / name, show_progress=False)
    return built


@pytest.mark.parametrize("layout", ["split", "fused"])
def test_prompt_chunks_run_the_integer_form(int8_artifacts, layout):
    """Attention and FFN graphs (and a fused graph) get a prefill form without MatMulNBits; the embedding and a
    separate head do not. Prompt chunks run that form, decode steps the int4 one, and the logits stay within the
    activations' rounding of the int4 artifact's."""
    directory = int8_artifacts[f"{layout}-int8"]
    engine = Engine(directory)
    forms = {g.name: g.prefill for g in engine.manifest.graphs}
    for name, form in forms.items():
        assert (form is not None) == name.startswith(("attention", "ffn", "embed-to-head")), name
        if form is not None:
            ops = {n.op_type for n in onnx.load(directory / form.file, load_external_data=False).graph.node}
            assert "MatMulIntegerToFloat" in ops and ("MatMulNBits" in ops) == (layout == "fused")  # a fused graph's head keeps it
    shared = Engine(int8_artifacts[f"{layout}-shared"])
    prompt = list(range(5, 25))  # 3 prefill chunks of 8
    ours, theirs = engine.forward(0, prompt), shared.forward(0, prompt)
    assert np.abs(ours - theirs).max() < 0.1 * np.abs(theirs).max()  # a wrong form is off by the logits themselves
    prefill = [r for r in engine.runners if r.placement.phase == "prefill"]
    assert len(prefill) == sum(f is not None for f in forms.values()) and all(r.seconds > 0 for r in prefill)
    decode = [r for r in engine.runners if r.placement.phase == "decode"]
    assert all(r.seconds == 0 for r in decode)
    step, shared_step = engine.forward(0, [7]), shared.forward(0, [7])
    assert all(r.seconds > 0 for r in decode)
    assert np.abs(step - shared_step).max() < 0.1 * np.abs(shared_step).max()  # over the K/V the prompt wrote
    # a decode step reads the int4 weights only: the roofline does not count the int8 copy
    assert bytes_per_token(engine.manifest, 64) == bytes_per_token(shared.manifest, 64)


def test_a_calibrated_build_smooths_every_form(tmp_path, checkpoint):
    """With GPTQ's statistics (a calibrated build) each input of a rewritten MatMul is smoothed by its channels' RMS,
    in the quantization worker that finishes the block (--jobs 2), and the form is as close to torch as the int4
    graph (GPTQ on 64 tokens of the tiny random model is off by ~0.7 in both)."""
    recipe = write_recipe(tmp_path, name="gptq-int8", fuse=True, placement=CPU, prefill_weights="int8",
                          quantization={kind: {"scheme": "int4"} for kind in ("attention", "ffn", "lm_head")},
                          calibration={"windows": 2, "window": 32}, verify={**VERIFY, "graph_max_rel_error": 2.0})
    directory = compile_recipe(recipe, model=str(checkpoint), out=tmp_path / "out", show_progress=False, jobs=2)
    form = onnx.load(directory / Engine(directory).manifest.graphs[0].prefill.file, load_external_data=False)
    smoothed = [t.name for t in form.graph.initializer if t.name.endswith("/smoothing")]
    quantized = {node.input[0] for node in form.graph.node if node.op_type == "MatMulIntegerToFloat"}
    assert len(smoothed) == len([n for n in form.graph.node if n.name.endswith("/u8")]) == 4 * 2  # 4 inputs a layer
    rows = {g["graph"]: g["max_rel_error"] for g in json.loads((directory / "verify.json").read_text())["graphs"]}
    assert len(quantized) == 8 and rows["embed-to-head (prefill)"] < rows["embed-to-head"] + 0.05, rows


def test_verify_reports_each_form(int8_artifacts):
    report = json.loads((int8_artifacts["split-int8"] / "verify.json").read_text())
    rows = {g["graph"]: g["max_rel_error"] for g in report["graphs"]}
    assert {"attention.0", "attention.0 (prefill)", "ffn.1", "ffn.1 (prefill)", "head"} <= set(rows)
    assert "head (prefill)" not in rows
    assert rows["ffn.1 (prefill)"] < 0.1 and not report["failures"]


@pytest.mark.parametrize("changes, message", [
    ({"placement": RECIPE["placement"], "quantization": INT4}, "the attention blocks' prompt chunks run on role npu"),
    ({"placement": CPU}, "have neither scheme"),
    ({"placement": CPU, "quantization": INT4, "roles": {"cpu": {"providers": ["CPU"], "prefill": ["OpenVINO", "CPU"]}}},
     "(OpenVINO, CPU, dialect contrib)"),
])
def test_recipes_that_cannot_run_it_are_refused(tmp_path, changes, message):
    path = write_recipe(tmp_path, prefill_weights="int8", **changes)
    with pytest.raises(TandemError, match="prefill_weights int8") as err:
        load_recipe(path)
    assert message in str(err.value)


def test_info_sizes_each_form(int8_artifacts):
    """`tandem info` gives each session the size of the files it loads: the int8 form's exceed the int4 graph's."""
    from runtime.cli import _form_files

    manifest = Engine(int8_artifacts["split-int8"]).manifest
    sizes = {f.path: f.size for f in manifest.files}
    loaded = lambda prefill: sum(s for p, s in sizes.items() if p.startswith(_form_files(manifest.graph("ffn.1"), prefill, sizes)))  # noqa: E731
    assert _form_files(manifest.graph("ffn.1"), True, sizes) == ("graphs/ffn.1.prefill.onnx",) * 2
    assert loaded(True) > loaded(False) > 0
