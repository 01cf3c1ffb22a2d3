"""The report's plots (distill/report/plots.py): what each draws, read back from the Figure."""
from __future__ import annotations

from distill.report import plots


def _rows(w_soft: list[float], val_tokens: int | None = None) -> list[dict]:
    rows = [{"kind": "train", "step": i + 1, "w_soft": w, "w_hard": 1 - w, "hard": 2.0} for i, w in enumerate(w_soft)]
    return rows + ([{"kind": "val", "step": len(w_soft), "val_ppl": 9.0, "val_tokens": val_tokens}] if val_tokens else [])


def test_students_with_the_same_schedule_share_one_line(tmp_path):
    """Identical schedules were drawn once per student, each over the last: only the last
    student's name was to be seen."""
    histories = {"a": _rows([0.2, 0.5]), "b": _rows([0.2, 0.5]), "c": _rows([0.9, 0.9])}
    fig = plots.plot_schedule(tmp_path / "schedule.png", histories)
    labels = [line.get_label() for line in fig.axes[0].get_lines()]
    assert labels == ["a, b: w_soft", "a, b: w_hard", "c: w_soft", "c: w_hard"]
    assert list(fig.axes[0].get_lines()[1].get_ydata()) == [0.8, 0.5] and (tmp_path / "schedule.png").exists()


def test_the_teacher_line_says_when_the_report_scored_other_blocks_than_the_curves(tmp_path):
    histories = {"a": _rows([0.5], val_tokens=640), "b": _rows([0.5], val_tokens=640)}
    same = plots.plot_curves(tmp_path / "c.png", histories, {"val_ppl": 5.0, "val_tokens": 640})
    other = plots.plot_curves(tmp_path / "c.png", histories, {"val_ppl": 5.0, "val_tokens": 1280})
    label = [line.get_label() for line in same.axes[1].get_lines()][-1]
    assert label == "teacher"
    label = [line.get_label() for line in other.axes[1].get_lines()][-1]
    assert label == "teacher (the report's 1,280 held-out tokens, not the curves')"
    none = plots.plot_curves(tmp_path / "c.png", histories, {})
    assert [line.get_label() for line in none.axes[1].get_lines()] == ["a", "b"]


def test_expert_ticks_are_whole_experts(tmp_path):
    report = {"students": {"moe": {"expert_load": [[10, 30], [25, 15]]}, "dense": {}}}
    fig = plots.plot_expert_load(tmp_path / "e.png", report)
    ticks = [t for t in fig.axes[0].get_xticks() if -0.5 <= t <= 1.5]
    assert ticks and all(float(t).is_integer() for t in ticks), ticks
    assert plots.plot_expert_load(tmp_path / "none.png", {"students": {"dense": {}}}) is None
