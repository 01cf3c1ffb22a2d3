"""`distill eval`: teacher and students on the held-out split -> report.json, report.md, plots.

report.json:
  {"teacher": {...}, "students": {"NAME": {"kind": "scout|maverick|dense|behemoth|pretrained|from_teacher|baseline",
   "params_total", "params_active", "val_ppl", "teacher_top1_agreement", "kl_to_teacher",
   "step", "train_tokens" (positions the scored export read: prompts and padding too),
   "train_targets" (the training targets it learnt from; None: resumed from a checkpoint that
   predates the count), "export_dir" (relative to OUT), "inference_tokens_per_s",
   "generation" (chat data: distill/report/generation.py)}},
   "generation": {"prompts", "max_new_tokens", "temperature", "top_p", "teacher": {...}} (chat data),
   "teacher_signal": what agreement and KL are measured against (`signal_description`)}
"""
from __future__ import annotations

import base64
import hashlib
import json
import sys

import numpy as np
import torch

from common.errors import UserError
from common.fsutil import atomic_write_json, atomic_write_text
from common.progress import progress_bar
from distill.blocks import first_blocks
from distill.config import CacheConfig, RunConfig
from distill.data import vocab_size_of
from distill.report import generation, plots
from distill.report.export import export_meta, export_problems, model_card
from distill.runtime import cache_identity, check_cached_blocks, prepare, resolve_device, scoring_teacher
from distill.train import checkpoint
from distill.train.metrics import read_metrics
from distill.train.validate import evaluate_model, inference_tokens_per_s
from losses.difficulty import STATS
from students.build import load_causal_lm
from students.presets import param_counts
from teachers import CachedTeacher, LiveTeacher, Teacher
from teachers.cache.format import Sampling


def _model_stats(model, blocks, teacher: Teacher, device, label: str, progress: bool,
                 teacher_top1: torch.Tensor | None = None, keep_top1: int | None = None) -> dict:
    """Held-out metrics on `blocks` (expert load included), then sizes and prefill speed; a bar
    labelled `label` counts the blocks scored.  teacher_top1, keep_top1: as evaluate_model's."""
    total, active = param_counts(model.config)
    with progress_bar(len(blocks), f"eval: {label}", progress) as bar:
        stats = evaluate_model(model, blocks, teacher, device=device, bar=bar, teacher_top1=teacher_top1,
                               keep_top1=keep_top1)
    stats.update(params_total=total, params_active=active,
                 inference_tokens_per_s=round(inference_tokens_per_s(model, model.config.vocab_size, device), 1))
    return stats


def _draws(cache: CacheConfig, teacher: Teacher) -> tuple[Sampling | None, int]:
    """(how the signal draws from the teacher, None: it does not; its k)."""
    if getattr(teacher, "keep_dense", False):
        return None, cache.k
    reader = getattr(teacher, "reader", None)  # a cache: what it holds, whatever the config now says
    if reader is not None:
        return reader.sampling, reader.manifest["k"]
    # the live teacher draws or takes the top-k as the config says
    return (Sampling(cache.samples, cache.sample_temperature, 0, cache.exact_top)
            if cache.estimator == "sampled" else None), cache.k


def signal_description(cache: CacheConfig, teacher: Teacher) -> str:
    """What `teacher_top1_agreement` and `kl_to_teacher` compare with, in words for the report:
    a sampled signal's noise shows in the teacher's own row, which a reader should be told."""
    if getattr(teacher, "keep_dense", False):
        return "the teacher's whole distribution (exact)"
    draws, k = _draws(cache, teacher)
    if draws is not None:
        head = f"its top {draws.exact_top} exactly and " if draws.exact_top else ""
        return (f"{head}{draws.n} draws a token from the teacher at T = {draws.temperature:g} "
                f"(cache.estimator: sampled): agreement is with the most frequent draw and KL an unbiased "
                f"estimate at that temperature, so the teacher's own row shows the estimate's noise, not 1 and 0")
    return f"the teacher's top {k} log-probs, the rest of its mass as one outcome"


