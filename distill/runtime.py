"""What every stage sets up before it works: ranks, devices, data, models from config,
and the teacher.  Stages (stages.py), training (train/) and evaluation (report/) share it.
"""
from __future__ import annotations

import atexit
import contextlib
import json
import os
import signal
import sys
import threading
import time
from pathlib import Path

import torch
import torch.distributed as dist

from common.errors import UserError
from distill.config import ModelConfig, RunConfig
from distill.data import PackedData, load_tokenizer, prepare_data, vocab_size_of
from distill.layout import has_tokenizer
from teachers import LiveTeacher, load_teacher_model, teacher_identity
from teachers.cache.format import Sampling


def setup_runtime(cfg: RunConfig) -> tuple[int, int]:
    """Seed, determinism and (under a launcher) torch.distributed. Returns (rank, world_size)."""
    torch.manual_seed(cfg.seed)
    if cfg.train.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and torch.cuda.is_available() and "LOCAL_RANK" in os.environ:
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))  # "cuda" then means this rank's GPU (NCCL needs it)
    uses_deepspeed = cfg.train.engine == "deepspeed" or cfg.teacher.sharding == "zero3"
    if uses_deepspeed and not torch.cuda.is_available():
        check_deepspeed_cpu_op()  # before DeepSpeed loads it (in init_distributed or initialize)
    if uses_deepspeed and world == 1 and "RANK" not in os.environ:
        # DeepSpeed on one process with no launcher: the env a 1-process launch gives (without
        # it DeepSpeed looks for MPI and fails importing mpi4py).
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(_free_port()))
    if (world > 1 or uses_deepspeed) and not dist.is_initialized():
        # Destroyed at exit, before the interpreter tears down: a gloo group left to C++ static
        # destructors aborted one ZeRO-3 rank after all its work was written ("terminate called
        # without an active exception", exit 250 from the launcher; seen once in a clean-clone CI).
        atexit.register(_destroy_process_group)
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        # The watch holds the rendezvous alone: its os._exit must not cut short anything that holds
        # a lock (DeepSpeed's init loads its CPU op under torch's build lock, which a kill leaves).
        with _rendezvous_watch(world):
            dist.init_process_group(backend)
        if uses_deepspeed:  # on the group made above: DeepSpeed's communication layer, no rendezvous of its own
            import deepspeed

            deepspeed.init_distributed(dist_backend=backend)
            if not torch.cuda.is_available():
                atexit.register(deepspeed_cpu_shm_buffer(dist.get_rank()).unlink, missing_ok=True)
    if dist.is_initialized():
        rank, world = dist.get_rank(), dist.get_world_size()
        if world > 1:
            check_ranks_agree(cfg, rank, world)
        return rank, world
    return 0, 1


WAITING_SAID_AFTER = 30.0  # seconds a rank waits for the others before it says so (then at 2x, 4x, ...)


@contextlib.contextmanager
def _rendezvous_watch(world: int):
    """While this rank waits for the others to join (torch's rendezvous, in C++: Python's signal
    handlers run only once it returns, up to its 30-minute timeout later), a thread takes Ctrl-C
    and SIGTERM (the interrupted line, exit 130: nothing is written yet) and says, after
    WAITING_SAID_AFTER s and then at doubling intervals, that the rank is still waiting and
    where.  Before, a rank whose peer never came (a wrong MASTER_PORT) sat silent, deaf to SIGTERM."""
    if threading.current_thread() is not threading.main_thread() or not hasattr(signal, "pthread_sigmask"):
        yield
        return
    from common.errors import interrupted_line

    signals = {signal.SIGINT, signal.SIGTERM}
    old_mask = signal.pthread_sigmask(signal.SIG_BLOCK, signals)  # the watcher, started now, inherits it
    done = threading.Event()
    rank, where = os.environ.get("RANK", "?"), f"{os.environ.get('MASTER_ADDR', '?')}:{os.environ.get('MASTER_PORT', '?')}"

    def watch():
        t0, say_at = time.monotonic(), WAITING_SAID_AFTER
        while not done.is_set():
            if signal.sigtimedwait(signals, 0.2) is not None:
                os.write(2, (interrupted_line() + "\n").encode())
                os._exit(130)
            waited = time.monotonic() - t0
            if waited >= say_at and not done.is_set():
                print(f"[dist] rank {rank} of {world}: waiting {waited:.0f} s for the other ranks to join at {where} "
                      f"(each must start with the same MASTER_ADDR, MASTER_PORT and WORLD_SIZE)",
                      file=sys.stderr, flush=True)
                say_at *= 2

    watcher = threading.Thread(target=watch, name="rendezvous-watch", daemon=True)
    watcher.start()
    try:
        yield
    finally:
        done.set()
        watcher.join()
        signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)  # a signal that came meanwhile is taken now


