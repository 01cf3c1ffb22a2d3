"""The real CLI end to end on the tiny demo: files, report schema, stock-transformers export."""
import json
import re

import pytest
import torch

pytestmark = pytest.mark.slow

REPORT_KEYS = {"kind", "params_total", "params_active", "val_ppl", "teacher_top1_agreement", "kl_to_teacher",
               "train_tokens", "export_dir"}


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory):
    from tests.conftest import run_cli

    out = tmp_path_factory.mktemp("demo") / "run"
    r = run_cli("demo", "--tiny", "--quiet", "--out", str(out))
    assert r.returncode == 0, r.stderr[-3000:]
    return out


def test_layout(demo_dir):
    for rel in ("teacher/config.json", "cache/manifest.json", "report.md", "report.json", "curves.png",
                "schedule.png", "expert_load.png"):
        assert (demo_dir / rel).exists(), rel
    assert "`expert_load.png` (MoE students)" in (demo_dir / "report.md").read_text()
    for name in ("scout", "maverick", "dense", "dense-baseline"):
        assert list((demo_dir / "students" / name / "checkpoints").glob("step_*"))
        assert (demo_dir / "students" / name / "export" / "config.json").exists()


def test_report_schema(demo_dir):
    report = json.loads((demo_dir / "report.json").read_text())
    assert {"val_ppl", "params_total"} <= set(report["teacher"])
    assert " draws a token from the teacher at T = 1 (cache.estimator: sampled)" in report["teacher_signal"]  # the demo's cache
    kinds = {n: r["kind"] for n, r in report["students"].items()}
    assert kinds == {"scout": "scout", "maverick": "maverick", "dense": "dense", "dense-baseline": "baseline"}
    for name, r in report["students"].items():
        assert REPORT_KEYS <= set(r), name
        assert r["params_active"] <= r["params_total"]
        assert r["val_ppl"] > 1 and 0 <= r["teacher_top1_agreement"] <= 1 and r["kl_to_teacher"] >= 0
        assert r["train_tokens"] > 0
        # the targets it learnt from (documents packing: each row's first token is none), not the positions read
        rows = [json.loads(line) for line in (demo_dir / "students" / name / "metrics.jsonl").read_text().splitlines()]
        assert r["train_targets"] == sum(row["n_valid"] for row in rows if row["kind"] == "train"), name
        assert r["train_targets"] < r["train_tokens"] == r["step"] * 4 * 64, name  # the demo's 4 blocks of 64 a step
        assert f"| training targets (tokens learnt from) | {r['train_targets']} |" in \
            (demo_dir / r["export_dir"] / "README.md").read_text()
        assert (demo_dir / r["export_dir"] / "config.json").exists()  # relative to the run dir
    moe = report["students"]["scout"]
    assert moe["params_active"] < moe["params_total"]


@pytest.mark.parametrize("name,arch", [("scout", "Llama4ForCausalLM"), ("maverick", "Llama4ForCausalLM"),
                                       ("dense", "LlamaForCausalLM")])
def test_export_loads_in_stock_transformers(demo_dir, name, arch):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from distill.report.export import load_checkpoint_model, resolve_checkpoint

    export = demo_dir / "students" / name / "export"
    model, info = AutoModelForCausalLM.from_pretrained(str(export), output_loading_info=True)
    assert type(model).__name__ == arch
    assert not info["missing_keys"] and not info["unexpected_keys"]
    tok = AutoTokenizer.from_pretrained(str(export))
    # config.json names the run tokenizer's bos / eos, not the config class's defaults (Llama's 1 and 2)
    assert (model.config.bos_token_id, model.config.eos_token_id) == (tok.bos_token_id, tok.eos_token_id)
    ids = tok("def main():\n    return", return_tensors="pt")["input_ids"]
    # logits parity with the project's own checkpoint (sparse MoE forward) within 1e-5
    from students.build import enable_sparse_moe

    ours = load_checkpoint_model(resolve_checkpoint(demo_dir / "students" / name))
    enable_sparse_moe(ours)
    with torch.no_grad():
        assert torch.allclose(model(ids).logits, ours(ids).logits, atol=1e-5)
    out = model.generate(ids, max_new_tokens=5, do_sample=False)
    assert out.shape[1] == ids.shape[1] + 5
    assert (export / "README.md").read_text().count("val_ppl") == 1