def _padding_note(teacher_model, vocab: int) -> str:
    """Why the teacher's own row is not 1 and 0 when its vocab is padded past the tokenizer's:
    its signal is cut to the tokenizer's ids and renormalised, its model is scored whole."""
    padded = teacher_model.config.get_text_config().vocab_size - vocab
    if padded <= 0:
        return ""
    return (f"; the signal spans the tokenizer's {vocab:,} tokens, the teacher's {padded:,} padding rows cut away and "
            f"the rest renormalised, so the teacher's own row shows the mass its model puts on those rows")


def _has_chat(data, held_out) -> bool:
    """Whether chat rows are scored (their assistant / completion tokens only).  The manifest
    counts them; without one, non-targets (marked negative, teachers/protocol.py) tell, as
    long as no row start is masked too (data.packing: documents masks those in text)."""
    splits = (data.manifest or {}).get("splits")
    if splits:
        return any(split.get("chat_rows") for split in splits.values())
    return bool((held_out[:, 1:] < 0).any())


def check_exports(cfg: RunConfig) -> None:
    """Every student's export, before any scoring (the teacher's row and each student before it
    can take many minutes): there, whole (`export_problems`: each file against the hash the
    export recorded), that student's, and said when older than its latest checkpoint.  Every
    problem found goes in one line."""
    layout = cfg.layout
    problems = []
    for sc in cfg.students:
        export_dir, redo = layout.export(sc.name), f"distill export {layout.student(sc.name)} --out {layout.export(sc.name)}"
        if not export_dir.is_dir() or not any(export_dir.iterdir()):
            problems.append(f"student {sc.name}: no export at {export_dir} (run `distill run`, or `{redo}`)")
        elif damage := export_problems(export_dir)[0]:
            more = f" and {len(damage) - 1} more" if len(damage) > 1 else ""
            problems.append(f"student {sc.name}: its export is damaged: {damage[0]}{more} (export it again: "
                            f"`{redo} --overwrite`)")
        else:
            try:
                _check_export_is_the_students(layout, sc.name)
            except UserError as e:
                problems.append(str(e))
    if problems:
        raise UserError("eval: " + "; ".join(problems))


def _check_export_is_the_students(layout, name: str) -> None:
    """The table scores OUT/students/NAME/export under NAME: it must be that student's (an
    export of another student copied there was scored under this name before), and an export
    older than the latest checkpoint is said (`distill train` alone does not re-export)."""
    meta = export_meta(layout.export(name))
    held = meta.get("student")
    if held is not None and held != name:
        raise UserError(f"student {name}: {layout.export(name)} holds an export of student {held}; export this "
                        f"student there: distill export {layout.student(name)} --out {layout.export(name)} --overwrite")
    latest = checkpoint.latest(layout.checkpoints(name))
    step = checkpoint.load_meta(latest).get("step") if latest is not None else None
    if step is not None and meta.get("step") is not None and meta["step"] != step:
        print(f"[eval] note: student {name}: its export is of step {meta['step']}, its latest checkpoint is step "
              f"{step}; scoring the export (distill export {layout.student(name)} --out {layout.export(name)} "
              f"to score the latest)", file=sys.stderr, flush=True)