_LAUNCH_CHECKED = {"done": False}  # once a process: `distill run` sets up per stage, every rank alike


def _config_view(value):
    """The config as every rank must hold it: paths stand as "<path>" (nodes may mount the
    same share at different paths; what lies there is checked by content elsewhere)."""
    if isinstance(value, dict):
        return {k: _config_view(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_config_view(v) for v in value]
    return "<path>" if isinstance(value, Path) else value


def _flat(value, prefix: str = "") -> dict[str, object]:
    if isinstance(value, dict):
        return {k: v for key, sub in value.items() for k, v in _flat(sub, f"{prefix}{key}.").items()}
    if isinstance(value, list):
        return {k: v for i, sub in enumerate(value) for k, v in _flat(sub, f"{prefix}{i}.").items()}
    return {prefix.rstrip("."): value}


def _shared_dirs(cfg: RunConfig) -> dict[str, Path]:
    """The dirs every rank reads and writes: out_dir, and cache.dir where it is set elsewhere."""
    dirs = {"out_dir": Path(cfg.out_dir)}
    cache = Path(cfg.layout.cache)
    if cfg.cache.dir is not None and not cache.resolve().is_relative_to(Path(cfg.out_dir).resolve()):
        dirs["cache.dir"] = cache
    return dirs


SHARED_FILE_WAIT = 10.0  # seconds a rank waits for rank 0's file to show on a slow shared filesystem


def _sees(path: Path) -> bool:
    """Whether `path` shows here within SHARED_FILE_WAIT s (at once on a shared disk that is
    prompt; a node-local disk never shows it, and pays the wait once, before its error)."""
    deadline = time.monotonic() + SHARED_FILE_WAIT
    while not path.is_file():
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.25)
    return True


