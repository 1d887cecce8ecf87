#!/usr/bin/env bash
# Qwen2.5-7B (random weights, real config) on the lent GPU machine. Stages, run in the order given:
#   run    the fused CUDA recipe (CUDA graphs for decode) against the same artifact without them, ORT GenAI and
#          transformers on the same card; first the CUDA-graph test on the tiny model (tests/test_cuda.py)
#   quick  the CUDA recipe against ORT GenAI with CUDA graphs only (no transformers, no tests): for a short stretch
#   cpu    the CPU recipe on the machine's CPU cores against ORT GenAI's CPU int4 build
#   split  the split placement (attention on the CPU EP, FFN on CUDA), and the same artifact on the CPU cores alone
#   fpa    ORT's fpA_intB (TensorRT-LLM) MatMulNBits kernels through the session entry ep.cuda.fpa_intb_gemm, with
#          the recipe's int4 lm_head and with an int8 one, against the recipe and ORT GenAI with and without CUDA graphs
#   profile the CUDA recipe against ORT GenAI with CUDA graphs: bench, then a kernel profile of each
#          (docs/device/decode_profile.py); first the CUDA tests on the tiny model
#   splitprof  where a split decode step goes, on a 4-layer checkpoint of the 7B's widths: the split recipe (attention
#          on the CPU EP, FFN on CUDA) against the same graphs all on the CPU, with the shared pool at 16 and 4
#          threads and with per-session pools without spinning (docs/device/split_profile.py)
#   splitcheck  the split placement against the same graphs all on the CPU: greedy tokens and logits
#          (docs/device/greedy_compare.py), generate --stats (each EP's time, cross-EP hops and bytes a token); with
#          the recipe's accuracy level 4 and with 0 (float32 activations on the CPU EP too)
#   long   a 32K KV cache and a 32000-token prompt; ORT's fpA_intB kernels; the engine of .device/gpu/old
#   lm4    the CUDA recipe (its int4 lm_head) against a copy with an int8 lm_head and ORT GenAI with CUDA graphs
#   verify the CUDA recipe compiled with its verify pass, as a user runs it
#   embedhost  the CUDA recipe against a copy with its embedding on the CPU EP (the hidden state of each step made
#          on the host) and ORT GenAI with CUDA graphs; then `tandem verify` of the recipe's build; first the CUDA tests
#   mem    where the CUDA recipe's GPU memory goes: as it is, with its weights outside the arena
#          (session.use_device_allocator_for_initializers), and with that and an arena that grows by what is asked
#          (kSameAsRequested, a copy of the runtime in $W/src2), side by side in one bench
#   memstages  the CUDA recipe's GPU memory after each stage of loading and running it (docs/device/gpu_memory.py)
#   cpuint8  the CPU recipe with prefill_weights int8 (prompt chunks through the integer GEMM) against the same
#          artifact with its prefill forms dropped (prompt chunks on the int4 decode graph) and ORT GenAI's CPU build
#   ovcpu  the CPU cores alone: prefill on the OpenVINO EP in bf16, decode on the CPU EP's int4 kernels
#          (qwen2.5-7b-instruct.cpu-bf16-prefill.yaml), against the same graphs on the CPU EP alone; needs
#          onnxruntime-openvino's wheel (.device/ov.partN), not onnxruntime-gpu's
# Compiles are CPU work: a kind with more cores finishes them sooner, but `cpu` measures the cores it is given.
#
# From the repository root here: ../shared/device/ortgpu-pieces.sh (.device/ortgpu.part00-04), the default
# artifact's tokenizer files in .device/tok, and the wheels the image lacks in .device/gpu (onnxruntime-genai-cuda
# 0.18.0, pydantic + pydantic-core, annotated-types, typing-inspection, typing-extensions, pyyaml, onnx-ir,
# ml_dtypes, and pytest with pluggy, iniconfig, packaging, pygments; for `long` also .device/gpu/old:
# runtime/engine.py and kv_cache.py of 7923721). Then, calls back to back on one warm machine (an idle one goes
# back after 30 s; one call carries at most 64 MiB):
#   5 calls, carry [".device/ortgpu.partNN"]:  mkdir -p .device/w && mv .device/ortgpu.part* .device/w/
#   (for ovcpu instead: onnxruntime-openvino 1.24.1's cp312 wheel split into .device/ov.part0-2, carried the same way)
#   1 call, carry [".device/tok", ".device/gpu"]:  bash docs/device/gpu_7b.sh start run cpu
#   bash docs/device/gpu_7b.sh wait 560      (until it prints "all done"; each call waits at most that long)
#   bash docs/device/gpu_7b.sh collect       (reports and logs to $OUT)
# Timings are taken while nothing else runs: each compile ends (or is stopped once its graphs and manifest are
# written, before its verify pass) before the benchmarks start.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/../.." && pwd)  # the repository's copy on the device; .device/ is git-ignored, so it stays
W=$ROOT/.device/w7
WHEEL=onnxruntime_gpu-1.31.1-cp312-cp312-manylinux_2_28_x86_64.whl
OV_WHEEL=onnxruntime_openvino-1.24.1-cp312-cp312-manylinux_2_28_x86_64.whl
export PYTHONPATH=$W/ortsite:$W/site:$W/src PYTHONUNBUFFERED=1
CORES=$(nproc)
JOBS=$(( $(free -g | awk '/Mem:/ {print $2}') / 5 )); JOBS=$(( JOBS < CORES - 2 ? JOBS : CORES - 2 ))  # ~4 GB a worker
TIME=$([ -x /usr/bin/time ] && echo "/usr/bin/time -v" || true)

