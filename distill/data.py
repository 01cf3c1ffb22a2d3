"""Corpus -> tokenizer -> packed token blocks, on Hugging Face `datasets`.

Documents are split into train/validation by a hash of their content (stable when files
are added or reordered), tokenised and packed into blocks of `seq_len + 1` tokens, so each
of the `seq_len` input positions has a next-token label (distill/packing.py: plain text
joined with EOS after each document and cut, chat rows whole with their target masks from
distill/chat.py; under data.packing: documents, the default, each row its own context).
Every artefact made from the data records `fingerprint`.
"""
from __future__ import annotations

import atexit
import contextlib
import fnmatch
import hashlib
import itertools
import json
import logging
import re
import shutil
import sys
import sysconfig
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from common.errors import UserError
from common.fsutil import describe_os_error, human_bytes, waiting_lock, write_error_in
from distill.blocks import Blocks, open_blocks, unusable
from distill.chat import CHAT_FORMAT, CHAT_READER, PLAIN, PackCounts, as_documents, cut_share, instruction_shape, table_kind
from distill.config import DataConfig
from distill.layout import RunLayout, has_tokenizer
from distill.packing import auto_num_proc, build_blocks, children_die_with_this_process, signals_end_pools

# `datasets` (with pyarrow and pandas, about 1.5 s) is imported where documents are read, not
# by every command that imports this module to open blocks already prepared.
if TYPE_CHECKING:
    import datasets

EOS = "<|endoftext|>"
TEXT_SUFFIXES = {".txt", ".py", ".md", ".rst", ".text"}
JSON_SUFFIXES = {".jsonl", ".json"}
PARQUET_SUFFIXES = {".parquet"}
ARROW_SUFFIXES = {".arrow"}
# jsonl/json compressed as `datasets` reads them (fsspec infers the codec from the name; .zst needs `zstandard`)
COMPRESSED_SUFFIXES = {".gz", ".bz2", ".zst", ".xz"}
ACCEPTED = (".txt/.py/.md/.rst/.text files (one document each), .jsonl/.json (also .gz/.bz2/.zst/.xz), .parquet "
            "or .arrow tables, or a datasets.save_to_disk dir")
CHAT_SHAPES = ("chat columns 'messages', 'prompt' + 'completion' (strings, or both lists of turns) or "
               "'conversations' (ShareGPT), or instruction columns ('instruction' + 'output', Alpaca; 'instruction' + "
               "'response', Dolly; 'question' + 'response', OpenOrca)")
TABLE_SHAPES = f"a 'text' column (data.text_field), or {CHAT_SHAPES}"
SKIP_DIRS = {"site-packages", "test", "tests", "idle_test", "__pycache__"}


@dataclass
class PackedData:
    """Token blocks, (N, seq_len + 1) each, read from disk by index (distill/blocks.py), plus
    what made them.  `train[ids]` / `val[a:b]` are int64 tensors, non-targets -(id + 1)."""

    train: Blocks
    val: Blocks
    tokenizer: object  # transformers.PreTrainedTokenizerFast
    fingerprint: str
    tokenizer_hash: str

    manifest: dict | None = None

    @property
    def seq_len(self) -> int:
        return self.train.shape[1] - 1

    @property
    def content(self) -> str | None:
        """What the blocks hold (distill/blocks.py content_digest), recorded by caches and
        checkpoints beside the fingerprint, which a same-size edit of a large file can miss;
        None for data prepared before the manifest recorded it."""
        return (self.manifest or {}).get("content")


# ----------------------------------------------------------------------------- corpus


def stdlib_dir() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


GLOB_CHARS = set("*?[")


def file_format(path: Path) -> str | None:
    """"text", "json", "parquet" or "arrow" by the file's name; None for any other file."""
    suffix = path.suffix
    if suffix in COMPRESSED_SUFFIXES:
        return "json" if Path(path.stem).suffix in JSON_SUFFIXES else None
    if suffix in TEXT_SUFFIXES:
        return "text"
    if suffix in JSON_SUFFIXES:
        return "json"
    if suffix in PARQUET_SUFFIXES:
        return "parquet"
    if suffix in ARROW_SUFFIXES:
        return "arrow"
    return None


def is_saved_dataset(path: Path) -> bool:
    """A `datasets.save_to_disk` dir: a Dataset's (dataset_info.json + state.json) or a DatasetDict's."""
    return path.is_dir() and (((path / "dataset_info.json").is_file() and (path / "state.json").is_file())
                              or (path / "dataset_dict.json").is_file())


def is_glob(path: Path | str) -> bool:
    return bool(GLOB_CHARS.intersection(str(path)))


def excluded(path: Path, root: Path, patterns: list[str]) -> bool:
    """A pattern with a `/` matches the path below `root` (`*` crosses folders, as in
    `docs/*`); one without matches the file name or any folder name (`*.json`, `tests`)."""
    rel = path.relative_to(root).as_posix() if path.is_relative_to(root) else path.as_posix()
    names = path.relative_to(root).parts if path.is_relative_to(root) else (path.name,)
    return any(fnmatch.fnmatchcase(rel, pat.strip("/")) if "/" in pat.strip("/")
               else any(fnmatch.fnmatchcase(n, pat) for n in names) for pat in patterns)


def _glob_root(pattern: Path) -> Path:
    """The folder part of a glob before its first wildcard: `repo/**/*.py` -> `repo`."""
    parts = pattern.parts
    cut = next(i for i, part in enumerate(parts) if is_glob(part))
    return Path(*parts[:cut]) if cut else Path(".")


