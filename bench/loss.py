"""What the soft loss costs on top of the hard one: time and peak memory of one fwd+bwd.

Variants, all from final hidden states (BT, H) and an lm_head (V, H), then `losses.combine`:
  ce          losses.per_token_losses with no teacher signal (hard CE only)
  kd          the same call with a top-k teacher signal: hard CE + soft divergence (analytic)
  kd_generic  the same KD through the autograd fallback (the divergence registered without
              its closed form): what every divergence cost before the analytic path
  naive       logits = hidden @ W.T at once, upcast, hard CE + divergence (memory reference)
  liger_ce    Liger-Kernel's LigerFusedLinearCrossEntropyLoss (hard CE only), when liger_kernel
              is installed and the device is CUDA
  liger_jsd   Liger-Kernel's LigerFusedLinearJSD (its default beta 0.5, no hard term) from the
              student's hidden states and lm_head and a teacher's (BT, H) hidden states and
              (V, H) lm_head: the teacher's logits are computed inside it, as in Liger's own
              benchmark, whose figures are the anchor below

Time: one process per vocabulary; ce, kd and kd_generic steps (and Liger's where they run) are
interleaved --iters times after one warm-up each, and medians are reported, so load on the machine hits all of them
alike.  Memory: a fresh subprocess per variant.  On CUDA, peak = max_memory_allocated during
the step minus what was allocated before it.  On CPU, the subprocess runs with
MALLOC_MMAP_THRESHOLD_=65536 so freed blocks return to the OS and RSS tracks live tensors;
peak = peak RSS (ru_maxrss) minus RSS before the step.

Usage:  python bench/loss.py                          # CPU: BT=1024, H=256, V in {49152, 128256}
        python bench/loss.py --device cuda --bt 8192 --hidden 4096 --vocab 128256 --dtype bf16
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
from losses.chunked import auto_chunk_size  # noqa: E402
from losses.divergences import Divergence  # noqa: E402
from losses.signal import log_normalize_  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
TIMED = ("ce", "kd", "kd_generic")
LIGER = ("liger_ce", "liger_jsd")


_LIGER_PROBE: dict[str, str] = {}


def liger_variants(device: str) -> tuple[str, ...]:
    """Liger-Kernel's fused losses, where they run: liger_kernel importable and a CUDA device,
    and both losses run forward and backward on a tiny case there (a Liger build that does
    not match this torch/triton is reported, not allowed to sink the other variants)."""
    if not device.startswith("cuda"):
        return ()
    if device not in _LIGER_PROBE:
        try:
            from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss, LigerFusedLinearJSD

            h = torch.randn(8, 16, device=device, requires_grad=True)
            w = torch.randn(32, 16, device=device, requires_grad=True)
            labels = torch.randint(0, 32, (8,), device=device)
            LigerFusedLinearCrossEntropyLoss()(w, h, labels).backward()
            LigerFusedLinearJSD()(h, w, torch.randn(8, 16, device=device), torch.randn(32, 16, device=device),
                                  None).backward()
            _LIGER_PROBE[device] = "ok"
        except Exception as e:  # ImportError, or a kernel that fails on this device
            _LIGER_PROBE[device] = f"{type(e).__name__}: {e}"[:300]
    return LIGER if _LIGER_PROBE[device] == "ok" else ()


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def _inputs(args, vocab: int, device):
    g = torch.Generator(device=device).manual_seed(0)
    dtype = DTYPES[args.dtype]
    hidden = torch.randn(args.bt, args.hidden, generator=g, device=device, dtype=dtype)
    weight = torch.randn(vocab, args.hidden, generator=g, device=device, dtype=dtype) / args.hidden**0.5
    ids, lps, dense = [], [], []
    for s in range(0, args.bt, 64):  # teacher top-k built in pieces: no (BT, V) watermark
        t = torch.randn(min(64, args.bt - s), vocab, generator=g, device=device) * 3
        sig = TeacherSignal.from_logits(t, args.k)
        ids.append(sig.topk_ids)
        lps.append(sig.topk_logprobs)
        if args.signal == "dense":
            dense.append(t)  # (BT, V) fp32 in the end: an input, like online's, outside the step's peak
        del t
    signal = TeacherSignal(torch.cat(ids), torch.cat(lps))
    if dense:  # log-normalised with its entropy, as the live teacher hands it to students
        signal.logits = torch.cat(dense)
        signal.dense_entropy = log_normalize_(signal.logits)
    labels = torch.randint(0, vocab, (args.bt,), generator=g, device=device)
    mask = torch.ones(args.bt, dtype=torch.bool, device=device)
    teacher = None
    if liger_variants(str(device)):  # Liger's JSD takes the teacher's hidden states and lm_head, not its logits
        teacher = (torch.randn(args.bt, args.hidden, generator=g, device=device, dtype=dtype),  # (BT, H)
                   torch.randn(vocab, args.hidden, generator=g, device=device, dtype=dtype) / args.hidden**0.5)  # (V, H)
    return hidden.requires_grad_(True), weight.requires_grad_(True), signal, labels, mask, teacher


def _step(variant, args, hidden, weight, signal, labels, mask, teacher):
    kw = {"temperature": args.temperature, "tail": args.tail}
    if variant in LIGER:
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss, LigerFusedLinearJSD

        if variant == "liger_ce":
            total = LigerFusedLinearCrossEntropyLoss()(weight, hidden, labels)
        else:
            total = LigerFusedLinearJSD(temperature=args.temperature)(hidden, weight, *teacher, None)  # no labels
        total.backward()
        hidden.grad = weight.grad = None
        return
    if variant == "naive":
        logits = (hidden @ weight.T).float()  # (BT, V)
        hard = hard_ce(logits, labels)
        soft = DIVERGENCES[args.divergence](logits, signal, mask=mask, **kw)
    else:
        name = f"{args.divergence}_generic" if variant == "kd_generic" else args.divergence
        hard, soft = per_token_losses(hidden, weight, None if variant == "ce" else signal, labels, mask,
                                      divergence=name, chunk_size=args.chunk, **kw)
    total, _ = combine(hard, soft, mask, 0.5, 0.5)
    total.backward()
    hidden.grad = weight.grad = None


def _register_generic(name: str) -> None:
    """The divergence again, without its closed form: the chunked loss's autograd fallback."""
    d = DIVERGENCES[name]
    DIVERGENCES[f"{name}_generic"] = Divergence(d.fn, d.value, None, d.params, d.sampled)


