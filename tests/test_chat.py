"""Chat and instruction data: assistant-only targets from the tokenizer's own chat template
(as the template families users bring render them), whole-row packing, and one mask for the
hard and soft loss, adaptive weights and eval."""
from __future__ import annotations

import json
import math
import re
import shutil

import pytest
import torch
import yaml

from common.errors import UserError
from distill.chat import empty_answers, render
from distill.config import DataConfig, LossConfig
from distill.data import load_documents, prepare_data
from distill.train.student import distill_loss
from distill.train.validate import evaluate_model
from losses.signal import TeacherSignal
from students.build import load_causal_lm
from teachers import IGNORE, Batch, token_ids
from tests.oracles import pack_rows
from tests.hf_models import (CHATML, GENERATION, REASONING_LAST, SYSTEM_FIRST_USER, SYSTEM_LAST_USER, TOOLS,
                             chat_rows, tool_row, with_template, write_jsonl)

CONVERSATION = chat_rows()[0]
FIRST, LAST = (m["content"] for m in CONVERSATION["messages"] if m["role"] == "assistant")
THINKING = {**CONVERSATION, "messages": [m | {"reasoning_content": f"Think of {m['content'][:6]}"}
                                         if m["role"] == "assistant" else m for m in CONVERSATION["messages"]]}
CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'


def _targets_text(tok, row) -> str:
    ids, targets = render(tok, json.dumps(row))
    return tok.decode([i for i, t in zip(ids, targets) if t])


def _templated(hf_family, template, out):
    return with_template(hf_family["work"] / "tokenizer", template, out)


def test_only_assistant_turns_are_targets(hf_family):
    tok = hf_family["tokenizer"]
    turns = CONVERSATION["messages"]
    want = "".join(f"{m['content']}<|im_end|>" for m in turns if m["role"] == "assistant")
    assert _targets_text(tok, CONVERSATION) == want  # both turns, with their end-of-turn marker (not the newline after)
    ids, targets = render(tok, json.dumps(CONVERSATION))
    assert tok.decode(ids) == tok.apply_chat_template(turns, tokenize=False)  # the template's own rendering


def test_a_completion_ends_with_eos_as_a_target(hf_family):
    tok = hf_family["tokenizer"]
    ids, targets = render(tok, json.dumps({"prompt": "Say hi: ", "completion": "hi there."}))
    assert ids[-1] == tok.eos_token_id and targets[-1]  # the student learns where a completion stops
    assert _targets_text(tok, {"prompt": "Say hi: ", "completion": "hi there."}) == f"hi there.{tok.eos_token}"


@pytest.mark.parametrize("template,row,want", [
    (CHATML, CONVERSATION, f"{FIRST}<|im_end|>{LAST}<|im_end|>"),  # the newline after the marker is never written
    # earlier turns without reasoning (the template drops it), the last with its <think> block
    (REASONING_LAST, THINKING, f"{FIRST}<|im_end|><think>\nThink of {LAST[:6]}\n</think>\n\n{LAST}<|im_end|>"),
    # no generation prompt: the model writes from the template's space after [/INST]
    (SYSTEM_FIRST_USER, CONVERSATION, f" {FIRST} <|im_end|> {LAST} <|im_end|>"),
    (SYSTEM_LAST_USER, CONVERSATION, f" {FIRST}<|im_end|> {LAST}<|im_end|>"),
    (TOOLS, tool_row(), f"{CALL}<|im_end|>It is sunny in Paris.<|im_end|>"),
    (GENERATION, CONVERSATION, f"{FIRST}<|im_end|>{LAST}<|im_end|>"),  # what its markers mark: the same
], ids=["chatml", "reasoning-last-turn", "system-first-user", "system-last-user", "tool-calls", "generation-markers"])
def test_targets_are_what_the_assistant_writes(template, row, want, hf_family, tmp_path):
    tok = _templated(hf_family, template, tmp_path)
    ids, _ = render(tok, json.dumps(row))
    assert tok.decode(ids) == tok.apply_chat_template(row["messages"], tools=row.get("tools"), tokenize=False)
    assert _targets_text(tok, row) == want


@pytest.mark.parametrize("template,row,why", [
    (CHATML, tool_row(), r"the chat template renders nothing of assistant turn 1 \(fields: tool_calls\)"),
    (SYSTEM_FIRST_USER, {"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"},
                                      {"role": "assistant", "content": "c"}]},
     r"the chat template fails on it \(TemplateError: Conversation roles must alternate"),
], ids=["tool-call-chatml-cannot-show", "template-raises"])
def test_a_row_the_template_cannot_split_is_refused(template, row, why, hf_family, tmp_path):
    tok = _templated(hf_family, template, tmp_path)
    with pytest.raises(UserError, match=rf"data: chat row beginning {{\"messages\".*: {why}"):
        render(tok, json.dumps(row))