def _walk(root: Path) -> list[Path]:
    """The readable files below `root`; a saved dataset met on the way counts as one input
    (its .arrow and .json files are not read one by one)."""
    def skipped(p: Path) -> bool:
        return bool(SKIP_DIRS.intersection(p.relative_to(root).parts[:-1]))

    files = [f for f in root.rglob("*") if f.is_file() and not skipped(f)]
    saved = {f.parent for f in files if f.name in ("state.json", "dataset_dict.json") and is_saved_dataset(f.parent)}
    saved = {d for d in saved if not any(o != d and d.is_relative_to(o) for o in saved)}  # a DatasetDict's splits
    return sorted(saved) + [f for f in files if file_format(f) and not any(f.is_relative_to(d) for d in saved)]


# What a dataset repository (as the Hugging Face hub lays one out) keeps apart from its training
# data: its card (README.md opening with a dataset card's YAML front matter) and its test /
# validation splits' tables (test-00000-of-00001.parquet, validation.jsonl, dev.json, ...,
# data/validation/*).  A folder walk or a glob leaves them out, said; named in data.paths, or
# by a glob that names them, they are read.
HELD_APART_SPLIT = r"(test|testing|eval|evaluation|validation|valid|val|dev)"
HELD_APART_TABLE = re.compile(HELD_APART_SPLIT + r"([-_.]|\d)", re.IGNORECASE)  # a file: test-00000-of-00001.parquet
HELD_APART_DIR = re.compile(HELD_APART_SPLIT, re.IGNORECASE)  # a folder: data/validation/0000.parquet


def _names_a_split(pattern: Path) -> bool:
    """A glob whose own words name a split's files (test-*.parquet, test*.jsonl, validation/*):
    what it matches is read."""
    literal = re.split(r"[*?\[]", pattern.name, maxsplit=1)[0]
    return bool(literal and (HELD_APART_TABLE.match(literal) or HELD_APART_DIR.fullmatch(literal))) or \
        any(HELD_APART_DIR.fullmatch(d) for d in pattern.parts[:-1])


# The keys of a dataset card's YAML front matter (not a Jekyll or Hugo page's: title, layout).
CARD_KEYS = re.compile(rb"^(dataset_info|configs|task_categories|task_ids|size_categories|pretty_name|license|"
                       rb"language|annotations_creators|source_datasets|multilinguality):", re.M)


def held_apart(f: Path, root: Path | None = None) -> bool:
    """A dataset repository's card, or a table of its test / validation split: by its name
    (HELD_APART_TABLE), or a folder between `root` (where the walk or glob started) and it."""
    if f.name.lower() == "readme.md":
        with contextlib.suppress(OSError), open(f, "rb") as fh:
            head = fh.read(8192).removeprefix(b"\xef\xbb\xbf")
            matter = head.split(b"\n---", 1)[0] if head.startswith(b"---") else b""
            return CARD_KEYS.search(matter) is not None
        return False
    if file_format(f) not in ("json", "parquet", "arrow"):
        return False
    folders = f.parent.relative_to(root).parts if root is not None and f.is_relative_to(root) else ()
    return HELD_APART_TABLE.match(f.name) is not None or any(HELD_APART_DIR.fullmatch(d) for d in folders)


def discover(cfg: DataConfig, held: list[Path] | None = None) -> dict[Path, bool]:
    """Every input file (or saved-dataset dir) -> whether the user named it explicitly.

    A file found by walking a folder or matching a glob is `False`: unreadable or
    text-less tables among those are skipped with a count, not fatal (a source tree
    has JSON configs next to its code); a file named in `data.paths` must read.  Such a file
    that a dataset repository keeps apart (`held_apart`) is left out, and added to `held`."""
    found: dict[Path, bool] = {}
    apart: list[Path] = []
    stdlib = stdlib_dir()
    if cfg.stdlib:  # the stdlib's Python sources only (no bundled .txt data, tests or site-packages)
        found.update({f: False for f in stdlib.rglob("*.py")
                      if not SKIP_DIRS.intersection(f.relative_to(stdlib).parts[:-1])})
    for i, root in enumerate(cfg.paths):
        if is_glob(root):
            base = _glob_root(root)
            pattern = str(root.relative_to(base)) if root.is_absolute() or base != Path(".") else str(root)
            matches = [f for f in base.glob(pattern) if (is_saved_dataset(f) or f.is_file() and file_format(f))
                       and not excluded(f, base, cfg.exclude)]
            here = [] if _names_a_split(Path(pattern)) else [f for f in matches if held_apart(f, base)]
            matches = [f for f in matches if f not in here]
            apart += here
            if not matches:
                raise UserError(f"data.paths[{i}]: the pattern {root} matches none of {ACCEPTED}"
                                + (f" but what a dataset repository keeps apart from its training data (e.g. "
                                   f"{here[0]}: its card, or a test / validation split); name those files, or a "
                                   f"pattern that names them (test-*.parquet)" if here
                                   else "; check it (`**` spans folders: repo/**/*.py)"))
            found.update({f: False for f in matches if f not in found})
        elif not root.exists():
            raise UserError(f"data.paths[{i}]: {root} does not exist")
        elif root.is_file():
            if file_format(root) is None:
                raise UserError(f"data.paths[{i}]: {root} is not a format data.paths reads; it takes {ACCEPTED}")
            found[root] = True
        elif is_saved_dataset(root):
            found[root] = True  # a datasets.save_to_disk dir, read whole
        else:
            walked = [f for f in _walk(root) if not excluded(f, root, cfg.exclude) and f not in found]
            here = [f for f in walked if held_apart(f, root)]
            if walked and len(here) == len(walked):
                raise UserError(f"data.paths[{i}]: {root} holds only what a dataset repository keeps apart from its "
                                f"training data (e.g. {here[0]}: its card, or a test / validation split); name those "
                                f"files, or a pattern that names them (test-*.parquet)")
            apart += here
            found.update({f: False for f in walked if f not in here})
    apart = [f for f in apart if f not in found]  # found by another path too (named, say): read
    if held is not None:
        held += sorted(set(apart))
    if not found:
        raise UserError(f"data: no readable files under {', '.join(map(str, cfg.paths or [stdlib]))} "
                        f"(looked for {ACCEPTED}; data.exclude: {cfg.exclude or 'none'})")
    # One file under two spellings (data/a.jsonl and data/../data/a.jsonl, a link) is read once,
    # under its shortest spelling; named explicitly if either spelling was.
    unique: dict[Path, Path] = {}
    for f in sorted(found, key=lambda f: (len(f.parts), str(f))):
        first = unique.setdefault(f.resolve(), f)
        found[first] = found[first] or found[f]
    return {f: found[f] for f in sorted(unique.values())}


