"""What each CLI command does, one function each: pretrain, cache, train, run, export.

Every function validates before it writes, and each stage can be rerun: finished work
is detected and reused (a finished teacher, complete cache shards, checkpoints).
"""
from __future__ import annotations

import contextlib
import json
import math
import sys
from pathlib import Path

import torch
from pydantic import BaseModel

from common.errors import UserError
from common.fsutil import atomic_write_json, exclusive_lock
from distill.blocks import first_blocks
from distill.config import RunConfig, ScheduleConfig, ServerConfig, StudentConfig
from distill.data import PackedData, vocab_size_of
from distill.layout import RunLayout, has_tokenizer
from distill.report.export import export_checkpoint, save_hf_dir
from distill.report.report import evaluate_run
from distill.runtime import (DENSE_AUTO_BYTES, autocast_dtype, cache_identity, cache_manifests, check_cached_blocks,
                             check_k, dense_logits_bytes, dense_signal, existing_teacher_dir, is_leader, model_config,
                             prepare, resolve_device, sampling_of, scoring_teacher, server_teacher, setup_runtime)
from distill.train.checkpoint import DATA_KEY, earlier_checkpoints, latest, load_meta
from distill.train.loop import claim_out_dir, train_loop
from distill.train.loop_config import run_hash
from distill.train.on_policy import on_policy_source
from distill.train.selection import DataView, plan_views
from distill.train.setup import build_students, check_pretrained_finite, loop_config, make_student, student_models
from teachers import CachedTeacher, LiveTeacher, Teacher, teacher_identity
from teachers.cache.format import Sampling, read_json


def training_lock(layout: RunLayout, rank: int):
    """One training run at a time in an out_dir: two would interleave their metrics and
    overwrite each other's checkpoints.  Rank 0 holds OUT/.train.lock (outside students/,
    which --overwrite moves aside) for the whole stage; the other ranks follow rank 0."""
    if rank != 0:
        return contextlib.nullcontext()
    return exclusive_lock(layout.root / ".train.lock", f"{layout.root} is being trained into by another run")


# ----------------------------------------------------------------------------- teacher


def pretrain_teacher(cfg: RunConfig, resume: bool = True, progress: bool = True,
                     data: PackedData | None = None, overwrite: bool = False) -> Path:
    """Plain-CE training of a preset teacher; writes a Hugging Face dir at OUT/teacher.
    overwrite: a fresh run moves an earlier pretraining run's checkpoints aside (else refused)."""
    if cfg.teacher.source != "preset":
        raise UserError("pretrain: teacher.source must be 'preset' (a checkpoint teacher is already trained)")
    out = cfg.layout.teacher
    if resume and (out / "pretrain_done.json").exists():
        return out
    rank, world = setup_runtime(cfg)
    with training_lock(cfg.layout.pretrain, rank):
        return _pretrain(cfg, resume, progress, data, overwrite, rank, world)


def _pretrain(cfg: RunConfig, resume: bool, progress: bool, data: PackedData | None, overwrite: bool,
              rank: int, world: int) -> Path:
    from students.build import build_model

    out = cfg.layout.teacher
    if not resume:
        claim_out_dir(cfg.layout.pretrain, overwrite, rank)
    data = prepare(cfg, progress) if data is None else data
    model = build_model(model_config(cfg.teacher.model, data.tokenizer, "teacher"), seed=cfg.seed)
    pre = cfg.teacher.pretrain
    as_student = StudentConfig(name="teacher", model=cfg.teacher.model, baseline=True, optim=pre.optim)
    student = make_student(cfg, as_student, model, pre.steps, pre.batch_size)
    loop = loop_config(cfg, pre.steps, pre.batch_size, rank, world,
                       run_hash("pretrain", cfg.teacher.model_dump(mode="json"), data.fingerprint, cfg.seed))
    result = train_loop([student], None, data.train, data.val, None, loop, cfg.layout.pretrain,
                        resume=resume, progress=progress, label="pretraining teacher")
    weights = student.engine.full_state_dict()  # collective under ZeRO-3, where each rank holds 1/N of each weight
    if rank == 0:
        save_hf_dir(student.model, data.tokenizer, out, dtype="fp32", state_dict=weights)
        atomic_write_json(out / "pretrain_done.json", {"steps": pre.steps, "data_fingerprint": data.fingerprint,
                                                       **result["students"].get("teacher", {})})
    return out


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
        yield LiveTeacher(model, cfg.cache.k, vocab_size_of(data.tokenizer), device, amp, sampling=sampling_of(cfg))