def evaluate_run(cfg: RunConfig, progress: bool = True, data=None) -> dict:
    """data: the run's PackedData when the caller already has it (`distill run`).

    The held-out blocks are the first `train.eval_blocks` validation blocks, the same ones
    training validates on.  The table scores the exported model: for an fp32 export of a
    student without an expert bias it equals the last point of its validation curve; a bf16
    export rounds the weights, and a stock Llama 4 export drops the trained expert bias (its
    routing changes: see the export's routing note), so theirs can differ."""
    layout = cfg.layout
    check_exports(cfg)
    data = prepare(cfg, progress) if data is None else data
    device = resolve_device(cfg.train.device)
    held_out = first_blocks(data.val, cfg.train.eval_blocks)  # Blocks: their rows' position ids go along
    val_teacher, teacher_model = _val_teacher(cfg, data, device)
    chat = _has_chat(data, held_out)
    report: dict = {"teacher": {}, "students": {}, "data_fingerprint": data.fingerprint,
                    "val_blocks": len(held_out), "scored_tokens": "assistant / completion only" if chat else "all",
                    "teacher_signal": signal_description(cfg.cache, val_teacher)}
    scored = ScoredSoFar(layout.eval_progress, _eval_key(cfg, data, device), progress)  # an eval stopped part-way
    identities = {sc.name: _export_identity(layout, sc) for sc in cfg.students}
    unscored = [name for name, identity in identities.items() if scored.student(name, identity) is None]
    teacher_model = _score_teacher(cfg, data, held_out, val_teacher, teacher_model, device, report, progress, scored)
    judge = _generation_judge(cfg, data, teacher_model, device, report, progress, scored, bool(unscored)) if chat else None
    del teacher_model

    summary = json.loads(layout.train_summary.read_text()) if layout.train_summary.exists() else {}
    for sc in cfg.students:
        report["students"][sc.name] = _score_student(cfg, sc, held_out, val_teacher, judge, summary, device, progress,
                                                     scored, identities[sc.name])

    # Written once every model is scored, the report first: an eval stopped part-way leaves the
    # report and the model cards as the last whole eval wrote them, in agreement.
    atomic_write_json(layout.report_json, report)
    atomic_write_text(layout.report_md, render_markdown(report))
    histories = {sc.name: read_metrics(layout.metrics(sc.name)) for sc in cfg.students}
    plots.write_all(layout, histories, report)
    for name, stats in report["students"].items():
        _write_model_card(layout.export(name), name, stats)
    scored.finished()
    if progress:
        print(render_markdown(report))
    return report


def _val_teacher(cfg: RunConfig, data, device) -> tuple[Teacher, torch.nn.Module | None]:
    """(what agreement and KL are measured against: the cache's validation split, or the live
    teacher; the live teacher's model, evaluated rather than loaded twice: None for a cache
    or a server)."""
    if cfg.train.mode == "cached":
        check_cached_blocks(cfg.layout.cache, data)
        # made by this teacher, as `distill train` requires (a teacher whose weights are gone: the cache alone)
        here = cfg.teacher.source == "server" or (cfg.layout.teacher / "config.json").exists()
        identity = cache_identity(cfg, data) if cfg.teacher.source != "cache" and here else None
        return CachedTeacher(cfg.layout.cache, "val", identity), None
    live = scoring_teacher(cfg, data, device)
    return HeldOutSignals(live), live.model


# Held-out signals a live teacher computed, kept for the next model scored (CPU memory).
HELD_OUT_SIGNAL_BYTES = 2 << 30


class HeldOutSignals:
    """A live (or server) teacher whose signal for each held-out batch is kept, on the CPU, as
    the first model scored asks for it: every later model is scored against the kept signal,
    with no teacher forward (before: a teacher pass per student, and one more for the teacher's
    own row).  Up to HELD_OUT_SIGNAL_BYTES (a dense signal is V floats a token); batches past
    that are asked of the teacher each time.  Otherwise it is the teacher (keep_dense, ...)."""

    def __init__(self, teacher: Teacher):
        self.teacher, self.kept, self.held_bytes = teacher, {}, 0

    def __getattr__(self, name):
        return getattr(self.teacher, name)

    def signal(self, batch):
        key = tuple(batch.indices)
        if key in self.kept:
            return self.kept[key]
        sig, valid = self.teacher.signal(batch)
        sizes = [valid.numel()]
        sig.apply(lambda t: sizes.append(t.numel() * t.element_size()) or t)  # every tensor it holds
        if self.held_bytes + sum(sizes) <= HELD_OUT_SIGNAL_BYTES:
            self.kept[key] = (sig.apply(lambda t: t.cpu()), valid.cpu())
            self.held_bytes += sum(sizes)
        return sig, valid


