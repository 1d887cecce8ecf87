"""`tandem bench`: ours and a peer on the same weights and prompts, in their own processes (fast tier)."""
from __future__ import annotations

import json

from runtime.roofline import bytes_per_token
from tests.conftest import tandem


def test_bench_runs_ours_and_a_peer_side_by_side(artifacts, checkpoint, tmp_path):
    out = tmp_path / "bench"
    proc = tandem("bench", str(artifacts["fused"]), "--prompt-lengths", "8,24", "--new-tokens", "6", "--repeats", "1",
                  "--threads", "1", "--peer", f"transformers:{checkpoint}:float32", "--peer", f"optimum:{checkpoint}",
                  "--peer", "genai:nowhere", "--out", str(out))
    report = json.loads((out / "bench.json").read_text())
    ours, *peers = report["results"]
    assert [r["system"] for r in report["results"]] == ["tandem", "transformers", "optimum"]
    assert [row["prompt_tokens"] for row in ours["rows"]] == [8, 24]
    # the same fp32 weights and prompt: the same greedy reply, token for token
    assert len(ours["tokens"]) == 7 and all(peer["tokens"] == ours["tokens"] for peer in peers)
    assert proc.stdout.count("greedy reply to the first prompt equals tandem's in 7 of 7 tokens") == 2
    # the graphs ran on the CPU EP, so decode is set against the host's measured memory bandwidth
    bandwidth = report["memory_bandwidth_bytes_per_s"]
    for row in ours["rows"]:
        assert row["decode_bound_tokens_per_s"] == bandwidth / bytes_per_token(artifacts["fused"], row["prompt_tokens"])
    assert list(ours["time_by_graph_kind_s"]) == ["attention+embed+ffn+head"] and list(ours["time_by_provider_s"]) == ["CPU"]
    assert [s["system"] for s in report["skipped"]] == ["genai"]  # not installed here: skipped with its reason
    assert (out / "bench.md").read_text().count("| tandem (CPU) |") == 2
    assert (out / "bench-speed.png").read_bytes()[:4] == b"\x89PNG" and (out / "bench-time-share.png").exists()
