"""`tandem make-checkpoint` on a scaled-down config: the same streaming writer the 7B checkpoint uses."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np

from compiler.checkpoint import (
    CONFIGS,
    from_bf16,
    random_blocks,
    tensor_shapes,
    to_bf16,
)
from tests.conftest import tandem, write_recipe

SMALL = {**CONFIGS["qwen2.5-7b-instruct"][0], "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2,
         "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 320, "max_position_embeddings": 1024}


def test_bf16_rounds_to_nearest_even():
    import torch

    x = np.random.default_rng(0).standard_normal(10_000).astype(np.float32) * 3
    assert np.array_equal(to_bf16(x), torch.from_numpy(x).bfloat16().view(torch.int16).numpy().view(np.uint16))
    assert np.array_equal(from_bf16(to_bf16(x)), torch.from_numpy(x).bfloat16().float().numpy())


def test_7b_config_has_the_published_shapes():
    shapes = dict(tensor_shapes(CONFIGS["qwen2.5-7b-instruct"][0]))
    assert len(shapes) == 1 + 28 * 12 + 2
    assert shapes["model.embed_tokens.weight"] == shapes["lm_head.weight"] == (152064, 3584)
    assert shapes["model.layers.27.self_attn.k_proj.weight"] == (512, 3584)
    assert shapes["model.layers.0.mlp.down_proj.weight"] == (3584, 18944)
    assert sum(int(np.prod(s)) for s in shapes.values()) == 7_615_616_512  # Qwen2.5-7B's parameter count


def test_checkpoint_loads_in_transformers_and_compiles(checkpoint, tmp_path):
    """Written in several shards; transformers reads exactly the seeded values; tandem compiles and verifies it."""
    from transformers import Qwen2ForCausalLM

    config = tmp_path / "config.json"
    config.write_text(json.dumps(SMALL))
    out = tmp_path / "ckpt"
    tandem("make-checkpoint", "--config", str(config), "--random-weights", "-o", str(out), "--tokenizer", str(checkpoint),
           "--seed", "7", "--shard-gb", "0.0001", "--jobs", "3")
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1 and len(index["weight_map"]) == 1 + 2 * 12 + 2
    model = Qwen2ForCausalLM.from_pretrained(out, local_files_only=True)
    names = [name for name, _ in tensor_shapes(SMALL)]
    params = dict(model.named_parameters())
    for i, name in enumerate(names):
        expected = np.concatenate(list(random_blocks(name, params[name].shape, i, 7, 0.02)))
        assert np.array_equal(params[name].detach().float().numpy().reshape(expected.shape), from_bf16(to_bf16(expected))), name
    weights = params["model.layers.1.mlp.up_proj.weight"].detach().float().numpy()
    assert abs(weights.std() - 0.02) < 0.002 and abs(params["model.norm.weight"].mean().item() - 1) < 0.01
    recipe = write_recipe(tmp_path, name="random")
    tandem("compile", str(recipe), "--model", str(out), "-o", str(tmp_path / "artifact"), "--quiet")
    assert (tmp_path / "artifact" / "manifest.yaml").is_file()


def test_bad_config_is_one_line(tmp_path):
    (tmp_path / "config.json").write_text("{nope")
    for config in ["qwen9-huge", str(tmp_path / "config.json")]:
        proc = subprocess.run([sys.executable, "-m", "compiler.cli", "make-checkpoint", "--config", config,
                               "--random-weights", "-o", str(tmp_path / "x")], capture_output=True, text=True, check=False)
        assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert not (tmp_path / "x").exists()


def test_blocks_bound_memory_and_do_not_change_the_values(monkeypatch):
    import compiler.checkpoint as ck

    whole = np.concatenate(list(random_blocks("model.embed_tokens.weight", (300, 64), 3, 0, 0.02)))
    monkeypatch.setattr(ck, "BLOCK_BYTES", 4096)
    blocks = list(random_blocks("model.embed_tokens.weight", (300, 64), 3, 0, 0.02))
    assert len(blocks) == 19 and all(b.nbytes <= 4096 for b in blocks)
    assert np.array_equal(np.concatenate(blocks), whole)