stamp() { echo "[$(date +%T)] $*"; }

# ov CMD...: CMD with onnxruntime-openvino's onnxruntime in place of onnxruntime-gpu's
ov() { PYTHONPATH=$W/ovsite:$W/site:$W/src "$@"; }

# compile RECIPE NAME [CHECKPOINT]: build into $W/NAME; returns once the manifest is written (the verify pass is not
# waited for)
compile() {
  local recipe=$1 name=$2 model=${3:-$W/q7b} partial
  $TIME python3 -m compiler.cli compile "$recipe" --model $model -o $W/build-$name --jobs $JOBS --quiet \
    > $W/compile-$name.log 2>&1 &
  local pid=$!
  until partial=$(ls -d $W/.build-$name.partial-*/manifest.yaml 2>/dev/null | head -1) && [ -n "$partial" ]; do
    kill -0 $pid 2>/dev/null || { tail -20 $W/compile-$name.log; return 1; }
    sleep 5
  done
  sleep 2; cp -al "$(dirname "$partial")" $W/$name && rm -f $W/$name/UNFINISHED
  pkill -f "compiler.cli compile $recipe" || true; wait $pid 2>/dev/null || true
  stamp "compiled $name: $(du -sh $W/$name | cut -f1)"
}

# variant NAME SED [RECIPE]: a copy of RECIPE (default: the CUDA recipe) edited by the sed script SED and named NAME
# (what it changes shown), compiled into $W/NAME
variant() {
  local recipe=${3:-recipes/qwen2.5-7b-instruct.cuda.yaml}
  sed "$2; s/^name: .*/name: $1/" $recipe > $W/$1.yaml
  diff $recipe $W/$1.yaml || true
  compile $W/$1.yaml $1
}

# checkpoint: the random-weight 7B, once
checkpoint() {
  [ -f $W/q7b/config.json ] && return
  python3 -m compiler.cli make-checkpoint --config qwen2.5-7b-instruct --random-weights -o $W/q7b --tokenizer $W/tok --jobs "$CORES"
  stamp checkpoint
}

