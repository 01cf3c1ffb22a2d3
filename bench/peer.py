"""Co-distillation against the tool users would otherwise run: TRL 1.16's GKDTrainer, on the
same job.  Prints one JSON object; the figures go in BENCHMARKS.md.

The job: 3 students (stock Llama configs of 3 widths, random init, saved with transformers)
learn from one teacher on chat rows, loss on the assistant's tokens only, one epoch, the same
optimiser settings (AdamW, cosine to 0 after a linear warmup, no weight decay, betas 0.9/0.95,
clip 1.0).
  data     rows built from this machine's Python standard library: the user asks what a
           public function does (`What does shutil.copyfile(src, dst, follow_symlinks) do?`),
           the assistant answers with its docstring's first paragraph.  Held-out rows are
           never trained on by anyone (teacher included).
  teacher  a stock LlamaForCausalLM with a byte-level BPE made by `tokenizers` and a ChatML
           template, trained briefly (plain torch loop, all tokens) on the other rows.
  TRL      bench/peer_trl.py in TRL's own venv (`make bench-peer` builds it): one GKDTrainer
           run per student, lmbda 0 (off-policy, the data's completions), beta 0 (forward
           KL), the teacher's full distribution every step.
  ours     one `distill train` for all 3 students, online (the teacher runs once per
           batch for every student), and `distill cache` + `distill train`; each variant
           below is one such job, through the real CLI.
  scoring  one stock-transformers pass over the held-out rows: assistant-token perplexity
           and KL(teacher || student) (full vocabulary) of every student.

Variants (--variants), soft weight 1 (pure forward KL, like GKD's beta 0) unless said:
`online` (the defaults: train.online_dense: auto, which here hands over the teacher's whole
distribution, GKD's loss exactly), `online_top64` (train.online_dense: false: the top-64 with
the tail as one bucket), `cached` (the cache's defaults: cache.estimator: auto, here 256 draws
per token), `cached_top64` (a top-64 cache, the default before 2026-12-04), `online_k512` (top-512),
`cached_sampled` (a sampled cache, 32 draws per token: forward KL unbiased over the whole
vocabulary), `online_default` (the project's default loss too: soft weight 0.5, i.e. half
hard CE on the labels).  Named only: `cached_sampled128`, `cached_sampled256` (named: the same
as `cached`), and
`cached_sampled_top8` / `cached_sampled128_top8` / `cached_sampled256_top8` (cache.exact_top:
8: the teacher's top 8 ids kept exactly, the draws made from the rest).

The step count: TRL steps once per --batch-size rows; ours packs rows into blocks and steps
once per block, with blocks of the tokens of TRL's batch (at least the longest row), so both
take about the same number of optimiser steps over the same epoch.  Wall times are whole jobs
(tokenising included) run one after another; peak RSS is each job's main process's own.

    make bench-peer                                          # builds TRL's venv, then runs this
    python bench/peer.py --trl-python .make/trl-venv/bin/python
    python bench/peer.py --quick --trl-python ...            # a minute: every stage, tiny sizes
    python bench/peer.py --trl-python ... --variants online --vocab 49152 --tokenizer-text stdlib \
        --teacher-hidden 512 --teacher-layers 30 --teacher-steps 20 --teacher-batch 8
                        # the issue's shape: V = 49,152, a 114M teacher (30 layers), students of 3.2-10.6M
    python bench/peer.py --trl-python ... --seeds 0,1,2     # each seed reruns both sides: the spread of a ratio
"""
from __future__ import annotations

import argparse
import ast
import contextlib
import json
import math
import os
import random
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
            "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
