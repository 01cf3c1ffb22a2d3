"""`distill eval`: teacher and students on the held-out split -> report.json, report.md, plots.

report.json:
  {"teacher": {...}, "students": {"NAME": {"kind": "scout|maverick|dense|baseline",
   "params_total", "params_active", "val_ppl", "teacher_top1_agreement", "kl_to_teacher",
   "train_tokens", "export_dir" (relative to OUT), "inference_tokens_per_s"}}}
"""
from __future__ import annotations

import json
import sys

from distill import plots
from distill.config import RunConfig
from distill.errors import UserError
from distill.evaluate import evaluate_model, inference_tokens_per_s
from distill.engine import resolve_device
from distill.export import model_card
from distill.fsutil import atomic_write_json, atomic_write_text
from distill.metrics import metrics_path, read_metrics

KIND_OF_PRESET = {"scout": "scout", "maverick": "maverick", "dense": "dense", "dense_llama4": "dense",
                  "behemoth": "behemoth"}


def _model_stats(model, blocks, signal_fn, device, eval_blocks: int) -> dict:
    from students.build import expert_load
    from students.presets import param_counts

    total, active = param_counts(model.config)
    stats = evaluate_model(model, blocks[:eval_blocks], signal_fn, device=device)
    stats.update(params_total=total, params_active=active,
                 inference_tokens_per_s=round(inference_tokens_per_s(model, model.config.vocab_size, device), 1))
    loads = expert_load(model)  # counts from the last evaluation batch, per MoE layer
    if loads:
        stats["expert_load"] = [l.tolist() for l in loads]
    return stats


def evaluate_run(cfg: RunConfig, progress: bool = True, data=None) -> dict:
    """data: the run's PackedData when the caller already has it (`distill run`)."""
    from distill.pipeline import live_teacher, prepare
    from students.build import load_causal_lm
    from teachers import CachedTeacher, LiveTeacher

    data = prepare(cfg, progress) if data is None else data
    device = resolve_device(cfg.train.device)
    if cfg.train.mode == "cached":
        val_source = CachedTeacher(cfg.cache_dir, "val")
    else:
        val_source = live_teacher(cfg, data, device)
    report: dict = {"teacher": {}, "students": {}, "data_fingerprint": data.fingerprint,
                    "val_blocks": min(cfg.train.eval_blocks * 4, len(data.val))}
    n_eval = report["val_blocks"]
    if cfg.teacher.sharding != "none":  # too large for one device by the user's own account
        if progress:
            print(f"[eval] teacher not evaluated: teacher.sharding={cfg.teacher.sharding}", file=sys.stderr)
    elif cfg.teacher_dir.is_dir() and (cfg.teacher_dir / "config.json").exists():
        # Online mode already holds the teacher: evaluate that one rather than load a twin.
        if isinstance(val_source, LiveTeacher):
            teacher = val_source.model
        else:
            teacher = load_causal_lm(cfg.teacher_dir).to(device)
        report["teacher"] = {"path": str(cfg.teacher_dir), **_model_stats(teacher, data.val, val_source.signal, device, n_eval)}
        report["teacher"].pop("expert_load", None)
        del teacher

    summary_path = cfg.out_dir / "train_summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.exists() else {}
    for sc in cfg.students:
        sdir = cfg.out_dir / "students" / sc.name
        export_dir = sdir / "export"
        if not (export_dir / "config.json").exists():
            raise UserError(f"student {sc.name}: no export at {export_dir}; run `distill run` or `distill export`")
        model = load_causal_lm(export_dir).to(device)
        stats = _model_stats(model, data.val, val_source.signal, device, n_eval)
        stats.update(kind="baseline" if sc.baseline else KIND_OF_PRESET.get(sc.model.preset, sc.model.preset),
                     train_tokens=summary.get("students_info", {}).get(sc.name, {}).get("tokens_seen"),
                     export_dir=str(export_dir.relative_to(cfg.out_dir)))
        report["students"][sc.name] = stats
        meta = json.loads((export_dir / "distill_meta.json").read_text()) if (export_dir / "distill_meta.json").exists() else {}
        card_metrics = {k: stats[k] for k in ("val_ppl", "teacher_top1_agreement", "kl_to_teacher", "params_total", "params_active")}
        atomic_write_text(export_dir / "README.md", model_card(sc.name, meta, card_metrics))
        del model

    atomic_write_json(cfg.out_dir / "report.json", report)
    atomic_write_text(cfg.out_dir / "report.md", render_markdown(report))
    histories = {sc.name: read_metrics(metrics_path(cfg.out_dir, sc.name)) for sc in cfg.students}
    plots.write_all(cfg.out_dir, histories, report, cfg)
    if progress:
        print(render_markdown(report))
    return report


def render_markdown(report: dict) -> str:
    cols = ["kind", "params_total", "params_active", "val_ppl", "teacher_top1_agreement", "kl_to_teacher",
            "train_tokens", "inference_tokens_per_s"]
    rows = [("teacher", {"kind": "teacher", **report["teacher"]})] if report.get("teacher") else []
    rows += list(report["students"].items())
    lines = ["# Co-distillation report", "",
             f"Held-out blocks: {report.get('val_blocks')}; data fingerprint `{report.get('data_fingerprint')}`.", "",
             "| model | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for name, r in rows:
        cells = []
        for c in cols:
            v = r.get(c)
            cells.append("-" if v is None else f"{v:.4g}" if isinstance(v, float) else f"{v:,}" if isinstance(v, int) else str(v))
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += ["", "Plots: `curves.png` (training and validation), `schedule.png` (hard/soft weights), "
              "`expert_load.png` (MoE students).", ""]
    return "\n".join(lines)

