"""What an on-policy step costs on a device: the students' sampling and the teacher's scoring.

Builds a teacher and --students students (the `dense` preset, random init), then times the
real on-policy path (distill/train/on_policy.py) on --prompts random prompts of
--prompt-len tokens, each student sampling --new tokens:
  sample            OnPolicySource.sample for one student: generate with the per-row seeded
                    sampler (RowSampler), as training does (the student's own dtype, fp32)
  sample_bf16       the same under bf16 autocast
  stock_sample      transformers' own sampling (do_sample=True) at the same shape: what the
                    per-row seeded streams cost over it
  step              OnPolicySource.micro_batches: every student samples, then ONE teacher
                    forward scores all their samples (generate_s, teacher_s as the loop logs)
Each figure is the median of --reps runs after one warm-up; tokens/s counts sampled tokens
(EOS rarely comes from random weights, so nearly --prompts x --new per student).

Usage: python bench/sampling.py --device cuda [--hidden 1024 --layers 8 --vocab 32768]
       python bench/sampling.py --quick          # CPU smoke run
"""
from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from distill.config import OnPolicyConfig, StudentConfig  # noqa: E402
from distill.train.engines import TorchEngine  # noqa: E402
from distill.train.loop import LoopConfig  # noqa: E402
from distill.prompts import Prompt  # noqa: E402
from distill.train.on_policy import OnPolicySource  # noqa: E402
from distill.train.student import Student, make_optimizer  # noqa: E402
from students.build import build_model  # noqa: E402
from students.presets import PRESETS, param_counts  # noqa: E402
from teachers import IGNORE, Batch  # noqa: E402
from teachers.live import LiveTeacher  # noqa: E402


class _Vocab:
    """What OnPolicySource reads of a tokenizer: its size and EOS/pad ids (the last id: a
    random-init model rarely samples it, so completions run to --new tokens)."""

    def __init__(self, size: int):
        self.size, self.eos_token_id, self.pad_token_id = size, size - 1, size - 1

    def __len__(self) -> int:
        return self.size