def check_ranks_agree(cfg: RunConfig, rank: int, world: int) -> None:
    """Every rank of a launch must run one config on one out_dir (and cache.dir).  Nothing
    compared them: a node given another `--set` (lr, batch_size) trained on with the others,
    exit 0, its weights silently off; one whose out_dir was a node-local disk resumed from step
    0 while rank 0 resumed its checkpoint, and a cache's ranks left their halves on different
    disks.  Rank 0 writes a file into each shared dir that every other rank must then see,
    and the configs (paths aside) are compared; every rank raises the same one line when they
    do not agree (or rank 0 cannot write)."""
    import socket
    import uuid

    if _LAUNCH_CHECKED["done"]:
        return
    dirs = _shared_dirs(cfg)  # each rank's own: a node-local one lacks the file rank 0 wrote in its own
    name, failed = f".launch-{uuid.uuid4().hex}", None
    if rank == 0:
        for key, d in dirs.items():
            try:
                d.mkdir(parents=True, exist_ok=True)
                (d / name).write_text(socket.gethostname())
            except OSError as e:
                failed = f"{key}: rank 0 cannot write {d} ({e.strerror or e})"
                break
    shared = [name, failed]
    dist.broadcast_object_list(shared, src=0)  # after rank 0's writes: the others look now
    name, failed = shared
    host = socket.gethostname()
    views = [None] * world
    dist.all_gather_object(views, {"blind": [k for k, d in dirs.items() if not _sees(d / name)], "host": host,
                                   "config": json.dumps(_config_view(cfg.model_dump()), sort_keys=True, default=str),
                                   "dirs": {k: str(d.resolve()) for k, d in dirs.items()}})
    dist.barrier()  # every rank has looked before the files go
    if rank == 0:
        for d in dirs.values():
            (d / name).unlink(missing_ok=True)
    if failed:
        raise UserError(failed)
    for r, v in enumerate(views):
        for key in v["blind"]:
            raise UserError(f"{key}: rank {r} ({v['host']}: {v['dirs'].get(key, '?')}) does not see the dir rank 0 "
                            f"({views[0]['host']}) writes at {views[0]['dirs'][key]} (a node-local disk, or another "
                            f"relative path there); every rank reads and writes one {key}, so put it on a filesystem "
                            f"all nodes share")
    ours = _flat(json.loads(views[0]["config"]))
    for r, v in enumerate(views[1:], start=1):
        if v["config"] != views[0]["config"]:
            theirs = _flat(json.loads(v["config"]))
            diffs = [f"{k} {ours.get(k, '(unset)')!r} -> {theirs.get(k, '(unset)')!r}"
                     for k in sorted(set(ours) | set(theirs)) if ours.get(k) != theirs.get(k)]
            raise UserError(f"rank {r} ({v['host']}) runs another config than rank 0 ({views[0]['host']}): "
                            f"{'; '.join(diffs[:4])}{' ...' if len(diffs) > 4 else ''}; every rank of a launch "
                            f"must run the same config and --set values")
    _LAUNCH_CHECKED["done"] = True


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _destroy_process_group() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def deepspeed_cpu_shm_buffer(rank: int) -> Path:
    """The shared-memory file DeepSpeed's CPU all-reduce creates for `rank` when every rank is on
    this machine (its shm.cpp names it after uid, MASTER_ADDR and MASTER_PORT).  DeepSpeed never
    unlinks it: each 2-rank run left 2 x 66 MiB in /dev/shm, which is RAM, until reboot.  Each
    rank unlinks its own at exit; the other ranks' mappings of it stay valid."""
    addr, port = os.environ.get("MASTER_ADDR", ""), os.environ.get("MASTER_PORT", "")
    return Path("/dev/shm") / f"deepspeed_allreduce_buffer_{os.getuid()}_{addr}_{port}_{rank}"


DEEPSPEED_CPU_OP = "deepspeed_shm_comm"  # DeepSpeed's CPU communication op, JIT-built by torch on first use


def lock_holders(path: Path) -> list[int]:
    """Pids of the processes that have `path` open (Linux: /proc/PID/fd); [] elsewhere."""
    target, pids = os.path.realpath(path), []
    try:
        procs = [p for p in os.listdir("/proc") if p.isdigit()]
    except OSError:
        return []
    for pid in procs:
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:  # gone, or another user's
            continue
        for fd in fds:
            try:
                if os.readlink(f"/proc/{pid}/fd/{fd}") == target:
                    pids.append(int(pid))
                    break
            except OSError:
                continue
    return pids


def stale_build_lock(name: str = DEEPSPEED_CPU_OP, settle: float = 0.5) -> Path | None:
    """The `lock` file of torch's JIT build of extension `name` if no process holds it: left by
    a process killed while it built (or checked) the op.  torch waits on any `lock` there, forever
    and silently, before it loads the op; the process that made it keeps it open until it deletes
    it, so one that nobody has open, still there `settle` s later (past the instant between that
    close and the delete), is stale.  None on platforms without /proc (where the op is not built)."""
    if not os.path.isdir("/proc/self/fd"):
        return None
    try:
        from torch.utils.cpp_extension import _get_build_directory
    except ImportError:
        return None
    lock = Path(_get_build_directory(name, verbose=False)) / "lock"
    seen = None
    for attempt in range(2):
        try:
            ino = lock.stat().st_ino
        except FileNotFoundError:
            return None
        if lock_holders(lock) or (seen is not None and ino != seen):  # in use, or a new build's
            return None
        seen = ino
        if attempt == 0:
            time.sleep(settle)
    return lock


