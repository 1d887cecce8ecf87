"""Execution-provider resolution: a role's preference chain against what this onnxruntime build offers."""
from __future__ import annotations

import logging
import platform
from collections.abc import MutableMapping, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path

import onnxruntime as ort

from runtime import mapped_pages
from runtime.errors import TandemError
from runtime.manifest import ProviderSpec, Setting

log = logging.getLogger("tandem")


@dataclass
class Placement:
    """Where one graph ended up, and why the EPs before it in its chain were passed over."""

    graph: str
    role: str
    requested: list[str]
    provider: str
    skipped: list[str] = field(default_factory=list)
    options: dict[str, str] = field(default_factory=dict)  # the provider options of the chain entry that took it
    phase: str = ""  # "prefill" or "decode" where the role gives prompt chunks a session of their own
    index: int = 0  # the position in its chain of the entry that took it

    @property
    def fell_back(self) -> bool:
        return bool(self.skipped)

    @property
    def resolved(self) -> str:
        """The EP as reports name it: `CUDA graphs` where decode steps replay captured graphs."""
        return self.provider + (" graphs" if self.captures_graphs else "")

    @property
    def captures_graphs(self) -> bool:
        """CUDA graphs (the CUDA EP option enable_cuda_graph): a decode step is captured once per batch and replayed."""
        return self.provider == "CUDA" and self.options.get("enable_cuda_graph") == "1"

    @property
    def device(self) -> str:
        """Where the graph's outputs are kept (ORT's device name): GPU memory for the CUDA-based EPs, else the host."""
        return DEVICES.get(self.provider, "cpu")


DEVICES = {"CUDA": "cuda", "TensorRT": "cuda"}


@cache
def _exact_integer_matmul() -> bool:
    """Whether ORT's CPU u8s8 integer MatMul is exact here. On x86 without VNNI it sums pairs of u8 x s8
    products in int16 (vpmaddubsw), which saturates: 5% error on one 896-wide QDQ MatMul, and +175.65% instead of
    +156.54% perplexity for A8W8 attention on the 0.5B model. Where /proc/cpuinfo cannot tell, assume it saturates."""
    if platform.machine().lower() not in ("x86_64", "amd64", "i386", "i686", "x86"):
        return True
    try:
        flags = set(Path("/proc/cpuinfo").read_text().split())
    except OSError:
        return False
    return bool(flags & {"avx512_vnni", "avx_vnni"})


ARENA_DEVICES = {"CPUExecutionProvider": "Cpu", "CUDAExecutionProvider": "Cuda"}


@cache
def _shared_arena(provider: str) -> None:
    """One memory arena for every session of the process on this EP's device. Each session would otherwise grow an
    arena of its own to its largest step and keep it: 58 CUDA sessions of a 7B held 30 GB where the weights take
    4.5, and on the CPU each of 28 FFN sessions keeps its prefill chunk's intermediates."""
    info = ort.OrtMemoryInfo(ARENA_DEVICES[provider], ort.OrtAllocatorType.ORT_ARENA_ALLOCATOR, 0, ort.OrtMemType.DEFAULT)
    ort.create_and_register_allocator_v2(provider, info, {}, ort.OrtArenaCfg(0, -1, -1, -1))


_shared_threads = False  # set by share_threads: every session of the process runs on one intra-op pool


def share_threads(threads: int) -> None:
    """One intra-op thread pool for every session this process makes (0 threads: one per core).

    A session's own pool spins its threads for a while after each run: with one session per block on 32 cores,
    the pools of the graphs just run took the cores from the one running (1.4 tokens/s where one pool gave 16).
    Process-wide and for good: ORT then refuses any session with a pool of its own (its quantization tools make
    such sessions), so only commands whose process runs the engine alone call it (generate, chat, serve, bench)."""
    global _shared_threads
    if not _shared_threads:
        ort.capi._pybind_state.set_global_thread_pool_sizes(threads, 1)
        _shared_threads = True


