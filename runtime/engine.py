"""The engine: one ORT session per graph, run in schedule order over one shared KV cache."""
from __future__ import annotations

import logging
import time
import weakref
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnxruntime as ort

from runtime import manifest as names
from runtime.errors import TandemError
from runtime.kv_cache import CacheView, KVCache
from runtime.manifest import GraphSpec, KVCacheSpec, Manifest, load_manifest
from runtime.providers import Placement, Sessions, create_session, first_line
from runtime.static_inputs import static_inputs

log = logging.getLogger("tandem")


class GraphRunner:
    """A graph's session; binds its inputs by name from the step's values and carries its outputs on.

    Outputs stay on the device of the graph's EP, where the next graph (usually on the same EP) reads them;
    logits come back to the host, for sampling. The KV cache is bound once per batch of slots (its addresses do
    not change), and again after a prompt chunk, whose binding `run` drops; so a decode step binds only its few
    small inputs; a decode step's outputs go into buffers made on its first run and kept (per batch size), so a
    step allocates nothing, and a decode step whose inputs are the buffers the one before it bound (each small
    input and hidden state has one per batch) binds nothing at all.
    With CUDA graphs every address a decode step binds is therefore the same at each step of a batch: the step is
    captured once per batch and replayed (prefill chunks, whose shapes vary, run without). A decode step's input
    made on the host (the hidden state of a graph on the CPU EP before it) is copied into a device buffer of its own
    at each step, so a captured graph reads it where it did when captured."""

    def __init__(self, spec: GraphSpec, session: ort.InferenceSession, placement: Placement) -> None:
        self.spec = spec
        self._cache = [name for name in spec.inputs if name.startswith("past_")]
        self._inputs = [name for name in spec.inputs if name not in self._cache]
        self._outputs = [name for name in spec.outputs if names.past_of(name) is None]
        self._unrecorded = _graph_id(-1)
        self.seconds = 0.0  # wall time in this graph's runs (ORT returns once the EP's work is done)
        self.moved = 0  # bytes its runs took from, or gave to, another device than its EP's
        self.use(session, placement)

    def use(self, session: ort.InferenceSession, placement: Placement) -> None:
        """Run on this session from now on (a new one after its EP failed): nothing bound to the old one is kept."""
        self.session = session
        self.placement = placement
        self._device = "cpu" if names.LOGITS in self.spec.outputs else placement.device
        self._bindings: dict[CacheView | None, ort.IOBinding] = {}
        self._kept: dict[tuple, list[ort.OrtValue]] = {}
        self._last: dict[CacheView | None, tuple] = {}  # per batch: the inputs, kept outputs and options last bound
        self._replays: dict[tuple, ort.RunOptions] = {}  # CUDA graphs: run options naming each batch's graph
        self._staged: dict[tuple, ort.OrtValue] = {}  # CUDA graphs: device copies of host inputs, per name and shape

    def run(self, values: dict[str, ort.OrtValue | CacheView]) -> None:
        batch = values[self._cache[0]] if self._cache else None
        binding = self._bindings.get(batch) or self._bind_cache(batch, values)
        inputs = [values[name] for name in self._inputs]
        if self.placement.captures_graphs:
            inputs = [self._stage(name, value) for name, value in zip(self._inputs, inputs)]
        last = self._last.get(batch)
        if last is not None and all(a is b for a, b in zip(last[0], inputs)):
            kept, options, moved = *last[1:], 0  # a decode step on the buffers bound last time: nothing to bind
        else:
            kept, options, moved = self._bind(binding, batch, inputs)
        self.moved += moved
        start = time.perf_counter()
        self.session.run_with_iobinding(binding, options)
        self.seconds += time.perf_counter() - start
        outputs = kept or [v for name, v in zip(self.spec.outputs, binding.get_outputs()) if names.past_of(name) is None]
        if kept is None:
            # a prefill chunk's outputs are ORT's: a binding kept would hold them until this graph's next step, a
            # chunk's hidden states in every layer, and around them the shared arena fragments: 43 MiB a layer of a
            # 7B's first 256-token chunk. The next step binds the cache anew.
            del self._bindings[batch]
        for name, value in zip(self._outputs, outputs):
            values[names.HIDDEN if name == names.HIDDEN_NEXT else name] = value

    def _bind(
        self, binding: ort.IOBinding, batch: CacheView | None, inputs: list[ort.OrtValue]
    ) -> tuple[list[ort.OrtValue] | None, ort.RunOptions | None, int]:
        """Bind a step's inputs and outputs; a decode step's outputs go to its kept buffers. Returns those buffers
        (None for a prefill chunk, whose outputs ORT allocates), the run options, and the bytes of the inputs that
        were on another device than the EP's (copied there by ORT or by _reachable)."""
        dims: dict[str, int] = {}
        reachable = [self._reachable(value) for value in inputs]
        for name, value in zip(self._inputs, reachable):
            binding.bind_ortvalue_input(name, value)
            dims.update(zip(self.spec.inputs[name].shape, value.shape()))
        shapes = tuple(tuple(dims.get(d, d) for d in self.spec.outputs[name].shape) for name in self._outputs)
        decode = dims.get("sequence", 1) == 1  # one new token per row
        kept = self._kept.get(shapes) if decode else None
        if decode and kept is None:
            # a captured graph writes where it wrote when captured, logits included: they stay on its device
            device = self.placement.device if self.placement.captures_graphs else self._device
            kept = self._kept[shapes] = [
                ort.OrtValue.ortvalue_from_shape_and_type(shape, np.dtype(self.spec.outputs[name].dtype), device, 0)
                for name, shape in zip(self._outputs, shapes)
            ]
        for i, name in enumerate(self._outputs):
            if kept:
                binding.bind_ortvalue_output(name, kept[i])
            else:
                binding.bind_output(name, self._device)
        options = self._run_options(batch, shapes) if decode else self._unrecorded
        # the next decode step on the same buffers runs on this binding as it is; not where an input is on another
        # device (copied to the host here, or to the EP's device by ORT when it is bound: either copy would be
        # stale at the next step) or after a prefill chunk (which rebound it)
        moved = sum(v.tensor_size_in_bytes() for v in inputs if v.device_name().lower() != self.placement.device)
        if decode and not moved:
            self._last[batch] = (inputs, kept, options)
        else:
            self._last.pop(batch, None)
        return kept, options, moved

    def _stage(self, name: str, value: ort.OrtValue) -> ort.OrtValue:
        """A decode-step input from the host, copied into its device buffer; any other input as is."""
        shape = tuple(value.shape())
        if value.device_name().lower() != "cpu" or not _one_token(self.spec, name, shape):
            return value
        staged = self._staged.get((name, shape))
        if staged is None:
            staged = self._staged[name, shape] = _tensor(value.numpy(), self.placement.device)
        else:
            staged.update_inplace(value.numpy())
        self.moved += value.tensor_size_in_bytes()
        return staged

    def _run_options(self, batch: CacheView | None, shapes: tuple) -> ort.RunOptions | None:
        """A decode step's run options: with CUDA graphs, the id of its batch's graph (ORT captures a graph the
        first time it sees an id, and replays it after)."""
        if not self.placement.captures_graphs:
            return None
        if (batch, shapes) not in self._replays:
            self._replays[batch, shapes] = _graph_id(len(self._replays) + 1)
        return self._replays[batch, shapes]

    def _bind_cache(self, batch: CacheView | None, values: dict[str, ort.OrtValue | CacheView]) -> ort.IOBinding:
        """A binding with this batch's KV cache views bound: past_* inputs, and present_* outputs in the same memory."""
        binding = self.session.io_binding()
        for name in self._cache:
            view = values[name]
            binding.bind_input(name, view.device, 0, view.dtype, view.shape, view.address)
        for name in self.spec.outputs:
            if cache_input := names.past_of(name):
                view = values[cache_input]
                binding.bind_output(name, view.device, 0, view.dtype, view.shape, view.address)
        self._bindings[batch] = binding
        return binding

    def _reachable(self, value: ort.OrtValue) -> ort.OrtValue:
        """ORT copies a host input to the session's device, but not a device input to a host session: that one
        comes back here (a hidden state from a GPU graph going into a CPU-EP graph)."""
        if self.placement.device == "cpu" and value.device_name().lower() != "cpu":
            return _tensor(value.numpy())
        return value


