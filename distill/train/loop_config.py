"""What the co-distillation loop is told: `LoopConfig`, and the run hash a checkpoint is
resumed by.  Apart from loop.py so that what the loop drives (on_policy.py) can read it."""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field


@dataclass
class LoopConfig:
    steps: int
    batch_size: int  # global blocks per step
    grad_accum: int
    eval_every: int
    eval_blocks: int
    checkpoint_every: int
    keep_last: int
    max_nonfinite: int
    seed: int
    run_hash: str  # identity of everything that shapes the trajectory
    earlier_run_hashes: tuple[str, ...] = ()  # the same run's hash under earlier rules: resumable too
    rank: int = 0
    world_size: int = 1
    # What run_hash was made of (named in a refused resume's line), and the prepared blocks'
    # content digest (a resume onto blocks prepared again, differently, is refused): both
    # checked by checkpoint.load, and recorded in every checkpoint's meta.
    run_identity: dict | None = None
    data_content: str | None = None
    extra_meta: dict = field(default_factory=dict)  # more for the checkpoints' meta (teacher, tokenizer, ...)
    on_student_failure: str = "stop"  # "stop" | "drop" (see drop_failed)
    selections: dict = field(default_factory=dict)  # student -> {"rule", "digest"} of its data view


def run_hash(*parts) -> str:
    text = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]
