"""The co-distillation loop: one teacher signal per batch, handed to every student.

    for step in steps:
        on-policy students of the step (on_policy.py): each samples the step's prompts, ONE
            teacher forward scores every student's samples, each learns from its own
        for view in data views:                 # students sharing a data selection (one by default)
            batch   = the step's blocks of the view (a seeded permutation per epoch, or a draw by
                      the view's weights: resumable exactly either way)
            signal, valid = teacher.signal(batch)   # 1 cache read or 1 teacher forward
            for student in view (not on-policy this step):
                student.train_step(step, [MicroBatch(batch, signal, valid)])
        students that failed: checkpoint everyone, drop them (or stop the run)
        log, validate, checkpoint

SIGINT/SIGTERM finish the current step, checkpoint every student and exit; under several
ranks the flag is all-reduced each step, so every rank stops after the same step.
A student fails when its step raises (out of memory, say) or it passes
`max_nonfinite` skipped steps; see `drop_failed`.
"""
from __future__ import annotations

import json
import os
import signal as signals
import sys
import threading
import time
import traceback

import torch
import torch.distributed as dist

from common.errors import UserError, resume_hint
from common.fsutil import atomic_write_json
from common.progress import progress_bar
from distill.blocks import Blocks, block_positions, first_blocks
from distill.layout import RunLayout
from distill.train import checkpoint
from distill.train.loop_config import LoopConfig
from distill.train.metrics import MetricsLogger, read_metrics
from distill.train.on_policy import OnPolicySource
from distill.train.student import MicroBatch, Student, target_mask
from distill.train.selection import DataView
from distill.train.validate import evaluate_model
from losses.difficulty import STATS, sequence_difficulty
from teachers import Batch, Teacher

EVERY_BLOCK = {"rule": "every block", "digest": "all"}  # the selection of a student that has none


class TrainingInterrupted(UserError):
    """SIGINT/SIGTERM: checkpoints were written; rerun with --resume.  Said without "error:"."""

    exit_code = 130


class TrainingAborted(UserError):
    """A student failed (on_student_failure=stop), or none is left: every student checkpointed."""

    exit_code = 3


class _StopFlag:
    """Turns SIGINT/SIGTERM into a flag the loop checks between steps.  Under a launcher a rank
    whose launcher is gone (killed with SIGKILL, which it cannot pass on) stops the same way:
    torchrun starts its ranks in sessions of their own, so they trained on as orphans, holding
    the GPUs and the rendezvous port, until the run's end."""

    POLL_S = 1.0

    def __init__(self, launched: bool = False):
        self.signum: int | None = None
        self._parent = os.getppid() if launched else None
        self._done = threading.Event()

    def __enter__(self):
        self._old = {s: signals.signal(s, self._handle) for s in (signals.SIGINT, signals.SIGTERM)}
        if self._parent is not None:
            threading.Thread(target=self._watch_launcher, name="launcher-watch", daemon=True).start()
        return self

    def _handle(self, signum, frame):
        self.signum = signum

    def _watch_launcher(self) -> None:
        while not self._done.wait(self.POLL_S):
            if os.getppid() != self._parent:  # re-parented: the launcher died
                print(f"[train] the launcher (pid {self._parent}) is gone: stopping after this step, as on "
                      f"SIGTERM", file=sys.stderr, flush=True)
                self.signum = self.signum or signals.SIGTERM
                return

    def __exit__(self, *exc):
        self._done.set()
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
    """Checkpoint every student at `step` and commit them together (see `save_checkpoints`)."""
    save_checkpoints(layout, [(s, step) for s in students], loop)


