"""PNG plots for the report: who learned what, at a glance.

curves.png       training loss and validation perplexity per student (teacher ppl as a line)
schedule.png     w_hard(t) and mean w_soft(t) actually used, per student
expert_load.png  share of tokens per expert, per MoE layer, per MoE student, on the
                 report's held-out blocks
"""
from __future__ import annotations

from pathlib import Path

from distill.layout import PLOTS, RunLayout


def _series(rows: list[dict], kind: str, key: str):
    pts = [(r["step"], r[key]) for r in rows if r.get("kind") == kind and isinstance(r.get(key), (int, float))]
    return [p[0] for p in pts], [p[1] for p in pts]


def plot_curves(out: Path, histories: dict[str, list[dict]], teacher_ppl: float | None) -> None:
    # Figure objects, not pyplot: no global backend or figure state.  Imported here (about
    # 1 s), not by every command that imports the report.
    from matplotlib.figure import Figure

    fig = Figure(figsize=(12, 4.5))
    ax_loss, ax_ppl = fig.subplots(1, 2)
    for name, rows in histories.items():
        ax_loss.plot(*_series(rows, "train", "hard"), label=f"{name} (CE part)", lw=1)
        ax_ppl.plot(*_series(rows, "val", "val_ppl"), marker="o", label=name)
    if teacher_ppl:
        ax_ppl.axhline(teacher_ppl, color="k", ls="--", lw=1, label="teacher")
    ax_loss.set(title="training: hard-target CE per token", xlabel="step", ylabel="nats")
    ax_ppl.set(title="validation perplexity (lower is better)", xlabel="step", ylabel="ppl", yscale="log")
    for ax in (ax_loss, ax_ppl):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=110)


def plot_schedule(out: Path, histories: dict[str, list[dict]]) -> None:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4))
    ax = fig.subplots()
    for name, rows in histories.items():
        steps, w_soft = _series(rows, "train", "w_soft")
        if steps:
            line, = ax.plot(steps, w_soft, label=f"{name}: w_soft")
            ax.plot(*_series(rows, "train", "w_hard"), ls="--", color=line.get_color(), label=f"{name}: w_hard")
    ax.set(title="hard/soft loss weights over training", xlabel="step", ylabel="weight", ylim=(-0.05, 1.05))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=110)


def plot_expert_load(out: Path, report: dict) -> None:
    from matplotlib.figure import Figure

    moe = {n: r["expert_load"] for n, r in report["students"].items() if r.get("expert_load")}
    if not moe:
        return
    fig = Figure(figsize=(6 * len(moe), 3.5))
    axes = fig.subplots(1, len(moe), squeeze=False)
    for ax, (name, loads) in zip(axes[0], moe.items()):
        shares = [[c / max(sum(layer), 1) for c in layer] for layer in loads]
        im = ax.imshow(shares, aspect="auto", cmap="viridis")
        ax.set(title=f"{name}: token share per expert", xlabel="expert", ylabel="MoE layer (in order)")
        ax.set_yticks(range(len(shares)))
        fig.colorbar(im, ax=ax)
    fig.tight_layout()
    fig.savefig(out, dpi=110)


def write_all(layout: RunLayout, histories: dict[str, list[dict]], report: dict) -> list[Path]:
    paths = [layout.plot(name) for name in PLOTS]
    plot_curves(paths[0], histories, report.get("teacher", {}).get("val_ppl"))
    plot_schedule(paths[1], histories)
    plot_expert_load(paths[2], report)
    return [p for p in paths if p.exists()]