def build_cache(cfg: RunConfig, overwrite: bool = False, progress: bool = True,
                data: PackedData | None = None) -> Path:
    """One teacher pass over train and validation blocks -> OUT/cache (resumes after a crash)."""
    from teachers.cache import write_cache

    if cfg.teacher.source == "cache":
        return cfg.layout.cache
    rank, world = setup_runtime(cfg)
    remote = server_teacher(cfg) if cfg.teacher.source == "server" else None  # checked before anything is written
    data = prepare(cfg, progress, for_the_cache=not overwrite) if data is None else data
    check_k(cfg, vocab_size_of(data.tokenizer))
    if cfg.estimator_note and not overwrite:  # a cache made before auto was the default: keep it, or redo it
        have = _estimator_of(cfg.layout.cache)
        if have not in (None, cfg.cache.estimator):
            raise UserError(f"cache at {cfg.layout.cache} holds a {have} signal but cache.estimator: auto chose "
                            f"{cfg.cache.estimator}; set cache.estimator: {have} to use it, or pass --overwrite to "
                            f"redo the teacher pass")
    if remote is not None and not overwrite:  # a name says nothing of the weights behind it
        for then in cache_manifests(cfg.layout.cache):
            remote.check_unchanged(then.get("teacher_probe"), cfg.teacher.server.drift_tolerance,
                                   f"the cache at {cfg.layout.cache}",
                                   "pass --overwrite to make the cache again from the model served now")
    if is_leader() and cfg.estimator_note:  # a log line: --quiet keeps it (it drops only progress bars)
        print(f"[cache] {cfg.estimator_note}", file=sys.stderr, flush=True)
    sharded = cfg.teacher.sharding == "zero3"
    # The teacher reads plain ids; which positions are targets (chat data) is the loss's business.
    # Lazy (N, T) views of the on-disk blocks: the writer reads them shard by shard.
    splits = _per_split(data, slice(None, -1), plain=True)
    if sharded:
        teacher_ctx = zero3_live_teacher(cfg, data, rank, world, progress)
    else:
        teacher_ctx = contextlib.nullcontext(remote or scoring_teacher(cfg, data, resolve_device(cfg.train.device)))
    sampling = sampling_of(cfg)
    # Each position's next token (negative: no training target), for the teacher's difficulty statistics;
    # a cache made before they existed is redone only if this run selects data by them.
    targets = _per_split(data, slice(1, None))
    # data.packing: documents: each packed row is scored alone (position ids restart per row)
    positions = _per_split(data, slice(None, -1), positions=True) if data.train.documents else None
    with teacher_ctx as teacher:
        out = write_cache(cfg.layout.cache, teacher.sample if sampling else teacher.topk, splits, targets=targets,
                           identity=cache_identity(cfg, data),
                           k=cfg.cache.k, encoding="sampled" if sampling else cfg.cache.encoding,
                           batch_size=cfg.cache.batch_size, shard_sequences=cfg.cache.shard_sequences,
                           overwrite=overwrite, rank=rank, world_size=world, progress=progress and rank == 0,
                           lockstep=sharded, sampling=sampling, upgrade=cfg.selects_data, positions=positions,
                           notes={"teacher_probe": remote.probe} if remote is not None else None)
    manifest = json.loads((out / "manifest.json").read_text()) if (out / "manifest.json").exists() else {}
    if progress and is_leader() and manifest.get("complete") and "difficulty" not in manifest:
        print(f"[cache] {out} was made before teacher difficulty statistics were recorded; a run with data.select "
              f"records them (one teacher pass), as does `distill cache --overwrite`", file=sys.stderr, flush=True)
    return out


