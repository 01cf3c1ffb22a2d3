"""The embedded default: stdlib sources -> Behemoth-style teacher -> four students.

`distill demo` builds this config in code (no file needed), runs `distill run` on it,
and prints the report.  The recipe follows what was measured (BENCHMARKS.md): the teacher
sees far more tokens than each student, with warmup + cosine, so it clearly beats what a
student reaches alone at the students' budget.  The cache holds 32 tokens sampled from the
teacher per position (an unbiased forward-KL estimate): on this demo it trained a better
dense student than the top-64 cache did (issue 16).  The distilled students drop the
easiest half of the training blocks by the teacher's nll and go soft -> hard (cosine 0.9 ->
0.6): of the schedules and selections measured over 3 seeds (bench/curriculum.py, issue 17)
these gave the lowest held-out perplexity; the CE-only twin keeps every block (the same
selection made it worse); all at lr 3e-3 for 360 steps rather than 1e-3 for 120.
"""
from __future__ import annotations

from pathlib import Path

from distill.config import check_config, check_inputs_exist, parse_config

# size -> (data, teacher, students, steps) knobs.  quick: `make demo` (<= 10 min on 2 cores).
SIZES = {
    "tiny": dict(docs=40, vocab=512, seq=64, t_hidden=64, t_layers=2, t_experts=4, t_steps=30, t_batch=8,
                 s_hidden=32, s_layers=1, steps=12, batch=4, eval_blocks=4, max_train=400),
    "quick": dict(docs=400, vocab=2048, seq=128, t_hidden=192, t_layers=4, t_experts=16, t_steps=400, t_batch=16,
                  s_hidden=96, s_layers=2, steps=360, batch=8, eval_blocks=32, max_train=4000),
    "full": dict(docs=None, vocab=4096, seq=256, t_hidden=256, t_layers=4, t_experts=16, t_steps=1500, t_batch=16,
                 s_hidden=128, s_layers=2, steps=400, batch=8, eval_blocks=64, max_train=None),
}


def demo_config(out: Path, size: str = "quick") -> dict:
    z = SIZES[size]
    heads = max(2, z["t_hidden"] // 32)
    teacher_args = dict(hidden_size=z["t_hidden"], num_layers=z["t_layers"], num_heads=heads, num_kv_heads=max(1, heads // 4),
                        head_dim=32, num_experts=z["t_experts"], intermediate_size=2 * z["t_hidden"],
                        intermediate_size_mlp=4 * z["t_hidden"], attention_chunk_size=z["seq"] // 2)
    s_heads = max(2, z["s_hidden"] // 32)
    small = dict(hidden_size=z["s_hidden"], num_layers=z["s_layers"], num_heads=s_heads, num_kv_heads=max(1, s_heads // 2),
                 head_dim=32)
    moe_small = dict(small, intermediate_size=2 * z["s_hidden"], intermediate_size_mlp=4 * z["s_hidden"],
                     attention_chunk_size=z["seq"] // 2)
    # Distilled students: mostly soft targets early, more hard targets late (soft -> hard).
    loss = {"divergence": "forward_kl", "tail": "sampled", "temperature": 1.0,
            "soft_weight": {"kind": "cosine", "start": 0.9, "end": 0.6}}
    optim = {"lr": 3e-3}  # every student, the CE twin included
    dense_args = dict(small, intermediate_size=4 * z["s_hidden"])
    return {
        "out_dir": str(out),
        "seed": 0,
        "data": {"stdlib": True, "seq_len": z["seq"], "val_fraction": 0.05, "max_documents": z["docs"],
                 "max_train_blocks": z["max_train"], "tokenizer": {"vocab_size": z["vocab"]},
                 "select": {"by": "nll", "drop_easiest": 0.5}},
        "teacher": {"source": "preset", "model": {"preset": "behemoth", "args": teacher_args},
                    "pretrain": {"steps": z["t_steps"], "batch_size": z["t_batch"],
                                 "optim": {"lr": 2e-3, "warmup_steps": max(1, z["t_steps"] // 10), "min_lr_ratio": 0.05}}},
        "cache": {"estimator": "sampled", "samples": 32, "sample_temperature": 1.0, "batch_size": 16},
        "students": [
            {"name": "scout", "model": {"preset": "scout", "args": dict(moe_small, num_experts=16)}, "loss": loss,
             "optim": optim},
            {"name": "maverick", "model": {"preset": "maverick", "args": dict(moe_small, num_experts=32, num_layers=max(2, z["s_layers"]))},
             "loss": loss, "optim": optim},
            {"name": "dense", "model": {"preset": "dense", "args": dense_args}, "loss": loss, "optim": optim},
            # The CE twin sees every block: dropping the easy half cost it 35 perplexity (BENCHMARKS.md).
            {"name": "dense-baseline", "model": {"preset": "dense", "args": dense_args}, "baseline": True, "optim": optim,
             "select": {"drop_easiest": 0}},
        ],
        "train": {"mode": "cached", "steps": z["steps"], "batch_size": z["batch"], "eval_every": max(1, z["steps"] // 4),
                  "eval_blocks": z["eval_blocks"], "checkpoint_every": max(1, z["steps"] // 4)},
    }


def run_demo(out: Path, size: str = "quick", resume: bool = True, progress: bool = True,
             overwrite: bool = False) -> dict:
    from distill.stages import run_all

    source = f"demo ({size})"
    cfg = check_config(parse_config(demo_config(Path(out), size), source=source), source)
    check_inputs_exist(cfg)  # e.g. --out naming an existing file
    return run_all(cfg, resume=resume, progress=progress, overwrite=overwrite)