def test_report_tells_one_story(demo_dir):
    """The curve's last validation point is the table's figure (same held-out blocks), and
    the expert-load plot's counts come from routing those held-out tokens."""
    report = json.loads((demo_dir / "report.json").read_text())
    seq_len = json.loads((demo_dir / "cache" / "manifest.json").read_text())["seq_len"]
    for name, r in report["students"].items():
        rows = [json.loads(line) for line in (demo_dir / "students" / name / "metrics.jsonl").read_text().splitlines()]
        last_val = [row for row in rows if row["kind"] == "val"][-1]
        assert last_val["val_ppl"] == pytest.approx(r["val_ppl"], rel=1e-4), name
        assert last_val["val_tokens"] == r["val_tokens"] == report["val_blocks"] * seq_len
    for name in ("scout", "maverick"):
        loads = report["students"][name]["expert_load"]
        assert loads and all(sum(layer) == report["val_blocks"] * seq_len for layer in loads), name  # top-1 routing


def test_inspect_cache_and_verify(demo_dir):
    from tests.conftest import run_cli

    r = run_cli("inspect", str(demo_dir / "cache"), "--verify")
    assert r.returncode == 0, r.stderr
    assert "verify: ok" in r.stdout
    bpt = next(line for line in r.stdout.splitlines() if "bytes/token" in line)
    assert re.search(r"bytes/token\s*│\s*\d+\.\d\s", bpt), bpt  # one decimal, not 17 digits
    assert re.search(r"tokens\s*│\s*\d{1,3}(,\d{3})+", r.stdout)  # thousands separated


def test_inspect_a_whole_run_describes_each_part(demo_dir):
    """`distill inspect OUT`: its data, cache, the pretrained teacher, and each student's latest
    checkpoint and export, the export naming the student, step and run it was made from."""
    from tests.conftest import run_cli

    r = run_cli("inspect", str(demo_dir), env={"COLUMNS": "300"})  # no wrapped titles
    assert r.returncode == 0, r.stderr
    run_hash = json.loads(next((demo_dir / "students" / "dense").glob("checkpoints/step_*/meta.json")).read_text())["run_hash"]
    done = json.loads((demo_dir / "teacher" / "pretrain_done.json").read_text())
    assert f"prepared data {demo_dir / 'data'}" in r.stdout and f"cache {demo_dir / 'cache'}" in r.stdout
    assert f"model {demo_dir / 'teacher'}" in r.stdout
    assert re.search(rf"pretrained\s*│ {done['steps']} steps by `distill pretrain`, held-out perplexity "
                     rf"{done['val_ppl']:.2f}", r.stdout)
    for name in ("scout", "maverick", "dense", "dense-baseline"):
        step = int(max((demo_dir / "students" / name / "checkpoints").glob("step_*")).name.split("_")[1])
        assert f"checkpoint {demo_dir / 'students' / name / 'checkpoints'}" in r.stdout, name
        assert f"model {demo_dir / 'students' / name / 'export'}" in r.stdout, name
        assert re.search(rf"exported from\s*│ student {name}, step {step}, run hash {run_hash}", r.stdout), name


