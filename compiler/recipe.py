"""Build recipes: what to compile, where each block kind runs, and the tolerances verify must meet."""
from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, ValidationError, model_validator

from runtime.errors import TandemError
from runtime.manifest import Role, RoleSpec, Strict, format_validation_error
from runtime.yamlfile import load_mapping


class Placement(Strict):
    """The role each block kind is assigned to."""

    embed: Role
    attention: Role
    ffn: Role
    head: Role


Scheme = Literal["fp32", "fp16", "int4", "int8", "int8-qdq"]


STATIC_SCHEMES = ("fp32", "fp16", "int8-qdq")


class QuantSpec(Strict):
    """How one block kind's weights are stored and computed.

    int4 / int8: weight-only, blocks of `block_size` along the input dimension (MatMulNBits, GatherBlockQuantized);
    int8-qdq: static QuantizeLinear/DequantizeLinear around standard MatMul, per-channel weights and activation
    ranges calibrated on real text (the form NPU compilers take); fp16: weights and compute in half precision.
    """

    scheme: Scheme = "fp32"
    block_size: Literal[16, 32, 64, 128, 256] = 32
    symmetric: bool = False
    accuracy_level: Literal[0, 1, 2, 3, 4] = 4  # MatMulNBits: lowest precision of the activations (4 = int8)
    calibration: Literal["minmax", "percentile", "entropy"] = "minmax"
    smoothing: float = Field(default=0.5, ge=0, le=1)  # int8-qdq: SmoothQuant's migration strength (0 = none)
    activations: Literal["uint8", "uint16"] = "uint8"  # int8-qdq: static activation type (uint16: A16W8, as QNN's HTP runs)
    per_channel: bool = True  # int8-qdq: a weight scale per output channel (QNN's HTP takes one per MatMul weight)
    gptq: bool = True  # int4 / int8: GPTQ on calibration statistics; false: the clipping search alone (no calibration run)


class Quantization(Strict):
    embedding: QuantSpec = QuantSpec()
    attention: QuantSpec = QuantSpec()
    ffn: QuantSpec = QuantSpec()
    lm_head: QuantSpec = QuantSpec()

    @model_validator(mode="after")
    def _supported(self) -> "Quantization":
        if self.embedding.scheme in ("int8", "int8-qdq"):
            raise ValueError("embedding.scheme: the embedding takes fp32, fp16 or int4 (GatherBlockQuantized)")
        return self

    def needs_calibration(self) -> bool:
        """int8-qdq calibrates activation ranges (and SmoothQuant scales); int4/int8 weight-only run GPTQ on input statistics."""
        return any(
            spec.scheme == "int8-qdq" or (spec.scheme in ("int4", "int8") and spec.gptq and kind != "embedding")  # a Gather: RTN
            for kind, spec in self
        )


class CalibrationSpec(Strict):
    """Real text (the calibration part of compiler.evaltext) run through the fp32 graphs to set activation ranges."""

    windows: int = Field(default=8, gt=0)
    window: int = Field(default=256, gt=1)


class VerifySpec(Strict):
    prompts: list[str] = Field(min_length=1)
    new_tokens: int = Field(default=64, gt=0)
    graph_max_rel_error: float = Field(default=1e-4, gt=0)
    logits_max_abs_error: float = Field(default=1e-2, gt=0)
    greedy_agreement: float = Field(default=1.0, ge=0, le=1)
    eval_windows: int = Field(default=4, ge=0)  # held-out text windows for perplexity, top-1 agreement and KL
    eval_window: int = Field(default=512, gt=1)
    max_perplexity_delta: float = Field(default=0.01, gt=0)  # relative to the fp32 reference


class GenerationDefaults(Strict):
    """Overrides of the model's generation_config (e.g. for a GGUF source, which carries none)."""

    temperature: float | None = Field(default=None, ge=0)
    top_p: float | None = Field(default=None, gt=0, le=1)
    top_k: int | None = Field(default=None, ge=0)
    repetition_penalty: float | None = Field(default=None, gt=0)
    eos_token_id: list[int] | None = None