def _one_token(spec: GraphSpec, name: str, shape: tuple[int, ...]) -> bool:
    """Whether an input of this shape belongs to a decode step: one new token per row."""
    return dict(zip(spec.inputs[name].shape, shape)).get("sequence", 1) == 1


def _graph_id(graph: int) -> ort.RunOptions:
    options = ort.RunOptions()
    options.add_run_config_entry("gpu_graph_id", str(graph))  # -1: run without capturing or replaying
    return options


def _tensor(array: np.ndarray, device: str = "cpu") -> ort.OrtValue:
    return ort.OrtValue.ortvalue_from_numpy(array, device, 0)


class StaticRunner:
    """A static-dialect graph's session (fixed shapes, batch 1; made for NPU compilers). Each row of a step runs
    alone, its hidden states padded to the form's sequence length. The KV cache is bound by address and only read:
    the new positions' K/V come out as outputs, which are stored into the cache here (host memory: where NPUs and
    the CPU share it)."""

    def __init__(self, spec: GraphSpec, session: ort.InferenceSession, placement: Placement) -> None:
        self.spec = spec
        self.sequence = int(spec.inputs[names.HIDDEN].shape[1])
        self._cache = [name for name in spec.inputs if name.startswith("past_")]
        self._inputs = [name for name in spec.inputs if name not in self._cache]
        self.seconds = 0.0
        self.moved = 0  # host memory throughout
        self.use(session, placement)

    def use(self, session: ort.InferenceSession, placement: Placement) -> None:
        if placement.device != "cpu":
            raise TandemError(f"graph {self.spec.name} (static dialect) exchanges K/V through host memory, but "
                              f"{placement.provider} runs it on {placement.device}")
        self.session, self.placement = session, placement
        self._bindings: dict[tuple[CacheView | None, int], ort.IOBinding] = {}

    def run(self, values: dict) -> None:
        x = values[names.HIDDEN].numpy()
        rows, count = x.shape[:2]
        if count > self.sequence:
            raise TandemError(f"graph {self.spec.name}: a step of {count} tokens exceeds its fixed {self.sequence}")
        step = values[STATIC_STEP][self.sequence]
        out = np.empty_like(x)
        for row in range(rows):
            padded = np.zeros((1, self.sequence, x.shape[2]), x.dtype)
            padded[0, :count] = x[row]
            binding = self._binding(values, row)
            for name in self._inputs:
                binding.bind_cpu_input(name, padded if name == names.HIDDEN else step[name][row : row + 1])
            for name in self.spec.outputs:
                binding.bind_output(name, "cpu")
            start = time.perf_counter()
            self.session.run_with_iobinding(binding)
            self.seconds += time.perf_counter() - start
            length = int(values[STATIC_LENGTHS][row])
            for name, value in zip(self.spec.outputs, binding.get_outputs()):
                if name == names.HIDDEN_NEXT:
                    out[row] = value.numpy()[0, :count]
                elif cache := names.stored_in(name):
                    values[cache].array[row, :, length : length + count] = value.numpy()[0, :, :count]
            binding.clear_binding_outputs()  # copied out: ORT's buffers go back now, not at this graph's next step
        values[names.HIDDEN] = _tensor(out)

    def _binding(self, values: dict, row: int) -> ort.IOBinding:
        """A binding with row's KV cache bound (its address never changes)."""
        batch = values[self._cache[0]] if self._cache else None
        if (batch, row) not in self._bindings:
            binding = self.session.io_binding()
            for name in self._cache:
                view = values[name]
                shape = (1, *view.shape[1:])
                binding.bind_input(name, view.device, 0, view.dtype, shape, view.address + row * view.array[0].nbytes)
            self._bindings[batch, row] = binding
        return self._bindings[batch, row]


