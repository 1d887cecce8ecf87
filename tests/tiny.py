"""Tiny random Qwen2 checkpoints (HF format, with a byte-level BPE tokenizer and ChatML template) for fast tests."""
from __future__ import annotations

import json
from pathlib import Path

CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
TEXT = [
    "def fibonacci(n):\n    return n if n < 2 else fibonacci(n - 1) + fibonacci(n - 2)\n",
    "The quick brown fox jumps over the lazy dog. Écrire un programme, 写一个函数, 🙂 emoji.",
    "SELECT id, total FROM orders ORDER BY created_at DESC LIMIT 10;",
    "A list is mutable and a tuple is immutable; both are sequences in Python.",
]


def make_tokenizer(directory: Path, vocab_size: int = 320) -> int:
    """Train a small byte-level BPE and save it as tokenizer.json + tokenizer_config.json; returns its size."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIALS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(TEXT * 20, trainer)
    directory.mkdir(parents=True, exist_ok=True)
    tok.save(str(directory / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
        "chat_template": CHAT_TEMPLATE,
    }
    (directory / "tokenizer_config.json").write_text(json.dumps(config))
    return tok.get_vocab_size()


def make_checkpoint(
    directory: Path, layers: int = 2, hidden: int = 64, heads: int = 4, kv_heads: int = 2, intermediate: int = 96, seed: int = 0
) -> Path:
    """A random-weight Qwen2 checkpoint; weights are scaled up so that greedy choices are not near-ties."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    vocab = make_tokenizer(directory)
    eos = json.loads((directory / "tokenizer.json").read_text())["added_tokens"][2]["id"]
    torch.manual_seed(seed)
    config = Qwen2Config(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=1024,
        rope_theta=10000.0, tie_word_embeddings=False, initializer_range=0.2, eos_token_id=eos,
    )
    model = Qwen2ForCausalLM(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.2)
    model.save_pretrained(directory)
    return directory


def make_gguf(checkpoint: Path, path: Path) -> Path:
    """The checkpoint as a float32 GGUF file of llama.cpp's qwen2 layout (its tensor names, hyperparameters and BPE
    vocabulary), for peers that read GGUF."""
    import gguf
    import numpy as np
    from safetensors.numpy import load_file

    from compiler.source import GGUF_NAMES, model_config

    config = model_config(json.loads((checkpoint / "config.json").read_text()))
    tokenizer = json.loads((checkpoint / "tokenizer.json").read_text())
    to_gguf = {hf: name for name, hf in GGUF_NAMES.items()}
    writer = gguf.GGUFWriter(path, "qwen2")
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_heads)
    writer.add_head_count_kv(config.num_kv_heads)
    writer.add_rope_freq_base(config.rope_theta)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    vocab = {**tokenizer["model"]["vocab"], **{t["content"]: t["id"] for t in tokenizer["added_tokens"]}}
    tokens = sorted(vocab, key=vocab.get) + [f"[PAD{i}]" for i in range(len(vocab), config.vocab_size)]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("qwen2")
    writer.add_token_list(tokens)
    writer.add_token_types([gguf.TokenType.CONTROL if t in SPECIALS or t.startswith("[PAD") else gguf.TokenType.NORMAL
                            for t in tokens])
    writer.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in tokenizer["model"]["merges"]])
    writer.add_eos_token_id(vocab["<|im_end|>"])
    for name, tensor in load_file(checkpoint / "model.safetensors").items():
        layer = name.split(".")[2] if name.startswith("model.layers.") else None
        key = to_gguf[".".join(name.split(".")[3:])] if layer else to_gguf[name]
        writer.add_tensor(f"blk.{layer}.{key}" if layer else key, tensor.astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
