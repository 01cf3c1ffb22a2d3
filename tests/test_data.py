"""Tokenizer training, packing and fingerprints on real stdlib files."""
import shutil

import pytest
import torch

from distill.config import DataConfig
from distill.data import EOS, doc_in_val, corpus_files, load_documents, prepare_data
from tests.oracles import pack
from common.errors import UserError


def cfg_for(path, **kw) -> DataConfig:
    return DataConfig(paths=[path], seq_len=kw.pop("seq_len", 64), val_fraction=kw.pop("val_fraction", 0.2),
                      tokenizer={"vocab_size": 400}, **kw)


@pytest.fixture(scope="module")
def packed(stdlib_corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    return prepare_data(cfg_for(stdlib_corpus), out), out


def test_tokenizer_round_trips_real_files(packed, stdlib_corpus):
    data, _ = packed
    tok = data.tokenizer
    for f in sorted(stdlib_corpus.glob("*.py"))[:8]:
        text = f.read_text()
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert tok.decode(ids, clean_up_tokenization_spaces=False) == text


def test_blocks_have_seq_len_plus_one_and_eos_between_documents(packed, stdlib_corpus):
    data, _ = packed
    assert data.train.shape[1] == 65 and data.val.shape[1] == 65
    eos = data.tokenizer.convert_tokens_to_ids(EOS)
    n_docs = len(list(stdlib_corpus.glob("*.py")))
    n_eos = int((data.train[:] == eos).sum() + (data.val[:] == eos).sum())  # [:]: the blocks read from disk
    assert 0 < n_eos <= n_docs  # one EOS per document (some fall in the dropped remainder)


def test_pack_places_eos_after_each_document():
    blocks = pack([[1, 2, 3], [4, 5], [6]], eos_id=0, block=3)
    assert blocks.tolist() == [[1, 2, 3], [0, 4, 5], [0, 6, 0]]
    assert pack([[1, 2]], eos_id=0, block=4).shape == (0, 4)  # remainder dropped


def test_prepare_is_reused_and_deterministic(packed, stdlib_corpus):
    data, out = packed
    again = prepare_data(cfg_for(stdlib_corpus), out)
    assert again.fingerprint == data.fingerprint
    assert torch.equal(again.train[:], data.train[:]) and torch.equal(again.val[:], data.val[:])


def test_fingerprint_changes_with_each_input(packed, stdlib_corpus, tmp_path):
    data, out = packed
    base = data.fingerprint
    # seq_len and split change it
    assert prepare_data(cfg_for(stdlib_corpus, seq_len=32), out).fingerprint != base
    assert prepare_data(cfg_for(stdlib_corpus, val_fraction=0.3), out).fingerprint != base
    # a changed file changes it
    copy = tmp_path / "corpus"
    shutil.copytree(stdlib_corpus, copy)
    run2 = tmp_path / "run2"
    shutil.copytree(out / "tokenizer", run2 / "tokenizer")  # same tokenizer
    assert prepare_data(cfg_for(copy), run2).fingerprint == base  # same bytes, other place: same
    (copy / "textwrap.py").write_text((copy / "textwrap.py").read_text() + "\n# edit\n")
    assert prepare_data(cfg_for(copy), run2).fingerprint != base


def test_jsonl_and_text_field(tmp_path):
    import json

    f = tmp_path / "d.jsonl"
    f.write_text("".join(json.dumps({"body": f"document number {i} " * 20}) + "\n" for i in range(30)))
    docs = load_documents(DataConfig(paths=[f], text_field="body"))
    assert len(docs) == 30
    with pytest.raises(UserError, match="no column 'text'"):
        load_documents(DataConfig(paths=[f]))
    g = tmp_path / "hf.jsonl"  # the Hugging Face convention, read with the default text_field
    g.write_text("".join(json.dumps({"text": f"row {i}", "id": i}) + "\n" for i in range(5)))
    assert load_documents(DataConfig(paths=[g]))["text"] == [f"row {i}" for i in range(5)]


def test_non_utf8_file_is_named(tmp_path):
    (tmp_path / "bad.txt").write_bytes(b"hello \xff\xfe world")
    with pytest.raises(UserError, match=r"bad.txt: not UTF-8 \(bad byte at offset 6\).* leave it out with data.exclude$"):
        load_documents(DataConfig(paths=[tmp_path]))  # met by a folder walk
    with pytest.raises(UserError, match=r"bad.txt: not UTF-8 \(bad byte at offset 6\).* remove it from data.paths$"):
        load_documents(DataConfig(paths=[tmp_path / "bad.txt"]))


def test_a_byte_order_mark_is_not_part_of_a_text_files_document(tmp_path):
    """Windows editors start UTF-8 files with a BOM (EF BB BF): it is not text, and it was kept,
    tokenised at every file's start (jsonl readers already dropped it)."""
    (tmp_path / "a.txt").write_bytes(b"\xef\xbb\xbfhello world\n")
    (tmp_path / "b.txt").write_bytes(b"hello world\n")
    (tmp_path / "c.txt").write_bytes(b"x\xef\xbb\xbfy\n")  # inside the text it is a character (U+FEFF), kept
    assert load_documents(DataConfig(paths=[tmp_path]))["text"] == ["hello world\n", "hello world\n", "x\ufeffy\n"]


def test_empty_corpus_is_refused(tmp_path):
    (tmp_path / "empty.txt").write_text("   \n")
    with pytest.raises(UserError, match="no non-empty documents"):
        load_documents(DataConfig(paths=[tmp_path]))
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "image.png").write_bytes(b"\x89PNG")
    with pytest.raises(UserError, match="no readable files"):
        corpus_files(DataConfig(paths=[tmp_path / "sub"]))
    with pytest.raises(UserError, match="does not exist"):
        corpus_files(DataConfig(paths=[tmp_path / "nothing"]))