def _score_teacher(cfg: RunConfig, data, held_out, val_teacher: Teacher, teacher_model, device, report: dict,
                   progress: bool, scored: "ScoredSoFar"):
    """The teacher's own row of the table (report["teacher"]), when its weights are here and fit
    one device -> the teacher model (loaded if it was not and the row is not `scored` already),
    or None."""
    layout = cfg.layout
    if cfg.teacher.sharding != "none":  # too large for one device by the user's own account
        if progress:
            print(f"[eval] teacher not evaluated: teacher.sharding={cfg.teacher.sharding}", file=sys.stderr)
        return teacher_model
    if not (layout.teacher / "config.json").exists():
        return teacher_model
    if scored.get("teacher") is not None:
        report["teacher"], report["teacher_signal"] = scored.get("teacher"), scored.get("teacher_signal")
        scored.say("the teacher")
        return teacher_model
    teacher_model = teacher_model or load_causal_lm(layout.teacher).to(device)
    vocab = vocab_size_of(data.tokenizer)
    # A sampled signal's most frequent draw is a noisy argmax: the teacher's own, recorded as its
    # row is scored (its ids past the tokenizer's cut as the signal cuts them), is what the
    # students' agreement compares with.
    sampled = _draws(cfg.cache, val_teacher)[0] is not None
    stats = _model_stats(teacher_model, held_out, val_teacher, device, "teacher", progress,
                         keep_top1=vocab if sampled else None)
    top1 = stats.pop("top1", None)
    stats.pop("expert_load", None)
    report["teacher"] = {"path": str(layout.teacher), **stats}
    report["teacher_signal"] += _padding_note(teacher_model, vocab)
    if top1 is not None:
        report["teacher_signal"] += ("; the students' agreement is with the teacher model's own argmax (exact), "
                                     "the teacher's row with the most frequent draw")
    scored.put(teacher=report["teacher"], teacher_signal=report["teacher_signal"],
               teacher_top1=None if top1 is None else ScoredSoFar.packed(top1))
    return teacher_model


def _score_student(cfg: RunConfig, sc, held_out, val_teacher: Teacher, judge, summary: dict, device,
                   progress: bool, scored: "ScoredSoFar", identity: str) -> dict:
    """One student's row of the table, from its export (whose model card gets the figures);
    identity: its export's (`_export_identity`), under which its scores are kept."""
    layout = cfg.layout
    export_dir = layout.export(sc.name)
    stats = scored.student(sc.name, identity)
    if stats is not None:
        scored.say(f"student {sc.name}")
    else:
        stats = _score_export(sc.name, layout, held_out, val_teacher, judge, device, progress, scored.teacher_top1())
        scored.put_student(sc.name, identity, stats)
    init = layout.init_report(sc.name)
    if init.exists():  # what the student was built from (train/setup.py)
        stats["init"] = summarise_init(json.loads(init.read_text()))
    meta = export_meta(export_dir)
    tokens, targets = _trained_counts(meta, summary.get("students_info", {}).get(sc.name, {}))
    stats.update(kind="baseline" if sc.baseline else "dense" if sc.model.preset == "dense_llama4" else sc.model.source,
                 step=meta.get("step"), train_tokens=tokens, train_targets=targets,
                 export_dir=str(export_dir.relative_to(layout.root)))
    if layout.data_report(sc.name).exists():  # which training blocks it learnt from (train/selection.py)
        stats["data"] = json.loads(layout.data_report(sc.name).read_text())
        stats["data_kept"] = stats["data"]["fraction_kept"]
    if layout.failure(sc.name).exists():  # dropped in training: these are its last good step's figures
        stats["failed"] = json.loads(layout.failure(sc.name).read_text())
    return stats


def _score_export(name: str, layout, held_out, val_teacher: Teacher, judge, device, progress: bool,
                  teacher_top1: torch.Tensor | None) -> dict:
    """What a student's export scores: held-out metrics, sizes, speed, and (chat data) its answers.
    teacher_top1: (N, T) the teacher model's argmax ids, for agreement (evaluate_model)."""
    export_dir = layout.export(name)
    try:  # checked up front (`check_exports`); what only loading finds (a missing weight), or a change since
        model = load_causal_lm(export_dir).to(device)
    except (ValueError, OSError) as e:
        raise UserError(f"eval: student {name}: its export cannot be loaded: {str(e).splitlines()[0][:300]} "
                        f"(export it again: distill export {layout.student(name)} --out {export_dir} "
                        f"--overwrite)") from None
    stats = _model_stats(model, held_out, val_teacher, device, f"student {name}", progress, teacher_top1=teacher_top1)
    if judge is not None:
        with progress_bar(2 * len(judge[2]), f"eval: student {name} answers", progress) as bar:
            stats["generation"] = generation.evaluate_generation(model, name, *judge, bar=bar)
    return stats


# What eval computes the same from the same inputs; raised when that changes, so scores kept
# by an eval stopped part-way under an older toolkit are not mixed into a new report.
EVAL_FORMAT = 1


