#!/usr/bin/env bash
# Qwen2.5-7B (random weights, real config) on the lent GPU machine: the fused CUDA recipe against ORT GenAI and
# transformers on the same card, the split placement (attention on the CPU EP, FFN on CUDA) and the same artifact
# on the machine's CPU cores alone. Best on a kind with 32 cores (nvidia-h100-x2): the compiles are CPU work.
#
# From the repository root here: ../shared/device/ortgpu-pieces.sh (.device/ortgpu.part00-04), the default
# artifact's tokenizer files in .device/tok, and the wheels the image lacks in .device/gpu (onnxruntime-genai-cuda
# 0.18.0, pydantic + pydantic-core, annotated-types, typing-inspection, typing-extensions, pyyaml, onnx-ir,
# ml_dtypes; for the long stage also .device/gpu/old: runtime/engine.py and kv_cache.py of 7923721). Then, calls
# back to back on one warm machine (an idle one goes back after 30 s; one call carries at most 64 MiB):
#   5 calls, carry [".device/ortgpu.partNN"]:  mkdir -p .device/w && mv .device/ortgpu.part* .device/w/
#   1 call, carry [".device/tok", ".device/gpu"]:  bash docs/device/gpu_7b.sh start [run|long]
#   bash docs/device/gpu_7b.sh wait 560      (until it prints "all done"; each call waits at most that long)
#   bash docs/device/gpu_7b.sh collect       (reports and logs to $OUT)
# Timings of the GPU rows are taken while nothing else runs: each compile ends (or is stopped once its graphs and
# manifest are written, before its verify pass) before the benchmarks start.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/../.." && pwd)  # the repository's copy on the device; .device/ is git-ignored, so it stays
W=$ROOT/.device/w7
WHEEL=onnxruntime_gpu-1.31.1-cp312-cp312-manylinux_2_28_x86_64.whl
export PYTHONPATH=$W/ortsite:$W/site:$W/src PYTHONUNBUFFERED=1
CORES=$(nproc)
JOBS=$(( $(free -g | awk '/Mem:/ {print $2}') / 5 )); JOBS=$(( JOBS < CORES - 2 ? JOBS : CORES - 2 ))  # ~4 GB a worker
TIME=$([ -x /usr/bin/time ] && echo "/usr/bin/time -v" || true)

stamp() { echo "[$(date +%T)] $*"; }

