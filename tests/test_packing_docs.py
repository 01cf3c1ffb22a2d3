"""Document-aware packing (data.packing: documents, the default): a row packed into a block
after another one is read by every model exactly as if it were alone (position ids restart
per row; transformers masks attention to the row), its first token is no target, and
`concat` keeps the old one-stream blocks."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from transformers import Llama4ForCausalLM, LlamaForCausalLM

from distill.blocks import block_positions
from distill.chat import RowPacker
from distill.config import DataConfig, LossConfig
from distill.data import corpus_files, fingerprint, prepare_data, tokenizer_hash
from distill.train.student import student_forward
from students.build import build_model
from students.presets import PRESETS
from teachers import IGNORE, Batch, CachedTeacher, LiveTeacher
from teachers.cache.format import Sampling
from tests.hf_models import write_jsonl

VOCAB = 64
A, B = 6, 9  # lengths of the first and the second row of the packed block
# Llama 4: chunked attention (chunk 4 < each row) on the RoPE layers, layer 3 NoPE. Its attention
# temperature tuning scales queries by the position in the *block* (transformers computes it from
# arange, not position_ids), a no-op below floor_scale tokens (8192 in the released models): so
# the default floor_scale keeps a packed row exact, a floor_scale below the block would not.
SIZES = {
    "dense": dict(vocab_size=VOCAB, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8,
                  intermediate_size=48),
    "scout": dict(vocab_size=VOCAB, hidden_size=32, num_layers=4, num_heads=4, num_kv_heads=2, head_dim=8,
                  intermediate_size=16, intermediate_size_mlp=48, num_experts=8, attention_chunk_size=4),
}


def _config(preset: str):
    return PRESETS[preset](**SIZES[preset])


def _block() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(block (1, A+B), its position ids (1, A+B), row B alone (1, B)), float-free ids."""
    g = torch.Generator().manual_seed(7)
    row_a, row_b = torch.randint(0, VOCAB, (A,), generator=g), torch.randint(0, VOCAB, (B,), generator=g)
    block = torch.cat([row_a, row_b])[None]
    positions = torch.cat([torch.arange(A), torch.arange(B)])[None]
    return block, positions, row_b[None]


