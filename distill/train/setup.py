"""From config to the loop's collaborators: each `Student` with its engine, and the
`LoopConfig`.  Used by the pretraining and the co-distillation stages alike.

A student's model comes from one of three places (`model:` in the config):
  preset        a fresh preset model, optionally initialised from the teacher (init: teacher)
  path          a pretrained Hugging Face dir, kept as it is (vocabulary checked against the run's)
  from_teacher  the teacher's own config with named fields changed (students/derive.py),
                its layers chosen by measurement (`layers: auto`) or by hand
What each student was built from, and what `init: teacher` copied, goes to
OUT/students/NAME/init.json for the report.
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.distributed as dist

from common.errors import UserError
from common.fsutil import atomic_write_json
from distill.config import RunConfig, StudentConfig
from distill.data import PackedData
from distill.runtime import check_student_vocab, cut_layer_spec, is_leader, model_config, resolve_device, teacher_model
from distill.train import checkpoint
from distill.train.engines import DeepSpeedEngine, TorchEngine, deepspeed_config
from distill.train.loop_config import LoopConfig
from distill.train.student import Student, make_optimizer
from losses.chunked import head_logits
from students.build import build_model, check_finite_files, check_finite_weights, head_transform, load_causal_lm
from teachers import token_ids

CALIBRATION_BLOCKS, CALIBRATION_BATCH = 8, 4  # `layers: auto` measures on 8 train blocks, 4 at a time


def loop_config(cfg: RunConfig, steps: int, batch_size: int, rank: int, world: int, rhash: str,
                **run_fields) -> LoopConfig:
    """The loop's settings from the config; run_fields: LoopConfig's fields that describe this
    run (its identity, what checkpoints record beside the weights, ...)."""
    t = cfg.train
    if batch_size % (t.grad_accum * world):
        raise UserError(f"train.batch_size={batch_size} must be divisible by grad_accum ({t.grad_accum}) "
                        f"x data-parallel ranks ({world})")
    return LoopConfig(steps=steps, batch_size=batch_size, grad_accum=t.grad_accum, eval_every=t.eval_every,
                      eval_blocks=t.eval_blocks, checkpoint_every=t.checkpoint_every, keep_last=t.keep_last,
                      max_nonfinite=t.max_nonfinite, on_student_failure=t.on_student_failure, seed=cfg.seed,
                      run_hash=rhash, rank=rank, world_size=world, **run_fields)


def make_student(cfg: RunConfig, sc: StudentConfig, model, steps: int, batch_size: int) -> Student:
    device = resolve_device(sc.device or cfg.train.device)
    opt, sched = make_optimizer(model, sc.optim, steps, device)
    if cfg.train.engine == "deepspeed":
        world = dist.get_world_size() if dist.is_initialized() else 1
        micro = batch_size // cfg.train.grad_accum // world
        engine = DeepSpeedEngine(model, opt, sched, deepspeed_config(cfg.train, sc.optim, micro))
    else:
        engine = TorchEngine(model, opt, sched, sc.optim, device, cfg.train.precision)
    return Student(sc, engine, steps)


class _TeacherOnce:
    """The teacher model, loaded on first use only (a preset-only run never loads it)."""

    def __init__(self, cfg: RunConfig, model=None):
        self.cfg, self.model = cfg, model

    def __call__(self):
        if self.model is None:
            self.model = teacher_model(self.cfg)
        return self.model


def _from_teacher(cfg: RunConfig, sc: StudentConfig, i: int, data: PackedData, teacher: _TeacherOnce):
    """(model, info) for `model: {from_teacher: {...}}`."""
    from students.derive import choose_layers, derive_config, even_layers

    from transformers import AutoConfig

    where = f"students.{i}.model.from_teacher"
    overrides = dict(sc.model.from_teacher)
    t_config = teacher.model.config if teacher.model is not None else AutoConfig.from_pretrained(str(cfg.layout.teacher))
    t_config = t_config.get_text_config()
    keep, spec = cut_layer_spec(t_config, overrides, sc.init_layers or ("auto" if sc.init == "teacher" else "even"), where)
    why: dict = {"method": "given in the config"}
    if spec == "auto":
        blocks = token_ids(data.train[:CALIBRATION_BLOCKS, :-1])  # (n, T) plain ids of the first train blocks
        batches = list(blocks.split(CALIBRATION_BATCH))
        try:
            layers, why = choose_layers(teacher(), batches, keep)
        except ValueError as e:
            raise UserError(f"{where}: {e}") from None
    elif spec == "even":
        layers, why = even_layers(keep, t_config.num_hidden_layers), {"method": "evenly spaced (init: random)"}
    else:
        layers = list(spec)
    try:
        config = derive_config(t_config, overrides, layers)
    except ValueError as e:
        raise UserError(f"{where}: {e}") from None
    model = build_model(config, seed=cfg.seed)
    return model, {"source": "from_teacher", "overrides": overrides, "layers": layers, "layer_choice": why}


def check_pretrained_finite(cfg: RunConfig) -> None:
    """UserError when a pretrained student's safetensors hold NaN or inf, read a tensor at a
    time: `distill run` builds the students (and checks them, `student_model`) only after the
    whole teacher pass, hours in which a damaged checkpoint would wait to be refused."""
    for i, sc in enumerate(cfg.students):
        if sc.model.path is not None:
            try:
                check_finite_files(Path(sc.model.path))
            except ValueError as e:
                raise UserError(f"students.{i}.model.path {sc.model.path}: {e}") from None


@torch.no_grad()
def check_head(model, tokens: int = 8) -> None:
    """Training and validation run the decoder (`model.model`), then the lm_head chunk by
    chunk, then `head_transform`: raise ValueError unless that equals the model's own logits
    on a few tokens (an architecture whose head does more would train, and be scored as, a
    function other than the one its users load)."""
    was_training = model.training
    model.eval()
    try:
        vocab = model.get_output_embeddings().weight.shape[0]
        device = model.get_output_embeddings().weight.device
        ids = (torch.arange(1, tokens + 1, device=device) * 7919 % vocab)[None]  # (1, tokens) arbitrary ids
        want = model(input_ids=ids, use_cache=False).logits.float()  # (1, tokens, V)
        hidden = model.model(input_ids=ids, use_cache=False).last_hidden_state
        got = head_logits(model.lm_head(hidden), **head_transform(model)).float()
    except Exception as e:  # e.g. no `.model` decoder: not a causal LM this toolkit can train
        raise ValueError(f"a forward of {tokens} tokens through it and through its decoder and lm_head failed "
                         f"({type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}); this toolkit "
                         f"trains causal LMs whose decoder is `.model` and head `.lm_head`") from None
    finally:
        model.train(was_training)
    tol = 1e-2 if model.dtype in (torch.bfloat16, torch.float16) else 1e-4
    err = float((got - want).abs().max())
    if not err <= tol * (1.0 + float(want.abs().max())):
        raise ValueError(f"its logits are not its lm_head's output (max difference {err:.3g} on {tokens} tokens): "
                         f"a {model.config.model_type} head this toolkit does not know, so it would train and score "
                         f"another function than the one the model computes; use another architecture")


def student_model(cfg: RunConfig, sc: StudentConfig, i: int, data: PackedData, teacher: _TeacherOnce):
    """(model, info): the student's model as its config says, and what it was built from;
    its weights checked finite and its head one training computes as the model does."""
    model, info = _student_model(cfg, sc, i, data, teacher)
    try:
        check_finite_weights(model)
        check_head(model)
    except ValueError as e:
        raise UserError(f"students.{i}.model: {e}") from None
    return model, info


def _student_model(cfg: RunConfig, sc: StudentConfig, i: int, data: PackedData, teacher: _TeacherOnce):
    from students.init import init_from_teacher

    if sc.model.path is not None:
        try:
            model = load_causal_lm(sc.model.path)
        except ValueError as e:
            raise UserError(f"students.{i}.model.path: {e}") from None
        check_student_vocab(cfg, sc.name, sc.model.path, model.config.vocab_size, data.tokenizer)
        return model, {"source": "pretrained", "path": str(sc.model.path), "architecture": type(model).__name__}
    if sc.model.from_teacher is not None:
        model, info = _from_teacher(cfg, sc, i, data, teacher)
    else:
        # The same seed for every student: a baseline and its distilled twin start identical.
        model = build_model(model_config(sc.model, data.tokenizer, f"students.{i}"), seed=cfg.seed)
        info = {"source": f"preset {sc.model.preset}", "layers": sc.init_layers}
    if sc.init == "teacher":
        try:
            copied = init_from_teacher(model, teacher(), layers=info.get("layers"))
        except ValueError as e:
            raise UserError(f"students.{i}.init_layers: {e}") from None
        info.update(copied=copied["copied"], not_copied=copied["skipped"])
    return model, info


def student_models(cfg: RunConfig, data: PackedData, teacher=None) -> list[tuple]:
    """(model, info) of every student, built or loaded; nothing is written, so a student
    refused here (a bad dir, another tokenizer) leaves the out_dir as it was.
    teacher: the teacher model if the caller already holds it (online mode), for init: teacher."""
    holder = _TeacherOnce(cfg, teacher)
    return [student_model(cfg, sc, i, data, holder) for i, sc in enumerate(cfg.students)]


def build_students(cfg: RunConfig, models: list[tuple]) -> list[Student]:
    """Each student with its engine and optimiser, from `student_models`; what it was built
    from goes to OUT/students/NAME/init.json."""
    students = []
    for sc, (model, info) in zip(cfg.students, models):
        if is_leader():
            atomic_write_json(cfg.layout.init_report(sc.name), {"student": sc.name, "init": sc.init, **info})
            fresh = not checkpoint.step_dirs(cfg.layout.checkpoints(sc.name))  # a resume loads over it: not said
            if "layer_choice" in info and sc.init == "teacher" and fresh:
                print(f"[init] {sc.name}: teacher layers {info['layers']} ({info['layer_choice']['method']}); "
                      f"{len(info['copied'])} tensors copied, {len(info['not_copied'])} not", file=sys.stderr)
        students.append(make_student(cfg, sc, model, cfg.train.steps, cfg.train.batch_size))
    return students
