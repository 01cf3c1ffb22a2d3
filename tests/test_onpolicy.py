"""On-policy co-distillation (distill/train/on_policy.py): students sample, one teacher
forward per step scores every student's samples, each learns from its own."""
from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import run_cli
from tests.hf_models import chat_rows, save_model, write_jsonl

DENSE = {"hidden_size": 32, "num_layers": 1, "num_heads": 2, "num_kv_heads": 1, "head_dim": 16}


@pytest.fixture(scope="module")
def op(hf_family, tmp_path_factory):
    """Chat rows, the family's teacher, and a teacher without vocab padding (its copy as a
    student is then the very same distribution)."""
    work = tmp_path_factory.mktemp("onpolicy")
    exact = save_model("qwen3", hf_family["vocab"], work / "exact_teacher", hf_family["tokenizer"], seed=4)
    return {"data": write_jsonl(chat_rows(), work / "chat.jsonl"), "teacher": hf_family["teacher"],
            "exact": exact, "student": hf_family["student"], "vocab": hf_family["vocab"]}


def _dense(name: str, width: int = 32, **extra) -> dict:
    return {"name": name, "model": {"preset": "dense", "args": {**DENSE, "hidden_size": width}},
            "optim": {"lr": 3e-3, "warmup_steps": 1}, **extra}


def _raw(op, out, students, share=None, steps=2, teacher=None, **train) -> dict:
    raw = {"out_dir": str(out), "seed": 5,
           "data": {"paths": [str(op["data"])], "seq_len": 160, "val_fraction": 0.2},
           "teacher": {"source": "checkpoint", "path": str(teacher or op["teacher"])}, "cache": {"k": 8},
           "students": students,
           "train": {"mode": "online", "steps": steps, "batch_size": 2, "eval_every": 0, "eval_blocks": 1,
                     "checkpoint_every": 0, **train}}
    if share is not None:
        raw["train"]["on_policy"] = {**({"share": share} if share else {}), "max_new_tokens": 6}
    return raw


def _train(raw: dict, resume: bool = False) -> dict:
    from distill.config import check_config, parse_config
    from distill.stages import train_students

    return train_students(check_config(parse_config(raw)), resume=resume, progress=False)


def _weights(out, name: str, step: int) -> dict:
    return load_file(str(out / "students" / name / "checkpoints" / f"step_{step:08d}" / "model.safetensors"))


ALWAYS = {"kind": "constant", "start": 1.0}


@pytest.fixture
def spy(monkeypatch):
    """Counts the teacher model's real forwards during training (evaluation stubbed out)."""
    import distill.runtime
    import distill.train.loop

    calls = {"forwards": 0, "teacher": None}
    make = distill.runtime.live_teacher

    def live_teacher(*args, **kwargs):
        teacher = make(*args, **kwargs)
        teacher.model.model.register_forward_pre_hook(lambda *_: calls.__setitem__("forwards", calls["forwards"] + 1))
        calls["teacher"] = teacher
        return teacher

    for source in ("preset", "checkpoint"):  # the teachers that score batches in-process
        monkeypatch.setitem(distill.runtime.TEACHER_SOURCES, source, live_teacher)
    monkeypatch.setattr(distill.train.loop, "evaluate_model", lambda *a, **k: {})
    return calls


@pytest.mark.parametrize("n", [1, 2, 3])
def test_one_teacher_forward_per_on_policy_step(n, op, spy, tmp_path):
    students = [_dense("a"), {"name": "b", "model": {"path": str(op["student"])}}, _dense("c", 48)][:n]
    result = _train(_raw(op, tmp_path / "out", students, ALWAYS, steps=2))
    assert spy["forwards"] == 2  # one per step, whatever the number of students
    assert spy["teacher"].forward_calls == 2 == result["teacher_forward_calls"]
    for s in students:
        rows = [json.loads(l) for l in (tmp_path / "out" / "students" / s["name"] / "metrics.jsonl").read_text().splitlines()]
        assert [r.get("on_policy") for r in rows if r.get("kind", "train") == "train"] == [True, True]


def test_a_student_co_trained_equals_it_trained_alone(op, spy, tmp_path):
    """Its samples are seeded by (seed, step, its name), its rows of the one teacher batch are
    its own: two other students beside it change nothing but float rounding."""
    others = [{"name": "b", "model": {"path": str(op["student"])}}, _dense("c", 48)]
    _train(_raw(op, tmp_path / "three", others + [_dense("a")], ALWAYS, steps=3))  # a last: rows 4-5 of 6
    _train(_raw(op, tmp_path / "alone", [_dense("a")], ALWAYS, steps=3))
    together, alone = _weights(tmp_path / "three", "a", 3), _weights(tmp_path / "alone", "a", 3)
    for k in alone:
        assert torch.allclose(together[k], alone[k], rtol=0, atol=1e-6), k
    assert spy["forwards"] == 6


