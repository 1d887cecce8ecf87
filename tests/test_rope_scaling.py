"""YaRN from config.json is honoured: past the original context the compiled model follows transformers (fast tier)."""
from __future__ import annotations

import json

import numpy as np
import torch

from compiler.build import compile_recipe
from runtime.engine import Engine
from runtime.manifest import load_manifest
from tests.conftest import write_recipe
from tests.tiny import make_checkpoint

YARN = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 128, "rope_theta": 10000.0}


def logits(checkpoint, tokens: list[int]) -> np.ndarray:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(checkpoint, local_files_only=True, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(torch.tensor([tokens])).logits[0].numpy()


def test_yarn_scaling_follows_transformers_past_the_original_context(tmp_path):
    checkpoint = make_checkpoint(tmp_path / "ckpt")
    config = json.loads((checkpoint / "config.json").read_text())
    plain = dict(config)
    config.pop("rope_scaling", None)
    (checkpoint / "config.json").write_text(json.dumps({**config, "rope_parameters": YARN, "max_position_embeddings": 512}))
    recipe = write_recipe(tmp_path, name="yarn", max_context=512, prefill_chunk=64)
    artifact = compile_recipe(recipe, model=str(checkpoint), out=tmp_path / "yarn", show_progress=False)
    assert load_manifest(artifact).model.rope_scaling["rope_type"] == "yarn"
    tokens = [int(t) for t in np.random.default_rng(5).integers(3, 300, 400)]  # 400 > the original 128 positions
    got = Engine(artifact).forward(0, tokens, all_logits=True)
    expected = logits(checkpoint, tokens)
    np.testing.assert_allclose(got, expected, atol=2e-4)
    # without the scaling the same weights give other logits there: the check above can fail
    (checkpoint / "config.json").write_text(json.dumps({**plain, "max_position_embeddings": 512}))
    assert np.abs(logits(checkpoint, tokens)[200:] - expected[200:]).max() > 100 * 2e-4
