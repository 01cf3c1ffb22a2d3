"""What each CLI command does, one function each: pretrain, cache, train, run, eval.

Every function validates before it writes, and each stage can be rerun: finished work
is detected and reused (a finished teacher, complete cache shards, checkpoints).
"""
from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from distill.config import ModelConfig, RunConfig, StudentConfig
from distill.data import PackedData, prepare_data, vocab_size_of
from distill.engine import DeepSpeedEngine, TorchEngine, autocast_dtype, deepspeed_config, resolve_device
from distill.errors import UserError
from distill.fsutil import atomic_write_json
from distill.student import Student, make_optimizer
from distill.trainer import LoopConfig, run_hash, train_loop
from distill import quiet_libraries
from teachers import CachedTeacher, LiveTeacher, load_teacher_model, teacher_identity

quiet_libraries()


# ----------------------------------------------------------------------------- setup


def setup_runtime(cfg: RunConfig) -> tuple[int, int]:
    """Seed, determinism and (under a launcher) torch.distributed. Returns (rank, world_size)."""
    torch.manual_seed(cfg.seed)
    if cfg.train.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and torch.cuda.is_available() and "LOCAL_RANK" in os.environ:
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))  # "cuda" then means this rank's GPU (NCCL needs it)
    if world > 1 and not dist.is_initialized():
        if cfg.train.engine == "deepspeed" or cfg.teacher.sharding == "zero3":
            import deepspeed

            deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo")
        else:
            dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def prepare(cfg: RunConfig, progress: bool = False) -> PackedData:
    """Packed data; a checkpoint teacher's own tokenizer is used unless one is named."""
    if (cfg.teacher.source == "checkpoint" and cfg.data.tokenizer.path is None
            and cfg.teacher.path is not None and (cfg.teacher.path / "tokenizer.json").exists()):
        cfg.data.tokenizer.path = cfg.teacher.path
    # Under a launcher, rank 0 builds the tokenizer and blocks; the others then reuse them.
    leader = not dist.is_initialized() or dist.get_rank() == 0
    if not leader:
        dist.barrier()
    data = prepare_data(cfg.data, cfg.out_dir, progress=progress)
    if leader and dist.is_initialized():
        dist.barrier()
    return data


def model_config(model_cfg: ModelConfig, vocab_size: int, where: str):
    """A transformers config from a preset; vocab defaults to the tokenizer's real size."""
    from students.presets import PRESETS

    args = dict(model_cfg.args)
    args.setdefault("vocab_size", vocab_size)
    if args["vocab_size"] < vocab_size:
        raise UserError(f"{where}.model.args.vocab_size={args['vocab_size']} is smaller than the tokenizer's "
                        f"{vocab_size} tokens; remove it to use the tokenizer's size")
    try:
        return PRESETS[model_cfg.preset](**args)
    except (TypeError, ValueError) as e:
        raise UserError(f"{where}.model.args: {e}") from None


def check_k(cfg: RunConfig, vocab: int) -> None:
    if cfg.cache.k > vocab:
        raise UserError(f"cache.k={cfg.cache.k} is larger than the vocabulary ({vocab} tokens); choose k <= {vocab}")


# ----------------------------------------------------------------------------- teacher


def pretrain_teacher(cfg: RunConfig, resume: bool = True, progress: bool = True,
                     data: PackedData | None = None) -> Path:
    """Plain-CE training of a preset teacher; writes a Hugging Face dir at OUT/teacher."""
    from students.build import build_model

    if cfg.teacher.source != "preset":
        raise UserError("pretrain: teacher.source must be 'preset' (a checkpoint teacher is already trained)")
    out = cfg.teacher_dir
    if resume and (out / "pretrain_done.json").exists():
        return out
    rank, world = setup_runtime(cfg)
    data = prepare(cfg, progress) if data is None else data
    vocab = vocab_size_of(data.tokenizer)
    model = build_model(model_config(cfg.teacher.model, vocab, "teacher"), seed=cfg.seed)
    pre = cfg.teacher.pretrain
    as_student = StudentConfig(name="teacher", model=cfg.teacher.model, baseline=True, optim=pre.optim)
    student = make_student(cfg, as_student, model, pre.steps, pre.batch_size)
    loop = loop_config(cfg, pre.steps, pre.batch_size, rank, world,
                       run_hash("pretrain", cfg.teacher.model_dump(mode="json"), data.fingerprint, cfg.seed))
    result = train_loop([student], None, data.train, data.val, None, loop, cfg.out_dir / "pretrain",
                        resume=resume, progress=progress, label="pretraining teacher")
    if rank == 0:
        from distill.export import save_hf_dir

        save_hf_dir(student.model, data.tokenizer, out, dtype="fp32")
        atomic_write_json(out / "pretrain_done.json", {"steps": pre.steps, "data_fingerprint": data.fingerprint,
                                                       **result["students"].get("teacher", {})})
    return out


