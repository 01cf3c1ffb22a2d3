"""Prepared data on disk (distill/blocks.py, distill/packing.py): the same blocks as the old
in-memory packer, read by index; uint16 / uint32 ids; a killed preparation resumes
byte-identical; `distill inspect` describes it."""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from distill.blocks import Blocks, ids_dtype, open_blocks, verify_blocks
from distill.chat import PLAIN, render
from common.errors import UserError
from distill.config import DataConfig
from distill.data import doc_in_val, load_documents, prepare_data
from distill.packing import KILL_AFTER_SHARDS, ShardWriter, _Killer
from tests.hf_models import chat_rows, write_jsonl
from tests.oracles import pack, pack_rows

ROOT = Path(__file__).resolve().parents[1]


def in_memory_blocks(cfg: DataConfig, tok) -> dict[str, torch.Tensor]:
    """What preparation made before blocks went to disk: every id in one list, packed in RAM."""
    docs = load_documents(cfg)
    block = cfg.seq_len + 1
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    out = {}
    for name, want_val in (("train", False), ("val", True)):
        rows = [r for r in docs if doc_in_val(r["text"], cfg.val_fraction) == want_val]
        text = [tok(r["text"], add_special_tokens=False)["input_ids"] for r in rows if r["chat"] == PLAIN]
        chats, _ = pack_rows([render(tok, r["chat"]) for r in rows if r["chat"] != PLAIN], pad, block)
        out[name] = torch.cat([pack(text, tok.eos_token_id, block), chats])
    return out