WIDTHS = ((64, 2), (128, 2), (192, 3))  # (hidden, layers) of the 3 students
VARIANTS = {  # name: (train.mode, soft weight, train.online_dense, cache.estimator, cache.k or None: --k,
    #                 cache.samples, cache.exact_top); estimator or samples None: the config's default
    "online": ("online", 1.0, "auto", None, None, None, 0),
    "online_top64": ("online", 1.0, False, "topk", None, 32, 0),
    "cached": ("cached", 1.0, "auto", None, None, None, 0),
    "cached_top64": ("cached", 1.0, "auto", "topk", None, 32, 0),
    "online_k512": ("online", 1.0, False, "topk", 512, 32, 0),
    "cached_sampled": ("cached", 1.0, "auto", "sampled", None, 32, 0),
    "cached_sampled256": ("cached", 1.0, "auto", "sampled", None, 256, 0),
    "online_default": ("online", 0.5, "auto", "topk", None, 32, 0),
    # not run unless named: more draws, and an exact head before them
    "cached_sampled_top8": ("cached", 1.0, "auto", "sampled", None, 32, 8),
    "cached_sampled128": ("cached", 1.0, "auto", "sampled", None, 128, 0),
    "cached_sampled128_top8": ("cached", 1.0, "auto", "sampled", None, 128, 8),
    "cached_sampled256_top8": ("cached", 1.0, "auto", "sampled", None, 256, 8),
}
DEFAULT_VARIANTS = ("online", "online_top64", "cached", "cached_top64", "online_k512", "cached_sampled",
                    "online_default")


# ---------------------------------------------------------------------------- the job's inputs

def stdlib_rows(max_answer_chars: int) -> list[dict]:
    """A chat row per public, documented top-level function or method of the stdlib's modules."""
    rows, seen = [], set()
    root = Path(sysconfig.get_paths()["stdlib"])
    for path in sorted(root.rglob("*.py")):
        if {"site-packages", "test", "tests", "idle_test"} & set(path.relative_to(root).parts):
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        defs = [(n.name, n) for n in tree.body if isinstance(n, ast.FunctionDef)]
        defs += [(f"{c.name}.{n.name}", n) for c in tree.body if isinstance(c, ast.ClassDef)
                 for n in c.body if isinstance(n, ast.FunctionDef)]
        for qual, node in defs:
            doc = ast.get_docstring(node)
            if any(part.startswith("_") for part in qual.split(".")) or not doc:
                continue
            answer = " ".join(doc.split("\n\n")[0].split())[:max_answer_chars]
            module = ".".join(path.relative_to(root).with_suffix("").parts).removesuffix(".__init__")
            question = f"What does {module}.{qual}({', '.join(a.arg for a in node.args.args)}) do?"
            if len(answer) < 30 or question in seen:
                continue
            seen.add(question)
            rows.append({"messages": [{"role": "user", "content": question},
                                      {"role": "assistant", "content": answer}]})
    return rows