def save_checkpoints(layout: RunLayout, saves: list[tuple[Student, int]], loop: LoopConfig,
                     before_commit=None) -> None:
    """Publish each (student, step)'s checkpoint, then commit them all in one write (a kill
    in between resumes every student from the previous commit; checkpoint.py).  Every rank
    calls it (DeepSpeed writes partitions from each rank and, under ZeRO-3, gathers the
    whole model for rank 0's model.safetensors).  before_commit: run on rank 0 after the
    saves, before the commit (drop_failed writes its failure records there)."""
    if loop.world_size > 1:
        dist.barrier()
    for s, step in saves:
        meta = {"student": s.name, "run_hash": loop.run_hash, "student_config": s.cfg.model_dump(mode="json"),
                "tokens_seen": s.tokens_seen, "targets_seen": s.targets_seen, "nonfinite_steps": s.nonfinite_steps,
                "selection": loop.selections.get(s.name, EVERY_BLOCK),
                **({"run_identity": loop.run_identity} if loop.run_identity is not None else {}),
                **({"data_content": loop.data_content} if loop.data_content is not None else {}),
                **loop.extra_meta}
        root = layout.checkpoints(s.name)
        s.engine.save_sharded(root, tag=f"step_{step:08d}")
        weights = s.engine.full_state_dict()  # collective under ZeRO-3
        if loop.rank == 0:
            checkpoint.save(root, step, s.model, {**s.state(), "rng": checkpoint.rng_state()}, meta, weights=weights)
    if loop.rank == 0:
        if before_commit is not None:
            before_commit()
        checkpoint.commit(layout.students, {s.name: step for s, step in saves}, loop.keep_last)
    if loop.world_size > 1:
        dist.barrier()


def recorded_failures(layout: RunLayout, names: list[str]) -> dict[str, dict]:
    """The failure record of each named student that has one (see `drop_failed`)."""
    return {n: json.loads(layout.failure(n).read_text()) for n in names if layout.failure(n).exists()}


def claim_out_dir(layout: RunLayout, overwrite: bool, rank: int, move: bool = True) -> None:
    """Before a fresh (not --resume) run writes anything: one run per out_dir.  Checkpoints
    of an earlier run, of these students or others, would mix with this one's (its newer
    steps outlive this run's pruning, the commit marker keeps the others' steps, and export,
    report and metrics would come from two runs), so they are refused, or with `overwrite` that run's students, summary, report and plots are moved
    aside, whole, to OUT/replaced-TIME/ (rank 0; said on stderr).  move=False only refuses:
    a stage calls it so first, and again once its inputs (cache, teacher) check out, so a
    run refused for its inputs leaves the earlier one where it was."""
    earlier = checkpoint.earlier_checkpoints(layout.students)
    if not earlier:
        return
    found = ", ".join(f"{n} at step {step}" for n, step in sorted(earlier.items()))
    if not overwrite:
        raise UserError(f"{layout.students} holds checkpoints of an earlier run ({found}); rerun with --resume to "
                        f"continue it, or with --overwrite to move it aside (to {layout.root}/replaced-TIME/) "
                        f"and start afresh")
    if rank != 0 or not move:
        return
    aside = layout.root / f"replaced-{time.strftime('%Y%m%d-%H%M%S')}"
    aside.mkdir(parents=True, exist_ok=False)
    for path in layout.earlier_run_artifacts():
        if path.exists():
            path.rename(aside / path.name)
    print(f"[train] --overwrite: moved the earlier run ({found}) to {aside}", file=sys.stderr, flush=True)