def test_an_unsplittable_row_stops_the_cli_naming_it(hf_family, tmp_path):
    from tests.conftest import run_cli

    path = write_jsonl(chat_rows()[:6] + [tool_row()] + chat_rows()[6:], tmp_path / "chat.jsonl")
    cfg = {"out_dir": str(tmp_path / "run"), "data": {"paths": [str(path)], "seq_len": 48},
           "teacher": {"source": "checkpoint", "path": str(hf_family["teacher"])}, "cache": {"k": 8},
           "students": [{"name": "s", "model": {"path": str(hf_family["student"])}}]}
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(cfg))
    r = run_cli("cache", "-c", str(tmp_path / "run.yaml"), "--quiet", timeout=300)
    assert r.returncode == 2, r.stderr[-3000:]
    assert r.stderr.strip().count("\n") == 0 and "Traceback" not in r.stderr  # one line
    assert r.stderr.startswith(f"error: data: chat {path} row 7: the chat template renders nothing of assistant")
    assert r.stderr.strip().endswith("data.bad_rows: skip drops such rows, counted")


def test_bad_rows_are_counted_then_skipped_when_asked(hf_family, tmp_path):
    """One bad row a run: each fix re-prepared the corpus to stop at the next.  The line now says
    how many more of the rows read with the first fail too, and `data.bad_rows: skip` drops
    them, counted, naming the first; the other rows prepare as they would alone."""
    from tests.conftest import run_cli

    rows = chat_rows()
    path = write_jsonl(rows[:3] + [tool_row()] + rows[3:8] + [tool_row(), tool_row()] + rows[8:], tmp_path / "chat.jsonl")
    cfg = {"out_dir": str(tmp_path / "run"), "data": {"paths": [str(path)], "seq_len": 48, "val_fraction": 0.2},
           "teacher": {"source": "checkpoint", "path": str(hf_family["teacher"])},
           "students": [{"name": "s", "model": {"path": str(hf_family["student"])}}]}
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(cfg))
    r = run_cli("prepare", "-c", str(tmp_path / "run.yaml"), "--quiet", timeout=300)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-3000:]
    assert re.search(rf"error: data: chat {path} row \d+: the chat template renders nothing of assistant .* \(\d more "
                     rf"of the [\d,]+ chat rows read with it fail too\)", r.stderr), r.stderr
    r = run_cli("prepare", "-c", str(tmp_path / "run.yaml"), "--quiet", "--set", "data.bad_rows=skip", timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert re.search(rf"\[data\] 3 of {len(rows) + 3} chat rows were skipped \(data.bad_rows: skip\): .* the first: "
                     rf"data: chat {path} row (4|10|11): ", r.stderr), r.stderr
    good = write_jsonl(rows, tmp_path / "good.jsonl")  # the same blocks as the good rows alone
    cfg_good = DataConfig(paths=[good], seq_len=48, val_fraction=0.2, tokenizer={"path": hf_family["teacher"]})
    alone = prepare_data(cfg_good, tmp_path / "alone")
    skipped = prepare_data(DataConfig(paths=[path], seq_len=48, val_fraction=0.2, bad_rows="skip",
                                      tokenizer={"path": hf_family["teacher"]}), tmp_path / "run")
    assert torch.equal(alone.train[:], skipped.train[:]) and torch.equal(alone.val[:], skipped.val[:])
    only_bad = write_jsonl([tool_row()] * 12, tmp_path / "bad.jsonl")  # every row skipped: said so, not "add data"
    r = run_cli("prepare", "-c", str(tmp_path / "run.yaml"), "--quiet", "--set", "data.bad_rows=skip",
                "--set", f"data.paths=[{only_bad}]", "--set", f"out_dir={tmp_path / 'bad'}", timeout=300)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-3000:]
    assert re.search(r"^error: data: the (train|val) split has no rows to learn from: \d+ of its \d+ chat rows were "
                     r"skipped as bad \(data.bad_rows: skip\), the first: data: chat ", r.stderr, re.M), r.stderr


