"""The co-distillation loop: one teacher signal per batch, handed to every student.

    for step in steps:
        batch   = the step's blocks (a seeded permutation per epoch: resumable exactly)
        signal  = teacher.signal(batch)         # 1 cache read or 1 teacher forward
        for student in students:
            student.train_step(step, [MicroBatch(batch, signal, valid)])
        students that failed: checkpoint everyone, drop them (or stop the run)
        log, validate, checkpoint

SIGINT/SIGTERM finish the current step, checkpoint every student and exit; under several
ranks the flag is all-reduced each step, so every rank stops after the same step.
A student fails when its step raises (out of memory, say) or it passes
`max_nonfinite` skipped steps; see `drop_failed`.
"""
from __future__ import annotations

import hashlib
import json
import signal as signals
import sys
import traceback
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from common.errors import UserError
from common.fsutil import atomic_write_json
from distill.layout import RunLayout
from distill.train import checkpoint
from distill.train.metrics import MetricsLogger, progress_bar
from distill.train.student import MicroBatch, Student
from distill.train.validate import evaluate_model
from teachers import Batch, Teacher


class TrainingInterrupted(UserError):
    """SIGINT/SIGTERM: checkpoints were written; rerun with --resume."""

    exit_code = 130


class TrainingAborted(UserError):
    """A student failed (on_student_failure=stop), or none is left: every student checkpointed."""

    exit_code = 3


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
    rank: int = 0
    world_size: int = 1
    extra_meta: dict = field(default_factory=dict)
    on_student_failure: str = "stop"  # "stop" | "drop" (see drop_failed)


def run_hash(*parts) -> str:
    text = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def batch_indices(step: int, batch_size: int, n_blocks: int, seed: int) -> list[int]:
    """Blocks for `step`: consecutive slices of a per-epoch seeded permutation."""
    out: list[int] = []
    pos = step * batch_size
    while len(out) < batch_size:
        epoch, offset = divmod(pos, n_blocks)
        g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
        perm = torch.randperm(n_blocks, generator=g)
        take = min(batch_size - len(out), n_blocks - offset)
        out += perm[offset: offset + take].tolist()
        pos += take
    return out


class _StopFlag:
    """Turns SIGINT/SIGTERM into a flag the loop checks between steps."""

    def __init__(self):
        self.signum: int | None = None

    def __enter__(self):
        self._old = {s: signals.signal(s, self._handle) for s in (signals.SIGINT, signals.SIGTERM)}
        return self

    def _handle(self, signum, frame):
        self.signum = signum

    def __exit__(self, *exc):
        for s, h in self._old.items():
            signals.signal(s, h)
        return False