def _per_split(data: PackedData, columns: slice, **kw) -> dict:
    """Lazy (N, T) views of both splits' on-disk blocks (`Blocks.columns`), by split name."""
    return {"train": data.train.columns(columns, **kw), "val": data.val.columns(columns, **kw)}


# ----------------------------------------------------------------------------- students


def _estimator_of(cache_dir: Path) -> str | None:
    """"topk" or "sampled": what the cache at cache_dir (complete or begun) holds; None: no cache."""
    manifests = cache_manifests(cache_dir)
    if not manifests:
        return None
    return "topk" if Sampling.of_manifest(manifests[0]) is None else "sampled"


def check_online_sharding(cfg: RunConfig) -> None:
    """Refused before anything is written: a ZeRO-3 teacher serves `distill cache` only."""
    if cfg.train.mode == "online" and cfg.teacher.sharding != "none":
        raise UserError(f"teacher.sharding={cfg.teacher.sharding} works with `distill cache` only; set "
                        "train.mode: cached (cache first, then train), or teacher.sharding: none")


def open_cached_teachers(cfg: RunConfig, data: PackedData) -> tuple[CachedTeacher, CachedTeacher]:
    """The train and val replays of a cache made for this run's teacher, tokenizer and data."""
    cache_dir = cfg.layout.cache
    if not (cache_dir / "manifest.json").exists():
        raise UserError(f"no cache at {cache_dir}; run `distill cache` first or set train.mode: online")
    read_json(cache_dir / "manifest.json")  # a damaged one is named here, not read as "holds a None signal"
    have = _estimator_of(cache_dir)  # before the identity check, whose message would not name the key
    if have != cfg.cache.estimator:
        chosen = " (chosen by cache.estimator: auto)" if cfg.estimator_note else ""
        raise UserError(f"cache at {cache_dir} holds a {have} signal but cache.estimator is {cfg.cache.estimator}"
                        f"{chosen}; set cache.estimator: {have}, or rerun `distill cache --overwrite`")
    check_cached_blocks(cache_dir, data, by_fingerprint=False)  # before the identity check, as above
    identity = None if cfg.teacher.source == "cache" else cache_identity(cfg, data)
    train, val = CachedTeacher(cache_dir, "train", identity), CachedTeacher(cache_dir, "val", identity)
    manifest = train.reader.manifest
    if have == "topk":  # what the students read must be what the config says: never an old cache's k silently
        for key, want in (("k", cfg.cache.k), ("encoding", cfg.cache.encoding)):
            if manifest.get(key) != want:
                raise UserError(f"cache at {cache_dir} has {key} {manifest.get(key)} but cache.{key} is {want}; set "
                                f"cache.{key}: {manifest.get(key)}, or rerun `distill cache --overwrite`")
    else:
        for key, have_value, want in (("samples", train.reader.sampling.n, cfg.cache.samples),
                                      ("exact_top", train.reader.sampling.exact_top, cfg.cache.exact_top)):
            if have_value != want:
                raise UserError(f"cache at {cache_dir} has {key} {have_value} but cache.{key} is {want}; set "
                                f"cache.{key}: {have_value}, or rerun `distill cache --overwrite`")
    check_cached_blocks(cache_dir, data)  # other data: after the keys above, whose messages name what to set
    if len(train) != len(data.train):
        raise UserError(f"cache has {len(train)} train blocks but the data has {len(data.train)}; "
                        f"rerun `distill cache` to complete it")
    return train, val


def student_identity(sc: StudentConfig) -> dict:
    """A student's config as the run hash sees it.  `select` enters only when set, so a
    checkpoint made before selection existed still resumes (its hash had no such key).
    tests/test_checkpoint.py pins its hash: a new field changes every checkpoint's identity."""
    d = sc.model_dump(mode="json")
    for key in ("select", "on_policy_share"):  # keys added later: absent from older checkpoints' hashes
        if d.get(key) is None:
            d.pop(key, None)
    # Where a student runs does not shape its trajectory (the README: the device may change on
    # --resume). Kept as null, the value every checkpoint made without one hashed.
    d["device"] = None
    return d


