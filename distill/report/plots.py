"""PNG plots for the report: who learned what, at a glance.

curves.png       training loss and validation perplexity per student (teacher ppl as a line)
schedule.png     w_hard(t) and mean w_soft(t) actually used, per student
expert_load.png  share of tokens per expert, per MoE layer, per MoE student, on the
                 report's held-out blocks
"""
from __future__ import annotations

from pathlib import Path

from distill.layout import PLOTS, RunLayout

# Each plot_* writes its PNG and returns the matplotlib Figure (None when there is nothing to draw).


def _series(rows: list[dict], kind: str, key: str):
    pts = [(r["step"], r[key]) for r in rows if r.get("kind") == kind and isinstance(r.get(key), (int, float))]
    return [p[0] for p in pts], [p[1] for p in pts]


def _teacher_line_label(histories: dict[str, list[dict]], teacher: dict) -> str:
    """The teacher's perplexity is the report's, on its held-out blocks; the curves are training's
    validations, on the first `train.eval_blocks`: said where an eval with another count scored it."""
    last_validations = []
    for rows in histories.values():
        val = [r for r in rows if r.get("kind") == "val"]
        if val:
            last_validations.append(val[-1].get("val_tokens"))
    if all(tokens == teacher.get("val_tokens") for tokens in last_validations):
        return "teacher"
    return f"teacher (the report's {teacher.get('val_tokens', 0):,} held-out tokens, not the curves')"


def plot_curves(out: Path, histories: dict[str, list[dict]], teacher: dict):
    """teacher: the report's teacher row ({} when not evaluated)."""
    # Figure objects, not pyplot: no global backend or figure state.  Imported here (about
    # 1 s), not by every command that imports the report.
    from matplotlib.figure import Figure

    fig = Figure(figsize=(12, 4.5))
    ax_loss, ax_ppl = fig.subplots(1, 2)
    for name, rows in histories.items():
        ax_loss.plot(*_series(rows, "train", "hard"), label=f"{name} (CE part)", lw=1)
        ax_ppl.plot(*_series(rows, "val", "val_ppl"), marker="o", label=name)
    if teacher.get("val_ppl"):
        ax_ppl.axhline(teacher["val_ppl"], color="k", ls="--", lw=1, label=_teacher_line_label(histories, teacher))
    ax_loss.set(title="training: hard-target CE per token", xlabel="step", ylabel="nats")
    ax_ppl.set(title="validation perplexity (lower is better)", xlabel="step", ylabel="ppl", yscale="log")
    for ax in (ax_loss, ax_ppl):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    return fig


def schedule_groups(histories: dict[str, list[dict]]) -> dict[str, tuple]:
    """{"a, b": (steps, w_soft, w_hard's steps, w_hard)}: students whose weights over training are
    the same share a line (drawn once each, the last hid the others)."""
    groups: dict[tuple, list[str]] = {}
    for name, rows in histories.items():
        steps, w_soft = _series(rows, "train", "w_soft")
        if steps:
            key = (tuple(steps), tuple(w_soft), *map(tuple, _series(rows, "train", "w_hard")))
            groups.setdefault(key, []).append(name)
    return {", ".join(names): key for key, names in groups.items()}


def plot_schedule(out: Path, histories: dict[str, list[dict]]):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4))
    ax = fig.subplots()
    for names, (steps, w_soft, hard_steps, w_hard) in schedule_groups(histories).items():
        line, = ax.plot(steps, w_soft, label=f"{names}: w_soft")
        ax.plot(hard_steps, w_hard, ls="--", color=line.get_color(), label=f"{names}: w_hard")
    ax.set(title="hard/soft loss weights over training", xlabel="step", ylabel="weight", ylim=(-0.05, 1.05))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    return fig


def plot_expert_load(out: Path, report: dict):
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    moe = {n: r["expert_load"] for n, r in report["students"].items() if r.get("expert_load")}
    if not moe:
        return None
    fig = Figure(figsize=(6 * len(moe), 3.5))
    axes = fig.subplots(1, len(moe), squeeze=False)
    for ax, (name, loads) in zip(axes[0], moe.items()):
        shares = [[c / max(sum(layer), 1) for c in layer] for layer in loads]
        im = ax.imshow(shares, aspect="auto", cmap="viridis")
        ax.set(title=f"{name}: token share per expert", xlabel="expert", ylabel="MoE layer (in order)")
        ax.set_yticks(range(len(shares)))
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # experts are whole: no tick at 0.5
        fig.colorbar(im, ax=ax)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    return fig


def write_all(layout: RunLayout, histories: dict[str, list[dict]], report: dict) -> list[Path]:
    paths = [layout.plot(name) for name in PLOTS]
    plot_curves(paths[0], histories, report.get("teacher") or {})
    plot_schedule(paths[1], histories)
    plot_expert_load(paths[2], report)
    return [p for p in paths if p.exists()]
