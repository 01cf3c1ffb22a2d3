"""Per-step metrics: JSONL per student (and TensorBoard when installed), plus progress bars.

OUT/students/NAME/metrics.jsonl holds one JSON object a line:
    {"step": 10, "kind": "train", "loss": ..., "hard": ..., "soft": ..., "w_hard": ..., ...}
On resume, lines past the resumed step are dropped so the file matches the weights.
"""
from __future__ import annotations

import contextlib
import json
import time
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from distill.layout import RunLayout


def read_metrics(path: Path) -> list[dict]:
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            break  # a torn last line from a crash
    return rows


class MetricsLogger:
    def __init__(self, layout: RunLayout, names: list[str], start_step: int, enabled: bool = True):
        self.enabled = enabled
        self.last: dict[str, dict] = {}
        self.files = {}
        self.tb = {}
        if not enabled:
            return
        for name in names:
            path = layout.metrics(name)
            path.parent.mkdir(parents=True, exist_ok=True)
            kept = [r for r in read_metrics(path) if r.get("step", 0) <= start_step]
            path.write_text("".join(json.dumps(r) + "\n" for r in kept))
            self.files[name] = open(path, "a", buffering=1)
            with contextlib.suppress(ImportError):
                from torch.utils.tensorboard import SummaryWriter

                self.tb[name] = SummaryWriter(str(layout.tensorboard(name)), purge_step=start_step + 1)

    def log(self, name: str, step: int, values: dict, kind: str = "train") -> None:
        if not self.enabled:
            return
        row = {"step": step, "kind": kind, **values}
        self.last[name] = row
        self.files[name].write(json.dumps(row) + "\n")
        if name in self.tb:
            for k, v in values.items():
                if isinstance(v, (int, float)):
                    self.tb[name].add_scalar(f"{kind}/{k}", v, step)

    def close(self) -> None:
        for f in self.files.values():
            f.close()
        for w in self.tb.values():
            w.close()


class _Bar:
    def __init__(self, progress: Progress | None, task):
        self.progress, self.task = progress, task

    def update(self, n: int, losses: dict | None = None, info: str | None = None) -> None:
        if self.progress is None:
            return
        desc = info if info is not None else "  ".join(f"{k}={v:.3f}" for k, v in (losses or {}).items()
                                                       if isinstance(v, float))
        self.progress.update(self.task, advance=n, info=desc)


# Where output is no terminal (nohup, a SLURM log), a line this often instead of a live bar,
# which rich would show only once, at the end.
PLAIN_PROGRESS_SECONDS = 30.0


def _hms(seconds: float) -> str:
    m, s = divmod(int(seconds), 60)
    return f"{m // 60}:{m % 60:02d}:{s:02d}"


class _Lines:
    """Progress as a plain line every PLAIN_PROGRESS_SECONDS (and at the end), for logs."""

    def __init__(self, total: int, label: str, completed: int, console):
        self.total, self.label, self.done, self.console = total, label, completed, console
        self.t0 = self.last = time.monotonic()
        self.first = completed  # a resumed run's rate counts only this run's work

    def update(self, n: int, losses: dict | None = None, info: str | None = None) -> None:
        self.done += n
        now = time.monotonic()
        if now - self.last < PLAIN_PROGRESS_SECONDS and self.done < self.total:
            return
        self.last = now
        desc = info if info is not None else "  ".join(f"{k}={v:.3f}" for k, v in (losses or {}).items()
                                                       if isinstance(v, float))
        elapsed = now - self.t0
        rate = (self.done - self.first) / elapsed if elapsed > 0 else 0.0
        left = f", {_hms((self.total - self.done) / rate)} left" if rate > 0 and self.done < self.total else ""
        line = (f"{self.label} {self.done:,}/{self.total:,} ({self.done / max(self.total, 1):.0%}), "
                f"{_hms(elapsed)} elapsed{left}  {desc}")
        self.console.out(line.rstrip(), highlight=False)


@contextlib.contextmanager
def progress_bar(total: int, label: str, enabled: bool, completed: int = 0):
    """A rich progress bar (no-op when disabled or quiet); plain lines where the output is no
    terminal."""
    if not enabled:
        yield _Bar(None, None)
        return
    console = Console()
    if not console.is_terminal:
        yield _Lines(total, label, completed, console)
        return
    cols = [TextColumn(f"[bold]{label}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
            TimeRemainingColumn(), TextColumn("{task.fields[info]}")]
    with Progress(*cols, transient=False) as p:
        task = p.add_task(label, total=total, completed=completed, info="")
        yield _Bar(p, task)