def run_identity(cfg: RunConfig, data_fingerprint: str, selections: dict | None, dense: bool) -> dict:
    """What shapes a training run's trajectory, named (checkpoints keep it, so a refused
    --resume says what changed) and hashed in this order, as before the names existed; keys
    added later enter only when set, so older checkpoints still resume.  selections: each
    student's data selection, or None when no student selects; dense: online training on the
    teacher's whole distribution."""
    # The teacher signal's shape is part of the trajectory: a cache's k/encoding, the live top-k.
    signal = {"estimator": cfg.cache.estimator, **({"samples": cfg.cache.samples} if cfg.cache.estimator == "sampled"
                                                   else {"k": cfg.cache.k})}
    if cfg.cache.exact_top:
        signal["exact_top"] = cfg.cache.exact_top
    if cfg.train.mode == "cached" and cfg.cache.estimator == "topk":
        signal["encoding"] = cfg.cache.encoding
    if dense:
        signal["dense"] = True  # the whole distribution: another loss, so another trajectory
    identity = {"stage": "train", "students": [student_identity(s) for s in cfg.students],
                DATA_KEY: data_fingerprint, "seed": cfg.seed, "train.steps": cfg.train.steps,
                "train.batch_size": cfg.train.batch_size,
                # How a step is split (grad_accum, and the ranks, never hashed) does not shape it:
                # the step's update is the same (tests/test_data_parallel.py), so a job rescheduled
                # on other GPUs resumes with the grad_accum that fits them.  Kept at 1, the value
                # most checkpoints hashed; earlier_run_hashes gives the others.
                "train.grad_accum": 1,
                "train.mode": cfg.train.mode, "the teacher signal": signal}
    if selections is not None:
        identity["the data selections"] = selections
    if cfg.train.on_policy is not None:
        identity["train.on_policy"] = cfg.train.on_policy.model_dump(mode="json")
    return identity


def earlier_run_hashes(cfg: RunConfig, identity: dict) -> tuple[str, ...]:
    """The hashes this run had under earlier rules, so checkpoints made then still resume:
    until 2026-12-05 a student's `device` was hashed, and so was `train.grad_accum` (any
    value that divides the batch: the checkpoint's may differ from this config's)."""
    devices = [s.device for s in cfg.students]
    students = [identity["students"]]
    if any(devices):
        students.append([{**d, "device": dev} for d, dev in zip(identity["students"], devices)])
    splits = [g for g in range(1, cfg.train.batch_size + 1) if cfg.train.batch_size % g == 0]
    then = [{**identity, "students": ss, "train.grad_accum": g} for ss in students for g in splits]
    hashes = dict.fromkeys(run_hash(*t.values()) for t in then)
    hashes.pop(run_hash(*identity.values()), None)  # today's own
    return tuple(hashes)


def data_views(cfg: RunConfig, teacher: CachedTeacher | None, data: PackedData) -> list[DataView]:
    """Which training blocks each student learns from (distill/train/selection.py), logged.
    The training loop writes them to OUT/students/NAME/data.json once the run is under way
    (not here: an earlier run may yet be moved aside, or a resume refused)."""
    rules = [(s.name, *cfg.selection_of(i)) for i, s in enumerate(cfg.students)]
    reader = None if teacher is None else teacher.reader
    stats = reader.sequence_stats() if reader is not None and reader.has_difficulty else None
    views = plan_views(rules, stats, len(data.train), block_tokens=data.train.target_counts())
    if is_leader():
        for view in views:
            sm = view.summary
            if view.rule is not None or len(views) > 1:
                print(f"[data] {', '.join(view.students)}: {sm['rule']}: {sm['blocks_kept']:,} of "
                      f"{sm['blocks_total']:,} training blocks ({sm['fraction_kept']:.1%}), {sm['tokens_kept']:,} of "
                      f"{sm['tokens_total']:,} target tokens", file=sys.stderr, flush=True)
    return views


