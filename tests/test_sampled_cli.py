"""A sampled cache over the real CLI: cache, train, eval, inspect; and the refusals."""
import json

import pytest
import yaml

from tests.conftest import run_cli

pytestmark = pytest.mark.slow


def _config(online_setup, tmp_path, **over):
    work, path = online_setup
    cfg = yaml.safe_load(path.read_text())
    cfg["out_dir"] = str(tmp_path / "run")
    cfg["cache"] = {"k": 16, "estimator": "sampled", "samples": 24, "sample_temperature": 2.0}
    cfg["students"][0]["loss"] = {"tail": "sampled", "temperature": 2.0}
    cfg["students"].append({"name": "dense-ce", "model": cfg["students"][0]["model"], "baseline": True})
    cfg["train"].update(mode="cached", eval_blocks=4)
    for key, value in over.items():
        cfg[key] = value
    out = tmp_path / "run.yaml"
    out.write_text(yaml.safe_dump(cfg))
    return out


def _stock_agreement(cfg_path, run, student: str) -> float:
    """Share of the held-out targets where the student export's argmax is the teacher's, both
    run by stock transformers."""
    import torch
    from transformers import AutoModelForCausalLM

    from distill.blocks import block_positions, first_blocks
    from distill.config import load_config
    from distill.data import vocab_size_of
    from distill.runtime import prepare
    from teachers import IGNORE, Batch

    cfg = load_config(cfg_path)
    data = prepare(cfg, False)
    held = first_blocks(data.val, cfg.train.eval_blocks)
    rows = list(range(len(held)))
    batch = Batch.of(held[rows], rows, block_positions(held, rows))
    kw = {} if batch.position_ids is None else {"position_ids": batch.position_ids}
    with torch.no_grad():
        teacher = AutoModelForCausalLM.from_pretrained(str(cfg.layout.teacher)).eval()
        model = AutoModelForCausalLM.from_pretrained(str(run / "students" / student / "export")).eval()
        want = teacher(input_ids=batch.input_ids, **kw).logits[..., :vocab_size_of(data.tokenizer)].argmax(-1)
        got = model(input_ids=batch.input_ids, **kw).logits.argmax(-1)
    targets = batch.labels != IGNORE
    return float(((want == got) & targets).sum() / targets.sum())


