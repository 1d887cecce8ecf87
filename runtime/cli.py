"""The runtime's commands: generate, chat, info. Errors are one line on stderr, never a traceback."""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from runtime.errors import TandemError

if TYPE_CHECKING:
    from runtime.manifest import GraphSpec


MAX_CONTEXT_HELP = "KV cache positions per sequence, fewer than the artifact's to save memory (default: the artifact's)"


def add_runtime_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="generate text from a prompt")
    p.add_argument("artifact", type=Path)
    p.add_argument("--prompt", required=True)
    p.add_argument("--chat", action="store_true", help="wrap the prompt as a user message in the chat template")
    _sampling_args(p)
    p.add_argument("--stats", action="store_true", help="print timing stats to stderr")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("chat", help="interactive streaming chat")
    p.add_argument("artifact", type=Path)
    p.add_argument("--system", default=None, help="system prompt")
    _sampling_args(p)
    p.set_defaults(func=cmd_chat)

    p = sub.add_parser("serve", help="OpenAI-compatible HTTP server with continuous batching")
    p.add_argument("artifact", type=Path)
    p.add_argument("--host", default="127.0.0.1", help="interface to bind (default: this machine only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--served-model-name", nargs="+", default=[], help="extra model names to answer to")
    p.add_argument("--api-key", default=os.environ.get("TANDEM_API_KEY"), help="require this bearer key (or $TANDEM_API_KEY)")
    p.add_argument("--max-num-seqs", type=int, default=8, help="sequences decoded together (KV cache slots)")
    p.add_argument("--max-waiting", type=int, default=64, help="requests queued beyond those; more get 429")
    p.add_argument("--threads", type=int, default=0, help="ORT intra-op threads (0 = all cores)")
    p.add_argument("--max-context", type=int, default=None, help=MAX_CONTEXT_HELP)
    p.add_argument("--max-body-bytes", type=int, default=8 << 20, help="larger request bodies get 413 (default 8 MiB)")
    p.add_argument("--max-messages", type=int, default=1024, help="chat messages (or completion prompts) per request")
    p.add_argument("--max-tokens", type=int, default=None, help="the most one request may generate (default: the context)")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("bench-serve", help="aggregate tokens/s of concurrent streaming clients vs one at a time")
    p.add_argument("artifact", type=Path)
    p.add_argument("--clients", type=int, default=8, help="concurrent clients (0: skip the concurrency run)")
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--prompt-lengths", default="", help="also TTFT by prompt length, e.g. 1024,4096,32000")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--out", type=Path, default=None, help="write the report as JSON")
    p.set_defaults(func=cmd_bench_serve)

    p = sub.add_parser("bench", help="TTFT, prefill and decode speed, memory; peers side by side on the same prompts")
    p.add_argument("artifact", type=Path)
    p.add_argument("--prompt-lengths", default="32,1024", help="comma-separated prompt lengths in tokens")
    p.add_argument("--new-tokens", type=int, default=128, help="decode steps timed after each prompt")
    p.add_argument("--repeats", type=int, default=3, help="runs per prompt length (the median is reported)")
    p.add_argument("--peer", action="append", default=[], help="tandem:DIR, genai:DIR, llamacpp:FILE.gguf, transformers:CHECKPOINT[:DTYPE] or optimum:DIR (repeatable)")
    p.add_argument("--peer-python", action="append", default=[], metavar="SYSTEM=PYTHON",
                   help="run that system's peers with another environment's interpreter (one with tandem installed), "
                        "e.g. optimum=.venv-optimum/bin/python: optimum-onnx pins an older transformers (repeatable)")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--out", type=Path, default=None, help="directory for bench.json, bench.md and the plots")
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("stress", help="load, soak and cut streams against the server; what it must not lose")
    p.add_argument("artifact", type=Path)
    p.add_argument("--clients", type=int, default=16, help="concurrent clients in the load run")
    p.add_argument("--requests", type=int, default=50, help="mixed requests per client (0: skip the load run)")
    p.add_argument("--soak", type=int, default=1000, help="requests in the soak run (0: skip)")
    p.add_argument("--disconnects", type=int, default=50, help="streams cut mid-way (0: skip)")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--out", type=Path, default=None, help="write the report as JSON")
    p.set_defaults(func=cmd_stress)

    p = sub.add_parser("fuzz", help="schemathesis against the server's own OpenAPI schema (needs the dev extra)")
    p.add_argument("artifact", type=Path)
    p.add_argument("--max-examples", type=int, default=200, help="generated cases per operation and phase")
    p.add_argument("--seconds", type=int, default=600, help="time budget")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, default=None, help="write the report as JSON")
    p.set_defaults(func=cmd_fuzz)

    p = sub.add_parser("info", help="graphs, roles, requested vs resolved execution providers, sizes")
    p.add_argument("artifact", type=Path)
    p.set_defaults(func=cmd_info)


def _sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=None, help="0 = greedy (default: the model's)")
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--min-p", type=float, default=None)
    p.add_argument("--repetition-penalty", type=float, default=None)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--threads", type=int, default=0, help="ORT intra-op threads (0 = all cores)")
    p.add_argument("--max-context", type=int, default=None, help=MAX_CONTEXT_HELP)