def resume_all(layout: RunLayout, students: list[Student], loop: LoopConfig) -> tuple[int, list[Student]]:
    """Load every live student's latest checkpoint; all must be at the same step.  A student
    with a failure record stays dropped.  Returns (step, the students still training)."""
    dropped = recorded_failures(layout, [s.name for s in students])
    for s in students:
        if s.name in dropped and (last := checkpoint.latest(layout.checkpoints(s.name))) is not None:
            # Not trained on, but what it learnt from stays in the run's summary and report
            # (from meta.json: state.pt holds the optimizer too).
            meta = checkpoint.load_meta(last)
            s.tokens_seen, s.targets_seen = meta.get("tokens_seen", 0), meta.get("targets_seen")
            s.nonfinite_steps = meta.get("nonfinite_steps", 0)
    students = [s for s in students if s.name not in dropped]
    if not students:
        raise TrainingAborted(f"every student failed in an earlier run ({', '.join(sorted(dropped))}; see "
                              f"failed.json under {layout.students}); start a new out_dir")
    latest = {s.name: checkpoint.latest(layout.checkpoints(s.name)) for s in students}
    if all(p is None for p in latest.values()):
        return 0, students
    metas = {name: checkpoint.load_meta(p) for name, p in latest.items() if p}
    steps = {name: (metas[name]["step"] if p else 0) for name, p in latest.items()}
    for name, meta in metas.items():  # before the run-hash check: say *what* changed
        had, want = meta.get("selection", EVERY_BLOCK), loop.selections.get(name, EVERY_BLOCK)
        if had["digest"] != want["digest"]:
            raise UserError(f"student {name}: its data selection changed since the checkpoint at step "
                            f"{meta['step']} (then: {had['rule']}, {had.get('blocks', 'all')} blocks; now: "
                            f"{want['rule']}, {want.get('blocks', 'all')} blocks); resume with the selection "
                            f"it was trained on (data.select / students.N.select) or start a new out_dir")
    if len(set(steps.values())) != 1:
        raise UserError(f"students' checkpoints are at different steps {steps}; remove the newer ones "
                        f"or start a new out_dir")
    rng = None
    for s in students:
        # Under ZeRO-3 the model's weights are partitions: DeepSpeed's own checkpoint restores them.
        weights_too = getattr(s.engine, "zero_stage", 0) < 3
        state = checkpoint.load(latest[s.name], s.model if weights_too else None, loop.run_hash,
                                loop.run_identity, also=loop.earlier_run_hashes, data_content=loop.data_content)
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

    def record_failures() -> None:  # before the commit: a kill in between keeps them dropped
        for s in broken:
            record = {"step": step, "failed_at_step": step + 1, "reason": failed[s.name],
                      **({"traceback": traces[s.name]} if s.name in traces else {})}
            atomic_write_json(layout.failure(s.name), record)

    save_checkpoints(layout, [(s, step + 1) for s in healthy] + [(s, step) for s in broken], loop,
                     before_commit=record_failures)
    for s in broken:
        logger.log(s.name, step + 1, {"failed": True, "reason": failed[s.name]}, kind="failed")
        if loop.rank == 0:
            print(f"[train] student {s.name} failed at step {step + 1}: {failed[s.name]}; checkpointed at "
                  f"step {step}", file=sys.stderr, flush=True)
    names = ", ".join(sorted(failed))
    if loop.on_student_failure == "stop" or not healthy:
        raise TrainingAborted(
            f"student {names} failed at step {step + 1} ({'; '.join(failed.values())}); stopped. Every other "
            f"student is checkpointed at step {step + 1}, {names} at step {step}. --resume goes on without "
            f"{names} (it stays dropped); train.on_student_failure: drop lets the others finish in one run")
    return healthy


def rank_positions(loop: LoopConfig) -> list[list[int]]:
    """Per micro-batch, the positions in the step's global batch this rank trains on: the
    batch split into `grad_accum` micro-batches, each strided over the data-parallel ranks."""
    micro = loop.batch_size // loop.grad_accum
    return [list(range(m * micro, (m + 1) * micro))[loop.rank::loop.world_size] for m in range(loop.grad_accum)]


def step_batches(indices: list[int], loop: LoopConfig, train_blocks: Blocks | torch.Tensor) -> list[Batch]:
    """This rank's micro-batches of a step whose global batch is the blocks `indices`."""
    return [Batch.of(train_blocks[ids], ids, block_positions(train_blocks, ids))
            for ids in ([indices[p] for p in pos] for pos in rank_positions(loop))]


