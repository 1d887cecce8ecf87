"""The artifact manifest: the contract between compiler and runtime (schema, naming, load + integrity check)."""
from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from runtime.errors import TandemError
from runtime.yamlfile import load_mapping

FORMAT_VERSION = 3  # 2: roles and graphs carry a dialect (static graphs: a prefill form); 3: static graphs' any-shape
# form (GraphSpec.dynamic). Earlier versions still load
MANIFEST = "manifest.yaml"
ROPE_FILE = "rope.npy"  # cos/sin tables [2, capacity, head_dim / 2], computed by the compiler
GENERATION_CONFIG = "generation_config.json"
VERIFY_REPORT = "verify.json"
UNFINISHED = "UNFINISHED"  # holds the building process's pid until the build has passed verify
PREFILL_SUFFIX = ".prefill.onnx"  # a graph's prompt-chunk form: name.prefill.onnx (its own weights: name.prefill.onnx.data)
DYNAMIC_SUFFIX = ".dynamic.onnx"  # a static graph before its sequence was fixed: name.dynamic.onnx, over name.onnx's weights

Role = Literal["npu", "igpu", "cpu"]
BlockKind = Literal["embed", "attention", "ffn", "head"]
# contrib: ORT's fused ops (GroupQueryAttention over the KV cache in place, MatMulNBits, ...), dynamic shapes.
# static: standard ai.onnx ops and fixed shapes (a prefill chunk, a decode step, the KV capacity), the form NPU
# compilers take: two graph files per graph (prefill and decode) over one weights file, and a third with the
# sequence left open, which the CPU EP (the chains' last fallback) loads once for both phases.
Dialect = Literal["contrib", "static"]

# Tensor names every graph agrees on. Hidden states flow graph to graph; the KV cache is bound in place.
INPUT_IDS = "input_ids"
HIDDEN = "hidden"
HIDDEN_NEXT = "hidden_next"
LOGITS = "logits"
LOGITS_INDEX = "logits_index"
SEQLENS_K = "seqlens_k"
TOTAL_SEQUENCE_LENGTH = "total_sequence_length"
COS_CACHE = "cos_cache"
SIN_CACHE = "sin_cache"
# ... and the static dialect's, whose attention reads the cache and outputs the new K/V for the runtime to store
ATTENTION_BIAS = "attention_bias"  # [1, sequence, capacity + sequence]: 0 where attended, the dtype's minimum elsewhere
ROPE_COS = "rope_cos"  # [1, sequence, head_dim]: the new positions' cos, both halves
ROPE_SIN = "rope_sin"  # [1, sequence, head_dim]: their sin, the first half negated (rotate_half's sign, so no Neg op)

# ORT execution provider short names accepted in recipes and manifests.
PROVIDERS = {
    "VitisAI": "VitisAIExecutionProvider",
    "QNN": "QNNExecutionProvider",
    "OpenVINO": "OpenVINOExecutionProvider",
    "MIGraphX": "MIGraphXExecutionProvider",
    "ROCm": "ROCMExecutionProvider",
    "DML": "DmlExecutionProvider",
    "CUDA": "CUDAExecutionProvider",
    "TensorRT": "TensorrtExecutionProvider",
    "CoreML": "CoreMLExecutionProvider",
    "CPU": "CPUExecutionProvider",
}


def past_name(kind: Literal["key", "value"], layer: int) -> str:
    return f"past_{kind}.{layer}"


def present_name(kind: Literal["key", "value"], layer: int) -> str:
    return f"present_{kind}.{layer}"


def new_name(kind: Literal["key", "value"], layer: int) -> str:
    return f"new_{kind}.{layer}"


def past_of(present: str) -> str | None:
    """The cache input a present_* output aliases, or None for an ordinary output."""
    return "past_" + present[len("present_") :] if present.startswith("present_") else None


def stored_in(new: str) -> str | None:
    """The cache a static graph's new_* output is written into (by the runtime), or None for an ordinary output."""
    return "past_" + new[len("new_") :] if new.startswith("new_") else None


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


Setting = str | int | float | bool


class ProviderSpec(Strict):
    """One entry of a role's chain: the EP, its provider options, and session config entries for the sessions it
    takes (ORT reads some kernel choices only from these, e.g. the CUDA EP's `ep.cuda.fpa_intb_gemm`)."""

    name: str
    options: dict[str, Setting] = Field(default_factory=dict)
    session: dict[str, Setting] = Field(default_factory=dict)

    @field_validator("name")
    @classmethod
    def _known(cls, name: str) -> str:
        if name not in PROVIDERS:
            raise ValueError(f"unknown execution provider {name!r}; known: {', '.join(PROVIDERS)}")
        return name

    @property
    def ort_name(self) -> str:
        return PROVIDERS[self.name]


class RoleSpec(Strict):
    """A role's execution-provider preference chain, best first. With `prefill`, the role's graphs run prompt chunks
    on a session of that chain and decode steps on one of `providers`: two sessions of the same graph file (the
    weights once on disk), e.g. prefill on a matrix engine in bf16 and decode on int4 kernels that read fewer bytes."""

    providers: list[ProviderSpec] = Field(min_length=1)
    prefill: list[ProviderSpec] = Field(default_factory=list)
    dialect: Dialect = "contrib"  # static for NPU roles: compiler.npu_check checks the graphs against the chain's NPUs

    @field_validator("providers", "prefill", mode="before")
    @classmethod
    def _shorthand(cls, value: Any) -> Any:
        if isinstance(value, list):
            return [{"name": v} if isinstance(v, str) else v for v in value]
        return value