def test_share_0_is_todays_run_bit_for_bit(op, spy, tmp_path):
    """a: the default share (off); b: its own share, constant 0."""
    students = [_dense("a"), {"name": "b", "model": {"path": str(op["student"])}}]
    _train(_raw(op, tmp_path / "off", students, steps=4))
    zero = _raw(op, tmp_path / "zero", students, {}, steps=4)  # seed 5's draws: step 3's is 0.12
    zero["students"][1]["on_policy_share"] = {"kind": "constant", "start": 0.0}
    zero["train"]["on_policy"].update(temperature=0.7, prompts_per_step=4)
    _train(zero)
    for name in ("a", "b"):
        off, on = _weights(tmp_path / "off", name, 4), _weights(tmp_path / "zero", name, 4)
        assert all(torch.equal(off[k], on[k]) for k in off), name


def test_a_cached_teacher_with_on_policy_steps_is_refused(op, tmp_path):
    raw = _raw(op, tmp_path / "out", [_dense("a")], {"kind": "linear", "start": 0.0, "end": 1.0}, mode="cached")
    (tmp_path / "run.yaml").write_text(json.dumps(raw))
    r = run_cli("train", "-c", str(tmp_path / "run.yaml"), "--quiet")
    assert r.returncode == 2, r.stderr[-2000:]
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "train.on_policy.share" in lines[0] and "train.mode: online" in lines[0], lines
    assert not (tmp_path / "out").exists()


def test_a_resumed_run_equals_an_uninterrupted_one(op, tmp_path):
    """Off-policy first, then on-policy (step 1 on: on-policy steps on both sides of the
    cut): the checkpoint at step 2 resumed to step 4 gives the weights of the run that never
    stopped (prompts and samples are seeded by the step, the global RNG is untouched by
    sampling)."""
    ramp = {"kind": "linear", "start": 0.0, "end": 1.0, "end_step": 1}
    raw = _raw(op, tmp_path / "full", [_dense("a"), {"name": "b", "model": {"path": str(op["student"])}}], ramp,
               steps=4, checkpoint_every=2, keep_last=3)
    _train(raw)
    rows = [json.loads(l) for l in (tmp_path / "full" / "students" / "a" / "metrics.jsonl").read_text().splitlines()]
    kinds = [bool(r.get("on_policy")) for r in rows if r.get("kind", "train") == "train"]
    assert kinds == [False, True, True, True], kinds  # the schedule, seen in the run
    cut = tmp_path / "cut"
    shutil.copytree(tmp_path / "full", cut)
    students = cut / "students"
    for name in ("a", "b"):
        shutil.rmtree(students / name / "checkpoints" / "step_00000004")
    (students / "committed.json").write_text(json.dumps({"students": {"a": 2, "b": 2}}))
    _train({**raw, "out_dir": str(cut)}, resume=True)
    for name in ("a", "b"):
        full, resumed = _weights(tmp_path / "full", name, 4), _weights(cut, name, 4)
        assert all(torch.equal(full[k], resumed[k]) for k in full), name


# ----------------------------------------------------------------------------- one step, in process


def _source(op, tmp_path, student_model: str, teacher_dir, divergence="reverse_kl"):
    """(OnPolicySource, Student) over the chat rows, as train_students builds them."""
    from distill.config import check_config, parse_config
    from distill.runtime import live_teacher, prepare
    from distill.train.on_policy import on_policy_source
    from distill.train.setup import build_students, loop_config, student_models

    raw = _raw(op, tmp_path / "out", [{"name": "s", "model": {"path": str(student_model)}}], ALWAYS,
               teacher=teacher_dir)
    raw["train"]["on_policy"]["divergence"] = divergence
    cfg = check_config(parse_config(raw))
    data = prepare(cfg)
    teacher = live_teacher(cfg, data, torch.device("cpu"))
    loop = loop_config(cfg, 2, 2, 0, 1, "test")
    students = build_students(cfg, student_models(cfg, data))
    return on_policy_source(cfg, teacher, data.tokenizer, loop, log=lambda line: None), students[0]


