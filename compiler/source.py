"""Model sources: weights read lazily, one tensor at a time, under Hugging Face tensor names."""
from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, Callable, Literal

import numpy as np

from runtime.errors import TandemError
from runtime.manifest import ModelConfig, SourceSpec, sha256_of

GGUF_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
    "attn_norm.weight": "input_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_v.bias": "self_attn.v_proj.bias",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}


def model_config(hf: dict[str, Any]) -> ModelConfig:
    """Our model config from a Hugging Face config.json dict."""
    if hf.get("model_type") != "qwen2":
        raise TandemError(f"model_type {hf.get('model_type')!r} is not supported (only qwen2)")
    heads = hf["num_attention_heads"]
    rope = hf.get("rope_parameters") or {}
    scaling = hf.get("rope_scaling") or (rope if rope.get("rope_type", "default") != "default" else None)
    return ModelConfig(
        num_layers=hf["num_hidden_layers"],
        hidden_size=hf["hidden_size"],
        intermediate_size=hf["intermediate_size"],
        num_heads=heads,
        num_kv_heads=hf.get("num_key_value_heads", heads),
        head_dim=hf.get("head_dim") or hf["hidden_size"] // heads,
        vocab_size=hf["vocab_size"],
        rms_norm_eps=hf["rms_norm_eps"],
        rope_theta=hf.get("rope_theta", rope.get("rope_theta", 10000.0)),
        rope_scaling=scaling,
        max_position_embeddings=hf["max_position_embeddings"],
        tie_word_embeddings=hf.get("tie_word_embeddings", False),
    )


@dataclass
class ModelSource:
    """Lazy access to a checkpoint's tensors (float32 numpy, HF names), config, tokenizer and identity."""

    kind: Literal["gguf", "hf"]
    location: str
    hf_config: dict[str, Any]
    _read: Callable[[str], np.ndarray]
    _names: set[str]
    save_tokenizer: Callable[[Path], None]
    _digest: Callable[[], str]  # sha256 of the weights: read in full, so only when asked (a 7B's are 15 GB)
    generation_config: dict[str, Any] = field(default_factory=dict)

    @cached_property
    def spec(self) -> SourceSpec:
        return SourceSpec(kind=self.kind, location=self.location, sha256=self._digest())

    @property
    def config(self) -> ModelConfig:
        return model_config(self.hf_config)

    def tensor_names(self) -> set[str]:
        return set(self._names)

    def tensor(self, name: str) -> np.ndarray:
        if name == "lm_head.weight" and name not in self._names:
            name = "model.embed_tokens.weight"  # tied embeddings
        if name not in self._names:
            raise TandemError(f"{self.location}: tensor {name} not found")
        return np.ascontiguousarray(self._read(name), dtype=np.float32)

    def reference_model(self):
        """The transformers model of the same weights (fp32), for verification."""
        import torch
        from transformers import AutoModelForCausalLM
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()

        location = Path(self.location)
        kwargs: dict[str, Any] = {"dtype": torch.float32, "local_files_only": True}
        if self.kind == "gguf":
            kwargs["gguf_file"] = location.name
            location = location.parent
        return AutoModelForCausalLM.from_pretrained(location, **kwargs).eval()


def open_source(spec: str) -> ModelSource:
    """`default` or a packaged model's name, a .gguf file, an HF checkpoint directory, or a hub id in the local cache."""
    from compiler.packaged_models import DEFAULT, MODELS, packaged_model_path

    if spec == "default" or spec in MODELS:
        return open_gguf(packaged_model_path(DEFAULT if spec == "default" else spec))
    path = Path(spec).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise TandemError(f"{path}: GGUF file not found")
        return open_gguf(path)
    if path.is_dir():
        return open_hf_dir(path)
    if path.exists() or spec.startswith((".", "/", "~")) or spec.count("/") != 1:
        raise TandemError(f"{spec}: not a GGUF file, a checkpoint directory (with config.json) or a hub id")
    return open_hf_dir(_hub_snapshot(spec))


