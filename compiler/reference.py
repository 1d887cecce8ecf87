"""The PyTorch/transformers reference of a source's weights: per block, and logits over whole sequences.

Small models run as transformers' own whole model. A model whose fp32 weights would not fit the memory budget
(a 7B is 30 GB) runs block by block: each block's modules are loaded, applied to every sequence at once and
dropped, so memory holds one block plus the hidden states.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator

import numpy as np
import torch

from compiler.plan import Block, model_blocks
from compiler.source import ModelSource
from runtime.manifest import ModelConfig

IN_MEMORY_BYTES = 8 << 30  # fp32 weights up to this run as one transformers model

# sequences -> logits at every position of each, in order, one sequence at a time
SequenceLogits = Callable[[list[list[int]]], Iterator[np.ndarray]]


def parameter_count(cfg: ModelConfig) -> int:
    h, q, kv = cfg.hidden_size, cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    layer = 2 * h + h * q + q + 2 * (h * kv + kv) + q * h + 3 * h * cfg.intermediate_size
    heads = 1 if cfg.tie_word_embeddings else 2
    return heads * cfg.vocab_size * h + cfg.num_layers * layer + h


def sequence_logits(source: ModelSource, in_memory_bytes: int | None = None) -> SequenceLogits:
    budget = IN_MEMORY_BYTES if in_memory_bytes is None else in_memory_bytes
    if 4 * parameter_count(source.config) <= budget:
        return _whole_model(source.reference_model())
    return _block_by_block(source)


def _whole_model(model) -> SequenceLogits:
    def logits(sequences: list[list[int]]) -> Iterator[np.ndarray]:
        for tokens in sequences:
            with torch.no_grad():
                yield model(torch.tensor([tokens])).logits[0].float().numpy()

    return logits


def _block_by_block(source: ModelSource) -> SequenceLogits:
    def logits(sequences: list[list[int]]) -> Iterator[np.ndarray]:
        if not sequences:
            return
        blocks = model_blocks(source.config.num_layers)
        longest = max(len(s) for s in sequences)
        x = torch.tensor([s + [0] * (longest - len(s)) for s in sequences])  # padding at the end: causal, unseen
        for block in blocks[:-1]:
            x = block_reference([block], source)(x)
        head = block_reference(blocks[-1:], source)
        for row, tokens in zip(x, sequences):
            yield head(row[None, : len(tokens)])[0].numpy()

    return logits


def block_reference(blocks: list[Block], source: ModelSource) -> Callable[[torch.Tensor], torch.Tensor]:
    """transformers' own Qwen2 modules, loaded with the source's weights, applied block after block."""
    from transformers import Qwen2Config
    from transformers.models.qwen2 import modeling_qwen2 as qwen2

    config = Qwen2Config(**source.hf_config)
    config._attn_implementation = "sdpa"
    # the source's array itself, not a copy: a 7B's lm_head is 2.2 GB in float32 (a read-only one is copied)
    w = lambda name: torch.from_numpy(np.require(source.tensor(name), requirements="W"))  # noqa: E731

    def load(module: torch.nn.Module, prefix: str) -> torch.nn.Module:
        module.load_state_dict({k: w(f"{prefix}.{k}") for k in module.state_dict()})
        return module.eval()

    def norm(name: str) -> torch.nn.Module:
        return load(qwen2.Qwen2RMSNorm(config.hidden_size, eps=config.rms_norm_eps), name)

    rotary = qwen2.Qwen2RotaryEmbedding(config)

    def block_fn(block: Block) -> Callable[[torch.Tensor], torch.Tensor]:
        p = f"model.layers.{block.layer}"
        if block.kind == "embed":
            table = w("model.embed_tokens.weight")
            return lambda ids: table[ids]
        if block.kind == "attention":
            attn, pre = load(qwen2.Qwen2Attention(config, block.layer), f"{p}.self_attn"), norm(f"{p}.input_layernorm")

            def attention(x: torch.Tensor) -> torch.Tensor:
                position = rotary(x, torch.arange(x.shape[1])[None])
                return x + attn(pre(x), position_embeddings=position, attention_mask=None)[0]

            return attention
        if block.kind == "ffn":
            mlp, pre = load(qwen2.Qwen2MLP(config), f"{p}.mlp"), norm(f"{p}.post_attention_layernorm")
            return lambda x: x + mlp(pre(x))
        final, lm_head = norm("model.norm"), w("lm_head.weight")
        return lambda x: final(x) @ lm_head.T

    fns = [block_fn(b) for b in blocks]

    @torch.no_grad()
    def run(x: torch.Tensor) -> torch.Tensor:
        for fn in fns:
            x = fn(x)
        return x

    return run
