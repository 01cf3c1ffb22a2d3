"""Chat and instruction data: assistant-only targets from the tokenizer's own chat template,
whole-row packing, and one mask for the hard and soft loss, adaptive weights and eval."""
from __future__ import annotations

import json

import pytest
import torch
import yaml

from distill.chat import pack_rows, render
from distill.config import DataConfig, LossConfig
from distill.data import load_documents, prepare_data
from distill.train.student import distill_loss
from distill.train.validate import evaluate_model
from losses.signal import TeacherSignal
from students.build import load_causal_lm
from teachers import IGNORE, Batch, token_ids
from tests.hf_models import chat_rows, write_jsonl

CONVERSATION = chat_rows()[0]


def _targets_text(tok, row) -> str:
    ids, targets = render(tok, json.dumps(row))
    return tok.decode([i for i, t in zip(ids, targets) if t])


def test_only_assistant_turns_are_targets(hf_family):
    tok = hf_family["tokenizer"]
    turns = CONVERSATION["messages"]
    want = "".join(f"{m['content']}<|im_end|>\n" for m in turns if m["role"] == "assistant")
    assert _targets_text(tok, CONVERSATION) == want  # both turns, with their end-of-turn marker
    ids, targets = render(tok, json.dumps(CONVERSATION))
    assert tok.decode(ids) == tok.apply_chat_template(turns, tokenize=False)  # the template's own rendering
    row = {"prompt": "Say hi: ", "completion": "hi there."}
    assert _targets_text(tok, row) == "hi there."


def test_rows_are_packed_whole_and_long_rows_truncated():
    rows = [([1, 2, 3, 4], [False, False, True, True]), ([5, 6, 7], [False, True, True]),
            ([8] * 9, [False] * 3 + [True] * 6), ([9, 9], [True, False])]
    blocks, truncated, dropped = pack_rows(rows, pad_id=0, block=6)
    # row 2 does not fit after row 1: it starts a new block, cut to 6; row 4 has no target after position 0.
    assert (truncated, dropped) == (1, 1)
    assert blocks.tolist() == [[-2, -3, 3, 4, -1, -1], [-6, 6, 7, -1, -1, -1], [-9, -9, -9, 8, 8, 8]]
    batch = Batch.of(blocks, range(3))
    assert batch.input_ids.min() >= 0 and batch.labels[0].tolist() == [IGNORE, 3, 4, IGNORE, IGNORE]


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
    capfd.readouterr()
    short = DataConfig(paths=[path], seq_len=24, val_fraction=0.2, tokenizer={"path": hf_family["teacher"]})
    prepare_data(short, tmp_path)
    assert "chat rows were longer than seq_len + 1 = 25 tokens and were truncated" in capfd.readouterr().err


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

    path = write_jsonl(chat_rows(), tmp_path / "chat.jsonl")
    cfg = {"out_dir": str(tmp_path / "run"), "data": {"paths": [str(path)], "seq_len": 48},
           "teacher": {"source": "checkpoint", "path": str(hf_family["teacher"])}, "cache": {"k": 8},
           "students": [{"name": "chat", "model": {"path": str(hf_family["student"])}, "loss": {"adaptive": "entropy"}}],
           "train": {"mode": "cached", "steps": 2, "batch_size": 2, "eval_every": 0, "eval_blocks": 2}}
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(cfg))
    r = run_cli("run", "-c", str(tmp_path / "run.yaml"), "--quiet", timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert report["scored_tokens"] == "assistant / completion only"
    assert report["students"]["chat"]["val_tokens"] < report["val_blocks"] * 48
    export = tmp_path / "run" / "students" / "chat" / "export"
    tok, model = AutoTokenizer.from_pretrained(str(export)), AutoModelForCausalLM.from_pretrained(str(export))
    prompt = tok.apply_chat_template([{"role": "user", "content": "What is 2 plus 3?"}], add_generation_prompt=True,
                                     return_tensors="pt", return_dict=True)["input_ids"]
    out = model.generate(prompt, max_new_tokens=4, do_sample=False)
    assert out.shape[1] > prompt.shape[1]