# compile RECIPE NAME: build into $W/NAME; returns once the manifest is written (the verify pass is not waited for)
compile() {
  local recipe=$1 name=$2 partial
  $TIME python3 -m compiler.cli compile "$recipe" --model $W/q7b -o $W/build-$name --jobs $JOBS --quiet \
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

case "$1" in
start)
  cat .device/w/ortgpu.part0* > .device/w/$WHEEL
  echo "05d548956197b9d01f59b625de740e0d6be3593f874e241a12dc0362650ecdf7  .device/w/$WHEEL" | sha256sum -c -
  python3 -m pip install -q --no-deps --no-index --target $W/ortsite .device/w/$WHEEL
  python3 -m pip install -q --no-deps --no-index --target $W/site .device/gpu/*.whl
  mkdir -p $W/src && cp -r compiler runtime recipes docs pyproject.toml $W/src/ && cp -r .device/tok $W/tok
  [ ! -d .device/gpu/old ] || cp -r .device/gpu/old $W/old
  setsid nohup bash docs/device/gpu_7b.sh "${2:-run}" > $W/log 2>&1 < /dev/null &
  sleep 20; cat $W/log
  ;;
run)
  cd $W/src
  nvidia-smi --query-gpu=name,memory.total --format=csv,noheader; echo "$CORES cores"; free -g | head -2
  stamp start
  python3 -m compiler.cli make-checkpoint --config qwen2.5-7b-instruct --random-weights -o $W/q7b --tokenizer $W/tok --jobs "$CORES"
  stamp checkpoint
  $TIME python3 -m onnxruntime_genai.models.builder -i $W/q7b -o $W/genai7 -p int4 -e cuda -c $W/genai-cache \
    > $W/genai-build.log 2>&1 &
  genai=$!
  compile recipes/qwen2.5-7b-instruct.cuda.yaml cuda
  wait $genai; stamp "genai built"; rm -rf $W/genai-cache
  python3 -m compiler.cli bench $W/cuda --prompt-lengths 32,1024 --new-tokens 128 --repeats 3 \
    --peer genai:$W/genai7 --peer transformers:$W/q7b --out $W/bench-cuda
  stamp "bench cuda"
  python3 -m compiler.cli info $W/cuda > $W/info-cuda.txt; head -8 $W/info-cuda.txt
  compile recipes/qwen2.5-7b-instruct.split.yaml split
  python3 -m compiler.cli info $W/split > $W/info-split.txt; head -12 $W/info-split.txt
  python3 -m compiler.cli bench $W/split --prompt-lengths 32,1024 --new-tokens 64 --repeats 3 --out $W/bench-split
  stamp "bench split"
  # the same artifact on the CPU cores alone: every role's chain cut to the CPU EP, in a hard-linked copy
  cp -al $W/split $W/cpu
  python3 - <<PY
import yaml
path = "$W/cpu/manifest.yaml"
import os
m = yaml.safe_load(open(path))
for role in m["roles"].values():
    role["providers"] = [{"name": "CPU", "options": {}}]
os.unlink(path)  # a hard link to the split artifact's manifest: a new file, not that one rewritten
yaml.safe_dump(m, open(path, "w"), sort_keys=False, width=120, default_flow_style=None)
PY
  python3 -m compiler.cli bench $W/cpu --prompt-lengths 32,1024 --new-tokens 32 --repeats 2 --out $W/bench-cpu
  stamp "all done"
  ;;
long)
  # the CUDA recipe with a 32K KV cache: a 32000-token prompt through chunked prefill, and ORT's fpA_intB
  # (TensorRT-LLM) MatMulNBits kernels switched on by its environment variable, against the default kernels
  cd $W/src
  nvidia-smi --query-gpu=name,memory.total --format=csv,noheader; echo "$CORES cores"
  python3 -m compiler.cli make-checkpoint --config qwen2.5-7b-instruct --random-weights -o $W/q7b --tokenizer $W/tok --jobs "$CORES"
  stamp checkpoint
  sed 's/^max_context: 4096/max_context: 32768/' recipes/qwen2.5-7b-instruct.cuda.yaml > $W/cuda-32k.yaml
  compile $W/cuda-32k.yaml cuda32k
  python3 -m compiler.cli bench $W/cuda32k --prompt-lengths 32,1024,32000 --new-tokens 128 --repeats 3 --out $W/bench-long
  stamp "bench long"
  ORT_FPA_INTB_GEMM=1 python3 -m compiler.cli bench $W/cuda32k --prompt-lengths 32,1024 --new-tokens 128 --repeats 3 --out $W/bench-fpa
  stamp "bench fpa"
  # the engine before the KV cache was bound once per batch (.device/gpu/old: runtime/engine.py, kv_cache.py of 7923721)
  cp -r $W/src $W/src-old && cp $W/old/*.py $W/src-old/runtime/
  PYTHONPATH=$W/ortsite:$W/site:$W/src-old python3 -m compiler.cli bench $W/cuda32k --prompt-lengths 32,1024 --new-tokens 128 --repeats 3 --out $W/bench-old
  stamp "all done"
  ;;
wait)
  end=$((SECONDS + $2))
  until grep -q "all done" $W/log || [ $SECONDS -ge $end ] || ! pgrep -f "gpu_7b.sh (run|long)" > /dev/null; do sleep 10; done
  tail -40 $W/log; df -h $W | tail -1; free -g | sed -n 2p
  ;;
collect)
  cp $W/log "$OUT/run.log"
  for d in $W/bench-*/; do cp "$d/bench.json" "$OUT/$(basename "$d").json"; cp "$d/bench.md" "$OUT/$(basename "$d").md"; done
  tail -c 200000 $W/compile-cuda.log > "$OUT/compile-cuda.log" 2>/dev/null || true
  grep -E "Elapsed|Maximum resident" $W/genai-build.log $W/compile-*.log || true
  ;;
esac