def corpus_files(cfg: DataConfig) -> list[Path]:
    """Every input file, sorted; the stdlib's own sources when `cfg.stdlib`."""
    return list(discover(cfg))


def _read_text_file(path: Path, named: bool = True) -> str:
    """The file's text; a leading byte-order mark (Windows editors write one) is not part of it.
    named: the file is in data.paths itself, not met by a folder walk or a glob."""
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise _not_utf8(path, f"bad byte at offset {e.start}", named) from None


def _stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def _reason(e: BaseException) -> str:
    """The innermost cause of a library error, in one line (datasets wraps parse errors)."""
    for _ in range(8):
        inner = e.__cause__  # `raise ... from`; an implicit __context__ is often a fallback's own failure
        if inner is None or not str(inner).strip():
            break
        e = inner
    lines = str(e).strip().splitlines()
    return f"{type(e).__name__}: {lines[0][:200] if lines else ''}"


def _quietly(load, *args, **kwargs):
    """datasets logs a parse error (as ERROR) before raising it; the raised one is said once, by us."""
    logger = logging.getLogger("datasets")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        return load(*args, **kwargs)
    finally:
        logger.setLevel(level)


def _read_table(f: Path, work: Path) -> datasets.Dataset:
    """One table: a saved dataset dir (a DatasetDict's "train" split, or its only split) or a
    json/jsonl (maybe compressed), parquet or arrow file.  work: where datasets converts a file
    to Arrow; a fresh dir, so an edited file whose mtime did not move is read again (datasets'
    own cache knows files by path and mtime, and gave such a file's old rows)."""
    import datasets

    if f.is_dir():
        try:
            ds = _quietly(datasets.load_from_disk, str(f))
        except Exception as e:
            raise UserError(f"{f}: could not be read as a datasets.save_to_disk dir ({_reason(e)})") from None
        if not isinstance(ds, datasets.DatasetDict):
            return ds
        if "train" in ds or len(ds) == 1:
            return ds["train"] if "train" in ds else next(iter(ds.values()))
        raise UserError(f"{f}: a saved DatasetDict with splits {', '.join(ds)} and none named 'train'; save the "
                        f"split to train on by itself (ds[NAME].save_to_disk(...)) and point data.paths at it")
    builder = file_format(f)
    if f.stat().st_size == 0 or (builder == "json" and not _has_a_row(f)):
        what = "empty" if f.stat().st_size == 0 else "blank (whitespace only)"
        raise UserError(f"{f}: the file is {what}; remove it from data.paths (or leave it out with data.exclude)")
    try:
        return _quietly(datasets.load_dataset, builder, data_files=str(f), split="train", cache_dir=str(work))
    except Exception as e:  # datasets wraps parse errors in many types
        full = write_error_in(e)
        if full is not None:  # the disk it converts to Arrow on (OUT/data) is full, not the file unreadable
            raise UserError(describe_os_error(full, work)) from None
        bad_line = _first_bad_json_line(f) if builder == "json" else None
        raise UserError(bad_line or f"{f}: could not be read as {builder} ({_reason(e)})") from None


_OPENERS = {".gz": "gzip", ".bz2": "bz2", ".xz": "lzma"}  # (.zst needs a package the stdlib lacks)


def _open_bytes(f: Path):
    """`f` for reading, decompressed by its suffix (.gz, .bz2, .xz)."""
    import importlib

    opener = _OPENERS.get(f.suffix)
    return importlib.import_module(opener).open(f, "rb") if opener else open(f, "rb")


def _one_json_document(f: Path) -> bool:
    """Whether the whole file parses as one JSON value."""
    try:
        with _open_bytes(f) as whole:
            json.load(whole)
    except ValueError:
        return False
    return True


def _first_non_utf8_line(f: Path) -> str | None:
    """'line N, byte B' of the first byte that is not UTF-8 in `f` (counted from 1), or None."""
    with _open_bytes(f) as fh:
        for number, raw in enumerate(fh, start=1):
            try:
                raw.decode("utf-8")
            except UnicodeDecodeError as e:
                return f"line {number}, byte {e.start + 1}"
    return None


def _has_a_row(f: Path) -> bool:
    """Whether a JSON-lines file holds anything but whitespace (datasets' error for one that does
    not names no file: 'Instruction "train" corresponds to no data!')."""
    with _open_bytes(f) as fh:
        return any(block.strip() for block in iter(lambda: fh.read(1 << 20), b""))


def _first_bad_json_line(f: Path) -> str | None:
    """For a JSON-lines file datasets could not read: where the first line that is not one JSON
    object is, counted from 1 (datasets' own error counts rows from 0 within a read chunk, which
    points nowhere in a big file).  None when every line parses, or the file is one JSON document."""
    if f.suffix == ".zst":
        return None
    with _open_bytes(f) as fh:
        first = fh.read(1 << 16).lstrip()[:1]
        if first == b"[":
            return None  # a JSON array: one document, not lines
        fh.seek(0)
        for number, raw in enumerate(fh, start=1):
            if not raw.strip():
                continue
            try:
                row = json.loads(raw)
            except ValueError as e:  # UnicodeDecodeError is one too
                if number == 1 and _one_json_document(f):
                    return None  # a pretty-printed JSON document, not lines: datasets' own reason stands
                why = (f"{e.msg.removesuffix(' at')} at column {e.pos + 1}" if isinstance(e, json.JSONDecodeError)
                       else str(e)[:120])  # ("Invalid control character at" ends in "at" already)
                return f"{f}: line {number} is not valid JSON ({why}); fix or remove that line"
            if not isinstance(row, dict):
                return f"{f}: line {number} is a JSON {type(row).__name__}, not an object with named columns"
    return None


