"""The real CLI: --help everywhere, one-line errors with exit 2, nothing written on bad input."""
import pytest
import yaml

COMMANDS = ["init", "demo", "pretrain", "cache", "train", "run", "export", "eval", "inspect"]


@pytest.mark.parametrize("command", COMMANDS)
def test_help_explains_every_option(cli, command):
    r = cli(command, "--help")
    assert r.returncode == 0, r.stderr
    assert "Usage:" in r.stdout
    # every option carries a description: the click command objects say so directly
    import typer.main

    from cli import app

    command_obj = typer.main.get_command(app).commands[command]
    for param in command_obj.params:
        if param.param_type_name == "option" and not param.hidden:
            assert param.help, f"{command} {param.name} has no help text"


def test_top_level_help_lists_commands(cli):
    r = cli("--help")
    assert r.returncode == 0
    for c in COMMANDS:
        assert c in r.stdout


def test_init_writes_a_config_that_validates(cli, tmp_path):
    path = tmp_path / "run.yaml"
    r = cli("init", str(path))
    assert r.returncode == 0, r.stderr
    assert yaml.safe_load(path.read_text())["students"]
    again = cli("init", str(path))
    assert again.returncode == 2 and "already exists" in again.stderr


def _one_line_error(r):
    assert r.returncode == 2, (r.returncode, r.stdout, r.stderr)
    lines = [l for l in r.stderr.strip().splitlines() if l.strip()]
    assert len(lines) == 1, r.stderr
    assert "Traceback" not in r.stderr
    return lines[0]


def test_config_pointing_to_directory(cli, tmp_path):
    assert "is a directory" in _one_line_error(cli("train", "--config", str(tmp_path)))


def test_unknown_key_and_bad_value(cli, tmp_path):
    raw = {"data": {"stdlib": True}, "teacher": {"source": "preset", "model": {"preset": "behemoth"}},
           "students": [{"name": "s", "model": {"preset": "dense"}, "optim": {"lr": -1}}], "out_dir": str(tmp_path / "o")}
    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump(raw))
    line = _one_line_error(cli("train", "--config", str(p)))
    assert "students.0.optim.lr" in line
    assert not (tmp_path / "o").exists()  # nothing written


def test_missing_data_path_named(cli, tmp_path):
    raw = {"data": {"paths": ["missing_dir"]}, "teacher": {"source": "preset", "model": {"preset": "behemoth"}},
           "students": [{"name": "s", "model": {"preset": "dense"}}], "out_dir": str(tmp_path / "o")}
    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump(raw))
    assert "data.paths[0]" in _one_line_error(cli("cache", "--config", str(p)))


def test_debug_shows_traceback(cli, tmp_path):
    r = cli("--debug", "train", "--config", str(tmp_path))
    assert r.returncode == 2 and "Traceback" in r.stderr  # the traceback, and still bad input's exit code
    assert r.stderr.strip().splitlines()[-1].startswith("error: ")


@pytest.mark.parametrize("printer", ["click", "rich"])
def test_a_reader_that_leaves_early_is_not_a_failure(tmp_path, printer):
    """`distill inspect X | head`: stdout's reader is gone.  Exit 141 (128 + SIGPIPE, what a shell
    reports for a process a closed pipe killed), not 1 (a failed `--verify`) and no traceback."""
    import os
    import subprocess
    import sys

    from tests.conftest import ROOT

    from transformers import LlamaConfig

    LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                num_key_value_heads=1).save_pretrained(str(tmp_path))
    args = ["inspect", "--help"] if printer == "click" else ["inspect", str(tmp_path)]  # rich prints the table
    read_end, write_end = os.pipe()
    os.close(read_end)  # nobody will ever read: the first write fails with EPIPE
    try:
        r = subprocess.run([sys.executable, str(ROOT / "cli.py"), *args], stdout=write_end,
                           stderr=subprocess.PIPE, text=True, timeout=120)
    finally:
        os.close(write_end)
    assert r.returncode == 141 and "Traceback" not in r.stderr, (r.returncode, r.stderr)