def _config(args, hidden: int, layers: int):
    heads = max(1, hidden // 64)
    return PRESETS["dense"](vocab_size=args.vocab, hidden_size=hidden, num_layers=layers, num_heads=heads,
                            num_kv_heads=max(1, heads // 4), head_dim=64, intermediate_size=4 * hidden)


def _student(name: str, args, device: torch.device) -> Student:
    model = build_model(_config(args, args.hidden, args.layers), seed=len(name)).to(device)
    sc = StudentConfig(name=name, model={"preset": "dense"}, optim={"lr": 1e-4})
    opt, sched = make_optimizer(model, sc.optim, 10)
    return Student(sc, TorchEngine(model, opt, sched, sc.optim, device, args.precision), 10)


def _median_time(fn, reps: int, sync) -> tuple[float, object]:
    fn()  # warm-up
    times, out = [], None
    for _ in range(reps):
        sync()
        t0 = time.perf_counter()
        out = fn()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--precision", choices=["fp32", "bf16"], default=None, help="training precision (default: bf16 on CUDA)")
    p.add_argument("--vocab", type=int, default=32768)
    p.add_argument("--hidden", type=int, default=1024, help="student width (head_dim 64)")
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--teacher-hidden", type=int, default=2048)
    p.add_argument("--teacher-layers", type=int, default=16)
    p.add_argument("--students", type=int, default=3)
    p.add_argument("--prompts", type=int, default=32, help="prompts per step (each student samples one answer each)")
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--new", type=int, default=128, help="max_new_tokens")
    p.add_argument("--k", type=int, default=64, help="the teacher's top-k")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--quick", action="store_true", help="tiny shapes: a smoke run")
    args = p.parse_args()
    if args.quick:
        args.vocab, args.hidden, args.layers, args.teacher_hidden, args.teacher_layers = 512, 64, 2, 128, 2
        args.students, args.prompts, args.prompt_len, args.new, args.reps = 2, 4, 16, 8, 1
    device = torch.device(args.device)
    args.precision = args.precision or ("bf16" if device.type == "cuda" else "fp32")
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    torch.manual_seed(0)
    teacher_model = build_model(_config(args, args.teacher_hidden, args.teacher_layers), seed=0)
    autocast = torch.bfloat16 if args.precision == "bf16" else None
    teacher = LiveTeacher(teacher_model, args.k, args.vocab, device, autocast_dtype=autocast)
    students = [_student(f"s{i}", args, device) for i in range(args.students)]
    g = torch.Generator().manual_seed(0)
    prompts = [Prompt(torch.randint(0, args.vocab - 1, (args.prompt_len,), generator=g).tolist(), "")
               for _ in range(args.prompts)]
    op = OnPolicyConfig(share={"kind": "constant", "start": 1.0, "end": 1.0}, max_new_tokens=args.new,
                        prompts_per_step=args.prompts)
    loop = LoopConfig(steps=10, batch_size=args.prompts, grad_accum=1, eval_every=0, eval_blocks=1, checkpoint_every=0,
                      keep_last=1, max_nonfinite=0, seed=0, run_hash="bench")
    source = OnPolicySource(op, {s.name: op.share.as_dict() for s in students}, prompts, teacher,
                            _Vocab(args.vocab), loop)
    ids = [q.ids for q in prompts]
    width = args.prompt_len + args.new
    one = students[0]

    def sampled(blocks: torch.Tensor) -> int:  # the sampled tokens are the blocks' targets
        return int((Batch.of(blocks, range(len(blocks))).labels != IGNORE).sum())

    def sample(bf16: bool):
        ctx = torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
        with ctx:
            return source.sample(one, ids, list(range(len(ids))), 0, width)

    def stock():
        model = one.model.eval()
        x = torch.tensor(ids, device=device)
        with torch.no_grad():
            out = model.generate(input_ids=x, attention_mask=torch.ones_like(x), do_sample=True, temperature=op.temperature,
                                 top_p=1.0, top_k=None, max_new_tokens=args.new, eos_token_id=source.eos,
                                 pad_token_id=source.pad)
        return out[:, args.prompt_len:]

    result = {"device": args.device if device.type == "cpu" else torch.cuda.get_device_name(),
              "torch": torch.__version__, "precision": args.precision,
              "shape": {"vocab": args.vocab, "student": f"{args.layers}x{args.hidden}",
                        "student_params": param_counts(one.model.config)[0],
                        "teacher": f"{args.teacher_layers}x{args.teacher_hidden}",
                        "teacher_params": param_counts(teacher_model.config)[0], "students": args.students,
                        "prompts": args.prompts, "prompt_len": args.prompt_len, "max_new_tokens": args.new}}
    for name, fn in (("sample", lambda: sample(False)), ("sample_bf16", lambda: sample(True))):
        secs, blocks = _median_time(fn, args.reps, sync)
        result[name] = {"s": round(secs, 3), "tokens_per_s": round(sampled(blocks) / secs, 1)}
    secs, new = _median_time(stock, args.reps, sync)
    result["stock_sample"] = {"s": round(secs, 3), "tokens_per_s": round(new.numel() / secs, 1)}
    result["sample_over_stock"] = round(result["sample"]["s"] / secs, 3)

    steps = []
    for step in range(args.reps + 1):  # the first is a warm-up
        batches = source.micro_batches(step, students)
        if step:
            steps.append(dict(source.last))
    scored = sum(int((mb.batch.labels != IGNORE).sum()) for mbs in batches.values() for mb in mbs)
    gen_s = statistics.median(s["generate_s"] for s in steps)
    teacher_s = statistics.median(s["teacher_s"] for s in steps)
    rows = args.students * args.prompts
    result["step"] = {"generate_s": round(gen_s, 3), "teacher_s": round(teacher_s, 3),
                      "sampled_tokens": scored, "sampled_tokens_per_s": round(scored / gen_s, 1),
                      "teacher_tokens_per_s": round(rows * (width - 1) / teacher_s, 1),
                      "teacher_share": round(teacher_s / (gen_s + teacher_s), 3)}
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