def check_deepspeed_cpu_op() -> None:
    """Refuse to start a DeepSpeed run on CPU that would wait forever on a stale build lock."""
    lock = stale_build_lock(DEEPSPEED_CPU_OP)
    if lock is not None:
        raise UserError(f"DeepSpeed's CPU communication op ({DEEPSPEED_CPU_OP}) is locked by {lock}, left by a "
                        f"run killed while it built the op (no running process holds the file); every DeepSpeed "
                        f"run on CPU would wait on it forever. Delete that file and run again")


def is_leader() -> bool:
    """Rank 0, or the only process."""
    return not dist.is_initialized() or dist.get_rank() == 0


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    if precision == "auto":
        return torch.bfloat16 if device.type == "cuda" else None
    return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            # this node's rank where the launcher says it (a node may show more GPUs than it runs ranks)
            rank = int(os.environ.get("LOCAL_RANK", dist.get_rank() if dist.is_initialized() else 0))
            return torch.device("cuda", rank % torch.cuda.device_count())
        return torch.device("cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"device {name!r} requested but CUDA is not available; use device: auto or cpu")
    return dev


def prepare(cfg: RunConfig, progress: bool = False, for_the_cache: bool = False) -> PackedData:
    """Packed data; a checkpoint teacher's own tokenizer is used unless one is named.
    for_the_cache: the run reads (or resumes) the cache at cfg.layout.cache, so a cache of
    other data is refused before new blocks are prepared, not after (hours at scale)."""
    if cfg.teacher.source == "checkpoint" and cfg.data.tokenizer.path is None and cfg.teacher.path is not None:
        if not has_tokenizer(cfg.teacher.path):
            # A BPE trained here would give the teacher's ids other meanings: every signal wrong.
            raise UserError(f"teacher.path: {cfg.teacher.path} holds no tokenizer (tokenizer.json or "
                            f"tokenizer_config.json); the teacher's "
                            f"signal is over its own token ids, so set data.tokenizer.path to its tokenizer's dir")
        cfg.data.tokenizer.path = cfg.teacher.path
    check_teacher_tokenizer(cfg)  # before the corpus is tokenised with it
    check_student_tokenizers(cfg)  # and before the teacher's pass: a run that cannot train costs nothing
    check_cut_students(cfg)
    # Under a launcher, rank 0 builds the tokenizer and blocks; the others then reuse them.
    leader = is_leader()
    if not leader:
        dist.barrier()
    check = (lambda fp: refuse_other_data_cache(cfg.layout.cache, fp)) if for_the_cache else None
    data = prepare_data(cfg.data, cfg.out_dir, progress=progress, before_building=check)
    if leader and dist.is_initialized():
        dist.barrier()
    return data


def check_teacher_tokenizer(cfg: RunConfig) -> None:
    """A named data.tokenizer.path must give a checkpoint teacher's tokens the teacher's ids:
    the signal is over them, so read through another tokenizer every target is wrong (a run
    did that silently, teacher NLL 8 against 2.6).  One the loader cannot read is left for
    data preparation to name."""
    from transformers import AutoTokenizer

    t, named = cfg.teacher, cfg.data.tokenizer.path
    if t.source != "checkpoint" or t.path is None or named is None or not has_tokenizer(t.path) \
            or Path(named).resolve() == Path(t.path).resolve():
        return
    try:
        run = AutoTokenizer.from_pretrained(str(named), local_files_only=True)
    except Exception:
        return
    differ = _other_ids(t.path, run, "teacher.path")
    if differ:
        raise UserError(f"teacher.path: its tokenizer ({t.path}) is not the run's (data.tokenizer.path {named}): "
                        f"{differ}; remove data.tokenizer.path to use the teacher's, or name a tokenizer with the "
                        f"teacher's ids")


def check_student_tokenizers(cfg: RunConfig) -> None:
    """Every pretrained student's own tokenizer gives the run's tokens their ids, checked as soon
    as the run's tokenizer is named (check_student_vocab checks again when the student is built,
    which in `distill run` comes after the whole teacher pass)."""
    from transformers import AutoTokenizer

    named = cfg.data.tokenizer.path
    pretrained = [s for s in cfg.students if s.model.path is not None]
    if named is None or not pretrained:
        return
    try:
        run = AutoTokenizer.from_pretrained(str(named), local_files_only=True)
    except Exception:
        return  # data preparation names it
    for s in pretrained:  # an embedding smaller than the tokenizer, from config.json alone (no weights read)
        rows = _config_vocab(s.model.path)
        if rows is not None and rows < vocab_size_of(run):
            raise UserError(f"student {s.name}: its embedding has {rows} rows but the run's tokenizer ({named}) has "
                            f"{vocab_size_of(run)} tokens: a different tokenizer; use a student of the same family")
    for s in (s for s in pretrained if has_tokenizer(s.model.path)):
        if Path(s.model.path).resolve() != Path(named).resolve():
            differ = _other_ids(s.model.path, run, f"student {s.name}", f"remove it to use the run's tokenizer ({named})")
            if differ:
                raise UserError(_other_tokenizer(s.name, s.model.path, named, differ))


def _config_vocab(model_dir) -> int | None:
    """The vocab_size a Hugging Face dir's config.json declares (its text config's, for a
    multimodal one); None when it says none or cannot be read."""
    try:
        config = json.loads((Path(model_dir) / "config.json").read_text())
    except (OSError, ValueError):
        return None
    for node in (config.get("text_config"), config) if isinstance(config, dict) else ():
        if isinstance(node, dict) and isinstance(node.get("vocab_size"), int):
            return node["vocab_size"]
    return None


def cut_layer_spec(t_config, overrides: dict, default: str, where: str) -> tuple[int, list[int] | str]:
    """(how many layers, which) of a student cut from the teacher: `which` is a list of teacher
    layer indices, `auto` (chosen by calibration) or `even`.  t_config: the teacher's text config."""
    from students.derive import student_layer_count

    keep, num = student_layer_count(t_config, overrides), t_config.num_hidden_layers
    if not 1 <= keep <= num:
        raise UserError(f"{where}: cannot keep {keep} of the teacher's {num} layers")
    spec = overrides.get("layers", default)
    if spec in ("auto", "even") or isinstance(spec, list) and all(isinstance(t, int) for t in spec):
        return keep, spec
    raise UserError(f"{where}.layers: give a list of teacher layer indices or `auto`, not {spec!r}")


def check_cut_students(cfg: RunConfig) -> None:
    """A student cut from a checkpoint teacher (`model.from_teacher`) names fields of the
    teacher's config and teacher layers: both are checked against the checkpoint's config
    here, before data preparation and the teacher's pass (the student itself is built after
    them).  `layers: auto` is checked by its count; the calibration picks which later."""
    from students.derive import derive_config, even_layers

    from transformers import AutoConfig

    cut = [(i, s) for i, s in enumerate(cfg.students) if s.model.from_teacher is not None]
    if not cut or cfg.teacher.source != "checkpoint" or cfg.teacher.path is None:
        return
    try:
        t_config = AutoConfig.from_pretrained(str(cfg.teacher.path), local_files_only=True).get_text_config()
    except Exception:
        return  # loading the teacher says what is wrong with it
    for i, s in cut:
        where = f"students.{i}.model.from_teacher"
        overrides = dict(s.model.from_teacher)
        keep, spec = cut_layer_spec(t_config, overrides, s.init_layers or "even", where)
        try:
            derive_config(t_config, overrides, spec if isinstance(spec, list) else even_layers(keep, t_config.num_hidden_layers))
        except (ValueError, TypeError) as e:
            raise UserError(f"{where}: {e}") from None


def _other_tokenizer(name: str, model_dir, run_tok_dir, differ: str) -> str:
    return f"student {name}: its tokenizer ({model_dir}) is not the run's ({run_tok_dir}): {differ}; " \
           f"distil between models of one tokenizer"


def model_config(model_cfg: ModelConfig, tokenizer, where: str):
    """A transformers config from a preset; vocab defaults to the tokenizer's real size, and
    its bos / eos ids are the tokenizer's (the config class's defaults, e.g. Llama's eos 2, name
    other tokens of another tokenizer, and the export's config.json carries them).  Not the pad
    id: the embedding would keep that row at zero, untrained, and a tokenizer's pad is often
    its eos."""
    from students.presets import PRESETS

    vocab_size = vocab_size_of(tokenizer)
    args = dict(model_cfg.args)
    args.setdefault("vocab_size", vocab_size)
    if args["vocab_size"] < vocab_size:
        raise UserError(f"{where}.model.args.vocab_size={args['vocab_size']} is smaller than the tokenizer's "
                        f"{vocab_size} tokens; remove it to use the tokenizer's size")
    try:
        config = PRESETS[model_cfg.preset](**args)
    except (TypeError, ValueError) as e:
        raise UserError(f"{where}.model.args: {e}") from None
    for name in ("bos_token_id", "eos_token_id"):
        setattr(config, name, getattr(tokenizer, name, None))
    return config


def check_student_vocab(cfg: RunConfig, name: str, model_dir, model_vocab: int, tokenizer) -> None:
    """A pretrained student must speak the run's tokenizer (the teacher's signal is over its ids).

    Refused: a tokenizer saved beside the student that maps any of the run's tokens to
    another id, or an embedding smaller than the tokenizer.  Said: extra embedding rows
    (vocab padding, e.g. 151,936 vs 152,064) or extra tokens of the student's own; the
    run's tokenizer never produces those ids, so they are never targets."""
    run_tok_dir = cfg.layout.tokenizer
    n = vocab_size_of(tokenizer)
    extra: list[str] = []  # tokens of the student's own tokenizer that the run's lacks
    if has_tokenizer(model_dir):
        differ, extra = _other_ids(model_dir, tokenizer, f"student {name}",
                                   f"remove it to use the run's tokenizer ({run_tok_dir})", with_extra=True)
        if differ:  # (the teacher's own tokenizer was checked against the run's when the data was prepared)
            raise UserError(_other_tokenizer(name, model_dir, run_tok_dir, differ))
    if model_vocab < n:
        raise UserError(f"student {name}: its embedding has {model_vocab} rows but the run's tokenizer "
                        f"({run_tok_dir}) has {n} tokens: a different tokenizer; use a student of the same family")
    if not is_leader():
        return
    if extra:  # e.g. a chat model's <think>, <tool_call>: its export would quietly lose them
        shown = ", ".join(repr(t) for t in extra[:4]) + (", ..." if len(extra) > 4 else "")
        print(f"[vocab] student {name}: its tokenizer ({model_dir}) has {len(extra)} tokens the run's lacks "
              f"({shown}); the run never produces them, and its export ships the run's tokenizer, without them "
              f"(`distill export CKPT --tokenizer {model_dir}` ships the student's own)", file=sys.stderr)
    if model_vocab > n + len(extra):
        own = f" and the {len(extra)} of its own" if extra else ""
        print(f"[vocab] student {name}: embedding has {model_vocab} rows for the run tokenizer's {n} tokens{own}; "
              f"the {model_vocab - n - len(extra)} padding rows are never targets", file=sys.stderr)


def _other_ids(model_dir, tokenizer, who: str, fix: str = "", with_extra: bool = False):
    """'' if the tokenizer saved in model_dir gives every token of the run's tokenizer its id
    (extra tokens of its own are fine: the run never produces them); else how many differ,
    with an example.  with_extra: also those extra tokens, by id: (message, tokens)."""
    from transformers import AutoTokenizer

    try:
        own = AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True).get_vocab()
    except Exception as e:
        raise UserError(f"{who}: the tokenizer in {model_dir} could not be loaded ({type(e).__name__})"
                        + (f"; {fix}" if fix else "")) from None
    run = tokenizer.get_vocab()
    differ = sorted((t for t, i in run.items() if own.get(t) != i), key=run.get)  # the example: the lowest id
    said = f"{len(differ)} of {len(run)} tokens have other ids (e.g. {differ[0]!r})" if differ else ""
    if not with_extra:
        return said
    return said, sorted((t for t in own if t not in run), key=own.get)