def runner(spec: GraphSpec, session: ort.InferenceSession, placement: Placement) -> GraphRunner | StaticRunner:
    return (StaticRunner if spec.dialect == "static" else GraphRunner)(spec, session, placement)


def static_tables(directory: Path, prefill: GraphSpec) -> tuple[np.ndarray, np.dtype, int]:
    """StepInputs' `static`, from a static attention graph's prefill form."""
    return (np.load(directory / names.ROPE_FILE), np.dtype(prefill.inputs[names.ROPE_COS].dtype),
            int(prefill.inputs[names.HIDDEN].shape[1]))


STATIC_STEP = "static inputs"  # step values the static runners read (not graph inputs): their inputs per sequence length
STATIC_LENGTHS = "static lengths"  # and each row's cache length before the step


def rope_values(directory: Path, spec: GraphSpec | None, device: str = "cpu") -> dict[str, ort.OrtValue]:
    """The RoPE tables in the attention graphs' dtype (from `spec`, any graph that reads them), on their device."""
    tables = np.load(directory / names.ROPE_FILE)
    dtype = np.dtype(spec.inputs[names.COS_CACHE].dtype) if spec else tables.dtype
    cos, sin = (np.ascontiguousarray(t, dtype=dtype) for t in tables)
    return {names.COS_CACHE: _tensor(cos, device), names.SIN_CACHE: _tensor(sin, device)}