def _is_str(feature) -> bool:
    import datasets

    return isinstance(feature, datasets.Value) and feature.dtype in ("string", "large_string")


def _true_false(ds: datasets.Dataset, column: str) -> bool:
    """Whether `column` holds true/false: booleans, or integers 0 and 1 only (read: a scan)."""
    feature = ds.features.get(column)
    dtype = getattr(feature, "dtype", None)
    if dtype == "bool":
        return True
    if dtype not in ("int8", "int16", "int32", "int64", "uint8"):
        return False
    return _first_row(ds, column, lambda v: v not in (0, 1, None)) is None


def _all_null(feature) -> bool:
    """A column with no value in any row (Alpaca's `input` in a file where none has one)."""
    return getattr(feature, "dtype", None) == "null"


def _first_row(ds: datasets.Dataset, column: str, bad) -> tuple[int, object] | None:
    """(row number from 1, value) of the first row whose `column` value is `bad(value)`, or None.
    It reads the column (up to that row)."""
    values = (v for batch in ds.select_columns([column]).iter(batch_size=1024) for v in batch[column])
    return next(((n, v) for n, v in enumerate(values, start=1) if bad(v)), None)


def _column_problem(ds: datasets.Dataset, kind: str, text_field: str) -> str | None:
    """Why a table's columns of the detected `kind` cannot be read as documents; None when they can."""
    feats = ds.features

    def turns(column: str, key: str) -> bool:  # lists of turns: structs with a `key` (tool-call turns have no
        ft = feats[column]  # content), or free-form JSON (rows whose turns differ in fields); the template judges the rest
        turn = ft[0] if isinstance(ft, list) and ft else getattr(ft, "feature", None)  # List/Sequence, or a 1-list
        return isinstance(turn, dict) and key in turn or type(turn).__name__ == "Json"

    if kind == "text":
        names = [text_field]
    elif kind == "prompt":  # strings, or (TRL's conversational shape) both lists of {role, content} turns
        if turns("prompt", "role") and turns("completion", "role"):
            return None
        names = ["prompt", "completion"]
    elif kind == "instruction":  # Alpaca without `input`, Dolly without `context` (or null in every row): the others
        ask, more, answer = instruction_shape(ds.column_names)
        names = [ask, answer] + ([more] if more in feats and not _all_null(feats[more]) else [])
    else:
        column, keys, shape = ("messages", ("role",), "{role, content}") if kind == "messages" else \
            ("conversations" if "conversations" in feats else "conversation", ("from", "role"),
             "ShareGPT {from, value} (or {role, content})")
        if any(turns(column, key) for key in keys):
            return None
        # Not lists of turns: name the first row that is not one.
        bad = _first_row(ds, column, lambda v: not (isinstance(v, list) and all(isinstance(t, dict) for t in v)))
        if bad is not None:
            return f"row {bad[0]}'s {column!r} is a {type(bad[1]).__name__}, not a list of {shape} turns"
        return f"column {column!r} holds {feats[column]}, not lists of {shape} turns"
    for name in names:
        if not _is_str(feats[name]):
            # Name the first row whose value is neither a string nor empty: datasets reads a column of
            # mixed strings and numbers as `Json`, which says nothing of where.
            bad = _first_row(ds, name, lambda v: v is not None and not isinstance(v, str))
            if bad is not None:
                return f"row {bad[0]}'s {name!r} is {str(bad[1])[:40]} ({type(bad[1]).__name__}), not a string"
            return f"column {name!r} holds {feats[name]}, not strings"
    return None


def doc_features() -> datasets.Features:
    """Every document table's schema: `text` (the words) and `chat` (a chat row as JSON, or "")."""
    import datasets

    return datasets.Features({"text": datasets.Value("string"), "chat": datasets.Value("string")})


def _plain_documents(files: list[Path], named: list[bool]):
    """Generator of the plain-text files' rows (read one at a time, never all held)."""
    for f, by_name in zip(files, named):
        yield {"text": _read_text_file(f, by_name), "chat": PLAIN}


def _plain_dataset(files: dict[Path, bool], cache_dir: Path | None) -> datasets.Dataset:
    """The plain-text files as an on-disk Arrow table, written as they are read (memory stays
    flat in the corpus).  Keyed by each file's path, size and mtime: an edited file is reread."""
    import datasets

    key = hashlib.sha256()
    for f in files:
        st = f.stat()
        key.update(f"{f}\0{st.st_size}\0{st.st_mtime_ns}\0".encode())
    try:
        return _quietly(datasets.Dataset.from_generator, _plain_documents, features=doc_features(),
                        gen_kwargs={"files": list(files), "named": list(files.values())},
                        cache_dir=None if cache_dir is None else str(cache_dir),
                        fingerprint=key.hexdigest()[:32])
    except Exception as e:  # datasets wraps the generator's error (a file that is not UTF-8)
        inner: BaseException | None = e
        while inner is not None and not isinstance(inner, UserError):
            inner = inner.__cause__ or inner.__context__
        raise (inner or e) from None