def measure_memory(args) -> dict:
    device = torch.device(args.device)
    inputs = _inputs(args, args.vocab[0], device)
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = _rss_bytes()
    _step(args.variant, args, *inputs)
    if cuda:
        torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() if cuda else _peak_rss_bytes()
    return {"peak_mb": round((peak - base) / 2**20, 1)}


def measure_times(args) -> dict:
    device = torch.device(args.device)
    inputs = _inputs(args, args.vocab[0], device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    variants = TIMED + liger_variants(args.device)
    times: dict[str, list[float]] = {v: [] for v in variants}
    for v in variants:  # warm-up
        _step(v, args, *inputs)
    for _ in range(args.iters):
        for v in variants:
            sync()
            t0 = time.perf_counter()
            _step(v, args, *inputs)
            sync()
            times[v].append((time.perf_counter() - t0) * 1e3)
    return {f"{v}_ms": round(statistics.median(t), 1) for v, t in times.items()}


def _subprocess(vocab: int, variant: str | None, env: dict) -> dict:
    cmd = [sys.executable, __file__, *sys.argv[1:], "--vocab", str(vocab), "--measure",
           "memory" if variant else "time"] + (["--variant", variant] if variant else [])
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env)
    return json.loads(out.stdout.strip().splitlines()[-1])


def _liger_version(device: str) -> str:
    if not liger_variants(device):
        return f"not run (needs liger_kernel installed and a CUDA device): {_LIGER_PROBE.get(device, 'not CUDA')}"
    from importlib.metadata import version

    return version("liger_kernel")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--bt", type=int, default=1024, help="tokens (batch x sequence)")
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--vocab", type=int, nargs="+", default=[49152, 128256])
    p.add_argument("--chunk", type=int, default=None, help="tokens per chunk (default: auto_chunk_size)")
    p.add_argument("--k", type=int, default=64, help="teacher top-k")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    p.add_argument("--divergence", choices=sorted(DIVERGENCES), default="forward_kl")
    p.add_argument("--tail", default="bucket")
    p.add_argument("--signal", choices=["topk", "dense"], default="topk",
                   help="the teacher's signal: its top-k (a cache's) or its whole distribution (online's default)")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--iters", type=int, default=5, help="interleaved timed rounds after one warm-up")
    p.add_argument("--no-memory", action="store_true", help="skip the memory subprocesses")
    p.add_argument("--memory-variants", nargs="+", default=None, choices=["ce", "kd", "kd_generic", "naive", *LIGER],
                   help="the variants whose peak memory is measured (default: all that run here)")
    p.add_argument("--variant", choices=["naive", *TIMED, *LIGER], help=argparse.SUPPRESS)
    p.add_argument("--measure", choices=["memory", "time"], help=argparse.SUPPRESS)
    args = p.parse_args()
    _register_generic(args.divergence)
    if args.measure:  # subprocess mode: one vocabulary, one JSON line
        torch.manual_seed(0)
        print(json.dumps(measure_memory(args) if args.measure == "memory" else measure_times(args)))
        return
    result = {
        "device": args.device if args.device == "cpu" else torch.cuda.get_device_name(),
        "torch": torch.__version__, "threads": torch.get_num_threads(),
        "shape": {"bt": args.bt, "hidden": args.hidden, "k": args.k, "dtype": args.dtype},
        "loss": {"divergence": args.divergence, "signal": args.signal, "tail": args.tail, "temperature": args.temperature,
                 "hard": "labels"},
        "iters": args.iters, "liger": _liger_version(args.device),
    }
    mmap_env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    for vocab in args.vocab:
        row = {"chunk": args.chunk or auto_chunk_size(vocab, args.device), **_subprocess(vocab, None, dict(os.environ))}
        row["kd_over_ce"] = round(row["kd_ms"] / row["ce_ms"], 3)
        row["kd_generic_over_ce"] = round(row["kd_generic_ms"] / row["ce_ms"], 3)
        if not args.no_memory:
            wanted = args.memory_variants or ("ce", "kd", "kd_generic", "naive", *LIGER)
            row["peak_mb"] = {v: _subprocess(vocab, v, mmap_env)["peak_mb"] for v in wanted
                              if v not in LIGER or v in liger_variants(args.device)}
        result[f"V={vocab}"] = row
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