# genai_build EP: ORT GenAI's builder, int4 for that EP, into $W/genai-EP (in the background: $! is its pid)
genai_build() {
  $TIME python3 -m onnxruntime_genai.models.builder -i $W/q7b -o $W/genai-$1 -p int4 -e $1 -c $W/genai-cache-$1 \
    > $W/genai-build-$1.log 2>&1 &
}

# retarget FROM TO PYTHON: a hard-linked copy of artifact FROM whose manifest's `roles` the Python statement
# rewrites; the copy's manifest is a new file, not the linked one rewritten
retarget() {
  cp -al $W/$1 $W/$2
  python3 - "$W/$2/manifest.yaml" "$3" <<'PY'
import json, os, sys, yaml
path, statement = sys.argv[1:3]
m = yaml.safe_load(open(path))
roles = m["roles"]
exec(statement)
os.unlink(path)
yaml.safe_dump(m, open(path, "w"), sort_keys=False, width=120, default_flow_style=None)
PY
}

# cuda_test: the CUDA tests on the tiny model (tests/test_cuda.py), from $W/src
cuda_test() {
  { python3 -m pytest -q -p no:cacheprovider tests/test_cuda.py 2>&1 || true; } | tail -15; stamp "cuda tests"
}

# built EP RECIPE NAME: the checkpoint, then RECIPE compiled into $W/NAME while ORT GenAI's int4 build for EP runs
built() {
  checkpoint
  genai_build $1; local genai=$!
  compile $2 $3
  wait $genai; stamp "genai $1 built"; rm -rf $W/genai-cache-$1
}

# ov_built: the checkpoint, the OpenVINO-prefill CPU recipe compiled into $W/ovcpu, and $W/ovcpu-plain, the same
# graphs on the CPU EP alone (once)
ov_built() {
  [ -f $W/ovcpu-plain/manifest.yaml ] && return
  checkpoint
  compile recipes/qwen2.5-7b-instruct.cpu-bf16-prefill.yaml ovcpu
  retarget ovcpu ovcpu-plain 'for role in roles.values(): role.pop("prefill", None)'
}

# genai_graphs: $W/genai-cuda-graphs, ORT GenAI's CUDA build with CUDA graphs switched on in its config (a linked copy)
genai_graphs() {
  cp -al $W/genai-cuda $W/genai-cuda-graphs && rm $W/genai-cuda-graphs/genai_config.json
  python3 - $W/genai-cuda/genai_config.json $W/genai-cuda-graphs/genai_config.json <<'PY'
import json, sys
config = json.load(open(sys.argv[1]))
for entry in config["model"]["decoder"]["session_options"]["provider_options"]:
    entry.get("cuda", {})["enable_cuda_graph"] = "1"
json.dump(config, open(sys.argv[2], "w"), indent=2)
PY
}