@contextlib.contextmanager
def documents_under(cfg: DataConfig, where: Path):
    """`load_documents` with its Arrow tables in a temp dir under `where` (the run's data dir),
    removed on leaving: read what you need inside (training's and eval's prompt lists)."""
    where.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=where, prefix=".documents-") as work:
        yield load_documents(cfg, cache_dir=Path(work))


def load_documents(cfg: DataConfig, log=None, cache_dir: Path | None = None) -> datasets.Dataset:
    """All documents as a `datasets.Dataset`: `text` (the words) and `chat` (a chat or
    prompt/completion row as JSON, distill/chat.py; "" for plain text).

    log: called with one line when files found by a folder walk or a glob were skipped, and
    with the other `[data]` notes (None: not said).
    cache_dir: where the documents' Arrow tables go (plain-text files', tables converted to
    Arrow, and every transform of them: never beside a saved dataset's own files, which would
    change the data's fingerprint); a temp dir removed at exit when None."""
    import datasets

    datasets.disable_progress_bars()  # our own progress bars instead
    log = log or (lambda line: None)
    if cache_dir is None:
        cache_dir = Path(tempfile.mkdtemp(prefix="codistill-documents-"))
        atexit.register(shutil.rmtree, cache_dir, ignore_errors=True)
    cache_dir.mkdir(parents=True, exist_ok=True)
    steps = itertools.count()

    def into_work(name: str) -> dict:  # a transform's output file under cache_dir, always recomputed
        return {"cache_file_name": str(cache_dir / f"{name}-{next(steps)}.arrow"), "load_from_cache_file": False}

    features = doc_features()
    parts: list[datasets.Dataset] = []
    plain: dict[Path, bool] = {}  # a plain-text file: named in data.paths itself
    skipped: list[str] = []  # why each table met by a walk or a glob was not read
    held: list[Path] = []
    for f, named in discover(cfg, held).items():
        if f.is_file() and file_format(f) == "text":
            plain[f] = named
            continue
        try:
            part = _table_documents(f, named, cfg, log, cache_dir / "tables", into_work)
        except UserError as e:
            if named or isinstance(e, NotUtf8):  # text in another encoding: never skipped unsaid
                raise
            skipped.append(str(e))  # e.g. a package's JSON config met while walking its source tree
            continue
        # one schema for every part: a `large_string` column (polars' parquet, some arrow files) would not concatenate
        parts.append(part if part.features == features else part.cast(features))
    if held:
        log(f"[data] left out {len(held)} file(s) a dataset repository keeps apart from its training data (its card, "
            f"README.md, and tables of its test / validation splits), e.g. {held[0]}; name a file in data.paths to "
            f"read it")
    if skipped:
        log(f"[data] skipped {len(skipped)} table file(s) with no {cfg.text_field!r} or chat column, or "
            f"unreadable, e.g. {skipped[0]}; add them to data.exclude to silence this")
    if not parts and not plain:
        raise UserError(f"data: none of the {len(skipped)} table files found can be read, e.g. {skipped[0]}")
    procs = auto_num_proc(cfg.num_proc)
    tables = datasets.concatenate_datasets(parts) if len(parts) > 1 else parts[0] if parts else None
    if tables is not None:  # a table's empty row is worth a line (an empty file in a source tree is not)
        read, tables = len(tables), _drop_empty(tables, procs, cfg.shard_documents, into_work("non-empty"))
        if len(tables) < read:
            log(f"[data] skipped {read - len(tables):,} of {read:,} table rows with nothing to learn from: empty "
                f"or null text, or no (null) messages / prompt + completion")
    parts = [_drop_empty(_plain_dataset(plain, cache_dir), procs, cfg.shard_documents, into_work("non-empty"))] \
        if plain else []
    parts += [tables] if tables is not None else []
    docs = datasets.concatenate_datasets(parts) if len(parts) > 1 else parts[0]
    if cfg.stdlib and cfg.paths:
        log("[data] data.stdlib: true adds this Python's standard library sources to data.paths' files; "
            "set data.stdlib: false to train on yours alone")
    if cfg.max_documents is not None and len(docs) > cfg.max_documents:
        log(f"[data] data.max_documents {cfg.max_documents:,}: using the first {cfg.max_documents:,} of "
            f"{len(docs):,} documents (plain-text files first, then tables, each in path order); "
            f"set it to null to use them all")
        docs = docs.select(range(cfg.max_documents))
    if len(docs) == 0:
        raise UserError("data: the corpus has no non-empty documents; check data.paths")
    return docs


def _table_documents(f: Path, named: bool, cfg: DataConfig, log, tables: Path, into_work) -> datasets.Dataset:
    """One table file's documents (`as_documents`); a UserError names what it lacks.
    named: in data.paths itself.  tables: where a table converted to Arrow goes; into_work: a
    transform's output keywords."""
    ds = _read_table(f, tables)
    kind = table_kind(ds.column_names, cfg.text_field)
    if kind is None:
        preference = "chosen" in ds.column_names and "rejected" in ds.column_names
        raise UserError(f"{f}: no column {cfg.text_field!r}, nor {CHAT_SHAPES} (columns: "
                        f"{', '.join(ds.column_names)}); " + (
                            "preference data trains no distillation: to learn its preferred answers, save its "
                            "'chosen' column as 'completion' beside 'prompt' (strings, or both lists of turns), or as "
                            "'messages' where it holds the whole conversation" if preference else
                            "set data.text_field to the column that holds the text, or leave the file out with "
                            "data.exclude"))
    problem = _column_problem(ds, kind, cfg.text_field)
    if problem is not None:
        raise UserError(f"{f}: {problem}; a table needs {TABLE_SHAPES}")
    if kind == "prompt" and _true_false(ds, "label"):
        raise UserError(f"{f}: a true/false 'label' column beside prompt and completion (TRL's unpaired preference "
                        f"data: false marks a rejected completion, which distillation would learn as a good one); "
                        f"keep the rows labelled true and drop the column")
    _note_unread_columns(f, ds.column_names, kind, cfg.text_field, log)
    try:
        return as_documents(ds, kind, cfg.text_field, origin=str(f), work=into_work("documents"))
    except UnicodeDecodeError as e:  # a json file in another encoding; datasets reads it lazily
        raise _not_utf8(f, _first_non_utf8_line(f) or f"bad byte at offset {e.start} of a value", named) from None