def _eval_key(cfg: RunConfig, data, device) -> str:
    """What every model's scores depend on besides its own weights: the whole config but the
    students (the held-out blocks, the teacher and its signal, generation settings, seeds), the
    data's fingerprint and content, the device's model, the teacher's files and the cache's."""
    layout = cfg.layout
    parts = {"format": EVAL_FORMAT, "config": cfg.model_dump(mode="json", exclude={"students"}),
             "data": [data.fingerprint, data.content], "device": _device_name(device),
             "teacher_files": _files_identity(layout.teacher),
             "cache": _files_identity(layout.cache) if cfg.train.mode == "cached" else None}  # its shards too
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _device_name(device) -> str:
    """The device the scores (tokens/s above all) were measured on: its model, not just "cuda"."""
    if device.type == "cuda":
        return f"{device}: {torch.cuda.get_device_name(device)}"
    return str(device)


def _files_identity(root) -> list:
    """[name, size, mtime_ns] of each file in `root` (not below): a file written again, or
    another file, changes it."""
    if not root.is_dir():
        return []
    return [[f.name, f.stat().st_size, f.stat().st_mtime_ns] for f in sorted(root.iterdir()) if f.is_file()]


def _export_identity(layout, sc) -> str:
    """A student's export as eval scores it: its files' SHA-256 as the export recorded them (which
    `check_exports` checked; `distill run` exports again before each eval, to the same bytes), or
    for an export without them its files' sizes and times (the model card aside, which eval
    writes); and the student's config (its row's kind and name)."""
    export_dir = layout.export(sc.name)
    files = export_meta(export_dir).get("files") or [f for f in _files_identity(export_dir) if f[0] != "README.md"]
    return hashlib.sha256(json.dumps([files, sc.model_dump(mode="json")], default=str).encode()).hexdigest()[:16]


class ScoredSoFar:
    """The scores an eval stopped part-way (Ctrl-C, a preemption) had computed, kept in
    OUT/eval_progress.json after each model, so the same command resumes: each model is scored
    once.  They are reused only under the same `_eval_key` (a student's, under the same export
    identity too); once the report is written the file goes."""

    def __init__(self, path, key: str, progress: bool):
        self.path, self.progress, self._top1 = path, progress, None
        try:
            held = json.loads(path.read_text())
        except (OSError, ValueError):
            held = None
        if isinstance(held, dict) and held.get("key") == key:
            self.held = held
            return
        if held is not None and progress:
            print("[eval] the scores an eval stopped earlier kept are of other inputs (the config, data, teacher, "
                  "cache or device changed since): every model is scored again", file=sys.stderr, flush=True)
        self.held = {"key": key, "students": {}}

    def get(self, name: str):
        return self.held.get(name)

    def put(self, **values) -> None:
        self.held.update(values)
        atomic_write_json(self.path, self.held)

    def student(self, name: str, identity: str) -> dict | None:
        kept = self.held["students"].get(name)
        return dict(kept["stats"]) if kept and kept.get("identity") == identity else None

    def put_student(self, name: str, identity: str, stats: dict) -> None:
        self.held["students"][name] = {"identity": identity, "stats": dict(stats)}  # the scores alone
        self.put()

    @staticmethod
    def packed(ids: torch.Tensor) -> dict:
        """(N, T) int ids -> JSON: their shape and int32 bytes in base64 (a JSON list of 2M ids,
        rewritten after every model, was 20 MB)."""
        return {"shape": list(ids.shape), "int32": base64.b64encode(ids.to(torch.int32).numpy().tobytes()).decode()}

    def teacher_top1(self) -> torch.Tensor | None:
        """(N, T) the teacher model's argmax ids, where the signal's is a noisy estimate (`packed`
        in the file; decoded once)."""
        held = self.held.get("teacher_top1")
        if held is not None and self._top1 is None:
            ids = np.frombuffer(base64.b64decode(held["int32"]), dtype=np.int32).reshape(held["shape"])
            self._top1 = torch.from_numpy(ids.astype(np.int64))
        return self._top1

    def say(self, what: str) -> None:
        if self.progress:
            print(f"[eval] {what}: scored by the eval stopped earlier (the same inputs); kept", file=sys.stderr,
                  flush=True)

    def finished(self) -> None:
        self.path.unlink(missing_ok=True)


