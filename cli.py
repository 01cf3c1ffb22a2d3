"""`distill`: co-distil one teacher into several students from a single teacher pass.

Each command parses, validates and calls one function in `distill.stages`.
Bad input prints one line and exits 2; `--debug` shows the traceback instead.
"""
from __future__ import annotations

import atexit
import gc
import logging
import os
import re
import sys
import traceback
from pathlib import Path
from typing import Optional

import typer
import yaml

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    rich_markup_mode=None,
    pretty_exceptions_enable=False,
    help="Co-distil one large (MoE) teacher into several students from one teacher pass.",
)

ConfigOpt = typer.Option(..., "--config", "-c", help="Run config (YAML). `distill init` writes an example.")
SetOpt = typer.Option(None, "--set", help="Override a config key, e.g. --set train.steps=50 (repeatable; value parsed as YAML).")
QuietOpt = typer.Option(False, "--quiet", "-q", help="No progress bars; log lines only.")
OverwriteOpt = typer.Option(False, "--overwrite", help="A fresh run into an out_dir with an earlier run's checkpoints "
                            "moves that run aside to OUT/replaced-TIME/ (pretrain: OUT/pretrain/replaced-TIME/; "
                            "without it, such a run is refused).")


def _fresh_or_resume(resume: bool, overwrite: bool) -> None:
    from common.errors import UserError

    if resume and overwrite:
        raise UserError("--resume continues the run in out_dir and --overwrite replaces it: give one of them")


def _overrides(pairs: Optional[list[str]]) -> dict:
    from common.errors import UserError

    out = {}
    for pair in pairs or []:
        if "=" not in pair:
            raise UserError(f"--set {pair!r}: expected KEY=VALUE, e.g. --set train.steps=50")
        key, value = pair.split("=", 1)
        try:
            out[key.strip()] = yaml.safe_load(value)
        except yaml.YAMLError as e:
            problem = getattr(e, "problem", None) or type(e).__name__
            inner = value.strip()
            quoted = f'["{inner[1:-1]}"]' if inner.startswith("[") and inner.endswith("]") else f'"{inner}"'
            raise UserError(f"--set {pair!r}: the value is not valid YAML ({problem}); quote it: "
                            f"--set '{key.strip()}={quoted}'") from None
    return out


def _load(config: Path, sets: Optional[list[str]]):
    """The whole config checked before any stage starts: schema first (no torch), then
    what the registries below must judge, then the input paths."""
    from distill.config import check_config, check_inputs_exist, load_config

    overrides = _overrides(sets)
    cfg = load_config(config, overrides)
    check_config(cfg, str(config), tuple(overrides))
    check_inputs_exist(cfg)
    return cfg


@app.callback()
def _options(
    debug: bool = typer.Option(False, "--debug", help="Show full tracebacks on errors."),
):
    """(`--debug` is read by `main` before the command runs.)"""


@app.command()
def init(
    path: Path = typer.Argument(Path("distill.yaml"), help="Where to write the commented example config."),
    force: bool = typer.Option(False, "--force", help="Overwrite an existing file."),
):
    """Write a commented example config to PATH."""
    from distill.config import write_example_config

    write_example_config(path, force=force)
    typer.echo(f"wrote {path}")


