"""verify: each graph against a torch/transformers reference of the same weights, then the whole chain."""
from __future__ import annotations

import inspect
import tempfile
import textwrap
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import torch

from compiler.evaltext import windows
from compiler.fidelity import evaluate
from compiler.plan import Block
from compiler.progress import progress
from compiler.recipe import Recipe, VerifySpec
from compiler.reference import SequenceLogits, block_reference, sequence_logits
from compiler.runtime_runs import Run, artifact_runs, runtime_peak_rss
from compiler.source import ModelSource
from runtime import manifest as names
from runtime.engine import Engine, StepInputs, rope_values, runner, static_tables
from runtime.kv_cache import KVCache
from runtime.manifest import GraphSpec, Manifest, load_manifest
from runtime.providers import Placement, model_file, session_options
from runtime.tokenizer import Tokenizer

PREFIX, SUFFIX = 7, 5  # verify a graph in two calls: a prefill of PREFIX tokens, then SUFFIX more over the cache


def verify_artifact(directory: Path, source: ModelSource, show_progress: bool = False, eval_windows: int | None = None) -> dict[str, Any]:
    """Measure every graph, the whole chain and its fidelity on held-out text; `failures` lists what misses the recipe's tolerances."""
    manifest = load_manifest(directory)
    spec = Recipe.model_validate(manifest.recipe).verify
    runtime_rss = runtime_peak_rss(directory)  # first: the process it waits in holds least now
    graphs = verify_graphs(directory, manifest, source, show_progress)
    tokenizer = Tokenizer.from_dir(directory)
    count = spec.eval_windows if eval_windows is None else eval_windows
    texts = windows(tokenizer, "evaluation", spec.eval_window, count) if count else []
    prompts = encoded_prompts(spec, tokenizer, manifest)
    # our side first, in a process of its own, then the reference's: the engine and the torch reference are never
    # in memory together (for a 7B each takes gigabytes; verify held both at 14.4 GB). Our logits wait on disk (a
    # 152K vocab makes them 1.25 GB for 4 x 512 tokens) and are mapped back.
    with tempfile.TemporaryDirectory(prefix="tandem-verify-") as spill:
        runs, files = artifact_runs(directory, prompts, texts, spec.new_tokens, Path(spill), show_progress)
        ours = {tuple(t): f for t, f in zip(texts, files)}
        reference = sequence_logits(source)
        chain = verify_chain(tokenizer, runs, reference)
        candidate = lambda tokens: np.concatenate([np.load(f) for f in ours[tuple(tokens)]])  # noqa: E731
        fidelity = {"windows": count, "window": spec.eval_window, **evaluate(texts, reference(texts), candidate)} if count else None
    del reference
    failures = [
        f"graph {g['graph']}: max relative error {g['max_rel_error']:.3g} > {spec.graph_max_rel_error:g}"
        for g in graphs if g["max_rel_error"] > spec.graph_max_rel_error
    ]
    for c in chain:
        if c["logits_max_abs_error"] > spec.logits_max_abs_error:
            failures.append(f"prompt {c['prompt'][:40]!r}: logits error {c['logits_max_abs_error']:.3g} > {spec.logits_max_abs_error:g}")
        if c["greedy_agreement"] < spec.greedy_agreement:
            failures.append(f"prompt {c['prompt'][:40]!r}: greedy agreement {c['greedy_agreement']:.2%} < {spec.greedy_agreement:.0%}")
    if fidelity and fidelity["perplexity_delta"] > spec.max_perplexity_delta:
        failures.append(f"perplexity {fidelity['perplexity']:.4g} is {fidelity['perplexity_delta']:+.2%} vs fp32 {fidelity['reference_perplexity']:.4g}, over {spec.max_perplexity_delta:.2%}")
    return {
        "artifact": manifest.name,
        "source": manifest.source.model_dump(),
        "quantization": {g.name: g.quantization for g in manifest.graphs if g.quantization},
        "tolerances": spec.model_dump(exclude={"prompts"}),
        "graphs": graphs,
        "chain": chain,
        "greedy_agreement": min(c["greedy_agreement"] for c in chain),
        "fidelity": fidelity,
        "size_bytes": sum(f.size for f in manifest.files),
        "runtime_peak_rss_bytes": runtime_rss,
        "failures": failures,
    }


def engine_logits(engine: Engine) -> Callable[[list[int]], np.ndarray]:
    """Logits at every position of a window, from a fresh sequence in slot 0."""

    def logits(tokens: list[int]) -> np.ndarray:
        engine.reset(0)
        return engine.forward(0, tokens, all_logits=True)

    return logits


# --- graphs ---------------------------------------------------------------------------------------


def verify_graphs(directory: Path, manifest: Manifest, source: ModelSource, show_progress: bool) -> list[dict[str, Any]]:
    """Each graph on the reference's own input for it: random token ids, carried through the schedule by the
    torch reference (so every graph sees realistic hidden states, as calibrated int8 graphs need)."""
    x = np.random.default_rng(0).integers(0, manifest.model.vocab_size, (1, PREFIX + SUFFIX), dtype=np.int64)
    results = []
    for spec in progress(manifest.graphs, show_progress, "verifying graphs"):
        blocks = [Block(kind, int(layer) if layer else None) for kind, _, layer in (b.partition(".") for b in spec.blocks)]
        expected = block_reference(blocks, source)(torch.from_numpy(x)).numpy()
        for name, form, file in _forms(spec):
            err = np.abs(_run_graph(directory, manifest, spec, form, file, x) - expected)
            results.append({
                "graph": name,
                "max_abs_error": float(err.max()),
                "max_rel_error": float(err.max() / np.abs(expected).max()),
                "mean_abs_error": float(err.mean()),
            })
        x = expected
    return results