def block_gaps(members: list[Student], micro_batches: list[MicroBatch], loop: LoopConfig) -> torch.Tensor:
    """(batch_size,) the students' mean loss on each block of the step's global batch minus
    the teacher's nll on it (over the block's targets; NaN: none), gathered from every rank
    (one all-reduce of batch_size numbers)."""
    nll = STATS.index("nll")
    teacher = torch.cat([sequence_difficulty(mb.signal.difficulty.cpu(), target_mask(mb.batch.labels, mb.valid.cpu()))[:, nll]
                         for mb in micro_batches])  # (B_local,) the teacher's nll per block
    student = torch.stack([s.hard_per_block.cpu() for s in members]).mean(0)  # (B_local,)
    flat = torch.zeros(loop.batch_size, dtype=torch.float64)
    flat[[p for pos in rank_positions(loop) for p in pos]] = (student - teacher).double()
    if loop.world_size > 1:
        flat = flat.to(members[0].device)
        dist.all_reduce(flat)  # each position is filled by exactly one rank
    return flat.cpu()


def teacher_metrics(micro_batches: list[MicroBatch], loop: LoopConfig, device: torch.device) -> dict:
    """The step's teacher figures over every rank (one all-reduce): the count of tokens whose
    signal was not finite, and the teacher's mean nll, entropy and top-1 probability over the
    training targets (the difficulty the signal carries; absent when it carries none)."""
    sums = torch.zeros(len(STATS) + 2, dtype=torch.float64)  # [nll, entropy, top1 sums, targets, non-finite]
    has_difficulty = all(mb.signal is not None and mb.signal.difficulty is not None for mb in micro_batches)
    for mb in micro_batches:
        sums[-1] += int((~mb.valid).sum())
        if has_difficulty:
            d = mb.signal.difficulty.cpu()  # (B, T, 3)
            ok = target_mask(mb.batch.labels, mb.valid.cpu()) & torch.isfinite(d).all(-1)  # (B, T)
            sums[:len(STATS)] += d[ok].double().sum(0)
            sums[-2] += int(ok.sum())
    if loop.world_size > 1:
        sums = sums.to(device)
        dist.all_reduce(sums)
        sums = sums.cpu()
    out = {"teacher_nonfinite_tokens": int(sums[-1])}
    if has_difficulty and sums[-2] > 0:
        out.update({f"teacher_{name}": float(v / sums[-2]) for name, v in zip(STATS, sums)})
    return out


class _StepFailures:
    """The students that failed this step: name -> a one-line reason, and name -> its traceback
    (exceptions only; kept in the student's failed.json, for a bug report)."""

    def __init__(self) -> None:
        self.reasons: dict[str, str] = {}
        self.traces: dict[str, str] = {}


def _train_student(s: Student, step: int, micro_batches: list[MicroBatch], shared: dict, logger: MetricsLogger,
                   loop: LoopConfig, failed: _StepFailures, recipe=None) -> None:
    """One student's step, logged; a failure (out of memory, say, or past `max_nonfinite`
    skipped steps) costs that student only.  recipe None: the student's own loss."""
    try:
        metrics = s.train_step(step, micro_batches, recipe)
    except Exception as e:
        failed.reasons[s.name] = f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:300]}"
        failed.traces[s.name] = traceback.format_exc()
        return
    logger.log(s.name, step + 1, {**metrics, **shared})
    if s.nonfinite_steps > loop.max_nonfinite:
        failed.reasons[s.name] = (f"{s.nonfinite_steps} non-finite steps (limit train.max_nonfinite="
                                  f"{loop.max_nonfinite}); lower the lr or check the teacher signal")


def _with_signal(teacher: Teacher | None, batches: list[Batch]) -> tuple[list[MicroBatch], int]:
    """Each micro-batch with its teacher signal (one cache read or one teacher forward each),
    shared by every student that learns from it; and the teacher forwards that took.  No
    teacher (its own pretraining): CE only, every target valid."""
    micro_batches, calls = [], 0
    for batch in batches:
        if teacher is None:
            micro_batches.append(MicroBatch(batch, None, torch.ones_like(batch.labels, dtype=torch.bool)))
            continue
        before = teacher.forward_calls
        sig, valid = teacher.signal(batch)
        calls += teacher.forward_calls - before
        micro_batches.append(MicroBatch(batch, sig, valid))
    return micro_batches, calls