def test_bad_set_override(cli, tmp_path):
    p = tmp_path / "c.yaml"
    cli("init", str(p))
    assert "KEY=VALUE" in _one_line_error(cli("train", "--config", str(p), "--set", "train.steps"))
    # A value YAML cannot read (a glob starts with `*`, an alias in YAML): one line with the quoted form.
    line = _one_line_error(cli("prepare", "--config", str(p), "--set", "data.paths=[*.jsonl]"))
    assert "--set 'data.paths=[*.jsonl]': the value is not valid YAML" in line and """data.paths=["*.jsonl"]""" in line
    line = _one_line_error(cli("prepare", "--config", str(p), "--set", "data.text_field=@body"))
    assert """--set 'data.text_field="@body"'""" in line


def test_a_key_given_twice_in_the_config_is_refused_by_line(cli, tmp_path):
    """PyYAML keeps the last of two equal keys: a second `train:` block would drop the first."""
    p = tmp_path / "c.yaml"
    cli("init", str(p))
    text = p.read_text()
    p.write_text(text + "train:\n  steps: 2\n")
    line = _one_line_error(cli("train", "--config", str(p)))
    assert f"{p} line {len(text.splitlines()) + 1}: key 'train' given twice" in line
    p.write_text("seed: 1\n" + text)
    assert "key 'seed' given twice" in _one_line_error(cli("train", "--config", str(p)))


def test_a_write_the_disk_refused_is_one_line_wherever_it_comes_from(monkeypatch, capsys):
    """A read-only or full disk met where no stage names it (datasets writing its Arrow files,
    wrapped in its own error) was a traceback and exit 1; it is one line naming the path, exit 2."""
    import errno
    import sys

    import cli as cli_module

    def refused(**kwargs):
        try:
            raise OSError(errno.EROFS, "Read-only file system", "/ro/out/data/.documents")
        except OSError as e:
            raise RuntimeError("An error occurred while generating the dataset") from e

    monkeypatch.setattr(cli_module, "app", refused)
    monkeypatch.setattr(sys, "argv", ["distill", "prepare"])
    with pytest.raises(SystemExit) as e:
        cli_module.main()
    assert e.value.code == 2
    assert capsys.readouterr().err == ("error: cannot write /ro/out/data/.documents: not writable; free space or "
                                       "choose another output dir (previous files are intact)\n")
    monkeypatch.setattr(cli_module, "app", lambda **kwargs: open("/nonexistent/file"))  # not a write: a bug's traceback
    with pytest.raises(FileNotFoundError):
        cli_module.main()


def test_a_second_ctrl_c_while_the_first_ones_exit_runs_still_exits_130(monkeypatch, capsys):
    """Several Ctrl-Cs 50 ms apart during training's interrupt checkpoint: one landed while the
    first one's line was being written, escaped every handler, and Python died of SIGINT (-2)."""
    import sys

    import cli as cli_module
    from distill.train.loop import TrainingInterrupted

    def stopped(**kwargs):
        raise TrainingInterrupted("stopped by signal 2 after step 3 of 9; ...")

    def echo(*args, **kwargs):  # the second Ctrl-C, as the first one's line is written
        raise KeyboardInterrupt

    monkeypatch.setattr(cli_module, "app", stopped)
    monkeypatch.setattr(cli_module.typer, "echo", echo)
    monkeypatch.setattr(sys, "argv", ["distill", "train"])
    with pytest.raises(SystemExit) as e:
        cli_module.main()
    assert e.value.code == 130


def test_inspect_missing_path(cli, tmp_path):
    assert "does not exist" in _one_line_error(cli("inspect", str(tmp_path / "nope")))


def _write(tmp_path, raw) -> str:
    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump(raw))
    return str(p)


