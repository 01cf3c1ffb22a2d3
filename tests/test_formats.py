"""Every common data format read with default data settings (the `text` column, extra columns
beside it, chat rows), through `load_documents` per format and through the real CLI."""
from __future__ import annotations

import bz2
import gzip
import json
import re
import lzma
import shutil
from pathlib import Path

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import yaml
from transformers import AutoTokenizer

from common.errors import UserError
from distill.chat import PLAIN, ROW, BadRow, render
from distill.config import DataConfig, load_config
from distill.data import corpus_files, fingerprint, load_documents, prepare_data

WORDS = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu".split()


def text_rows(tag: str = "", n: int = 80) -> list[dict]:
    """Distinct documents with the default `text` column and two extra columns."""
    return [{"text": f"{tag}Document {i}: " + " ".join(WORDS[(i * j + j) % len(WORDS)] for j in range(30)) + ".",
             "id": i, "meta": {"source": f"s{i % 3}", "score": i / 10}} for i in range(n)]


def prompt_rows(n: int = 40) -> list[dict]:
    return [{"prompt": f"Name word {i}: ", "completion": f"{WORDS[i % len(WORDS)]} is word {i}.", "id": i}
            for i in range(n)]


def message_rows(n: int = 40) -> list[dict]:
    return [{"messages": [{"role": "user", "content": f"What is word {i}?"},
                          {"role": "assistant", "content": f"Word {i} is {WORDS[i % len(WORDS)]}."}], "id": i}
            for i in range(n)]


def _jsonl(rows: list[dict]) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in rows).encode()


def _bytes(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def _zstd(data: bytes) -> bytes:
    import zstandard

    return zstandard.ZstdCompressor().compress(data)


def _ipc(rows: list[dict], path: Path, stream: bool) -> Path:
    table = pa.Table.from_pylist(rows)
    path.parent.mkdir(parents=True, exist_ok=True)
    with (pa.ipc.new_stream if stream else pa.ipc.new_file)(str(path), table.schema) as w:
        w.write_table(table)
    return path


def _parquet(rows: list[dict], path: Path, large: bool = False) -> Path:
    table = pa.Table.from_pylist(rows)
    if large:  # polars writes strings as large_string
        table = table.cast(pa.schema([pa.field(f.name, pa.large_string()) if f.type == pa.string() else f
                                      for f in table.schema]))
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, str(path))
    return path


def _saved(rows: list[dict], path: Path) -> Path:
    datasets.Dataset.from_list(rows).save_to_disk(str(path))
    return path


def _saved_dict(rows: list[dict], path: Path) -> Path:
    held_out = [{k: (f"held out: {v}" if isinstance(v, str) else v) for k, v in r.items()} for r in rows[:5]]
    datasets.DatasetDict({"train": datasets.Dataset.from_list(rows),
                          "test": datasets.Dataset.from_list(held_out)}).save_to_disk(str(path))
    return path  # only "train" is read


def _text_dir(rows: list[dict], path: Path) -> Path:
    for i, r in enumerate(rows):
        _bytes(path / f"sub{i % 2}" / f"doc{i}.txt", r["text"].encode())
    return path


def _glob(rows: list[dict], path: Path) -> Path:
    _text_dir(rows, path / "parts")
    (path / "parts" / "notes.csv").write_text("not,read\n")  # outside the pattern
    return path / "parts" / "**" / "*.txt"


def _glob_of_saved(rows: list[dict], path: Path) -> Path:
    half = len(rows) // 2
    _saved(rows[:half], path / "shards" / "ds_0")
    _saved(rows[half:], path / "shards" / "ds_1")
    return path / "shards" / "ds_*"


def _mixed_dir(rows: list[dict], path: Path) -> Path:
    """A folder of tables: compressed jsonl, parquet and a saved dataset, which is read as one input."""
    third = len(rows) // 3
    _bytes(path / "a.jsonl.zst", _zstd(_jsonl(rows[:third])))
    _parquet(rows[third:2 * third], path / "b.parquet")
    _saved(rows[2 * third:], path / "nested" / "saved")
    return path


TABLES = {  # format -> writer(rows, dir) -> the path for data.paths
    "jsonl": lambda rows, d: _bytes(d / "c.jsonl", _jsonl(rows)),
    "jsonl.gz": lambda rows, d: _bytes(d / "c.jsonl.gz", gzip.compress(_jsonl(rows))),
    "jsonl.bz2": lambda rows, d: _bytes(d / "c.jsonl.bz2", bz2.compress(_jsonl(rows))),
    "jsonl.zst": lambda rows, d: _bytes(d / "c.jsonl.zst", _zstd(_jsonl(rows))),
    "jsonl.xz": lambda rows, d: _bytes(d / "c.jsonl.xz", lzma.compress(_jsonl(rows))),
    "json": lambda rows, d: _bytes(d / "c.json", json.dumps(rows).encode()),
    "json.gz": lambda rows, d: _bytes(d / "c.json.gz", gzip.compress(json.dumps(rows).encode())),
    "parquet": lambda rows, d: _parquet(rows, d / "c.parquet"),
    "parquet-large-string": lambda rows, d: _parquet(rows, d / "c.parquet", large=True),
    "arrow": lambda rows, d: _ipc(rows, d / "c.arrow", stream=False),
    "arrow-stream": lambda rows, d: _ipc(rows, d / "c.arrow", stream=True),
    "save_to_disk": lambda rows, d: _saved(rows, d / "ds"),
    "save_to_disk-dict": lambda rows, d: _saved_dict(rows, d / "dsd"),
    "glob-of-saved": _glob_of_saved,
    "dir-of-tables": _mixed_dir,
}
FORMATS = {**TABLES, "txt-dir": _text_dir, "txt-glob": _glob}


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_text_rows_with_default_settings(fmt, tmp_path):
    rows = text_rows()
    docs = load_documents(DataConfig(paths=[FORMATS[fmt](rows, tmp_path)]))
    assert sorted(docs["text"]) == sorted(r["text"] for r in rows)
    assert set(docs["chat"]) == {PLAIN}