class Recipe(Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9._-]+$")
    served_model_name: list[str] = Field(default_factory=list)  # what API clients call it (the artifact name also works)
    model: str = "default"
    quantization: Quantization = Quantization()
    calibration: CalibrationSpec = CalibrationSpec()
    max_context: int = Field(default=4096, gt=0)
    prefill_chunk: int = Field(default=256, gt=0)
    # int8: prompt chunks run a second form of each attention and FFN graph, its MatMuls through the CPU EP's
    # integer GEMM (compiler.int8_prefill: 2-3x the int4 kernel's rate, for an int8 copy of those weights in memory)
    prefill_weights: Literal["shared", "int8"] = "shared"
    fuse: bool = False
    # activations, KV cache and unquantized weights: float16 for GPU EPs (CUDA runs GroupQueryAttention in half only)
    dtype: Literal["float32", "float16"] = "float32"
    roles: dict[Role, RoleSpec]
    placement: Placement
    verify: VerifySpec
    generation: GenerationDefaults = GenerationDefaults()

    @model_validator(mode="after")
    def _roles_defined(self) -> "Recipe":
        for kind, role in self.placement.model_dump().items():
            if role not in self.roles:
                raise ValueError(f"placement.{kind} is {role!r}, which has no entry under roles")
        if self.verify.eval_windows and self.verify.eval_window > self.max_context:
            raise ValueError(f"verify.eval_window {self.verify.eval_window} exceeds max_context {self.max_context}")
        for kind, role in self.placement.model_dump().items():
            if self.roles[role].dialect != "static":
                continue
            if kind not in ("attention", "ffn"):
                raise ValueError(f"placement.{kind}: role {role} has the static dialect, which builds attention and ffn "
                                 "blocks only; place the embedding and head on a contrib role")
            scheme = getattr(self.quantization, kind).scheme
            if scheme not in STATIC_SCHEMES:
                raise ValueError(f"quantization.{kind}.scheme {scheme}: role {role} has the static dialect, which takes "
                                 f"{', '.join(STATIC_SCHEMES)} (standard ops; int4/int8 weight-only is ORT's MatMulNBits)")
        if self.prefill_weights == "int8":
            self._int8_prefill_runs()
        if self.quantization.needs_calibration() and self.calibration.window > self.max_context:
            raise ValueError(f"calibration.window {self.calibration.window} exceeds max_context {self.max_context}")
        return self

    def _int8_prefill_runs(self) -> None:
        """prefill_weights int8 is the CPU EP's integer GEMM over MatMulNBits graphs (int4 / int8 weight-only)."""
        kinds = [kind for kind in ("attention", "ffn") if getattr(self.quantization, kind).scheme in ("int4", "int8")]
        if not kinds:
            raise ValueError("prefill_weights int8 rewrites int4/int8 weight-only MatMuls (MatMulNBits), but "
                             "quantization.attention and .ffn have neither scheme")
        for kind in kinds:
            name = getattr(self.placement, kind)
            role = self.roles[name]
            chain = [p.name for p in role.prefill or role.providers]
            if role.dialect != "contrib" or set(chain) != {"CPU"}:
                raise ValueError(f"prefill_weights int8: the {kind} blocks' prompt chunks run on role {name} "
                                 f"({', '.join(chain)}, dialect {role.dialect}), but the int8 form is for the CPU "
                                 "EP's integer GEMM (a contrib role whose prefill chain is CPU only)")


def load_recipe(path: Path | str) -> Recipe:
    path = Path(path)
    if not path.is_file():
        raise TandemError(f"{path}: recipe not found")
    data = load_mapping(path)
    try:
        return Recipe.model_validate(data)
    except ValidationError as e:
        raise TandemError(format_validation_error(str(path), e)) from None