def _note_unread_columns(f: Path, columns: list[str], kind: str, text_field: str, log) -> None:
    """A line for columns a user may expect read that are not: chat columns beside the text
    column that is read."""
    if kind == "text" and table_kind([c for c in columns if c != text_field], text_field) is not None:
        log(f"[data] {f}: has a {text_field!r} column and chat columns; reading {text_field!r} as plain "
            f"text (every token a target, rows without it skipped); to train on the chat rows with the loss on "
            f"the assistant's tokens, save the table without {text_field!r}")


def _drop_empty(ds: datasets.Dataset, procs: int, shard_documents: int, work: dict) -> datasets.Dataset:
    """The documents with text in them.  Past one shard of documents the pass runs in worker
    processes: reading every text maps the whole Arrow file's pages into whoever reads it, and
    this process would keep them (its RSS grew by the corpus's size, bench/data.py)."""
    workers = procs if len(ds) > shard_documents and procs > 1 else None
    with signals_end_pools(workers):
        return ds.filter(lambda b: [bool(t and t.strip()) for t in b["text"]], batched=True, num_proc=workers, **work)


class NotUtf8(UserError):
    """A file that is not UTF-8."""


def _not_utf8(f: Path, where: str, named: bool) -> UserError:
    """The line for a file that is not UTF-8 (where: the first bad byte)."""
    drop = "remove it from data.paths" if named else "leave it out with data.exclude"
    return NotUtf8(f"{f}: not UTF-8 ({where}); convert it (e.g. `iconv -t utf-8`) or {drop}")


# ----------------------------------------------------------------------------- tokenizer


