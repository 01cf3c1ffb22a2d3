"""`distill eval` on prompts (distill/report/generation.py): students answer held-out prompts,
greedy and sampled; the teacher scores their completions (reverse KL), exact match against
the data's answers, three samples beside the teacher's in report.md."""
from __future__ import annotations

import json
import math

import pytest
import yaml

from tests.conftest import run_cli
from tests.hf_models import chat_rows, write_jsonl

DENSE = {"hidden_size": 32, "num_layers": 1, "num_heads": 2, "num_kv_heads": 1, "head_dim": 16}


def _run(hf_family, out, rows, **train) -> dict:
    """`distill run` over the CLI (online teacher, 2 steps), then report.json."""
    data = write_jsonl(rows, out.parent / f"{out.name}.jsonl")
    cfg = {"out_dir": str(out), "seed": 3, "data": {"paths": [str(data)], "seq_len": 160, "val_fraction": 0.2},
           "teacher": {"source": "checkpoint", "path": str(hf_family["teacher"])}, "cache": {"k": 8},
           "students": [{"name": "a", "model": {"preset": "dense", "args": DENSE}},
                        {"name": "b", "model": {"path": str(hf_family["student"])}}],
           "train": {"mode": "online", "steps": 2, "batch_size": 2, "eval_every": 0, "eval_blocks": 1,
                     "checkpoint_every": 0, **train}}
    (out.parent / f"{out.name}.yaml").write_text(yaml.safe_dump(cfg))
    r = run_cli("run", "-c", str(out.parent / f"{out.name}.yaml"), "--quiet", timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads((out / "report.json").read_text())


def test_eval_on_chat_data_scores_the_students_completions(hf_family, tmp_path):
    report = _run(hf_family, tmp_path / "chat", chat_rows(), eval_prompts=5, on_policy={"max_new_tokens": 6})
    gen = report["generation"]
    assert gen["prompts"] == 5 and gen["max_new_tokens"] == 6 and gen["temperature"] == 1.0
    assert set(gen["teacher"]) == {"mean_length", "exact_match"}
    for name in ("a", "b"):
        g = report["students"][name]["generation"]
        for mode in ("greedy", "sampled"):
            assert set(g[mode]) == {"reverse_kl", "mean_length", "exact_match"}, g[mode]
            assert 1 <= g[mode]["mean_length"] <= 6  # EOS counted, never more than max_new_tokens
            assert g[mode]["reverse_kl"] > 1e-3  # an untrained student is not the teacher
            assert g[mode]["exact_match"] == 0.0  # nor does it answer
        assert len(g["samples"]) == 3 and all({"prompt", "student", "teacher", "reference"} <= set(s)
                                              for s in g["samples"])
    md = (tmp_path / "chat" / "report.md").read_text()
    section = md.split("## Generation on held-out prompts")[1]
    assert section.count("### ") == 2 and section.count("prompt:") == 6 and section.count("- teacher: `") == 6
    sample = report["students"]["a"]["generation"]["samples"][0]
    assert sample["prompt"] in section and f"- reference: `{sample['reference']}`" in section
    # `distill eval` again, bars on (a log's plain lines): each model's scoring and answering shows progress
    r = run_cli("eval", "-c", str(tmp_path / "chat.yaml"), timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    for line in ("eval: teacher answers 5/5", "eval: student a answers 10/10", "eval: student b answers 10/10",
                 "eval: student a 1/1", "eval: teacher 1/1"):
        assert line in r.stdout, (line, r.stdout[:3000])


def test_a_chat_eval_stopped_part_way_resumes_to_the_same_report(hf_family, tmp_path, monkeypatch):
    """Cached chat data: the rerun keeps the teacher's row and its answers, loads the teacher
    model only to score the students left (their answers), and ends at the report an eval
    never stopped writes."""
    from distill.config import load_config
    from distill.report import report as report_module

    full = _run(hf_family, tmp_path / "chat", chat_rows(), eval_prompts=4, on_policy={"max_new_tokens": 6},
                mode="cached")
    cfg = load_config(tmp_path / "chat.yaml")
    score, scored = report_module._score_export, []

    def stopped_at_b(name, *args, **kw):
        if name == "b":
            raise KeyboardInterrupt
        scored.append(name)
        return score(name, *args, **kw)

    monkeypatch.setattr(report_module, "_score_export", stopped_at_b)
    with pytest.raises(KeyboardInterrupt):
        report_module.evaluate_run(cfg, progress=False)
    kept = json.loads((tmp_path / "chat" / "eval_progress.json").read_text())
    assert set(kept["students"]) == {"a"} and len(kept["teacher_greedy"]) == 4 and kept["teacher"]

    generated = []
    monkeypatch.setattr(report_module, "_score_export", lambda name, *a, **kw: scored.append(name) or score(name, *a, **kw))
    real_generate = report_module.generation.generate
    monkeypatch.setattr(report_module.generation, "generate",
                        lambda model, *a, **kw: generated.append(type(model).__name__) or real_generate(model, *a, **kw))
    report = report_module.evaluate_run(cfg, progress=False)
    assert scored == ["a", "b"] and not (tmp_path / "chat" / "eval_progress.json").exists()
    # the teacher's answers were kept: only student b answered (greedy and sampled), not the Qwen3 teacher
    assert generated == ["LlamaForCausalLM"] * 2, generated
    for row in [report["teacher"], full["teacher"], *report["students"].values(), *full["students"].values()]:
        row.pop("inference_tokens_per_s")
    assert json.loads(json.dumps(report)) == full


def test_plain_text_data_report_has_no_generation(hf_family, tmp_path):
    rows = [{"text": f"{r['prompt']}{r['completion']}"} for r in chat_rows() if "prompt" in r]
    report = _run(hf_family, tmp_path / "plain", rows)
    assert "generation" not in report and all("generation" not in r for r in report["students"].values())
    assert set(report) == {"teacher", "students", "data_fingerprint", "val_blocks", "scored_tokens", "teacher_signal"}
    md = (tmp_path / "plain" / "report.md").read_text()
    assert "Generation" not in md
    # dense students: no expert-load plot is drawn, and the report names none
    assert "expert_load.png" not in md and not (tmp_path / "plain" / "expert_load.png").exists()
    assert "Plots: `curves.png` (training and validation), `schedule.png` (hard/soft weights)." in md
    # online, the defaults: scored against the whole distribution, so the teacher agrees with itself
    # (this teacher's vocab is padded by 12 rows past the tokenizer's: the report says what that does)
    assert report["teacher_signal"] == ("the teacher's whole distribution (exact); the signal spans the tokenizer's "
                                        f"{hf_family['vocab']} tokens, the teacher's 12 padding rows cut away and "
                                        "the rest renormalised, so the teacher's own row shows the mass its model "
                                        "puts on those rows")
    assert "measured against the teacher's whole distribution (exact); the signal spans" in md
    # ... up to the mass its random-init lm_head puts on the 12 ids padded past the tokenizer's
    # 300 (the signal renormalises over the tokenizer's): KL = -log(1 - that) ~ log(312 / 300)
    padded = json.loads((hf_family["teacher"] / "config.json").read_text())["vocab_size"]
    assert padded == 312 and report["teacher"]["teacher_top1_agreement"] == 1.0
    assert report["teacher"]["kl_to_teacher"] == pytest.approx(math.log(padded / 300), abs=2e-3)


def test_online_eval_runs_the_teacher_once_over_the_held_out_blocks(hf_family, tmp_path, monkeypatch):
    """An online eval asked the live teacher for each held-out batch once per model scored (the
    teacher's row and each student); now its signal is kept after the first, and the report is
    the one the teacher asked each time gives."""
    from distill.config import load_config
    from distill.report import report as report_module
    from teachers.live import LiveTeacher

    rows = [{"text": f"{r['prompt']}{r['completion']}"} for r in chat_rows() if "prompt" in r]
    _run(hf_family, tmp_path / "plain", rows, eval_blocks=12)
    cfg = load_config(tmp_path / "plain.yaml")
    asked = []
    signal = LiveTeacher.signal
    monkeypatch.setattr(LiveTeacher, "signal", lambda self, batch: asked.append(batch.indices) or signal(self, batch))
    kept = report_module.evaluate_run(cfg, progress=False)
    n = kept["val_blocks"]
    assert asked == [list(range(a, min(a + 8, n))) for a in range(0, n, 8)]  # once each, for all three models
    asked.clear()
    monkeypatch.setattr(report_module, "HELD_OUT_SIGNAL_BYTES", 0)  # nothing kept: the teacher asked each time
    each_time = report_module.evaluate_run(cfg, progress=False)
    assert len(asked) == 3 * len(range(0, n, 8))
    for report in (kept, each_time):
        for row in [report["teacher"], *report["students"].values()]:
            row.pop("inference_tokens_per_s")
    assert kept == each_time


# ----------------------------------------------------------------------------- in process


@pytest.fixture(scope="module")
def models(hf_family):
    from students.build import load_causal_lm

    return {"teacher": load_causal_lm(hf_family["teacher"]), "twin": load_causal_lm(hf_family["teacher"]),
            "student": load_causal_lm(hf_family["student"]), "tok": hf_family["tokenizer"]}


def _prompts(tok, n=5):
    from distill.prompts import prompt_of

    rows = [r for r in chat_rows() if "messages" in r][:n]
    return [prompt_of(tok, json.dumps(r)) for r in rows]


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_a_student_identical_to_the_teacher_has_reverse_kl_0(models, temperature):
    """The teacher scores its twin's completions: KL 0 on greedy and sampled ones, one
    teacher forward per batch; an unrelated student is far from 0 (the measure can fail)."""
    import torch

    from distill.report.generation import GenSettings, evaluate_generation, generate
    from teachers import LiveTeacher

    tok = models["tok"]
    prompts = _prompts(tok)
    s = GenSettings(max_new_tokens=8, temperature=temperature, top_p=1.0, seed=0, batch_size=2)
    judge = LiveTeacher(models["teacher"], 8, len(tok), torch.device("cpu"), keep_dense=True)
    teacher_greedy = generate(models["teacher"], [p.ids for p in prompts], tok, s)
    twin = evaluate_generation(models["twin"], "twin", judge, tok, prompts, s, teacher_greedy)
    assert judge.forward_calls == 2 * 3  # greedy and sampled: 3 batches of 2, 2, 1 prompts each
    assert twin["greedy"]["reverse_kl"] < 1e-6 and twin["sampled"]["reverse_kl"] < 1e-6, twin
    assert [s["student"] for s in twin["samples"]] == [s["teacher"] for s in twin["samples"]]  # greedy = greedy
    other = evaluate_generation(models["student"], "other", judge, tok, prompts, s, teacher_greedy)
    assert other["greedy"]["reverse_kl"] > 1e-3 and other["sampled"]["reverse_kl"] > 1e-3, other  # random models: near uniform


def test_reverse_kl_is_the_mean_over_completion_tokens_of_the_exact_kl(models):
    """Against torch: per sample, KL(softmax(s/T) || softmax(t/T)) summed over the
    completion's positions only (prompt and padding left out), divided by their count."""
    import torch
    import torch.nn.functional as F

    from distill.report.generation import reverse_kl_sum
    from teachers import LiveTeacher

    tok, T = models["tok"], 1.5
    prompts = [p.ids for p in _prompts(tok, 3)]
    completions = [[5, 9, tok.eos_token_id], [7], [11, 12]]
    judge = LiveTeacher(models["teacher"], 8, len(tok), torch.device("cpu"), keep_dense=True)
    total, count = reverse_kl_sum(models["student"], judge, prompts, completions, tok, T, batch_size=2)
    want, n = 0.0, 0
    for p, c in zip(prompts, completions):
        ids = torch.tensor([p + c[:-1]])
        with torch.no_grad():
            s = models["student"](input_ids=ids).logits[0, len(p) - 1:, : len(tok)] / T
            t = models["teacher"](input_ids=ids).logits[0, len(p) - 1:, : len(tok)] / T
        want += float(F.kl_div(t.log_softmax(-1), s.log_softmax(-1), log_target=True, reduction="sum"))
        n += len(c)
    assert count == n == 6
    assert abs(total - want) < 1e-4 * max(1.0, want), (total, want)


def test_exact_match_strips_whitespace_and_drops_eos(models):
    from distill.report.generation import completion_stats
    from distill.prompts import Prompt

    tok = models["tok"]
    enc = lambda text: tok(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    prompts = [Prompt([1], "42"), Prompt([1], "42"), Prompt([1], " 4 2\n"), Prompt([1], "7")]
    completions = [enc(" 42 ") + [tok.eos_token_id], enc("41") + [tok.eos_token_id], enc("4 2"), enc("7\n")]
    stats = completion_stats(completions, prompts, tok)
    assert stats["exact_match"] == 0.75
    assert stats["mean_length"] == sum(map(len, completions)) / 4
    no_answers = completion_stats(completions, [Prompt([1], "")] * 4, tok)  # data without answers
    assert set(no_answers) == {"mean_length"}


def test_generation_stops_at_the_chat_templates_end_of_turn(tmp_path):
    """A base tokenizer (EOS <|endoftext|>) under a ChatML template, as Qwen's base models
    ship: chat students learn to end turns with <|im_end|>, so eval's and on-policy's
    generation stop there too (before: only at EOS, every completion ran to max_new_tokens,
    skewing exact match, mean length and the teacher's reverse KL).  A tokenizer whose EOS is
    the end of turn, or that has no template, stops at EOS alone."""
    import torch
    from transformers import AutoTokenizer

    from distill.chat import stop_ids
    from distill.report.generation import GenSettings, generate
    from students.build import load_causal_lm
    from tests.hf_models import make_tokenizer, save_model

    chat = make_tokenizer([json.dumps(r) for r in chat_rows()], tmp_path / "chatml")
    end = chat.convert_tokens_to_ids("<|im_end|>")
    assert stop_ids(chat) == [end]  # EOS is the end of turn
    base = AutoTokenizer.from_pretrained(str(tmp_path / "chatml"))
    base.eos_token = "<|endoftext|>"
    assert stop_ids(base) == [base.eos_token_id, end]
    base.chat_template = None
    assert stop_ids(base) == [base.eos_token_id]
    base = AutoTokenizer.from_pretrained(str(tmp_path / "chatml"))
    base.eos_token = "<|endoftext|>"
    model = load_causal_lm(save_model("llama", len(base), tmp_path / "m", base, hidden_size=32, intermediate_size=64,
                                      num_attention_heads=2, num_key_value_heads=1, num_hidden_layers=1))
    head = torch.nn.Linear(32, len(base), bias=True)  # every position's argmax: <|im_end|>
    with torch.no_grad():
        head.weight.zero_()
        head.bias.zero_()
        head.bias[end] = 10.0
    model.lm_head = head
    text = base.apply_chat_template([{"role": "user", "content": "2 + 2?"}], add_generation_prompt=True, tokenize=False)
    prompts = [base.encode(text, add_special_tokens=False)]
    assert generate(model, prompts, base, GenSettings(6, 1.0, 1.0, 0)) == [[end]]
    assert generate(model, prompts, base, GenSettings(6, 1.0, 1.0, 0), sample_seed=1) == [[end]]
