"""`tandem`: the runtime's commands plus compile and verify (which need the compiler extra: torch, transformers)."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from runtime import cli as runtime_cli
from runtime.errors import TandemError


def _require_compiler() -> None:
    try:
        import onnx  # noqa: F401
        import torch  # noqa: F401
        import transformers  # noqa: F401
    except ImportError as e:
        raise TandemError(f"this command needs the compiler extra ({e.name} is missing): pip install 'tandem[compiler]'") from None


def cmd_compile(args: argparse.Namespace) -> None:
    _require_compiler()
    from compiler.build import compile_recipe

    fuse = None if args.layout is None else args.layout == "fused"
    out = compile_recipe(args.recipe, model=args.model, out=args.output, show_progress=not args.quiet, max_context=args.max_context,
                         jobs=args.jobs, resume=args.resume, fuse=fuse, gate=args.verify == "gate")
    report = json.loads((out / "verify.json").read_text())
    _print_report(report)
    print(f"wrote {out}")


def cmd_verify(args: argparse.Namespace) -> None:
    _require_compiler()
    from compiler.source import open_source
    from compiler.verify import verify_artifact
    from runtime.manifest import load_manifest

    manifest = load_manifest(args.artifact)
    source = open_source(manifest.source.location)
    if source.spec.sha256 != manifest.source.sha256:
        raise TandemError(f"{manifest.source.location}: the source model changed since compile (sha256 differs)")
    report = verify_artifact(args.artifact, source, show_progress=True, eval_windows=args.eval_windows)
    (args.artifact / "verify.json").write_text(json.dumps(report, indent=2) + "\n")
    _print_report(report)
    if report["failures"]:
        raise TandemError("verify failed:\n  " + "\n  ".join(report["failures"]))


def cmd_compare(args: argparse.Namespace) -> None:
    _require_compiler()
    from compiler.compare import compare, markdown
    from compiler.source import open_source
    from runtime.manifest import load_manifest

    source = open_source(load_manifest(args.artifacts[0]).source.location)
    rows = compare(args.artifacts, source, args.eval_windows, args.eval_window, genai=args.genai)
    table = markdown(rows)
    print(table)
    if args.out:
        args.out.write_text(json.dumps(rows, indent=2) + "\n")


def cmd_make_checkpoint(args: argparse.Namespace) -> None:
    import tempfile

    from compiler.checkpoint import load_config, make_checkpoint

    config, generation = load_config(args.config)
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = args.tokenizer
        if tokenizer is None:  # the default model's tokenizer: Qwen2.5's vocabulary, chat template and specials
            _require_compiler()
            from compiler.source import open_source

            tokenizer = Path(tmp)
            open_source("default").save_tokenizer(tokenizer)
        out = make_checkpoint(config, generation, args.output, tokenizer, args.seed, int(args.shard_gb * (1 << 30)), args.jobs)
    size = sum(f.stat().st_size for f in out.iterdir())
    print(f"wrote {out} ({size / 1e9:.2f} GB, {config['num_hidden_layers']} layers, seed {args.seed})")


def cmd_export_hf(args: argparse.Namespace) -> None:
    _require_compiler()
    from compiler.export_hf import export_hf
    from compiler.source import open_source

    out = export_hf(open_source(args.model), args.output)
    size = sum(f.stat().st_size for f in out.iterdir())
    print(f"wrote {out} ({size / 1e9:.2f} GB, float32)")


def _print_report(report: dict) -> None:
    worst = max(report["graphs"], key=lambda g: g["max_rel_error"])
    print(f"verify: {len(report['graphs'])} graphs, worst max rel error {worst['max_rel_error']:.2e} ({worst['graph']})", file=sys.stderr)
    for c in report["chain"]:
        print(
            f"verify: prompt of {c['prompt_tokens']} tokens: logits max abs error {c['logits_max_abs_error']:.2e}, "
            f"greedy agreement {c['greedy_agreement']:.0%} over {c['new_tokens']} tokens",
            file=sys.stderr,
        )
    if f := report.get("fidelity"):
        print(
            f"verify: {f['tokens']} held-out tokens: perplexity {f['perplexity']:.4f} vs fp32 {f['reference_perplexity']:.4f} "
            f"({f['perplexity_delta']:+.2%}), top-1 agreement {f['top1_agreement']:.2%}, KL {f['kl_mean']:.4f}",
            file=sys.stderr,
        )
    print(f"verify: {report['size_bytes'] / 1e6:.0f} MB on disk, runtime peak RSS {report['runtime_peak_rss_bytes'] / 1e6:.0f} MB", file=sys.stderr)


def parser() -> argparse.ArgumentParser:
    p = runtime_cli.parser()
    sub = next(a for a in p._actions if isinstance(a, argparse._SubParsersAction))
    c = sub.add_parser("compile", help="compile a recipe into an artifact directory")
    c.add_argument("recipe", type=Path)
    c.add_argument("--model", default=None, help="checkpoint dir, hub id in the local cache, .gguf file, or 'default'")
    c.add_argument("-o", "--output", type=Path, default=None, help="artifact directory (default: artifacts/<recipe name>)")
    c.add_argument("--max-context", type=int, default=None, help="KV cache capacity in tokens (default: the recipe's)")
    c.add_argument("--layout", choices=["fused", "alternating"], default=None,
                   help="one linked graph, or a graph per block alternating between roles (default: the recipe's `fuse`)")
    c.add_argument("--jobs", type=int, default=1, help="graphs quantized at once, one process each (memory: one graph each)")
    c.add_argument("--quiet", action="store_true", help="no progress bars")
    c.add_argument("--resume", action="store_true",
                   help="go on from the blocks an interrupted build of the same output, recipe and model finished")
    c.add_argument("--verify", choices=["gate", "report"], default="gate",
                   help="gate: a failed verify check writes no artifact (default); report: the artifact is written and "
                        "the failures are in its verify.json (a random-weight stand-in, whose errors the gates do not describe)")
    c.set_defaults(func=cmd_compile)
    v = sub.add_parser("verify", help="re-run verification of an artifact against its source model")
    v.add_argument("artifact", type=Path)
    v.add_argument("--eval-windows", type=int, default=None, help="held-out text windows to evaluate (default: the recipe's)")
    v.set_defaults(func=cmd_verify)
    m = sub.add_parser("make-checkpoint", help="an HF checkpoint with a real config and seeded random weights")
    m.add_argument("--config", required=True, help="qwen2.5-7b-instruct, or a config.json path")
    m.add_argument("--random-weights", action="store_true", required=True, help="the only kind of weights it writes")
    m.add_argument("-o", "--output", type=Path, required=True)
    m.add_argument("--seed", type=int, default=0)
    m.add_argument("--tokenizer", type=Path, default=None, help="directory with tokenizer.json (default: the default model's)")
    m.add_argument("--shard-gb", type=float, default=4.0, help="safetensors shard size")
    m.add_argument("--jobs", type=int, default=4, help="tensors drawn at once, one thread each (values do not depend on it)")
    m.set_defaults(func=cmd_make_checkpoint)
    e = sub.add_parser("export-hf", help="a model source as an fp32 Hugging Face checkpoint (for peers that read only those)")
    e.add_argument("model", help="checkpoint dir, hub id in the local cache, .gguf file, or 'default'")
    e.add_argument("-o", "--output", type=Path, required=True)
    e.set_defaults(func=cmd_export_hf)
    c = sub.add_parser("compare", help="artifacts of the same weights vs the fp32 reference on held-out text")
    c.add_argument("artifacts", type=Path, nargs="+")
    c.add_argument("--eval-windows", type=int, default=40)
    c.add_argument("--eval-window", type=int, default=512)
    c.add_argument("--genai", type=Path, action="append", default=[], help="an ORT GenAI builder output dir to evaluate too")
    c.add_argument("--out", type=Path, default=None, help="also write the rows as JSON")
    c.set_defaults(func=cmd_compare)
    return p


def main(argv: list[str] | None = None) -> int:
    return runtime_cli.run(parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