def test_rows_are_packed_whole_and_long_rows_truncated():
    rows = [([1, 2, 3, 4], [False, False, True, True]), ([5, 6, 7], [False, True, True]),
            ([8] * 9, [False] * 3 + [True] * 6), ([9, 9], [True, False]), ([7] * 9, [False] * 7 + [True] * 2)]
    blocks, counts = pack_rows(rows, pad_id=0, block=6)
    # row 2 does not fit after row 1: it starts a new block, cut to 6; row 4 has no target after position 0;
    # row 5's first target (position 7) is past the block: it needs seq_len >= 7
    assert (counts.truncated, counts.no_target, counts.cut_away, counts.need, counts.need_all) == (1, 1, 1, 7, 7)
    assert blocks.tolist() == [[-2, -3, 3, 4, -1, -1], [-6, 6, 7, -1, -1, -1], [-9, -9, -9, 8, 8, 8]]
    batch = Batch.of(blocks, range(3))
    assert batch.input_ids.min() >= 0 and batch.labels[0].tolist() == [IGNORE, 3, 4, IGNORE, IGNORE]


def test_rows_truncation_empties_are_dropped_and_seq_len_must_rise(hf_family, tmp_path, capfd):
    short = [{"messages": [{"role": "user", "content": f"Hi {i}"}, {"role": "assistant", "content": "Hello."}]}
             for i in range(200)]
    long = [{"prompt": f"Read this first: {'and then some more words ' * (12 + 4 * i)}{i}. Now: ", "completion": "ok"}
            for i in range(5)]  # prompts of several lengths: the seq_len that keeps one is not the one that keeps all
    path = write_jsonl(short + long, tmp_path / "rows.jsonl")
    chatml = {"path": hf_family["teacher"]}
    prepare_data(DataConfig(paths=[path], seq_len=48, tokenizer=chatml), tmp_path / "a")
    err = capfd.readouterr().err
    assert "5 of 205 chat rows were dropped: truncation to 49 tokens cut every assistant / completion token" in err
    said = re.search(r"raise data.seq_len to at least (\d+) to keep them all \((\d+) keeps the shortest\)", err)
    need_all, need = int(said[1]), int(said[2])
    assert need_all > need
    prepare_data(DataConfig(paths=[path], seq_len=need, tokenizer=chatml), tmp_path / "b")
    assert "4 of 205 chat rows were dropped" in capfd.readouterr().err  # the shortest kept, no more
    prepare_data(DataConfig(paths=[path], seq_len=need_all, tokenizer=chatml), tmp_path / "c")
    assert "dropped" not in capfd.readouterr().err  # at that seq_len each keeps a target
    # 200 short rows under a template that adds a long system prompt: nothing left to learn
    long_system = "{{ '<|im_start|>system\\n' + 'You are a careful, helpful assistant. ' * 12 + '<|im_end|>\\n' }}"
    _templated(hf_family, long_system + CHATML, tmp_path / "tok")
    with pytest.raises(UserError, match=r"the train split is empty: its \d+ chat rows lost every assistant / "
                                        r"completion token .* raise data.seq_len to at least \d+ to keep them all \(\d+ keeps the shortest\)$"):
        prepare_data(DataConfig(paths=[write_jsonl(short, tmp_path / "short.jsonl")], seq_len=48,
                                tokenizer={"path": tmp_path / "tok"}), tmp_path / "d")


def test_chat_rows_with_no_assistant_turn_are_refused_with_advice_that_helps(hf_family, tmp_path):
    """It said `add data or raise data.val_fraction`: neither gives such rows a target."""
    rows = [{"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": f"Hi {i}"}]}
            for i in range(40)]
    with pytest.raises(UserError, match=r"split has no rows to learn from: none of its \d+ chat rows has an assistant "
                                        r"turn or completion to learn \(none, or each marked weight 0\), .*give rows "
                                        r"with the assistant's reply"):
        prepare_data(DataConfig(paths=[write_jsonl(rows, tmp_path / "q.jsonl")], seq_len=48,
                                tokenizer={"path": hf_family["teacher"]}), tmp_path / "a")


