"""Online co-distillation: one run with 3 students vs 3 single-student runs.

Each single-student run pays its own teacher forward per batch; the co-distillation run
pays one and hands the signal to all three.  Measures the teacher share T (one teacher
forward per step) and the student step S, then compares

    ratio           = wall(co-distil 3) / wall(3 x single)
    predicted_ratio = (T + 3S) / (3T + 3S)      what perfect amortisation gives
    target          = 1.1 * predicted_ratio

and counts teacher forward calls per batch (must be 1).  Defaults: a BPE of 32,768 tokens on
the whole stdlib, a Behemoth-style teacher (hidden 512, 4 layers, 16 experts) several times
the students' size (hidden 128, 2 layers).  Prints JSON.

    python bench/codistill.py [--steps 20] [--vocab 32768] [--teacher-hidden 512]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from distill.config import parse_config  # noqa: E402
from students.build import build_model  # noqa: E402
from students.presets import PRESETS  # noqa: E402


def make_config(out: Path, teacher_dir: Path, students: list[dict], args) -> dict:
    return {
        "out_dir": str(out), "seed": 0,
        "data": {"stdlib": True, "seq_len": args.seq_len, "max_documents": 200,
                 "tokenizer": {"path": str(teacher_dir)}},
        "teacher": {"source": "checkpoint", "path": str(teacher_dir)},
        "cache": {"k": 64},
        "students": students,
        "train": {"mode": "online", "steps": args.steps, "batch_size": args.batch, "eval_every": 0,
                  "eval_blocks": 1, "checkpoint_every": 0, "keep_last": 1,
                  "online_dense": False},  # the top-64 its BENCHMARKS figures were measured on
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--vocab", type=int, default=32768, help="BPE vocabulary trained on the stdlib")
    ap.add_argument("--student-hidden", type=int, default=128)
    ap.add_argument("--teacher-hidden", type=int, default=512)
    ap.add_argument("--teacher-layers", type=int, default=4)
    args = ap.parse_args()
    stdout = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)  # library log lines (DeepSpeed's accelerator notice) go to stderr; stdout is the JSON

    from distill.data import prepare_data
    from distill.config import DataConfig
    from distill.report.export import save_hf_dir

    work = Path(tempfile.mkdtemp(prefix="bench-codistill-"))
    data = prepare_data(DataConfig(stdlib=True, seq_len=args.seq_len, max_train_blocks=args.batch * args.steps * 4,
                                   tokenizer={"vocab_size": args.vocab}), work / "prep")
    vocab = len(data.tokenizer)
    teacher = build_model(PRESETS["behemoth"](vocab_size=vocab, hidden_size=args.teacher_hidden,
                                              num_layers=args.teacher_layers, num_experts=16), seed=0)
    teacher_dir = save_hf_dir(teacher, data.tokenizer, work / "teacher")

    small = {"hidden_size": args.student_hidden, "num_layers": 2, "num_heads": 4, "num_kv_heads": 1, "head_dim": 32}
    students = [
        {"name": "scout", "model": {"preset": "scout", "args": {**small, "num_experts": 16}}},
        {"name": "maverick", "model": {"preset": "maverick", "args": {**small, "num_experts": 32}}},
        {"name": "dense", "model": {"preset": "dense", "args": small}},
    ]

    from distill.runtime import live_teacher, prepare, resolve_device
    from distill.train.loop import train_loop
    from distill.train.setup import build_students, loop_config, student_models
    from teachers import Batch

    def timed(name: str, studs: list[dict], teacher=None) -> tuple[float, dict, object]:
        """Wall time of the training loop alone (data, teacher and students built beforehand)."""
        cfg = parse_config(make_config(work / name, teacher_dir, studs, args))
        data = prepare(cfg)
        teacher = teacher or live_teacher(cfg, data, resolve_device("cpu"))
        students = build_students(cfg, student_models(cfg, data))
        loop = loop_config(cfg, args.steps, args.batch, 0, 1, "bench")
        t0 = time.perf_counter()
        result = train_loop(students, teacher, data.train, data.val[:1], None, loop, cfg.layout,
                            resume=False, progress=False)
        return time.perf_counter() - t0, result, teacher

    _, _, teacher_src = timed("warmup", students)  # imports, first-call kernel choices, allocator warm-up
    co_wall, co, _ = timed("co", students, teacher_src)
    singles = [timed(f"single-{s['name']}", [s], teacher_src) for s in students]
    single_wall = sum(w for w, _, _ in singles)

    # Teacher share T: one teacher forward per step, measured directly on the same batch shape.
    blocks = prepare(parse_config(make_config(work / "co", teacher_dir, students, args))).train[: args.batch]
    batch = Batch.of(blocks, range(args.batch))
    teacher_src.signal(batch)
    t0 = time.perf_counter()
    for _ in range(5):
        teacher_src.signal(batch)
    t_teacher = (time.perf_counter() - t0) / 5
    # Student step S: from the single runs, each of which paid T per step.
    s_student = max(sum(w / args.steps - t_teacher for w, _, _ in singles) / 3, 1e-9)
    predicted = (t_teacher + 3 * s_student) / (3 * t_teacher + 3 * s_student)
    target = 1.1 * predicted
    ratio = co_wall / single_wall
    print(json.dumps({
        "machine": f"{platform.machine()} {torch.get_num_threads()} threads, torch {torch.__version__}",
        "steps": args.steps, "batch": args.batch, "seq_len": args.seq_len,
        "co_distill_wall_s": round(co_wall, 2), "three_single_runs_wall_s": round(single_wall, 2),
        "teacher_forward_s": round(t_teacher, 4), "student_step_s": round(s_student, 4),
        "vocab": vocab, "ratio": round(ratio, 3), "predicted_ratio": round(predicted, 3),
        "target_ratio": round(target, 3), "meets_target": ratio <= target,
        "teacher_forward_calls_per_batch_co": co["teacher_forward_calls"] / args.steps,
        "teacher_forward_calls_per_batch_single": [r["teacher_forward_calls"] / args.steps for _, r, _ in singles],
    }, indent=2), file=stdout)
    stdout.flush()


if __name__ == "__main__":
    main()
