"""Progress of long work: a rich bar on a terminal, a plain line every PLAIN_PROGRESS_SECONDS
in a log (nohup, a SLURM job), nothing under --quiet.  Training, data preparation and the
cache's teacher pass show one each."""
from __future__ import annotations

import contextlib
import time

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn


def _describe(losses: dict | None, info: str | None) -> str:
    """The bar's trailing text: `info` as given, else each float of `losses` as name=value."""
    if info is not None:
        return info
    return "  ".join(f"{k}={v:.3f}" for k, v in (losses or {}).items() if isinstance(v, float))


class _Bar:
    def __init__(self, progress: Progress | None, task):
        self.progress, self.task = progress, task

    def update(self, n: int, losses: dict | None = None, info: str | None = None) -> None:
        if self.progress is None:
            return
        self.progress.update(self.task, advance=n, info=_describe(losses, info))


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
        finishing = n > 0 and self.done >= self.total  # the last unit of work: said at once
        if now - self.last < PLAIN_PROGRESS_SECONDS and not finishing:
            return
        self.last = now
        desc = _describe(losses, info)
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
