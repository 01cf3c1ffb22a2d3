"""Training-step throughput of the MoE students: stock transformers vs the sparse path.

For each case it times one training step (forward + backward + fused AdamW) of
  stock   transformers' Llama4ForCausalLM, every expert on every token;
  sparse  the same config and weights with `enable_sparse_moe` (students.build);
  dense   a dense Llama 4 with the same active parameters per token: every layer gets
          a SwiGLU of width = mean over layers of the active FFN width, where an MoE
          layer's active width is shared + top_k * expert width (both are SwiGLUs over
          the same hidden size, so FLOPs and parameters per token match up to the router).
and prints one JSON object.  Shapes (the issue's): vocab 4096, hidden 256, 4 layers,
8 heads, 2 KV heads, head_dim 32, dense MLP 1024, batch 8 x 256; cases
  e16:  16 experts of width 512 in every layer        (dense equivalent: 1024)
  e128: 128 experts of width 128 in every other layer (dense equivalent: (2*1024 + 2*256) / 4 = 640)

Usage: python bench/moe.py [--device cpu|cuda] [--steps 3] [--warmup 1] [--quick]
                           [--batch 8 --seq 256] [--hidden 256] [--threads N]
On CUDA the forward runs under bf16 autocast.  Uses torch's default thread count unless
--threads; on a shared machine `--threads 1` ratios are the steadiest (the other load
then costs every model alike).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import transformers
from transformers import Llama4ForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

from students.build import build_model, expert_load  # noqa: E402
from students.sparse_moe import grouped_mm_available  # noqa: E402
from students.presets import dense_llama4, maverick, param_counts, scout  # noqa: E402

SHAPE = dict(vocab_size=4096, hidden_size=256, num_layers=4, num_heads=8, num_kv_heads=2, head_dim=32,
             intermediate_size_mlp=1024)
QUICK_SHAPE = dict(SHAPE, hidden_size=128, num_heads=4, intermediate_size_mlp=512)
CASES = {
    "e16": (scout, dict(num_experts=16, intermediate_size=512)),
    "e128": (maverick, dict(num_experts=128, intermediate_size=128)),
}


def _busy_seconds() -> float | None:
    """CPU seconds all processes have been busy since boot (Linux), else None."""
    try:
        fields = [int(v) for v in Path("/proc/stat").read_text().split("\n")[0].split()[1:]]
    except (OSError, ValueError):
        return None
    user, nice, system, _idle, _iowait, irq, softirq, steal = fields[:8]
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def other_load(busy_before: float | None, own_before: float, wall: float) -> float | None:
    """Cores' worth of CPU used by *other* processes during the run: timings taken
    on a shared machine with this above ~0.1 are slower than the code is."""
    busy_after = _busy_seconds()
    if busy_before is None or busy_after is None:
        return None
    own = sum(os.times()[:4]) - own_before
    return round(max(busy_after - busy_before - own, 0.0) / wall, 2)


def dense_equivalent_width(config) -> int:
    """Mean active FFN width over layers (shared + top_k experts on MoE layers)."""
    moe_width = config.intermediate_size * (1 + config.num_experts_per_tok)
    widths = [moe_width if i in config.moe_layers else config.intermediate_size_mlp
              for i in range(config.num_hidden_layers)]
    return round(sum(widths) / len(widths))


def make_optimizer(model) -> torch.optim.Optimizer:
    """AdamW(lr=1e-4), fused where torch supports it: the fastest stock AdamW on CPU
    (about 5x the default foreach one here).  The MoE models hold 3-6x the dense
    model's parameters and the optimizer touches all of them every step; `optimizer_s`
    in the output reports what that costs."""
    try:
        return torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    except (RuntimeError, TypeError):
        return torch.optim.AdamW(model.parameters(), lr=1e-4)


class Trainer:
    """One model and its optimizer; `step()` runs and times one training step."""

    def __init__(self, model, ids: torch.Tensor, device: str):
        self.model, self.ids, self.device = model.train(), ids, device
        self.optimizer = make_optimizer(model)

    def _now(self) -> float:
        if self.device == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter()

    def step(self) -> tuple[float, float, float]:
        """(whole step, optimizer only, whole step in this process's CPU time) in seconds."""
        cpu_start = time.process_time()
        start = self._now()
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.device == "cuda"):
            loss = self.model(self.ids, labels=self.ids).loss
        loss.backward()
        before_optimizer = self._now()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        end = self._now()
        return end - start, end - before_optimizer, time.process_time() - cpu_start


def summarise(times: list[tuple[float, float, float]], tokens: int) -> dict:
    steps = [t for t, _, _ in times]
    step = statistics.median(steps)
    return {"step_s": round(step, 4), "min_step_s": round(min(steps), 4), "tokens_per_s": round(tokens / step, 1),
            "optimizer_s": round(statistics.median(o for _, o, _ in times), 4), "all_step_s": [round(t, 4) for t in steps],
            "cpu_step_s": round(statistics.median(c for _, _, c in times), 4)}


