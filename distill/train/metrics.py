"""Per-step metrics: JSONL per student (and TensorBoard when installed).

OUT/students/NAME/metrics.jsonl holds one JSON object a line:
    {"step": 10, "kind": "train", "loss": ..., "hard": ..., "soft": ..., "w_hard": ..., ...}
On resume, lines past the resumed step are dropped so the file matches the weights.
"""
from __future__ import annotations

import contextlib
import json
from pathlib import Path

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