def test_a_corpus_of_a_few_documents_is_told_what_helps(stdlib_corpus, tmp_path, capsys):
    """A document goes whole to one split: one long book can never fill both, whatever
    data.val_fraction (the message advised raising it); a few documents hold out far more than
    the fraction, said once."""
    text = "".join(f.read_text() for f in sorted(stdlib_corpus.glob("*.py"))[:3])
    (tmp_path / "book").mkdir()
    (tmp_path / "book" / "book.txt").write_text(text)
    with pytest.raises(UserError, match=r"split got no documents: the corpus has 1, and each goes whole to one "
                                        r"split .*; give more documents, e.g. split a long text"):
        prepare_data(cfg_for(tmp_path / "book", val_fraction=0.49), tmp_path / "run1")
    (tmp_path / "few").mkdir()
    texts = [f.read_text() for f in sorted(stdlib_corpus.glob("*.py"))]
    val = [t for t in texts if doc_in_val(t, 0.05) and len(t) > 3000][:1]
    train = [t for t in texts if not doc_in_val(t, 0.05) and len(t) > 3000][:3]  # one held-out document of 4
    for i, t in enumerate(val + train):
        (tmp_path / "few" / f"{i}.txt").write_text(t)
    data = prepare_data(cfg_for(tmp_path / "few", val_fraction=0.05), tmp_path / "run2")
    held = len(data.val) / (len(data.val) + len(data.train))
    assert held > 0.15
    assert (f"[data] note: {held:.0%} of the blocks are held out for validation (data.val_fraction 0.05): the "
            f"corpus has 4 documents") in capsys.readouterr().err
    prepare_data(cfg_for(stdlib_corpus, val_fraction=0.2), tmp_path / "run3")  # many documents: near the fraction
    assert "held out for validation" not in capsys.readouterr().err


def test_stdlib_corpus_is_found():
    files = corpus_files(DataConfig(stdlib=True))
    assert len(files) > 100 and all(f.suffix == ".py" for f in files)
    assert not any("site-packages" in f.parts for f in files)


@pytest.fixture
def source_tree(tmp_path):
    """A package folder as installed: code, JSON configs (no `text` column), tests."""
    pkg = tmp_path / "pkg"
    for rel in ("a.py", "sub/b.py", "tests/t.py", "docs/guide.md"):
        (pkg / rel).parent.mkdir(parents=True, exist_ok=True)
        (pkg / rel).write_text(f"# {rel}\nx = {len(rel)}\n" * 5)
    (pkg / "config.json").write_text('{"name": "pkg", "version": 1}')
    (pkg / "sub" / "schema.json").write_text('[{"field": "a"}, {"field": "b"}]')
    return pkg


def test_glob_pattern_picks_files_across_folders(source_tree):
    files = corpus_files(DataConfig(paths=[source_tree / "**" / "*.py"]))
    assert [f.relative_to(source_tree).as_posix() for f in files] == ["a.py", "sub/b.py", "tests/t.py"]
    with pytest.raises(UserError, match=r"data.paths\[0\]: the pattern .*\*\.rs matches no"):
        corpus_files(DataConfig(paths=[source_tree / "**" / "*.rs"]))