def run_case(name: str, shape: dict, batch: int, seq: int, args) -> dict:
    preset, extra = CASES[name]
    config = preset(**shape, **extra)
    dense_config = dense_llama4(**shape | {"intermediate_size_mlp": dense_equivalent_width(config)})
    ids = torch.randint(0, shape["vocab_size"], (batch, seq), generator=torch.Generator().manual_seed(0))
    ids = ids.to(args.device)

    torch.manual_seed(0)
    stock = Llama4ForCausalLM(config).to(args.device)  # stock forward: every expert on every token
    sparse = build_model(config).to(args.device)
    sparse.load_state_dict(stock.state_dict())  # identical weights
    dense = build_model(dense_config, seed=0).to(args.device)
    with torch.no_grad():
        max_diff = (stock(ids[:1]).logits - sparse(ids[:1]).logits).abs().max().item()

    # Round-robin: each round times one step of every model, so load from other
    # processes on a shared machine hits all three alike.
    trainers = {"stock": Trainer(stock, ids, args.device), "sparse": Trainer(sparse, ids, args.device),
                "dense_equivalent": Trainer(dense, ids, args.device)}
    times: dict[str, list[tuple[float, float, float]]] = {key: [] for key in trainers}
    for round_ in range(args.warmup + args.steps):
        for key, trainer in trainers.items():
            timing = trainer.step()
            if round_ >= args.warmup:
                times[key].append(timing)

    tokens = batch * seq
    result = {"config": {**shape, **extra, "moe_layers": config.moe_layers, "top_k": config.num_experts_per_tok,
                         "attention_chunk_size": config.attention_chunk_size},
              "params_total_active": param_counts(config), "logits_max_abs_diff_stock_vs_sparse": max_diff}
    result["optimizer"] = f"AdamW(lr=1e-4, fused={bool(trainers['sparse'].optimizer.defaults.get('fused'))})"
    result |= {key: summarise(t, tokens) for key, t in times.items()}
    loads = [c.tolist() for c in expert_load(sparse)]
    result["sparse"]["expert_load_max_over_mean"] = [round(max(c) * len(c) / sum(c), 2) for c in loads]
    result["dense_equivalent"] |= {"intermediate_size_mlp": dense_config.intermediate_size_mlp,
                                   "params_total_active": param_counts(dense_config)}
    result["speedup_sparse_vs_stock"] = round(result["stock"]["step_s"] / result["sparse"]["step_s"], 2)
    # CPU time of the whole process: on one thread (--threads 1) other processes sharing
    # the cores barely move it, so this ratio is the one to compare across loaded runs.
    result["speedup_sparse_vs_stock_cpu_time"] = round(result["stock"]["cpu_step_s"] / result["sparse"]["cpu_step_s"], 2)
    result["sparse_time_over_dense"] = round(result["sparse"]["step_s"] / result["dense_equivalent"]["step_s"], 2)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per model (median reported)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps first")
    parser.add_argument("--quick", action="store_true", help="small shapes, 1 step: a smoke run")
    parser.add_argument("--cases", nargs="+", choices=sorted(CASES), default=sorted(CASES, key=len))
    parser.add_argument("--batch", type=int, help="sequences per step (default 8; --quick: 2)")
    parser.add_argument("--seq", type=int, help="tokens per sequence (default 256; --quick: 64)")
    parser.add_argument("--hidden", type=int, help="hidden size (default 256; heads keep head_dim 32)")
    parser.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's)")
    args = parser.parse_args()
    shape, batch, seq = (QUICK_SHAPE, 2, 64) if args.quick else (SHAPE, 8, 256)
    batch, seq = args.batch or batch, args.seq or seq
    if args.hidden:
        shape = dict(shape, hidden_size=args.hidden, num_heads=args.hidden // 32, intermediate_size_mlp=4 * args.hidden)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.quick:
        args.steps, args.warmup = 1, 0

    report = {
        "benchmark": "moe_training_step", "device": args.device, "torch": torch.__version__,
        "threads": torch.get_num_threads(), "machine": platform.machine(), "processor": platform.processor(),
        "batch": batch, "seq": seq, "steps": args.steps, "warmup": args.warmup, "quick": args.quick,
        "transformers": transformers.__version__, "date": time.strftime("%Y-%m-%d"),
        # which expert kernel the sparse path can take (students/sparse_moe.py's `_choose_path`)
        "grouped_mm": grouped_mm_available(torch.device(args.device),
                                           torch.bfloat16 if args.device == "cuda" else torch.float32),
    }
    busy, own, start = _busy_seconds(), sum(os.times()[:4]), time.perf_counter()
    report["cases"] = {name: run_case(name, shape, batch, seq, args) for name in args.cases}
    report["other_processes_cpu_cores"] = other_load(busy, own, time.perf_counter() - start)
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