def _hub_snapshot(repo_id: str) -> Path:
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id, local_files_only=True))
    except Exception:
        raise TandemError(
            f"{repo_id}: not in the local Hugging Face cache; tandem never downloads models: "
            "place the checkpoint on disk and pass its directory"
        ) from None


def open_hf_dir(path: Path) -> ModelSource:
    from safetensors import safe_open

    config_file = path / "config.json"
    if not config_file.is_file():
        raise TandemError(f"{path}: no config.json: not a Hugging Face checkpoint directory")
    shards = sorted(path.glob("*.safetensors"))
    if not shards:
        raise TandemError(f"{path}: no *.safetensors weights")
    where: dict[str, Path] = {}
    for shard in shards:
        with safe_open(shard, framework="pt") as f:
            where.update({name: shard for name in f.keys()})

    def read(name: str) -> np.ndarray:
        with safe_open(where[name], framework="pt") as f:
            return f.get_tensor(name).float().numpy()

    def save_tokenizer(out: Path) -> None:
        from transformers import AutoTokenizer

        AutoTokenizer.from_pretrained(path, local_files_only=True).save_pretrained(out)

    generation_file = path / "generation_config.json"
    def digest() -> str:
        return hashlib.sha256("".join(f"{f.name}:{sha256_of(f)}\n" for f in [config_file, *shards]).encode()).hexdigest()

    return ModelSource(
        kind="hf",
        location=str(path.resolve()),
        _digest=digest,
        hf_config=json.loads(config_file.read_text()),
        _read=read,
        _names=set(where),
        save_tokenizer=save_tokenizer,
        generation_config=json.loads(generation_file.read_text()) if generation_file.is_file() else {},
    )


def open_gguf(path: Path) -> ModelSource:
    import gguf

    reader = gguf.GGUFReader(path)
    meta = {name: f.contents() for name, f in reader.fields.items() if not name.startswith("tokenizer.ggml.")}
    if meta.get("general.architecture") != "qwen2":
        raise TandemError(f"{path}: architecture {meta.get('general.architecture')!r} is not supported (only qwen2)")
    tensors = {}
    for t in reader.tensors:
        match = re.fullmatch(r"blk\.(\d+)\.(.+)", t.name)
        hf = f"model.layers.{match[1]}.{GGUF_NAMES[match[2]]}" if match else GGUF_NAMES.get(t.name)
        if hf:
            tensors[hf] = t

    def read(name: str) -> np.ndarray:
        t = tensors[name]
        data = gguf.quants.dequantize(t.data, t.tensor_type)
        return data.reshape([int(d) for d in reversed(t.shape)])

    def save_tokenizer(out: Path) -> None:
        from transformers import AutoTokenizer

        AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name).save_pretrained(out)

    embed = tensors["model.embed_tokens.weight"]
    hf_config = {
        "model_type": "qwen2",
        "num_hidden_layers": meta["qwen2.block_count"],
        "hidden_size": meta["qwen2.embedding_length"],
        "intermediate_size": meta["qwen2.feed_forward_length"],
        "num_attention_heads": meta["qwen2.attention.head_count"],
        "num_key_value_heads": meta["qwen2.attention.head_count_kv"],
        "vocab_size": int(embed.shape[1]),
        "rms_norm_eps": meta["qwen2.attention.layer_norm_rms_epsilon"],
        "rope_theta": meta["qwen2.rope.freq_base"],
        "max_position_embeddings": meta["qwen2.context_length"],
        "tie_word_embeddings": "lm_head.weight" not in tensors,
    }
    eos = reader.fields.get("tokenizer.ggml.eos_token_id")
    return ModelSource(
        kind="gguf",
        location=str(path.resolve()),
        _digest=lambda: sha256_of(path),
        hf_config=hf_config,
        _read=read,
        _names=set(tensors),
        save_tokenizer=save_tokenizer,
        generation_config={"eos_token_id": int(eos.contents())} if eos else {},
    )