def test_export_bf16_cli(demo_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    from tests.conftest import run_cli

    r = run_cli("export", str(demo_dir / "students" / "dense"), "--out", str(tmp_path / "bf16"), "--dtype", "bf16")
    assert r.returncode == 0, r.stderr
    model = AutoModelForCausalLM.from_pretrained(str(tmp_path / "bf16"))
    assert model.config.dtype in (torch.bfloat16, "bfloat16")


def test_export_replaces_only_an_earlier_export_of_the_same_student(demo_dir, tmp_path):
    """An export replaces --out whole: a dir of someone's files or another student's export is
    refused in one line and left as it was; a re-export of the same student, or --overwrite,
    replaces it.  Eval refuses to score another student's export under this one's name."""
    import shutil

    import yaml

    from distill.demo import demo_config
    from tests.conftest import run_cli

    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    r = run_cli("export", str(demo_dir / "students" / "dense"), "--out", str(mine))
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert r.stderr.strip() == (f"error: export: {mine} holds files that are not an export, which "
                                f"this export of student dense would replace; choose another --out, or pass "
                                f"--overwrite to replace it"), r.stderr
    assert [p.name for p in tmp_path.iterdir()] == ["mine"] and (mine / "notes.txt").read_text() == "keep me"

    out = tmp_path / "e"
    assert run_cli("export", str(demo_dir / "students" / "dense"), "--out", str(out)).returncode == 0
    r = run_cli("export", str(demo_dir / "students" / "scout"), "--out", str(out))
    assert r.returncode == 2 and "holds an export of student dense" in r.stderr, r.stderr[-2000:]
    assert json.loads((out / "distill_meta.json").read_text())["student"] == "dense"
    assert run_cli("export", str(demo_dir / "students" / "dense"), "--out", str(out)).returncode == 0  # re-export
    meta = json.loads((out / "distill_meta.json").read_text())
    (out / "distill_meta.json").write_text(json.dumps({**meta, "run_hash": "another"}))  # a "dense" of another run
    r = run_cli("export", str(demo_dir / "students" / "dense"), "--out", str(out))
    assert r.returncode == 2 and "holds an export of student dense from another run" in r.stderr, r.stderr[-2000:]
    assert run_cli("export", str(demo_dir / "students" / "scout"), "--out", str(out), "--overwrite").returncode == 0
    assert json.loads((out / "distill_meta.json").read_text())["student"] == "scout"
    (tmp_path / "a-file").write_text("x")  # never replaced, --overwrite or not
    r = run_cli("export", str(demo_dir / "students" / "dense"), "--out", str(tmp_path / "a-file"), "--overwrite")
    assert r.returncode == 2 and "is a file; give a directory path" in r.stderr and "Traceback" not in r.stderr
    assert (tmp_path / "a-file").read_text() == "x" and not list(tmp_path.glob(".a-file*"))

    run = tmp_path / "run"
    shutil.copytree(demo_dir, run)
    shutil.rmtree(run / "students" / "dense" / "export")
    shutil.copytree(out, run / "students" / "dense" / "export")  # scout's export where dense's belongs
    cfg = tmp_path / "demo.yaml"
    cfg.write_text(yaml.safe_dump(json.loads(json.dumps(demo_config(run, "tiny"), default=str))))
    r = run_cli("eval", "-c", str(cfg), "--quiet")
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert r.stderr.strip().splitlines()[-1] == (
        f"error: eval: student dense: {run / 'students' / 'dense' / 'export'} holds an export of student scout; export "
        f"this student there: distill export {run / 'students' / 'dense'} --out {run / 'students' / 'dense' / 'export'}"
        f" --overwrite"), r.stderr


def test_eval_of_an_earlier_steps_export_reports_that_steps_tokens(demo_dir, tmp_path):
    """Eval scores OUT/students/NAME/export, which may be of an earlier step than the latest
    checkpoint (said on stderr): the report paired its perplexity with the run's last token
    count and did not say which step it scored."""
    import shutil

    import yaml

    from distill.demo import demo_config
    from tests.conftest import run_cli

    run = tmp_path / "run"
    shutil.copytree(demo_dir, run)
    earlier, latest = sorted((run / "students" / "dense" / "checkpoints").glob("step_*"))
    then, last = (json.loads((d / "meta.json").read_text()) for d in (earlier, latest))
    assert then["step"] < last["step"] and then["tokens_seen"] < last["tokens_seen"]  # the case
    r = run_cli("export", str(earlier), "--out", str(run / "students" / "dense" / "export"))
    assert r.returncode == 0, r.stderr[-2000:]
    cfg = tmp_path / "demo.yaml"
    cfg.write_text(yaml.safe_dump(json.loads(json.dumps(demo_config(run, "tiny"), default=str))))
    r = run_cli("eval", "-c", str(cfg), "--quiet")
    assert r.returncode == 0, r.stderr[-2000:]
    assert f"its export is of step {then['step']}, its latest checkpoint is step {last['step']}" in r.stderr
    report = json.loads((run / "report.json").read_text())["students"]
    assert (report["dense"]["step"], report["dense"]["train_tokens"]) == (then["step"], then["tokens_seen"])
    assert (report["scout"]["step"], report["scout"]["train_tokens"]) == (last["step"], last["tokens_seen"])
    md = (run / "report.md").read_text()
    assert f"| {then['step']} | {then['tokens_seen']:,} |" in md.split("| dense |")[1].splitlines()[0], md


def test_rerun_resumes_without_redoing_work(demo_dir):
    from tests.conftest import run_cli

    before = {p: p.stat().st_mtime_ns for p in (demo_dir / "cache").glob("*.safetensors")}
    r = run_cli("demo", "--tiny", "--out", str(demo_dir))
    assert r.returncode == 0, r.stderr[-2000:]
    after = {p: p.stat().st_mtime_ns for p in (demo_dir / "cache").glob("*.safetensors")}
    assert before == after  # the cache was reused, not rewritten
    # and its log says the teacher is reused, not pretrained again
    assert f"==> teacher: the pretrained behemoth preset at {demo_dir / 'teacher'} (reused)" in r.stdout, r.stdout
    assert "pretraining a" not in r.stdout and "==> train: 4 students from" in r.stdout
    # --no-resume into it is another run: refused before any work, naming --overwrite
    r = run_cli("demo", "--tiny", "--quiet", "--no-resume", "--out", str(demo_dir))
    assert r.returncode == 2 and "--overwrite" in r.stderr and "Traceback" not in r.stderr, r.stderr[-2000:]


def test_eval_skips_a_sharded_teacher(demo_dir, tmp_path):
    """teacher.sharding=zero3 means the teacher does not fit one device: eval leaves it out
    and still reports every student."""
    import shutil

    import yaml

    from distill.demo import demo_config
    from tests.conftest import run_cli

    run = tmp_path / "run"
    shutil.copytree(demo_dir, run)
    cfg = tmp_path / "demo.yaml"
    cfg.write_text(yaml.safe_dump(json.loads(json.dumps(demo_config(run, "tiny"), default=str))))
    r = run_cli("eval", "-c", str(cfg), "--set", "teacher.sharding=zero3")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "[eval] teacher not evaluated: teacher.sharding=zero3" in r.stderr
    report = json.loads((run / "report.json").read_text())
    assert report["teacher"] == {} and set(report["students"]) == {"scout", "maverick", "dense", "dense-baseline"}


def test_eval_with_a_corrupt_cache_is_one_line(demo_dir, tmp_path):
    import shutil

    import yaml

    from distill.demo import demo_config
    from tests.conftest import run_cli

    run = tmp_path / "run"
    shutil.copytree(demo_dir, run)
    (run / "cache" / "manifest.json").write_text("{not json")
    cfg = tmp_path / "demo.yaml"
    cfg.write_text(yaml.safe_dump(json.loads(json.dumps(demo_config(run, "tiny"), default=str))))
    r = run_cli("eval", "-c", str(cfg))
    assert r.returncode == 2, r.stderr[-2000:]
    assert "is not valid JSON" in r.stderr and "Traceback" not in r.stderr


def _run_copy(demo_dir, tmp_path):
    """A copy of the demo run and its config -> (run dir, config path)."""
    import shutil

    import yaml

    from distill.demo import demo_config

    run = tmp_path / "run"
    shutil.copytree(demo_dir, run)
    cfg = tmp_path / "demo.yaml"
    cfg.write_text(yaml.safe_dump(json.loads(json.dumps(demo_config(run, "tiny"), default=str))))
    return run, cfg


def test_eval_checks_every_export_before_scoring_any(demo_dir, tmp_path):
    """A truncated shard in one export and no export for another: one line naming both, exit 2,
    before any model is scored, and the earlier report and model cards kept.  Before, the
    damaged export was found at its turn (after minutes of scoring), as a traceback, exit 1,
    with nothing written; a missing one only at its turn."""
    import shutil

    from tests.conftest import run_cli

    run, cfg = _run_copy(demo_dir, tmp_path)
    shard = next((run / "students" / "maverick" / "export").glob("*.safetensors"))
    shard.write_bytes(shard.read_bytes()[:-16])
    shutil.rmtree(run / "students" / "dense-baseline" / "export")
    flipped = next((run / "students" / "scout" / "export").glob("*.safetensors"))
    data = bytearray(flipped.read_bytes())
    data[-5] ^= 1  # inside a tensor: only the hash the export recorded tells
    flipped.write_bytes(bytes(data))
    (run / "students" / "dense" / "export" / "tokenizer.json").unlink()
    kept = {p: p.read_bytes() for p in [run / "report.json", *run.glob("students/*/export/README.md")]}
    r = run_cli("eval", "-c", str(cfg))
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-3000:]
    line = r.stderr.strip().splitlines()[-1]
    assert line.startswith(f"error: eval: student scout: its export is damaged: {flipped}: damaged (its SHA-256 "
                           f"differs from the one recorded when it was written)"), line
    assert "student maverick: its export is damaged: " in line and "not fully covered" in line
    assert f"student dense: its export is damaged: {run / 'students' / 'dense' / 'export' / 'tokenizer.json'}: " \
           f"missing (the export wrote it)" in line
    assert (f"student dense-baseline: no export at {run / 'students' / 'dense-baseline' / 'export'}" in line
            and line.endswith(f"`distill export {run / 'students' / 'dense-baseline'} --out "
                              f"{run / 'students' / 'dense-baseline' / 'export'}`)")), line
    assert "eval: teacher" not in r.stdout + r.stderr  # nothing was scored
    assert {p: p.read_bytes() for p in kept} == kept