def _dense(values: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Top-k (…, k) log-probs with k = V scattered back to (…, V): order of ties does not matter."""
    return torch.zeros(*ids.shape[:-1], VOCAB).scatter(-1, ids, values)


@pytest.mark.parametrize("kind", ["llama", "llama4"])
def test_teacher_signal_of_a_row_packed_second_equals_the_row_alone(kind):
    """The stock transformers teacher as the cache pass and the online signal run it (LiveTeacher:
    the chunked-lm_head top-k path, the dense-logits path and `signal` on a Batch)."""
    torch.manual_seed(0)
    config = _config("dense" if kind == "llama" else "scout")
    model = (LlamaForCausalLM if kind == "llama" else Llama4ForCausalLM)(config).eval()
    teacher = LiveTeacher(model, VOCAB, VOCAB, torch.device("cpu"))
    block, positions, alone = _block()

    packed = _dense(*teacher.topk(block, position_ids=positions))[:, A:]  # (1, B, V)
    single = _dense(*teacher.topk(alone))
    torch.testing.assert_close(packed, single, rtol=0, atol=1e-5)
    assert not torch.allclose(_dense(*teacher.topk(block))[:, A:], single, atol=1e-3)  # concat: row A is seen

    torch.testing.assert_close(teacher.logits(block, positions)[:, A:], teacher.logits(alone), rtol=0, atol=1e-5)

    signed = torch.cat([block, block[:, :1]], 1)  # (1, T+1): Batch.of shifts the labels off the block
    batch = Batch.of(signed, [0], torch.cat([positions, positions[:, -1:] + 1], 1))
    sig, valid = teacher.signal(batch)
    assert bool(valid.all())
    torch.testing.assert_close(_dense(sig.topk_logprobs, sig.topk_ids)[:, A:], single, rtol=0, atol=1e-5)


@pytest.mark.parametrize("preset", ["dense", "scout"])
def test_student_losses_of_a_row_packed_second_equal_the_row_alone(preset):
    """The students' training forward (our sparse MoE forward for scout) through `student_forward`:
    the per-token CE of the second row's tokens in the packed block equals the row's alone."""
    model = build_model(_config(preset), seed=0)
    model.eval()  # no dropout; the forward is the training one
    block, positions, alone = _block()
    labels = torch.roll(block, -1, 1)  # any next ids: the same for both
    labels_alone = labels[:, A:]
    loss_cfg = LossConfig()

    def hard(ids, lab, pos):
        mask = torch.ones(lab.numel(), dtype=torch.bool)
        h, _ = student_forward(model, ids, lab, None, mask, loss_cfg, baseline=True, position_ids=pos)
        return h.detach()

    packed = hard(block, labels, positions)[A:]
    single = hard(alone, labels_alone, None)
    torch.testing.assert_close(packed, single, rtol=0, atol=1e-5)
    assert not torch.allclose(hard(block, labels, None)[A:], single, atol=1e-3)  # without positions: differs


def test_row_packer_marks_row_starts_and_drops_each_rows_first_target():
    rows = [([1, 2, 3], [True, True, True]), ([4, 5, 6, 7], [False, True, True, True]), ([8, 9], [True, True])]
    docs = RowPacker(pad_id=0, block=8, documents=True)
    ids, tgt = docs.add(rows)
    tail_ids, tail_tgt = docs.flush()
    assert ids + tail_ids == [[1, 2, 3, 4, 5, 6, 7, 0], [8, 9, 0, 0, 0, 0, 0, 0]]
    assert tgt + tail_tgt == [[False, True, True, False, True, True, True, False],
                              [False, True, False, False, False, False, False, False]]
    assert docs.starts == [[True, False, False, True, False, False, False, True],  # the padding is a row too
                           [True, False, True, False, False, False, False, False]]
    concat = RowPacker(pad_id=0, block=8)
    assert concat.add(rows)[1][0][:4] == [True, True, True, False] and concat.starts == []


def _text_corpus(path: Path, n: int = 60) -> Path:
    return write_jsonl([{"text": f"row {i}: " + " ".join(["alpha", "beta", "gamma"][i % 3] for _ in range(i % 9 + 2)),
                         "id": i} for i in range(n)], path)


def test_text_blocks_record_documents_and_drop_cross_document_targets(tmp_path):
    corpus = _text_corpus(tmp_path / "c.jsonl")
    cfg = DataConfig(paths=[corpus], seq_len=24, tokenizer={"vocab_size": 300}, shard_documents=7, num_proc=1)
    assert cfg.packing == "documents"
    data = prepare_data(cfg, tmp_path / "run")
    eos = data.tokenizer.eos_token_id
    assert data.manifest["packing"] == "documents" and data.train.documents
    ids = data.train[:]
    plain = torch.where(ids < 0, -ids - 1, ids)  # (N, T+1)
    pos = data.train.positions(slice(None))
    # a row starts at each block's first token and after each EOS (the documents' ends): nowhere else
    after_eos = torch.cat([torch.ones(len(plain), 1, dtype=torch.bool), plain[:, :-1] == eos], 1)
    assert torch.equal(pos == 0, after_eos)
    assert torch.equal(pos[:, 1:][~after_eos[:, 1:]], pos[:, :-1][~after_eos[:, 1:]] + 1)  # counting up within
    batch = Batch.of(data.train[[2, 0]], [2, 0], block_positions(data.train, [2, 0]))
    starts = after_eos[[2, 0], 1:]  # the label is the first token of the next document
    assert bool((batch.labels[starts] == IGNORE).all()) and bool((batch.labels[~starts] >= 0).all())
    assert torch.equal(batch.position_ids, pos[[2, 0], :-1])
    assert torch.equal(data.train.target_counts(), (~after_eos[:, 1:]).sum(1))

    concat = DataConfig(**(cfg.model_dump() | {"packing": "concat"}))
    files, h = corpus_files(cfg), tokenizer_hash(data.tokenizer)
    assert fingerprint(files, h, concat) != fingerprint(files, h, cfg)  # a cache of one is never reused by the other
    old = prepare_data(concat, tmp_path / "run")
    assert old.manifest["packing"] == "concat" and not old.manifest["masked"]
    assert old.train.positions([0]) is None and block_positions(old.train, [0]) is None
    assert not list(Path(old.train.root).glob("*.starts.npy"))
    assert bool((old.train[:] >= 0).all())


def test_default_run_on_a_jsonl_text_corpus_caches_each_row_alone(cli, tmp_path):
    """`distill run` with default data and cache settings (documents; cache.estimator: auto,
    which draws here) on a jsonl `text` corpus: the cache pass scored the second row of a
    validation block as if it were alone (its draws and entropy are the row's own), and
    training, validation and eval ran with the rows' positions."""
    corpus = _text_corpus(tmp_path / "corpus.jsonl", n=120)
    tiny = {"hidden_size": 32, "num_layers": 1, "num_heads": 2, "num_kv_heads": 1, "head_dim": 16}
    cfg = {"data": {"paths": [str(corpus)], "seq_len": 32, "val_fraction": 0.2},
           "teacher": {"source": "preset", "model": {"preset": "behemoth", "args": tiny | {"num_experts": 2}},
                       "pretrain": {"steps": 2, "batch_size": 2}},
           "students": [{"name": "s", "model": {"preset": "dense", "args": tiny}}],
           "train": {"steps": 2, "batch_size": 2, "eval_blocks": 2, "checkpoint_every": 0},
           "out_dir": str(tmp_path / "out")}
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    r = cli("run", "-c", str(path))
    assert r.returncode == 0, r.stderr[-3000:]
    assert ("[cache] teacher signal: 256 draws per token (cache.estimator: auto; every student can learn from "
            "draws)\n") in r.stderr
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["scored_tokens"] == "all" and np.isfinite(report["students"]["s"]["val_ppl"])

    from distill.config import load_config

    data = prepare_data(load_config(path).data, tmp_path / "out")
    assert data.manifest["packing"] == "documents"
    pos = data.val.positions([0])[0, :-1]  # (T,)
    starts = torch.nonzero(pos == 0).flatten()
    assert len(starts) >= 3  # rows 1 and 2 lie whole inside the block
    a, b = int(starts[1]), int(starts[2])
    block = data.val[[0]]
    cached, _ = CachedTeacher(tmp_path / "out" / "cache", "val").signal(Batch.of(block, [0]))
    assert cached.kind == "sampled"
    model = Llama4ForCausalLM.from_pretrained(str(tmp_path / "out" / "teacher")).eval()
    sampling = Sampling(256, 1.0, seed=0)  # the defaults: cache.samples, T, the run's seed
    teacher = LiveTeacher(model, 8, len(data.tokenizer), torch.device("cpu"), sampling=sampling)
    ids = torch.where(block < 0, -block - 1, block)[:, :-1]
    keys = sampling.keys("val", [0], ids.shape[1])  # (1, T): the draws' keys in the cached block
    alone = teacher.sample(ids[:, a:b], keys[:, a:b])  # the row alone, with the same keys
    # The row's last position predicts the next row's first token, no target: the cache stores
    # only the targets (teachers/cache/rows.py), so compare the row up to it.
    assert Batch.of(block, [0]).labels[0, b - 1] == IGNORE
    vocab = len(data.tokenizer)

    def counts(sig, lo, hi):  # (hi - lo, V): each position's draw frequencies over the vocabulary
        freq = sig.topk_logprobs[0, lo:hi].exp()
        return torch.zeros(hi - lo, vocab).scatter_add_(1, sig.topk_ids[0, lo:hi], freq)

    torch.testing.assert_close(counts(cached, a, b - 1), counts(alone, 0, b - a - 1), rtol=0, atol=1e-6)
    torch.testing.assert_close(cached.entropy[0, a:b - 1], alone.entropy[0, :-1], rtol=0, atol=4e-3)  # fp16
    in_block = teacher.sample(ids[:, :b], keys[:, :b])  # the row after the one before it, without positions
    assert not torch.equal(counts(in_block, a, b - 1), counts(alone, 0, b - a - 1))  # so the check can tell
