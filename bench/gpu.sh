#!/usr/bin/env bash
# Every GPU figure the project tracks, in one run of at most GPU_BENCH_SECONDS (default 480)
# on one H100/H200, most important first; a piece the budget no longer covers is skipped:
#   cache       write overhead of the cache with the teacher on the GPU, top-k and sampled
#               encodings, and read rates (bench/cache.py)
#   moe         the sparse MoE training step against stock transformers and a dense model of the
#               same active size, at bench/moe.py's shape and at 8 x 1,024 tokens of width 1,024
#               (bf16 autocast; whether torch's grouped GEMM runs is in the output)
#   loss_topk   hard + soft loss fwd+bwd at Liger-Kernel's benchmark shape (BT 8192, H 4096,
#               V 128,256, bf16) from a top-k signal (a cache's): KD vs CE-only vs the autograd
#               fallback, and peak memory; Liger's fused linear CE and JSD beside them when
#               liger_kernel is importable (bench/loss.py)
#   loss_dense  the same from the teacher's whole distribution (online's default), which is what
#               Liger's JSD computes from (peak memory of KD and Liger's JSD only)
#   step        bf16 training-step tokens/s and MFU of a dense and a MoE student (bench/step.py)
#   sampling    an on-policy step: 3 students sample, one teacher forward scores them, and the
#               per-row seeded sampler against transformers' own sampling (bench/sampling.py)
#   step_vs_ce  the cached distillation step against the CE-only step, with its breakdown
# Not here: the server teacher (bench/server.py needs a CUDA vLLM build beside the project).
# Prints one JSON object (each piece: its wall seconds and its own JSON, or its error); each
# piece's stderr is kept in GPU_BENCH_LOGS (default /tmp/gpu-bench).  On a machine without CUDA
# it says so and exits 0.
#   bash bench/gpu.sh [PEAK_TFLOPS]     (default 989: H100/H200 dense bf16)
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
PEAK=${1:-989}
BUDGET=${GPU_BENCH_SECONDS:-480}
LOGS=${GPU_BENCH_LOGS:-/tmp/gpu-bench}
if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
  echo '{"cuda": false, "note": "no CUDA device: nothing measured"}'
  exit 0
fi
mkdir -p "$LOGS"
rm -f "$LOGS"/*.json "$LOGS"/*.err "$LOGS"/*.meta
start=$SECONDS
NAMES=()
run() {  # NAME CAP_SECONDS CMD...: stdout to LOGS/NAME.json, stderr to LOGS/NAME.err; never stops the others
  local name=$1 cap=$2; shift 2
  local left=$((BUDGET - (SECONDS - start)))
  ((left < cap)) && cap=$left
  NAMES+=("$name")
  if ((cap < 30)); then echo "skipped: the ${BUDGET} s budget is spent" >"$LOGS/$name.meta"; return; fi
  local t0=$SECONDS
  timeout -k 15 "$cap" "$@" >"$LOGS/$name.json" 2>"$LOGS/$name.err"
  echo "rc $? wall $((SECONDS - t0)) cap $cap" >"$LOGS/$name.meta"
  echo "[gpu.sh] $name: $(cat "$LOGS/$name.meta")" >&2
}
# first: the sampled write from a GPU teacher's logits was fixed (2026-12-04) without a device to rerun it
run cache 100 "$PY" bench/cache.py --device cuda --skip sizes teacher_step --hidden 4096 --sequences 16 \
  --seq-len 2048 --batch 4 --reps 2 --encodings lossless,sampled,sampled+difficulty
run moe 100 "$PY" bench/moe.py --device cuda --steps 5 --warmup 2
run moe_large 70 "$PY" bench/moe.py --device cuda --steps 3 --warmup 1 --hidden 1024 --seq 1024 --batch 8
run loss_topk 150 "$PY" bench/loss.py --device cuda --bt 8192 --hidden 4096 --vocab 128256 --dtype bf16 --iters 5
run loss_dense 70 "$PY" bench/loss.py --device cuda --bt 8192 --hidden 4096 --vocab 128256 --dtype bf16 --iters 5 \
  --signal dense --memory-variants kd liger_jsd
run step 100 "$PY" bench/step.py --device cuda --precision bf16 --hidden 2048 --layers 8 --heads 16 --batch 4 \
  --seq 2048 --vocab 128256 --experts 8 --steps 5 --warmup 2 --peak-tflops "$PEAK"
run sampling 90 "$PY" bench/sampling.py --device cuda
run step_vs_ce 80 "$PY" bench/step.py --device cuda --precision bf16 --vs-ce --hidden 1024 --layers 8 --heads 16 \
  --batch 8 --seq 1024 --vocab 32768 --steps 5 --warmup 2
"$PY" - "$LOGS" "${NAMES[@]}" <<'EOF'
import json, sys
from pathlib import Path

import torch

logs, names = Path(sys.argv[1]), sys.argv[2:]
out = {"cuda": True, "device": torch.cuda.get_device_name(), "torch": torch.__version__}
try:
    from importlib.metadata import version
    out["liger_kernel"] = version("liger_kernel")
except Exception:
    out["liger_kernel"] = "not installed"
for name in names:
    meta = (logs / f"{name}.meta").read_text().split()
    if meta[0] == "skipped:":
        out[name] = {"skipped": " ".join(meta[1:])}
        continue
    rc, wall = int(meta[1]), int(meta[3])
    text = (logs / f"{name}.json").read_text()
    try:  # the JSON object starts a line; a library's stray stdout lines around it are dropped
        start = 0 if text.startswith("{") else text.index("\n{") + 1
        result = json.JSONDecoder().raw_decode(text[start:])[0]
    except ValueError:
        result = None
    piece = {"wall_s": wall, "result": result} if rc == 0 and result is not None else {
        "wall_s": wall, "rc": rc, "timed_out": rc == 124,
        "error": ((logs / f"{name}.err").read_text()[-3000:] + text[-1000:]).strip()}
    out[name] = piece
print(json.dumps(out, indent=1))
EOF