def _grads(student, recipe, mbs):
    from distill.train.student import distill_loss

    loss_cfg, w_soft = recipe
    student.model.zero_grad()
    mb = mbs[0]
    out = distill_loss(student.model, mb.batch.input_ids, mb.batch.labels, mb.signal, mb.valid, loss_cfg, w_soft,
                       baseline=False)
    out.total.backward()
    return out, {n: p.grad.clone() for n, p in student.model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("divergence", ["reverse_kl", "forward_kl", "jsd"])
def test_a_student_identical_to_the_teacher_gets_loss_0_and_no_gradient(op, tmp_path, divergence):
    source, student = _source(op, tmp_path, op["exact"], op["exact"], divergence)
    mbs = source.micro_batches(0, [student])[student.name]
    assert int((mbs[0].batch.labels != -100).sum()) > 0  # it did sample something to score
    out, grads = _grads(student, source.recipe(student), mbs)
    assert abs(float(out.total.detach())) < 1e-6, float(out.total.detach())
    assert max(float(g.abs().max()) for g in grads.values()) < 1e-6


def test_prompt_and_padding_tokens_get_no_gradient(op, tmp_path):
    """The teacher's signal at every non-target position (prompt, padding) and the ids of the
    padding after each sample are replaced: the gradients are bit-identical.  A target's
    signal does move them."""
    from losses.signal import TeacherSignal

    from distill.prompts import Prompt

    source, student = _source(op, tmp_path, op["student"], op["teacher"])
    source.prompts = [source.prompts[0], Prompt(source.prompts[1].ids[-3:], "")]  # a short one: padding after it
    mb = source.micro_batches(0, [student])[student.name][0]
    labels = mb.batch.labels
    targets = labels != -100  # (B, T): the sampled tokens
    for r, i in enumerate(source.prompt_indices(0)):  # the first target predicts the first sampled token
        assert int(targets[r].nonzero()[0]) == len(source.prompts[i].ids) - 1
    recipe = source.recipe(student)
    _, base = _grads(student, recipe, [mb])

    def replaced(where: torch.Tensor, ids: torch.Tensor):
        g = torch.Generator().manual_seed(7)
        sig = mb.signal
        other_ids = torch.randint(0, source.vocab, sig.topk_ids.shape, generator=g)
        other_lp = torch.log_softmax(torch.randn(sig.topk_logprobs.shape, generator=g) * 3, -1)
        pick = where[..., None]
        dense = None if sig.logits is None else torch.where(  # the default online signal: the whole distribution
            pick, torch.randn(sig.logits.shape, generator=g) * 3, sig.logits)
        signal = TeacherSignal(torch.where(pick, other_ids, sig.topk_ids), torch.where(pick, other_lp, sig.topk_logprobs),
                               dense)
        from distill.train.student import MicroBatch
        from teachers import Batch

        return MicroBatch(Batch(mb.batch.indices, ids, labels), signal, mb.valid)

    last = torch.stack([r.nonzero().max() for r in targets])  # (B,) each row's last target position
    padding = torch.arange(labels.shape[1])[None, :] > last[:, None] + 1  # after the last sampled token
    assert padding.any()
    ids = torch.where(padding, torch.randint(0, source.vocab, labels.shape), mb.batch.input_ids)
    _, same = _grads(student, recipe, [replaced(~targets, ids)])
    for name, g in base.items():
        assert torch.equal(same[name], g), name
    one = torch.zeros_like(targets)
    one[0, int(targets[0].nonzero()[0])] = True
    _, moved = _grads(student, recipe, [replaced(one, mb.batch.input_ids)])
    assert not all(torch.equal(moved[n], g) for n, g in base.items())


def test_prompts_are_the_training_rows_up_to_their_final_assistant_turn(op, tmp_path, hf_family):
    from distill.chat import render
    from distill.config import parse_config
    from distill.data import doc_in_val, load_documents
    from distill.train.on_policy import build_prompts

    cfg = parse_config(_raw(op, tmp_path, [_dense("a")], ALWAYS))
    tok = hf_family["tokenizer"]
    prompts = build_prompts(cfg, tok)
    docs = load_documents(cfg.data)
    train = [json.loads(c) for t, c in zip(docs["text"], docs["chat"]) if not doc_in_val(t, 0.2)]
    assert len(prompts) == len(train) < 120  # one per training row; validation rows give none
    chat = next(i for i, r in enumerate(train) if "messages" in r)
    text = tok.decode(prompts[chat].ids)
    assert text.endswith("And times?<|im_end|>\n<|im_start|>assistant\n"), text
    assert text.startswith("<|im_start|>system\n") and prompts[chat].reference == train[chat]["messages"][-1]["content"]
    ids, _ = render(tok, json.dumps(train[chat]))
    assert ids[: len(prompts[chat].ids)] == prompts[chat].ids  # the data's own rendering starts with it
    plain = next(i for i, r in enumerate(train) if "prompt" in r)
    assert tok.decode(prompts[plain].ids) == train[plain]["prompt"]
    assert prompts[plain].reference == train[plain]["completion"]


def test_row_sampler_draws_from_the_softmax_at_the_temperature_within_top_p():
    """Greedy over RowSampler's scores is a draw from softmax(logits / T) restricted to the
    top-p nucleus and renormalised: 6000 rows (seeds) of one logit vector, counted."""
    from distill.train.on_policy import RowSampler

    logits = torch.tensor([2.0, 1.5, 1.0, 0.2, -0.5, -3.0])
    t, top_p, n = 0.7, 0.9, 6000
    probs = torch.softmax(logits / t, -1)
    keep = torch.cumsum(probs, 0) - probs < top_p  # the nucleus (logits are sorted): the mass above < top_p
    assert 2 <= int(keep.sum()) <= 4, keep
    want = torch.where(keep, probs, 0.0) / probs[keep].sum()
    sampler = RowSampler(list(range(n)), t, top_p, torch.device("cpu"))
    picks = sampler(torch.zeros(n, 1, dtype=torch.long), logits.expand(n, -1).clone()).argmax(-1)
    freq = torch.bincount(picks, minlength=6).double() / n
    sigma = (want * (1 - want) / n).sqrt()
    assert bool(((freq - want).abs() <= 4 * sigma + 1e-12).all()), (freq, want)
    again = RowSampler(list(range(n)), t, top_p, torch.device("cpu"))(torch.zeros(n, 1, dtype=torch.long),
                                                                        logits.expand(n, -1).clone()).argmax(-1)
    assert torch.equal(picks, again)  # seeded: the same draws


def test_a_prompts_sample_does_not_depend_on_the_prompts_beside_it(op, tmp_path):
    """Two prompts sampled together give each the sample it gets alone (its place in the step
    seeds it): so one process and two ranks, each with half the prompts, draw the same."""
    source, student = _source(op, tmp_path, op["student"], op["teacher"])
    p = [source.prompts[0].ids, source.prompts[1].ids[-5:]]  # other lengths: other left padding
    width = max(map(len, p)) + source.op.max_new_tokens
    both = source.sample(student, p, [0, 1], 3, width)
    assert torch.equal(both[0], source.sample(student, p[:1], [0], 3, width)[0])
    assert torch.equal(both[1], source.sample(student, p[1:], [1], 3, width)[0])
    assert not torch.equal(both[1], source.sample(student, p[1:], [0], 3, width)[0])  # another place: another draw


def test_a_student_with_another_tokenizer_is_refused_in_an_on_policy_run(op, tmp_path):
    from tests.hf_models import make_tokenizer

    tok = make_tokenizer(["abc def " * 50], tmp_path / "tok", alphabet="reversed")  # same size, other ids
    other = save_model("llama", op["vocab"], tmp_path / "other", tok, seed=3)
    raw = _raw(op, tmp_path / "out", [_dense("a"), {"name": "b", "model": {"path": str(other)}}], ALWAYS)
    (tmp_path / "run.yaml").write_text(json.dumps(raw))
    r = run_cli("train", "-c", str(tmp_path / "run.yaml"), "--quiet")
    assert r.returncode == 2, r.stderr[-2000:]
    assert "Traceback" not in r.stderr, r.stderr[-2000:]  # (data preparation says its own line first)
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("error: student b: its tokenizer") and f"({other}) is not the run's" in last, last


@pytest.mark.parametrize("key, value", [("temperature", 0.3), ("top_p", 0.3), ("prompts_per_step", 1),
                                        ("divergence", "forward_kl"), ("divergence", "jsd")])
def test_each_on_policy_option_changes_the_run(op, spy, tmp_path, key, value):
    """Every on-policy step, the base run against one with `key` changed: its student ends
    elsewhere (before, only the API-level RowSampler saw temperature and top_p, and the
    divergences only a student equal to the teacher, where every one is 0), and the same
    config run again ends bit for bit where the base did: what an ignored key would give."""
    base = _raw(op, tmp_path / "base", [_dense("a")], ALWAYS, steps=2)
    _train(base)
    _train(_raw(op, tmp_path / "again", [_dense("a")], ALWAYS, steps=2))
    changed = _raw(op, tmp_path / "changed", [_dense("a")], ALWAYS, steps=2)
    changed["train"]["on_policy"][key] = value
    _train(changed)
    ref = _weights(tmp_path / "base", "a", 2)
    assert all(torch.equal(_weights(tmp_path / "again", "a", 2)[k], ref[k]) for k in ref)
    got = _weights(tmp_path / "changed", "a", 2)
    assert max(float((got[k] - ref[k]).abs().max()) for k in ref) > 1e-4, f"on_policy.{key} was ignored"
    if key == "prompts_per_step":  # 1 prompt a step, not batch_size's 2
        rows = [json.loads(l) for l in (tmp_path / "changed" / "students" / "a" / "metrics.jsonl").read_text().splitlines()]
        assert [r.get("samples") for r in rows if r.get("kind", "train") == "train"] == [1, 1], rows