def test_exclude_patterns_match_names_and_paths(source_tree):
    files = corpus_files(DataConfig(paths=[source_tree], exclude=["*.json", "docs/*"]))
    assert [f.relative_to(source_tree).as_posix() for f in files] == ["a.py", "sub/b.py"]  # tests/: SKIP_DIRS
    files = corpus_files(DataConfig(paths=[source_tree / "**" / "*.py"], exclude=["tests"]))
    assert [f.relative_to(source_tree).as_posix() for f in files] == ["a.py", "sub/b.py"]


def test_json_configs_in_a_source_tree_are_skipped_not_fatal(source_tree):
    lines = []
    docs = load_documents(DataConfig(paths=[source_tree]), log=lines.append)
    assert len(docs) == 3  # a.py, sub/b.py, docs/guide.md
    assert len(lines) == 1 and "skipped 2 table file(s)" in lines[0] and "data.exclude" in lines[0]
    with pytest.raises(UserError, match="config.json: no column 'text'"):  # named explicitly: must read
        load_documents(DataConfig(paths=[source_tree / "config.json"]))


def test_glob_in_a_config_file_is_relative_to_it(source_tree):
    from distill.config import check_inputs_exist, load_config

    cfg_path = source_tree.parent / "run.yaml"
    cfg_path.write_text("data: {paths: ['pkg/**/*.py'], exclude: [tests]}\nteacher: {source: cache}\n"
                        "students: [{name: s, model: {preset: dense}}]\n")
    cfg = load_config(cfg_path)
    check_inputs_exist(cfg)  # a pattern is not a missing file
    assert [f.name for f in corpus_files(cfg.data)] == ["a.py", "b.py"]


def test_fingerprint_reads_at_most_a_mebibyte_of_a_large_file(tmp_path, monkeypatch):
    """Every launch computes the fingerprint to find the prepared blocks: it must not read a
    terabyte corpus again.  A large file is known by its size and 16 windows of 64 KiB; a small
    one by all of its bytes."""
    import builtins

    import distill.data as data_mod

    big = tmp_path / "big.txt"
    big.write_bytes(bytes(range(256)) * (40 << 12))  # 40 MiB
    small = tmp_path / "small.txt"
    small.write_text("def f():\n    return 1\n" * 100)
    read = []

    class Counted:
        def __init__(self, f):
            self.f = f

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

        def seek(self, *a):
            return self.f.seek(*a)

        def read(self, *a):
            out = self.f.read(*a)
            read.append(len(out))
            return out

    monkeypatch.setattr(data_mod, "open", lambda *a, **k: Counted(builtins.open(*a, **k)), raising=False)
    base = data_mod.file_digest(big)
    assert 0 < sum(read) <= data_mod.WHOLE_FILE_BYTES
    monkeypatch.undo()

    def edited(path, offset):
        raw = bytearray(path.read_bytes())
        raw[offset] ^= 1
        copy = tmp_path / f"edit-{offset}-{path.name}"
        copy.write_bytes(bytes(raw))
        return data_mod.file_digest(copy)

    assert edited(big, 0) != base and edited(big, big.stat().st_size - 1) != base  # first and last bytes
    with big.open("ab") as f:
        f.write(b"x")
    assert data_mod.file_digest(big) != base  # the size
    small_base = data_mod.file_digest(small)
    assert all(edited(small, i) != small_base for i in (0, 777, small.stat().st_size - 1))  # every byte


def test_a_new_preparation_names_the_earlier_ones_it_leaves_on_disk(stdlib_corpus, tmp_path, capsys):
    """Each change of data settings prepares a new OUT/data/blocks-FP and keeps the old one (a
    user may come back to it): say what they hold, once, when a new one is made."""
    first = prepare_data(cfg_for(stdlib_corpus), tmp_path)
    assert "earlier preparation" not in capsys.readouterr().err
    prepare_data(cfg_for(stdlib_corpus, seq_len=32), tmp_path)
    err = capsys.readouterr().err
    assert "also holds 1 earlier preparation(s) of other data or settings (" in err, err
    assert f"blocks-{first.fingerprint}); nothing reads them" in err, err
    prepare_data(cfg_for(stdlib_corpus, seq_len=32), tmp_path)  # reused: nothing new made, nothing said
    assert "earlier preparation" not in capsys.readouterr().err