def check_k(cfg: RunConfig, vocab: int) -> None:
    c = cfg.cache
    if c.k > vocab:
        raise UserError(f"cache.k={c.k} is larger than the vocabulary ({vocab} tokens); choose k <= {vocab}")
    if c.estimator == "sampled" and c.exact_top and c.exact_top + c.samples > vocab:
        raise UserError(f"cache.exact_top + cache.samples = {c.exact_top + c.samples} entries per token is more than "
                        f"the vocabulary ({vocab} tokens); make them add up to at most {vocab}")


# train.online_dense: auto hands students the teacher's dense logits when one step's fp32
# (tokens, V) logits fit in this: 1.66 GB at the default 8 x 256 tokens and V = 202,048.
DENSE_AUTO_BYTES = 2 << 30


def dense_logits_bytes(cfg: RunConfig, vocab: int) -> int:
    """Bytes of one step's fp32 teacher logits (batch_size x seq_len x V x 4): the loop scores
    every micro-batch of a step before the students train on them, so all of them are held at
    once.  Counted over the global batch (a rank holds its share), so the choice never
    depends on the number of ranks."""
    return cfg.train.batch_size * cfg.data.seq_len * vocab * 4


def dense_signal(cfg: RunConfig, vocab: int) -> bool:
    """Whether the online teacher hands students its whole distribution (train.online_dense).
    auto: yes in online mode with an in-process teacher, a top-k signal and no on-policy
    steps (their signal spans students x prompts x completion tokens) when a step's logits
    fit DENSE_AUTO_BYTES.  A server teacher returns top-k only (true is refused at config check)."""
    if cfg.train.online_dense != "auto":
        return bool(cfg.train.online_dense)
    return (cfg.train.mode == "online" and cfg.teacher.source != "server" and cfg.cache.estimator == "topk"
            and not cfg.on_policy_active and dense_logits_bytes(cfg, vocab) <= DENSE_AUTO_BYTES)


