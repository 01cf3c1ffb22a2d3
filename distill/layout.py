"""`RunLayout`: every path a run reads or writes, named in one place.

    OUT/
      tokenizer/                  trained BPE (unless data.tokenizer.path is given)
      data/blocks-FP/             packed token blocks in shards + manifest.json, FP = data fingerprint
      teacher/                    pretrained preset teacher (unless teacher.path is given)
      pretrain/                   the teacher's pretraining run: a RunLayout of its own
      cache/                      the teacher-signal cache (unless cache.dir is given)
      students/NAME/
        checkpoints/step_N/       weights, training state, meta (+ deepspeed/ shards)
        export/                   the Hugging Face model dir
        metrics.jsonl             one JSON object per logged step
        failed.json               present once the student failed: step, reason, traceback (kept dropped)
      students/committed.json     each student's last committed checkpoint step (written after all saves)
      replaced-TIME/              an earlier run moved aside by `--overwrite`
      tensorboard/NAME/
      train_summary.json  report.json  report.md  curves.png  schedule.png  expert_load.png
      eval_progress.json          the scores of an eval stopped part-way, which the same command resumes from
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

PLOTS = ("curves.png", "schedule.png", "expert_load.png")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")  # fast, or slow (sentencepiece) with its config


def has_tokenizer(path) -> bool:
    """Whether a dir holds a saved Hugging Face tokenizer (what AutoTokenizer loads)."""
    return path is not None and any((Path(path) / name).exists() for name in TOKENIZER_FILES)


@dataclass(frozen=True)
class RunLayout:
    root: Path
    teacher_path: Path | None = None  # teacher.path: a checkpoint outside the run
    cache_path: Path | None = None  # cache.dir: a cache outside the run
    tokenizer_path: Path | None = None  # data.tokenizer.path: a tokenizer outside the run

    @property
    def teacher(self) -> Path:
        return self.teacher_path or self.root / "teacher"

    @property
    def cache(self) -> Path:
        return self.cache_path or self.root / "cache"

    @property
    def tokenizer(self) -> Path:
        return self.tokenizer_path or self.root / "tokenizer"

    def packed_blocks(self, fingerprint: str) -> Path:
        return self.root / "data" / f"blocks-{fingerprint}"

    @property
    def pretrain(self) -> "RunLayout":
        """The teacher's pretraining run keeps its checkpoints and metrics apart."""
        return RunLayout(self.root / "pretrain")

    def student(self, name: str) -> Path:
        return self.root / "students" / name

    @property
    def students(self) -> Path:
        return self.root / "students"

    def checkpoints(self, name: str) -> Path:
        return self.student(name) / "checkpoints"

    def export(self, name: str) -> Path:
        return self.student(name) / "export"

    def init_report(self, name: str) -> Path:
        """What the student was built from and what init: teacher copied (train/setup.py)."""
        return self.student(name) / "init.json"

    def data_report(self, name: str) -> Path:
        """What data the student learns from: its selection and the kept blocks' difficulty."""
        return self.student(name) / "data.json"

    def metrics(self, name: str) -> Path:
        return self.student(name) / "metrics.jsonl"

    def failure(self, name: str) -> Path:
        """The record of a student's failure; while it exists the student is not trained."""
        return self.student(name) / "failed.json"

    def tensorboard(self, name: str) -> Path:
        return self.root / "tensorboard" / name

    @property
    def train_summary(self) -> Path:
        return self.root / "train_summary.json"

    @property
    def report_json(self) -> Path:
        return self.root / "report.json"

    @property
    def report_md(self) -> Path:
        return self.root / "report.md"

    @property
    def eval_progress(self) -> Path:
        """What an eval stopped part-way had scored (distill/report/report.py::ScoredSoFar)."""
        return self.root / "eval_progress.json"

    def plot(self, name: str) -> Path:
        return self.root / name

    def earlier_run_artifacts(self) -> list[Path]:
        """What one training run writes under OUT (beside the shared data, tokenizer, teacher
        and cache): moved aside whole when a fresh run replaces it (`--overwrite`)."""
        return [self.students, self.root / "tensorboard", self.train_summary, self.report_json, self.report_md,
                self.eval_progress, *(self.plot(name) for name in PLOTS)]