def test_an_eval_stopped_part_way_keeps_the_report_and_cards_and_resumes(demo_dir, tmp_path, monkeypatch):
    """Model cards were written as each student was scored, the report at the end: Ctrl-C
    after the first student left its card with new figures and report.json with the old, and
    the rerun scored every model again.  Now nothing of the report is written until every model
    is scored, what was scored is kept (eval_progress.json), and the same command scores only
    the rest, to the same report.  An export removed while eval ran is said, not recreated as a
    dir holding only a model card."""
    import shutil

    from distill.config import load_config
    from distill.report import report as report_module

    run, cfg_path = _run_copy(demo_dir, tmp_path)
    cfg = load_config(cfg_path)
    full = json.loads((run / "report.json").read_text().replace(str(demo_dir), str(run)))  # `distill demo`'s eval
    for earlier in [run / "report.json", *run.glob("students/*/export/README.md")]:  # an earlier eval's, told apart
        earlier.write_text(earlier.read_text().replace("0.", "9."))
    kept = {p: p.read_bytes() for p in [run / "report.json", *run.glob("students/*/export/README.md")]}
    score, scored = report_module._score_export, []

    def stopped_at_the_third(name, *args, **kw):
        if len(scored) == 2:
            raise KeyboardInterrupt
        scored.append(name)
        return score(name, *args, **kw)

    monkeypatch.setattr(report_module, "_score_export", stopped_at_the_third)
    with pytest.raises(KeyboardInterrupt):
        report_module.evaluate_run(cfg, progress=False)
    assert {p: p.read_bytes() for p in kept} == kept
    progress = json.loads((run / "eval_progress.json").read_text())
    assert set(progress["students"]) == set(scored) == {"scout", "maverick"} and progress["teacher"]

    scored.clear()
    report = report_module.evaluate_run(cfg, progress=False)
    assert scored == ["dense", "dense-baseline"] and not (run / "eval_progress.json").exists()
    speed = "inference_tokens_per_s"  # timed: not a figure that repeats
    for row in [report["teacher"], full["teacher"], *report["students"].values(), *full["students"].values()]:
        row.pop(speed)
    assert json.loads(json.dumps(report)) == full

    # An export written again since, to other weights, is scored again
    scored.clear()
    with pytest.raises(KeyboardInterrupt):
        report_module.evaluate_run(cfg, progress=False)  # scout and maverick kept
    from tests.conftest import run_cli

    # as `distill run` does before its eval: maverick exported again, to the same bytes (kept), and
    # scout exported from its earlier checkpoint (scored again)
    students = run / "students"
    for ckpt, name in ((students / "maverick", "maverick"), (sorted((students / "scout" / "checkpoints").glob("step_*"))[0], "scout")):
        r = run_cli("export", str(ckpt), "--out", str(students / name / "export"), "--overwrite")
        assert r.returncode == 0, r.stderr[-2000:]
    gone = run / "students" / "dense" / "export"

    def removed_while_scoring(name, *args, **kw):  # and dense's export removed once it is scored
        scored.append(name)
        stats = score(name, *args, **kw)
        if name == "dense":
            shutil.rmtree(gone)
        return stats

    scored.clear()
    monkeypatch.setattr(report_module, "_score_export", removed_while_scoring)
    report = report_module.evaluate_run(cfg, progress=False)
    assert scored == ["scout", "dense", "dense-baseline"]
    assert not gone.exists() and set(report["students"]) == {"scout", "maverick", "dense", "dense-baseline"}
    assert report["students"]["dense"]["val_ppl"] == full["students"]["dense"]["val_ppl"]


