#!/usr/bin/env bash
# Issue 6's reference machine class: an Intel Xeon with AVX-512 and AMX, two cores, two threads. The lent GPU
# machine's Xeon, pinned to two CPUs of distinct cores: the default 0.5B recipe and its int8-prefill recipe, compiled
# from a random-weight checkpoint of the 0.5B's config (docs/device/qwen2.5-coder-0.5b-instruct.config.json; speed
# and memory do not depend on the weight values), against ORT GenAI's int4 build (prune_lm_head) and transformers
# bf16 and fp32 on that checkpoint, side by side in one `tandem bench`.
# From the repository root here: .device/cpu (the cp312 wheels the image lacks: onnxruntime 1.32.0, as here, pydantic
# + pydantic-core, onnxruntime-genai 0.18.0, annotated-types, typing-inspection, typing-extensions, pyyaml, onnx-ir, ml_dtypes) and .device/tok
# (the default model's tokenizer files). Then calls back to back on one warm machine:
#   carry [".device/cpu", ".device/tok"]:  bash docs/device/xeon2.sh start
#   bash docs/device/xeon2.sh wait 560       (until it prints "all done")
#   bash docs/device/xeon2.sh collect        (reports and logs to $OUT)
set -euo pipefail
cd "$(dirname "$0")/../.."
W=.device/x2  # relative, so the reports name no path of the machine
export PYTHONPATH=$PWD/$W/site:$PWD PYTHONUNBUFFERED=1
TIME=$([ -x /usr/bin/time ] && echo "/usr/bin/time -v" || true)

stamp() { echo "[$(date +%T)] $*"; }

# built RECIPE NAME: compile into $W/NAME from the checkpoint; returns once the manifest is written (verify's gates
# are set for real weights, so its pass is not waited for)
built() {
  local recipe=$1 name=$2 partial
  $TIME python3 -m compiler.cli compile "$recipe" --model $W/ckpt -o $W/build-$name --jobs 3 --quiet \
    > $W/compile-$name.log 2>&1 &
  local pid=$!
  until partial=$(ls -d $W/.build-$name.partial-*/manifest.yaml 2>/dev/null | head -1) && [ -n "$partial" ]; do
    kill -0 $pid 2>/dev/null || { tail -20 $W/compile-$name.log; return 1; }
    sleep 5
  done
  sleep 2; cp -al "$(dirname "$partial")" $W/$name && rm -f $W/$name/UNFINISHED
  pkill -P $pid 2>/dev/null || true; kill $pid 2>/dev/null || true; wait $pid 2>/dev/null || true
  stamp "compiled $name: $(du -sh $W/$name | cut -f1)"
}

case "$1" in
start)
  mkdir -p $W && python3 -m pip install -q --no-deps --no-index --target $W/site .device/cpu/*.whl
  setsid nohup bash docs/device/xeon2.sh stages > $W/log 2>&1 < /dev/null &
  sleep 30; cat $W/log
  ;;
stages)
  stamp start
  lscpu | grep -E "^Model name|^Flags" | cut -c1-400; nproc; free -g | sed -n 2p
  python3 -c "import onnxruntime, torch, transformers; print('onnxruntime', onnxruntime.__version__, 'torch', torch.__version__, 'transformers', transformers.__version__)"
  python3 -m compiler.cli make-checkpoint --config docs/device/qwen2.5-coder-0.5b-instruct.config.json --random-weights \
    -o $W/ckpt --tokenizer .device/tok --jobs 8
  stamp "checkpoint"
  # calibration on 4 windows instead of 32: the graphs are the same, and random weights make its quality moot
  for r in cpu cpu-int8-prefill; do
    sed 's/^calibration: .*/calibration: {windows: 4, window: 512}/' recipes/qwen2.5-coder-0.5b-instruct.$r.yaml > $W/$r.yaml
  done
  built $W/cpu.yaml default &
  built $W/cpu-int8-prefill.yaml int8 &
  $TIME python3 -m onnxruntime_genai.models.builder -i $W/ckpt -o $W/genai -p int4 -e cpu \
    --extra_options prune_lm_head=true > $W/genai.log 2>&1 && stamp "built genai" || tail -20 $W/genai.log &
  wait
  # two CPUs of two distinct physical cores
  CPUS=$(lscpu -p=CPU,CORE | grep -v '^#' | sort -t, -k2,2n -u | head -2 | cut -d, -f1 | paste -sd,)
  stamp "bench on CPUs $CPUS"
  CUDA_VISIBLE_DEVICES= taskset -c $CPUS python3 -m compiler.cli bench $W/int8 --prompt-lengths 36,256,988 --new-tokens 64 --repeats 3 \
    --threads 2 --peer tandem:$W/default --peer genai:$W/genai --peer transformers:$W/ckpt:bfloat16 --peer transformers:$W/ckpt:float32 \
    --out $W/bench-xeon2
  stamp "all done"
  ;;
wait)
  end=$((SECONDS + $2))
  until grep -q "all done" $W/log || [ $SECONDS -ge $end ] || ! pgrep -f "xeon2.sh stages" > /dev/null; do sleep 10; done
  tail -40 $W/log
  ;;
collect)
  cp $W/log "$OUT/xeon2.log"; cp $W/bench-xeon2/* "$OUT/" 2>/dev/null || true
  grep -E "Elapsed|Maximum resident" $W/compile-*.log $W/genai.log || true
  ;;
esac