class StepInputs:
    """The inputs every graph of a step may read: token ids (or hidden states), sequence lengths, logits positions,
    RoPE tables and the batch's KV cache views. Each small input is made on the device of the first graph that
    reads it; a decode step's (one token per row) are written into buffers kept per batch, whose addresses a
    captured CUDA graph reads again at every replay.

    captured: the attention graphs capture CUDA graphs. GroupQueryAttention reads total_sequence_length on the
    host and sizes its kernels' work split by it, which a capture fixes: a decode step then gives the cache
    capacity, the same at every step (as ORT GenAI does), and the rows' lengths reach the kernels in seqlens_k."""

    def __init__(self, cache: KVCache, rope: dict[str, ort.OrtValue], devices: dict[str, str], captured: bool = False,
                 static: tuple[np.ndarray, np.dtype, int] | None = None) -> None:
        """static: for static-dialect graphs, the RoPE tables, their inputs' dtype and their prefill form's length."""
        self.cache = cache
        self.rope = rope
        self.devices = {**devices, names.TOTAL_SEQUENCE_LENGTH: "cpu"}  # read on the host by every EP
        self.captured = captured
        self.static = static
        self._kept: dict[tuple[int, int, str], dict[str, ort.OrtValue]] = {}

    def __call__(
        self, start: int, stop: int, first: str, x: np.ndarray, logits_index: np.ndarray
    ) -> dict[str, ort.OrtValue | CacheView]:
        """Slots [start, stop) as one batch, `first` (input_ids or hidden) x [rows, count, ...] appended to each,
        and logits at logits_index [rows, k] (positions within the new tokens)."""
        decode = x.shape[1] == 1
        total = self.cache.lengths[start:stop] + x.shape[1]
        small = {
            first: x,
            names.SEQLENS_K: (total - 1).astype(np.int32),
            names.TOTAL_SEQUENCE_LENGTH: np.array(self.cache.capacity if decode and self.captured else total.max(), dtype=np.int32),
            names.LOGITS_INDEX: np.ascontiguousarray(logits_index, dtype=np.int64),
        }
        kept = self._kept.get((start, stop, first)) if decode else None
        if kept is None:
            # copies: a host OrtValue keeps the array it is made from as its memory, which update_inplace writes
            kept = {name: _tensor(np.array(a, order="C"), self.devices.get(name, "cpu")) for name, a in small.items()}
            if decode:
                self._kept[start, stop, first] = kept
        else:
            for name, array in small.items():
                kept[name].update_inplace(np.ascontiguousarray(array))
        values = {**kept, **self.rope, **self.cache.bindings(start, stop)}
        if self.static:  # the form that runs this step: a decode step's, or the prefill chunk's
            tables, dtype, chunk = self.static
            lengths = self.cache.lengths[start:stop]
            sequence = 1 if decode else chunk
            values[STATIC_STEP] = {sequence: static_inputs(tables, lengths, sequence, self.cache.capacity, dtype)}
            values[STATIC_LENGTHS] = lengths.copy()
        return values


