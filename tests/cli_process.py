"""`python cli.py ARGS` in a fresh process that starts with torch, transformers and the toolkit
already imported: forked from a server process that imported them once.

Why: importing them costs about 5 s of CPU per process; the suite starts about 100
single-process CLI runs, so those imports were a third of `make test`'s CPU time.

What the child shares with `python cli.py ARGS`: a process of its own (own memory, pid and exit
status; its stdout and stderr captured), cli.py run as __main__ with the same argv, environment
and working directory, fresh RNG state (torch, numpy and `random` reseeded from the OS, as at a
process start), non-daemon threads joined and atexit handlers run before it exits.
What it does not: the preloaded modules saw the server's environment when they were imported,
so a call whose environment differs from it (a test's `env=` or monkeypatch.setenv) first
replaces the server with one started in that environment; Python's string-hash seed is the
server's; the interpreter's own teardown is skipped (os._exit after the atexit handlers); the
call returns when the child exits, where subprocess.run would also wait for a process the
command left behind holding its stdout (it is killed with the child's group only on a timeout);
the server imported the commands' modules in one fixed order, and a warning a library prints
once at import went to the server's stderr, not the child's (tests/test_cli_process.py compares
the stderr of plain and forked runs of a few commands, which would show such a warning).  Launched ranks (torchrun, deepspeed)
and the tests that kill a run are plain processes anyway.  CODISTILL_TEST_PLAIN_CLI=1 runs every
call as a plain subprocess.

The protocol, one call at a time: the test process writes one JSON line (argv, cwd, env and the
two capture files) to the server's stdin; the server forks, answers "PID\\n" and, when the child
has exited, its wait status "STATUS\\n".  The server exits when its stdin closes.
"""
from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PLAIN = "CODISTILL_TEST_PLAIN_CLI"
# Variables read only while a command runs, never at import: set per test (pytest's own) or
# per call (the toolkit's fault injection, DISTILL_TEST_KILL_AFTER_*), they need no new server.
CALL_TIME_ENV = ("PYTEST_CURRENT_TEST", "DISTILL_TEST_")

_server: dict = {}  # "proc": the server, "env": the environment it was started with


def _comparable(env: dict) -> dict:
    return {k: v for k, v in env.items() if not k.startswith(CALL_TIME_ENV)}


def _server_for(env: dict) -> subprocess.Popen:
    """A server started with `env`: the running one, or a new one in its place when the
    environment changed since (a test's `env=`, monkeypatch.setenv): the preloaded modules
    must have seen the environment the command runs in."""
    if _server and (_server["proc"].poll() is not None or _server["env"] != _comparable(env)):
        _stop()
    if not _server:
        proc = subprocess.Popen([sys.executable, "-c", "from tests.cli_process import serve; serve()"], cwd=ROOT,
                                env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1)
        if _line(proc, 600) != "ready":  # the imports done (about 5 s)
            proc.kill()
            raise RuntimeError(f"the CLI test server did not start (exit {proc.wait()})")
        _server.update(proc=proc, env=_comparable(env))
    return _server["proc"]


def _stop() -> None:
    proc = _server.pop("proc")
    _server.clear()
    proc.stdin.close()  # the server's loop ends at EOF
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    proc.stdout.close()


def run(args: list[str], cwd: Path, env: dict, timeout: float | None) -> subprocess.CompletedProcess:
    """As subprocess.run([python, cli.py, *args], capture_output=True, text=True, ...)."""
    return run_script([str(ROOT / "cli.py"), *args], cwd, env, timeout)