def existing_teacher_dir(cfg: RunConfig) -> Path:
    path = cfg.teacher_dir
    if not path.is_dir():
        hint = "run `distill pretrain` first" if cfg.teacher.source == "preset" else "check teacher.path"
        raise UserError(f"teacher dir {path} does not exist; {hint}")
    return path


def teacher_model(cfg: RunConfig):
    return load_teacher_model(existing_teacher_dir(cfg))


def cache_identity(cfg: RunConfig, data: PackedData) -> dict:
    return {**teacher_identity(cfg.teacher_dir), "tokenizer_hash": data.tokenizer_hash,
            "data_fingerprint": data.fingerprint, "seq_len": str(data.seq_len),
            "vocab_size": str(vocab_size_of(data.tokenizer))}


def live_teacher(cfg: RunConfig, data: PackedData, device: torch.device) -> LiveTeacher:
    return LiveTeacher(teacher_model(cfg), cfg.cache.k, vocab_size_of(data.tokenizer), device,
                       autocast_dtype(cfg.train.precision, device), keep_dense=cfg.train.online_dense)


@contextlib.contextmanager
def zero3_live_teacher(cfg: RunConfig, data: PackedData, rank: int, world: int, progress: bool):
    """The teacher partitioned over all ranks (teacher.sharding=zero3), released on exit;
    see teachers/sharded.py."""
    from teachers.sharded import local_parameter_share, zero3_teacher

    amp = autocast_dtype(cfg.train.precision, resolve_device(cfg.train.device))
    with zero3_teacher(existing_teacher_dir(cfg), dtype=amp or torch.float32) as (model, device):
        if progress:
            local, total = local_parameter_share(model)
            print(f"[cache] teacher sharded with ZeRO-3 over {world} rank(s): rank {rank} holds {local:,} of "
                  f"{total:,} weights", file=sys.stderr, flush=True)
        yield LiveTeacher(model, cfg.cache.k, vocab_size_of(data.tokenizer), device, amp)


def build_cache(cfg: RunConfig, overwrite: bool = False, progress: bool = True,
                data: PackedData | None = None) -> Path:
    """One teacher pass over train and validation blocks -> OUT/cache (resumes after a crash)."""
    from distill.cache import write_cache

    if cfg.teacher.source == "cache":
        return cfg.cache_dir
    rank, world = setup_runtime(cfg)
    data = prepare(cfg, progress) if data is None else data
    check_k(cfg, vocab_size_of(data.tokenizer))
    sharded = cfg.teacher.sharding == "zero3"
    splits = {"train": data.train[:, :-1], "val": data.val[:, :-1]}
    if sharded:
        teacher_ctx = zero3_live_teacher(cfg, data, rank, world, progress)
    else:
        teacher_ctx = contextlib.nullcontext(live_teacher(cfg, data, resolve_device(cfg.train.device)))
    with teacher_ctx as teacher:
        return write_cache(cfg.cache_dir, teacher.topk, splits, identity=cache_identity(cfg, data), k=cfg.cache.k,
                           encoding=cfg.cache.encoding, batch_size=cfg.cache.batch_size,
                           shard_sequences=cfg.cache.shard_sequences, overwrite=overwrite, rank=rank,
                           world_size=world, progress=progress and rank == 0, lockstep=sharded)


# ----------------------------------------------------------------------------- students


def check_online_sharding(cfg: RunConfig) -> None:
    """Refused before anything is written: a ZeRO-3 teacher serves `distill cache` only."""
    if cfg.train.mode == "online" and cfg.teacher.sharding != "none":
        raise UserError(f"teacher.sharding={cfg.teacher.sharding} works with `distill cache` only; set "
                        "train.mode: cached (cache first, then train), or teacher.sharding: none")


def loop_config(cfg: RunConfig, steps: int, batch_size: int, rank: int, world: int, rhash: str) -> LoopConfig:
    t = cfg.train
    if batch_size % (t.grad_accum * world):
        raise UserError(f"train.batch_size={batch_size} must be divisible by grad_accum ({t.grad_accum}) "
                        f"x data-parallel ranks ({world})")
    return LoopConfig(steps=steps, batch_size=batch_size, grad_accum=t.grad_accum, eval_every=t.eval_every,
                      eval_blocks=t.eval_blocks, checkpoint_every=t.checkpoint_every, keep_last=t.keep_last,
                      max_nonfinite=t.max_nonfinite, seed=cfg.seed, run_hash=rhash, rank=rank, world_size=world)


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