def _learn_on_policy(step: int, on_policy: OnPolicySource | None, students: list[Student], teacher: Teacher,
                     loop: LoopConfig, logger: MetricsLogger, failed: _StepFailures) -> tuple[list[Student], int]:
    """Source 1: the students taking this step on-policy sample the step's prompts, one teacher
    forward scores every student's samples, each learns from its own.  -> (those students,
    the teacher forwards)."""
    members = on_policy.members(step, students) if on_policy is not None else []
    if not members:
        return [], 0
    before = teacher.forward_calls
    own = on_policy.micro_batches(step, members)  # name -> its micro-batches
    calls = teacher.forward_calls - before
    figures = on_policy.figures(members[0].device)  # tokens sampled, seconds generating
    for s in members:
        shared = {**teacher_metrics(own[s.name], loop, s.device), **figures, "on_policy": True}
        _train_student(s, step, own[s.name], shared, logger, loop, failed, on_policy.recipe(s))
    return members, calls


def _learn_from_corpus(step: int, view: DataView, batches: list[Batch] | None, next_batches: list[Batch] | None,
                       members: list[Student], teacher: Teacher | None, train_blocks: Blocks | torch.Tensor, loop: LoopConfig,
                       logger: MetricsLogger, failed: _StepFailures) -> int:
    """Source 2, one data view: its students learn from the step's blocks with one teacher
    signal per micro-batch.  batches: None for a dynamic view, whose blocks are drawn now by
    this window's weights.  next_batches are read ahead while the students train.  -> the
    teacher forwards."""
    if view.dynamic:
        view.reweigh(step)
        indices = view.global_indices(step, loop.batch_size, loop.seed)
        batches = step_batches(indices, loop, train_blocks)
    if teacher is not None and next_batches:
        teacher.prefetch(next_batches)
    micro_batches, calls = _with_signal(teacher, batches)
    shared = teacher_metrics(micro_batches, loop, members[0].device)
    for s in members:
        _train_student(s, step, micro_batches, shared, logger, loop, failed)
    if view.dynamic:  # the students' gap on these blocks re-weights the next window
        trained = [s for s in members if s.name not in failed.reasons and s.hard_per_block is not None]
        if trained:
            view.record(indices, block_gaps(trained, micro_batches, loop))
        for s in members:
            s.data_view_state = view.state_dict()
    return calls


def _write_data_reports(views: list[DataView], students: list[Student], layout: RunLayout) -> None:
    """What each student learns from, for the report, now that the run is under way."""
    training = {s.name for s in students}
    for view in views:
        for name in set(view.students) & training:
            atomic_write_json(layout.data_report(name), view.report(name))


def _restore_views(views: list[DataView], students: list[Student]) -> None:
    """A dynamic view's gap table comes back with its students (resumed: their checkpoints hold it)."""
    for view in views:
        state = next((s.data_view_state for s in students if s.name in view.students and s.data_view_state), None)
        if view.dynamic and state is not None:
            view.load_state_dict(state)


class _ValidationProgress:
    """evaluate_model's bar, shown as the training bar's text (rich allows one live bar):
    `validating NAME: k/N blocks`; a log gets it in its plain progress lines."""

    def __init__(self, bar, name: str, total: int):
        self.bar, self.name, self.total, self.done = bar, name, total, 0

    def update(self, n: int) -> None:
        self.done += n
        self.bar.update(0, info=f"validating {self.name}: {self.done:,}/{self.total:,} blocks")