def make_tokenizer(texts: list[str], vocab_size: int, out: Path):
    """A byte-level BPE trained by `tokenizers`, ChatML template, saved as a transformers tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS,
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<|endoftext|>", eos_token="<|im_end|>",
                                   additional_special_tokens=["<|im_start|>"])
    fast.chat_template = TEMPLATE
    fast.save_pretrained(str(out))
    return fast


def encode(tok, messages: list[dict], add_generation_prompt: bool = False) -> list[int]:
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    return tok(text, add_special_tokens=False)["input_ids"]


def llama(tok, hidden: int, layers: int, seed: int, max_len: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    heads = max(2, hidden // 64)
    return LlamaForCausalLM(LlamaConfig(
        vocab_size=len(tok), hidden_size=hidden, intermediate_size=int(hidden * 2.75) // 8 * 8,
        num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=max(1, heads // 2),
        max_position_embeddings=max_len + 8, tie_word_embeddings=True, pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id, bos_token_id=None))


def train_teacher(rows: list[dict], tok, out: Path, a: argparse.Namespace) -> dict:
    """A stock Llama trained on every token of `rows` by a plain torch loop."""
    model = llama(tok, a.teacher_hidden, a.teacher_layers, seed=1, max_len=1024)
    seqs = [encode(tok, r["messages"])[:a.max_length] for r in rows]
    opt = torch.optim.AdamW(model.parameters(), lr=a.teacher_lr, betas=(0.9, 0.95), weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 20) * 0.5 * (1 + math.cos(math.pi * s / a.teacher_steps)))
    order, rng, start, losses = [], random.Random(1), time.perf_counter(), []
    model.train()
    for step in range(a.teacher_steps):
        if len(order) < a.teacher_batch:
            order += rng.sample(range(len(seqs)), len(seqs))
        batch = [seqs[order.pop()] for _ in range(a.teacher_batch)]
        width = max(map(len, batch))
        ids = torch.tensor([s + [tok.pad_token_id] * (width - len(s)) for s in batch])
        mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in batch])
        loss = model(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100)).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step(), sched.step(), opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    model.eval()
    model.save_pretrained(str(out))
    tok.save_pretrained(str(out))
    return {"steps": a.teacher_steps, "train_s": round(time.perf_counter() - start, 1),
            "final_loss": round(sum(losses[-20:]) / len(losses[-20:]), 3),
            "params": sum(p.numel() for p in model.parameters())}


# ---------------------------------------------------------------------------- running the jobs

def run_job(cmd: list[str], log: Path, env: dict | None = None) -> tuple[float, float, str]:
    """(wall s, peak RSS MB, stdout) of one subprocess.  The peak is its own VmHWM, read from
    /proc while it runs (getrusage's figure for a child would start from this process's own
    peak: Linux carries the forked copy's high-water mark across exec)."""
    start, peak = time.perf_counter(), 0
    with open(log, "w") as err, tempfile.TemporaryFile("w+") as out:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=out, stderr=err, text=True,
                                env={**os.environ, "TOKENIZERS_PARALLELISM": "false", **(env or {})})
        while proc.poll() is None:
            try:
                status = Path(f"/proc/{proc.pid}/status").read_text()
                peak = max(peak, int(status.split("VmHWM:")[1].split()[0]))  # kB
            except (OSError, IndexError, ValueError):
                pass
            time.sleep(0.1)
        out.seek(0)
        stdout = out.read()
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd[:4])} ... failed ({proc.returncode}); its log: {log}\n"
                         + log.read_text()[-3000:])
    return wall, peak / 1024, stdout


def trl_students(work: Path, students: dict[str, Path], teacher: Path, data: Path, a, seed: int = 0) -> dict:
    runs = {}
    for name, path in students.items():
        out = work / "trl" / name
        shutil.rmtree(out, ignore_errors=True)
        cmd = [a.trl_python, str(ROOT / "bench/peer_trl.py"), "--student", str(path), "--teacher", str(teacher),
               "--data", str(data), "--out", str(out), "--lr", str(a.lr), "--batch-size", str(a.batch_size),
               "--warmup-steps", str(a.warmup_steps), "--max-length", str(a.max_length), "--seed", str(seed)]
        wall, rss, stdout = run_job(cmd, work / f"trl-{name}.log")
        runs[name] = {"wall_s": round(wall, 1), "peak_rss_mb": round(rss), **json.loads(stdout.strip().splitlines()[-1]),
                      "dir": str(out)}
    return runs


def our_config(out: Path, data: Path, teacher: Path, students: dict[str, Path], variant: str, block: int, a,
               seed: int = 0) -> dict:
    mode, soft, dense, estimator, k, samples, exact_top = VARIANTS[variant]
    loss = {"soft_weight": {"start": soft, "end": soft}}  # loss.tail: auto follows the estimator
    optim = {"lr": a.lr, "min_lr_ratio": 0.0, "warmup_steps": a.warmup_steps, "weight_decay": 0.0,
             "betas": [0.9, 0.95], "grad_clip": 1.0}
    return {"out_dir": str(out), "seed": seed,
            "data": {"paths": [str(data)], "seq_len": block, "val_fraction": a.val_fraction,
                     "tokenizer": {"path": str(teacher)}},
            "teacher": {"source": "checkpoint", "path": str(teacher)},
            "cache": {"k": k or a.k, **({"estimator": estimator} if estimator else {}),
                      **({"samples": samples} if samples else {}), **({"exact_top": exact_top} if exact_top else {})},
            "students": [{"name": name, "model": {"path": str(path)}, "optim": optim,
                          "loss": loss} for name, path in students.items()],
            "train": {"mode": mode, "epochs": 1, "batch_size": 1, "eval_every": 0, "eval_blocks": 1,
                      "eval_prompts": 0, "checkpoint_every": 0, "device": "cpu", "online_dense": dense}}


