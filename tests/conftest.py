"""Shared fixtures: tiny random Qwen2 checkpoints compiled through the real pipeline."""
from __future__ import annotations

import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml

from tests.tiny import make_checkpoint

RECIPE = {
    "name": "tiny",
    "max_context": 96,
    "prefill_chunk": 8,
    "roles": {"npu": {"providers": ["VitisAI", "CPU"]}, "igpu": {"providers": ["MIGraphX", "DML", "CPU"]}, "cpu": {"providers": ["CPU"]}},
    "placement": {"embed": "cpu", "attention": "npu", "ffn": "igpu", "head": "igpu"},
    "verify": {"new_tokens": 12, "eval_windows": 2, "eval_window": 64, "prompts": ["def fibonacci(n):", "SELECT id FROM orders"]},
}


QDQ = {"attention": {"scheme": "int8-qdq", "activations": "uint16"}}
LOOSE = {**RECIPE["verify"], "graph_max_rel_error": 0.5, "logits_max_abs_error": 5.0, "greedy_agreement": 0.0,
         "max_perplexity_delta": 1.0}  # A16W8 attention on a tiny random model


def write_recipe(directory: Path, **changes) -> Path:
    path = directory / f"{changes.get('name', 'tiny')}.yaml"
    path.write_text(yaml.safe_dump({**RECIPE, **changes}))
    return path


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("ckpt"))


@pytest.fixture(scope="session")
def artifacts(tmp_path_factory, checkpoint) -> dict[str, Path]:
    """The tiny model compiled twice: one graph per block (NPU/iGPU roles falling back to CPU) and fused."""
    from compiler.build import compile_recipe

    root = tmp_path_factory.mktemp("artifacts")
    return {
        "split": compile_recipe(write_recipe(root, name="split"), model=str(checkpoint), out=root / "split", show_progress=False),
        "fused": compile_recipe(
            write_recipe(root, name="fused", fuse=True, placement={k: "cpu" for k in RECIPE["placement"]}),
            model=str(checkpoint), out=root / "fused", show_progress=False,
        ),
    }


@pytest.fixture(scope="session")
def chat_artifact(tmp_path_factory, checkpoint) -> Path:
    """The tiny model with a 512-token context, served as `tiny-chat`."""
    from compiler.build import compile_recipe

    root = tmp_path_factory.mktemp("served")
    recipe = write_recipe(root, name="served", max_context=512, served_model_name=["tiny-chat"])
    return compile_recipe(recipe, model=str(checkpoint), out=root / "served", show_progress=False)


@pytest.fixture(scope="session")
def static_artifacts(tmp_path_factory, checkpoint) -> dict[str, Path]:
    """Attention on a static NPU role: float32 (the QNN chain: its op set has Softmax in float), and A16W8 QDQ (the
    Ryzen AI chain); FFN and head on contrib roles."""
    from compiler.build import compile_recipe

    root = tmp_path_factory.mktemp("static")
    fp32 = {**RECIPE["roles"], "npu": {"providers": ["QNN", "CPU"], "dialect": "static"}}
    a16w8 = {**RECIPE["roles"], "npu": {"providers": ["VitisAI", "CPU"], "dialect": "static"}}
    return {
        "fp32": compile_recipe(write_recipe(root, name="fp32", roles=fp32), model=str(checkpoint), out=root / "fp32", show_progress=False),
        "a16w8": compile_recipe(write_recipe(root, name="a16w8", roles=a16w8, quantization=QDQ, verify=LOOSE,
                                             calibration={"windows": 4, "window": 64}),
                                model=str(checkpoint), out=root / "a16w8", show_progress=False),
    }


def edited_copy(artifact: Path, out: Path, edit: Callable[[dict], None]) -> Path:
    """A copy of the artifact whose manifest `edit` has changed in place."""
    copy = shutil.copytree(artifact, out)
    manifest = yaml.safe_load((copy / "manifest.yaml").read_text())
    edit(manifest)
    (copy / "manifest.yaml").write_text(yaml.safe_dump(manifest, sort_keys=False))
    return copy


def retarget(artifact: Path, out: Path, **roles: dict) -> Path:
    """A copy of the artifact whose manifest gives the named roles new chains."""
    return edited_copy(artifact, out, lambda manifest: manifest["roles"].update(roles))


def tandem(*args: str) -> subprocess.CompletedProcess:
    """Run the `tandem` CLI in a subprocess; it must succeed."""
    proc = subprocess.run([sys.executable, "-m", "compiler.cli", *args], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@pytest.fixture(scope="session")
def real_artifacts(tmp_path_factory) -> dict[str, Path]:
    """The real default model compiled with the default (int4), fp32 and Ryzen AI recipes (slow tier)."""
    recipes = Path(__file__).parent.parent / "recipes"
    root = tmp_path_factory.mktemp("real")
    out = {"cpu": root / "cpu", "fp32": root / "fp32", "ryzen-ai": root / "ryzen-ai"}
    tandem("compile", str(recipes / "qwen2.5-coder-0.5b-instruct.fp32.yaml"), "-o", str(out["fp32"]), "--quiet")
    tandem("compile", str(recipes / "qwen2.5-coder-0.5b-instruct.cpu.yaml"), "-o", str(out["cpu"]), "--quiet")
    tandem("compile", str(recipes / "qwen2.5-7b-instruct.ryzen-ai.yaml"), "--model", "default", "-o", str(out["ryzen-ai"]), "--quiet")
    return out