def test_eval_refuses_a_cache_another_teacher_wrote_and_drops_scores_of_other_inputs(demo_dir, tmp_path, monkeypatch,
                                                                                       capsys):
    """Eval scored agreement and KL against a cache the teacher in OUT/teacher did not write (its
    weights changed since), where `distill train` refuses it; and an eval resumed after its inputs
    changed scored every model again without a word."""
    from safetensors.torch import load_file, save_file

    from distill.config import load_config
    from distill.report import report as report_module
    from tests.conftest import run_cli

    run, cfg_path = _run_copy(demo_dir, tmp_path)
    score = report_module._score_export

    def stopped_at_the_second(name, *args, **kw):
        if name == "maverick":
            raise KeyboardInterrupt
        return score(name, *args, **kw)

    monkeypatch.setattr(report_module, "_score_export", stopped_at_the_second)
    with pytest.raises(KeyboardInterrupt):
        report_module.evaluate_run(load_config(cfg_path), progress=False)
    monkeypatch.setattr(report_module, "_score_export", score)
    capsys.readouterr()
    report_module.evaluate_run(load_config(cfg_path, {"train.eval_blocks": 2}), progress=True)
    assert ("[eval] the scores an eval stopped earlier kept are of other inputs (the config, data, teacher, cache or "
            "device changed since): every model is scored again") in capsys.readouterr().err

    weights = next((run / "teacher").glob("*.safetensors"))
    tensors = load_file(str(weights))
    name = next(k for k in tensors if k.endswith("lm_head.weight") or k.endswith("embed_tokens.weight"))
    tensors[name] = tensors[name] * 1.5
    save_file(tensors, str(weights), metadata={"format": "pt"})
    r = run_cli("eval", "-c", str(cfg_path), "--quiet")
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert "was written for a different setup: teacher_weights_hash" in r.stderr.strip().splitlines()[-1], r.stderr


