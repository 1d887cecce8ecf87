"""compare: several artifacts of the same weights against the fp32 reference on the same held-out text, as a table."""
from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from compiler.evaltext import windows
from compiler.fidelity import FidelityAccumulator, score
from compiler.progress import progress
from compiler.reference import sequence_logits
from compiler.source import ModelSource
from compiler.runtime_runs import runtime_peak_rss
from compiler.verify import engine_logits
from runtime.engine import Engine
from runtime.errors import TandemError
from runtime.manifest import load_manifest
from runtime.tokenizer import Tokenizer

Candidate = Callable[[list[int]], np.ndarray]


def genai_candidate(directory: Path) -> Candidate:
    """A model from ORT GenAI's builder (model.onnx), run with plain ORT: one fresh prefill per window."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(directory / "model.onnx"), providers=["CPUExecutionProvider"])
    inputs = session.get_inputs()
    decoder = json.loads((directory / "genai_config.json").read_text())["model"]["decoder"]
    kv_heads, head_size = decoder["num_key_value_heads"], decoder["head_size"]

    def logits(tokens: list[int]) -> np.ndarray:
        n = len(tokens)
        feeds: dict[str, np.ndarray] = {}
        for i in inputs:
            if i.name == "input_ids":
                feeds[i.name] = np.array([tokens], dtype=np.int64)
            elif i.name == "attention_mask":
                feeds[i.name] = np.ones((1, n), dtype=np.int64)
            elif i.name == "position_ids":
                feeds[i.name] = np.arange(n, dtype=np.int64)[None]
            elif i.name.startswith("past_key_values"):
                dtype = np.float16 if "float16" in i.type else np.float32
                feeds[i.name] = np.zeros((1, kv_heads, 0, head_size), dtype=dtype)
            else:
                raise TandemError(f"{directory}: unexpected ORT GenAI model input {i.name}")
        return session.run(["logits"], feeds)[0][0].astype(np.float32)

    return logits


def genai_peak_rss(directory: Path) -> int:
    """Peak RSS of onnxruntime-genai's own runtime generating 16 tokens after a 256-token prompt."""
    code = (
        "import sys, onnxruntime_genai as og; m = og.Model(sys.argv[1]); p = og.GeneratorParams(m); "
        "p.set_search_options(max_length=300); g = og.Generator(m, p); g.append_tokens([[1000 + i for i in range(256)]]); "
        "[g.generate_next_token() for _ in range(16)]; print(open('/proc/self/status').read().split('VmHWM:')[1].split()[0])"
    )
    proc = subprocess.run([sys.executable, "-c", code, str(directory)], capture_output=True, text=True)
    return int(proc.stdout.split()[-1]) * 1024 if proc.returncode == 0 else 0


def compare(
    artifacts: list[Path], source: ModelSource, count: int, window: int, genai: list[Path] = (), show_progress: bool = True
) -> list[dict[str, Any]]:
    """One row per model: perplexity and its delta vs fp32, top-1 agreement, KL, size on disk, runtime peak RSS."""
    manifests = {a: load_manifest(a) for a in artifacts}
    for a, m in manifests.items():
        if m.source.sha256 != source.spec.sha256:
            raise TandemError(f"{a}: compiled from other weights ({m.source.location}) than {source.spec.location}")
    rows: dict[Path, dict[str, Any]] = {
        a: {
            "artifact": m.name,
            "quantization": sorted({f"{k}: {v}" for g in m.graphs for k, v in g.quantization.items()}),
            "size_bytes": sum(f.size for f in m.files),
            "runtime_peak_rss_bytes": runtime_peak_rss(a),
        }
        for a, m in manifests.items()
    }
    for d in genai:
        rows[d] = {
            "artifact": f"ORT GenAI builder ({d.name})",
            "quantization": ["onnxruntime_genai.models.builder -p int4 -e cpu"],
            "size_bytes": sum(f.stat().st_size for f in d.iterdir() if f.is_file()),
            "runtime_peak_rss_bytes": genai_peak_rss(d),
        }
    candidates = {**{a: engine_logits(Engine(a)) for a in artifacts}, **{d: genai_candidate(d) for d in genai}}
    accumulators = {key: FidelityAccumulator() for key in candidates}
    texts = windows(Tokenizer.from_dir(artifacts[0]), "evaluation", window, count)
    for tokens, reference in zip(progress(texts, show_progress, "comparing"), sequence_logits(source)(texts)):
        score(tokens, reference, [(accumulators[key], candidate(tokens)) for key, candidate in candidates.items()])
    return [{**rows[key], **accumulators[key].result()} for key in candidates]


def markdown(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| artifact | quantization | perplexity | vs fp32 | top-1 agreement | KL | size MB | peak RSS MB |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['artifact']} | {'; '.join(r['quantization']) or 'fp32'} | {r['perplexity']:.4f} | {r['perplexity_delta']:+.2%} "
            f"| {r['top1_agreement']:.2%} | {r['kl_mean']:.4f} | {r['size_bytes'] / 1e6:.0f} | {r['runtime_peak_rss_bytes'] / 1e6:.0f} |"
        )
    rows and lines.append(f"\nfp32 reference perplexity {rows[0]['reference_perplexity']:.4f} over {rows[0]['tokens']} held-out tokens.")
    return "\n".join(lines) + "\n"