def signal_note(cfg: RunConfig, vocab: int, dense: bool) -> str | None:
    """Online training with train.online_dense: auto and a top-k estimator: one line saying
    which signal it chose and why (a step's teacher logits against DENSE_AUTO_BYTES, or
    on-policy steps), or that a server teacher gives its top-k; None otherwise (a sampled
    signal, a cached run)."""
    if cfg.train.mode == "online" and cfg.teacher.source == "server":
        return (f"[train] teacher signal: top-{cfg.cache.k} from the server teacher (teacher.source: server; a server "
                f"returns the top-k log-probs, not the whole distribution)")
    if cfg.train.mode != "online" or cfg.train.online_dense != "auto":
        return None
    size = f"{_gb(dense_logits_bytes(cfg, vocab))} of fp32 teacher logits a step"
    if dense:
        return f"[train] teacher signal: the whole distribution (train.online_dense: auto; {size})"
    if cfg.cache.estimator != "topk":
        return None
    if cfg.on_policy_active:
        return (f"[train] teacher signal: top-{cfg.cache.k} (train.online_dense: auto keeps the top-k with on-policy "
                f"steps; set train.online_dense: true for the whole distribution)")
    return (f"[train] teacher signal: top-{cfg.cache.k} (train.online_dense: auto; the whole distribution would "
            f"hold {size}, over {_gb(DENSE_AUTO_BYTES)}: set train.online_dense: true to use it anyway)")


def _gb(n: int) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e8 else f"{n / 1e6:.1f} MB"


def small_top_k_note(cfg: RunConfig, dense: bool = False) -> str | None:
    """One line naming the students that start from random init and learn through a small
    top-k: on such students bench/peer.py measured 1.7-2.3x the held-out perplexity of the
    full distribution (BENCHMARKS.md, against TRL), and 1.00-1.02x with a sampled cache of
    256 draws; None when there are none.  dense: the online teacher hands over its whole
    distribution (`dense_signal`)."""
    dense = cfg.train.mode == "online" and dense
    if cfg.cache.estimator != "topk" or cfg.cache.k >= 512 or dense:
        return None
    names = [s.name for s in cfg.students if not s.baseline and s.init == "random"
             and s.model.path is None and s.model.from_teacher is None]
    if not names:
        return None
    server = cfg.teacher.source == "server"
    ways = ["train.online_dense: true"] if cfg.train.mode == "online" and not server else []
    if not server and not cfg.on_policy_active:  # neither takes a sampled signal (config.py refuses it)
        default = ", the cached mode's default" if cfg.train.mode == "cached" else ""
        ways.append(f"cache.estimator: sampled with cache.samples: 256{default} (1.00-1.02x the full "
                    f"distribution's there)")
    return (f"[train] note: {', '.join(names)} start from random init and learn only the teacher's top-{cfg.cache.k}; "
            f"such students reached 1.7-2.3x the held-out perplexity of the full distribution in bench/peer.py: "
            f"consider {', or '.join(filter(None, [', '.join(ways), 'cache.k: 512']))}")


def schedule_note(cfg: RunConfig) -> str | None:
    """One line naming each schedule that training ends before: an `end_step` past the last
    step (the value never reaches `end`), a soft-weight `warmup_steps` at or past the steps
    (the curve never starts), an LR `warmup_steps` past them (the LR never peaks); with
    train.epochs the step count is only known here."""
    steps, late = cfg.train.steps, []

    def walk(node, key: str) -> None:
        if isinstance(node, ScheduleConfig):
            curve = node.kind != "constant"  # a constant has no end; held through warmup, it never changes
            if curve and node.end_step is not None and node.end_step >= steps:
                late.append(f"{key}.end_step {node.end_step}")
            if node.warmup_steps >= steps and (curve or node.warmup == "ramp"):
                late.append(f"{key}.warmup_steps {node.warmup_steps}")
        elif isinstance(node, BaseModel):
            for name in type(node).model_fields:
                walk(getattr(node, name), f"{key}.{name}" if key else name)
        elif isinstance(node, list):
            for i, item in enumerate(node):
                walk(item, f"{key}.{i}")

    walk(cfg.train, "train")
    walk(cfg.students, "students")
    late += [f"students.{i}.optim.warmup_steps {s.optim.warmup_steps}" for i, s in enumerate(cfg.students)
             if s.optim.warmup_steps > steps]  # the LR's warmup reaches its peak at step warmup_steps - 1
    if not late:
        return None
    return (f"[train] note: training ends after {steps} step{'s' * (steps != 1)} (schedule steps 0-{steps - 1}), before "
            f"{'; '.join(late)}: those curves (or the LR) never reach their end")