def our_students(work: Path, students: dict[str, Path], teacher: Path, data: Path, variant: str,
                 block: int, a, seed: int = 0) -> dict:
    """One co-distillation job over the CLI, as a user runs it: `distill train` (online) or
    `distill cache` + `distill train` (cached), each preparing the data it needs; one block a
    step, one epoch (train.epochs: 1); exported for scoring."""
    out = work / variant
    shutil.rmtree(out, ignore_errors=True)
    shutil.rmtree(work / f"{variant}-export", ignore_errors=True)
    cfg = our_config(out, data, teacher, students, variant, block, a, seed)
    path = work / f"{variant}.yaml"
    path.write_text(json.dumps(cfg))  # JSON is YAML
    cli = [sys.executable, str(ROOT / "cli.py")]
    walls, rss = {}, []
    if VARIANTS[variant][0] == "cached":
        walls["cache"], r, _ = run_job(cli + ["cache", "-c", str(path)], work / f"{variant}-cache.log")
        rss.append(r)
    walls["train"], r, said = run_job(cli + ["train", "-c", str(path), "--quiet"], work / f"{variant}-train.log")
    rss.append(r)
    signal = next((line for line in said.splitlines() if line.startswith("[train] teacher signal:")), None)
    manifest = json.loads(next((out / "data").glob("blocks-*/manifest.json")).read_text())
    steps = manifest["splits"]["train"]["blocks"]  # one epoch of one block a step
    summary = json.loads((out / "train_summary.json").read_text())
    dirs = {}
    for name in students:
        dirs[name] = work / f"{variant}-export" / name
        run_job(cli + ["export", str(out / "students" / name), "--out", str(dirs[name])], work / f"{variant}-export.log")
    return {"wall_s": round(sum(walls.values()), 1), "walls": {k: round(v, 1) for k, v in walls.items()},
            "peak_rss_mb": round(max(rss)), "steps": steps, "block_tokens": block, "signal_chosen": signal,
            "rows_in_train_split": manifest["splits"]["train"]["chat_rows"],
            "teacher_forwards_in_train": summary["teacher_forward_calls"], "dirs": {k: str(v) for k, v in dirs.items()}}


# ---------------------------------------------------------------------------- scoring

