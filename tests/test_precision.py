"""float16 artifacts (what GPU EPs run) and parallel quantization, on the tiny model (fast tier)."""
from __future__ import annotations

import json

import numpy as np
import onnx
import pytest

from compiler.build import compile_recipe
from runtime import manifest as names
from runtime.engine import Engine
from runtime.manifest import load_manifest
from tests.conftest import write_recipe

RTN = {"scheme": "int4", "block_size": 32, "gptq": False}
QUANTIZATION = {"attention": RTN, "ffn": RTN, "lm_head": {**RTN, "scheme": "int8"}, "embedding": {"scheme": "int4"}}
LOOSE = {"graph_max_rel_error": 0.5, "logits_max_abs_error": 10.0, "greedy_agreement": 0.0, "max_perplexity_delta": 1.0}  # int4 RTN of a tiny random model


@pytest.fixture(scope="module")
def builds(tmp_path_factory, checkpoint):
    """The same int4 (RTN) recipe in float32 and float16, and float16 again quantized by two worker processes."""
    root = tmp_path_factory.mktemp("precision")
    out = {}
    for name, dtype, jobs in (("fp32", "float32", 1), ("fp16", "float16", 1), ("fp16-jobs", "float16", 2)):
        recipe = write_recipe(root, name=name, dtype=dtype, quantization=QUANTIZATION, verify={
            "new_tokens": 12, "eval_windows": 2, "eval_window": 64, "prompts": ["def fibonacci(n):"], **LOOSE})
        out[name] = compile_recipe(recipe, model=str(checkpoint), out=root / name, show_progress=False, jobs=jobs)
    return out


def test_float16_graphs_keep_logits_in_float32(builds):
    manifest = load_manifest(builds["fp16"])
    assert manifest.kv_cache.dtype == "float16"
    assert manifest.graph("attention.0").quantization == {"attention": "int4 block 32 asym acc4 rtn"}  # no calibration run
    for spec in manifest.graphs:
        model = onnx.load(builds["fp16"] / spec.file, load_external_data=False)
        floats = [i.data_type for i in model.graph.initializer if i.data_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16)]
        assert floats and set(floats) == {onnx.TensorProto.FLOAT16}, spec.name
        for name, tensor in {**spec.inputs, **spec.outputs}.items():
            if tensor.dtype.startswith("float"):
                assert tensor.dtype == ("float32" if name == names.LOGITS else "float16"), (spec.name, name)


def test_float16_follows_float32_within_half_precision(builds):
    """Same int4 weights, half activations: verify passes its tolerances and greedy tokens match float32's."""
    fp32_report, report = (json.loads((builds[k] / "verify.json").read_text()) for k in ("fp32", "fp16"))
    assert report["failures"] == []
    for half, full in zip(report["graphs"], fp32_report["graphs"]):  # errors vs torch fp32: int4's, plus a little
        assert half["max_rel_error"] < full["max_rel_error"] + 0.01, half["graph"]
    tokens = [int(t) for t in np.random.default_rng(2).integers(3, 300, 20)]
    fp32, fp16 = Engine(builds["fp32"]), Engine(builds["fp16"])
    a, b = fp32.forward(0, tokens, all_logits=True), fp16.forward(0, tokens, all_logits=True)
    assert b.dtype == np.float32
    assert np.abs(a - b).max() < 0.05 * np.abs(a).max()
    assert (a.argmax(-1) == b.argmax(-1)).mean() >= 0.9


def test_parallel_quantization_writes_the_same_graphs(builds):
    one, two = (load_manifest(builds[k]) for k in ("fp16", "fp16-jobs"))
    graphs = lambda m: {f.path: f.sha256 for f in m.files if f.path.startswith("graphs/")}  # noqa: E731
    assert graphs(one) == graphs(two)