def with_epoch_steps(cfg: RunConfig, train_blocks: int, leader: bool = True) -> RunConfig:
    """cfg with train.steps counted from train.epochs over `train_blocks` (all the training
    blocks, before any student's data selection), said in one line; cfg itself without epochs."""
    epochs = cfg.train.epochs
    if epochs is None:
        return cfg
    steps = max(1, math.ceil(epochs * train_blocks / cfg.train.batch_size))
    if leader:
        print(f"[train] train.epochs {epochs:g}: {steps:,} steps of {cfg.train.batch_size} blocks "
              f"over {train_blocks:,} training blocks", flush=True)
    return cfg.model_copy(update={"train": cfg.train.model_copy(update={"steps": steps})})


def teacher_record(cfg: RunConfig, teacher, remote) -> tuple[dict, dict | None]:
    """Which teacher the students learn from, as their checkpoints record it: (the cache's
    teacher, by its identity's teacher_* keys; or the served model's name; or an in-process
    teacher's config and weights hashes, and a served model's probe: from the server, or from
    the cache it made).  Kept out of the run hash so checkpoints made before it still resume."""
    if cfg.train.mode == "cached":
        manifest = teacher.reader.manifest
        return ({k: v for k, v in manifest.get("identity", {}).items() if k.startswith("teacher_")},
                manifest.get("teacher_probe"))
    if remote is not None:
        return {"teacher_server_model": cfg.teacher.server.model}, remote.probe
    return teacher_identity(cfg.layout.teacher), None


def check_same_teacher(cfg: RunConfig, names: list[str], now: dict, probe: dict | None) -> None:
    """A resumed run learns from the teacher its checkpoints learnt from: the same record, and
    a served teacher whose probe is answered as then (teachers/server.py).  Checkpoints that
    record neither (made before 2026-12-05) are taken as they are."""
    from teachers.server import check_probe

    for name in names:
        last = latest(cfg.layout.checkpoints(name))
        meta = load_meta(last) if last is not None else {}
        then = meta.get("teacher_identity")
        if then is not None and then != now:
            changed = ", ".join(f"{k} {then.get(k)} -> {now.get(k)}" for k in sorted({*then, *now})
                                if then.get(k) != now.get(k))
            raise UserError(f"{last}: the students learnt from another teacher until this checkpoint ({changed}); "
                            f"resume with that teacher (and its cache), or start afresh in this out_dir with "
                            f"--overwrite; to train these students on from the new teacher, `distill export` them "
                            f"and start a new run with students.N.model.path set to each export")
        if last is None or probe is None:
            continue
        server = cfg.teacher.server
        tolerance = server.drift_tolerance if server else ServerConfig.model_fields["drift_tolerance"].default
        if cfg.train.mode == "cached":
            who, back = f"the cache's teacher ({cfg.layout.cache})", "a cache made from the model they learnt from"
        else:
            who, back = f"{server.model!r} at {server.url}", "the server serving the weights they learnt from"
        check_probe(meta.get("teacher_probe"), probe, tolerance, f"{who} answers", f"the checkpoints at {last.parent}",
                    f"resume with {back}, or start afresh in this out_dir with --overwrite")


def train_students(cfg: RunConfig, resume: bool = False, progress: bool = True,
                   data: PackedData | None = None, overwrite: bool = False) -> dict:
    """Co-distil every student from one teacher signal per batch.  A fresh run (not `resume`)
    into an out_dir with an earlier run's checkpoints is refused, or with `overwrite` moves
    that run aside first (`claim_out_dir`)."""
    check_online_sharding(cfg)
    rank, world = setup_runtime(cfg)
    with training_lock(cfg.layout, rank):
        return _train_students(cfg, resume, progress, data, overwrite, rank, world)