def _write_model_card(export_dir, name: str, stats: dict) -> None:
    """The export's README.md with the report's figures; an export removed while eval ran is
    said, not recreated as a dir holding a model card alone."""
    if not (export_dir / "config.json").exists():
        print(f"[eval] student {name}: its export {export_dir} was removed while eval ran; its model card was not "
              f"written (the report has its figures)", file=sys.stderr, flush=True)
        return
    card_metrics = {k: stats[k] for k in ("val_ppl", "teacher_top1_agreement", "kl_to_teacher", "params_total", "params_active")}
    atomic_write_text(export_dir / "README.md", model_card(name, export_meta(export_dir), card_metrics))


def _trained_counts(meta: dict, run_info: dict) -> tuple[int | None, int | None]:
    """(training tokens, training targets) of the scored export: its own, so an export of an
    earlier step is not paired with the run's last count.  An export made before its meta had
    counts takes the run's (run_info: train_summary's entry for the student).  An export whose
    meta has tokens but no targets came from a checkpoint that predates the target count: None,
    not the run's count of another step."""
    if "tokens_seen" not in meta:
        return run_info.get("tokens_seen"), run_info.get("targets_seen")
    return meta["tokens_seen"], meta.get("targets_seen")


def _generation_judge(cfg: RunConfig, data, teacher_model, device, report: dict, progress: bool,
                      scored: ScoredSoFar, students_to_score: bool):
    """Chat data: the held-out prompts, the teacher's greedy answers (report["generation"])
    and a dense-logit teacher to score the students' completions -> the arguments of
    `generation.evaluate_generation` after (model, name); None when there is nothing to do
    (every student `scored` already: the answers' figures are kept too)."""
    tok = data.tokenizer
    prompts = generation.held_out_prompts(cfg, tok, cfg.train.eval_prompts)
    kept = scored.get("generation")
    if kept is not None:
        report["generation"] = kept
    if not students_to_score:
        return None
    if teacher_model is None and cfg.teacher.sharding == "none" and (cfg.layout.teacher / "config.json").exists():
        teacher_model = load_causal_lm(cfg.layout.teacher).to(device)  # its row was kept: loaded for the answers
    if not prompts or teacher_model is None:
        if prompts and progress:
            print("[eval] no generation evaluation: no teacher model to score completions", file=sys.stderr)
        return None
    s = generation.GenSettings.of(cfg)
    teacher_greedy = scored.get("teacher_greedy")
    if teacher_greedy is None:
        with progress_bar(len(prompts), "eval: teacher answers", progress) as bar:
            teacher_greedy = generation.generate(teacher_model, [p.ids for p in prompts], tok, s, bar=bar)
        report["generation"] = {"prompts": len(prompts), "max_new_tokens": s.max_new_tokens,
                                "temperature": s.temperature, "top_p": s.top_p,
                                "teacher": generation.completion_stats(teacher_greedy, prompts, tok)}
        scored.put(teacher_greedy=teacher_greedy, generation=report["generation"])
    judge = LiveTeacher(teacher_model, cfg.cache.k, vocab_size_of(tok), device, keep_dense=True)
    return judge, tok, prompts, s, teacher_greedy


def summarise_init(info: dict) -> dict:
    """init.json -> the report's short form: the source, the kept layers and why, and
    what `init: teacher` copied (counts, with every tensor that was not and why)."""
    out = {k: info[k] for k in ("source", "path", "architecture", "layers", "layer_choice", "init") if info.get(k) is not None}
    if "copied" in info:
        out["copied_tensors"] = len(info["copied"])
        out["not_copied"] = info["not_copied"]
    return out