def test_empty_answers_are_counted_when_data_is_prepared(hf_family, tmp_path, capfd):
    """An assistant turn (or completion) with nothing in it is a row whose only target is the turn's
    end: the student learns to answer nothing.  It is often a placeholder left in the data, and
    was trained on without a word."""
    full = [{"messages": [{"role": "user", "content": f"Hi {i}"}, {"role": "assistant", "content": "Hello."}]}
            for i in range(40)]
    empty = [{"messages": [{"role": "user", "content": f"Bye {i}"}, {"role": "assistant", "content": ""}]}
             for i in range(3)]
    blank = [{"messages": [{"role": "user", "content": "Hm"}, {"role": "assistant", "content": "  "},
                           {"role": "user", "content": "Well?"}, {"role": "assistant", "content": "Yes."}]}]
    calls = [tool_row()]  # a turn of tool calls and no content writes something: not empty
    completions = [{"prompt": "Say: ", "completion": ""}, {"prompt": "Say: ", "completion": "x"}]
    _templated(hf_family, TOOLS, tmp_path / "tok")  # it renders tool calls
    tools = {"path": tmp_path / "tok"}
    prepare_data(DataConfig(paths=[write_jsonl(full + calls, tmp_path / "ok.jsonl")], seq_len=128, tokenizer=tools),
                 tmp_path / "a")
    assert "empty" not in capfd.readouterr().err
    rows = full + empty + blank + calls + completions
    prepare_data(DataConfig(paths=[write_jsonl(rows, tmp_path / "rows.jsonl")], seq_len=128, tokenizer=tools),
                 tmp_path / "b")
    err = capfd.readouterr().err
    assert "[data] 5 assistant turns or completions are empty: their only target is the end of the turn" in err, err
    parts = {"messages": [{"role": "user", "content": "Hi"},  # content as parts (multimodal chat rows)
                          {"role": "assistant", "content": [{"type": "text", "text": " "}]},
                          {"role": "assistant", "content": [{"type": "text", "text": "Hello"}]},
                          {"role": "assistant", "content": [{"type": "image"}]}]}
    assert empty_answers(json.dumps(parts)) == 1


@pytest.fixture(scope="module")
def chat_data(hf_family, tmp_path_factory):
    work = tmp_path_factory.mktemp("chat")
    path = write_jsonl(chat_rows(), work / "chat.jsonl")
    cfg = DataConfig(paths=[path], seq_len=48, val_fraction=0.2, tokenizer={"path": hf_family["teacher"]})
    return prepare_data(cfg, work / "run"), path


def test_chat_corpus_packs_masks_and_logs_truncation(chat_data, hf_family, tmp_path, capfd):
    data, path = chat_data
    assert load_documents(DataConfig(paths=[path])).column_names == ["text", "chat"]
    labels = Batch.of(data.train, range(len(data.train))).labels
    share = float((labels != IGNORE).float().mean())
    assert 0.2 < share < 0.8  # system and user turns are not targets
    # each row's targets are one run: a completion's ends with EOS, a ChatML turn's with <|im_end|>\n
    eos, newline = data.tokenizer.eos_token_id, data.tokenizer.convert_tokens_to_ids("Ċ")
    ends = [tuple(run[-2:]) for run in _target_runs(data.train[:])]
    assert {end for end in ends if end[-1] != newline} == {(data.tokenizer.convert_tokens_to_ids("."), eos)}
    assert all(end[0] == eos for end in ends if end[-1] == newline)
    capfd.readouterr()
    short = DataConfig(paths=[path], seq_len=24, val_fraction=0.2, tokenizer={"path": hf_family["teacher"]})
    prepared = prepare_data(short, tmp_path)
    said = capfd.readouterr().err
    # what the cut cost, counted independently: each kept row's tokens past the block
    rows = [render(data.tokenizer, c) for c in load_documents(DataConfig(paths=[path]))["chat"]]
    rows = [ids for ids, tgt in rows if next(p for p, t in enumerate(tgt) if t and p) < 25]  # the rest are dropped
    longest = max(len(r) for r in rows)
    line = next(l for l in said.splitlines() if "chat rows were longer than seq_len + 1 = 25 tokens" in l)
    truncated = int(re.search(r"\] (\d+) of", line).group(1))
    assert truncated == sum(len(r) > 25 for r in rows) > 0, line
    assert f"losing {sum(max(0, len(r) - 25) for r in rows):,} of the kept rows' {sum(map(len, rows)):,} tokens" in line
    assert line.endswith(f"raise data.seq_len to keep them whole (seq_len {longest - 1:,} keeps these whole)"), line
    from distill.report.inspect import data_rows

    root = next((tmp_path / "data").glob(f"blocks-{prepared.fingerprint}*"))
    shown = " ".join(v for k, v in data_rows(root, prepared.manifest).items() if k.startswith("split "))
    assert shown.count("chat rows truncated to the block, losing") >= 1, shown  # `inspect OUT/data` says it too


def test_a_long_conversation_is_rendered_only_as_far_as_a_block_keeps_it(hf_family):
    """Each assistant turn costs whole renderings of the conversation, so finding every turn of a
    long one was quadratic in its turns (a 400-turn row: 1,600 renderings, 27 s) however little
    of it a block kept.  With the block given, turns past the cut are not looked for: the kept
    tokens' targets are the same, at a few renderings."""
    tok = hf_family["tokenizer"]
    messages = []
    for i in range(60):
        messages += [{"role": "user", "content": f"question {i} about the sources"},
                     {"role": "assistant", "content": f"answer {i}: read the module docs first"}]
    row = json.dumps({"messages": messages})
    calls = []
    real = tok.apply_chat_template

    def counted(*args, **kw):
        calls.append(1)
        return real(*args, **kw)

    ids, whole = render(tok, row)
    block = 64
    assert len(ids) > 10 * block
    tok.apply_chat_template = counted
    try:
        cut_ids, cut = render(tok, row, block)
    finally:
        del tok.apply_chat_template
    assert cut_ids == ids and cut[:block] == whole[:block] and any(cut[:block])
    assert len(calls) < 20, len(calls)  # the whole row: 1 + 4 a turn, over 200


