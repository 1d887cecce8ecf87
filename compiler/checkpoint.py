"""`tandem make-checkpoint`: an HF-format Qwen2 checkpoint with a real config and seeded random weights.

Speed, memory and compile cost do not depend on weight values, so a checkpoint with the 7B config measures them
honestly where the real weights cannot be had. Tensors are drawn and written one row block at a time straight
into safetensors shards, so memory stays at one block whatever the model's size.
"""
from __future__ import annotations

import json
import os
import shutil
import struct
from collections.abc import Iterator
from concurrent.futures import Executor, ThreadPoolExecutor
from pathlib import Path

import numpy as np

from runtime.errors import TandemError

# Qwen2.5-7B-Instruct's config.json and generation_config.json as published.
QWEN25_7B_INSTRUCT = {
    "architectures": ["Qwen2ForCausalLM"], "attention_dropout": 0.0, "bos_token_id": 151643, "eos_token_id": 151645,
    "hidden_act": "silu", "hidden_size": 3584, "initializer_range": 0.02, "intermediate_size": 18944,
    "max_position_embeddings": 32768, "max_window_layers": 28, "model_type": "qwen2", "num_attention_heads": 28,
    "num_hidden_layers": 28, "num_key_value_heads": 4, "rms_norm_eps": 1e-06, "rope_theta": 1000000.0,
    "sliding_window": 131072, "tie_word_embeddings": False, "torch_dtype": "bfloat16", "use_cache": True,
    "use_sliding_window": False, "vocab_size": 152064,
}
QWEN25_GENERATION = {"bos_token_id": 151643, "pad_token_id": 151643, "do_sample": True, "eos_token_id": [151645, 151643],
                     "repetition_penalty": 1.05, "temperature": 0.7, "top_p": 0.8, "top_k": 20}
CONFIGS = {"qwen2.5-7b-instruct": (QWEN25_7B_INSTRUCT, QWEN25_GENERATION)}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "vocab.json", "merges.txt",
                   "special_tokens_map.json")
BLOCK_BYTES = 64 << 20  # float32 bytes drawn at a time


def load_config(spec: str) -> tuple[dict, dict]:
    """config.json and generation_config.json contents: a built-in model by name, or a config.json path."""
    if spec in CONFIGS:
        return CONFIGS[spec]
    path = Path(spec)
    if not path.is_file():
        raise TandemError(f"{spec}: neither a known config ({', '.join(CONFIGS)}) nor a config.json file")
    try:
        config = json.loads(path.read_text())
    except ValueError as e:
        raise TandemError(f"{path}: not JSON: {e}") from None
    generation = path.with_name("generation_config.json")
    return config, json.loads(generation.read_text()) if generation.is_file() else {"eos_token_id": config.get("eos_token_id")}


def tensor_shapes(config: dict) -> list[tuple[str, tuple[int, ...]]]:
    """Every tensor of a Qwen2 checkpoint under its HF name, in file order."""
    h, inter, vocab = config["hidden_size"], config["intermediate_size"], config["vocab_size"]
    heads = config["num_attention_heads"]
    kv = config.get("num_key_value_heads", heads)
    hd = config.get("head_dim") or h // heads
    shapes = [("model.embed_tokens.weight", (vocab, h))]
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}."
        shapes += [
            (p + "input_layernorm.weight", (h,)),
            (p + "self_attn.q_proj.weight", (heads * hd, h)), (p + "self_attn.q_proj.bias", (heads * hd,)),
            (p + "self_attn.k_proj.weight", (kv * hd, h)), (p + "self_attn.k_proj.bias", (kv * hd,)),
            (p + "self_attn.v_proj.weight", (kv * hd, h)), (p + "self_attn.v_proj.bias", (kv * hd,)),
            (p + "self_attn.o_proj.weight", (h, heads * hd)),
            (p + "post_attention_layernorm.weight", (h,)),
            (p + "mlp.gate_proj.weight", (inter, h)), (p + "mlp.up_proj.weight", (inter, h)),
            (p + "mlp.down_proj.weight", (h, inter)),
        ]
    shapes.append(("model.norm.weight", (h,)))
    if not config.get("tie_word_embeddings", False):
        shapes.append(("lm_head.weight", (vocab, h)))
    return shapes