def session_options(threads: int, provider: str) -> ort.SessionOptions:
    options = ort.SessionOptions()
    if provider in ARENA_DEVICES:
        _shared_arena(provider)
        options.add_session_config_entry("session.use_env_allocators", "1")
    if _shared_threads:
        options.use_per_session_threads = False  # the pool of share_threads, sized there
    else:
        options.intra_op_num_threads = threads
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3
    if provider == "CPUExecutionProvider" and not _exact_integer_matmul():
        # the activations' Q/DQ of QDQ graphs then run as they are, not fused into that MatMul (runtime.qdq_cpu
        # runs their weights' MatMuls as MatMulNBits)
        options.add_session_config_entry("session.disable_quant_qdq", "1")
    return options


def _strings(settings: dict[str, Setting]) -> dict[str, str]:
    """ORT takes option values as strings; a bool is 1 or 0."""
    return {key: str(int(value) if isinstance(value, bool) else value) for key, value in settings.items()}


ANY_SHAPE = {"CPUExecutionProvider"}  # EPs given a static graph's dynamic form (the chains' last fallback)

Sessions = MutableMapping[tuple[Path, str, str, str], ort.InferenceSession]  # by file, EP, its options, session config


def create_session(
    graph: str, path: Path, role: str, chain: list[ProviderSpec], threads: int, phase: str = "", start: int = 0,
    skipped: Sequence[str] = (), qdq: bool = False, dynamic: Path | None = None, made: Sessions | None = None,
) -> tuple[ort.InferenceSession, Placement]:
    """Create the session on the first EP of the chain, from position `start`, that is available and accepts the
    graph. `skipped`: why the entries before `start` were passed over (a fallback after one failed while running).
    `qdq`: the graph's weights are int8 QDQ, which the CPU EP gets as MatMulNBits (runtime.qdq_cpu).
    `dynamic`: a static graph's form with its sequence open, which the EPs of ANY_SHAPE load instead of `path`.
    `made`: the sessions made so far; one that loaded the same file on the same EP entry is shared, not made again
    (a static graph's two phases on the CPU: its weights packed once)."""
    available = set(ort.get_available_providers())
    placement = Placement(graph, role, [p.name for p in chain], provider="", skipped=list(skipped), phase=phase)
    made = {} if made is None else made
    for index, spec in enumerate(chain[start:], start):
        if spec.ort_name not in available:
            placement.skipped.append(f"{spec.name}: not in this onnxruntime build")
            continue
        options, config = _strings(spec.options), _strings(spec.session)
        file = dynamic if dynamic and spec.ort_name in ANY_SHAPE else path
        key = (file, spec.ort_name, repr(sorted(options.items())), repr(sorted(config.items())))
        try:
            session = made.get(key)
            if session is None:
                settings = session_options(threads, spec.ort_name)
                for name, value in config.items():
                    settings.add_session_config_entry(name, value)
                with model_file(file, spec.ort_name, qdq) as model:
                    session = ort.InferenceSession(str(model), settings, providers=[(spec.ort_name, options)])
                    mapped_pages.release(model.parent)  # what its kernels packed, the file's pages need not hold
                made[key] = session
        except Exception as e:  # an EP that rejects the graph: try the next one in the chain
            placement.skipped.append(f"{spec.name}: {first_line(e)}")
            continue
        placement.provider, placement.options, placement.index = spec.name, options, index
        if placement.fell_back:
            log.warning("graph %s (role %s%s): %s -> runs on %s", graph, role, f", {phase}" if phase else "",
                        "; ".join(placement.skipped), spec.name)
        return session, placement
    raise TandemError(f"graph {graph} ({path.name}): no execution provider of role {role} can run it: {'; '.join(placement.skipped)}")


def model_file(path: Path, provider: str, qdq: bool) -> AbstractContextManager[Path]:
    """The file a session of `provider` loads for the graph at `path`: on the CPU EP, a QDQ graph's rewrite with
    MatMulNBits weights (runtime.qdq_cpu, imported here: it needs onnx, which a runtime without QDQ graphs never
    loads); else `path` itself."""
    if qdq and provider == "CPUExecutionProvider":
        from runtime.qdq_cpu import cpu_form

        return cpu_form(path)
    return nullcontext(path)


def first_line(error: Exception) -> str:
    return str(error).strip().splitlines()[0][:200] if str(error).strip() else type(error).__name__