case "$1" in
start)
  shift
  if ls .device/w/ortgpu.part0* > /dev/null 2>&1; then
    cat .device/w/ortgpu.part0* > .device/w/$WHEEL
    echo "05d548956197b9d01f59b625de740e0d6be3593f874e241a12dc0362650ecdf7  .device/w/$WHEEL" | sha256sum -c -
    python3 -m pip install -q --no-deps --no-index --target $W/ortsite .device/w/$WHEEL
  fi
  if ls .device/w/ov.part* > /dev/null 2>&1; then
    cat .device/w/ov.part* > .device/w/$OV_WHEEL
    echo "d617fac2f59a6ab5ea59a788c3e1592240a129642519aaeaa774761dfe35150e  .device/w/$OV_WHEEL" | sha256sum -c -
    python3 -m pip install -q --no-deps --no-index --target $W/ovsite .device/w/$OV_WHEEL
  fi
  python3 -m pip install -q --no-deps --no-index --target $W/site .device/gpu/*.whl
  mkdir -p $W/src && cp -r compiler runtime recipes docs tests pyproject.toml $W/src/ && cp -r .device/tok $W/tok
  [ ! -d .device/gpu/old ] || cp -r .device/gpu/old $W/old
  setsid nohup bash docs/device/gpu_7b.sh stages "${@:-run}" > $W/log 2>&1 < /dev/null &
  sleep 20; cat $W/log
  ;;
stages)
  shift
  nvidia-smi --query-gpu=name,memory.total --format=csv,noheader; echo "$CORES cores"; free -g | head -2
  for stage in "$@"; do bash "$0" "$stage" || stamp "stage $stage failed"; done
  stamp "all done"
  ;;
run)
  cd $W/src
  cuda_test
  built cuda recipes/qwen2.5-7b-instruct.cuda.yaml cuda
  retarget cuda cuda-plain 'roles["igpu"]["providers"] = [p for p in roles["igpu"]["providers"] if not p["options"]]'
  python3 -m compiler.cli info $W/cuda > $W/info-cuda.txt; head -8 $W/info-cuda.txt
  python3 -m compiler.cli bench $W/cuda --prompt-lengths 32,1024 --new-tokens 128 --repeats 3 \
    --peer tandem:$W/cuda-plain --peer genai:$W/genai-cuda --peer transformers:$W/q7b --out $W/bench-cuda
  stamp "bench cuda"
  ;;
quick)
  cd $W/src
  built cuda recipes/qwen2.5-7b-instruct.cuda.yaml cuda
  genai_graphs
  python3 -m compiler.cli bench $W/cuda --prompt-lengths 32,1024 --new-tokens 128 --repeats 3 \
    --peer genai:$W/genai-cuda-graphs --out $W/bench-quick
  stamp "bench quick"
  ;;
lm4)
  cd $W/src
  built cuda recipes/qwen2.5-7b-instruct.cuda.yaml cuda
  variant cuda-lm8 's/^  lm_head: {scheme: int4/  lm_head: {scheme: int8/'
  genai_graphs
  python3 -m compiler.cli bench $W/cuda --prompt-lengths 32,1024 --new-tokens 128 --repeats 3 \
    --peer tandem:$W/cuda-lm8 --peer genai:$W/genai-cuda-graphs --out $W/bench-lm4
  stamp "bench lm4"
  ;;
verify)
  # the CUDA recipe compiled as a user compiles it, its verify pass included (graphs against torch, the chain,
  # held-out perplexity on the GPU), timed
  cd $W/src
  checkpoint
  $TIME python3 -m compiler.cli compile recipes/qwen2.5-7b-instruct.cuda.yaml --model $W/q7b -o $W/cuda-verified \
    --jobs $JOBS --quiet > $W/compile-verified.log 2>&1 || true
  grep -v "it/s" $W/compile-verified.log | tail -30
  stamp "compile with verify"
  ;;
embedhost)
  cd $W/src
  cuda_test
  built cuda recipes/qwen2.5-7b-instruct.cuda.yaml cuda
  variant cuda-hostembed 's/^placement: {embed: igpu,/placement: {embed: cpu,/'
  genai_graphs
  python3 -m compiler.cli info $W/cuda-hostembed > $W/info-cuda-hostembed.txt; head -10 $W/info-cuda-hostembed.txt
  python3 -m compiler.cli bench $W/cuda --prompt-lengths 32,1024 --new-tokens 128 --repeats 3 \
    --peer tandem:$W/cuda-hostembed --peer genai:$W/genai-cuda-graphs --out $W/bench-embedhost
  stamp "bench embedhost"
  $TIME python3 -m compiler.cli verify $W/cuda > $W/compile-verify-cuda.log 2>&1 || true
  tr '\r' '\n' < $W/compile-verify-cuda.log | grep -E "^(verify|error|  )" | tail -12
  stamp "verify cuda"
  ;;
mem)
  cd $W/src
  checkpoint
  compile recipes/qwen2.5-7b-instruct.cuda.yaml cuda
  retarget cuda cuda-init 'for p in roles["igpu"]["providers"]: p["session"] = {"session.use_device_allocator_for_initializers": 1}'
  rm -rf $W/src2 && cp -r $W/src $W/src2
  sed -i 's/ort.OrtArenaCfg(0, -1, -1, -1)/ort.OrtArenaCfg(0, 1, -1, -1)/' $W/src2/runtime/providers.py
  grep -n "OrtArenaCfg(0, 1" $W/src2/runtime/providers.py
  python3 -m compiler.cli bench $W/cuda --prompt-lengths 32,1024 --new-tokens 128 --repeats 3 \
    --peer tandem:$W/cuda-init --out $W/bench-mem
  (cd $W/src2 && python3 -m compiler.cli bench $W/cuda-init --prompt-lengths 32,1024 --new-tokens 128 --repeats 3 \
    --out $W/bench-mem-same)
  stamp "bench mem"
  ;;
memstages)
  cd $W/src
  checkpoint
  [ -f $W/cuda/manifest.yaml ] || compile recipes/qwen2.5-7b-instruct.cuda.yaml cuda
  python3 docs/device/gpu_memory.py $W/cuda
  stamp "memory stages"
  ;;
cpu)
  cd $W/src
  built cpu recipes/qwen2.5-7b-instruct.cpu.yaml cpu
  python3 -m compiler.cli bench $W/cpu --prompt-lengths 32,1024 --new-tokens 32 --repeats 2 --peer genai:$W/genai-cpu --out $W/bench-cpu
  stamp "bench cpu"
  ;;
cpuint8)
  cd $W/src
  checkpoint
  genai_build cpu; genai=$!
  variant cpu-int8 's/^prefill_chunk: .*/&\nprefill_weights: int8/' recipes/qwen2.5-7b-instruct.cpu.yaml
  wait $genai; stamp "genai cpu built"; rm -rf $W/genai-cache-cpu
  retarget cpu-int8 cpu-shared 'for g in m["graphs"]: g.pop("prefill", None)'
  python3 -m compiler.cli info $W/cpu-int8 > $W/info-cpu-int8.txt; head -12 $W/info-cpu-int8.txt
  python3 -m compiler.cli bench $W/cpu-int8 --prompt-lengths 32,1024 --new-tokens 32 --repeats 2 \
    --peer tandem:$W/cpu-shared --peer genai:$W/genai-cpu --out $W/bench-cpuint8
  stamp "bench cpuint8"
  ;;
