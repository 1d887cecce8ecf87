"""The torch reference: block by block (how a 7B is verified in bounded memory) equals transformers' whole model."""
from __future__ import annotations

import json

import numpy as np
import pytest

from compiler.checkpoint import tensor_shapes
from compiler.reference import parameter_count, sequence_logits
from compiler.source import ModelSource, open_source


def test_parameter_count_matches_the_checkpoint(checkpoint):
    source = open_source(str(checkpoint))
    shapes = tensor_shapes(json.loads((checkpoint / "config.json").read_text()))
    assert parameter_count(source.config) == sum(int(np.prod(s)) for _, s in shapes)


def test_block_by_block_equals_the_whole_model(checkpoint):
    source = open_source(str(checkpoint))
    sequences = [[5, 9, 200, 17, 3, 44, 61], [8, 1, 2], list(range(30, 70))]  # padded together, lengths differ
    whole = list(sequence_logits(source)(sequences))
    blocks = list(sequence_logits(source, in_memory_bytes=0)(sequences))
    assert [b.shape for b in blocks] == [(len(s), source.config.vocab_size) for s in sequences]
    for w, b in zip(whole, blocks):
        np.testing.assert_allclose(b, w, atol=1e-4, rtol=0)


def test_verify_with_the_block_by_block_reference(artifacts, checkpoint, monkeypatch):
    """verify_artifact as a 7B runs it (no whole model in memory, no engine in the compiler's process: the
    artifact runs in a fresh runtime process) gives the same verdict on the tiny model."""
    import compiler.reference as reference
    from compiler.verify import verify_artifact
    from runtime.engine import Engine

    def loaded(what: str):
        def fail(*args, **kwargs):
            raise AssertionError(f"{what} was loaded in verify's process")
        return fail

    monkeypatch.setattr(reference, "IN_MEMORY_BYTES", 0)
    monkeypatch.setattr(ModelSource, "reference_model", loaded("the whole model"))
    monkeypatch.setattr(Engine, "__init__", loaded("an engine"))
    report = verify_artifact(artifacts["split"], open_source(str(checkpoint)), eval_windows=1)
    saved = json.loads((artifacts["split"] / "verify.json").read_text())
    assert report["failures"] == [] and report["greedy_agreement"] == 1.0
    assert [c["text"] for c in report["chain"]] == [c["text"] for c in saved["chain"]]
    assert abs(report["fidelity"]["perplexity_delta"]) < 1e-4


def test_a_failing_runtime_process_is_one_clear_error(tmp_path):
    from compiler.runtime_runs import artifact_runs
    from runtime.errors import TandemError

    with pytest.raises(TandemError, match=r"runtime process failed \(exit 1\): error: .*manifest"):
        artifact_runs(tmp_path / "not-an-artifact", [("hi", [1, 2])], [], 4, tmp_path)