def test_bad_student_model_arg_fails_before_any_stage(cli, tmp_path):
    """num_experts: 0 builds a transformers config; only a meta-device build and the preset's
    own checks catch it at load time, before the teacher is pretrained."""
    import time

    raw = {"data": {"stdlib": True}, "out_dir": str(tmp_path / "o"),
           "teacher": {"source": "preset", "model": {"preset": "behemoth", "args": {"hidden_size": 32}}},
           "students": [{"name": "ok", "model": {"preset": "dense"}},
                        {"name": "s", "model": {"preset": "scout", "args": {"num_experts": 0}}}]}
    t0 = time.time()
    line = _one_line_error(cli("run", "--config", _write(tmp_path, raw)))
    assert "students.1.model.args.num_experts=0" in line, line
    assert time.time() - t0 < 60 and not (tmp_path / "o").exists()  # nothing pretrained, nothing written
    raw["students"][1]["model"]["args"] = {"num_heads": 3, "num_kv_heads": 2}
    assert "students.1.model.args.num_heads=3" in _one_line_error(cli("train", "--config", _write(tmp_path, raw)))
    raw["students"][1]["model"] = {"preset": "dense", "args": {"hidden_size": 63, "num_heads": 2}}  # transformers' check
    line = _one_line_error(cli("train", "--config", _write(tmp_path, raw)))
    assert line.endswith("(ValueError: The hidden size (63) is not a multiple of the number of attention heads (2).)"), line
    raw["students"].pop()
    raw["teacher"]["model"]["args"] = {"head_dim": 0}
    assert "teacher.model.args.head_dim=0" in _one_line_error(cli("train", "--config", _write(tmp_path, raw)))


def test_out_dir_that_is_a_file_is_one_line(cli, tmp_path):
    (tmp_path / "taken").write_text("x")
    raw = {"data": {"stdlib": True}, "out_dir": str(tmp_path / "taken"),
           "teacher": {"source": "preset", "model": {"preset": "behemoth"}},
           "students": [{"name": "s", "model": {"preset": "dense"}}]}
    assert "out_dir" in _one_line_error(cli("run", "--config", _write(tmp_path, raw)))
    raw["out_dir"] = str(tmp_path / "taken" / "run")
    assert "lies under the file" in _one_line_error(cli("run", "--config", _write(tmp_path, raw)))
    assert "out_dir" in _one_line_error(cli("demo", "--tiny", "--out", str(tmp_path / "taken")))


def test_fp16_is_refused(cli, tmp_path):
    """No loss scaling is applied, so fp16 is refused up front, never silently fp32 or underflowing."""
    raw = {"data": {"stdlib": True}, "teacher": {"source": "preset", "model": {"preset": "behemoth"}},
           "students": [{"name": "s", "model": {"preset": "dense"}}], "train": {"precision": "fp16"},
           "out_dir": str(tmp_path / "o")}
    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump(raw))
    line = _one_line_error(cli("train", "--config", str(p)))
    assert "train.precision=fp16 is refused" in line and "bf16" in line
    assert not (tmp_path / "o").exists()  # nothing written


def test_unknown_option_is_a_usage_error_not_a_traceback(cli):
    for args in (["train", "--bogus"], ["export", "-c", "x.yaml"]):
        r = cli(*args)
        assert r.returncode == 2 and "No such option" in r.stderr and "Traceback" not in r.stderr, r.stderr[-2000:]


def test_progress_in_a_log_is_a_plain_line_now_and_then(capsys, monkeypatch):
    """Where output is no terminal (nohup, a SLURM log) a rich bar shows once, at the end: a
    3-minute preparation printed nothing while it ran.  There a plain line comes every
    PLAIN_PROGRESS_SECONDS, and at the end, with the rate of this run's own work."""
    from common import progress as metrics

    with metrics.progress_bar(10, "train", True, completed=4) as bar:
        for _ in range(6):
            bar.update(1, {"dense": 2.5})
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 1 and lines[0].startswith("train 10/10 (100%), 0:00:0") and "dense=2.500" in lines[0]
    monkeypatch.setattr(metrics, "PLAIN_PROGRESS_SECONDS", 0.0)
    with metrics.progress_bar(3, "data", True) as bar:
        for _ in range(3):
            bar.update(1, info="1,000 tokens")
    lines = capsys.readouterr().out.splitlines()
    assert [line.split(" (")[0] for line in lines] == ["data 1/3", "data 2/3", "data 3/3"], lines
    assert "left" in lines[0] and "left" not in lines[-1] and lines[-1].endswith("1,000 tokens")
    with metrics.progress_bar(3, "data", False) as bar:  # --quiet
        bar.update(3)
    assert capsys.readouterr().out == ""