split)
  cd $W/src
  checkpoint
  compile recipes/qwen2.5-7b-instruct.split.yaml split
  python3 -m compiler.cli info $W/split > $W/info-split.txt; head -12 $W/info-split.txt
  python3 -m compiler.cli bench $W/split --prompt-lengths 32,1024 --new-tokens 64 --repeats 3 --out $W/bench-split
  stamp "bench split"
  retarget split split-cpu 'for role in roles.values(): role["providers"] = [{"name": "CPU", "options": {}}]'
  python3 -m compiler.cli bench $W/split-cpu --prompt-lengths 32,1024 --new-tokens 32 --repeats 2 --out $W/bench-split-cpu
  stamp "bench split on the CPU"
  ;;
splitcheck)
  cd $W/src
  checkpoint
  [ -f $W/split/manifest.yaml ] || compile recipes/qwen2.5-7b-instruct.split.yaml split
  # the same recipe with float32 activations in every MatMulNBits (the CPU EP's accuracy level 4 rounds them to int8)
  sed 's/gptq: false}/gptq: false, accuracy_level: 0}/' recipes/qwen2.5-7b-instruct.split.yaml > $W/split0.yaml
  [ -f $W/split0/manifest.yaml ] || compile $W/split0.yaml split0
  for a in split split0; do
    [ -d $W/$a-cpu ] || retarget $a $a-cpu 'for role in roles.values(): role["providers"] = [{"name": "CPU", "options": {}}]'
    for b in $a $a-cpu; do  # each EP's time, the cross-EP hops and bytes a token
      python3 -m compiler.cli generate $W/$b --prompt "Write a Python function that checks whether a number is prime." \
        --max-tokens 48 --temperature 0 --stats 2>&1 > $W/greedy-$b.txt | grep "^\[" | tee $W/greedy-$b.err
    done
    python3 docs/device/greedy_compare.py 48 $W/$a-cpu $W/$a | tee $W/greedy-$a.json
  done
  stamp "split check"
  ;;