def _train_students(cfg: RunConfig, resume: bool, progress: bool, data: PackedData | None, overwrite: bool,
                    rank: int, world: int) -> dict:
    online_server = cfg.train.mode == "online" and cfg.teacher.source == "server"
    remote = server_teacher(cfg) if online_server else None  # checked before anything is written
    if not resume:  # refused before any work; with --overwrite moved aside only once the inputs check out
        claim_out_dir(cfg.layout, overwrite, rank, move=False)
    data = prepare(cfg, progress, for_the_cache=cfg.train.mode == "cached") if data is None else data
    cfg = with_epoch_steps(cfg, len(data.train), rank == 0)
    dense = cfg.train.mode == "online" and dense_signal(cfg, vocab_size_of(data.tokenizer))
    # Said once per run: at its start, whether by `train` or by `run` (which resumes by default).
    starting = not resume or not earlier_checkpoints(cfg.layout.students)
    for note in (signal_note(cfg, vocab_size_of(data.tokenizer), dense), small_top_k_note(cfg, dense),
                 schedule_note(cfg)):
        if note and rank == 0 and starting:
            print(note, flush=True)
    teacher: Teacher
    live = None
    if cfg.train.mode == "cached":
        teacher, val_teacher = open_cached_teachers(cfg, data)  # a stale cache is refused here
        views = data_views(cfg, teacher, data)  # before the students are built: a bad selection fails fast
    else:
        check_k(cfg, vocab_size_of(data.tokenizer))
        views = data_views(cfg, None, data)
        live = remote or scoring_teacher(cfg, data, resolve_device(cfg.train.device))
        teacher = val_teacher = live
    learnt_from, probe = teacher_record(cfg, teacher, remote)
    if resume:  # before the students are built: another teacher costs nothing
        check_same_teacher(cfg, [s.name for s in cfg.students], learnt_from, probe)
    models = student_models(cfg, data, live.model if live is not None else None)  # init: teacher reuses the loaded model
    if not resume:  # the inputs, students too, check out: now an earlier run may move aside
        claim_out_dir(cfg.layout, overwrite, rank)
    students = build_students(cfg, models)
    selections = {name: {"rule": v.summary["rule"], "digest": v.digest(), "blocks": v.summary["blocks_kept"]}
                  for v in views for name in v.students}
    identity = run_identity(cfg, data.fingerprint, selections if any(v.rule is not None for v in views) else None,
                            dense)
    rhash = run_hash(*identity.values())
    meta = {"data_fingerprint": data.fingerprint, "teacher": str(cfg.layout.teacher.resolve()),
            "teacher_identity": learnt_from, **({"teacher_probe": probe} if probe is not None else {}),
            "tokenizer": str(tokenizer_dir(cfg, data)),  # what `distill export` ships beside the weights
            "tokenizer_hash": data.tokenizer_hash}
    loop = loop_config(cfg, cfg.train.steps, cfg.train.batch_size, rank, world, rhash,
                       earlier_run_hashes=earlier_run_hashes(cfg, identity), run_identity=identity,
                       data_content=data.content, extra_meta=meta, selections=selections)
    on_policy = on_policy_source(cfg, teacher, data.tokenizer, loop) if cfg.train.mode == "online" else None
    result = train_loop(students, teacher, data.train, data.val, val_teacher, loop, cfg.layout,
                        resume=resume, progress=progress, views=views, on_policy=on_policy)
    result["teacher_reads"] = teacher.reads
    if rank == 0:
        result["students_info"] = {s.name: {"tokens_seen": s.tokens_seen, "targets_seen": s.targets_seen,
                                            "nonfinite_steps": s.nonfinite_steps,
                                            **({"failed": result["failed"][s.name]} if s.name in result["failed"] else {})}
                                   for s in students}
        atomic_write_json(cfg.layout.train_summary, result)
    return result