def existing_teacher_dir(cfg: RunConfig):
    path = cfg.layout.teacher
    if not path.is_dir():
        hint = "run `distill pretrain` first" if cfg.teacher.source == "preset" else "check teacher.path"
        raise UserError(f"teacher dir {path} does not exist; {hint}")
    return path


def teacher_model(cfg: RunConfig):
    return load_teacher_model(existing_teacher_dir(cfg))


def sampling_of(cfg: RunConfig) -> Sampling | None:
    """The draws of a sampled signal (cache.estimator: sampled), seeded by the run's seed."""
    c = cfg.cache
    seed = cfg.seed if c.sample_seed is None else c.sample_seed
    return Sampling(c.samples, c.sample_temperature, seed, c.exact_top) if c.estimator == "sampled" else None


def cache_identity(cfg: RunConfig, data: PackedData) -> dict:
    """What a cache must have been made from to serve this run (its estimator included).  A
    server teacher is named by its served model (not its url: a restarted server resumes the
    cache) and the kind of signal it gives (raw T=1 log-probs, entropy from the top-k)."""
    sampling = sampling_of(cfg)
    if cfg.teacher.source == "server":
        from teachers.server import IDENTITY_NOTE

        teacher = {"teacher_server_model": cfg.teacher.server.model, "teacher_signal": IDENTITY_NOTE}
    else:
        teacher = teacher_identity(cfg.layout.teacher)
    return {**teacher, "tokenizer_hash": data.tokenizer_hash,
            "data_fingerprint": data.fingerprint, **({"data_content": data.content} if data.content else {}),
            "seq_len": str(data.seq_len),
            "vocab_size": str(vocab_size_of(data.tokenizer)), **(sampling.identity() if sampling else {})}


