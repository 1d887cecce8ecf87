"""Quantized tiny-model graphs: each scheme produces the op form it promises and stays near the fp32 graphs."""
from __future__ import annotations

import json

import numpy as np
import onnx
import pytest

from compiler.build import compile_recipe
from compiler.recipe import load_recipe
from runtime.engine import Engine
from runtime.errors import TandemError
from runtime.manifest import load_manifest
from tests.conftest import RECIPE, write_recipe

SCHEMES = {
    # name: (quantization, op that must appear, max relative graph error vs fp32 torch)
    "int4": ({"embedding": {"scheme": "int4"}, "attention": {"scheme": "int4"}, "ffn": {"scheme": "int4", "block_size": 16},
              "lm_head": {"scheme": "int4", "symmetric": True}}, {"MatMulNBits", "GatherBlockQuantized"}, 0.25),
    "int8-qdq": ({"attention": {"scheme": "int8-qdq"}, "ffn": {"scheme": "int8-qdq", "calibration": "percentile", "activations": "uint16"},
                  "lm_head": {"scheme": "int8"}}, {"QuantizeLinear", "DequantizeLinear", "MatMulNBits"}, 0.25),
    "fp16": ({"attention": {"scheme": "fp16"}, "ffn": {"scheme": "fp16"}, "lm_head": {"scheme": "fp16"}}, {"Cast"}, 0.01),
}


@pytest.fixture(scope="module", params=list(SCHEMES))
def quantized(request, tmp_path_factory, checkpoint):
    quantization, ops, tolerance = SCHEMES[request.param]
    root = tmp_path_factory.mktemp(request.param)
    verify = {**RECIPE["verify"], "graph_max_rel_error": tolerance, "logits_max_abs_error": 100.0, "greedy_agreement": 0.0,
              "max_perplexity_delta": 10.0}
    recipe = write_recipe(root, name=request.param, quantization=quantization, calibration={"windows": 2, "window": 32}, verify=verify)
    return compile_recipe(recipe, model=str(checkpoint), out=root / "artifact", show_progress=False), ops, tolerance


def test_quantized_graphs_take_their_form_and_stay_within_tolerance(quantized, artifacts):
    artifact, ops, tolerance = quantized
    report = json.loads((artifact / "verify.json").read_text())
    assert report["failures"] == []
    assert 0 < max(g["max_rel_error"] for g in report["graphs"]) <= tolerance
    found = {n.op_type for f in (artifact / "graphs").glob("*.onnx") for n in onnx.load(f, load_external_data=False).graph.node}
    assert ops <= found
    manifest = load_manifest(artifact)
    assert any("attention" in g.quantization and g.quantization["attention"] != "fp32" for g in manifest.graphs)
    # the quantized chain still tracks the fp32 artifact of the same weights
    tokens = list(range(3, 40))
    fp32 = Engine(artifacts["split"]).forward(0, tokens, all_logits=True)
    got = Engine(artifact).forward(0, tokens, all_logits=True)
    assert np.abs(got - fp32).max() / np.abs(fp32).max() < 4 * tolerance
    fidelity = report["fidelity"]
    assert fidelity["tokens"] > 0 and fidelity["kl_mean"] > 0


def test_quantized_artifacts_are_smaller(quantized, artifacts):
    artifact, _, _ = quantized
    size = lambda d: sum(f.size for f in load_manifest(d).files if f.path.startswith("graphs/"))  # noqa: E731
    assert size(artifact) < size(artifacts["split"])


@pytest.mark.parametrize(
    "quantization, message",
    [
        ({"ffn": {"scheme": "int3"}}, "quantization.ffn.scheme"),
        ({"attention": {"scheme": "int4", "block_size": 48}}, "quantization.attention.block_size"),
        ({"lm_head": {"scheme": "int4", "bits": 4}}, "quantization.lm_head.bits: unknown key"),
        ({"embedding": {"scheme": "int8-qdq"}}, "the embedding takes fp32, fp16 or int4"),
        ({"mlp": {"scheme": "int4"}}, "quantization.mlp: unknown key"),
    ],
)
def test_bad_quantization_is_rejected_naming_the_key(tmp_path, quantization, message):
    with pytest.raises(TandemError, match=message.replace(".", r"\.")):
        load_recipe(write_recipe(tmp_path, quantization=quantization))