# ----------------------------------------------------------------------------- whole runs


def run_all(cfg: RunConfig, resume: bool = True, progress: bool = True, overwrite: bool = False) -> dict:
    """(pretrain) + cache + train + export + eval/report from one config.  Each stage follows
    its own rule: resumed, or (resume False) started afresh, where an earlier run's
    checkpoints are refused unless `overwrite` moves them aside.  A cache is reused when it
    was made for these inputs (teacher, tokenizer, data, k), whichever run made it."""
    check_online_sharding(cfg)

    def stage(text: str) -> None:
        if progress and is_leader():
            print(f"==> {text}", flush=True)

    # Data is prepared once (collectively, under a launcher) and shared by every stage;
    # eval runs on rank 0 alone, so it must not prepare (a barrier) by itself.
    rank, _ = setup_runtime(cfg)
    layout = cfg.layout
    if not resume:  # every stage's rule, before any of them starts; each stage moves its earlier run aside itself
        if cfg.teacher.source == "preset":
            claim_out_dir(layout.pretrain, overwrite, rank, move=False)
        claim_out_dir(layout, overwrite, rank, move=False)
    data = prepare(cfg, progress, for_the_cache=cfg.train.mode == "cached" and not overwrite)
    if cfg.teacher.source == "preset":
        if resume and (layout.teacher / "pretrain_done.json").exists():
            stage(f"teacher: the pretrained {cfg.teacher.model.preset} preset at {layout.teacher} (reused)")
        else:
            stage(f"teacher: pretraining a {cfg.teacher.model.preset} preset ({cfg.teacher.pretrain.steps} steps) "
                  f"-> {layout.teacher}")
        pretrain_teacher(cfg, resume=resume, progress=progress, data=data, overwrite=overwrite)
    if cfg.train.mode == "cached":
        if not any(m.get("complete") for m in cache_manifests(layout.cache)):  # a teacher pass is to come
            check_pretrained_finite(cfg)  # the students are built after it: a damaged one fails now
        stage(f"cache: one teacher pass over the data -> {layout.cache}")
        build_cache(cfg, progress=progress, data=data)  # a cache of these inputs is any run's: reused
    n = len(cfg.students)
    stage(f"train: {n} student{'s' if n != 1 else ''} from one teacher signal per batch ({cfg.train.mode})")
    train_students(cfg, resume=resume, progress=progress, data=data, overwrite=overwrite)
    if not is_leader():
        return {}
    stage("export: Hugging Face model dirs -> OUT/students/NAME/export")
    export_students(cfg, held_out=first_blocks(data.val, cfg.train.eval_blocks))
    stage("eval: held-out metrics, report and plots")
    report = evaluate_run(cfg, progress=progress, data=data)
    stage(f"done: {layout.report_md}")
    return report


def tokenizer_dir(cfg: RunConfig, data: PackedData) -> Path:
    """The dir of the tokenizer `data` was tokenised with: where it was loaded from (the run's
    data.tokenizer.path, a checkpoint teacher's dir, OUT/tokenizer, or another config's when
    data is shared, as the benches do), else the run's OUT/tokenizer."""
    loaded_from = getattr(data.tokenizer, "name_or_path", "")  # "" for a tokenizer made in this process
    for candidate in ([Path(loaded_from)] if loaded_from else []) + [cfg.layout.tokenizer]:
        if has_tokenizer(candidate):
            return candidate.resolve()
    return cfg.layout.tokenizer.resolve()


def export_students(cfg: RunConfig, held_out=None) -> dict[str, Path]:
    """held_out: (N, T+1) validation blocks, to measure routing without a trained expert bias.
    Each ships the tokenizer its checkpoint names (the one it trained with)."""
    layout = cfg.layout
    return {sc.name: export_checkpoint(layout.student(sc.name), layout.export(sc.name), dtype=cfg.export.dtype,
                                       held_out=held_out, overwrite=True,  # the run's own dir for it
                                       max_shard_size=cfg.export.max_shard_size)
            for sc in cfg.students}