def cache_manifests(cache_dir: Path) -> list[dict]:
    """The manifests of the cache at cache_dir, complete or begun (per rank); a torn one is
    left out (the writer reports it)."""
    found = []
    for path in sorted(cache_dir.glob("manifest*.json")) if cache_dir.is_dir() else []:
        try:
            found.append(json.loads(path.read_text()))
        except (OSError, ValueError):
            continue
    return found


def refuse_other_data_cache(cache_dir: Path, fingerprint: str) -> None:
    """UserError when the cache at cache_dir (complete or begun) was made from data of another
    fingerprint: the run would refuse it once the data is prepared."""
    for manifest in cache_manifests(Path(cache_dir)):
        have = manifest.get("identity", {}).get("data_fingerprint")
        if have not in (None, fingerprint):
            raise UserError(f"cache at {cache_dir} was made from other data (fingerprint {have} != {fingerprint}: a "
                            f"data file, the tokenizer or a data setting changed), said before the new data is "
                            f"prepared; give the data it was made from, or make it again with `distill cache "
                            f"--overwrite` (or `distill run --overwrite`)")


def check_cached_blocks(cache_dir: Path, data: PackedData, by_fingerprint: bool = True) -> None:
    """The cache's blocks are the data's: by fingerprint (unless not `by_fingerprint`), and also
    where the fingerprint cannot tell, by what the blocks hold (recorded since
    teachers/cache/format.py RECORDED_SINCE; data prepared or cached before that records no
    content and is taken by fingerprint)."""
    try:
        ident = json.loads((Path(cache_dir) / "manifest.json").read_text()).get("identity", {})
    except (OSError, ValueError):
        return  # the reader reports it
    if by_fingerprint and ident.get("data_fingerprint") not in (None, data.fingerprint):
        raise UserError(f"cache at {cache_dir} was made from other data (fingerprint "
                        f"{ident.get('data_fingerprint')} != {data.fingerprint}); rerun `distill cache --overwrite`, "
                        f"or give the data it was made from")
    have = ident.get("data_content")
    if ident.get("data_fingerprint") == data.fingerprint and have and data.content and have != data.content:
        raise UserError(f"cache at {cache_dir} holds the teacher's signal for other blocks: the data was prepared "
                        f"again under the same fingerprint and came out different (an edit that kept a large file's "
                        f"size, which the fingerprint's sampling missed); rerun `distill cache --overwrite`")