@app.command()
def demo(
    out: Path = typer.Option(Path("runs/demo"), "--out", help="Output dir for every artefact."),
    quick: bool = typer.Option(False, "--quick", help="Small sizes and few steps (about 6 minutes on 2 quiet CPU cores; what `make demo` runs)."),
    tiny: bool = typer.Option(False, "--tiny", hidden=True, help="Smallest sizes (for tests)."),
    resume: bool = typer.Option(True, "--resume/--no-resume", help="Continue from finished stages and checkpoints in OUT."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Start afresh, moving an earlier demo run in OUT aside to OUT/replaced-TIME/."),
    quiet: bool = QuietOpt,
):
    """Run the embedded default end to end, offline: stdlib corpus, pretrain a teacher, cache, co-distil, eval, export, report."""
    from distill.demo import run_demo

    run_demo(out, size="tiny" if tiny else "quick" if quick else "full", resume=resume and not overwrite,
             progress=not quiet, overwrite=overwrite)


@app.command()
def pretrain(
    config: Path = ConfigOpt,
    sets: Optional[list[str]] = SetOpt,
    resume: bool = typer.Option(True, "--resume/--no-resume", help="Continue from the last pretraining checkpoint."),
    overwrite: bool = OverwriteOpt,
    quiet: bool = QuietOpt,
):
    """Train the teacher from scratch with plain CE (teacher.source: preset); saves OUT/teacher."""
    resume = resume and not overwrite  # --overwrite: a fresh pretraining run
    cfg = _load(config, sets)  # validate before importing torch-heavy modules
    from distill.stages import pretrain_teacher

    pretrain_teacher(cfg, resume=resume, progress=not quiet, overwrite=overwrite)


@app.command()
def prepare(
    config: Path = ConfigOpt,
    sets: Optional[list[str]] = SetOpt,
    quiet: bool = QuietOpt,
):
    """Tokenise and pack the data into OUT/data (resumes if interrupted); every other command reuses it."""
    cfg = _load(config, sets)
    from distill.runtime import prepare as prepare_run_data

    data = prepare_run_data(cfg, progress=not quiet)
    print(f"[data] {data.train.root}: {len(data.train):,} train and {len(data.val):,} validation blocks", file=sys.stderr)


@app.command()
def cache(
    config: Path = ConfigOpt,
    sets: Optional[list[str]] = SetOpt,
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace a cache made by another teacher/tokenizer/data/k."),
    quiet: bool = QuietOpt,
):
    """Run the teacher once over the data and cache its signal: 256 draws per token by default, or its top-k (cache.estimator); resumes if interrupted."""
    cfg = _load(config, sets)  # validate before importing torch-heavy modules
    from distill.stages import build_cache

    build_cache(cfg, overwrite=overwrite, progress=not quiet)


@app.command()
def train(
    config: Path = ConfigOpt,
    sets: Optional[list[str]] = SetOpt,
    resume: bool = typer.Option(False, "--resume", help="Continue every student from its last committed checkpoint."),
    overwrite: bool = OverwriteOpt,
    quiet: bool = QuietOpt,
):
    """Co-distil all students: one teacher signal per batch, shared by every student."""
    _fresh_or_resume(resume, overwrite)
    cfg = _load(config, sets)  # validate before importing torch-heavy modules
    from distill.stages import train_students

    train_students(cfg, resume=resume, progress=not quiet, overwrite=overwrite)


@app.command()
def run(
    config: Path = ConfigOpt,
    sets: Optional[list[str]] = SetOpt,
    resume: bool = typer.Option(True, "--resume/--no-resume", help="Continue finished stages and checkpoints."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Start the teacher's pretraining and the students' "
                                   "training afresh, moving an earlier run's checkpoints aside to OUT/replaced-TIME/ (a "
                                   "cache made for the same inputs is reused)."),
    quiet: bool = QuietOpt,
):
    """cache (or pretrain + cache) + train + export + eval + report, from one config."""
    resume = resume and not overwrite  # --overwrite: every stage afresh
    cfg = _load(config, sets)  # validate before importing torch-heavy modules
    from distill.stages import run_all

    run_all(cfg, resume=resume, progress=not quiet, overwrite=overwrite)


@app.command()
def export(
    checkpoint: Path = typer.Argument(..., help="A student checkpoint dir (OUT/students/NAME/checkpoints/step_00000120, the step zero-padded to 8 digits) or a student dir (its latest checkpoint)."),
    out: Path = typer.Option(..., "--out", help="Where to write the Hugging Face model dir."),
    dtype: str = typer.Option("fp32", "--dtype", help="fp32, bf16 or fp16."),
    max_shard_size: str = typer.Option("2GB", "--max-shard-size", help="The largest safetensors file (e.g. 5GB, 500MB); a larger model is split into shards with an index."),
    tokenizer: Optional[Path] = typer.Option(None, "--tokenizer", help="Tokenizer dir to include (default: the one the checkpoint's run trained with)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace the --out dir whatever it holds, but never the checkpoint being exported or a run's, cache's or prepared data's dir (without it: only an empty dir or an earlier export of this student from this run)."),
):
    """Write a standard Hugging Face model dir (config, safetensors, tokenizer, model card)."""
    from distill.report.export import export_checkpoint

    path = export_checkpoint(checkpoint, out, dtype=dtype, tokenizer_dir=tokenizer, overwrite=overwrite,
                             max_shard_size=max_shard_size)
    typer.echo(f"exported {path}")


@app.command("eval")
def eval_(
    config: Path = ConfigOpt,
    sets: Optional[list[str]] = SetOpt,
    quiet: bool = QuietOpt,
):
    """Evaluate the teacher and every student on the held-out split; write report.json, report.md and plots."""
    cfg = _load(config, sets)  # validate before importing torch-heavy modules
    from distill.report.report import evaluate_run

    evaluate_run(cfg, progress=not quiet)


@app.command()
def inspect(
    path: Path = typer.Argument(..., help="Prepared data (OUT/data), a cache dir, a checkpoint dir (or a student dir: its "
                                          "latest), an exported model dir, or a whole run dir OUT (its data, cache, "
                                          "teacher, and each student's latest checkpoint and export)."),
    verify: bool = typer.Option(False, "--verify", help="Check every shard's checksum; exit 1 naming a bad shard."),
):
    """Describe (and optionally verify) prepared data, a cache, checkpoint or model dir."""
    from distill.report.inspect import inspect_path

    ok = inspect_path(path, verify=verify)
    raise typer.Exit(0 if ok else 1)


def offline_and_quiet() -> None:
    """No downloads at run time, ever; our own progress bars and one-line errors replace the
    libraries' chatter.  Set by the entry point, before any of them is imported."""
    for key, value in {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
                       "TRANSFORMERS_VERBOSITY": "error", "HF_HUB_DISABLE_PROGRESS_BARS": "1"}.items():
        os.environ.setdefault(key, value)
    import warnings

    # DeepSpeed's ZeRO collectives call torch names torch deprecates: one warning per call, every step.
    warnings.filterwarnings("ignore", message=r"`torch\.distributed\.\w+` is deprecated", category=FutureWarning)
    # Imported along with transformers, DeepSpeed says on every CPU command (prepare, export)
    # that it found no GPU: a CPU run knows.  (Its logger is this one; the filter outlives its setup.)
    logging.getLogger("DeepSpeed").addFilter(lambda record: "Setting accelerator to CPU" not in record.getMessage())


def _out_of_room(e: Exception, debug: bool) -> None:
    """A write that failed for the disk (full, over quota, read-only) wherever no stage named
    it: one line naming the path, exit 2; anything else goes on as the error it is."""
    from common.fsutil import describe_os_error, write_error_in

    failed = write_error_in(e)
    if failed is None:
        return
    if debug:
        traceback.print_exc()
    typer.echo(f"error: {describe_os_error(failed, Path(failed.filename or '(a file under out_dir)'))}", err=True)
    sys.exit(2)


# What a collective raises on this rank when another rank of the launch has exited: gloo's
# socket errors (a RuntimeError), torch's DistError kinds (NCCL's, the store's).
_PEER_GONE = ("Connection closed by peer", "Connection reset by peer", "Broken pipe")


def _peer_stopped(e: Exception, debug: bool) -> None:
    """Under a launcher, a rank whose collective failed because another rank stopped first (bad
    input found there, a crash): one line, exit 1; the other rank's own error says why, and its
    traceback here would bury that line.  Anything else goes on as the error it is."""
    import torch.distributed as dist

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return
    if not (isinstance(e, dist.DistError) or any(m in str(e) for m in _PEER_GONE)):
        return
    if debug:
        traceback.print_exc()
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    first = re.sub(r"^\[[^\]]*\.(cc|cpp|h):\d+\] ", "", first)  # gloo's source location
    typer.echo(f"error: rank {os.environ.get('RANK', '?')}: stopped because another rank of the launch stopped first "
               f"({first[:160]}); its output says why (an error, a signal, or a run that ended sooner)", err=True)
    sys.exit(1)


def main() -> None:
    """The CLI, and its exit: under a launcher (or DeepSpeed on one process: `RANK` is set) the
    atexit handlers run (they destroy the process group and unlink DeepSpeed's shared-memory
    buffer), output is flushed, and the process ends without the interpreter's teardown.  There
    C++ static destructors of DeepSpeed's CPU communication op or gloo aborted a ZeRO-3 rank
    after all its work was written ("terminate called without an active exception": exit 250
    from the launcher, in 2 clean-clone CI runs of about 20)."""
    try:
        _main()
        code = 0
    except SystemExit as e:
        if "RANK" not in os.environ:
            raise
        code = e.code if isinstance(e.code, int) else 0 if e.code is None else 1
    except KeyboardInterrupt:  # a second Ctrl-C while the first one's exit was under way (its line said)
        if "RANK" not in os.environ:
            sys.exit(130)
        code = 130
    if "RANK" in os.environ:
        atexit._run_exitfuncs()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def _main() -> None:
    from common.errors import UserError

    offline_and_quiet()
    _stop_on_sigterm()
    debug = "--debug" in sys.argv
    stdout_at_start = _stdout_identity()
    # The deepspeed launcher appends --local_rank=N; the rank also comes in LOCAL_RANK.
    sys.argv = [a for a in sys.argv if not a.startswith("--local_rank")]
    try:
        # standalone_mode=False makes click *return* a `typer.Exit`'s code (inspect --verify's 1)
        # instead of exiting with it; a command's own return value is never an int.
        code = app(standalone_mode=False)
        if code == 130:  # typer >= 0.16 turns Ctrl-C into this return, silently
            interrupted()
        if isinstance(code, int) and code != 0:
            sys.exit(code)
    except UserError as e:
        if _after_interrupt(e):
            interrupted()
        if debug:
            traceback.print_exc()
        typer.echo(f"{'' if e.exit_code == 130 else 'error: '}{e}", err=True)  # a stop asked for is no error
        sys.exit(e.exit_code)
    except (typer.Exit, SystemExit) as e:
        code = getattr(e, "exit_code", getattr(e, "code", 0))
        if code == 1 and (_stdout_identity() != stdout_at_start or type(sys.stdout).__name__ == "PacifyFlushWrapper"):
            # `distill inspect ... | head`: the reader left.  rich met the EPIPE and pointed fd 1 at
            # /dev/null, or click wrapped sys.stdout, and either exits 1, which here means a failed
            # --verify.  141 = 128 + SIGPIPE, what a shell reports for a process a closed pipe stopped.
            sys.exit(141)
        sys.exit(code if isinstance(code, int) else 0)
    except KeyboardInterrupt:
        interrupted()
    except Exception as e:  # click usage errors carry their own exit code
        usage, abort = _click_exceptions()
        if isinstance(e, usage):
            e.show()
            sys.exit(e.exit_code)
        if isinstance(e, abort) or _after_interrupt(e):  # click's form of Ctrl-C; or a library's error it caused
            interrupted()
        _out_of_room(e, debug)
        _peer_stopped(e, debug)
        raise
    finally:
        # Everything imported so far (torch, transformers: millions of objects) is left out of
        # the collections the interpreter runs as it exits: about 1 s less per command.
        gc.freeze()


def _stdout_identity() -> tuple[int, int] | None:
    """(device, inode) of what fd 1 is now: it changes when a broken-pipe handler swaps in /dev/null."""
    try:
        st = os.fstat(1)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def _after_interrupt(e: BaseException) -> bool:
    """Whether `e` was raised while a Ctrl-C or SIGTERM unwound: datasets' worker pool, stopped
    mid-map, raises a TimeoutError of its own over the KeyboardInterrupt (a traceback, exit 1)."""
    seen = set()
    while e is not None and id(e) not in seen:
        if isinstance(e, KeyboardInterrupt):
            return True
        seen.add(id(e))
        e = e.__cause__ or e.__context__
    return False


def _stop_on_sigterm() -> None:
    """SIGTERM (a scheduler's preemption, `kill`) stops a command as Ctrl-C does: its cleanups
    run (temporary files, locks) and it says so, exit 130.  Training handles it itself, between
    steps (distill/train/loop.py); a handler someone else set is kept."""
    import signal

    main = os.getpid()

    def stop(signum, frame):
        if os.getpid() != main:  # a forked worker (a data map's pool, which terminates its workers so) dies as before
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
        raise KeyboardInterrupt

    if signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
        signal.signal(signal.SIGTERM, stop)


def interrupted() -> None:
    """Ctrl-C: one line, exit 130.  Every stage writes atomically and resumes, so nothing is lost."""
    from common.errors import interrupted_line

    typer.echo(interrupted_line(), err=True)
    sys.exit(130)


def _click_exceptions() -> tuple[tuple[type, ...], tuple[type, ...]]:
    """(usage errors, aborts) of click and of the click copy newer typers vendor
    (typer._click, with Abort in typer.exceptions)."""
    import importlib

    usage, abort = [], []
    for errors, aborts in (("click.exceptions", "click.exceptions"), ("typer._click.exceptions", "typer.exceptions")):
        try:
            usage.append(importlib.import_module(errors).ClickException)
            abort.append(importlib.import_module(aborts).Abort)
        except (ImportError, AttributeError):
            continue
    return tuple(usage), tuple(abort)


if __name__ == "__main__":
    main()
