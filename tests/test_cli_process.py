"""The suite's CLI runner (tests/cli_process.py) answers as `python cli.py ARGS` does: the same
exit status, stdout and stderr, a timeout that kills, and a new server when the environment the
preloaded modules saw changes."""
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests import cli_process
from tests.conftest import ROOT


@pytest.fixture(autouse=True)
def forked_mode(monkeypatch):
    """These tests are of the forked runner, also when the suite runs with CODISTILL_TEST_PLAIN_CLI=1."""
    monkeypatch.delenv(cli_process.PLAIN, raising=False)


def plain(*args, env=None):
    return subprocess.run([sys.executable, str(ROOT / "cli.py"), *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=300, env=env)


def forked(*args, env):
    return cli_process.run(list(args), cwd=ROOT, env=env, timeout=300)


def test_forked_cli_answers_as_the_plain_process(tmp_path):
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"students": [{"name": "s", "model": {"preset": "nope"}}]}))
    cases = [
        ["--help"],  # exit 0, stdout
        ["train", "--config", str(tmp_path / "missing.yaml")],  # a UserError: exit 2, one line
        ["train", "--config", str(bad)],  # a registry's refusal (imports the presets)
        ["--debug", "train", "--config", str(tmp_path / "missing.yaml")],  # a traceback, still exit 2
        ["train", "--bogus"],  # click's usage error
        ["inspect", str(tmp_path)],  # nothing to describe there
    ]
    for args in cases:
        a, b = forked(*args, env=env), plain(*args, env=env)
        assert (a.returncode, a.stdout) == (b.returncode, b.stdout), args
        if "--debug" in args:  # the same exception, after a traceback of the same frames
            assert a.stderr.splitlines()[-1] == b.stderr.splitlines()[-1] and "Traceback" in a.stderr, args
        else:
            assert a.stderr == b.stderr, args
    assert [forked(*c, env=env).returncode for c in cases] == [0, 2, 2, 2, 2, 2]


def test_a_forked_run_past_its_timeout_is_killed(tmp_path):
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    with pytest.raises(subprocess.TimeoutExpired):
        cli_process.run(["demo", "--tiny", "--quiet", "--out", str(tmp_path / "demo")], cwd=tmp_path, env=env,
                        timeout=3)
    assert not (tmp_path / "demo" / "report.md").exists()  # killed at 3 s, not waited for (the demo takes ~15)
    # the server answers the next call (the killed child was reaped)
    assert forked("--help", env=env).returncode == 0
    # what the child started dies with it (a datasets pool's workers would otherwise live on)
    script = tmp_path / "parent.py"
    script.write_text("import subprocess, sys, time\n"
                      "p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)'])\n"
                      "open(sys.argv[1], 'w').write(str(p.pid))\n"
                      "time.sleep(120)\n")
    with pytest.raises(subprocess.TimeoutExpired):
        cli_process.run_script([str(script), str(tmp_path / "pid")], cwd=tmp_path, env=env, timeout=5)
    grandchild = int((tmp_path / "pid").read_text())
    deadline = time.monotonic() + 10
    while _running(grandchild) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _running(grandchild), "the killed run's own child lived on"


def _running(pid: int) -> bool:
    """Alive (a zombie that nobody has reaped yet is dead)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_a_call_interrupted_mid_wait_leaves_the_next_call_its_own_answer(tmp_path, monkeypatch):
    """pytest-timeout or ^C inside a call: the child is killed and the server (whose answers to
    that call were never read) replaced, so the next call does not read them as its own."""
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    real = cli_process._line
    calls = []

    def interrupted(proc, timeout):
        calls.append(timeout)
        if len(calls) == 2:  # the wait for the exit status
            raise KeyboardInterrupt
        return real(proc, timeout)

    monkeypatch.setattr(cli_process, "_line", interrupted)
    with pytest.raises(KeyboardInterrupt):
        cli_process.run(["train", "--config", str(tmp_path / "missing.yaml")], cwd=ROOT, env=env, timeout=300)
    monkeypatch.setattr(cli_process, "_line", real)
    r = forked("--help", env=env)
    assert r.returncode == 0 and "Usage" in r.stdout, (r.returncode, r.stdout[:200])


def test_a_changed_environment_starts_a_new_server_and_a_call_time_variable_does_not(tmp_path):
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    first = cli_process._server_for(env)
    assert cli_process._server_for({**env, "DISTILL_TEST_KILL_AFTER_CHECKPOINTS": "1"}) is first
    other = cli_process._server_for({**env, "TORCH_EXTENSIONS_DIR": str(tmp_path)})
    assert other is not first and first.poll() is not None  # the old one stopped
    assert forked("--help", env={**env, "TORCH_EXTENSIONS_DIR": str(tmp_path)}).returncode == 0


SEEDS = ("import random, sys\nimport numpy as np, torch\n"
         "print(torch.initial_seed(), np.random.random(), random.random(), sys.argv[1:])\n")


def test_each_forked_process_starts_with_fresh_random_state(tmp_path):
    """As separate processes do: torch, numpy and random seeded anew (the server's state is
    never inherited), so a run that forgot to seed is not made reproducible by the runner."""
    script = tmp_path / "seeds.py"
    script.write_text(SEEDS)
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    outs = []
    for i in range(3):
        r = cli_process.run_script([str(script), str(i)], cwd=tmp_path, env=env, timeout=60)
        assert r.returncode == 0, r.stderr
        outs.append(r.stdout.split())
    assert [o[3:] for o in outs] == [["['0']"], ["['1']"], ["['2']"]]  # the argv given
    for k in range(3):  # torch's seed, numpy's and random's first draws: all differ
        assert len({o[k] for o in outs}) == 3, outs