@pytest.mark.parametrize("kind", ["messages", "prompt"])
@pytest.mark.parametrize("fmt", list(TABLES))
def test_chat_rows_with_default_settings(fmt, kind, tmp_path):
    rows = message_rows() if kind == "messages" else prompt_rows()
    docs = load_documents(DataConfig(paths=[TABLES[fmt](rows, tmp_path)]))
    want = [{k: v for k, v in r.items() if k != "id"} for r in rows]
    key = lambda r: json.dumps({k: v for k, v in r.items() if k != ROW}, sort_keys=True)  # noqa: E731  (ROW: where the row came from)
    assert sorted(map(key, map(json.loads, docs["chat"]))) == sorted(map(key, want))


def test_chat_rows_pack_from_a_saved_dataset_and_parquet(tmp_path):
    from tests.hf_models import make_tokenizer

    rows = message_rows()
    tok_dir = tmp_path / "tok"
    make_tokenizer([json.dumps(r) for r in rows], tok_dir)
    paths = [_saved(rows, tmp_path / "ds"), _parquet(prompt_rows(), tmp_path / "p.parquet")]
    data = prepare_data(DataConfig(paths=paths, seq_len=32, val_fraction=0.2, tokenizer={"path": tok_dir}),
                        tmp_path / "run")
    assert len(data.train) and len(data.val)
    assert (data.train[:] < 0).any()  # prompts and user turns are no targets


def test_sharegpt_conversations_read_as_the_same_messages(tmp_path):
    """ShareGPT rows (`conversations` of {from, value}; system / human / gpt) give the very
    blocks and targets their `messages` twins give; an unknown speaker is one line."""
    from tests.hf_models import make_tokenizer

    rows = message_rows()
    for r in rows[::3]:
        r["messages"].insert(0, {"role": "system", "content": "Be brief."})
    speaker = {"system": "system", "user": "human", "assistant": "gpt"}
    shared = [{"conversations": [{"from": speaker[m["role"]], "value": m["content"]} for m in r["messages"]], "id": r["id"]}
              for r in rows]
    make_tokenizer([json.dumps(r) for r in rows], tmp_path / "tok")

    def blocks(name, table):
        cfg = DataConfig(paths=[_bytes(tmp_path / f"{name}.jsonl", _jsonl(table))], seq_len=32, val_fraction=0.2,
                         tokenizer={"path": tmp_path / "tok"})
        data = prepare_data(cfg, tmp_path / name)
        return data.train[:], data.val[:]

    for a, b in zip(blocks("messages", rows), blocks("sharegpt", shared)):
        assert torch.equal(a, b) and (a < 0).any()  # the same ids, the same targets (user turns masked)
    shared[5]["conversations"][1]["from"] = "narrator"  # one bad row: counted or named where rows are packed
    shared[6]["conversations"][1]["from"] = "GPT"  # another case of a known speaker
    docs = load_documents(DataConfig(paths=[_bytes(tmp_path / "odd.jsonl", _jsonl(shared))]))
    tok = AutoTokenizer.from_pretrained(str(tmp_path / "tok"))
    with pytest.raises(BadRow, match=r"odd.jsonl row 6: a ShareGPT turn from 'narrator'; known speakers are"):
        render(tok, docs["chat"][5])
    assert [m["role"] for m in json.loads(docs["chat"][6])["messages"]][1] == "assistant"


def test_saved_datasetdict_split_rules(tmp_path):
    only = tmp_path / "only"
    datasets.DatasetDict({"validation": datasets.Dataset.from_list(text_rows(n=3))}).save_to_disk(str(only))
    assert len(load_documents(DataConfig(paths=[only]))) == 3  # its only split
    two = tmp_path / "two"
    datasets.DatasetDict({"a": datasets.Dataset.from_list(text_rows(n=3)),
                          "b": datasets.Dataset.from_list(text_rows(n=2))}).save_to_disk(str(two))
    with pytest.raises(UserError, match="splits a, b and none named 'train'"):
        load_documents(DataConfig(paths=[two]))