def test_inspect_verify_finds_damaged_exports_and_checkpoints(demo_dir, tmp_path):
    """`inspect --verify` on an export or a checkpoint checked nothing: a truncated or flipped
    shard got exit 0.  An export records each weights file's size and SHA-256 and verify checks
    them (a flipped byte); a checkpoint's torch files are checked by their CRCs, its
    safetensors by their headers (a truncation)."""
    from tests.conftest import run_cli

    wide = {"COLUMNS": "500"}  # rich's lines unwrapped
    out = tmp_path / "export"
    assert run_cli("export", str(demo_dir / "students" / "scout"), "--out", str(out), "--max-shard-size", "200KB").returncode == 0
    shards = sorted(out.glob("*.safetensors"))
    recorded = json.loads((out / "distill_meta.json").read_text())["files"]
    assert len(shards) > 1 and {s.name for s in shards} | {"config.json", "tokenizer.json"} <= set(recorded)
    r = run_cli("inspect", str(out), "--verify", env=wide)
    assert r.returncode == 0 and "verify: ok" in r.stdout, r.stdout + r.stderr
    data = bytearray(shards[1].read_bytes())
    data[-3] ^= 1  # inside a tensor: the header still reads
    shards[1].write_bytes(bytes(data))
    r = run_cli("inspect", str(out), "--verify", env=wide)
    assert r.returncode == 1 and "verify: 1 problem(s)" in r.stdout, r.stdout + r.stderr
    assert f"BAD {shards[1]}: damaged (its SHA-256 differs" in r.stdout, r.stdout
    shards[0].write_bytes(shards[0].read_bytes()[:-8])
    (out / "generation_config.json").unlink()
    r = run_cli("inspect", str(out), "--verify", env=wide)
    assert r.returncode == 1 and "verify: 3 problem(s)" in r.stdout and "not fully covered" in r.stdout, r.stdout
    assert f"BAD {out / 'generation_config.json'}: missing (the export wrote it)" in r.stdout
    (out / "config.json").unlink()  # still an export (its distill_meta.json), damaged, not an unknown dir
    r = run_cli("inspect", str(out), "--verify", env=wide)
    assert r.returncode == 1 and f"BAD {out}: no config.json" in r.stdout, r.stdout + r.stderr

    import shutil

    student = tmp_path / "scout"
    shutil.copytree(demo_dir / "students" / "scout", student)
    r = run_cli("inspect", str(student), "--verify", env=wide)
    assert r.returncode == 0 and "verify: ok" in r.stdout, r.stdout + r.stderr
    latest = sorted((student / "checkpoints").glob("step_*"))[-1]
    state = bytearray((latest / "state.pt").read_bytes())
    state[len(state) // 2] ^= 1
    (latest / "state.pt").write_bytes(bytes(state))
    r = run_cli("inspect", str(student), "--verify", env=wide)
    assert r.returncode == 1 and "verify: 1 problem(s)" in r.stdout and "fails its CRC" in r.stdout, r.stdout
    weights = latest / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-8])
    r = run_cli("inspect", str(student), "--verify", env=wide)
    assert r.returncode == 1 and "verify: 2 problem(s)" in r.stdout, r.stdout
    (latest / "meta.json").write_text("{not json")  # was "nothing complete to describe" and exit 0 in a run's OUT
    r = run_cli("inspect", str(student), "--verify", env=wide)
    assert r.returncode == 1 and f"BAD {latest / 'meta.json'}: unreadable" in r.stdout, r.stdout + r.stderr
