"""Build recipes: what to compile, where each block kind runs, and the tolerances verify must meet."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, ValidationError, model_validator

from runtime.errors import TandemError
from runtime.manifest import Role, RoleSpec, Strict, format_validation_error


class Placement(Strict):
    """The role each block kind is assigned to."""

    embed: Role
    attention: Role
    ffn: Role
    head: Role


class VerifySpec(Strict):
    prompts: list[str] = Field(min_length=1)
    new_tokens: int = Field(default=64, gt=0)
    graph_max_rel_error: float = Field(default=1e-4, gt=0)
    logits_max_abs_error: float = Field(default=1e-2, gt=0)
    greedy_agreement: float = Field(default=1.0, ge=0, le=1)


class GenerationDefaults(Strict):
    """Overrides of the model's generation_config (e.g. for a GGUF source, which carries none)."""

    temperature: float | None = Field(default=None, ge=0)
    top_p: float | None = Field(default=None, gt=0, le=1)
    top_k: int | None = Field(default=None, ge=0)
    repetition_penalty: float | None = Field(default=None, gt=0)
    eos_token_id: list[int] | None = None


class Recipe(Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9._-]+$")
    model: str = "default"
    dtype: Literal["fp32"] = "fp32"
    max_context: int = Field(default=4096, gt=0)
    prefill_chunk: int = Field(default=256, gt=0)
    fuse: bool = False
    roles: dict[Role, RoleSpec]
    placement: Placement
    verify: VerifySpec
    generation: GenerationDefaults = GenerationDefaults()

    @model_validator(mode="after")
    def _roles_defined(self) -> "Recipe":
        for kind, role in self.placement.model_dump().items():
            if role not in self.roles:
                raise ValueError(f"placement.{kind} is {role!r}, which has no entry under roles")
        return self


def load_recipe(path: Path | str) -> Recipe:
    path = Path(path)
    if not path.is_file():
        raise TandemError(f"{path}: recipe not found")
    try:
        data: Any = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise TandemError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise TandemError(f"{path}: expected a mapping at the top level")
    try:
        return Recipe.model_validate(data)
    except ValidationError as e:
        raise TandemError(format_validation_error(str(path), e)) from None