@pytest.mark.parametrize("name,content,message", [
    ("notes.csv", b"text\nhello\n", r"notes.csv is not a format data.paths reads; it takes .*\.jsonl"),
    ("corpus", b"hello\n", r"corpus is not a format"),
    ("rows.jsonl", b'{"title": "a"}\n', r"rows.jsonl: no column 'text', nor chat columns"),
    ("broken.jsonl", b'{"text": "a"}\n{oops\n', r"broken.jsonl: line 2 is not valid JSON \(Expecting property name"),
    ("empty.jsonl", b"", r"empty.jsonl: the file is empty"),
    ("blank.jsonl", b"\n  \n\n", r"blank.jsonl: the file is blank \(whitespace only\); remove it"),
    ("fake.parquet", b"not parquet", r"fake.parquet: could not be read as parquet"),
    ("ints.jsonl", b'{"text": 1}\n', r"ints.jsonl: row 1's 'text' is 1 \(int\), not a string"),
    # mixed strings and a number: datasets reads the column as Json, which named no row (a fuzz trial)
    ("some.jsonl", b'{"text": "a"}\n{"text": null}\n{"text": "b"}\n{"text": 5}\n',
     r"some.jsonl: row 4's 'text' is 5 \(int\), not a string"),
    ("chat.jsonl", b'{"messages": "hi"}\n', r"chat.jsonl: row 1's 'messages' is a str, not a list of \{role, content\}"),
    ("mixed.jsonl", b'{"messages": [{"role": "user", "content": "a"}]}\n{"messages": "hi"}\n',
     r"mixed.jsonl: row 2's 'messages' is a str, not a list of \{role, content\} turns"),
])
def test_a_file_in_no_known_shape_is_named(tmp_path, name, content, message):
    f = _bytes(tmp_path / name, content)
    with pytest.raises(UserError, match=message):
        load_documents(DataConfig(paths=[f]))


@pytest.mark.parametrize("suffix,compress", [("jsonl", lambda b: b), ("jsonl.gz", gzip.compress)])
def test_a_malformed_line_is_named_by_its_line_in_the_file(tmp_path, suffix, compress):
    """datasets counts rows from 0 within a read chunk of ~10 MB; the user needs the file's line."""
    lines = _jsonl(text_rows(n=3000)).splitlines(keepends=True)  # several MB: more than one read chunk
    lines[2500] = lines[2500].replace(b'", "id"', b'" "id"')  # line 2,501: a missing comma
    f = _bytes(tmp_path / f"rows.{suffix}", compress(b"".join(lines)))
    with pytest.raises(UserError, match=rf"rows.{suffix}: line 2501 is not valid JSON \(Expecting ',' delimiter"):
        load_documents(DataConfig(paths=[f]))


def test_a_control_character_in_a_line_is_named_once(tmp_path):
    lines = _jsonl(text_rows(n=4)).splitlines(keepends=True)
    lines[2] = lines[2].replace(b"Document 2", b"Docu\x01ment 2")  # a raw control byte inside a string
    f = _bytes(tmp_path / "rows.jsonl", b"".join(lines))
    with pytest.raises(UserError, match=r"rows.jsonl: line 3 is not valid JSON \(Invalid control character at "
                                        r"column \d+\)"):
        load_documents(DataConfig(paths=[f]))


def test_a_pretty_printed_json_document_is_not_blamed_on_its_first_line(tmp_path):
    from distill.data import _first_bad_json_line

    f = _bytes(tmp_path / "rows.json", json.dumps({"text": ["a", "b"]}, indent=2).encode())
    assert _first_bad_json_line(f) is None
    assert _first_bad_json_line(_bytes(tmp_path / "bad.json", b'{"text": "a",\n')) == \
        f"{tmp_path / 'bad.json'}: line 1 is not valid JSON (Expecting property name enclosed in double quotes at column 15); fix or remove that line"


def test_rows_with_nothing_to_learn_are_counted(tmp_path):
    """A chat row whose `messages` is missing or null, and an empty `text`, are left out and said."""
    rows = message_rows(10)
    rows[3] = {"id": 3}  # no messages key at all
    rows[7] = {"messages": None, "id": 7}
    said: list[str] = []
    docs = load_documents(DataConfig(paths=[_bytes(tmp_path / "chat.jsonl", _jsonl(rows))]), log=said.append)
    assert len(docs) == 8
    assert said == ["[data] skipped 2 of 10 table rows with nothing to learn from: empty or null text, or no "
                    "(null) messages / prompt + completion"], said


def test_a_saved_dataset_is_left_as_it_was_and_keeps_its_fingerprint(tmp_path):
    """Reading a save_to_disk dir made datasets write its transforms' cache-*.arrow files into
    it: the user's data changed, and so did its fingerprint, so `distill train` after `distill
    cache` refused the cache.  Now nothing is written there, and such files (left by earlier
    versions) are not part of the fingerprint."""
    from tests.hf_models import make_tokenizer

    ds = _saved(message_rows(), tmp_path / "ds")
    before = sorted(p.name for p in ds.iterdir())
    make_tokenizer([json.dumps(r) for r in message_rows()], tmp_path / "tok")
    cfg = DataConfig(paths=[ds], seq_len=32, val_fraction=0.2, tokenizer={"path": tmp_path / "tok"})
    first = prepare_data(cfg, tmp_path / "run").fingerprint
    load_documents(cfg)  # as eval and on-policy read prompts: no cache_dir of theirs
    assert sorted(p.name for p in ds.iterdir()) == before
    (ds / "cache-0123456789abcdef.arrow").write_bytes(b"a transform's cache")
    assert prepare_data(cfg, tmp_path / "run").fingerprint == first
    assert len(list((tmp_path / "run" / "data").glob("blocks-*"))) == 1