def agreed_stop(signum: int | None, loop: LoopConfig, students: list[Student]) -> int | None:
    """A signal on any rank stops every rank after the same step: the largest signal number
    seen (0: none) is all-reduced once per step, so no rank waits in a checkpoint barrier while
    another is already in the next step's collectives."""
    if loop.world_size == 1:
        return signum
    device = students[0].device if students else torch.device("cpu")
    flag = torch.tensor([float(signum or 0)], device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return int(flag.item()) or None


def save_all(layout: RunLayout, students: list[Student], step: int, loop: LoopConfig) -> None:
    """Every rank calls it (DeepSpeed writes partitions from each rank and, under ZeRO-3,
    gathers the whole model for rank 0's model.safetensors)."""
    if loop.world_size > 1:
        dist.barrier()
    for s in students:
        meta = {"student": s.name, "run_hash": loop.run_hash, "student_config": s.cfg.model_dump(mode="json"),
                "tokens_seen": s.tokens_seen, **loop.extra_meta}
        root = layout.checkpoints(s.name)
        s.engine.save_sharded(root, tag=f"step_{step:08d}")
        weights = s.engine.full_state_dict()  # collective under ZeRO-3
        if loop.rank == 0:
            checkpoint.save(root, step, s.model, {**s.state(), "rng": checkpoint.rng_state()},
                            meta, loop.keep_last, weights=weights)
    if loop.world_size > 1:
        dist.barrier()


def failures(layout: RunLayout, names: list[str]) -> dict[str, dict]:
    """The failure record of each named student that has one (see `drop_failed`)."""
    return {n: json.loads(layout.failure(n).read_text()) for n in names if layout.failure(n).exists()}


def resume_all(layout: RunLayout, students: list[Student], loop: LoopConfig) -> tuple[int, list[Student]]:
    """Load every live student's latest checkpoint; all must be at the same step.  A student
    with a failure record stays dropped.  Returns (step, the students still training)."""
    dropped = failures(layout, [s.name for s in students])
    students = [s for s in students if s.name not in dropped]
    if not students:
        raise TrainingAborted(f"every student failed in an earlier run ({', '.join(sorted(dropped))}; see "
                              f"failed.json under {layout.students}); start a new out_dir")
    latest = {s.name: checkpoint.latest(layout.checkpoints(s.name)) for s in students}
    if all(p is None for p in latest.values()):
        return 0, students
    steps = {name: (checkpoint.load_meta(p)["step"] if p else 0) for name, p in latest.items()}
    if len(set(steps.values())) != 1:
        raise UserError(f"students' checkpoints are at different steps {steps}; remove the newer ones "
                        f"or start a new out_dir")
    rng = None
    for s in students:
        # Under ZeRO-3 the model's weights are partitions: DeepSpeed's own checkpoint restores them.
        weights_too = getattr(s.engine, "zero_stage", 0) < 3
        state = checkpoint.load(latest[s.name], s.model if weights_too else None, loop.run_hash)
        s.load_state(state)
        s.engine.load_sharded(layout.checkpoints(s.name), tag=latest[s.name].name)
        rng = state["rng"]
    checkpoint.set_rng_state(rng)
    return next(iter(steps.values())), students


def drop_failed(students: list[Student], failed: dict[str, str], step: int, loop: LoopConfig,
                layout: RunLayout, logger: MetricsLogger, traces: dict[str, str]) -> list[Student]:
    """`failed` (name -> reason) failed in step `step` (0-based).  First every healthy student
    is checkpointed at step+1 and each failed one at `step`, its last good step (a failed step
    never updated its weights: a non-finite step is skipped, an exception stops before or in
    the optimiser step); then each failure is recorded (metrics row, failed.json) so a resume
    keeps it dropped.  Returns the healthy students, or raises TrainingAborted (exit 3) when
    on_student_failure is "stop" or none is left."""
    healthy = [s for s in students if s.name not in failed]
    broken = [s for s in students if s.name in failed]
    for s in broken:
        s.model.zero_grad(set_to_none=True)  # a half-done backward's grads: free them first
    save_all(layout, healthy, step + 1, loop)
    save_all(layout, broken, step, loop)
    for s in broken:
        record = {"step": step, "failed_at_step": step + 1, "reason": failed[s.name],
                  **({"traceback": traces[s.name]} if s.name in traces else {})}
        logger.log(s.name, step + 1, {"failed": True, "reason": failed[s.name]}, kind="failed")
        if loop.rank == 0:
            atomic_write_json(layout.failure(s.name), record)
            print(f"[train] student {s.name} failed at step {step + 1}: {failed[s.name]}; checkpointed at "
                  f"step {step}", file=sys.stderr, flush=True)
    names = ", ".join(sorted(failed))
    if loop.on_student_failure == "stop" or not healthy:
        raise TrainingAborted(
            f"student {names} failed at step {step + 1} ({'; '.join(failed.values())}); stopped. Every other "
            f"student is checkpointed at step {step + 1}, {names} at step {step}. --resume goes on without "
            f"{names} (it stays dropped); train.on_student_failure: drop lets the others finish in one run")
    return healthy


def step_batches(step: int, loop: LoopConfig, train_blocks: torch.Tensor) -> list[Batch]:
    """This rank's micro-batches of `step`: the global batch's blocks, split into
    `grad_accum` micro-batches, each strided over the data-parallel ranks."""
    idx = batch_indices(step, loop.batch_size, len(train_blocks), loop.seed)
    micro = loop.batch_size // loop.grad_accum
    mine = [idx[m * micro:(m + 1) * micro][loop.rank::loop.world_size] for m in range(loop.grad_accum)]
    return [Batch.of(train_blocks[ids], ids) for ids in mine]


def train_loop(students: list[Student], teacher: Teacher | None, train_blocks: torch.Tensor,
               val_blocks: torch.Tensor, val_teacher: Teacher | None, loop: LoopConfig, layout: RunLayout,
               resume: bool, progress: bool, label: str = "co-distilling") -> dict:
    """Train every student for `loop.steps`; returns the final validation metrics per student.

    train_blocks, val_blocks: (N, T+1) token ids.  teacher None: CE-only training (the
    teacher's own pretraining)."""
    names = [s.name for s in students]
    start, students = resume_all(layout, students, loop) if resume else (0, students)
    if not resume and loop.rank == 0:
        for s in students:  # a fresh run retries every student
            layout.failure(s.name).unlink(missing_ok=True)
    logger = MetricsLogger(layout, [s.name for s in students], start, enabled=loop.rank == 0)
    final_eval: dict = {}
    teacher_calls = 0  # teacher forwards made for training batches (evaluation excluded)
    upcoming = step_batches(start, loop, train_blocks) if start < loop.steps else []
    with _StopFlag() as stop, progress_bar(loop.steps, label, progress and loop.rank == 0, start) as bar:
        for step in range(start, loop.steps):
            # --- the step's blocks: global batch, this rank's share, split into micro-batches;
            # the next step's are built once, now, and read ahead (a cache decodes them while
            # the students train)
            batches = upcoming
            upcoming = step_batches(step + 1, loop, train_blocks) if step + 1 < loop.steps else []
            if teacher is not None and upcoming:
                teacher.prefetch(upcoming)
            micro_batches = []
            for batch in batches:
                # --- one teacher signal per micro-batch, shared by every student
                if teacher is not None:
                    before = teacher.forward_calls
                    sig, valid = teacher.signal(batch)
                    teacher_calls += teacher.forward_calls - before
                else:
                    sig, valid = None, torch.ones_like(batch.labels, dtype=torch.bool)
                micro_batches.append(MicroBatch(batch, sig, valid))

            # --- every student learns from the same signal; a failure costs that student only
            teacher_invalid = sum(int((~mb.valid).sum()) for mb in micro_batches)
            failed, traces = {}, {}  # name -> one-line reason, name -> traceback (exceptions only)
            for s in students:
                try:
                    metrics = s.train_step(step, micro_batches)
                except Exception as e:  # out of memory, say: this student fails, not the run
                    failed[s.name] = f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:300]}"
                    traces[s.name] = traceback.format_exc()  # kept in its failed.json, for a bug report
                    continue
                logger.log(s.name, step + 1, {**metrics, "teacher_nonfinite_tokens": teacher_invalid})
                if s.nonfinite_steps > loop.max_nonfinite:
                    failed[s.name] = (f"{s.nonfinite_steps} non-finite steps (limit train.max_nonfinite="
                                      f"{loop.max_nonfinite}); lower the lr or check the teacher signal")
            if failed:
                students = drop_failed(students, failed, step, loop, layout, logger, traces)
            done = step + 1
            bar.update(1, {s.name: logger.last.get(s.name, {}).get("loss") for s in students})

            # --- validation and checkpoints
            if done == loop.steps or (loop.eval_every and done % loop.eval_every == 0):
                for s in students:
                    final_eval[s.name] = evaluate_model(s.model, val_blocks[: loop.eval_blocks], val_teacher,
                                                        device=s.device, chunk_size=s.cfg.loss.chunk_size)
                    logger.log(s.name, done, final_eval[s.name], kind="val")
            signum = agreed_stop(stop.signum, loop, students)
            if done == loop.steps or (loop.checkpoint_every and done % loop.checkpoint_every == 0) or signum:
                save_all(layout, students, done, loop)
            if signum and done < loop.steps:
                raise TrainingInterrupted(
                    f"stopped by signal {signum} after step {done}; checkpoints saved under "
                    f"{layout.students}; rerun with --resume to continue")
    logger.close()
    return {"students": final_eval, "teacher_forward_calls": teacher_calls, "start_step": start,
            "failed": failures(layout, names)}