def _sampling(gen, args):
    return gen.sampling(
        temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, min_p=args.min_p,
        repetition_penalty=args.repetition_penalty, seed=args.seed,
    )


def cmd_generate(args: argparse.Namespace) -> None:
    from runtime.generate import Generator
    from runtime.providers import share_threads

    share_threads(args.threads)
    gen = Generator.load(args.artifact, threads=args.threads, capacity=args.max_context)
    ids = gen.chat_prompt([{"role": "user", "content": args.prompt}]) if args.chat else gen.tokenizer.encode(args.prompt)
    for chunk in gen.stream(ids, args.max_tokens, _sampling(gen, args)):
        print(chunk.text, end="", flush=True)
    print()
    if args.stats:
        s = chunk.stats
        print(
            f"[{s.prompt_tokens} prompt tokens, {s.completion_tokens} generated, finish={chunk.finish_reason}, "
            f"TTFT {s.ttft_s * 1000:.0f} ms, decode {s.decode_tokens_per_s:.1f} tok/s]",
            file=sys.stderr,
        )
        print(f"[{_placement_summary(gen.engine)}]", file=sys.stderr)


def cmd_chat(args: argparse.Namespace) -> None:
    from runtime.generate import Generator
    from runtime.providers import share_threads

    share_threads(args.threads)
    gen = Generator.load(args.artifact, threads=args.threads, capacity=args.max_context)
    messages = [{"role": "system", "content": args.system}] if args.system else []
    print("tandem chat: empty line or Ctrl-D to quit", file=sys.stderr)
    while True:
        try:
            line = input("> ").strip()
        except EOFError:
            break
        if not line:
            break
        messages.append({"role": "user", "content": line})
        reply = ""
        try:
            for chunk in gen.stream(gen.chat_prompt(messages), args.max_tokens, _sampling(gen, args)):
                reply += chunk.text
                print(chunk.text, end="", flush=True)
        except TandemError as e:  # e.g. the conversation outgrew the context: say so, keep the session
            messages.pop()
            print(f"\nerror: {e}", file=sys.stderr)
            continue
        print()
        messages.append({"role": "assistant", "content": reply})


def cmd_serve(args: argparse.Namespace) -> None:
    try:
        import uvicorn

        from runtime.providers import share_threads
        from runtime.server import ServerConfig, Service, create_app
    except ImportError as e:
        raise TandemError(f"the server needs the `server` extra: pip install 'tandem[server]' ({e})") from None
    if min(args.max_num_seqs, args.max_body_bytes, args.max_messages, args.max_tokens or 1) < 1 or args.max_waiting < 0:
        raise TandemError("--max-num-seqs, --max-body-bytes, --max-messages and --max-tokens must be at least 1, "
                          "--max-waiting at least 0")
    failure: list[str] = []

    def stop(message: str) -> None:
        failure.append(message)
        server.should_exit = True

    config = ServerConfig(
        args.artifact, args.served_model_name, args.api_key, args.max_num_seqs, args.max_waiting, args.threads,
        args.max_body_bytes, args.max_messages, args.max_tokens, args.max_context,
    )
    share_threads(args.threads)
    service = Service(config, on_failure=stop)
    server = uvicorn.Server(uvicorn.Config(create_app(service), host=args.host, port=args.port, log_level="warning"))
    server.run()
    if failure:
        raise TandemError(failure[0])


def cmd_bench_serve(args: argparse.Namespace) -> None:
    from runtime.serve_bench import bench_serve, markdown

    try:
        lengths = [int(n) for n in args.prompt_lengths.split(",") if n.strip()]
    except ValueError:
        raise TandemError(f"--prompt-lengths takes comma-separated integers, got {args.prompt_lengths!r}") from None
    print(markdown(bench_serve(args.artifact, args.clients, args.max_tokens, args.threads, args.out, lengths)))


def cmd_bench(args: argparse.Namespace) -> None:
    from runtime.bench import bench, markdown
    from runtime.bench_plots import write_plots

    try:
        lengths = [int(n) for n in args.prompt_lengths.split(",") if n.strip()]
    except ValueError:
        raise TandemError(f"--prompt-lengths takes comma-separated integers, got {args.prompt_lengths!r}") from None
    pythons = dict(spec.partition("=")[::2] for spec in args.peer_python)
    if bad := [spec for spec in args.peer_python if "=" not in spec or not pythons[spec.partition("=")[0]]]:
        raise TandemError(f"--peer-python takes SYSTEM=PYTHON, got {bad[0]!r}")
    report = bench(args.artifact, args.peer, lengths, args.new_tokens, args.repeats, args.threads, pythons)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "bench.json").write_text(json.dumps(report, indent=2) + "\n")
        (args.out / "bench.md").write_text(markdown(report))
        if not write_plots(report, args.out):
            print("(no plots: matplotlib is not installed; pip install 'tandem[bench]')", file=sys.stderr)
    print(markdown(report))
    if not report["results"]:
        raise TandemError("nothing was measured: " + "; ".join(s["reason"] for s in report["skipped"]))


