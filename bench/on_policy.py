"""On-policy vs off-policy co-distillation on a digit task where the teacher is good and
small students are not.  Prints one JSON object; figures go in BENCHMARKS.md.

Task: reverse a 3-6 digit number, chat-formatted (`<|im_start|>user\\n12345<|im_end|>\\n
<|im_start|>assistant\\n54321<|im_end|>`), a character-level tokenizer made with `tokenizers`.
  1. teacher: a stock LlamaForCausalLM trained by a plain torch loop on the training split's
     answers (the project's own chat rendering marks them) until its greedy exact match on
     held-out prompts reaches --teacher-em (or --teacher-steps run out).
  2. per seed: 3 students (dense presets of 3 widths) trained off-policy for --warm steps
     (one co-distillation run), then from those weights --steps more steps, 3 schemes, each
     one co-distillation run of the 3 students through `train_students`:
        off:  off-policy KD (share 0)        on: share 1        ramp: share linear 0 -> 1
     so every student takes warm + steps steps in every scheme.
  3. scored on held-out prompts (the validation split's, never trained on) with
     distill/report/generation.py: greedy exact match (overall and by answer length), and
     the teacher's reverse KL on the students' sampled completions at temperature 1.
  4. cost: the `on` scheme's 3 students co-trained vs the same 3 each trained alone (wall
     time of `train_students`, data prepared once), teacher forwards per step.

    python bench/on_policy.py            # the BENCHMARKS.md figures (3 seeds)
    python bench/on_policy.py --quick    # seconds: every stage at the tiniest size
"""
from __future__ import annotations

import argparse
import contextlib
import json
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from distill.chat import render  # noqa: E402
from distill.config import check_config, parse_config  # noqa: E402
from distill.data import doc_in_val  # noqa: E402
from distill.report.generation import GenSettings, generate, held_out_prompts, reverse_kl_sum, text_of  # noqa: E402
from distill.runtime import prepare  # noqa: E402
from distill.stages import export_students, train_students  # noqa: E402
from students.build import load_causal_lm  # noqa: E402
from teachers import LiveTeacher  # noqa: E402

TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
            "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