def server_teacher(cfg: RunConfig):
    """The vLLM-served teacher (teachers/server.py), its handshake passed.  Called before
    anything is written: a server that is down or mismatched costs the run nothing."""
    from teachers.server import ServerTeacher

    s, tok = cfg.teacher.server, load_tokenizer(cfg.data.tokenizer.path)
    check_k(cfg, vocab_size_of(tok))
    teacher = ServerTeacher(s.url, s.model, cfg.cache.k, vocab_size_of(tok), timeout_s=s.timeout_s,
                            max_retries=s.max_retries, max_inflight_tokens=s.max_inflight_tokens)
    teacher.handshake(tok, cfg.data.tokenizer.path, cfg.data.seq_len)
    return teacher


def live_teacher(cfg: RunConfig, data: PackedData, device: torch.device) -> LiveTeacher:
    return LiveTeacher(teacher_model(cfg), cfg.cache.k, vocab_size_of(data.tokenizer), device,
                       autocast_dtype(cfg.train.precision, device),
                       keep_dense=dense_signal(cfg, vocab_size_of(data.tokenizer)),
                       sampling=sampling_of(cfg))


# The one registry of teachers a run can score batches with, by teacher.source ("cache" has
# none: it only replays).  A server teacher is checked against its server when made.
TEACHER_SOURCES = {
    "preset": live_teacher,
    "checkpoint": live_teacher,
    "server": lambda cfg, data, device: server_teacher(cfg),
}


def scoring_teacher(cfg: RunConfig, data: PackedData, device: torch.device):
    """The teacher of `cfg.teacher.source` that scores batches (online training, evaluation)."""
    return TEACHER_SOURCES[cfg.teacher.source](cfg, data, device)