# Fault injection for tests: the rank this names sends itself SIGTERM as it scores its first
# validation batch (every rank must then cut the validation at the same batch).
SIGNAL_IN_VALIDATION = "DISTILL_TEST_SIGNAL_IN_VALIDATION"
_signal_injected = False


def _inject_signal(rank: int) -> None:
    global _signal_injected
    if not _signal_injected and os.environ.get(SIGNAL_IN_VALIDATION) == str(rank):
        _signal_injected = True
        os.kill(os.getpid(), signals.SIGTERM)


def _validate(students: list[Student], val_blocks, val_teacher: Teacher | None, loop: LoopConfig,
              logger: MetricsLogger, done: int, final_eval: dict, bar, stop: _StopFlag) -> bool:
    """Each student on the first `loop.eval_blocks` validation blocks, logged as its `val` row
    at step `done` and kept in final_eval; -> True when a signal cut it short (`stop`, agreed by
    every rank after each batch: on a large held-out split a Ctrl-C waited for minutes), the
    unfinished student's figures not logged."""
    blocks = first_blocks(val_blocks, loop.eval_blocks)

    def stopping() -> bool:
        _inject_signal(loop.rank)
        return agreed_stop(stop.signum, loop, students) is not None

    for s in students:
        metrics = evaluate_model(s.model, blocks, val_teacher, device=s.device, chunk_size=s.cfg.loss.chunk_size,
                                 bar=_ValidationProgress(bar, s.name, len(blocks)), stop=stopping)
        if metrics is None:
            return True
        final_eval[s.name] = metrics
        logger.log(s.name, done, metrics, kind="val")
    return False


def _resumed_validation(students: list[Student], val_blocks, val_teacher: Teacher | None, loop: LoopConfig,
                        logger: MetricsLogger, layout: RunLayout, step: int, final_eval: dict, bar, stop) -> None:
    """A run resumed at a step that validates (every `eval_every`, the last): each student's
    figures as its metrics logged them, and a validation now of those a Ctrl-C cut short, so
    the metrics and the final figures are an uninterrupted run's (a rerun of a finished
    `distill run` rewrote train_summary.json with none).  Rank 0 reads the metrics, which it
    alone writes; every rank takes its word, as they must validate together."""
    logged = {}
    if loop.rank == 0:
        for s in students:
            rows = [r for r in read_metrics(layout.metrics(s.name)) if r.get("kind") == "val" and r.get("step") == step]
            if rows:
                logged[s.name] = {k: v for k, v in rows[-1].items() if k not in ("step", "kind")}
    if loop.world_size > 1:
        shared = [logged]
        dist.broadcast_object_list(shared, src=0)
        logged = shared[0]
    final_eval.update(logged)
    unvalidated = [s for s in students if s.name not in logged]
    if unvalidated and _validate(unvalidated, val_blocks, val_teacher, loop, logger, step, final_eval, bar, stop):
        raise TrainingInterrupted(f"stopped by a signal during the validation of step {step}, which resumed it; "
                                  f"{resume_hint()} to validate")