def _check_reads(data, want):
    for name in ("train", "val"):
        blocks, full = getattr(data, name), want[name]
        assert blocks.shape == tuple(full.shape) and len(blocks) == len(full)
        assert torch.equal(blocks[:], full)
        picks = [len(full) - 1, 0, len(full) // 2, 1, 0]  # any order, repeats, across shards
        assert torch.equal(blocks[picks], full[picks])
        assert torch.equal(blocks[torch.tensor(picks)], full[picks])
        assert torch.equal(blocks[1:5], full[1:5]) and torch.equal(blocks[-1], full[-1])
        assert torch.equal(blocks[:3, :-1], full[:3, :-1])
        plain = blocks.columns(slice(None, -1), plain=True)
        assert plain.shape == (len(full), full.shape[1] - 1)
        assert torch.equal(plain[2:4], torch.where(full[2:4, :-1] < 0, -full[2:4, :-1] - 1, full[2:4, :-1]))
        assert torch.equal(blocks.target_counts(), (full[:, 1:] >= 0).sum(1))


def test_text_blocks_read_from_disk_equal_the_in_memory_packer(stdlib_corpus, tmp_path):
    cfg = DataConfig(paths=[stdlib_corpus], seq_len=32, val_fraction=0.2, tokenizer={"vocab_size": 300},
                     shard_documents=3, num_proc=2, packing="concat")  # the old packer: one stream
    data = prepare_data(cfg, tmp_path / "run")
    assert len(data.manifest["splits"]["train"]["shards"]) > 3  # several shards, a carry across each
    _check_reads(data, in_memory_blocks(cfg, data.tokenizer))


def test_chat_and_text_blocks_read_from_disk_equal_the_in_memory_packer(stdlib_corpus, hf_family, tmp_path):
    chat = write_jsonl(chat_rows() * 3, tmp_path / "chat.jsonl")
    cfg = DataConfig(paths=[stdlib_corpus, chat], seq_len=48, val_fraction=0.2, shard_documents=4,
                     tokenizer={"path": hf_family["teacher"]}, packing="concat")
    data = prepare_data(cfg, tmp_path / "run")
    assert data.manifest["masked"] and (data.train[:] < 0).any()
    _check_reads(data, in_memory_blocks(cfg, data.tokenizer))


def _tokenizer_of_style(style: str, texts: list[str], tmp_path: Path):
    """A tokenizer built with `tokenizers` the way a model family's is: byte-level BPE (GPT-2,
    Llama 3, Qwen), a Metaspace pre-tokenizer (newer SentencePiece conversions), or Llama 2's
    legacy form (a normalizer that puts a space before every text it is given)."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from tests.hf_models import make_tokenizer

    if style == "byte-level":
        return make_tokenizer(texts, tmp_path / style, vocab_size=600)
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    if style == "metaspace":
        tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always")
    else:
        tok.normalizer = normalizers.Sequence([normalizers.Prepend("\u2581"), normalizers.Replace(" ", "\u2581")])
        tok.pre_tokenizer = pre_tokenizers.Split("\u2581", behavior="merged_with_next")
    tok.train_from_iterator(texts, trainer=trainers.BpeTrainer(vocab_size=600, special_tokens=["<unk>", "</s>"],
                                                               show_progress=False))
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>", unk_token="<unk>")


@pytest.mark.parametrize("style", ["byte-level", "metaspace", "legacy"])
def test_a_long_document_tokenised_in_pieces_gets_the_whole_documents_ids(stdlib_corpus, tmp_path, style):
    """One 50 MB document took 8.8 GB to prepare (a fast tokenizer holds about 380 bytes a token
    of a call); documents are now tokenised in pieces cut at a space between words, on the side
    of it the tokenizer needs (probed), so the ids equal the whole document's."""
    from distill.packing import _encode_text, _space_side, text_pieces

    texts = [p.read_text() for p in sorted(stdlib_corpus.glob("*.py"))]
    tok = _tokenizer_of_style(style, texts, tmp_path)
    assert _space_side(tok) == ("dropped" if style == "legacy" else "starts")
    text = "\n".join(texts) * 2  # about 0.8 MB of code: spaces before quotes, brackets, digits
    pieces = text_pieces(text, 4096, _space_side(tok))
    assert len(pieces) > 100 and max(map(len, pieces)) <= 4096
    whole = tok(text, add_special_tokens=False)["input_ids"]
    assert [i for p in tok(pieces, add_special_tokens=False)["input_ids"] for i in p] == whole
    # the worker's encoder, over a batch of a long and a short document (pieces of PIECE_CHARS)
    got = _encode_text({"text": [text * 2, "x = 1"]}, tok, eos=1)["ids"]
    assert got[0].tolist() == tok(text * 2, add_special_tokens=False)["input_ids"] + [1]
    assert got[1].tolist() == tok("x = 1", add_special_tokens=False)["input_ids"] + [1]


def test_ids_are_uint16_when_the_vocab_fits_else_uint32(tmp_path):
    assert ids_dtype(300) == ids_dtype(1 << 16) == "uint16"
    assert ids_dtype((1 << 16) + 1) == ids_dtype(151_936) == "uint32"
    ids = np.array([[0, 70_000, 151_935, 5]], dtype=np.int64)  # ids a uint16 would wrap
    keep = np.array([[True, False, True, True]])
    for dtype in ("uint16", "uint32"):
        root = tmp_path / dtype
        root.mkdir()
        rec = ShardWriter(root, "train", 4, dtype, True, _Killer()).write(0, {}, ids % (1 << 16) if dtype == "uint16"
                                                                           else ids, keep, {})
        assert np.load(root / rec["ids"]).dtype == np.dtype(dtype)
        got = Blocks(root, [rec], 1, 4, masked=True)[:]
        want = torch.tensor(ids % (1 << 16) if dtype == "uint16" else ids)
        assert torch.equal(got, torch.where(torch.tensor(keep), want, -want - 1))
        assert got.dtype == torch.int64


PREPARE = """
import sys
from distill.config import DataConfig
from distill.data import prepare_data
cfg = DataConfig(paths=[sys.argv[1]], seq_len=32, val_fraction=0.2, shard_documents=2, num_proc=int(sys.argv[3]),
                 tokenizer={"path": sys.argv[4]})
prepare_data(cfg, sys.argv[2])
"""


def _prepare(corpus, out, num_proc, tok_dir, kill_after=None):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    env.pop(KILL_AFTER_SHARDS, None)
    if kill_after is not None:
        env[KILL_AFTER_SHARDS] = str(kill_after)
    return subprocess.run([sys.executable, "-c", PREPARE, str(corpus), str(out), str(num_proc), str(tok_dir)],
                          env=env, capture_output=True, text=True, timeout=300)


def _files(root: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(root.iterdir()) if p.is_file()}


def test_killed_preparation_resumes_byte_identical(stdlib_corpus, tmp_path):
    tok_dir = tmp_path / "tok"
    prepare_data(DataConfig(paths=[stdlib_corpus], seq_len=32, tokenizer={"vocab_size": 300}), tmp_path / "t")
    shutil.copytree(tmp_path / "t" / "tokenizer", tok_dir)
    whole = _prepare(stdlib_corpus, tmp_path / "whole", 1, tok_dir)
    assert whole.returncode == 0, whole.stderr[-2000:]
    (root,) = (tmp_path / "whole" / "data").glob("blocks-*")
    m = json.loads((root / "manifest.json").read_text())
    n_shards = len(list(root.glob("*.json"))) - 1  # every chunk's record, the manifest aside
    assert n_shards >= 8 and m["documents"] == len(list(stdlib_corpus.glob("*.py")))
    n_train = len(list(root.glob("train-*.json")))
    kill_at = n_train - 1  # ~80% of the way, inside the train split: the next shard starts from a carry
    assert json.loads((root / f"train-{kill_at - 1:05d}.json").read_text())["carry"]["ids"]
    killed = _prepare(stdlib_corpus, tmp_path / "resumed", 2, tok_dir, kill_after=kill_at)
    assert killed.returncode == -9, killed.stderr[-2000:]
    (partial,) = (tmp_path / "resumed" / "data").glob("blocks-*")
    assert not (partial / "manifest.json").exists()
    assert len(list(partial.glob("*.json"))) == kill_at
    written = {p.name: p.stat().st_mtime_ns for p in partial.glob("*.npy")}
    again = _prepare(stdlib_corpus, tmp_path / "resumed", 2, tok_dir)  # other num_proc, same bytes
    assert again.returncode == 0, again.stderr[-2000:]
    assert {p.name: p.stat().st_mtime_ns for p in partial.glob("*.npy") if p.name in written} == written  # kept
    assert _files(partial) == _files(root)


def test_prepare_command_then_inspect_describes_prepared_data(cli, stdlib_corpus, tmp_path):
    cfg = tmp_path / "run.yaml"
    cfg.write_text(f"out_dir: {tmp_path / 'run'}\ndata: {{paths: ['{stdlib_corpus}'], seq_len: 32, shard_documents: 5, "
                   f"tokenizer: {{vocab_size: 300}}}}\nteacher: {{source: cache}}\n"
                   f"students: [{{name: s, model: {{preset: dense}}}}]\n")
    r = cli("prepare", "-c", str(cfg), "--quiet")
    assert r.returncode == 0, r.stderr[-2000:]
    data = prepare_data(DataConfig(paths=[stdlib_corpus], seq_len=32, tokenizer={"vocab_size": 300},
                                   shard_documents=5), tmp_path / "run")  # reused: the same fingerprint
    assert f"{len(data.train):,} train" in r.stderr
    r = cli("inspect", str(tmp_path / "run" / "data"))
    assert r.returncode == 0, r.stderr[-2000:]
    out = " ".join(r.stdout.split())
    m = data.manifest
    for want in (data.fingerprint, f"{m['documents']:,}", f"{m['tokens']:,}", "uint16 ids",
                 f"{len(data.train):,} blocks", f"{len(data.val):,} blocks",
                 f"{len(m['splits']['train']['shards']):,} shards", "bytes/token"):
        assert want in out, (want, out)
    r = cli("inspect", str(tmp_path / "run"))  # the run's out_dir: each thing in it (here its data)
    assert r.returncode == 0 and f"fingerprint │ {data.fingerprint}" in " ".join(r.stdout.split()), r.stdout + r.stderr
    r = cli("inspect", str(tmp_path))
    assert r.returncode == 2 and "or a run's out_dir (data/, cache/, students/)" in r.stderr, r.stderr
    for part in ("data/blocks-killed", "cache"):  # a killed preparation, a cache begun: each said, none stops it
        (tmp_path / "run2" / part).mkdir(parents=True)
        (tmp_path / "run2" / part / "train-00000.json").write_text("{}")
    r = cli("inspect", str(tmp_path / "run2"))
    out = " ".join(r.stdout.split())
    assert r.returncode == 0 and out.count("nothing complete to describe") == 2, r.stdout + r.stderr


def test_inspect_of_data_cut_by_max_blocks_counts_what_was_tokenised_and_stored(cli, stdlib_corpus, tmp_path):
    """With data.max_train_blocks the later documents are never tokenised and the last shard
    holds more blocks than are kept: `inspect` said the corpus's document count as if all were
    tokenised, and divided every shard's bytes by the kept blocks' tokens."""
    data = prepare_data(DataConfig(paths=[stdlib_corpus], seq_len=32, tokenizer={"vocab_size": 300},
                                   shard_documents=5, max_train_blocks=40), tmp_path)
    m, root = data.manifest, data.train.root
    train = m["splits"]["train"]
    tokenised = sum(sp["documents"] for sp in m["splits"].values())
    assert len(data.train) == 40 < train["blocks_packed"] and tokenised < m["documents"]  # the case: a cut
    r = cli("inspect", str(tmp_path / "data"))
    assert r.returncode == 0, r.stderr[-2000:]
    out = " ".join(r.stdout.split())
    assert f"{m['documents']:,} in the corpus, {tokenised:,} tokenised" in out, out
    stored = sum(sp["blocks_packed"] for sp in m["splits"].values()) * 33
    size = sum(f.stat().st_size for f in root.iterdir() if f.is_file() and not f.name.startswith("."))
    assert f"({size / stored:.2f} bytes/token)" in out, out
    assert "(tokenised; an EOS after each plain document)" in out, out


def test_inspect_says_how_chat_rows_end(cli, tmp_path):
    """Chat rows get no EOS of ours: their template writes their ends."""
    from tests.hf_models import make_tokenizer

    rows = [r for r in chat_rows() if "messages" in r]
    data_file = write_jsonl(rows, tmp_path / "chat.jsonl")
    make_tokenizer([m["content"] for r in rows for m in r["messages"]], tmp_path / "tok")
    data = prepare_data(DataConfig(paths=[data_file], seq_len=128, tokenizer={"path": str(tmp_path / "tok")}),
                        tmp_path / "run")
    r = cli("inspect", str(tmp_path / "run" / "data"))
    assert r.returncode == 0, r.stderr[-2000:]
    out = " ".join(r.stdout.split())
    assert "(tokenised; chat rows as their template writes them)" in out, out
    assert "in the corpus" not in out, out
    from distill.report.inspect import data_rows

    rows = data_rows(data.train.root, data.manifest)  # what the table shows, unwrapped
    for name, blocks in (("train", data.train), ("val", data.val)):  # prompts and padding are no targets
        targets = int((blocks[:][:, 1:] >= 0).sum())
        want = f"; {targets:,} targets ({targets / (len(blocks) * 128):.0%} of the positions)"
        assert 0 < targets < len(blocks) * 128 and want in rows[f"split {name}"], (want, rows)


def test_a_damaged_prepared_shard_is_found_by_verify_and_named_when_read(cli, stdlib_corpus, tmp_path):
    """Prepared shards carry the sha256 of what was written: `inspect --verify` checks them (it
    checked nothing of prepared data before); a read of an id past the vocabulary names the
    shard instead of failing as an index error in a student's loss."""
    data = prepare_data(DataConfig(paths=[stdlib_corpus], seq_len=32, tokenizer={"vocab_size": 300}), tmp_path)
    root = data.train.root
    assert verify_blocks(root) == []
    r = cli("inspect", str(tmp_path / "data"), "--verify")
    assert r.returncode == 0 and "verify: ok" in r.stdout, r.stdout + r.stderr
    shard = data.train.shards[0]["ids"]
    ids = np.load(root / shard, mmap_mode="r+")
    ids[1, 5] = 60_000  # a flipped high byte: the same size, an id no tokenizer of 300 makes
    ids.flush()
    del ids
    problems = verify_blocks(root)
    assert any(shard in p and "sha256 mismatch" in p for p in problems), problems
    assert any(shard in p and "token id 60000 >= the vocabulary's 300" in p for p in problems), problems
    with pytest.raises(UserError, match=rf"{shard}: token id 60000 >= the vocabulary's 300: the shard is damaged"):
        open_blocks(root)["train"][[0, 1]]
    open_blocks(root)["train"][0]  # the rows that are intact still read
    r = cli("inspect", str(tmp_path / "data"), "--verify")
    assert r.returncode == 1 and shard in r.stdout and "Traceback" not in r.stderr, r.stdout + r.stderr
    # A shard from before digests were recorded: its size and ids are still checked.
    record = root / shard.replace(".ids.npy", ".json")
    rec = json.loads(record.read_text())
    record.write_text(json.dumps({k: v for k, v in rec.items() if k != "sha256"}))
    assert [p for p in verify_blocks(root) if "sha256" in p] == [] and len(verify_blocks(root)) == 1
    # A truncated target-count shard: the description says so and --verify names it (inspect read
    # the counts before verifying, and died with a traceback)
    targets = root / data.train.shards[0]["targets"]
    targets.write_bytes(targets.read_bytes()[:-7])
    r = cli("inspect", str(tmp_path / "data"), "--verify")
    out = " ".join(r.stdout.split())
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stdout + r.stderr
    assert "targets unreadable" in out and targets.name in out and "problem(s)" in out, out


def test_prepared_data_damaged_since_is_prepared_again(cli, stdlib_corpus, tmp_path, capfd):
    """A finished preparation whose shard went missing, or whose manifest is no JSON, was taken as
    prepared: `prepare` said so and did nothing, and `train` died reading it (after `--overwrite`
    had moved the old run aside).  It is now prepared again, to the same blocks."""
    config = DataConfig(paths=[stdlib_corpus], seq_len=32, tokenizer={"vocab_size": 300}, max_train_blocks=64)
    data = prepare_data(config, tmp_path)
    root, content = data.train.root, data.content
    first = [data.train[i] for i in (0, 9)]
    capfd.readouterr()
    (root / data.train.shards[0]["ids"]).unlink()
    again = prepare_data(config, tmp_path)
    assert f"the prepared data at {root} is damaged (shard file {data.train.shards[0]['ids']} is missing); preparing " \
           f"it again" in capfd.readouterr().err
    assert again.content == content and all(torch.equal(a, again.train[i]) for a, i in zip(first, (0, 9)))
    (root / "manifest.json").write_text("{")
    r = cli("inspect", str(root))
    assert r.returncode == 2 and "the next command that reads the data prepares it again" in r.stderr, r.stderr
    assert "cache" not in r.stderr, r.stderr  # it read as a cache before: `rerun distill cache --overwrite`
    assert prepare_data(config, tmp_path).content == content
    assert "(manifest.json missing or unreadable); preparing it again" in capfd.readouterr().err


ORPHAN = """
import os, signal, threading, time
import datasets, psutil
from distill.packing import children_die_with_this_process

def slow(batch):
    time.sleep(60)
    return batch

def kill_soon():  # as the OOM killer ends a `distill prepare` mid-map
    time.sleep(4)  # the pool's workers and the Manager datasets starts beside them are up
    print("\\nchildren", *[p.pid for p in psutil.Process().children(recursive=True)], flush=True)
    os.kill(os.getpid(), signal.SIGKILL)

threading.Thread(target=kill_soon, daemon=True).start()
with children_die_with_this_process():
    datasets.Dataset.from_dict({"text": ["a"] * 8}).map(slow, batched=True, batch_size=1, num_proc=2)
"""


def test_tokenizer_workers_die_with_a_killed_prepare(tmp_path):
    """A `distill prepare` killed with SIGKILL while datasets' workers tokenised left them (and
    the Manager datasets' map starts beside them) idle, about 400 MB each, for minutes; every
    child forked while preparing now dies with it."""
    import psutil

    out = tmp_path / "out"
    with open(out, "w") as f:  # a file, not a pipe: a live orphan would hold a pipe open
        proc = subprocess.Popen([sys.executable, "-c", ORPHAN], env={**os.environ, "PYTHONPATH": str(ROOT)},
                                stdout=f, stderr=subprocess.STDOUT)
        assert proc.wait(timeout=120) == -9, out.read_text()[-2000:]
    (line,) = [l for l in out.read_text().splitlines() if l.startswith("children")]
    children = [int(t) for t in line.split()[1:]]
    assert len(children) >= 3, out.read_text()[-2000:]  # 2 workers and datasets' Manager at least

    def alive(pid: int) -> bool:
        try:
            return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return False

    deadline = time.time() + 10
    try:
        while any(map(alive, children)) and time.time() < deadline:
            time.sleep(0.1)
        assert not [pid for pid in children if alive(pid)], "children outlived their killed parent"
    finally:
        for pid in children:
            with contextlib.suppress(psutil.NoSuchProcess):
                psutil.Process(pid).kill()


def test_a_resumed_preparations_rate_times_only_what_it_tokenises(monkeypatch):
    """A resumed preparation reuses the killed one's shards at once: counted in the tokens, not
    in the rate (which said millions of tokens a second for a file read)."""
    from distill import packing

    clock = iter([0.0, 5.0, 5.0, 7.0])  # start; the reused shard's update; then 2 s for 1M new tokens
    monkeypatch.setattr(packing.time, "monotonic", lambda: next(clock))
    infos = []
    bar = type("Bar", (), {"update": lambda self, n, info: infos.append(info)})()
    rate = packing._Rate(bar)
    rate.update(10, 3_000_000, reused=True)
    rate.update(10, 1_000_000)
    assert infos == ["3,000,000 tokens (3,000,000 from the earlier run)  0.00M tok/s",
                     "4,000,000 tokens (3,000,000 from the earlier run)  0.50M tok/s"]


@pytest.mark.parametrize("num_proc", [1, 2])
def test_each_chunks_tokenised_arrow_file_is_removed_once_its_shard_is_written(stdlib_corpus, tmp_path, monkeypatch,
                                                                               num_proc):
    """The tokenised chunks under blocks-FP/.work were all kept until the preparation ended (a
    second copy of the corpus's ids on disk): now only the chunk being packed is there."""
    seen = []
    write = ShardWriter.write

    def spy(self, index, plan, *args):
        work = self.root / ".work"
        seen.append((f"{plan['split']}-{index:05d}", sorted(f.name for f in work.iterdir())))
        return write(self, index, plan, *args)

    monkeypatch.setattr(ShardWriter, "write", spy)
    prepare_data(DataConfig(paths=[stdlib_corpus], seq_len=32, tokenizer={"vocab_size": 300}, shard_documents=3,
                            num_proc=num_proc), tmp_path)
    assert len(seen) >= 4
    for tag, files in seen:
        assert files and all(f.startswith(tag) for f in files), (tag, files)  # this chunk's alone


def test_the_blocks_content_digest_follows_the_blocks_not_the_shards(stdlib_corpus, tmp_path):
    """`content` (recorded by caches and checkpoints) names what the blocks hold: the same blocks
    cut into other shards (data.shard_documents, not in the fingerprint) or stored past a
    max_train_blocks cut give the same digest (a first cut hashed the shard records, and
    refused a good cache); other blocks give another."""
    def prepared(out, **kw):
        return prepare_data(DataConfig(paths=[corpus], seq_len=32, tokenizer={"path": str(tok)}, **kw), tmp_path / out)

    corpus = tmp_path / "corpus"
    shutil.copytree(stdlib_corpus, corpus)
    prepare_data(DataConfig(paths=[corpus], seq_len=32, tokenizer={"vocab_size": 300}), tmp_path / "t")
    tok = tmp_path / "t" / "tokenizer"  # one tokenizer for every preparation below
    a, b = prepared("a", shard_documents=4), prepared("b", shard_documents=7)
    assert a.fingerprint == b.fingerprint and len(a.train.shards) != len(b.train.shards)
    assert torch.equal(a.train[:], b.train[:]) and a.content == b.content is not None
    cut_a, cut_b = prepared("c", shard_documents=4, max_train_blocks=50), prepared("d", shard_documents=7,
                                                                                    max_train_blocks=50)
    stored = [sum(s["blocks"] for s in x.manifest["splits"]["train"]["shards"]) for x in (cut_a, cut_b)]
    assert stored[0] != stored[1] and cut_a.content == cut_b.content != a.content  # kept blocks only
    first = sorted(corpus.glob("*.py"))[0]
    first.write_text(first.read_text().replace("def ", "def  ", 1))
    assert prepared("e", shard_documents=4).content != a.content
