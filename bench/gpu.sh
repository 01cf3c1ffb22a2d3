#!/usr/bin/env bash
# Every GPU figure the project tracks, in one run (about 8 minutes on one H100/H200):
#   moe     the sparse MoE training step against stock transformers and a dense model of the
#           same active size (bench/moe.py, bf16 autocast, grouped dispatch)
#   loss    hard + soft loss fwd+bwd at Liger-Kernel's benchmark shape (BT 8192, H 4096,
#           V 128,256, bf16): KD vs CE-only vs the autograd fallback, and peak memory
#           (bench/loss.py); Liger itself too when it is installed
#   step    bf16 training-step tokens/s and MFU of a dense and a MoE student (bench/step.py)
#   cache   write overhead of the cache with the teacher on the GPU (bench/cache.py)
# Prints one JSON object; on a machine without CUDA it says so and exits 0.
#   bash bench/gpu.sh [PEAK_TFLOPS]     (default 989: H100/H200 dense bf16)
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
PEAK=${1:-989}
if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
  echo '{"cuda": false, "note": "no CUDA device: nothing measured"}'
  exit 0
fi
run() {  # NAME CMD...: the command's JSON, or an error object; never stops the others
  local name=$1; shift
  local out
  if out=$("$@" 2>"/tmp/gpu-bench-$name.err"); then echo "\"$name\": $out"; else
    echo "\"$name\": {\"error\": $("$PY" -c 'import json,sys; print(json.dumps(sys.stdin.read()[-2000:]))' <"/tmp/gpu-bench-$name.err")}"
  fi
}
liger=$("$PY" -c "import liger_kernel; print('installed')" 2>/dev/null || echo "not installed")
{
  echo "{"
  echo "\"cuda\": true, \"device\": \"$("$PY" -c 'import torch; print(torch.cuda.get_device_name())')\", \"liger_kernel\": \"$liger\","
  run moe "$PY" bench/moe.py --device cuda --steps 5 --warmup 2; echo ","
  run loss "$PY" bench/loss.py --device cuda --bt 8192 --hidden 4096 --vocab 128256 --dtype bf16 --iters 10; echo ","
  run step "$PY" bench/step.py --device cuda --precision bf16 --hidden 2048 --layers 16 --heads 16 --batch 8 \
    --seq 2048 --vocab 128256 --experts 16 --peak-tflops "$PEAK"; echo ","
  run cache "$PY" bench/cache.py --device cuda --skip sizes teacher_step --hidden 2048,4096 --sequences 64 \
    --seq-len 2048 --batch 8 --reps 3
  echo "}"
} | "$PY" -c "import json, sys; print(json.dumps(json.loads(sys.stdin.read()), indent=1))"