@torch.no_grad()
def score(model_dir: Path, teacher, tok, rows: list[dict]) -> dict:
    """Held-out assistant-token perplexity and KL(teacher || student), stock transformers only."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    nll = kl = n = 0.0
    for row in rows:
        ids = encode(tok, row["messages"])
        first = len(encode(tok, row["messages"][:-1], add_generation_prompt=True))  # first assistant token
        # ... to its end-of-turn marker: the template's newline after it is no token the model writes
        end = max(i for i, t in enumerate(ids) if t == tok.eos_token_id) + 1
        x = torch.tensor([ids[:end]])
        s = torch.log_softmax(model(input_ids=x).logits[0, first - 1:-1].double(), -1)  # (A, V) predicting ids[first:end]
        t = torch.log_softmax(teacher(input_ids=x).logits[0, first - 1:-1].double(), -1)
        target = torch.tensor(ids[first:end])
        nll += float(-s.gather(-1, target[:, None]).sum())
        kl += float((t.exp() * (t - s)).sum())
        n += len(target)
    return {"ppl": round(math.exp(nll / n), 3), "kl": round(kl / n, 4), "tokens": int(n)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--trl-python", required=True, help="Python of a venv with trl==1.16.0 (make bench-peer builds one).")
    p.add_argument("--variants", default=",".join(DEFAULT_VARIANTS), help=f"Comma-separated, of {', '.join(VARIANTS)}.")
    p.add_argument("--rows", type=int, default=240, help="Training rows of the students (the issue's 240).")
    p.add_argument("--held-out", type=int, default=80)
    p.add_argument("--teacher-rows", type=int, default=3000, help="Rows the teacher trains on (besides the students').")
    p.add_argument("--teacher-steps", type=int, default=600)
    p.add_argument("--teacher-batch", type=int, default=16)
    p.add_argument("--teacher-lr", type=float, default=3e-3)
    p.add_argument("--teacher-hidden", type=int, default=256)
    p.add_argument("--teacher-layers", type=int, default=4)
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--tokenizer-text", choices=["rows", "stdlib"], default="rows",
                   help="What the BPE learns from: the chat rows (they reach about 12k tokens), or also the stdlib's "
                        "source files (for a vocabulary of a real model's size, e.g. --vocab 49152).")
    p.add_argument("--max-length", type=int, default=192, help="Tokens per row (TRL) and per block (ours).")
    p.add_argument("--max-answer-chars", type=int, default=400)
    p.add_argument("--batch-size", type=int, default=4, help="TRL's rows per step (ours: blocks, for as many steps).")
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--warmup-steps", type=int, default=5)
    p.add_argument("--k", type=int, default=64)
    p.add_argument("--val-fraction", type=float, default=0.02, help="Ours holds this share of the rows out for "
                   "its own validation (it needs one; by a hash of each row, so 0.02 of 240 rows held out 10); TRL "
                   "trains on them all. At the issue's 240 rows, 0.004 (one row) trains both on nearly the same "
                   "rows: BENCHMARKS.md, eighteenth session.")
    p.add_argument("--seeds", default="0", help="Comma-separated seeds; each reruns both sides (their data order) "
                   "and the JSON adds `over_seeds`: every seed's perplexities and the ratio of their means.")
    p.add_argument("--work", type=Path, default=None, help="Keep everything here (default: a temporary dir).")
    p.add_argument("--quick", action="store_true", help="Every stage at the tiniest size (checks the script).")
    a = p.parse_args()
    if a.quick:
        a.rows, a.held_out, a.teacher_rows, a.teacher_steps, a.vocab, a.val_fraction = 24, 8, 200, 20, 512, 0.2
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    work = a.work or Path(tempfile.mkdtemp(prefix="peer-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        with contextlib.redirect_stdout(sys.stderr):  # libraries' chatter: stdout is the JSON alone
            result = bench(work, a)
        print(json.dumps(result, indent=1))
    finally:
        if a.work is None:
            shutil.rmtree(work, ignore_errors=True)


def bench(work: Path, a: argparse.Namespace) -> dict:
    from transformers import AutoModelForCausalLM

    rows = stdlib_rows(a.max_answer_chars)
    random.Random(0).shuffle(rows)
    need = a.held_out + a.rows + a.teacher_rows
    if len(rows) < need:
        raise SystemExit(f"the stdlib gave {len(rows)} rows, {need} needed; lower --teacher-rows")
    held, train, extra = rows[:a.held_out], rows[a.held_out:a.held_out + a.rows], rows[a.held_out + a.rows:need]
    data = work / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in train))
    teacher_dir, info = work / "teacher", work / "teacher.json"
    made_by = {k: getattr(a, k) for k in ("held_out", "vocab", "teacher_steps", "teacher_batch", "teacher_lr",
                                          "teacher_hidden", "teacher_layers", "max_length", "max_answer_chars",
                                          "tokenizer_text")}
    if info.exists():  # a --work dir of an earlier run: the same settings made the same teacher
        from transformers import AutoTokenizer

        tok, teacher_info = AutoTokenizer.from_pretrained(str(teacher_dir)), json.loads(info.read_text())
        if teacher_info.get("made_by") != made_by:
            raise SystemExit(f"{work}: its teacher was made with {teacher_info.get('made_by')}; use another --work")
    else:
        texts = [f"{r['messages'][0]['content']}\n{r['messages'][1]['content']}" for r in train + extra]
        if a.tokenizer_text == "stdlib":
            texts += [p.read_text(encoding="utf-8", errors="replace")
                      for p in sorted(Path(sysconfig.get_paths()["stdlib"]).rglob("*.py"))]
        tok = make_tokenizer(texts, a.vocab, teacher_dir)
        teacher_info = {**train_teacher(train + extra, tok, teacher_dir, a), "made_by": made_by}
        info.write_text(json.dumps(teacher_info))
    students = {}
    for i, (hidden, layers) in enumerate(WIDTHS):
        students[f"s{hidden}"] = work / "init" / f"s{hidden}"
        model = llama(tok, hidden, layers, seed=10 + i, max_len=1024)
        model.save_pretrained(str(students[f"s{hidden}"]))
        tok.save_pretrained(str(students[f"s{hidden}"]))
    params = {n: sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(str(d)).parameters()) for n, d in students.items()}

    teacher = AutoModelForCausalLM.from_pretrained(str(teacher_dir), dtype=torch.float32).eval()
    seeds = [int(x) for x in a.seeds.split(",")]
    runs, block = {}, None
    for seed in seeds:  # the first seed's dirs are the work dir's own, as with one seed
        where = work if seed == seeds[0] else work / f"seed{seed}"
        where.mkdir(exist_ok=True)
        trl = trl_students(where, students, teacher_dir, data, a, seed)
        if block is None:
            # The same number of optimiser steps as TRL's epoch: ours packs rows into blocks, one
            # block a step, so a block holds about as many tokens as TRL's batch of rows.
            trl_steps = next(iter(trl.values()))["steps"]
            lengths = [len(encode(tok, r["messages"])) for r in train]
            block = max(max(lengths), math.ceil(sum(lengths) / trl_steps))
        ours = {v: our_students(where, students, teacher_dir, data, v, block, a, seed) for v in a.variants.split(",")}
        quality = {"trl": {n: score(Path(r["dir"]), teacher, tok, held) for n, r in trl.items()}}
        for v, r in ours.items():
            quality[v] = {n: score(Path(d), teacher, tok, held) for n, d in r["dirs"].items()}
        runs[seed] = {"trl": trl, "ours": ours, "quality": quality}

    first = runs[seeds[0]]
    quality = {"trl": first["quality"]["trl"], "init": {n: score(d, teacher, tok, held) for n, d in students.items()},
               **{v: q for v, q in first["quality"].items() if v != "trl"}}
    teacher_self = score(teacher_dir, teacher, tok, held)
    trl_wall = lambda run: sum(r["wall_s"] for r in run["trl"].values())  # noqa: E731
    result = {
        "setup": {"rows": a.rows, "held_out": a.held_out, "vocab": len(tok), "max_length": a.max_length,
                  "batch_size": a.batch_size, "lr": a.lr, "k": a.k, "student_params": params,
                  "teacher": teacher_info, "teacher_held_out_ppl": teacher_self["ppl"], "seeds": seeds,
                  "machine": f"{os.cpu_count()} CPU cores, torch {torch.__version__}"},
        "trl": {"wall_s": round(trl_wall(first), 1), "peak_rss_mb": max(r["peak_rss_mb"] for r in first["trl"].values()),
                "teacher_forwards": sum(r["teacher_forwards"] for r in first["trl"].values()), "runs": first["trl"]},
        "ours": {v: {**r, "wall_vs_trl": round(r["wall_s"] / trl_wall(first), 3)} for v, r in first["ours"].items()},
        "quality": quality,
        "ppl_vs_trl": {v: {n: round(q[n]["ppl"] / quality["trl"][n]["ppl"], 4) for n in q}
                       for v, q in quality.items() if v not in ("trl", "init")},
    }
    if len(seeds) > 1:
        # The seed moves both sides' data order (TRL's sampler; our block order): one epoch from
        # random init carries a spread, so a ratio of one run each is read against it.
        result["over_seeds"] = {
            "wall_s": {"trl": [round(trl_wall(runs[s]), 1) for s in seeds],
                       **{v: [runs[s]["ours"][v]["wall_s"] for s in seeds] for v in first["ours"]}},
            "ppl": {side: {n: [runs[s]["quality"][side][n]["ppl"] for s in seeds] for n in students}
                    for side in first["quality"]},
            "mean_ppl_vs_trl": {v: {n: round(sum(runs[s]["quality"][v][n]["ppl"] for s in seeds)
                                             / sum(runs[s]["quality"]["trl"][n]["ppl"] for s in seeds), 4)
                                    for n in students} for v in first["ours"]},
        }
    return result

if __name__ == "__main__":
    main()