def _init_lines(report: dict) -> list[str]:
    lines = []
    for name, r in report["students"].items():
        init = r.get("init")
        if not init:
            continue
        text = f"- **{name}**: {init['source']}"
        if init.get("path"):
            text += f" `{init['path']}` ({init.get('architecture', '?')})"
        if init.get("layers") is not None:
            why = init.get("layer_choice", {})
            text += f"; teacher layers {init['layers']} ({why.get('method', 'given')}"
            text += f", dropped {why['dropped']})" if why.get("dropped") else ")"
            scores = why.get("distance_by_first_dropped_layer")
            if scores:  # every candidate block, by the first teacher layer it would drop
                text += "; distance by first dropped layer: " + ", ".join(f"{k}: {v:.4g}" for k, v in scores.items())
        if "copied_tensors" in init:
            skipped = init["not_copied"]
            text += f"; init: teacher copied {init['copied_tensors']} tensors, {len(skipped)} not"
            text += (" (" + "; ".join(f"{k}: {v}" for k, v in list(skipped.items())[:5])
                     + (" ..." if len(skipped) > 5 else "") + ")") if skipped else ""
        lines.append(text)
    return ["## Where each student came from", ""] + lines + [""] if lines else []


def _data_lines(report: dict) -> list[str]:
    """Per student: its data selection, what it kept, and the teacher's difficulty of the
    kept blocks (a histogram on the edges of all training blocks, so students compare)."""
    from distill.report.inspect import bars

    if all(r.get("data", {}).get("blocks_kept") == r.get("data", {}).get("blocks_total")
           for r in report["students"].values()):
        return []  # no selection: every student saw every block
    lines = []
    for name, r in report["students"].items():
        d = r.get("data")
        if not d:
            continue
        text = (f"- **{name}**: {d['rule']}: {d['blocks_kept']:,} of {d['blocks_total']:,} training blocks "
                f"({d['fraction_kept']:.1%})")
        if "tokens_kept" in d:
            text += f", {d['tokens_kept']:,} target tokens"
        for stat, h in sorted(d.get("difficulty", {}).items(), key=lambda kv: STATS.index(kv[0])):
            lo, hi = h["edges"]
            text += f"; teacher {stat} {h['mean']:.3g} `{lo:.3g} |{bars(h['counts'])}| {hi:.3g}`"
        lines.append(text)
    return ["## What data each student saw", "",
            "Teacher difficulty of each student's training blocks (mean over the blocks' targets; the histogram "
            "spans all training blocks):", ""] + lines + [""]


def render_markdown(report: dict) -> str:
    cols = ["kind", "params_total", "params_active", "val_ppl", "teacher_top1_agreement", "kl_to_teacher",
            "step", "train_tokens", "train_targets", "data_kept", "inference_tokens_per_s"]
    rows = [("teacher", {"kind": "teacher", **report["teacher"]})] if report.get("teacher") else []
    rows += list(report["students"].items())
    lines = ["# Co-distillation report", "",
             f"Held-out blocks: {report.get('val_blocks')}; data fingerprint `{report.get('data_fingerprint')}`; "
             f"tokens scored: {report.get('scored_tokens', 'all')}.", ""]
    if report.get("teacher_signal"):
        lines += [f"Agreement and KL to the teacher are measured against {report['teacher_signal']}.", ""]
    lines += ["| model | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for name, r in rows:
        cells = []
        for c in cols:
            v = r.get(c)
            cells.append("-" if v is None else f"{v:.4g}" if isinstance(v, float) else f"{v:,}" if isinstance(v, int) else str(v))
        lines.append(f"| {name}{' (failed)' if r.get('failed') else ''} | " + " | ".join(cells) + " |")
    lines += ["", "`inference_tokens_per_s`: prefill speed on the machine that ran eval (random tokens, batch 4 x 128, "
              "the median of forwards over at least 1 s); other work on that machine lowers it."]
    failed = {name: r["failed"] for name, r in report["students"].items() if r.get("failed")}
    if failed:
        lines += ["", "Failed students (dropped; their figures are from the checkpoint at the last good step):", ""]
        lines += [f"- **{name}**: failed at step {f['failed_at_step']}: {f['reason']} (checkpoint: step {f['step']})"
                  for name, f in failed.items()]
    lines += [""] + generation.markdown(report) + _data_lines(report) + _init_lines(report)
    moe = any(r.get("expert_load") for r in report["students"].values())  # plots.py draws it for them only
    lines += [f"Plots: `curves.png` (training and validation), `schedule.png` (hard/soft weights)"
              f"{', `expert_load.png` (MoE students)' if moe else ''}.", ""]
    return "\n".join(lines)