def run_script(argv: list[str], cwd: Path, env: dict, timeout: float | None) -> subprocess.CompletedProcess:
    """`python SCRIPT ARGS` (argv: [SCRIPT, *ARGS]) in a child forked from the server."""
    cmd = [sys.executable, *argv]
    if not Path(cwd).is_dir():  # as subprocess.run raises it, before anything runs
        raise FileNotFoundError(f"no such directory: {cwd}")
    if os.environ.get(PLAIN) == "1":
        return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env)
    server = _server_for(env)
    with tempfile.TemporaryDirectory(prefix="cli-") as tmp:
        out, err = Path(tmp) / "stdout", Path(tmp) / "stderr"
        server.stdin.write(json.dumps({"argv": cmd[1:], "cwd": str(cwd), "env": env, "out": str(out),
                                       "err": str(err)}) + "\n")
        pid = None
        try:
            pid = int(_line(server, 60))
            status = _line(server, timeout)
            if status is None:  # still running: killed with what it started (a datasets pool, say)
                _kill_group(pid)
                _line(server, 60)
        except BaseException:  # pytest-timeout, ^C: the child dies, and the server, whose answers
            if pid is not None:  # to this call are unread, is replaced at the next call
                _kill_group(pid)
            _stop()
            raise
        stdout, stderr = out.read_text(errors="replace"), err.read_text(errors="replace")
        if status is None:
            raise subprocess.TimeoutExpired(cmd, timeout, output=stdout, stderr=stderr)
        return subprocess.CompletedProcess(cmd, os.waitstatus_to_exitcode(int(status)), stdout, stderr)


def _kill_group(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:  # it ended on its own meanwhile
        pass


def _line(proc: subprocess.Popen, timeout: float | None) -> str | None:
    """The server's next line, read from its pipe unbuffered (a buffered reader could hold the
    next line where select cannot see it); None after `timeout` seconds without one."""
    fd, got = proc.stdout.fileno(), b""
    deadline = None if timeout is None else time.monotonic() + timeout
    while not got.endswith(b"\n"):
        wait = None if deadline is None else max(0.0, deadline - time.monotonic())
        ready, _, _ = select.select([fd], [], [], wait)
        if not ready:
            if got:
                raise RuntimeError(f"the CLI test server stopped mid-line: {got!r}")
            return None
        chunk = os.read(fd, 1)
        if not chunk:
            raise RuntimeError(f"the CLI test server exited (status {proc.wait()})")
        got += chunk
    return got.decode().strip()


# ------------------------------------------------------------------ in the server and its children


def serve() -> None:
    """Import what the commands import, in the order `python cli.py` would (the entry point's
    environment defaults first: the HF libraries read them at import), then fork one child per
    request.  Never runs a torch op itself: a fork after OpenMP started its threads can hang."""
    import cli

    cli.offline_and_quiet()
    import numpy  # noqa: F401
    import torch  # noqa: F401
    import transformers  # noqa: F401

    import distill.demo  # noqa: F401
    import distill.report.export  # noqa: F401
    import distill.report.inspect  # noqa: F401
    import distill.stages  # noqa: F401

    print("ready", flush=True)
    for line in sys.stdin:
        request = json.loads(line)
        pid = os.fork()
        if pid == 0:
            _child(**request)  # never returns
        print(pid, flush=True)
        _, status = os.waitpid(pid, 0)
        print(status, flush=True)


def _child(argv: list[str], cwd: str, env: dict, out: str, err: str) -> None:
    """Run the script argv[0] (cli.py) as `python SCRIPT ARGS` would, then exit with its status."""
    import atexit
    import random
    import threading
    import traceback

    import numpy as np
    import torch

    code = 1
    try:  # whatever happens, this process ends here: never back in the server's loop
        os.setsid()  # a process group of its own, killed whole on a timeout
        for fd, path in ((0, os.devnull), (1, out), (2, err)):
            f = os.open(path, os.O_RDONLY if fd == 0 else os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
            os.dup2(f, fd)
            os.close(f)
        os.chdir(cwd)
        os.environ.clear()
        os.environ.update(env)
        sys.argv = list(argv)
        sys.path[0] = str(Path(argv[0]).resolve().parent)  # what `python SCRIPT` puts first
        random.seed()
        np.random.seed()
        torch.seed()  # a new process's default generator is seeded from the OS, not a copy of the server's
        code = _run_main(argv[0])
        threading._shutdown()  # what the interpreter does as it exits: join non-daemon threads (and
        atexit._run_exitfuncs()  # the executors' exit hooks), then the atexit handlers
    except BaseException:
        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def _run_main(script: str) -> int:
    """Run `script` as __main__; its exit status as the interpreter would make it."""
    import runpy
    import traceback

    try:
        runpy.run_path(script, run_name="__main__")  # cli.py as the script, as `python cli.py` runs it
    except SystemExit as e:
        if e.code is None or isinstance(e.code, int):
            return e.code or 0
        print(e.code, file=sys.stderr)
        return 1
    except BaseException:
        traceback.print_exc()
        return 1
    return 0