def train_loop(students: list[Student], teacher: Teacher | None, train_blocks: Blocks | torch.Tensor,
               val_blocks: Blocks | torch.Tensor, val_teacher: Teacher | None, loop: LoopConfig, layout: RunLayout,
               resume: bool, progress: bool, label: str = "co-distilling",
               views: list[DataView] | None = None, on_policy: OnPolicySource | None = None) -> dict:
    """Train every student for `loop.steps`; returns the final validation metrics per student.

    train_blocks, val_blocks: (N, T+1) token ids, prepared `Blocks` (rows' position ids with
    them) or a tensor (one sequence a row).  teacher None: CE-only training (the
    teacher's own pretraining).  views: which blocks each student learns from (selection.py);
    None: every student, every block.  on_policy: the students' own samples scored by the
    teacher (on_policy.OnPolicySource): the students it names for a step learn from it, not
    from the corpus, that step; None: the corpus only."""
    names = [s.name for s in students]
    reported = views is not None  # the teacher's own pretraining has no data report
    views = views or [DataView(None, "", None, names, n_total=len(train_blocks))]
    start, students = resume_all(layout, students, loop) if resume else (0, students)
    if resume and start >= loop.steps and loop.rank == 0:  # a log line, not a progress bar: --quiet keeps it
        print(f"[train] the run is finished: every student is at step {start} of {loop.steps}; nothing to train "
              f"(to train further, `distill export` the students and start a new run from the exports)",
              file=sys.stderr, flush=True)
    if not resume and loop.rank == 0:
        for s in students:  # a fresh run retries every student
            layout.failure(s.name).unlink(missing_ok=True)
    if reported and loop.rank == 0:
        _write_data_reports(views, students, layout)
    _restore_views(views, students)

    def batches_of(step: int) -> list[list[Batch] | None]:
        """Per view, this rank's micro-batches of `step`; None for a dynamic view, whose batch
        can only be drawn once the step before it has trained (its gaps set the weights)."""
        return [None if v.dynamic or step >= loop.steps else
                step_batches(v.global_indices(step, loop.batch_size, loop.seed), loop, train_blocks) for v in views]

    logger = MetricsLogger(layout, [s.name for s in students], start, enabled=loop.rank == 0)
    final_eval: dict = {}
    teacher_calls = 0  # teacher forwards made for training batches (evaluation excluded)
    try:  # the metrics files and TensorBoard writers are closed (flushed) whatever ends the loop
        upcoming = batches_of(start)
        with _StopFlag(launched=loop.world_size > 1) as stop, progress_bar(loop.steps, label, progress and loop.rank == 0, start) as bar:
            if resume and start > 0 and (start >= loop.steps or (loop.eval_every and start % loop.eval_every == 0)):
                _resumed_validation(students, val_blocks, val_teacher, loop, logger, layout, start, final_eval, bar, stop)
            for step in range(start, loop.steps):
                # --- the step's blocks, per data view: global batch, this rank's share, split into
                # micro-batches; the next step's are built once, now, and read ahead (a cache
                # decodes them while the students train)
                current, upcoming = upcoming, batches_of(step + 1)
                failed = _StepFailures()
                on_members, calls = _learn_on_policy(step, on_policy, students, teacher, loop, logger, failed)
                teacher_calls += calls
                for view, batches, next_batches in zip(views, current, upcoming):
                    members = [s for s in students if s.name in view.students and s not in on_members]
                    if members:
                        teacher_calls += _learn_from_corpus(step, view, batches, next_batches, members, teacher,
                                                            train_blocks, loop, logger, failed)
                if failed.reasons:
                    students = drop_failed(students, failed.reasons, step, loop, layout, logger, failed.traces)
                done = step + 1
                bar.update(1, {s.name: logger.last.get(s.name, {}).get("loss") for s in students})

                # --- validation and checkpoints
                cut_short = False
                if done == loop.steps or (loop.eval_every and done % loop.eval_every == 0):
                    cut_short = _validate(students, val_blocks, val_teacher, loop, logger, done, final_eval, bar, stop)
                signum = agreed_stop(stop.signum, loop, students)
                if done == loop.steps or (loop.checkpoint_every and done % loop.checkpoint_every == 0) or signum:
                    save_all(layout, students, done, loop)
                    if done == loop.steps and not signum:  # one during the final save ends the run too
                        signum = agreed_stop(stop.signum, loop, students)
                if signum:  # at the last step too: `distill run` must not go on to export and eval
                    cut = " (its validation cut short)" if cut_short else ""
                    raise TrainingInterrupted(
                        f"stopped by signal {signum} after step {done} of {loop.steps}{cut}; checkpoints saved "
                        f"under {layout.students}; {resume_hint()} to continue")
    finally:
        logger.close()
    return {"students": final_eval, "teacher_forward_calls": teacher_calls, "start_step": start,
            "failed": recorded_failures(layout, names)}