def train_tokenizer(docs: datasets.Dataset, vocab_size: int, out_dir: Path):
    """Byte-level BPE on the corpus, saved as a PreTrainedTokenizerFast (lossless round trip)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    # add_prefix_space=False and no normaliser keep decode(encode(x)) == x exactly.
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=[EOS], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator((b["text"] for b in docs.iter(batch_size=256)), trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, bos_token=EOS,
                                   unk_token=None, clean_up_tokenization_spaces=False)
    fast.model_max_length = 1 << 30
    fast.save_pretrained(str(out_dir))
    return fast


def load_tokenizer(path: Path):
    from transformers import AutoTokenizer

    if not has_tokenizer(path):
        raise UserError(f"tokenizer dir {path} has no tokenizer.json or tokenizer_config.json; "
                        f"point data.tokenizer.path at a saved Hugging Face tokenizer")
    try:
        tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except Exception as e:
        raise UserError(f"tokenizer dir {path} could not be loaded ({type(e).__name__}: "
                        f"{str(e).splitlines()[0][:200]})") from None
    if tok.eos_token_id is None:
        raise UserError(f"tokenizer at {path} has no eos_token; documents need a separator")
    return tok


def tokenizer_hash(tok) -> str:
    """Hash of the tokenizer's full definition (vocab, merges, specials)."""
    backend = getattr(tok, "backend_tokenizer", None)
    text = backend.to_str() if backend is not None else json.dumps(tok.get_vocab(), sort_keys=True)
    if getattr(tok, "chat_template", None):  # it shapes chat data's blocks and masks
        text += json.dumps(tok.chat_template, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def vocab_size_of(tok) -> int:
    """The tokenizer's real size (ids 0..n-1), not a model's padded embedding size."""
    return len(tok)


# ----------------------------------------------------------------------------- packing


def doc_in_val(text: str, val_fraction: float) -> bool:
    h = int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little")
    return (h % 1_000_000) < val_fraction * 1_000_000


WHOLE_FILE_BYTES = 1 << 20  # files up to this size are hashed whole
SAMPLE_WINDOWS, SAMPLE_BYTES = 16, 1 << 16  # larger ones: their size and 16 evenly spaced 64 KiB windows


def file_digest(path: Path) -> bytes:
    """A content digest of `path` that reads at most 1 MiB of it, so finding prepared data again
    (every launch computes the fingerprint) costs no second read of a terabyte corpus.  Larger
    files are known by their size, first and last bytes and 14 windows between: an edit that keeps
    a large file's size and misses every window is not seen (delete OUT/data to prepare
    afresh then).  Content, not mtime: a copy of the corpus on another node finds the same blocks."""
    h = hashlib.sha256()
    size = path.stat().st_size
    h.update(str(size).encode())
    with open(path, "rb") as f:
        if size <= WHOLE_FILE_BYTES:
            h.update(f.read())
        else:
            last = size - SAMPLE_BYTES
            for i in range(SAMPLE_WINDOWS):  # offsets 0 .. last, the last window ending at EOF
                f.seek(i * last // (SAMPLE_WINDOWS - 1))
                h.update(f.read(SAMPLE_BYTES))
    return h.digest()


def _datasets_cache_file(path: Path, saved: Path) -> bool:
    """A transform's cache file that `datasets` wrote into a saved dataset dir (`cache-*.arrow`,
    by earlier versions of this toolkit too): not the data, so not in its fingerprint."""
    return path != saved and path.name.startswith("cache-") and path.suffix == ".arrow"


def fingerprint(files: list[Path], tok_hash: str, cfg: DataConfig) -> str:
    """Changes when any input file, the tokenizer, seq_len, the split or the packing changes; not otherwise."""
    h = hashlib.sha256()
    for f in files:
        h.update(str(f.name).encode())
        for sub in sorted(f.rglob("*")) if f.is_dir() else [f]:
            if sub.is_file() and not _datasets_cache_file(sub, f):
                h.update(sub.relative_to(f).as_posix().encode() if f.is_dir() else b"")
                h.update(file_digest(sub))
    for part in (tok_hash, cfg.seq_len, cfg.val_fraction, cfg.text_field, cfg.max_documents,
                 cfg.max_train_blocks, cfg.max_val_blocks):
        h.update(repr(part).encode())
    if cfg.packing != "concat":  # concat adds nothing: data (and caches) prepared before the switch stay valid
        h.update(f"packing {cfg.packing}".encode())
    if cfg.bad_rows == "skip":  # the default, stop, adds nothing: its blocks are what they were before the key
        h.update(b"bad rows skipped")
    if any(f.is_dir() or f.suffix not in TEXT_SUFFIXES for f in files):  # tables may hold chat rows
        h.update(f"chat format {CHAT_FORMAT}".encode())
    return h.hexdigest()[:16]


def _log_chat_counts(counts: dict[str, PackCounts], rows: int, block: int) -> None:
    """Say how many chat rows packing cut or dropped, and what to change."""
    total = PackCounts()
    for c in counts.values():
        total += c
    if total.truncated:
        _stderr(f"[data] {total.truncated} of {rows} chat rows were longer than seq_len + 1 = {block} tokens and "
                f"were truncated to it{cut_share(total)}; raise data.seq_len to keep them whole"
                f"{f' (seq_len {total.longest - 1:,} keeps these whole)' if total.longest else ''}")
    if total.cut_away:
        _stderr(f"[data] {total.cut_away} of {rows} chat rows were dropped: truncation to {block} tokens cut every "
                f"assistant / completion token; raise data.seq_len to {_to_keep(total)}")
    if total.bad_rows:
        _stderr(f"[data] {total.bad_rows} of {rows} chat rows were skipped (data.bad_rows: skip): the chat template "
                f"cannot render them or their assistant turns cannot be found; the first: {total.bad_example}")
    if total.no_target:
        _stderr(f"[data] {total.no_target} of {rows} chat rows were dropped: no assistant turn or completion to learn "
                f"(none, or each marked weight 0)")
    if total.empty_answers:
        _stderr(f"[data] {total.empty_answers} assistant turns or completions are empty: their only target is the "
                f"end of the turn, so the student learns to answer nothing there; drop or fill them if that is "
                f"not meant")


FEW_DOCUMENTS = 10  # below this, an empty split is the corpus's size, not data.val_fraction


def _to_keep(counts: PackCounts) -> str:
    """The seq_len that keeps every row dropped for its long prompt (and the one that keeps the
    first of them, when they differ); a manifest from before `need_all` has only the latter."""
    if counts.need_all > counts.need:
        return f"at least {counts.need_all:,} to keep them all ({counts.need:,} keeps the shortest)"
    return f"at least {counts.need:,} to keep them{' all' if counts.need_all else ''}"


def _refuse_empty(name: str, split: dict, counts: PackCounts, block: int, documents: int) -> None:
    """A split with no block: say why, and what to change.  documents: the whole corpus's."""
    if counts.cut_away:  # chat rows pack whole: dropped rows are why it is empty
        raise UserError(f"data: the {name} split is empty: its {counts.cut_away} chat rows lost every "
                        f"assistant / completion token to truncation at seq_len + 1 = {block} tokens (their "
                        f"prompt, with what the chat template adds, is longer); raise data.seq_len to "
                        f"{_to_keep(counts)}")
    if split["documents"] == 0 and documents < FEW_DOCUMENTS:  # no val_fraction helps: each goes whole
        raise UserError(f"data: the {name} split got no documents: the corpus has {documents}, and each goes whole to "
                        f"one split (by a hash of its text); give more documents, e.g. split a long text into "
                        f"several files or rows")
    if split["documents"] == 0:
        change = "raise" if name == "val" else "lower"
        raise UserError(f"data: the {name} split got no documents (they go to validation by a hash of their "
                        f"text, data.val_fraction of them); {change} data.val_fraction or add data")
    if split["documents"] == split["chat_rows"] and counts.bad_rows and counts.bad_rows + counts.no_target == split["chat_rows"]:
        raise UserError(f"data: the {name} split has no rows to learn from: {counts.bad_rows} of its "
                        f"{split['chat_rows']} chat rows were skipped as bad (data.bad_rows: skip), the first: "
                        f"{counts.bad_example}")
    if split["documents"] == split["chat_rows"] and counts.no_target == split["chat_rows"]:
        raise UserError(f"data: the {name} split has no rows to learn from: none of its {split['chat_rows']} chat rows "
                        f"has an assistant turn or completion to learn (none, or each marked weight 0), the only "
                        f"tokens a chat row trains on; give rows with the assistant's reply (or plain `text` rows)")
    if split["documents"] == split["chat_rows"]:  # no plain text either
        raise UserError(f"data: the {name} split has no rows to learn from ({split['chat_rows']} chat rows, "
                        f"{counts.no_target} of them with no assistant turn); add data or raise data.val_fraction")
    raise UserError(f"data: the {name} split has no complete block of {block} tokens; "
                    f"add data, lower data.seq_len or raise data.val_fraction")


def _note_earlier_preparations(root: Path) -> None:
    """Say what disk the run dir's other prepared data holds (made under other data settings):
    nothing is read from them unless the settings return to theirs, and none is removed here,
    since one may be what a user comes back to."""
    others = [d for d in sorted(root.parent.glob("blocks-*")) if d != root and d.is_dir()]
    if others:
        size = sum(f.stat().st_size for d in others for f in d.rglob("*") if f.is_file())
        _stderr(f"[data] {root.parent} also holds {len(others)} earlier preparation(s) of other data or settings "
                f"({human_bytes(size)}: {', '.join(d.name for d in others[:3])}{', ...' if len(others) > 3 else ''}); "
                f"nothing reads them unless the settings return to theirs: delete them to free the space")


def prepare_data(cfg: DataConfig, out_dir: Path, progress: bool = False,
                 before_building: Callable[[str], None] | None = None) -> PackedData:
    """Build (or reuse, or finish) the packed blocks under OUT/data/blocks-FP/; the tokenizer
    under OUT/tokenizer.  Preparation streams (distill/packing.py); reading is by index.
    before_building(fingerprint): called once the fingerprint is known, where the blocks must
    be built (it may refuse: a cache of other data, before a long preparation)."""
    # One preparation at a time in an out_dir (`distill cache` and `train` started together):
    # a second one removed the first's table copies under it and crashed it.  It waits, then
    # finds the blocks prepared.
    lock = Path(out_dir) / "data" / ".prepare.lock"

    def busy(pid: str) -> None:
        _stderr(f"[data] waiting for pid {pid}, which is preparing data in {lock.parent}")

    with waiting_lock(lock, busy), children_die_with_this_process():  # datasets' workers, here and in packing
        try:
            return _prepare_data(cfg, out_dir, progress, before_building)
        except UserError:
            raise
        except Exception as e:  # datasets and pyarrow wrap a full disk in their own errors, often with no path
            full = write_error_in(e)
            if full is None:
                raise
            raise UserError(describe_os_error(full, Path(full.filename or Path(out_dir) / "data"))) from None


def _prepare_data(cfg: DataConfig, out_dir: Path, progress: bool,
                  before_building: Callable[[str], None] | None) -> PackedData:
    layout = RunLayout(Path(out_dir), tokenizer_path=cfg.tokenizer.path)
    files = corpus_files(cfg)
    tok_dir = layout.tokenizer
    docs = None
    cache_dir = layout.root / "data" / ".documents"
    shutil.rmtree(cache_dir, ignore_errors=True)  # a killed preparation's: its tables would be read again stale
    if cfg.tokenizer.path is not None or has_tokenizer(tok_dir):
        tok = load_tokenizer(tok_dir)
    else:
        docs = load_documents(cfg, log=_stderr, cache_dir=cache_dir)
        tok = train_tokenizer(docs, cfg.tokenizer.vocab_size, tok_dir)
    tok_hash = tokenizer_hash(tok)
    fp = fingerprint(files, tok_hash, cfg)
    root = layout.packed_blocks(fp)
    # A finished preparation (its manifest written) damaged since; an unfinished one resumes below.
    problem = unusable(root) if (root / "manifest.json").exists() else None
    if problem is not None:  # derived from the corpus alone: preparing it again gives the same blocks
        _stderr(f"[data] the prepared data at {root} is damaged ({problem}); preparing it again")
        shutil.rmtree(root)
    if not (root / "manifest.json").exists():
        if before_building is not None:
            before_building(fp)
        docs = docs if docs is not None else load_documents(cfg, log=_stderr, cache_dir=cache_dir)
        frac = cfg.val_fraction
        manifest = build_blocks(docs, tok, root=root, seq_len=cfg.seq_len, val_fraction=frac,
                                in_val=lambda text: doc_in_val(text, frac), shard_documents=cfg.shard_documents,
                                num_proc=cfg.num_proc, progress=progress, packing=cfg.packing,
                                skip_bad_rows=cfg.bad_rows == "skip",
                                max_blocks={"train": cfg.max_train_blocks, "val": cfg.max_val_blocks},
                                meta={"fingerprint": fp, "tokenizer_hash": tok_hash, "vocab_size": len(tok),
                                      "chat_reader": CHAT_READER})
        del docs
        shutil.rmtree(cache_dir, ignore_errors=True)  # the plain files' Arrow copy: the shards hold what counts
        counts = {name: PackCounts(**split.get("chat_rows_packing", {})) for name, split in manifest["splits"].items()}
        _log_chat_counts(counts, sum(split["chat_rows"] for split in manifest["splits"].values()), cfg.seq_len + 1)
        for name, split in manifest["splits"].items():
            if split["blocks"] == 0:
                _refuse_empty(name, split, counts[name], cfg.seq_len + 1, manifest["documents"])
        _note_earlier_preparations(root)
        held = manifest["splits"]["val"]["blocks"] / max(1, sum(s["blocks"] for s in manifest["splits"].values()))
        if manifest["documents"] < FEW_DOCUMENTS and held > 2 * cfg.val_fraction + 0.05:  # whole documents: coarse
            _stderr(f"[data] note: {held:.0%} of the blocks are held out for validation (data.val_fraction "
                    f"{cfg.val_fraction:g}): the corpus has {manifest['documents']:,} documents, each whole in one "
                    f"split; more, smaller documents split closer to the fraction")
    docs = None
    shutil.rmtree(cache_dir, ignore_errors=True)  # (also after training a tokenizer for blocks already prepared)
    blocks = open_blocks(root)
    manifest = json.loads((root / "manifest.json").read_text())
    if manifest.get("chat_reader") != CHAT_READER and any(split.get("chat_rows") for split in manifest["splits"].values()):
        _stderr(f"[data] note: {root} was prepared before the chat reading of 2026-12-06 (system columns, tool-call "
                f"arguments given as strings, roles in another case, weight-0 turns, instruction and TRL tables, "
                f"preference tables refused): it is reused as it is, so rows read differently since keep their "
                f"earlier blocks, and the held-out prompts `distill eval` answers may include rows it trained on; "
                f"delete {root} to prepare it again (its checkpoints and cache then no longer match)")
    return PackedData(blocks["train"], blocks["val"], tok, fp, tok_hash, manifest)