def random_blocks(name: str, shape: tuple[int, ...], index: int, seed: int, std: float) -> Iterator[np.ndarray]:
    """A tensor's values, float32, in row blocks: norms 1 with a little noise, everything else N(0, std) as HF
    initializes Qwen2. Seeded by (seed, tensor index), so a tensor does not depend on the others."""
    rng = np.random.default_rng([seed, index])
    cols = int(np.prod(shape[1:])) if len(shape) > 1 else shape[0]
    rows = shape[0] if len(shape) > 1 else 1
    step = max(1, BLOCK_BYTES // (4 * cols))
    for start in range(0, rows, step):
        block = rng.standard_normal((min(step, rows - start), cols), dtype=np.float32)
        if name.endswith("norm.weight"):
            yield 1 + 0.02 * block
        else:
            yield std * block


def to_bf16(x: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bits (uint16), rounding to nearest even."""
    bits = x.astype(np.float32).view(np.uint32)
    return ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)


def from_bf16(bits: np.ndarray) -> np.ndarray:
    return (bits.astype(np.uint32) << 16).view(np.float32)


def _write_shard(path: Path, tensors: list[tuple[int, str, tuple[int, ...]]], seed: int, std: float, pool: Executor) -> int:
    """One safetensors file: the header (offsets known from the shapes), then every tensor at its offset, each
    drawn and written block by block by one of the pool's threads (numpy draws without holding the GIL)."""
    header: dict = {"__metadata__": {"format": "pt"}}
    offset = 0
    for _, name, shape in tensors:
        size = 2 * int(np.prod(shape))
        header[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    raw = struct.pack("<Q", len(raw)) + raw
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.pwrite(fd, raw, 0)

        def write(index: int, name: str, shape: tuple[int, ...]) -> None:
            at = len(raw) + header[name]["data_offsets"][0]
            for block in random_blocks(name, shape, index, seed, std):
                data = to_bf16(block).tobytes()
                os.pwrite(fd, data, at)
                at += len(data)

        for done in [pool.submit(write, *tensor) for tensor in tensors]:
            done.result()
    finally:
        os.close(fd)
    return offset


def make_checkpoint(
    config: dict, generation: dict, out: Path, tokenizer: Path, seed: int = 0, shard_bytes: int = 4 << 30, jobs: int = 4
) -> Path:
    """Write config.json, generation_config.json, bf16 safetensors shards + their index, and the tokenizer files
    of `tokenizer` (a checkpoint or artifact directory). Written beside `out` and renamed into place when done.
    jobs: tensors drawn at once (each thread holds one 64 MB block); the values do not depend on it."""
    files = [tokenizer / name for name in TOKENIZER_FILES if (tokenizer / name).is_file()]
    if not (tokenizer / "tokenizer.json").is_file():
        raise TandemError(f"{tokenizer}: no tokenizer.json")
    work = out.parent / f".{out.name}.partial"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    shards: list[list[tuple[int, str, tuple[int, ...]]]] = [[]]
    size = 0
    for index, (name, shape) in enumerate(tensor_shapes(config)):
        nbytes = 2 * int(np.prod(shape))
        if shards[-1] and size + nbytes > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append((index, name, shape))
        size += nbytes
    weight_map, total = {}, 0
    std = config.get("initializer_range", 0.02)
    with ThreadPoolExecutor(max(1, jobs)) as pool:
        for i, tensors in enumerate(shards):
            file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            total += _write_shard(work / file, tensors, seed, std, pool)
            weight_map.update({name: file for _, name, _ in tensors})
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (work / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    (work / "config.json").write_text(json.dumps({**config, "torch_dtype": "bfloat16"}, indent=2) + "\n")
    (work / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
    for file in files:
        shutil.copy(file, work / file.name)
    shutil.rmtree(out, ignore_errors=True)
    work.rename(out)
    return out
