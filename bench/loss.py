"""Peak memory and time of one fwd+bwd of the distillation loss: chunked vs naive.

naive:   logits = hidden @ W.T  (BT, V), upcast to fp32, then hard CE + the divergence at once.
chunked: losses.per_token_losses (chunk_size tokens at a time, recomputed in backward).
Both variants compute the same hard + soft loss against the same teacher signal and are then
reduced by losses.combine, so only the evaluation strategy differs.

Memory method: each variant runs in a fresh subprocess, so nothing one allocated lingers in
the other.  On CUDA, peak = torch.cuda.max_memory_allocated() during the step minus the
memory allocated before it (inputs, weights); the absolute peak is reported too.  On CPU,
PyTorch allocates through glibc malloc; the subprocess runs with MALLOC_MMAP_THRESHOLD_=65536
so every block over 64 KiB is mmap'd and handed back to the OS when freed, which makes RSS
track live tensors.  The peak is then the process's peak RSS (getrusage ru_maxrss, a
high-water mark) minus its RSS just before the step; inputs are built in small pieces so
building them never sets a higher watermark.  Time is measured in a second fresh process
with the default allocator: the median of --iters timed steps after one warm-up step.

Usage:  python bench/loss.py                                   # CPU, scaled-down shape
        python bench/loss.py --device cuda --bt 8192 --hidden 4096 --dtype bf16 --chunk 1024
Anchor (H100, BT=8192, H=4096, V=128256, bf16, Liger fused linear JSD): 11.1 GB / 60.7 ms,
plain torch 68.9 GB / 213.2 ms.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from losses import DIVERGENCES, TeacherSignal, combine, hard_ce, per_token_losses  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def _inputs(args, device):
    g = torch.Generator(device=device).manual_seed(0)
    dtype = DTYPES[args.dtype]
    hidden = torch.randn(args.bt, args.hidden, generator=g, device=device, dtype=dtype)
    weight = torch.randn(args.vocab, args.hidden, generator=g, device=device, dtype=dtype)
    weight /= args.hidden**0.5
    ids, lps = [], []
    for s in range(0, args.bt, 64):  # teacher top-k built in pieces: no (BT, V) watermark
        t = torch.randn(min(64, args.bt - s), args.vocab, generator=g, device=device) * 3
        sig = TeacherSignal.from_logits(t, args.k)
        ids.append(sig.topk_ids)
        lps.append(sig.topk_logprobs)
        del t
    signal = TeacherSignal(torch.cat(ids), torch.cat(lps))
    labels = torch.randint(0, args.vocab, (args.bt,), generator=g, device=device)
    mask = torch.ones(args.bt, dtype=torch.bool, device=device)
    return hidden.requires_grad_(True), weight.requires_grad_(True), signal, labels, mask


def _step(variant, args, hidden, weight, signal, labels, mask):
    kw = {"temperature": args.temperature, "tail": args.tail}
    if variant == "naive":
        logits = (hidden @ weight.T).float()  # (BT, V)
        hard = hard_ce(logits, labels)
        soft = DIVERGENCES[args.divergence](logits, signal, mask=mask, **kw)
    else:
        hard, soft = per_token_losses(hidden, weight, signal, labels, mask,
                                      divergence=args.divergence, chunk_size=args.chunk, **kw)
    total, _ = combine(hard, soft, mask, 0.5, 0.5)
    total.backward()
    hidden.grad = weight.grad = None


def measure_memory(args) -> dict:
    """Peak bytes of the first step above what was allocated before it."""
    device = torch.device(args.device)
    inputs = _inputs(args, device)
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = _rss_bytes()
        if _peak_rss_bytes() > base + 64 * 2**20:
            print("warning: building inputs set the RSS watermark; peak is an upper bound",
                  file=sys.stderr)
    _step(args.variant, args, *inputs)
    if cuda:
        torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() if cuda else _peak_rss_bytes()
    return {"peak_mb": round((peak - base) / 2**20, 1), "peak_abs_mb": round(peak / 2**20, 1)}


def measure_time(args) -> dict:
    """Median wall time of --iters fwd+bwd steps after one warm-up step."""
    device = torch.device(args.device)
    inputs = _inputs(args, device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    _step(args.variant, args, *inputs)
    times = []
    for _ in range(args.iters):
        sync()
        t0 = time.perf_counter()
        _step(args.variant, args, *inputs)
        sync()
        times.append((time.perf_counter() - t0) * 1e3)
    return {"time_ms": round(statistics.median(times), 1)}


def _subprocess(variant: str, what: str, env: dict) -> dict:
    cmd = [sys.executable, __file__, *sys.argv[1:], "--variant", variant, "--measure", what]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--bt", type=int, default=1024, help="tokens (batch x sequence)")
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--vocab", type=int, default=128256)
    p.add_argument("--chunk", type=int, default=64, help="tokens per chunk")
    p.add_argument("--k", type=int, default=64, help="teacher top-k")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    p.add_argument("--divergence", choices=sorted(DIVERGENCES), default="forward_kl")
    p.add_argument("--tail", default="bucket")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--iters", type=int, default=2, help="timed steps after one warm-up step")
    p.add_argument("--variant", choices=["naive", "chunked"], help=argparse.SUPPRESS)
    p.add_argument("--measure", choices=["memory", "time"], help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.variant:  # subprocess mode: one variant, one measurement, one JSON line
        torch.manual_seed(0)
        print(json.dumps((measure_memory if args.measure == "memory" else measure_time)(args)))
        return
    result = {
        "device": args.device if args.device == "cpu" else torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "shape": {"bt": args.bt, "hidden": args.hidden, "vocab": args.vocab, "k": args.k,
                  "chunk": args.chunk, "dtype": args.dtype},
        "loss": {"divergence": args.divergence, "tail": args.tail, "hard": "labels"},
        "memory_method": "cuda max_memory_allocated" if args.device != "cpu"
        else "peak RSS (ru_maxrss) minus RSS before the step; fresh process per variant, "
        "MALLOC_MMAP_THRESHOLD_=65536",
    }
    mmap_env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    for variant in ("naive", "chunked"):
        result[variant] = {**_subprocess(variant, "memory", mmap_env),
                           **_subprocess(variant, "time", dict(os.environ))}
    result["peak_ratio_chunked_over_naive"] = round(
        result["chunked"]["peak_mb"] / result["naive"]["peak_mb"], 3)
    result["time_ratio_chunked_over_naive"] = round(
        result["chunked"]["time_ms"] / result["naive"]["time_ms"], 3)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