def hops(providers: Sequence[str]) -> int:
    """Hand-overs from one EP to another along a step's graphs."""
    return sum(a != b for a, b in zip(providers, providers[1:]))


def _same_cache_device(decode: GraphRunner, prefill: GraphRunner) -> None:
    """The KV cache lives on one device: a graph that attends must run both phases where it is."""
    if any(name.startswith("past_") for name in decode.spec.inputs) and decode.placement.device != prefill.placement.device:
        raise TandemError(
            f"graph {decode.spec.name} reads the KV cache, which lives on one device, but its prefill runs on "
            f"{prefill.placement.provider} ({prefill.placement.device}) and its decode on {decode.placement.provider} "
            f"({decode.placement.device})"
        )


def _cache_spec(manifest: Manifest, capacity: int | None, static: bool = False) -> KVCacheSpec:
    """The artifact's KV cache, or one of fewer positions (contrib graphs take any capacity up to the compiled one;
    static graphs, only the compiled one)."""
    spec = manifest.kv_cache
    if capacity is None or capacity == spec.capacity:
        return spec
    if static:
        raise TandemError(f"KV cache capacity {capacity}: this artifact's static graphs read a cache of exactly "
                          f"{spec.capacity} positions (compile it with --max-context {capacity} for a smaller one)")
    if not 0 < capacity <= spec.capacity:
        raise TandemError(f"KV cache capacity {capacity}: must be 1 to the artifact's {spec.capacity}")
    return spec.model_copy(update={"capacity": capacity})