fpa)
  cd $W/src
  built cuda recipes/qwen2.5-7b-instruct.cuda.yaml cuda
  variant cuda-h8 's/lm_head: {scheme: int4/lm_head: {scheme: int8/'
  fpa='roles["igpu"]["providers"][0]["session"] = {"ep.cuda.fpa_intb_gemm": "1"}'
  retarget cuda cuda-fpa "$fpa"; retarget cuda-h8 cuda-h8-fpa "$fpa"
  genai_graphs
  python3 -m compiler.cli info $W/cuda-fpa > $W/info-cuda-fpa.txt; head -8 $W/info-cuda-fpa.txt
  python3 -m compiler.cli bench $W/cuda-fpa --prompt-lengths 32,1024 --new-tokens 128 --repeats 3 \
    --peer tandem:$W/cuda-h8-fpa --peer tandem:$W/cuda-h8 --peer tandem:$W/cuda \
    --peer genai:$W/genai-cuda-graphs --peer genai:$W/genai-cuda --out $W/bench-fpa
  stamp "bench fpa"
  ;;
profile)
  cd $W/src
  cuda_test
  built cuda recipes/qwen2.5-7b-instruct.cuda.yaml cuda
  genai_graphs
  python3 -m compiler.cli bench $W/cuda --prompt-lengths 32,1024 --new-tokens 128 --repeats 3 \
    --peer genai:$W/genai-cuda-graphs --out $W/bench-profile
  stamp "bench"
  for target in "tandem $W/cuda" "genai $W/genai-cuda-graphs"; do
    python3 docs/device/decode_profile.py $target 2>&1 | grep -v -i warn; done
  stamp "profiles"
  ;;
splitprof)
  cd $W/src
  python3 -c "import json; from compiler.checkpoint import load_config; c = load_config('qwen2.5-7b-instruct')[0]; \
c['num_hidden_layers'] = 4; json.dump(c, open('$W/q7b4.json', 'w'))"
  python3 -m compiler.cli make-checkpoint --config $W/q7b4.json --random-weights -o $W/q7b4 --tokenizer $W/tok --jobs "$CORES"
  compile recipes/qwen2.5-7b-instruct.split.yaml split4 $W/q7b4
  retarget split4 split4-cpu 'for role in roles.values(): role["providers"] = [{"name": "CPU", "options": {}}]'
  for run in "split4 0" "split4-cpu 0" "split4 4" "split4-cpu 4" "split4 0 own" "split4-cpu 0 own"; do
    set -- $run; python3 docs/device/split_profile.py $W/$1 ${2} ${3:-} 2>&1 | tail -1; done
  stamp "split profile"
  ;;