@pytest.mark.parametrize("exact_top", [0, 4])
def test_sampled_cache_trains_evaluates_and_inspects(online_setup, tmp_path, exact_top):
    cfg = _config(online_setup, tmp_path)
    raw = yaml.safe_load(cfg.read_text())
    raw["cache"]["exact_top"] = exact_top  # 4: the teacher's top 4 kept exactly, the 24 draws from the rest
    # The teacher's twin, all but untrained: it agrees with the teacher's argmax, while this flat
    # random teacher's most frequent draw is almost never its argmax (the teacher's own row)
    raw["students"].append({"name": "twin", "model": {"path": raw["teacher"]["path"]}, "optim": {"lr": 1e-12},
                            "loss": raw["students"][0]["loss"]})
    cfg.write_text(yaml.safe_dump(raw))
    r = run_cli("run", "-c", str(cfg), "--quiet")
    assert r.returncode == 0, r.stderr[-3000:]
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    kd = report["students"]["dense"]
    assert kd["kl_to_teacher"] >= 0 and 0 <= kd["teacher_top1_agreement"] <= 1
    head = "its top 4 exactly and " if exact_top else ""
    assert report["teacher_signal"].startswith(f"{head}24 draws a token from the teacher at T = 2 "), report["teacher_signal"]
    md = " ".join((tmp_path / "run" / "report.md").read_text().split())
    assert "the teacher's own row shows the estimate's noise" in md
    assert "the students' agreement is with the teacher model's own argmax (exact)" in md
    # The students' agreement, recomputed with stock transformers: the teacher's argmax (over the
    # tokenizer's ids), not the most frequent of 24 draws at T = 2 (which missed it often)
    for name in ("dense", "twin"):
        got = report["students"][name]["teacher_top1_agreement"]
        assert got == pytest.approx(_stock_agreement(cfg, tmp_path / "run", name), abs=1e-9), name
    assert report["students"]["twin"]["teacher_top1_agreement"] > 0.9 > report["teacher"]["teacher_top1_agreement"]
    rows = [json.loads(line) for line in (tmp_path / "run" / "students" / "dense" / "metrics.jsonl").read_text().splitlines()]
    assert all(row["soft"] > 0 for row in rows if row["kind"] == "train")  # the sampled KL is trained on
    r = run_cli("inspect", str(tmp_path / "run" / "cache"), "--verify")
    said = "sampled (n=24, T=2, the exact top 4)" if exact_top else "sampled (n=24, T=2)"
    assert r.returncode == 0 and said in " ".join(r.stdout.split()) and "verify: ok" in r.stdout, r.stdout
    shown = " ".join(r.stdout.split())  # rich wraps long cells
    assert "(training targets only)" in shown and "bytes each" in shown and "bytes/block" in shown
    # The same cache, asked for by a top-k config: one line, exit 2.
    cfg2 = _config(online_setup, tmp_path, teacher={"source": "cache"})
    raw = yaml.safe_load(cfg2.read_text())
    raw["cache"].update(estimator="topk", dir=str(tmp_path / "run" / "cache"))
    raw["out_dir"] = str(tmp_path / "run2")  # another run: one run per out_dir
    # the tokenizer the cache's run took from its teacher (else a BPE trained here: other data,
    # refused as such before the estimator is looked at)
    raw["data"]["tokenizer"] = {"path": yaml.safe_load(online_setup[1].read_text())["teacher"]["path"]}
    raw["students"][0]["loss"] = {"tail": "bucket"}
    cfg2.write_text(yaml.safe_dump(raw))
    r = run_cli("train", "-c", str(cfg2), "--quiet")
    assert r.returncode == 2 and "holds a sampled signal but cache.estimator is topk" in r.stderr, r.stderr[-2000:]
    assert "Traceback" not in r.stderr
    if exact_top:  # and by a sampled config without the head: one line, naming the key
        raw["cache"].update(estimator="sampled", exact_top=0)
        raw["students"][0]["loss"] = {"tail": "sampled", "temperature": 2.0}
        cfg2.write_text(yaml.safe_dump(raw))
        r = run_cli("train", "-c", str(cfg2), "--quiet")
        assert r.returncode == 2 and "has exact_top 4 but cache.exact_top is 0" in r.stderr, r.stderr[-2000:]
        assert "Traceback" not in r.stderr


@pytest.mark.parametrize("exact_top", [0, 4])
def test_sampled_online_training_runs(online_setup, tmp_path, exact_top):
    cfg = _config(online_setup, tmp_path)
    raw = yaml.safe_load(cfg.read_text())
    raw["train"]["mode"] = "online"
    raw["cache"]["exact_top"] = exact_top
    cfg.write_text(yaml.safe_dump(raw))
    r = run_cli("train", "-c", str(cfg), "--quiet")
    assert r.returncode == 0, r.stderr[-3000:]
    summary = json.loads((tmp_path / "run" / "train_summary.json").read_text())
    assert summary["students"]["dense"]["kl_to_teacher"] >= 0
    # another exact head is another estimator, so another trajectory: --resume refuses it
    r = run_cli("train", "-c", str(cfg), "--quiet", "--resume", "--set", f"cache.exact_top={4 - exact_top}")
    assert r.returncode == 2 and "another config (the teacher signal)" in r.stderr, r.stderr[-2000:]


@pytest.mark.parametrize("change,message", [
    ({"tail": "bucket"}, "students.0.loss.tail: must be 'sampled' with cache.estimator: sampled"),
    ({"temperature": 1.0}, "students.0.loss.temperature: 1 but the teacher's tokens are drawn at"),
    ({"divergence": "reverse_kl"}, "'reverse_kl' cannot be estimated without bias from sampled teacher tokens"),
    ({"hard_target": "teacher_argmax"}, "students.0.loss.hard_target: teacher_argmax needs a top-k cache"),
])
def test_sampled_cache_config_mismatches_are_one_line(online_setup, tmp_path, change, message):
    cfg = _config(online_setup, tmp_path)
    raw = yaml.safe_load(cfg.read_text())
    raw["students"][0]["loss"].update(change)
    cfg.write_text(yaml.safe_dump(raw))
    r = run_cli("cache", "-c", str(cfg), "--quiet")
    assert r.returncode == 2 and message in r.stderr, r.stderr[-2000:]
    assert "Traceback" not in r.stderr and not (tmp_path / "run").exists()