class ModelConfig(Strict):
    architecture: Literal["qwen2"] = "qwen2"
    num_layers: int = Field(gt=0)
    hidden_size: int = Field(gt=0)
    intermediate_size: int = Field(gt=0)
    num_heads: int = Field(gt=0)
    num_kv_heads: int = Field(gt=0)
    head_dim: int = Field(gt=0)
    vocab_size: int = Field(gt=0)
    rms_norm_eps: float = Field(gt=0)
    rope_theta: float = Field(gt=0)
    rope_scaling: dict[str, Any] | None = None
    max_position_embeddings: int = Field(gt=0)
    tie_word_embeddings: bool = False


class FileEntry(Strict):
    path: str
    sha256: str
    size: int


class TensorSpec(Strict):
    dtype: str
    shape: list[int | str]  # a string names a dimension fixed at run time (batch, sequence, capacity, ...)


class GraphSpec(Strict):
    name: str
    file: str
    role: Role
    blocks: list[str]
    dialect: Dialect = "contrib"
    quantization: dict[str, str] = Field(default_factory=dict)  # block kind -> scheme, e.g. ffn: int4 block 32 asym acc4
    inputs: dict[str, TensorSpec]
    outputs: dict[str, TensorSpec]
    # the prompt-chunk form, run by a session of its own: the static dialect's fixed-shape one (`file` is then the
    # one-token decode form), or a contrib graph's integer-GEMM one (recipe prefill_weights: int8)
    prefill: "GraphSpec | None" = None
    # a static graph with its sequence left open, over the same weights: EPs that take any shape (runtime.providers.
    # ANY_SHAPE) run both phases on one session of it, so the weights are packed once, not once per fixed form
    dynamic: str | None = None

    @property
    def qdq(self) -> bool:
        """Whether its weights are int8 QDQ (runtime.qdq_cpu rewrites those for the CPU EP)."""
        return any(scheme.startswith("int8-qdq") for scheme in self.quantization.values())


class KVCacheSpec(Strict):
    layers: int
    kv_heads: int
    head_dim: int
    capacity: int
    dtype: Literal["float32", "float16"] = "float32"


class SourceSpec(Strict):
    kind: Literal["gguf", "hf"]
    location: str
    sha256: str


class Manifest(Strict):
    format_version: int
    name: str
    served_names: list[str] = Field(default_factory=list)  # names the server answers to, before `name`
    recipe: dict[str, Any]  # the recipe it was compiled from (verify re-reads its tolerances)
    source: SourceSpec
    model: ModelConfig
    kv_cache: KVCacheSpec
    prefill_chunk: int = Field(gt=0)
    roles: dict[Role, RoleSpec]
    graphs: list[GraphSpec] = Field(min_length=1)
    schedule: list[str] = Field(min_length=1)
    files: list[FileEntry]

    def graph(self, name: str) -> GraphSpec:
        return next(g for g in self.graphs if g.name == name)


def format_validation_error(where: str, err: ValidationError) -> str:
    """One line per problem, each naming the key path (e.g. `roles.npu.providers.0.name`)."""
    lines = []
    for e in err.errors():
        path = ".".join(str(p) for p in e["loc"]) or "(top level)"
        msg = "unknown key" if e["type"] == "extra_forbidden" else e["msg"]
        lines.append(f"{where}: {path}: {msg}")
    return "\n".join(lines)


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 24):
            digest.update(block)
    return digest.hexdigest()


def file_entry(root: Path, path: Path) -> FileEntry:
    return FileEntry(path=path.relative_to(root).as_posix(), sha256=sha256_of(path), size=path.stat().st_size)


def load_manifest(directory: Path, check_files: bool = True) -> Manifest:
    """Load and validate an artifact's manifest; with check_files, every listed file must match its sha256."""
    path = Path(directory) / MANIFEST
    check_finished(Path(directory))
    if not path.is_file():
        raise TandemError(f"{path}: not an artifact (no {MANIFEST})")
    data = load_mapping(path)
    version = data.get("format_version")
    if not isinstance(version, int):
        raise TandemError(f"{path}: format_version: missing or not an integer")
    if version > FORMAT_VERSION:
        raise TandemError(
            f"{path}: format_version {version} is newer than this runtime supports ({FORMAT_VERSION}); upgrade tandem"
        )
    try:
        manifest = Manifest.model_validate(data)
    except ValidationError as e:
        raise TandemError(format_validation_error(str(path), e)) from None
    if check_files:
        verify_files(Path(directory), manifest)
    return manifest


def check_finished(directory: Path) -> None:
    """A directory still being built loads only in its builder (and the builder's verify subprocess)."""
    marker = directory / UNFINISHED
    if not marker.exists():
        return
    builder = marker.read_text().strip()
    if builder not in (str(os.getpid()), str(os.getppid())):
        raise TandemError(f"{directory}: an unfinished build (by process {builder or '?'}; killed or still running), "
                          "not an artifact; compile again")


def verify_files(directory: Path, manifest: Manifest) -> None:
    for entry in manifest.files:
        file = directory / entry.path
        if not file.is_file():
            raise TandemError(f"{file}: missing (listed in {MANIFEST})")
        size = file.stat().st_size
        if size != entry.size:
            raise TandemError(f"{file}: {size} bytes where the manifest lists {entry.size}: the file was truncated or "
                              "modified; recompile the artifact")
        if sha256_of(file) != entry.sha256:
            raise TandemError(f"{file}: sha256 mismatch: the file was modified or corrupted; recompile the artifact")