long)
  # the CUDA recipe with a 32K KV cache: a 32000-token prompt through chunked prefill, and ORT's fpA_intB
  # (TensorRT-LLM) MatMulNBits kernels switched on by its environment variable, against the default kernels
  cd $W/src
  checkpoint
  variant cuda32k 's/^max_context: 4096/max_context: 32768/'
  python3 -m compiler.cli bench $W/cuda32k --prompt-lengths 32,1024,32000 --new-tokens 128 --repeats 3 --out $W/bench-long
  stamp "bench long"
  ORT_FPA_INTB_GEMM=1 python3 -m compiler.cli bench $W/cuda32k --prompt-lengths 32,1024 --new-tokens 128 --repeats 3 --out $W/bench-fpa
  stamp "bench fpa"
  # the engine before the KV cache was bound once per batch (.device/gpu/old: runtime/engine.py, kv_cache.py of 7923721)
  cp -r $W/src $W/src-old && cp $W/old/*.py $W/src-old/runtime/
  PYTHONPATH=$W/ortsite:$W/site:$W/src-old python3 -m compiler.cli bench $W/cuda32k --prompt-lengths 32,1024 --new-tokens 128 --repeats 3 --out $W/bench-old
  stamp "bench old"
  ;;
ovcpu)
  cd $W/src
  echo "CPU: $(lscpu | sed -n 's/Model name: *//p'); $(grep -o -w 'amx_bf16\|amx_tile\|avx512_bf16\|avx512_vnni' /proc/cpuinfo | sort -u | tr '\n' ' ')"
  ov_built
  ov python3 -m compiler.cli info $W/ovcpu > $W/info-ovcpu.txt; head -12 $W/info-ovcpu.txt
  ov python3 -m compiler.cli generate $W/ovcpu --prompt "Write a Python function to calculate fibonacci" --chat \
    --max-tokens 16 --temperature 0 --stats 2>&1 | tail -3
  ov python3 docs/device/phase_check.py $W/ovcpu $W/ovcpu-plain 1024 2>&1 | grep -v "^tandem:"
  ov python3 -m compiler.cli bench $W/ovcpu --prompt-lengths 32,1024 --new-tokens 32 --repeats 2 \
    --peer tandem:$W/ovcpu-plain --out $W/bench-ovcpu
  stamp "bench ovcpu"
  ;;
ovtune)
  # the ovcpu artifact with OpenVINO prefilling the FFN graphs only, in chunks of 256 (OpenVINO keeps scratch
  # memory per compiled graph, sized by the largest chunk it ran), without dynamic quantization; 3 repeats, so the
  # median is a run after each prompt length's first (OpenVINO compiles each new input shape once)
  cd $W/src
  ov_built
  retarget ovcpu ovffn256 'ffn = {"name": "OpenVINO", "options": {"device_type": "CPU", "load_config": json.dumps({"CPU": {"INFERENCE_PRECISION_HINT": "bf16", "DYNAMIC_QUANTIZATION_GROUP_SIZE": "0"}})}}
roles["igpu"] = {"providers": [{"name": "CPU"}], "prefill": [ffn, {"name": "CPU"}]}
roles["cpu"].pop("prefill")
m["prefill_chunk"] = 256
for g in m["graphs"]:
    g["role"] = "igpu" if g["name"].startswith("ffn") else g["role"]'
  ov python3 -m compiler.cli bench $W/ovffn256 --prompt-lengths 32,1024 --new-tokens 32 --repeats 3 \
    --peer tandem:$W/ovcpu-plain --out $W/bench-ovtune
  stamp "bench ovtune"
  ;;
ovffn)
  # one FFN graph of the ovcpu artifact on the OpenVINO EP under several configs, against the CPU EP
  cd $W/src
  ov python3 docs/device/ov_ffn.py $W/ovcpu/graphs/ffn.0.onnx 2>&1 | grep -v -i warn
  stamp "ov ffn"
  ;;
wait)
  end=$((SECONDS + $2))
  until grep -q "all done" $W/log || [ $SECONDS -ge $end ] || ! pgrep -f "gpu_7b.sh stages" > /dev/null; do sleep 10; done
  tail -40 $W/log; df -h $W | tail -1; free -g | sed -n 2p
  ;;
collect)
  cp $W/log "$OUT/run.log"
  for d in $W/bench-*/; do cp "$d/bench.json" "$OUT/$(basename "$d").json"; cp "$d/bench.md" "$OUT/$(basename "$d").md"; done
  cp $W/info-*.txt $W/greedy-* "$OUT/" 2>/dev/null || true
  grep -E "Elapsed|Maximum resident" $W/genai-build-*.log $W/compile-*.log || true
  ;;
esac