def cmd_stress(args: argparse.Namespace) -> None:
    from runtime.stress import markdown, stress, verdict

    report = stress(args.artifact, args.clients, args.requests, args.soak, args.disconnects, args.threads, args.out)
    print(markdown(report))
    if verdict(report):
        raise TandemError("stress run failed (see above)")


def cmd_fuzz(args: argparse.Namespace) -> None:
    try:
        from runtime.fuzz import fuzz
    except ImportError as e:
        raise TandemError(f"fuzzing needs the `dev` extra: pip install 'tandem[dev]' ({e})") from None
    report = fuzz(args.artifact, args.max_examples, args.seconds, args.seed, args.threads)
    if args.out:
        args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(report["output_tail"])
    print(f"{report['generated']} cases generated, {report['passed']} passed; server alive: {report['server_alive']}")
    if report["schemathesis_exit"] or not report["server_alive"]:
        raise TandemError("fuzzing found failures (see above)")


def cmd_info(args: argparse.Namespace) -> None:
    from runtime.engine import Engine

    engine = Engine(args.artifact, threads=1)
    m = engine.manifest
    sizes = {f.path: f.size for f in m.files}
    print(f"artifact  {m.name}  (format {m.format_version})")
    print(f"source    {m.source.kind} {m.source.location}  sha256 {m.source.sha256[:16]}")
    print(f"model     {m.model.num_layers} layers, hidden {m.model.hidden_size}, heads {m.model.num_heads}/{m.model.num_kv_heads} kv, vocab {m.model.vocab_size}")
    print(f"context   {m.kv_cache.capacity} tokens, prefill chunk {m.prefill_chunk}")
    print("roles     " + "; ".join(f"{role}: {_chains(spec)}" for role, spec in m.roles.items()))
    print(f"{'graph':<28} {'role':<13} {'requested':<10} {'resolved':<12} {'MB':>8}  note")
    for place in engine.placements:
        g = m.graph(place.graph)
        mb = sum(size for path, size in sizes.items() if path.startswith(_form_files(g, place.phase == "prefill", sizes))) / 1e6
        note = "fallback: " + "; ".join(place.skipped) if place.fell_back else ""
        role = f"{g.role} {place.phase}".strip()
        print(f"{g.name:<28} {role:<13} {place.requested[0]:<10} {place.resolved:<12} {mb:>8.1f}  {note}")
    resolved = sorted({p.provider for p in engine.placements})
    print(f"total     {sum(sizes.values()) / 1e6:.1f} MB; graphs run on: {', '.join(resolved)}")


def _form_files(graph: GraphSpec, prefill: bool, sizes: dict[str, int]) -> tuple[str, ...]:
    """Path prefixes of the files a session of the graph loads: its form's graph file and its blocks' weights (a
    linked graph reads them from its blocks' data files; an int8 prefill form, from its blocks' own where they
    have one)."""
    from runtime.manifest import PREFILL_SUFFIX

    form = graph.prefill if prefill and graph.prefill else graph
    folder = Path(graph.file).parent.as_posix()
    own = lambda block: prefill and f"{folder}/{block}{PREFILL_SUFFIX}.data" in sizes  # noqa: E731
    return (form.file, *(f"{folder}/{block}{PREFILL_SUFFIX if own(block) else '.onnx'}" for block in graph.blocks))


def _placement_summary(engine) -> str:
    """Where the graphs ran, the time in each EP and the traffic between them: `graphs on CPU x57, OpenVINO (prefill)
    x28; time CPU 1.20 s, OpenVINO 0.40 s; 0.5 cross-EP hops a step, 0.0 kB a token between devices`."""
    runs_on = Counter(p.resolved + (f" ({p.phase})" if p.phase else "") for p in engine.placements)
    share, traffic = engine.time_share(), engine.traffic_report()
    return (f"graphs on {', '.join(f'{ep} x{n}' for ep, n in runs_on.items())}; "
            f"time {', '.join(f'{ep} {seconds:.2f} s' for ep, seconds in share.items())}; "
            f"{traffic['cross_ep_hops_per_step']:.1f} cross-EP hops a step, "
            f"{traffic['bytes_moved_per_token'] / 1e3:.1f} kB a token between devices")


def _chains(role) -> str:
    chain = " > ".join(p.name for p in role.providers)
    chain = f"prefill {' > '.join(p.name for p in role.prefill)}, decode {chain}" if role.prefill else chain
    return chain + (" (static graphs)" if role.dialect == "static" else "")


def run(parser: argparse.ArgumentParser, argv: list[str] | None = None) -> int:
    """Parse, dispatch, and turn every error into one line on stderr (TANDEM_DEBUG=1 shows tracebacks)."""
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="tandem: %(message)s")
    func: Callable = args.func
    try:
        func(args)
    except TandemError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except Exception as e:
        if os.environ.get("TANDEM_DEBUG"):
            raise
        print(f"error: {type(e).__name__}: {e} (set TANDEM_DEBUG=1 for details)", file=sys.stderr)
        return 1
    return 0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tandem", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    add_runtime_commands(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    return run(parser(), argv)
