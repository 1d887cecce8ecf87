"""Fallback while running: a graph whose EP fails mid-request is rebuilt on the next EP of its chain (the seed's
NPU -> iGPU -> CPU), the step goes on, and the request completes with the same tokens. Failures are injected."""
from __future__ import annotations

import logging

import pytest

from runtime.engine import GraphRunner
from runtime.errors import TandemError
from runtime.generate import Generator
from tests.conftest import retarget

# two CPU entries, so that a failing first one has somewhere to go here (on a laptop: VitisAI, then MIGraphX, ...)
CHAIN = {"providers": [{"name": "CPU", "session": {"session.intra_op.allow_spinning": "0"}}, "CPU"]}


def fail_once(runner: GraphRunner, after: int) -> None:
    """The runner's session raises on its (after + 1)-th run, as an NPU driver error would."""
    session, calls = runner.session, [0]
    real = session.run_with_iobinding

    def run(*args, **kwargs):
        calls[0] += 1
        if calls[0] == after + 1:
            raise RuntimeError("injected: device lost")
        return real(*args, **kwargs)

    session.run_with_iobinding = run


def greedy(gen: Generator, prompt: str = "def fibonacci(n):", count: int = 12) -> list[int]:
    ids = gen.chat_prompt([{"role": "user", "content": prompt}])  # 3 prefill chunks, then decode steps
    return [c.token_id for c in gen.stream(ids, count, gen.sampling(temperature=0)) if c.token_id is not None]


@pytest.mark.parametrize("graph, after", [("ffn.1", 5), ("attention.0", 4), ("head", 1), ("attention.1", 0)])
def test_a_graph_failing_mid_request_moves_to_the_next_ep_and_the_request_completes(artifacts, tmp_path, caplog, graph, after):
    """Mid-decode (ffn.1, attention.0: the KV cache is bound to the new session), in the last prefill chunk (head),
    in the first (attention.1): the same greedy tokens as without a failure; the warning and placement say so."""
    expected = greedy(Generator.load(artifacts["split"]))
    both = retarget(artifacts["split"], tmp_path / "chains", npu=CHAIN, igpu=CHAIN)
    gen = Generator.load(both)
    runner = next(g for g in gen.engine.graphs if g.spec.name == graph)
    fail_once(runner, after)
    with caplog.at_level(logging.WARNING, logger="tandem"):
        assert greedy(gen) == expected
    assert (runner.placement.provider, runner.placement.index) == ("CPU", 1)
    assert runner.placement.skipped == ["CPU: failed while running: injected: device lost"]
    assert f"graph {graph} " in caplog.text and "failed while running: injected: device lost -> runs on CPU" in caplog.text
    assert greedy(gen) == expected  # and the next request runs on the new session from the start


def test_a_prefill_session_failing_falls_back_within_the_prefill_chain(artifacts, tmp_path):
    expected = greedy(Generator.load(artifacts["split"]))
    phased = retarget(artifacts["split"], tmp_path / "phased", igpu={"providers": ["CPU"], "prefill": CHAIN["providers"]})
    gen = Generator.load(phased)
    runner = next(r for r in gen.engine.runners if r.spec.name == "ffn.0" and r.placement.phase == "prefill")
    fail_once(runner, 1)
    assert greedy(gen) == expected
    assert (runner.placement.phase, runner.placement.index) == ("prefill", 1)


def test_no_ep_left_is_a_clear_error(artifacts):
    """The tiny artifact's chains end at the CPU EP, which it already runs on: nothing to fall back to."""
    gen = Generator.load(artifacts["split"])
    fail_once(next(g for g in gen.engine.graphs if g.spec.name == "ffn.0"), 0)
    with pytest.raises(TandemError, match=r"graph ffn.0 \(role igpu\): CPU: failed while running: injected: device lost; "
                                          r"no execution provider is left in its chain"):
        greedy(gen)