def _forms(spec: GraphSpec) -> list[tuple[str, GraphSpec, str]]:
    """The forms of a graph verify runs, by the name it reports, each with the spec its runner takes and its file: a
    static graph's prefill form (which takes both calls; its decode form is the same graph fixed to one token) and
    its dynamic form (which the CPU EP runs, given the same steps), or a contrib graph and its prefill form if any."""
    if spec.dialect == "static":
        prefill = spec.prefill or spec
        return [(spec.name, prefill, prefill.file)] + ([(f"{spec.name} (dynamic)", prefill, spec.dynamic)] if spec.dynamic else [])
    return [(spec.name, spec, spec.file)] + ([(f"{spec.name} (prefill)", spec.prefill, spec.prefill.file)] if spec.prefill else [])


def _run_graph(directory: Path, manifest: Manifest, spec: GraphSpec, form: GraphSpec, file: str, x: np.ndarray) -> np.ndarray:
    """Run a form of the graph alone on the CPU EP: PREFIX positions, then SUFFIX more through its KV cache."""
    with model_file(directory / file, "CPUExecutionProvider", spec.qdq) as model:  # as the engine loads it
        session = ort.InferenceSession(str(model), session_options(0, "CPUExecutionProvider"), providers=["CPUExecutionProvider"])
    graph = runner(form, session, Placement(spec.name, spec.role, ["CPU"], "CPU"))
    cache = KVCache(manifest.kv_cache, slots=1)
    static = static_tables(directory, form) if names.ROPE_COS in form.inputs else None
    inputs = StepInputs(cache, rope_values(directory, spec if names.COS_CACHE in spec.inputs else None), {}, static=static)
    first = names.INPUT_IDS if names.INPUT_IDS in spec.inputs else names.HIDDEN
    outputs = []
    for start, stop in ((0, PREFIX), (PREFIX, PREFIX + SUFFIX)):
        values = inputs(0, 1, first, x[:, start:stop].astype(spec.inputs[first].dtype), np.arange(stop - start)[None])
        graph.run(values)
        outputs.append(values[names.LOGITS if names.LOGITS in spec.outputs else names.HIDDEN].numpy().astype(np.float32))
        cache.update(0, stop - start)
    return np.concatenate(outputs, axis=1)


# --- chain ----------------------------------------------------------------------------------------


def verify_prompts(spec: VerifySpec, tokenizer: Tokenizer, manifest: Manifest) -> list[str]:
    """The recipe's prompts plus one longer than a prefill chunk (real code from the standard library)."""
    room = manifest.kv_cache.capacity - spec.new_tokens - 32  # leave space for the chat template and the answer
    code = tokenizer.encode(inspect.getsource(textwrap))[: min(manifest.prefill_chunk * 3 // 2, room)]
    return [*spec.prompts, "Explain briefly what this Python code does:\n\n" + tokenizer.decode(code)]


def encoded_prompts(spec: VerifySpec, tokenizer: Tokenizer, manifest: Manifest) -> list[tuple[str, list[int]]]:
    """Each verify prompt with its ids as a user message in the chat template."""
    return [(prompt, tokenizer.encode(tokenizer.apply_chat_template([{"role": "user", "content": prompt}])))
            for prompt in verify_prompts(spec, tokenizer, manifest)]


def verify_chain(tokenizer: Tokenizer, runs: list[Run], reference: SequenceLogits) -> list[dict[str, Any]]:
    """The reference's logits over each prompt + our continuation in one pass (teacher forcing): up to the first
    token where the reference's argmax parts from ours both saw the same prefix, so agreement and logit errors
    are those of two greedy runs, and a 7B reference runs once."""
    results = []
    for (prompt, ids, ours, our_logits), logits in zip(runs, reference([ids + ours[:-1] for _, ids, ours, _ in runs])):
        theirs = logits[len(ids) - 1 :]
        agree = next((i for i, token in enumerate(ours) if int(np.argmax(theirs[i])) != token), len(ours))
        errors = [float(np.abs(our_logits[i] - theirs[i]).max()) for i in range(min(agree + 1, len(ours)))]
        reference_tokens = ours[:agree] + ([int(np.argmax(theirs[agree]))] if agree < len(ours) else [])
        results.append({
            "prompt": prompt if len(prompt) < 200 else prompt[:200] + "...",
            "prompt_tokens": len(ids),
            "new_tokens": len(ours),
            "logits_max_abs_error": errors[0],
            "logits_max_abs_error_all_steps": max(errors),
            "greedy_agreement": agree / max(len(ours), 1),
            "text": tokenizer.decode(ours),
            "reference_text": tokenizer.decode(reference_tokens),  # the reference's greedy text up to where it parts
        })
    return results