def _target_runs(blocks: torch.Tensor) -> list[list[int]]:
    """The ids of each maximal run of target tokens in packed blocks (N, T+1)."""
    runs, run = [], []
    for ids, target in zip(token_ids(blocks).tolist(), (blocks >= 0).tolist()):
        for i, t in zip(ids, target):
            if t:
                run.append(i)
            elif run:
                runs, run = runs + [run], []
        if run:
            runs, run = runs + [run], []
    return runs


def _signal(ids: torch.Tensor, k: int, vocab: int, seed: int) -> TeacherSignal:
    """A teacher-like top-k signal (B, T, k): log-probs of k distinct ids."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(*ids.shape, vocab, generator=g) * 3
    return TeacherSignal.from_logits(logits, k)


def _perturbed(signal: TeacherSignal, where: torch.Tensor, vocab: int) -> TeacherSignal:
    """The same signal with every position in `where` (B, T) replaced by a very different one."""
    other = _signal(where, signal.topk_ids.shape[-1], vocab, seed=99)
    pick = where[..., None]
    return TeacherSignal(torch.where(pick, other.topk_ids, signal.topk_ids),
                         torch.where(pick, other.topk_logprobs, signal.topk_logprobs))


def _grads(model, batch, signal, loss_cfg):
    model.zero_grad()
    valid = torch.ones_like(batch.labels, dtype=torch.bool)
    distill_loss(model, batch.input_ids, batch.labels, signal, valid, loss_cfg, 0.7, baseline=False).total.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("adaptive,hard", [("none", "labels"), ("entropy", "teacher_argmax")])
def test_no_gradient_flows_from_non_assistant_tokens(chat_data, hf_family, adaptive, hard):
    data, _ = chat_data
    vocab = data.tokenizer.__len__()
    model = load_causal_lm(hf_family["student"])
    batch = Batch.of(data.train[:4], range(4))
    masked = batch.labels == IGNORE  # (B, T): system/user turns, padding
    signal = _signal(batch.input_ids, 8, vocab, seed=0)
    cfg = LossConfig(adaptive=adaptive, hard_target=hard)
    base = _grads(model, batch, signal, cfg)
    same = _grads(model, batch, _perturbed(signal, masked, vocab), cfg)
    for name, g in base.items():
        assert torch.equal(same[name], g), name  # identical update: their signal never entered
    one_target = torch.zeros_like(masked)
    one_target[0, int((~masked[0]).nonzero()[0])] = True
    moved = _grads(model, batch, _perturbed(signal, one_target, vocab), cfg)
    assert not torch.equal(moved["model.embed_tokens.weight"], base["model.embed_tokens.weight"])  # tied; a target's signal does


@pytest.mark.parametrize("dense", [False, True])
def test_only_targets_reach_the_lm_head(chat_data, hf_family, dense, monkeypatch):
    """A chat block's prompt and padding positions skip the student's lm_head and losses
    (forward and backward): the same per-token losses and gradients as running every
    position through them with the mask, 0 at the skipped positions."""
    import losses.chunked as chunked
    from distill.train.student import student_forward

    data, _ = chat_data
    vocab = len(data.tokenizer)
    model = load_causal_lm(hf_family["student"])
    batch = Batch.of(data.train[:4], range(4))
    mask = (batch.labels != IGNORE).reshape(-1)  # (N,)
    assert 0 < int(mask.sum()) < mask.numel()
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(*batch.input_ids.shape, vocab, generator=g) * 3
    signal = TeacherSignal.from_logits(logits, 8, keep_dense=dense)
    cfg = LossConfig(temperature=2.0)
    rows_seen = []
    run_chunks = chunked._run_chunks
    monkeypatch.setattr(chunked, "_run_chunks", lambda rows, *a: rows_seen.append(rows.shape[0]) or run_chunks(rows, *a))

    def losses_and_grads(fn):
        model.zero_grad()
        hard, soft = fn()
        (hard.sum() + 0.5 * soft.sum()).backward()
        return hard.detach(), soft.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    got = losses_and_grads(lambda: student_forward(model, batch.input_ids, batch.labels, signal, mask, cfg, False))
    assert rows_seen == [int(mask.sum())]  # only the targets went through the lm_head

    def every_position():  # the reference: all N rows through the lm_head, the mask inside the loss
        hidden = model.model(input_ids=batch.input_ids, use_cache=False).last_hidden_state
        return chunked.per_token_losses(hidden.reshape(-1, hidden.shape[-1]), model.lm_head.weight, signal.flatten(),
                                        batch.labels.reshape(-1), mask, temperature=2.0)

    want = losses_and_grads(every_position)
    for a, b in zip(got[:2], want[:2]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
        assert (a[~mask] == 0).all() and (a[mask] != 0).any()
    for name, g_want in want[2].items():
        torch.testing.assert_close(got[2][name], g_want, rtol=1e-4, atol=1e-7, msg=name)


class _FixedTeacher:
    """A `Teacher` serving one given signal (all valid)."""

    forward_calls = reads = 0

    def __init__(self, signal):
        self.sig = signal

    def signal(self, batch):
        idx = list(batch.indices)
        return TeacherSignal(self.sig.topk_ids[idx], self.sig.topk_logprobs[idx]), torch.ones(len(idx), self.sig.topk_ids.shape[1], dtype=torch.bool)


def test_eval_scores_assistant_tokens_only(chat_data, hf_family):
    data, _ = chat_data
    blocks = data.val[:4]
    batch = Batch.of(blocks, range(len(blocks)))
    masked = batch.labels == IGNORE
    signal = _signal(batch.input_ids, 8, len(data.tokenizer), seed=0)
    model = load_causal_lm(hf_family["student"])
    a = evaluate_model(model, blocks, _FixedTeacher(signal))
    b = evaluate_model(model, blocks, _FixedTeacher(_perturbed(signal, masked, len(data.tokenizer))))
    assert a == b and a["val_tokens"] == int((~masked).sum())
    plain = evaluate_model(model, token_ids(blocks), _FixedTeacher(signal))  # every position scored
    assert plain["val_tokens"] == masked.numel() and plain["kl_to_teacher"] != a["kl_to_teacher"]


def test_chat_run_over_the_cli(hf_family, tmp_path):
    """Cache, train, export and eval on chat rows; the export chats in stock transformers."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tests.conftest import run_cli

    from transformers import GenerationConfig

    path = write_jsonl(chat_rows(), tmp_path / "chat.jsonl")
    student = shutil.copytree(hf_family["student"], tmp_path / "student")
    GenerationConfig(eos_token_id=0, max_new_tokens=7).save_pretrained(str(student))  # a base model's stop id
    cfg = {"out_dir": str(tmp_path / "run"), "data": {"paths": [str(path)], "seq_len": 48},
           "teacher": {"source": "checkpoint", "path": str(hf_family["teacher"])}, "cache": {"k": 8},
           "students": [{"name": "chat", "model": {"path": str(student)}, "loss": {"adaptive": "entropy"}},
                        {"name": "ce", "baseline": True, "model": {"preset": "dense", "args": {
                            "hidden_size": 32, "num_layers": 1, "num_heads": 2, "num_kv_heads": 1, "head_dim": 16}}}],
           "train": {"mode": "cached", "steps": 2, "batch_size": 2, "eval_every": 0, "eval_blocks": 2}}
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(cfg))
    r = run_cli("run", "-c", str(tmp_path / "run.yaml"), "--quiet", timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    # A random-init CE-only student's first loss is about ln V: the mean is over the assistant
    # tokens it sums, not over every position of the block (which once logged a fraction of it).
    first = json.loads((tmp_path / "run" / "students" / "ce" / "metrics.jsonl").read_text().splitlines()[0])
    ln_v = math.log(hf_family["vocab"])
    assert abs(first["loss"] - ln_v) < 0.05 * ln_v, (first["loss"], ln_v)
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert report["scored_tokens"] == "assistant / completion only"
    assert report["students"]["chat"]["val_tokens"] < report["val_blocks"] * 48
    export = tmp_path / "run" / "students" / "chat" / "export"
    tok, model = AutoTokenizer.from_pretrained(str(export)), AutoModelForCausalLM.from_pretrained(str(export))
    prompt = tok.apply_chat_template([{"role": "user", "content": "What is 2 plus 3?"}], add_generation_prompt=True,
                                     return_tensors="pt", return_dict=True)["input_ids"]
    out = model.generate(prompt, max_new_tokens=4, do_sample=False)
    assert out.shape[1] > prompt.shape[1]
    # completions were trained to end with the tokenizer's EOS: generate stops there (and at the student's own)
    assert model.generation_config.eos_token_id == [0, tok.eos_token_id]



PARTS_NATIVE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{% if m.content is string %}{{ m.content }}"
                "{% else %}{% for p in m.content %}[{{ p.text }}]{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
                "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


@pytest.mark.parametrize("template, want", [
    (CHATML, "four.\nexactly<|im_end|>"),  # writes the list as Python text: joined for it
    (PARTS_NATIVE, "[four.][exactly]<|im_end|>"),  # reads the parts itself: as given
])
def test_content_as_a_list_of_text_parts(template, want, hf_family, tmp_path):
    """OpenAI's content shape, `[{"type": "text", "text": ...}]`: a template that printed it wrote
    "[{'type': 'text', ...}]" into the row, and the student learnt Python reprs; one that
    concatenates strings failed on it.  Such content is joined into one string (newlines between
    parts, as vLLM serves a text model) where the template cannot read it."""
    tok = _templated(hf_family, template, tmp_path / "t")
    row = {"messages": [{"role": "user", "content": [{"type": "text", "text": "two plus two"}]},
                        {"role": "assistant", "content": [{"type": "text", "text": "four."},
                                                          {"type": "text", "text": "exactly"}]}]}
    assert _targets_text(tok, row) == want


def test_parquet_tool_calls_keep_their_own_arguments_and_model_turns_are_the_assistants(hf_family, tmp_path):
    """A struct column (parquet, a saved dataset) gives every row every key any row has, None
    where a row has none: each tool call's arguments got the other tools' parameter names as
    nulls, and templates printed them.  A `messages` turn from role "model" (Gemma's name) was
    no assistant turn: the row had no target and was dropped."""
    import datasets

    def call(name, args):
        return {"role": "assistant", "tool_calls": [{"type": "function", "function": {"name": name, "arguments": args}}]}

    rows = [{"messages": [{"role": "user", "content": "weather?"}, call("get_weather", {"city": "paris"}),
                          {"role": "model", "content": "sunny"}]},
            {"messages": [{"role": "user", "content": "list it"}, call("ls", {"path": "/tmp", "all": True}),
                          {"role": "assistant", "content": "done"}]}]
    datasets.Dataset.from_list(rows).to_parquet(str(tmp_path / "calls.parquet"))
    docs = load_documents(DataConfig(paths=[tmp_path / "calls.parquet"]))
    got = [json.loads(c)["messages"] for c in docs["chat"]]
    assert [m[1]["tool_calls"][0]["function"]["arguments"] for m in got] == [{"city": "paris"}, {"path": "/tmp", "all": True}]
    assert got[0][2]["role"] == "assistant"
    # a jsonl's turns of differing fields are free-form JSON: a null there is the row's own, kept
    write_jsonl([{"messages": [{"role": "user", "content": "x?"}, call("f", {"x": None, "y": 1}),
                               {"role": "assistant", "content": "ok"}]}, rows[1]], tmp_path / "calls.jsonl")
    from_jsonl = json.loads(load_documents(DataConfig(paths=[tmp_path / "calls.jsonl"]))["chat"][0])["messages"]
    assert from_jsonl[1]["tool_calls"][0]["function"]["arguments"] == {"x": None, "y": 1}
    tok = _templated(hf_family, TOOLS, tmp_path / "tools")
    ids, targets = render(tok, docs["chat"][0])
    written = tok.decode([i for i, t in zip(ids, targets) if t])
    assert '"arguments": {"city": "paris"}' in written and "null" not in written and written.endswith("sunny<|im_end|>")


def test_a_template_showing_the_time_renders_one_instant_per_row(hf_family, tmp_path):
    """Llama 3.2's template puts `strftime_now` (the date) in its default system prompt, and a
    row is rendered several times: a clock that moved between renderings (past midnight) made
    them differ, and the system prompt and user turn became targets.  A template showing
    microseconds moves on every rendering: the targets are still the assistant's words alone."""
    dated = "<|im_start|>system\nNow: {{ strftime_now('%H:%M:%S.%f') }}<|im_end|>\n" + CHATML
    tok = _templated(hf_family, dated, tmp_path / "dated")
    row = {"messages": [{"role": "user", "content": "what is two plus two"}, {"role": "assistant", "content": "four."},
                        {"role": "user", "content": "and three"}, {"role": "assistant", "content": "six."}]}
    assert _targets_text(tok, row) == "four.<|im_end|>six.<|im_end|>"
    import time

    from transformers.utils import chat_template_utils

    before = chat_template_utils.datetime.now()  # outside a row's rendering the clock runs again
    time.sleep(0.01)
    assert chat_template_utils.datetime.now() > before


@pytest.mark.parametrize("container", ["jsonl", "parquet"])
def test_trl_conversational_prompt_completion_trains_the_completion_alone(container, hf_family, tmp_path):
    """TRL's conversational prompt/completion rows ({"prompt": [turns], "completion": [turns]}) were
    refused ("row 1's 'prompt' is [...] (list), not a string").  They are one conversation whose
    prompt is context only: an assistant turn in the prompt (a few-shot history) is no target, as
    TRL trains on the completion alone (every assistant turn of it); the prompt for generation
    ends where the completion starts."""
    import datasets

    from distill.prompts import prompt_of

    def row(i):
        return {"prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": f"{i} plus {i}?"},
                           {"role": "assistant", "content": f"earlier answer {i}"}, {"role": "user", "content": "sure?"}],
                "completion": [{"role": "assistant", "content": f"adding {i}."}, {"role": "tool", "content": f"{2 * i}"},
                               {"role": "assistant", "content": f"it is {2 * i}."}]}

    def answers(row):
        return [m["content"] + "<|im_end|>" for m in row["completion"] if m["role"] == "assistant"]

    rows = [row(i) for i in range(8)]
    path = tmp_path / f"pc.{container}"
    if container == "jsonl":
        write_jsonl(rows, path)
    else:  # struct columns
        datasets.Dataset.from_list(rows).to_parquet(str(path))
    docs = load_documents(DataConfig(paths=[path]))
    assert len(docs) == len(rows)
    for template in (CHATML, GENERATION):  # the diff of renderings, and a template marking the assistant itself
        tok = _templated(hf_family, template, tmp_path / "t")
        for chat, want in zip(docs["chat"], rows):
            ids, targets = render(tok, chat)
            assert tok.decode(ids) == tok.apply_chat_template(want["prompt"] + want["completion"], tokenize=False)
            assert tok.decode([i for i, t in zip(ids, targets) if t]) == "".join(answers(want))
            prompt = prompt_of(tok, chat)
            assert tok.decode(prompt.ids) == tok.apply_chat_template(want["prompt"], tokenize=False,
                                                                     add_generation_prompt=True)
            assert prompt.reference == want["completion"][0]["content"]
    history = json.loads(docs["chat"][0])  # an empty answer in the prompt's history is not the data's to count
    history["messages"][2]["content"] = ""
    assert empty_answers(json.dumps(history)) == 0 and empty_answers(docs["chat"][0]) == 0
    history["messages"][-1]["content"] = ""
    assert empty_answers(json.dumps(history)) == 1
    tok = hf_family["tokenizer"]  # the run's tokenizer (ChatML)
    prepared = prepare_data(DataConfig(paths=[path], seq_len=160, val_fraction=0.3,
                                       tokenizer={"path": hf_family["teacher"]}), tmp_path / "run")
    runs = _target_runs(prepared.train[:]) + _target_runs(prepared.val[:])
    assert sorted(tok.decode(r) for r in runs) == sorted(a for r in rows for a in answers(r))