SPECIALS = ["<unk>", "<pad>", "<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHARS = ["user", "assistant", "\n", *"0123456789"]  # the role names are one token each
VAL_FRACTION = 0.1


def make_tokenizer(out: Path):
    """One token per character (and per special and role name), ChatML template."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(SPECIALS + CHARS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("user|assistant|[\\s\\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()  # tokens joined as they are (WordLevel's default puts spaces between)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>",
                                   bos_token="<|endoftext|>", eos_token="<|im_end|>")
    fast.add_special_tokens({"additional_special_tokens": ["<|im_start|>"]})
    fast.chat_template = TEMPLATE
    fast.save_pretrained(str(out))
    return fast


def make_rows(n: int, seed: int, digits: tuple[int, int] = (3, 6)) -> list[dict]:
    """n distinct numbers of digits[0]-digits[1] digits (as many of each length), the answer their reverse."""
    rng, seen, rows = random.Random(seed), set(), []
    lo, hi = digits
    while len(rows) < n:
        digits = lo + len(rows) % (hi - lo + 1)
        x = str(rng.randrange(10 ** (digits - 1), 10 ** digits))
        if x in seen:
            continue
        seen.add(x)
        rows.append({"messages": [{"role": "user", "content": x}, {"role": "assistant", "content": x[::-1]}]})
    return rows


def train_teacher(rows: list[dict], tok, out: Path, a: argparse.Namespace, eval_prompts, log) -> dict:
    """A stock Llama trained on the training split's answers only (the project's chat
    rendering gives the targets); stops at --teacher-em greedy exact match."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=a.teacher_hidden, num_hidden_layers=a.teacher_layers,
                      num_attention_heads=4, num_key_value_heads=4, intermediate_size=4 * a.teacher_hidden,
                      max_position_embeddings=128, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                      bos_token_id=tok.bos_token_id, tie_word_embeddings=False)
    model = LlamaForCausalLM(cfg)
    train = [render(tok, json.dumps(r)) for r in rows if not doc_in_val(json.dumps(r), VAL_FRACTION)]
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=a.teacher_steps, pct_start=0.05)
    rng, start, em, step = random.Random(0), time.perf_counter(), 0.0, 0
    for step in range(1, a.teacher_steps + 1):
        batch = rng.sample(train, min(a.teacher_batch, len(train)))
        width = max(len(ids) for ids, _ in batch)
        ids = torch.full((len(batch), width), tok.pad_token_id)
        labels = torch.full((len(batch), width), -100)
        for r, (x, t) in enumerate(batch):
            ids[r, : len(x)] = torch.tensor(x)
            labels[r, : len(x)] = torch.where(torch.tensor(t), torch.tensor(x), -100)
        loss = model(input_ids=ids, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if step % a.teacher_eval_every == 0 or step == a.teacher_steps:
            em = exact(model, tok, eval_prompts, a)["exact_match"]
            log(f"[teacher] step {step} loss {loss.item():.4f} held-out exact match {em:.3f}")
            if em >= a.teacher_em:
                break
    model.save_pretrained(str(out))
    tok.save_pretrained(str(out))
    return {"steps": step, "held_out_exact_match": em, "train_s": round(time.perf_counter() - start, 1),
            "params": sum(p.numel() for p in model.parameters())}


def settings(a: argparse.Namespace, seed: int = 0) -> GenSettings:
    return GenSettings(max_new_tokens=a.max_new_tokens, temperature=1.0, top_p=1.0, seed=seed, batch_size=64)


def exact(model, tok, prompts, a) -> dict:
    """Greedy exact match, overall and by the answer's length (digits)."""
    answers = [text_of(tok, c).strip() for c in generate(model, [p.ids for p in prompts], tok, settings(a))]
    by_len: dict[str, list[bool]] = {}
    for p, got in zip(prompts, answers):
        by_len.setdefault(str(len(p.reference)), []).append(got == p.reference.strip())
    hits = [h for v in by_len.values() for h in v]
    return {"exact_match": sum(hits) / len(hits),
            "exact_match_by_length": {k: round(sum(v) / len(v), 4) for k, v in sorted(by_len.items())}}


def reverse_kl(model, judge, tok, prompts, a, seed: int) -> float:
    s = settings(a, seed)
    ids = [p.ids for p in prompts]
    sampled = generate(model, ids, tok, s, sample_seed=seed)
    total, count = reverse_kl_sum(model, judge, ids, sampled, tok, s.temperature, s.batch_size)
    return total / max(count, 1)




def run_config(out: Path, data: Path, teacher: Path, seed: int, steps: int, a, students: list[dict],
               share: dict | None) -> object:
    raw = {"out_dir": str(out), "seed": seed,
           "data": {"paths": [str(data)], "seq_len": 2 * a.digits[1] + 12, "val_fraction": VAL_FRACTION},
           "teacher": {"source": "checkpoint", "path": str(teacher)}, "cache": {"k": 8},
           "students": students,
           "train": {"mode": "online", "steps": steps, "batch_size": a.batch_size, "eval_every": 0, "eval_blocks": 1,
                     "checkpoint_every": 0, "keep_last": 1,
                     "online_dense": False}}  # the top-8 its BENCHMARKS figures were measured on
    if share is not None:
        raw["train"]["on_policy"] = {"share": share, "max_new_tokens": a.max_new_tokens, "temperature": 1.0}
    return check_config(parse_config(raw))


def fresh_students(a) -> list[dict]:
    return [{"name": f"w{w}", "model": {"preset": "dense", "args": {
        "hidden_size": w, "num_layers": a.student_layers, "num_heads": 2, "num_kv_heads": 2, "head_dim": w // 2,
        "intermediate_size": 4 * w}}, "optim": {"lr": a.lr, "warmup_steps": 5}} for w in a.widths]


def from_exports(warm: dict[str, Path], a) -> list[dict]:
    return [{"name": name, "model": {"path": str(path)}, "optim": {"lr": a.scheme_lr or a.lr, "warmup_steps": a.resume_warmup}}
            for name, path in warm.items()]


SCHEMES = {"off": None, "on": {"kind": "constant", "start": 1.0},
           "ramp": {"kind": "linear", "start": 0.0, "end": 1.0}}


def timed(cfg, packed) -> tuple[float, float, int]:
    """(wall s, this process's CPU s, teacher forwards) of one `train_students`.  CPU time
    is the figure that holds on a shared machine (torch runs one thread here)."""
    t0, c0 = time.perf_counter(), time.process_time()
    forwards = train_students(cfg, progress=False, data=packed)["teacher_forward_calls"]
    return time.perf_counter() - t0, time.process_time() - c0, forwards


def cost(work: Path, data: Path, teacher_dir: Path, warm: dict[str, Path], packed, a, reps: int = 1) -> dict:
    """`train_students` (data prepared once), share 1, seed 0's warm students: the 3
    co-trained in one run vs each trained alone; best of `reps`, alternating, after the
    scheme runs above (so no run pays first-use costs)."""
    together, alone, forwards = [], {}, {}
    for rep in range(reps):
        cfg = run_config(work / "cost" / f"together{rep}", data, teacher_dir, 0, a.steps, a, from_exports(warm, a),
                         SCHEMES["on"])
        wall, cpu, forwards["co_trained"] = timed(cfg, packed)
        together.append((wall, cpu))
        for st in from_exports(warm, a):
            cfg = run_config(work / "cost" / f"{st['name']}{rep}", data, teacher_dir, 0, a.steps, a, [st],
                             SCHEMES["on"])
            wall, cpu, forwards[st["name"]] = timed(cfg, packed)
            alone.setdefault(st["name"], []).append((wall, cpu))
    out = {}
    for i, unit in enumerate(("wall", "cpu")):
        best = {k: min(t[i] for t in v) for k, v in alone.items()}
        co = min(t[i] for t in together)
        out[unit] = {"co_trained_s": round(co, 2), "single_runs_s": {k: round(v, 2) for k, v in best.items()},
                     "single_runs_total_s": round(sum(best.values()), 2), "ratio": round(co / sum(best.values()), 3)}
    out["teacher_forwards_per_step_co_trained"] = forwards["co_trained"] / a.steps
    out["teacher_forwards_per_step_single_runs"] = sum(v for k, v in forwards.items() if k != "co_trained") / a.steps
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="every stage at the tiniest size (seconds)")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--rows", type=int, default=2000)
    p.add_argument("--teacher-hidden", type=int, default=64)
    p.add_argument("--teacher-layers", type=int, default=2)
    p.add_argument("--teacher-steps", type=int, default=1500)
    p.add_argument("--teacher-batch", type=int, default=32)
    p.add_argument("--teacher-eval-every", type=int, default=200)
    p.add_argument("--teacher-em", type=float, default=0.9)
    p.add_argument("--widths", type=lambda v: [int(x) for x in v.split(",")], default=[16, 24, 32],
                   help="the 3 students' hidden sizes, comma-separated")
    p.add_argument("--digits", type=lambda v: tuple(int(x) for x in v.split("-")), default=(3, 6),
                   help="the numbers' lengths, e.g. 3-6")
    p.add_argument("--student-layers", type=int, default=1)
    p.add_argument("--scheme-lr", type=float, default=None, help="peak lr of the schemes' runs (default: --lr)")
    p.add_argument("--resume-warmup", type=int, default=10,
                   help="lr warmup steps of each scheme's run: it starts a fresh optimizer from the warm weights")
    p.add_argument("--warm", type=int, default=40, help="off-policy steps every student takes first")
    p.add_argument("--steps", type=int, default=60, help="steps per scheme after the warm start")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--max-new-tokens", type=int, default=None, help="default: the longest answer + 2")
    p.add_argument("--eval-prompts", type=int, default=100)
    p.add_argument("--work", type=Path, default=None, help="where runs go (a temporary dir when unset)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("--cost-reps", type=int, default=1, help="timings of the cost comparison (best kept; 0: none)")
    a = p.parse_args()
    if a.quick:
        a.seeds, a.rows, a.teacher_hidden, a.teacher_layers = 1, 200, 16, 1
        a.teacher_steps, a.teacher_eval_every, a.warm, a.steps, a.batch_size, a.eval_prompts = 4, 4, 2, 2, 2, 6
        a.cost_reps = 1
    a.max_new_tokens = a.max_new_tokens or a.digits[1] + 2
    torch.set_num_threads(a.threads)  # a loaded machine: more threads than free cores spin (measured 40x slower)
    # stdout is the JSON alone: libraries' log lines (DeepSpeed's accelerator line) go to stderr
    with contextlib.redirect_stdout(sys.stderr):
        out = bench(a)
    print(json.dumps(out, indent=1))


def bench(a: argparse.Namespace) -> dict:
    log = lambda line: print(line, file=sys.stderr, flush=True)  # noqa: E731
    work = a.work or Path(tempfile.mkdtemp(prefix="bench_on_policy_"))
    work.mkdir(parents=True, exist_ok=True)
    tok = make_tokenizer(work / "tokenizer")
    data = work / "digits.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in make_rows(a.rows, 0, a.digits)))

    # the held-out prompts: the validation split's, as `distill eval` takes them
    probe = run_config(work / "probe", data, work / "tokenizer", 0, 1, a, fresh_students(a)[:1], None)
    prompts = held_out_prompts(probe, tok, a.eval_prompts)
    out: dict = {"task": f"reverse a {a.digits[0]}-{a.digits[1]} digit number (chat format, char tokenizer)", "rows": a.rows,
                 "held_out_prompts": len(prompts), "warm_steps": a.warm, "steps": a.steps,
                 "batch_size": a.batch_size, "students": {f"w{w}": {"hidden": w, "layers": a.student_layers} for w in a.widths}}
    teacher_dir = work / "teacher"
    out["teacher"] = train_teacher(make_rows(a.rows, 0, a.digits), tok, teacher_dir, a, prompts, log)
    teacher_model = load_causal_lm(teacher_dir)
    out["teacher"].update(exact(teacher_model, tok, prompts, a))
    judge = LiveTeacher(teacher_model, 8, len(tok), torch.device("cpu"), keep_dense=True)

    cfg0 = run_config(work / "data_run", data, teacher_dir, 0, 1, a, fresh_students(a), None)
    packed = prepare(cfg0)  # tokenised once, shared by every run below (same data config)
    results: dict = {s: {} for s in ("warm", *SCHEMES)}  # warm: the students every scheme starts from
    warm0: dict[str, Path] = {}
    for seed in range(a.seeds):
        warm_cfg = run_config(work / f"s{seed}" / "warm", data, teacher_dir, seed, a.warm, a, fresh_students(a), None)
        train_students(warm_cfg, progress=False, data=packed)
        warm = export_students(warm_cfg, held_out=packed.val[:1])
        results["warm"][str(seed)] = {name: {**exact(load_causal_lm(path), tok, prompts, a),
                                             "reverse_kl_sampled": round(reverse_kl(load_causal_lm(path), judge, tok,
                                                                                    prompts, a, seed), 4)}
                                      for name, path in warm.items()}
        if seed == 0:
            warm0 = warm  # the cost comparison's students
        for scheme, share in SCHEMES.items():
            cfg = run_config(work / f"s{seed}" / scheme, data, teacher_dir, seed, a.steps, a, from_exports(warm, a), share)
            wall, cpu, forwards = timed(cfg, packed)
            row = {"train_s": round(wall, 1), "train_cpu_s": round(cpu, 1), "teacher_forwards_per_step": forwards / a.steps}
            for name, path in export_students(cfg, held_out=packed.val[:1]).items():
                model = load_causal_lm(path)
                row[name] = {**exact(model, tok, prompts, a),
                             "reverse_kl_sampled": round(reverse_kl(model, judge, tok, prompts, a, seed), 4)}
            results[scheme][str(seed)] = row
            log(f"[seed {seed}] {scheme}: " + json.dumps({k: v["exact_match"] for k, v in row.items()
                                                           if isinstance(v, dict)}))
    if a.cost_reps > 0 and warm0:
        out["cost"] = cost(work, data, teacher_dir, warm0, packed, a, a.cost_reps)
    out["schemes"] = results
    names = [f"w{w}" for w in a.widths]
    summary = {}
    for scheme, by_seed in results.items():
        summary[scheme] = {n: {"exact_match": [by_seed[s][n]["exact_match"] for s in sorted(by_seed)],
                               "reverse_kl_sampled": [by_seed[s][n]["reverse_kl_sampled"] for s in sorted(by_seed)]}
                           for n in names}
    out["summary"] = summary
    out["on_beats_off_every_seed"] = {
        scheme: all(summary[scheme][n]["exact_match"][i] > summary["off"][n]["exact_match"][i]
                    for n in names for i in range(a.seeds)) for scheme in ("on", "ramp")}
    if a.work is None:
        shutil.rmtree(work, ignore_errors=True)
    return out


if __name__ == "__main__":
    main()