class Engine:
    """Runs token chunks of one sequence slot through the artifact's graphs; returns next-token logits."""

    def __init__(self, directory: Path | str, slots: int = 1, threads: int = 0, capacity: int | None = None) -> None:
        """capacity: KV cache positions per slot, at most the artifact's (default: the artifact's)."""
        self.directory = Path(directory)
        self.threads = threads
        self.manifest: Manifest = load_manifest(self.directory)
        # shared where two phases load the same file on the same EP; weak: one its runners gave up on is freed
        self._sessions: Sessions = weakref.WeakValueDictionary()
        self.graphs: list[GraphRunner] = []  # in schedule order: the runners of decode steps (of every step, mostly)
        self.prefill: list[GraphRunner] = []  # and of prompt chunks: the same runner, or one from its role's prefill chain
        # sessions are made largest weights first: packing a graph's weights holds its file's pages beside the
        # packed copy for a moment (+665 MiB for a 7B's lm_head), a peak that then comes on top of the least
        sizes = {f.path: f.size for f in self.manifest.files}
        order = sorted(self.manifest.schedule, key=lambda name: -sizes.get(self.manifest.graph(name).file + ".data", 0))
        phases = {name: self._phases(self.manifest.graph(name)) for name in order}
        for name in self.manifest.schedule:
            self.graphs.append(phases[name][0])
            self.prefill.append(phases[name][1])
        # the cache and the RoPE tables live where the (first) attention graph runs
        attention = next((g for g in self.graphs if g._cache), None)
        device = attention.placement.device if attention else "cpu"
        contrib = next((g.spec for g in self.graphs if names.COS_CACHE in g.spec.inputs), None)
        self.rope = rope_values(self.directory, contrib, device)
        static = [g.spec for g in self.prefill if isinstance(g, StaticRunner) and g._cache]
        self.cache = KVCache(_cache_spec(self.manifest, capacity, bool(static)), slots, device)
        devices: dict[str, str] = {}
        for graph in reversed(self.graphs):  # the first graph reading an input decides where it is made
            devices.update(dict.fromkeys(graph.spec.inputs, graph.placement.device))
        attending = [g.placement.captures_graphs for g in self.graphs if names.TOTAL_SEQUENCE_LENGTH in g.spec.inputs]
        self.inputs = StepInputs(self.cache, self.rope, devices, captured=bool(attending) and all(attending),
                                 static=static_tables(self.directory, static[0]) if static else None)
        self.traffic = dict.fromkeys(("steps", "tokens", "hops", "logits_bytes"), 0)

    def _phases(self, spec: GraphSpec) -> tuple[GraphRunner | StaticRunner, GraphRunner | StaticRunner]:
        """The graph's decode-step runner and its prompt-chunk runner: the same one, or a session of its own where
        the role has a prefill chain or the graph a prefill form."""
        role = self.manifest.roles[spec.role]
        if not (role.prefill or spec.prefill):
            return (only := self._runner(spec, spec, role.providers, "")), only
        decode = self._runner(spec, spec, role.providers, "decode")
        prefill = self._runner(spec, spec.prefill or spec, role.prefill or role.providers, "prefill")
        _same_cache_device(decode, prefill)
        return decode, prefill

    def _runner(self, spec: GraphSpec, form: GraphSpec, chain: list, phase: str) -> GraphRunner | StaticRunner:
        """A runner of `form`: the graph `spec` itself, or its prefill form."""
        return runner(form, *self._session(spec, form, chain, phase))

    def _session(self, spec: GraphSpec, form: GraphSpec, chain: list, phase: str, start: int = 0,
                 skipped: Sequence[str] = ()) -> tuple[ort.InferenceSession, Placement]:
        dynamic = self.directory / spec.dynamic if spec.dynamic else None
        return create_session(spec.name, self.directory / form.file, spec.role, chain, self.threads, phase, start,
                              skipped, qdq=spec.qdq, dynamic=dynamic, made=self._sessions)

    @property
    def runners(self) -> list[GraphRunner | StaticRunner]:
        """Every session's runner: each graph's, then the prefill runners of roles that have them."""
        return self.graphs + [p for p, g in zip(self.prefill, self.graphs) if p is not g]

    @property
    def placements(self) -> list[Placement]:
        return [g.placement for g in self.runners]

    def time_share(self) -> dict[str, float]:
        """Seconds spent in each execution provider's graphs since the engine was made."""
        share: dict[str, float] = {}
        for graph in self.runners:
            share[graph.placement.provider] = share.get(graph.placement.provider, 0.0) + graph.seconds
        return share

    def traffic_report(self) -> dict[str, float]:
        """Cross-EP hops (consecutive graphs on different EPs) a step, and bytes moved between devices a token."""
        steps, tokens = max(self.traffic["steps"], 1), max(self.traffic["tokens"], 1)
        moved = self.traffic["logits_bytes"] + sum(g.moved for g in self.runners)
        return {"steps": self.traffic["steps"], "tokens": self.traffic["tokens"],
                "cross_ep_hops_per_step": self.traffic["hops"] / steps, "bytes_moved_per_token": moved / tokens}

    @property
    def capacity(self) -> int:
        return self.cache.capacity

    def forward(self, slot: int, tokens: Sequence[int], all_logits: bool = False) -> np.ndarray:
        """Append tokens to the slot's sequence (chunked prefill, or one decode token).

        Returns the logits of the last token [vocab], or with all_logits those of every token [len(tokens), vocab].
        """
        if not tokens:
            raise TandemError("no tokens to run")
        length = int(self.cache.lengths[slot]) + len(tokens)
        if length > self.capacity:
            raise TandemError(f"context of {length} tokens does not fit the KV cache capacity of {self.capacity}")
        chunk = self.manifest.prefill_chunk
        logits = [self._step(slot, tokens[start : start + chunk], all_logits) for start in range(0, len(tokens), chunk)]
        return np.concatenate(logits) if all_logits else logits[-1][-1]

    def extend(self, slots: Sequence[int], chunks: Sequence[Sequence[int]]) -> np.ndarray:
        """One step of several sequences at once: chunks[i] (decode tokens, or first prompt chunks) is appended to slots[i].

        Returns each sequence's next-token logits [len(slots), vocab]. The batch is the run of slots [min, max];
        shorter chunks are padded at their end to the longest, and rows of slots not in `slots` run padding only.
        Chunks of more than one token share a step only as the first chunks of empty slots.
        A row's padding K/V lands just past its length, where no later token attends and its next tokens overwrite it.
        """
        start, stop, width = min(slots), max(slots) + 1, max(len(c) for c in chunks)
        if width > 1 and stop - start > 1 and self.cache.lengths[start:stop].any():
            raise TandemError("several prompt chunks run together only when every slot of the batch starts empty "
                              "(ORT's GroupQueryAttention takes past context with more than one new token at batch 1 only)")
        for slot in range(start, stop):
            if self.cache.lengths[slot] + width > self.capacity:
                raise TandemError(
                    f"slot {slot}: {self.cache.lengths[slot]} tokens and a step of {width} exceed the KV cache capacity "
                    f"of {self.capacity}"
                )
        ids = np.zeros((stop - start, width), dtype=np.int64)
        last = np.zeros((stop - start, 1), dtype=np.int64)
        for slot, chunk in zip(slots, chunks):
            if not chunk:
                raise TandemError("no tokens to run")
            ids[slot - start, : len(chunk)] = chunk
            last[slot - start, 0] = len(chunk) - 1
        logits = self._run(start, stop, ids, last)
        for slot, chunk in zip(slots, chunks):
            self.cache.update(slot, len(chunk))
        return logits[[slot - start for slot in slots], 0]

    def _step(self, slot: int, tokens: Sequence[int], all_logits: bool) -> np.ndarray:
        positions = list(range(len(tokens))) if all_logits else [len(tokens) - 1]
        logits = self._run(slot, slot + 1, np.array([tokens], dtype=np.int64), np.array([positions]))[0]
        self.cache.update(slot, len(tokens))
        return logits

    def _run(self, start: int, stop: int, ids: np.ndarray, logits_index: np.ndarray) -> np.ndarray:
        """Run the graphs once over slots [start, stop) with input ids [rows, count]; logits [rows, k, vocab]."""
        values = self.inputs(start, stop, names.INPUT_IDS, ids, logits_index)
        runners = self.graphs if ids.shape[1] == 1 else self.prefill
        self.traffic["steps"] += 1
        self.traffic["tokens"] += ids.size
        self.traffic["hops"] += hops([g.placement.provider for g in runners])
        for graph in runners:
            while True:
                try:
                    graph.run(values)
                    break
                except Exception as e:  # noqa: BLE001 - an EP failing while running: the rest of its chain takes over
                    self._fall_back(graph, e)  # and the graph runs again on the same values
        logits = values[names.LOGITS]
        if runners[-1].placement.device != "cpu":  # made on a device, read on the host (by ORT's copy or here)
            self.traffic["logits_bytes"] += logits.tensor_size_in_bytes()
        return logits.numpy().copy()  # a decode step's logits buffer (on the host) is the next step's too

    def _fall_back(self, graph: GraphRunner, error: Exception) -> None:
        """Rebuild a graph whose EP failed while running on the next EP of its chain (the seed's NPU -> iGPU -> CPU).
        The step goes on from that graph: the ones before it are done, and it rewrites the same cache positions."""
        failed = graph.placement
        role = self.manifest.roles[graph.spec.role]
        chain = (role.prefill or role.providers) if failed.phase == "prefill" else role.providers
        reason = f"{failed.provider}: failed while running: {first_line(error)}"
        if failed.index + 1 >= len(chain):
            raise TandemError(f"graph {graph.spec.name} (role {graph.spec.role}): {reason}; no execution provider is left "
                              "in its chain") from error
        session, placement = self._session(self.manifest.graph(graph.spec.name), graph.spec, chain, failed.phase,
                                           failed.index + 1, [*failed.skipped, reason])
        if graph._cache and placement.device != self.cache.device:
            raise TandemError(f"graph {graph.spec.name}: {reason}; the next EP of its chain, {placement.provider}, runs "
                              f"on {placement.device}, but the KV cache it reads is on {self.cache.device}") from error
        graph.use(session, placement)  # create_session logged the warning, with the reason

    def reset(self, slot: int) -> None:
        self.cache.reset(slot)