def test_a_prompt_and_completion_of_different_kinds_is_a_bad_row(hf_family):
    tok = hf_family["tokenizer"]
    chat = json.dumps({"prompt": [{"role": "user", "content": "hi"}], "completion": "hello", "_row": "f.jsonl row 3"})
    with pytest.raises(UserError, match=r"^data: chat f.jsonl row 3: its prompt is a list and its completion a str; "
                                        r"give both as strings, or both as lists of turns$"):
        render(tok, chat)


def test_chat_data_prepared_before_the_reading_rules_is_reused_with_a_note(hf_family, tmp_path, capfd):
    """The chat reading changed on 2026-12-06 (system columns, instruction tables, ...) without a
    fingerprint change (that would prepare every table corpus again and refuse its caches and
    checkpoints): data prepared before is reused as it is, and said to be, with what to do."""
    cfg = DataConfig(paths=[write_jsonl(chat_rows(), tmp_path / "c.jsonl")], seq_len=64, val_fraction=0.2,
                     tokenizer={"path": hf_family["teacher"]})
    data = prepare_data(cfg, tmp_path / "run")
    manifest = next((tmp_path / "run" / "data").glob("blocks-*")) / "manifest.json"
    capfd.readouterr()
    prepare_data(cfg, tmp_path / "run")
    assert "prepared before the chat reading" not in capfd.readouterr().err
    m = json.loads(manifest.read_text())
    del m["chat_reader"]  # as data prepared before has it
    manifest.write_text(json.dumps(m))
    again = prepare_data(cfg, tmp_path / "run")
    assert torch.equal(again.train[:], data.train[:])  # reused
    assert re.search(r"\[data\] note: .* was prepared before the chat reading of 2026-12-06 .* delete .* to prepare it "
                     r"again", capfd.readouterr().err)
