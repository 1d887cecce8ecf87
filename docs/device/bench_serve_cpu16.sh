#!/usr/bin/env bash
# Continuous batching on the lent GPU machine's 16 CPU cores (the CPU EP; the H100 is not used): a checkpoint with
# Qwen2.5-Coder-0.5B-Instruct's config and seeded random weights (speed does not depend on weight values), compiled
# with the default recipe's schemes, then `tandem bench-serve --clients 8`. Run from the repository root on the
# device with carry [".device/wheels", ".device/tok"] (wheels: the project's pure-Python deps and onnxruntime 1.32
# for cp312; tok: the default artifact's tokenizer files). Works under .device/ (git-ignored); writes
# $OUT/bench-serve-cpu16.json and compile.log.
set -euo pipefail
python3 -m pip install -q --no-deps --no-index --target .device/site .device/wheels/*.whl
export PYTHONPATH=.device/site:.
python3 - <<'PY'
import shutil, torch, yaml
from transformers import Qwen2Config, Qwen2ForCausalLM
config = Qwen2Config(
    vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
    num_key_value_heads=2, max_position_embeddings=32768, rope_theta=1000000.0, rms_norm_eps=1e-6,
    tie_word_embeddings=True, initializer_range=0.02, eos_token_id=151645, bos_token_id=151643,
)
torch.manual_seed(0)
Qwen2ForCausalLM(config).save_pretrained(".device/ckpt")
for f in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
    shutil.copy(f".device/tok/{f}", f".device/ckpt/{f}")
# the default recipe's schemes and layout; random weights have no fidelity to verify, so only the run is checked
recipe = yaml.safe_load(open("recipes/qwen2.5-coder-0.5b-instruct.cpu.yaml"))
recipe["calibration"] = {"windows": 4, "window": 256}
recipe["verify"].update(graph_max_rel_error=100.0, logits_max_abs_error=1000.0, max_perplexity_delta=100.0, eval_windows=1)
yaml.safe_dump(recipe, open(".device/random-0.5b.yaml", "w"))
PY
start=$SECONDS
python3 -m compiler.cli compile .device/random-0.5b.yaml --model .device/ckpt -o .device/art --quiet > "$OUT/compile.log" 2>&1 \
  || { tail -30 "$OUT/compile.log"; exit 1; }
echo "compile: $((SECONDS - start)) s"
python3 -m compiler.cli bench-serve .device/art --clients 8 --max-tokens 128 --out "$OUT/bench-serve-cpu16.json"
nproc; lscpu | grep -E "Model name|Flags" | cut -c1-300