def test_an_edited_table_is_read_again_even_with_its_old_mtime(tmp_path):
    """datasets' own cache knows a json file by its path and mtime: an edited file given its old
    mtime back (touch -r, an archive's fixed times) gave a new fingerprint holding the OLD rows."""
    import os

    f = _bytes(tmp_path / "rows.jsonl", _jsonl(text_rows(n=12)))
    stat = f.stat()
    assert "ZZZZ" not in "".join(load_documents(DataConfig(paths=[f]))["text"])
    rows = text_rows(n=12)
    rows[1]["text"] = "ZZZZ " * 40
    f.write_bytes(_jsonl(rows))
    os.utime(f, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert "ZZZZ" in "".join(load_documents(DataConfig(paths=[f]))["text"])


def test_chat_rows_with_a_prompt_beside_their_messages_read_as_messages(tmp_path):
    """UltraChat's rows carry `prompt` and `prompt_id` beside `messages`, and no completion:
    they read as messages (before: KeyError 'completion', a traceback)."""
    rows = [{"prompt": r["messages"][0]["content"], "prompt_id": str(i), **r} for i, r in enumerate(message_rows(6))]
    docs = load_documents(DataConfig(paths=[_bytes(tmp_path / "uc.jsonl", _jsonl(rows))]))
    chats = [json.loads(c) for c in docs["chat"]]
    assert len(chats) == 6 and all(set(c) == {"messages", ROW} for c in chats)


def test_a_json_file_in_another_encoding_is_one_line(tmp_path):
    """Named by its line; met through a glob, the advice is data.exclude (a glob cannot drop one file)."""
    f = _bytes(tmp_path / "latin1.jsonl", _jsonl(text_rows(n=3)).replace(b"Document 1", "Dokumént 1".encode("latin-1")))
    column = _jsonl(text_rows(n=3)).splitlines()[1].index(b"Document 1") + len("Dokum") + 1
    with pytest.raises(UserError, match=rf"^{f}: not UTF-8 \(line 2, byte {column}\); convert it .* remove it from "
                                        rf"data.paths$"):
        load_documents(DataConfig(paths=[f]))
    with pytest.raises(UserError, match=rf"^{f}: not UTF-8 \(line 2, byte {column}\); .*leave it out with data.exclude$"):
        load_documents(DataConfig(paths=[str(tmp_path / "*.jsonl")]))


def test_a_full_disk_under_the_data_is_said_so_not_blamed_on_the_input(tmp_path, monkeypatch):
    """datasets converts a file to Arrow under OUT/data: a full disk there came out as `rows.jsonl:
    could not be read as json (OSError: [Errno 28] ...)`, and elsewhere in preparation (pyarrow's
    error names no file) as a traceback."""
    import errno

    import datasets

    from distill import data as data_module
    from distill.data import prepare_data

    f = _bytes(tmp_path / "rows.jsonl", _jsonl(text_rows(n=3)))

    def full(*args, **kwargs):
        try:
            raise OSError(errno.ENOSPC, "No space left on device")
        except OSError as e:
            raise datasets.exceptions.DatasetGenerationError("An error occurred while generating the dataset") from e

    with monkeypatch.context() as m:
        m.setattr(datasets, "load_dataset", full)
        with pytest.raises(UserError, match=r": disk full; free space or choose another output dir") as e:
            load_documents(DataConfig(paths=[f]))
        assert "rows.jsonl" not in str(e.value)
    with monkeypatch.context() as m:
        m.setattr(data_module, "load_documents", full)
        with pytest.raises(UserError, match=rf"^cannot write {tmp_path / 'out' / 'data'}: disk full"):
            prepare_data(DataConfig(paths=[f], tokenizer={"vocab_size": 300}), tmp_path / "out")


def test_a_table_with_text_and_chat_columns_says_which_it_reads(tmp_path):
    rows = [{"text": "rendered chat " + str(i), **r} for i, r in enumerate(message_rows(4))]
    said: list[str] = []
    docs = load_documents(DataConfig(paths=[_bytes(tmp_path / "both.jsonl", _jsonl(rows))]), log=said.append)
    assert docs["chat"] == [PLAIN] * 4
    assert any("has a 'text' column and chat columns; reading 'text' as plain text" in line for line in said), said


def test_a_system_column_gives_a_row_without_a_system_turn_its_first(hf_family, tmp_path):
    """Some ShareGPT sets (and OpenOrca's instruction rows) carry the system prompt in a column
    beside the turns.  It was not read (a line said so); it is now each row's first turn, unless
    the row has a system turn of its own, and the system prompt is no target."""
    import yaml

    from tests.conftest import run_cli

    rows = [{"conversations": [{"from": "human", "value": f"question {i}?"}, {"from": "gpt", "value": f"answer {i}."}],
             "system": "You are terse."} for i in range(40)]
    rows[3]["conversations"].insert(0, {"from": "system", "value": "Its own."})
    rows[4]["system"] = ""  # none for this row
    path = _bytes(tmp_path / "sg.jsonl", _jsonl(rows))
    docs = load_documents(DataConfig(paths=[path]))
    got = [json.loads(c)["messages"] for c in docs["chat"]]
    assert got[0][0] == {"role": "system", "content": "You are terse."} and len(got[0]) == 3
    assert [m["content"] for m in got[3] if m["role"] == "system"] == ["Its own."]
    assert got[4][0]["role"] == "user"
    tok = hf_family["tokenizer"]
    ids, targets = render(tok, docs["chat"][0])
    assert tok.decode(ids).startswith("<|im_start|>system\nYou are terse.<|im_end|>")
    assert tok.decode([i for i, t in zip(ids, targets) if t]) == "answer 0.<|im_end|>"
    (tmp_path / "p.yaml").write_text(yaml.safe_dump({
        "out_dir": str(tmp_path / "out"), "data": {"paths": [str(path)], "seq_len": 64, "val_fraction": 0.2},
        "teacher": {"source": "checkpoint", "path": str(hf_family["teacher"])},
        "students": [{"name": "s", "model": {"preset": "dense"}}]}))
    r = run_cli("prepare", "-c", str(tmp_path / "p.yaml"), "--quiet")
    assert r.returncode == 0, r.stderr[-2000:]


def test_one_file_under_two_spellings_is_read_once(tmp_path):
    f = _bytes(tmp_path / "data" / "rows.jsonl", _jsonl(text_rows(n=12)))
    spellings = [f, tmp_path / "data" / ".." / "data" / "rows.jsonl", tmp_path / "data"]
    assert corpus_files(DataConfig(paths=spellings)) == [f]
    assert len(load_documents(DataConfig(paths=spellings))) == 12


def test_what_the_example_config_mixes_in_or_cuts_is_said(tmp_path):
    f = _bytes(tmp_path / "rows.jsonl", _jsonl(text_rows(n=12)))
    said: list[str] = []
    docs = load_documents(DataConfig(paths=[f], stdlib=True, max_documents=5), log=said.append)
    assert len(docs) == 5
    assert any(line.startswith("[data] data.stdlib: true adds") for line in said), said
    assert any("data.max_documents 5: using the first 5 of" in line for line in said), said
    said.clear()
    load_documents(DataConfig(paths=[f]), log=said.append)
    assert said == []  # the user's own data, whole: nothing to say


@pytest.mark.parametrize("fmt", ["jsonl.zst", "save_to_disk", "dir-of-tables"])
def test_new_formats_are_fingerprinted_by_content(fmt, tmp_path):
    def fp(path: Path) -> str:
        cfg = DataConfig(paths=[path])
        return fingerprint(corpus_files(cfg), "tok", cfg)

    first = TABLES[fmt](text_rows(), tmp_path / "a")
    base = fp(first)
    shutil.copytree(tmp_path / "a", tmp_path / "b")  # the same bytes elsewhere: the same
    assert fp(tmp_path / "b" / first.relative_to(tmp_path / "a")) == base
    assert fp(TABLES[fmt](text_rows(n=81), tmp_path / "c")) != base


# ----------------------------------------------------------------------------- the real CLI

TINY_TEACHER = {"preset": "behemoth", "args": {"hidden_size": 32, "num_layers": 1, "num_heads": 2, "num_kv_heads": 1,
                                                "head_dim": 16, "num_experts": 2}}


def _pretrain_config(tmp_path: Path, paths: list[Path], **data) -> Path:
    """The cheapest command that prepares data: pretrain a tiny teacher for one step. Data
    settings are the defaults but for `paths`, a short seq_len (the corpora are small) and `data`."""
    cfg = {"data": {"paths": [str(p) for p in paths], "seq_len": 32, **data},
           "teacher": {"source": "preset", "model": TINY_TEACHER, "pretrain": {"steps": 1, "batch_size": 1}},
           "students": [{"name": "s", "model": {"preset": "dense"}}], "out_dir": str(tmp_path / "out")}
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.mark.parametrize("packing", [None, "concat"])
def test_jsonl_of_text_rows_through_the_cli(cli, tmp_path, packing):
    """The Hugging Face convention, `{"text": ...}` with extra columns, with default data
    settings (packing: documents) and with the old one-stream packing."""
    path = _bytes(tmp_path / "corpus.jsonl", _jsonl(text_rows()))
    config = _pretrain_config(tmp_path, [path], **({"packing": packing} if packing else {}))
    r = cli("pretrain", "-c", str(config), "--quiet")
    assert r.returncode == 0, r.stderr[-3000:]
    assert (tmp_path / "out" / "teacher" / "pretrain_done.json").exists()
    manifest = json.loads(next((tmp_path / "out" / "data").glob("blocks-*/manifest.json")).read_text())
    assert manifest["packing"] == (packing or "documents")
    assert manifest["masked"] == (packing is None)  # documents: each document's first token is no target


def test_every_format_through_one_cli_run(cli, tmp_path):
    paths = [FORMATS[fmt](text_rows(f"{fmt}: "), tmp_path / fmt) for fmt in FORMATS]
    paths += [TABLES[fmt](prompt_rows(), tmp_path / f"{fmt}-prompt") for fmt in ("json", "arrow", "save_to_disk")]
    config = _pretrain_config(tmp_path, paths)
    r = cli("pretrain", "-c", str(config), "--quiet")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "skipped" not in r.stderr  # every input was read
    blocks = list((tmp_path / "out" / "data").glob("blocks-*"))
    assert len(blocks) == 1 and (blocks[0] / "manifest.json").is_file()
    data = prepare_data(load_config(config).data, tmp_path / "out")  # the same inputs: the same blocks, reused
    assert blocks[0].name == f"blocks-{data.fingerprint}"


@pytest.mark.parametrize("name,content,message", [
    ("notes.csv", b"text\nhello\n", "notes.csv is not a format data.paths reads"),
    ("rows.jsonl", b'{"title": "a"}\n', "rows.jsonl: no column 'text'"),
    ("broken.jsonl", b'{"text": "a"}\n{oops\n', "broken.jsonl: line 2 is not valid JSON"),
])
def test_a_file_in_no_known_shape_is_one_line_through_the_cli(cli, tmp_path, name, content, message):
    path = _bytes(tmp_path / name, content)
    r = cli("pretrain", "-c", str(_pretrain_config(tmp_path, [path])), "--quiet")
    assert r.returncode == 2, (r.returncode, r.stderr[-3000:])
    lines = [line for line in r.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    assert message in lines[0]
    assert not (tmp_path / "out" / "teacher").exists()


def _targets(tok, chat: str) -> str:
    ids, targets = render(tok, chat)
    return tok.decode([i for i, t in zip(ids, targets) if t])


@pytest.mark.parametrize("rows, user, answer", [
    ([{"instruction": "Add 2 and 3.", "input": "", "output": "5"},  # Alpaca, with and without an input
      {"instruction": "Add these.", "input": "4 and 4", "output": "8"}], ["Add 2 and 3.", "Add these.\n\n4 and 4"], ["5", "8"]),
    ([{"instruction": "Sum it.", "context": "1 and 1", "response": "2", "category": "qa"}],  # Dolly
     ["Sum it.\n\n1 and 1"], ["2"]),
    ([{"instruction": "Add 1 and 1.", "output": "2"}], ["Add 1 and 1."], ["2"]),  # Alpaca with no `input` column
    ([{"instruction": "Add 1.", "input": None, "output": "1"},  # a row with no instruction: its input
      {"instruction": None, "input": "only input", "output": "ok"}], ["Add 1.", "only input"], ["1", "ok"]),
    ([{"messages": [{"role": "user", "content": "hi?"}, {"role": "assistant", "content": "hello"}]},  # one file, two
      {"instruction": "Add 1.", "output": "1"}], ["hi?", "Add 1."], ["hello", "1"]),  # shapes
    ([{"id": "x", "system_prompt": "Be terse.", "question": "2 plus 2?", "response": "4"}],  # OpenOrca
     ["2 plus 2?"], ["4"]),
    ([{"conversation": [{"role": "user", "content": "hi?"}, {"role": "assistant", "content": "hello"}]}],  # LMSYS
     ["hi?"], ["hello"]),
    ([{"conversations": [{"role": "User", "content": "hey?"}, {"role": "Assistant", "content": "yo"}]}],  # role/content
     ["hey?"], ["yo"]),
])
def test_instruction_and_other_chat_tables_are_read_as_messages(rows, user, answer, hf_family, tmp_path):
    """Alpaca, Dolly and OpenOrca tables were refused ("no column 'text' ... set data.text_field",
    advice that trained the answers alone as plain text); so were LMSYS's `conversation` and
    `conversations` of {role, content} turns, and a turn from "Assistant" had no target.  Each is
    read as messages: a user turn (the instruction, then its input after a blank line), the
    assistant's answer the only target, a system column the first turn."""
    docs = load_documents(DataConfig(paths=[_bytes(tmp_path / "t.jsonl", _jsonl(rows))]))
    tok = hf_family["tokenizer"]
    for chat, want_user, want_answer in zip(docs["chat"], user, answer):
        messages = json.loads(chat)["messages"]
        assert [m["content"] for m in messages if m["role"] == "user"] == [want_user]
        assert _targets(tok, chat) == f"{want_answer}<|im_end|>"
        if "system_prompt" in rows[0]:
            assert messages[0] == {"role": "system", "content": "Be terse."}


def test_turn_weights_tool_arguments_and_rows_a_text_model_cannot_take(hf_family, tmp_path):
    """OpenAI's fine-tuning rows mark an assistant turn not to learn with `"weight": 0`: it was a
    target.  Its tool calls give arguments as a JSON string, which templates escaped a second
    time.  A turn that is no object crashed with a traceback; a content that is an object, a list
    of strings or holds an image part was trained as Python text, as was a turn with no role.
    Such a row is a BadRow now, named, and data.bad_rows: skip drops it, counted."""
    from distill.chat import empty_answers

    from tests.hf_models import TOOLS, with_template

    weighted = {"messages": [{"role": "user", "content": "capital of France?"},
                             {"role": "assistant", "content": "Lyon", "weight": 0},
                             {"role": "user", "content": "no, try again"},
                             {"role": "assistant", "content": "Paris", "weight": 1},
                             {"role": "user", "content": "and Italy?"},
                             {"role": "assistant", "content": "Milan", "weight": "0"}]}
    call = {"messages": [{"role": "user", "content": "weather?"},
                         {"role": "assistant", "tool_calls": [{"type": "function", "function": {
                             "name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
                         {"role": "assistant", "content": "sunny"}]}
    bad = [{"messages": ["hello", {"role": "assistant", "content": "x"}]},
           {"messages": [{"role": "user", "content": {"answer": "a dict"}}, {"role": "assistant", "content": "x"}]},
           {"messages": [{"role": "user", "content": ["a", "b"]}, {"role": "assistant", "content": "x"}]},
           {"messages": [{"role": "user", "content": [{"type": "image", "url": "x.png"}, {"type": "text", "text": "what?"}]},
                         {"role": "assistant", "content": "a cat"}]},
           {"messages": [{"content": "who am I"}, {"role": "assistant", "content": "x"}]}]
    why = ["turn 1 is a str, not an object", "turn 1's content is a dict", "turn 1's content is a list",
           "turn 1 holds a 'image' part, which a text model cannot see", "turn 1 has no role"]
    path = _bytes(tmp_path / "rows.jsonl", _jsonl([weighted, call] + bad))
    docs = load_documents(DataConfig(paths=[path]))
    tok = hf_family["tokenizer"]
    assert _targets(tok, docs["chat"][0]) == "Paris<|im_end|>"
    assert empty_answers(json.dumps({"messages": [{"role": "assistant", "content": "", "weight": 0}]})) == 0
    args = json.loads(docs["chat"][1])["messages"][1]["tool_calls"][0]["function"]["arguments"]
    assert args == {"city": "Paris"}
    tools = with_template(hf_family["work"] / "tokenizer", TOOLS, tmp_path / "tools")
    assert '"arguments": {"city": "Paris"}' in _targets(tools, docs["chat"][1])
    for chat, because in zip(docs["chat"][2:], why):
        with pytest.raises(BadRow, match=rf"^data: chat {path} row \d: {re.escape(because)}"):
            render(tok, chat)
    more = _bytes(tmp_path / "more.jsonl", _jsonl(message_rows(20)))
    cfg = DataConfig(paths=[path, more], seq_len=64, val_fraction=0.3, bad_rows="skip",
                     tokenizer={"path": hf_family["teacher"]})
    manifest = prepare_data(cfg, tmp_path / "run").manifest
    # the bad rows, and the tool call the run's template (ChatML, no tool calls) cannot show
    assert sum(split["chat_rows_packing"]["bad_rows"] for split in manifest["splits"].values()) == len(bad) + 1


def test_a_dataset_repositorys_card_and_test_split_are_left_out_of_a_walk(tmp_path):
    """A dataset as the hub lays it out (README.md with YAML front matter, data/train-*.parquet,
    data/test-*.parquet), given as a folder, trained on its card as plain text and on its test
    split, unsaid.  Both are left out of a walk or a glob, said; named, they are read."""
    repo = tmp_path / "hubdir"
    _bytes(repo / "README.md", b"---\nlicense: mit\n---\n# My dataset card\nThis dataset is great.\n")
    datasets.Dataset.from_list(text_rows("train ", n=30)).to_parquet(str(_bytes(repo / "data" / "train-00000-of-00001.parquet", b"")))
    datasets.Dataset.from_list(text_rows("test ", n=10)).to_parquet(str(repo / "data" / "test-00000-of-00001.parquet"))
    _bytes(repo / "notes" / "README.md", b"# Plain notes, no front matter: a document like any other\n")
    _bytes(repo / "site" / "README.md", b"---\ntitle: Home\nlayout: page\n---\n# A Jekyll page: a document too\n")
    _bytes(repo / "sub" / "README.md", b"\xef\xbb\xbf---\nlicense: mit\n---\nA card saved with a byte-order mark\n")
    datasets.Dataset.from_list(text_rows("val ", n=5)).to_parquet(str(_bytes(repo / "more" / "validation" / "0.parquet", b"")))
    for paths in ([repo], [tmp_path / "hubdir" / "**" / "*"]):
        said: list[str] = []
        docs = load_documents(DataConfig(paths=paths), log=said.append)
        assert sorted(t.split(" ")[0] for t in docs["text"]) == ["#", "---\ntitle:"] + ["train"] * 30, paths
        assert any(line.startswith("[data] left out 4 file(s) a dataset repository keeps apart") for line in said), said
    named = load_documents(DataConfig(paths=[repo / "data" / "test-00000-of-00001.parquet"]))
    assert len(named) == 10
    assert len(load_documents(DataConfig(paths=[repo / "data" / "test-*.parquet"]))) == 10  # a glob that names them
    assert len(load_documents(DataConfig(paths=[repo / "data" / "test*"]))) == 10
    assert len(load_documents(DataConfig(paths=[repo / "more" / "validation" / "*.parquet"]))) == 5
    for only in (repo / "more", repo / "data" / "*-of-*.parquet"):  # nothing else there: said, not "no readable files"
        pattern = only if only.name.startswith("*") else None
        if pattern is not None:
            (repo / "data" / "train-00000-of-00001.parquet").rename(repo / "train.parquet")
        with pytest.raises(UserError, match=r"keeps apart from its training data \(e.g. .*(validation|test-)"):
            load_documents(DataConfig(paths=[only]))


def test_prompts_for_eval_and_on_policy_join_text_parts_as_training_does(hf_family, tmp_path):
    """Packing joined OpenAI's content parts where the template cannot read them, but the prompts
    `distill eval` and on-policy sampling answer were rendered from the raw turns: the prompt held
    "[{'type': 'text', ...}]" and the reference answer too, so exact match could never hold."""
    from distill.prompts import prompt_of

    row = {"messages": [{"role": "user", "content": [{"type": "text", "text": "Part 8"}, {"type": "text", "text": "more"}]},
                        {"role": "assistant", "content": [{"type": "text", "text": "Answer 8"}]}]}
    chat = load_documents(DataConfig(paths=[_bytes(tmp_path / "p.jsonl", _jsonl([row]))]))["chat"][0]
    tok = hf_family["tokenizer"]
    prompt = prompt_of(tok, chat)
    assert tok.decode(prompt.ids) == "<|im_start|>user\nPart 8\nmore<|im_end|>\n<|im_start|>assistant\n"
    assert prompt.reference == "Answer 8"


def test_preference_tables_are_refused_with_advice_that_works(tmp_path):
    """TRL's unpaired preference rows (prompt, completion, label) trained the rejected completions
    as good ones, unsaid; paired ones (prompt, chosen, rejected) were told to set data.text_field."""
    for label in (lambda i: i % 2 == 0, lambda i: i % 2):  # booleans, or integers 0 and 1
        kto = [{"prompt": f"q {i}?", "completion": f"a {i}", "label": label(i)} for i in range(6)]
        with pytest.raises(UserError, match=r"kto.jsonl: a true/false 'label' column beside prompt and completion .* "
                                            r"keep the rows labelled true and drop the column$"):
            load_documents(DataConfig(paths=[_bytes(tmp_path / "kto.jsonl", _jsonl(kto))]))
    graded = [{"prompt": f"q {i}?", "completion": f"a {i}", "label": i} for i in range(6)]  # another label: read
    assert len(load_documents(DataConfig(paths=[_bytes(tmp_path / "graded.jsonl", _jsonl(graded))]))) == 6
    pairs = [{"prompt": f"q {i}?", "chosen": f"good {i}", "rejected": f"bad {i}"} for i in range(6)]
    with pytest.raises(UserError, match=r"pairs.jsonl: no column 'text', .* preference data trains no distillation: to "
                                        r"learn its preferred answers, save its 'chosen' column as 'completion'"):
        load_documents(DataConfig(paths=[_bytes(tmp_path / "pairs.jsonl", _jsonl(pairs))]))
    said: list[str] = []  # met by a walk: skipped, the line says why
    _bytes(tmp_path / "walk" / "rows.jsonl", _jsonl(text_rows(n=4)))
    _bytes(tmp_path / "walk" / "pairs.jsonl", _jsonl(pairs))
    load_documents(DataConfig(paths=[tmp_path / "walk"]), log=said.append)
    assert any("skipped 1 table file(s)" in line and "preference data trains no distillation" in line for line in said)


def test_refused_tables_and_bad_turns_through_the_cli(hf_family, tmp_path):
    """Through `distill prepare`: a preference table is one line and exit 2; a turn that is no
    object (before: an AttributeError traceback, exit 1) stops the preparation naming its row,
    exit 2, and data.bad_rows: skip prepares the rest."""
    from tests.conftest import run_cli

    pairs = _bytes(tmp_path / "pairs.jsonl", _jsonl([{"prompt": f"q {i}?", "chosen": "good", "rejected": "bad"}
                                                     for i in range(8)]))
    rows = message_rows(30)
    rows[4] = {"messages": ["hello", {"role": "assistant", "content": "x"}]}
    chats = _bytes(tmp_path / "chats.jsonl", _jsonl(rows))
    cfg = tmp_path / "p.yaml"
    cfg.write_text(yaml.safe_dump({"out_dir": str(tmp_path / "out"), "data": {"paths": [str(pairs)], "seq_len": 48},
                                   "teacher": {"source": "checkpoint", "path": str(hf_family["teacher"])},
                                   "students": [{"name": "s", "model": {"preset": "dense"}}]}))
    r = run_cli("prepare", "-c", str(cfg), "--quiet")
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert re.search(r"^error: .*pairs.jsonl: no column 'text', .* preference data trains no distillation", r.stderr, re.M)
    r = run_cli("prepare", "-c", str(cfg), "--quiet", "--set", f"data.paths=[{chats}]")
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert re.search(rf"^error: data: chat {re.escape(str(chats))} row 5: turn 1 is a str, not an object", r.stderr, re.M)
    r = run_cli("prepare", "-c", str(cfg), "--quiet", "--set", f"data.paths=[{chats}]", "--set", "data.bad_rows=skip")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "[data] 1 of 30 chat rows were skipped (data.bad_rows: skip)" in r.stderr, r.stderr