def train_students(cfg: RunConfig, resume: bool = False, progress: bool = True,
                   data: PackedData | None = None) -> dict:
    """Co-distil every student from one teacher signal per batch."""
    check_online_sharding(cfg)
    rank, world = setup_runtime(cfg)
    data = prepare(cfg, progress) if data is None else data
    vocab = vocab_size_of(data.tokenizer)
    if cfg.train.mode == "cached":
        manifest_identity = None if cfg.teacher.source == "cache" else cache_identity(cfg, data)
        if not (cfg.cache_dir / "manifest.json").exists():
            raise UserError(f"no cache at {cfg.cache_dir}; run `distill cache` first or set train.mode: online")
        teacher = CachedTeacher(cfg.cache_dir, "train", manifest_identity)
        val_teacher = CachedTeacher(cfg.cache_dir, "val", manifest_identity)
        _check_cache_matches_data(teacher, data)
    else:
        check_k(cfg, vocab)
        teacher = val_teacher = live_teacher(cfg, data, resolve_device(cfg.train.device))
    students = build_students(cfg, data, teacher.model if isinstance(teacher, LiveTeacher) else None)
    rhash = run_hash("train", [s.model_dump(mode="json") for s in cfg.students], data.fingerprint,
                     cfg.seed, cfg.train.steps, cfg.train.batch_size, cfg.train.grad_accum, cfg.train.mode)
    loop = loop_config(cfg, cfg.train.steps, cfg.train.batch_size, rank, world, rhash)
    loop.extra_meta = {"data_fingerprint": data.fingerprint, "teacher": str(cfg.teacher_dir),
                       "tokenizer_hash": data.tokenizer_hash}
    result = train_loop(students, teacher, data.train, data.val, val_teacher, loop, cfg.out_dir,
                        resume=resume, progress=progress)
    result["teacher_reads"] = getattr(teacher, "reads", None)
    if rank == 0:
        result["students_info"] = {s.name: {"tokens_seen": s.tokens_seen, "nonfinite_steps": s.nonfinite_steps}
                                   for s in students}
        atomic_write_json(cfg.out_dir / "train_summary.json", result)
    return result


def _check_cache_matches_data(teacher: CachedTeacher, data: PackedData) -> None:
    m = teacher.reader.manifest
    ident = m.get("identity", {})
    if ident.get("data_fingerprint") not in (None, data.fingerprint):
        raise UserError(f"cache at {teacher.reader.cache_dir} was made from other data (fingerprint "
                        f"{ident.get('data_fingerprint')} != {data.fingerprint}); rerun `distill cache --overwrite`")
    if len(teacher) != len(data.train):
        raise UserError(f"cache has {len(teacher)} train blocks but the data has {len(data.train)}; "
                        f"rerun `distill cache` to complete it")


# ----------------------------------------------------------------------------- whole runs


def run_all(cfg: RunConfig, resume: bool = True, progress: bool = True) -> dict:
    """(pretrain) + cache + train + export + eval/report from one config."""
    from distill.report import evaluate_run

    check_online_sharding(cfg)

    def stage(text: str) -> None:
        if progress and (not dist.is_initialized() or dist.get_rank() == 0):
            print(f"==> {text}", flush=True)

    # Data is prepared once (collectively, under a launcher) and shared by every stage;
    # eval runs on rank 0 alone, so it must not prepare (a barrier) by itself.
    setup_runtime(cfg)
    data = prepare(cfg, progress)
    if cfg.teacher.source == "preset":
        stage(f"teacher: pretraining a {cfg.teacher.model.preset} preset ({cfg.teacher.pretrain.steps} steps) -> {cfg.teacher_dir}")
        pretrain_teacher(cfg, resume=resume, progress=progress, data=data)
    if cfg.train.mode == "cached":
        stage(f"cache: one teacher pass over the data -> {cfg.cache_dir}")
        build_cache(cfg, progress=progress, data=data)
    stage(f"train: {len(cfg.students)} students from one teacher signal per batch ({cfg.train.mode})")
    train_students(cfg, resume=resume, progress=progress, data=data)
    if dist.is_initialized() and dist.get_rank() != 0:
        return {}
    stage("export: Hugging Face model dirs -> OUT/students/NAME/export")
    export_students(cfg)
    stage("eval: held-out metrics, report and plots")
    report = evaluate_run(cfg, progress=progress, data=data)
    stage(f"done: {cfg.out_dir / 'report.md'}")
    return report


def export_students(cfg: RunConfig) -> dict[str, Path]:
    from distill.export import export_checkpoint

    out = {}
    for sc in cfg.students:
        student_dir = cfg.out_dir / "students" / sc.name
        out[sc.name] = export_checkpoint(student_dir, student_dir / "export", dtype=cfg.export.dtype,
                                         tokenizer_dir=cfg.data.tokenizer.path or cfg.out_dir / "tokenizer")
    return out


def write_example_config(path: Path, force: bool = False) -> None:
    from distill.fsutil import atomic_write_text

    path = Path(path)
    if path.exists() and not force:
        raise UserError(f"{path} already exists; pass --force to overwrite it")
    atomic_write_text(path, (Path(__file__).parent / "example_config.yaml").read_text())
