"""Compiler + runtime end to end on tiny random Qwen2 checkpoints (fast tier)."""
from __future__ import annotations

import json
import shutil
from collections import Counter

import numpy as np
import onnx
import pytest
import torch
import yaml

from compiler.plan import plan
from compiler.recipe import load_recipe
from runtime.engine import Engine
from runtime.errors import TandemError
from runtime.generate import Generator
from runtime.manifest import load_manifest
from tests.conftest import write_recipe


def reference_logits(checkpoint, tokens: list[int]) -> np.ndarray:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(checkpoint, local_files_only=True, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(torch.tensor([tokens])).logits[0].numpy()


def test_verify_report_within_tolerance(artifacts):
    for artifact in artifacts.values():
        report = json.loads((artifact / "verify.json").read_text())
        assert report["failures"] == []
        assert report["greedy_agreement"] == 1.0
        assert max(g["max_rel_error"] for g in report["graphs"]) < 1e-5
        assert max(c["logits_max_abs_error"] for c in report["chain"]) < 1e-4
        # one of the chain prompts is longer than a prefill chunk
        assert max(c["prompt_tokens"] for c in report["chain"]) > load_manifest(artifact).prefill_chunk


def test_partitions(artifacts):
    split, fused = (load_manifest(artifacts[k]) for k in ("split", "fused"))
    assert [g.name for g in split.graphs][:3] == ["embed", "attention.0", "ffn.0"]
    assert len(split.graphs) == 2 + 2 * split.model.num_layers
    assert {g.role for g in split.graphs if g.name.startswith("attention")} == {"npu"}
    assert {g.role for g in split.graphs if g.name.startswith("ffn")} == {"igpu"}
    assert [g.name for g in fused.graphs] == ["embed-to-head"]


def test_fused_graph_links_the_blocks_weights_where_they_are(artifacts):
    """A fused graph is the split build's blocks linked: the same weight files, byte for byte, one graph file."""
    split, fused = (load_manifest(artifacts[k]) for k in ("split", "fused"))
    data = lambda m: {f.path: f.sha256 for f in m.files if f.path.endswith(".data")}  # noqa: E731
    assert data(fused) == data(split) and len(data(split)) == 2 + 2 * split.model.num_layers
    assert [f.path for f in fused.files if f.path.endswith(".onnx")] == ["graphs/embed-to-head.onnx"]


def test_linked_blocks_meet_in_fused_norms(artifacts):
    """Each residual Add and the next block's RMSNorm become one SkipSimplifiedLayerNormalization when linked:
    at every block boundary but the embedding's (no residual yet) and the head's (GatherND comes between)."""
    fused = load_manifest(artifacts["fused"])
    model = onnx.load(artifacts["fused"] / fused.graphs[0].file, load_external_data=False)
    ops = Counter(n.op_type for n in model.graph.node)
    assert ops["SkipSimplifiedLayerNormalization"] == 2 * fused.model.num_layers - 1
    assert ops["SimplifiedLayerNormalization"] == 2 and ops["Add"] == fused.model.num_layers + 1  # QKV biases, last residual


def test_fused_and_split_give_the_same_logits_across_chunks(artifacts, checkpoint):
    """Prefill across chunk boundaries (chunk 8, 21 tokens) then decode steps, against transformers."""
    tokens = [int(t) for t in np.random.default_rng(1).integers(3, 300, 24)]
    expected = reference_logits(checkpoint, tokens)
    for name, artifact in artifacts.items():
        engine = Engine(artifact)
        got = [engine.forward(0, tokens[:21])]
        got += [engine.forward(0, [t]) for t in tokens[21:]]
        np.testing.assert_allclose(np.stack(got), expected[20:], atol=1e-4, err_msg=name)


def test_a_smaller_kv_cache_gives_the_same_logits(artifacts):
    """Engine(capacity=n): fewer positions per slot than compiled (verify sizes its cache so), the same graphs."""
    tokens = [int(t) for t in np.random.default_rng(2).integers(3, 300, 12)]
    full, small = Engine(artifacts["split"]), Engine(artifacts["split"], capacity=len(tokens))
    np.testing.assert_allclose(small.forward(0, tokens, all_logits=True), full.forward(0, tokens, all_logits=True), atol=1e-5)
    assert small.capacity == len(tokens) < full.capacity
    with pytest.raises(TandemError, match="does not fit"):
        small.forward(0, [1])
    with pytest.raises(TandemError, match="capacity"):
        Engine(artifacts["split"], capacity=full.capacity + 1)


def test_sessions_are_made_largest_weights_first_and_run_in_schedule_order(artifacts, monkeypatch):
    """Packing a graph's weights holds its file beside the packed copy for a moment: that peak should come first."""
    import runtime.engine

    made, create = [], runtime.engine.create_session
    monkeypatch.setattr(runtime.engine, "create_session", lambda graph, *a, **k: made.append(graph) or create(graph, *a, **k))
    engine = Engine(artifacts["split"])
    manifest = engine.manifest
    sizes = {f.path: f.size for f in manifest.files}
    weights = [sizes.get(manifest.graph(name).file + ".data", 0) for name in dict.fromkeys(made)]
    assert weights == sorted(weights, reverse=True) and weights[0] > weights[-1]
    assert [g.spec.name for g in engine.graphs] == manifest.schedule


def test_slots_are_independent(artifacts):
    engine = Engine(artifacts["split"], slots=2)
    a, b = [5, 6, 7, 8, 9, 10, 11, 12, 13], [40, 41, 42]
    alone = engine.forward(1, b)
    engine.reset(1)
    engine.forward(0, a)
    np.testing.assert_allclose(engine.forward(1, b), alone, atol=1e-6)
    assert engine.cache.lengths.tolist() == [len(a), len(b)]


def one_at_a_time(artifact, prompts: dict[int, list[int]], steps: list[int]) -> dict[int, list[np.ndarray]]:
    """Each prompt alone on a fresh slot, then the decode steps' logits."""
    engine = Engine(artifact)
    expected = {}
    for slot, prompt in prompts.items():
        engine.reset(0)
        engine.forward(0, prompt)
        expected[slot] = [engine.forward(0, [t]) for t in steps]
    return expected


def test_batched_decode_matches_one_sequence_at_a_time(artifacts):
    """Continuous batching's step: slots of different lengths decode together around a slot that is mid-prefill."""
    prompts = {0: [5, 6, 7, 8, 9, 10, 11, 12, 13], 2: [40, 41, 42], 3: list(range(60, 80))}
    steps = [7, 8, 9]
    for name, artifact in artifacts.items():
        expected = one_at_a_time(artifact, prompts, steps)
        partial = Engine(artifact).forward(0, [3, 4, 5])

        engine = Engine(artifact, slots=4)
        for slot, prompt in prompts.items():
            engine.forward(slot, prompt)
        engine.forward(1, [3, 4])  # idle in the batch: its dummy row must not disturb its next chunk
        got = [engine.extend([0, 2, 3], [[t]] * 3) for t in steps]
        for row, slot in enumerate(prompts):
            np.testing.assert_allclose(np.stack([g[row] for g in got]), np.stack(expected[slot]), atol=1e-5, err_msg=name)
        np.testing.assert_allclose(engine.forward(1, [5]), partial, atol=1e-5, err_msg=name)
        assert engine.cache.lengths.tolist() == [12, 3, 6, 23]


def test_prompts_of_different_lengths_prefill_in_one_step(artifacts):
    """Batched prefill: first chunks of different lengths, padded, around an empty slot."""
    prompts = {0: list(range(5, 17)), 1: [40, 41, 42], 3: list(range(60, 67))}
    for name, artifact in artifacts.items():
        expected = one_at_a_time(artifact, prompts, [9])
        engine = Engine(artifact, slots=4)
        engine.extend(list(prompts), list(prompts.values()))
        got = engine.extend(list(prompts), [[9]] * 3)  # the decode step after it sees each row's own length
        for row, slot in enumerate(prompts):
            np.testing.assert_allclose(got[row], expected[slot][0], atol=1e-5, err_msg=name)
        assert engine.cache.lengths.tolist() == [13, 4, 0, 8]
        with pytest.raises(TandemError, match="starts empty"):
            engine.extend([0, 2], [[5, 6], [7, 8]])
        with pytest.raises(TandemError, match="exceed the KV cache capacity"):
            engine.extend([0], [[5] * 84])


def test_decode_steps_allocate_nothing_and_return_their_own_logits(artifacts):
    """A decode step writes into buffers kept from the first one, and the KV cache stays bound: the logits
    returned by one step are not overwritten by the next, and a later prefill (ORT's own buffers) is unaffected."""
    for name, artifact in artifacts.items():
        engine = Engine(artifact)
        engine.forward(0, [5, 6, 7])
        first = engine.forward(0, [8])
        kept = first.copy()
        second = engine.forward(0, [9])
        np.testing.assert_array_equal(first, kept, err_msg=name)
        assert not np.array_equal(first, second), name
        engine.reset(0)
        engine.forward(0, [5, 6, 7])
        np.testing.assert_array_equal(engine.forward(0, [8]), kept, err_msg=name)  # same tokens, same logits
        for graph in engine.graphs:
            assert len(graph._kept) == 1 and len(graph._bindings) == 1, (name, graph.spec.name)


def test_a_prompt_chunk_leaves_no_outputs_held_but_the_cache(artifacts, static_artifacts):
    """After a prompt chunk no runner holds the outputs ORT made for it (a chunk's hidden states in every layer,
    and the arena fragmenting around them, at 7B scale 43 MiB a layer); what stays bound is the KV cache."""
    for name, artifact in {**artifacts, **static_artifacts}.items():
        engine = Engine(artifact)
        engine.forward(0, list(range(5, 25)))
        cache = [(b.data_ptr(), b.data_ptr() + b.tensor_size_in_bytes()) for b in engine.cache._buffers.values()]
        for graph in engine.runners:
            for binding in graph._bindings.values():
                held = [v.data_ptr() for v in binding.get_outputs()]
                assert all(any(lo <= p < hi for lo, hi in cache) for p in held), (name, graph.spec.name)


def test_context_that_does_not_fit(artifacts):
    engine = Engine(artifacts["fused"])
    with pytest.raises(TandemError, match="does not fit"):
        engine.forward(0, [5] * 97)
    gen = Generator.load(artifacts["fused"])
    with pytest.raises(TandemError, match="prompt of 96 tokens does not fit the context of 96"):
        next(gen.stream([5] * 96, 4, gen.sampling(temperature=0)))
    # a prompt that fits but leaves little room stops at the context length
    chunks = list(gen.stream([5] * 90, 50, gen.sampling(temperature=0)))
    assert chunks[-1].finish_reason in ("length", "stop") and chunks[-1].stats.completion_tokens <= 6


def test_greedy_generation_matches_transformers(artifacts, checkpoint):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gen = Generator.load(artifacts["split"])
    ids = gen.chat_prompt([{"role": "user", "content": "def fibonacci(n):"}])
    hf_tok = AutoTokenizer.from_pretrained(checkpoint)
    hf_text = hf_tok.apply_chat_template([{"role": "user", "content": "def fibonacci(n):"}], add_generation_prompt=True, tokenize=False)
    assert ids == hf_tok.encode(hf_text, add_special_tokens=False)
    chunks = list(gen.stream(ids, 20, gen.sampling(temperature=0)))
    ours = [c.token_id for c in chunks if c.token_id is not None]
    model = AutoModelForCausalLM.from_pretrained(checkpoint, local_files_only=True, dtype=torch.float32)
    out = model.generate(torch.tensor([ids]), max_new_tokens=20, do_sample=False, eos_token_id=gen.eos_token_ids and list(gen.eos_token_ids))
    theirs = [t for t in out[0, len(ids):].tolist() if t not in gen.eos_token_ids]
    assert ours == theirs
    assert "".join(c.text for c in chunks) == gen.tokenizer.decode(ours)


def test_seeded_sampling_is_reproducible(artifacts):
    gen = Generator.load(artifacts["fused"])
    ids = gen.tokenizer.encode("hello")
    run = lambda seed: [c.token_id for c in gen.stream(ids, 16, gen.sampling(temperature=1.0, top_k=50, top_p=0.95, seed=seed))]  # noqa: E731
    assert run(3) == run(3)
    assert run(3) != run(4)


def test_tampered_artifact_is_refused_naming_the_file(artifacts, tmp_path):
    copy = shutil.copytree(artifacts["split"], tmp_path / "copy")
    data = copy / "graphs" / "ffn.1.onnx.data"
    original = data.read_bytes()
    raw = bytearray(original)
    raw[len(raw) // 2] ^= 0xFF
    data.write_bytes(bytes(raw))
    with pytest.raises(TandemError, match=r"ffn\.1\.onnx\.data: sha256 mismatch"):
        Engine(copy)
    data.write_bytes(original)
    (copy / "tokenizer.json").unlink()
    with pytest.raises(TandemError, match=r"tokenizer\.json: missing"):
        load_manifest(copy)


def test_manifest_version_unknown_and_repeated_keys(artifacts, tmp_path):
    copy = shutil.copytree(artifacts["fused"], tmp_path / "copy")
    path = copy / "manifest.yaml"
    original = yaml.safe_load(path.read_text())
    path.write_text(yaml.safe_dump({**original, "format_version": 99}))
    with pytest.raises(TandemError, match="format_version 99 is newer"):
        load_manifest(copy)
    path.write_text(yaml.safe_dump({**original, "surprise": 1}))
    with pytest.raises(TandemError, match="surprise: unknown key"):
        load_manifest(copy)
    path.write_text(yaml.safe_dump(original) + "prefill_chunk: 1\n")
    with pytest.raises(TandemError, match="'prefill_chunk' given twice"):
        load_manifest(copy)


def test_failed_verify_leaves_no_artifact(checkpoint, tmp_path):
    from compiler.build import compile_recipe

    recipe = write_recipe(tmp_path, name="strict", verify={"prompts": ["hi"], "new_tokens": 4, "eval_windows": 0, "graph_max_rel_error": 1e-30})
    with pytest.raises(TandemError, match="verify failed"):
        compile_recipe(recipe, model=str(checkpoint), out=tmp_path / "out", show_progress=False)
    assert not (tmp_path / "out").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["strict.yaml"]
    # --verify report: the same build is written, its failures in verify.json, and it runs
    out = compile_recipe(recipe, model=str(checkpoint), out=tmp_path / "out", show_progress=False, gate=False)
    assert any("max relative error" in f for f in json.loads((out / "verify.json").read_text())["failures"])
    assert Engine(out).forward(0, [5, 17, 42]).shape == (load_manifest(out).model.vocab_size,)


def test_plan_fuses_adjacent_blocks_of_one_role(tmp_path):
    recipe = load_recipe(write_recipe(tmp_path, fuse=True, placement={"embed": "cpu", "attention": "npu", "ffn": "igpu", "head": "igpu"}))
    assert [g.name for g in plan(recipe, 2)] == ["embed", "attention.0", "ffn.0", "attention.1", "ffn.1-to-head"]


def test_sources(tmp_path, checkpoint, monkeypatch):
    from compiler.source import open_source

    with pytest.raises(TandemError, match="never downloads"):
        open_source("Qwen/Qwen2.5-7B-Instruct-not-cached")
    with pytest.raises(TandemError, match="GGUF file not found"):
        open_source(str(tmp_path / "missing.gguf"))
    # a hub id resolved from the local cache only
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    snapshot = tmp_path / "hub" / "models--tiny--qwen" / "snapshots" / "abc123"
    shutil.copytree(checkpoint, snapshot)
    (tmp_path / "hub" / "models--tiny--qwen" / "refs").mkdir()
    (tmp_path / "hub" / "models--tiny--qwen" / "refs" / "main").write_text("abc123")
    import huggingface_hub.constants as hub_constants

    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    source = open_source("tiny/qwen")
    assert source.config.num_layers == 2
    np.testing.assert_array_equal(source.tensor("model.norm.weight"), open_source(str(checkpoint)).tensor("model.norm.weight"))


def test_sampling_defaults(artifacts):
    gen = Generator.load(artifacts["fused"])
    gen.defaults = {**gen.defaults, "temperature": 0.7, "top_k": 20, "repetition_penalty": 1.1}
    assert gen.sampling().repetition_penalty == 1.1 and gen.sampling().top_k == 20
    greedy = gen.sampling(temperature=0)
    assert (greedy.temperature, greedy.top_k, greedy.repetition_penalty) == (0, 0, 1.0)
    assert gen.sampling(temperature=0, repetition_penalty=1.2).repetition_penalty == 1.2
    with pytest.raises(TandemError, match="top_p"):
        gen.sampling(top_p=0)


def test_export_hf_round_trips(checkpoint, tmp_path):
    from compiler.export_hf import export_hf
    from compiler.source import open_source

    source = open_source(str(checkpoint))
    exported = open_source(str(export_hf(source, tmp_path / "hf", shard_bytes=50_000)))
    assert len(list((tmp_path / "hf").glob("*.safetensors"))) > 1
    assert exported.tensor_names() == source.tensor_names()
    for name in source.tensor_names():
        np.testing.assert_array_equal(exported.tensor(name), source.tensor(name))
    assert exported.config == source.config
