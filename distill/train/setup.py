"""From config to the loop's collaborators: each `Student` with its engine, and the
`LoopConfig`.  Used by the pretraining and the co-distillation stages alike."""
from __future__ import annotations

import torch.distributed as dist

from common.errors import UserError
from distill.config import RunConfig, StudentConfig
from distill.data import PackedData, vocab_size_of
from distill.runtime import model_config, resolve_device, teacher_model
from distill.train.engines import DeepSpeedEngine, TorchEngine, deepspeed_config
from distill.train.loop import LoopConfig
from distill.train.student import Student, make_optimizer


def loop_config(cfg: RunConfig, steps: int, batch_size: int, rank: int, world: int, rhash: str) -> LoopConfig:
    t = cfg.train
    if batch_size % (t.grad_accum * world):
        raise UserError(f"train.batch_size={batch_size} must be divisible by grad_accum ({t.grad_accum}) "
                        f"x data-parallel ranks ({world})")
    return LoopConfig(steps=steps, batch_size=batch_size, grad_accum=t.grad_accum, eval_every=t.eval_every,
                      eval_blocks=t.eval_blocks, checkpoint_every=t.checkpoint_every, keep_last=t.keep_last,
                      max_nonfinite=t.max_nonfinite, on_student_failure=t.on_student_failure, seed=cfg.seed,
                      run_hash=rhash, rank=rank, world_size=world)


def make_student(cfg: RunConfig, sc: StudentConfig, model, steps: int, batch_size: int) -> Student:
    device = resolve_device(sc.device or cfg.train.device)
    opt, sched = make_optimizer(model, sc.optim, steps)
    if cfg.train.engine == "deepspeed":
        world = dist.get_world_size() if dist.is_initialized() else 1
        micro = batch_size // cfg.train.grad_accum // world
        engine = DeepSpeedEngine(model, opt, sched, deepspeed_config(cfg.train, sc.optim, micro))
    else:
        engine = TorchEngine(model, opt, sched, sc.optim, device, cfg.train.precision)
    return Student(sc, model, engine, steps)


def build_students(cfg: RunConfig, data: PackedData, teacher=None) -> list[Student]:
    """teacher: the teacher model if the caller already holds it (online mode), for init: teacher."""
    from students.build import build_model
    from students.init import init_from_teacher

    vocab = vocab_size_of(data.tokenizer)
    students = []
    for i, sc in enumerate(cfg.students):
        # The same seed for every student: a baseline and its distilled twin start identical.
        model = build_model(model_config(sc.model, vocab, f"students[{i}]"), seed=cfg.seed)
        if sc.init == "teacher":
            teacher = teacher or teacher_model(cfg)
            init_from_teacher(model, teacher, layers=sc.init_layers)
        students.append(make_student(cfg, sc, model, cfg.train.steps, cfg.train.batch_size))
    return students
