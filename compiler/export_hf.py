"""Write a source as a Hugging Face checkpoint (fp32 safetensors), streaming tensor by tensor into shards.

Peers that take only HF checkpoints (ORT GenAI's model builder reads GGUF only in fp16/fp32) get exactly the
weights our compiler reads, so their models and ours are compared on the same weights.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from compiler.source import ModelSource


def export_hf(source: ModelSource, out: Path, shard_bytes: int = 2 << 30) -> Path:
    from safetensors.numpy import save_file

    out.mkdir(parents=True, exist_ok=True)
    shard: dict[str, np.ndarray] = {}
    weight_map: dict[str, str] = {}

    def flush() -> None:
        file = f"model-{len(set(weight_map.values())) + 1:05d}.safetensors"
        save_file(shard, out / file, metadata={"format": "pt"})
        weight_map.update({name: file for name in shard})
        shard.clear()

    for name in sorted(source.tensor_names()):
        tensor = source.tensor(name)
        if shard and sum(t.nbytes for t in shard.values()) + tensor.nbytes > shard_bytes:
            flush()
        shard[name] = tensor
    flush()
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}, indent=1))
    config = {"architectures": ["Qwen2ForCausalLM"], "torch_dtype": "float32", **source.hf_config}
    (out / "config.json").write_text(json.dumps(config, indent=2))
    if source.generation_config:
        (out / "generation_config.json").write_text(json.dumps(source.generation_config, indent=2))
    source.save_tokenizer(out)
    return out