def test_compare_table(quantized, artifacts, checkpoint):
    from compiler.compare import compare, markdown
    from compiler.source import open_source

    artifact, _, _ = quantized
    rows = compare([artifacts["fused"], artifact], open_source(str(checkpoint)), count=2, window=32, show_progress=False)
    fp32, candidate = rows
    assert abs(fp32["perplexity_delta"]) < 1e-4 and fp32["top1_agreement"] == 1.0
    assert candidate["kl_mean"] > fp32["kl_mean"] and candidate["quantization"]
    assert candidate["size_bytes"] < fp32["size_bytes"] and fp32["runtime_peak_rss_bytes"] > 0
    table = markdown(rows)
    assert sum(line.startswith("| ") for line in table.splitlines()) == 3 and "fp32 reference perplexity" in table


def test_smoothing_folds_exactly_and_flattens_the_activations(artifacts):
    """SmoothQuant's scales are folded into norm weights, up_proj and v_proj: same outputs, tamer MatMul inputs."""
    from compiler.calibrate import feeds, statistics
    from compiler.smoothing import smooth

    manifest = load_manifest(artifacts["fused"])
    graph = manifest.graphs[0]
    model = onnx.load(artifacts["fused"] / graph.file)
    rope = np.load(artifacts["fused"] / "rope.npy")
    samples = [feeds(graph.inputs, np.array([list(range(5 + i, 37 + i))]), rope) for i in range(2)]
    matmuls = {n.name for n in model.graph.node if n.op_type == "MatMul" and "/head" not in n.name}
    inputs = {n.input[0] for n in model.graph.node if n.name in matmuls}
    spread = lambda m: {x: float(a.max() / a.mean()) for x, a in statistics(m, inputs, samples, "absmax").items()}  # noqa: E731
    before = spread(model)

    def run(m: onnx.ModelProto) -> np.ndarray:
        import onnxruntime as ort

        session = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
        return session.run(["logits"], samples[0])[0]

    expected = run(model)
    smoothed = smooth(model, matmuls, samples, alpha=0.5)
    assert np.abs(run(smoothed) - expected).max() < 1e-4 * np.abs(expected).max()
    after = spread(smoothed)
    assert len(after) == len(before) > 0
    flatter = [x for x in before if after[x] < before[x]]
    assert len(flatter) == len(before)  # every MatMul input (norm-, up- and v-fed) got smoothed


@pytest.mark.parametrize("symmetric", [False, True])
def test_embedding_table_quantized_as_blockquant_rounds_it(tmp_path, symmetric):
    """GatherBlockQuantized reads back exactly blockquant's levels, with an odd count of blocks a row (the zero points'
    nibbles then cross rows), from a table the build streamed to external data."""
    import onnxruntime as ort
    from onnx import TensorProto, helper

    from compiler.blockquant import quantize_weight
    from compiler.graphs import GraphBuilder
    from compiler.quantize import quantize
    from compiler.recipe import Quantization

    table = np.random.default_rng(0).standard_normal((50, 96), dtype=np.float32)  # 3 blocks of 32 a row
    file = tmp_path / "embed.onnx"
    with file.with_name(file.name + ".data").open("wb") as data:
        b = GraphBuilder("embed", data=data)
        b.scope = "embed"
        ids = b.input("input_ids", TensorProto.INT64, [1, "sequence"])
        b.output(b.rename(b.op("Gather", [b.weight("table", table), ids]), "out"), TensorProto.FLOAT, [1, "sequence", 96])
        onnx.save_model(b.model(), file)
    model = quantize(onnx.load(file, load_external_data=False),
                     Quantization(embedding={"scheme": "int4", "block_size": 32, "symmetric": symmetric}), None, {}, tmp_path)
    assert [n.op_type for n in model.graph.node] == ["GatherBlockQuantized"]
    ids = np.array([[0, 7, 49, 7]])
    got = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"input_ids": ids})[0]
    expected = quantize_weight(table.T, 4, 32, symmetric).dequantize(96).T[ids]
    np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-6)
    assert 0 < np.abs(got - table[ids]).max() < 0.2 * np.abs(table).max()
