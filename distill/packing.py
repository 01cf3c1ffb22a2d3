"""Documents -> packed token blocks on disk, in shards, resumable; distill/blocks.py reads them.

Per split the blocks are what the in-memory packer made: the plain-text documents (in
corpus order) joined with EOS after each and cut into blocks of seq_len + 1, the remainder
dropped; then the chat rows packed whole (distill/chat.py), the last block padded.
With data.packing: documents (the default) each block also records where its rows start
(a document, the part of one a block cut, a chat row, the padding): the models then see
each row alone (position ids restart per row), and a row's first token is no target.

The documents of each kind are processed in chunks of `data.shard_documents`: a chunk is
tokenised by `datasets.map(batched=True, num_proc=...)` into a temp Arrow file (the map
keeps row order, so the blocks do not depend on num_proc), its completed blocks become one
shard (written atomically: temp file, fsync, rename), and the tokens of the block still
being filled are carried into the next chunk.  The shard's record (`{split}-{i}.json`,
also atomic, after the arrays) stores that carry, so a preparation killed at any point
resumes at the first chunk without a record and ends byte-identical to an uninterrupted
one (nothing written depends on time, pid or num_proc).  The manifest is written last; a
dir without one is unfinished.  Memory: one chunk's tokens, never the corpus's.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import io
import json
import os
import re
import shutil
import signal
import sys
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from common.errors import interrupted_line
from common.fsutil import atomic_write_bytes, atomic_write_json
from distill.blocks import FORMAT, MANIFEST, VERSION, content_digest, ids_dtype, read_manifest, shard_name
from distill.chat import PLAIN, BadRow, PackCounts, RowPacker, empty_answers, render

if TYPE_CHECKING:  # imported where a split is built: opening prepared blocks needs no `datasets`
    import datasets

# Fault injection for tests: the process kills itself (SIGKILL, as a crash would) after this
# many shards were written by it.
KILL_AFTER_SHARDS = "DISTILL_TEST_KILL_AFTER_SHARDS"
MAX_AUTO_PROCS = 8  # tokenisation scales to about this many processes before the packer is the bottleneck


def auto_num_proc(num_proc: int | None) -> int:
    """data.num_proc, or the cores this process may use (capped)."""
    if num_proc:
        return num_proc
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(cores, MAX_AUTO_PROCS))


# Characters per tokenizer call.  A fast tokenizer holds offsets and token strings for every
# token of a call (about 380 bytes a token: one 50 MB document took 8.8 GB to prepare), so a
# long document is tokenised in pieces, and a batch a bounded slice at a time.
PIECE_CHARS = 1 << 18  # 256k characters: about 64k tokens, about 25 MB of the tokenizer's state
_BETWEEN_WORDS = re.compile(r"(?<=\S) (?=\S)")  # "word| next": one space between two non-spaces


def _encode_text(batch: dict, tok, eos: int) -> dict:
    """Worker side: each document's ids with EOS after it, (n_d + 1,) int64 each."""
    pieces, owner = [], []  # every document's pieces, and the document each is of
    space = _space_side(tok)
    for d, text in enumerate(batch["text"]):
        for piece in text_pieces(text, PIECE_CHARS, space):
            pieces.append(piece)
            owner.append(d)
    parts: list[list[np.ndarray]] = [[] for _ in batch["text"]]
    start = 0
    while start < len(pieces):  # calls of at most PIECE_CHARS characters (one piece at least)
        end, size = start + 1, len(pieces[start])
        while end < len(pieces) and size + len(pieces[end]) <= PIECE_CHARS:
            size += len(pieces[end])
            end += 1
        for d, ids in zip(owner[start:end], tok(pieces[start:end], add_special_tokens=False)["input_ids"]):
            parts[d].append(np.asarray(ids, dtype=np.int64))
        start = end
    return {"ids": [np.concatenate([*p, np.array([eos], dtype=np.int64)]) for p in parts]}


def text_pieces(text: str, size: int, space: str = "starts") -> list[str]:
    """`text` cut into pieces of at most about `size` characters, each cut at a space between
    two words, where a tokenizer splits anyway, so the pieces' ids joined equal the whole
    text's.  space: "starts" the next piece ("word| next": byte-level BPE, GPT-2's and Llama
    3's, starts a token with the space), or is "dropped" ("word|next": for tokenizers that
    put a space before every text they are given, SentencePiece's Llama 2 / Mistral style).
    A stretch with no such space in its last half (a base64 blob) is cut at its end: the ids
    may differ there."""
    if len(text) <= size:
        return [text]
    skip = 0 if space == "starts" else 1
    out, start = [], 0
    while len(text) - start > size:
        # the last space between words in the piece's second half (endpos 2 further: the lookahead reads on)
        spaces = [m.start() for m in _BETWEEN_WORDS.finditer(text, start + size // 2, start + size + 2)
                  if m.start() <= start + size]
        cut, start_next = (spaces[-1], spaces[-1] + skip) if spaces else (start + size, start + size)
        out.append(text[start:cut])
        start = start_next
    out.append(text[start:])
    return out


@functools.lru_cache(maxsize=4)
def _space_side(tok) -> str:
    """The `space` of text_pieces that gives `tok` the whole text's ids, tried on a probe
    ("starts" when neither does: its ids may then differ at each cut)."""
    probe = "Short words, then longer sentences follow here."
    whole = tok(probe, add_special_tokens=False)["input_ids"]
    for space in ("starts", "dropped"):
        cuts = text_pieces(probe, 12, space)
        if [i for piece in tok(cuts, add_special_tokens=False)["input_ids"] for i in piece] == whole:
            return space
    return "starts"


def _encode_chat(batch: dict, tok, block: int) -> dict:
    """Worker side: each chat row's ids and is-target flags (distill/chat.py render), marked
    as far as a block of `block` tokens keeps them; a row that cannot be rendered gets none and
    its reason in `bad` (the caller stops on it or skips it: data.bad_rows)."""
    out = {"ids": [], "tgt": [], "bad": [], "empty": [empty_answers(c) for c in batch["chat"]]}
    for chat in batch["chat"]:
        try:
            ids, tgt, why = *render(tok, chat, block), ""
        except BadRow as e:
            ids, tgt, why = [], [], str(e)
        out["ids"].append(ids)
        out["tgt"].append(tgt)
        out["bad"].append(why)
    return out


def _npy_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.lib.format.write_array(buf, np.ascontiguousarray(arr), allow_pickle=False)
    return buf.getvalue()


class _Killer:
    """Counts shards written by this process; SIGKILLs it at the count the test asked for."""

    def __init__(self):
        self.at, self.n = os.environ.get(KILL_AFTER_SHARDS), 0

    def written(self) -> None:
        self.n += 1
        if self.at == str(self.n):
            os.kill(os.getpid(), signal.SIGKILL)
            time.sleep(60)  # never returns


class ShardWriter:
    """Writes one split's shards and records into `root`; reuses those a killed run left."""

    def __init__(self, root: Path, split: str, block: int, dtype: str, masked: bool, killer: _Killer,
                 documents: bool = False):
        self.root, self.split, self.block, self.dtype, self.masked = root, split, block, dtype, masked
        self.killer, self.documents = killer, documents

    def existing(self, index: int, plan: dict) -> dict | None:
        """The record of shard `index` when a previous run wrote it for this same plan."""
        path = self.root / shard_name(self.split, index, "json")
        try:
            rec = json.loads(path.read_text())
        except (OSError, ValueError):
            return None
        if any(rec.get(k) != v for k, v in plan.items()):
            return None
        files = [rec[k] for k in ("ids", "mask", "targets", "starts") if rec.get(k)]
        if not all((self.root / f).is_file() and (self.root / f).stat().st_size == rec["bytes"][f] for f in files):
            return None
        return rec

    def write(self, index: int, plan: dict, ids: np.ndarray, keep: np.ndarray | None, state: dict,
              starts: np.ndarray | None = None) -> dict:
        """ids: (n, block) token ids; keep: (n, block) bool targets (chat corpora) or None;
        starts: (n, block) bool, a row starts there (documents packing) or None."""
        rec = dict(plan, blocks=int(len(ids)), bytes={}, sha256={}, **state)
        arrays = {"ids": ids.astype(self.dtype)}
        if self.masked:
            keep = np.ones(ids.shape, dtype=bool) if keep is None else keep
            arrays["mask"] = np.packbits(keep, axis=1)  # (n, ceil(block / 8)) uint8
            arrays["targets"] = keep[:, 1:].sum(1).astype(np.int32)  # (n,) targets among positions 1..
        if self.documents:
            arrays["starts"] = np.packbits(starts, axis=1)  # (n, ceil(block / 8)) uint8: bit set = a row starts
        for part, arr in arrays.items():
            name = shard_name(self.split, index, f"{part}.npy")
            data = _npy_bytes(arr)
            atomic_write_bytes(self.root / name, data)
            rec[part], rec["bytes"][name], rec["sha256"][name] = name, len(data), hashlib.sha256(data).hexdigest()
        atomic_write_json(self.root / shard_name(self.split, index, "json"), rec)
        self.killer.written()
        return rec


def _chunks(n: int, size: int):
    return [(a, min(a + size, n)) for a in range(0, n, size)]


def _tokenized(docs: datasets.Dataset, fn, kwargs: dict, features: datasets.Features, num_proc: int,
               work: Path, tag: str) -> datasets.Dataset:
    """One chunk through `fn` in `num_proc` processes, into a temp Arrow file (row order kept)."""
    procs = num_proc if len(docs) >= num_proc > 1 else None
    with signals_end_pools(procs):
        return docs.map(fn, batched=True, batch_size=64, num_proc=procs, fn_kwargs=kwargs, features=features,
                        remove_columns=docs.column_names, cache_file_name=str(work / f"{tag}.arrow"),
                        load_from_cache_file=False, new_fingerprint=tag)


@contextlib.contextmanager
def signals_end_pools(procs: int | None):
    """While a worker pool runs (procs > 1), Ctrl-C and SIGTERM end this process at once, after
    the one line an interrupted command says (exit 130), as a kill would.  Unwinding Python
    through datasets' pool could wait forever: for the pool's queue lock a killed worker held,
    or at exit for a thread forking a replacement for a stopped worker.  The workers ignore
    Ctrl-C and die with this process (`children_die_with_this_process`); the preparation
    resumes at its first unwritten shard, as after kill -9."""
    if not procs or procs < 2 or threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum, frame):
        os.write(2, (interrupted_line() + "\n").encode())
        os._exit(130)

    old = {s: signal.signal(s, stop) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)


# Whether a child forked now dies with this process: inside `children_die_with_this_process`
# (data preparation: datasets' pool workers and the Manager its map(num_proc=...) starts), for
# forks of the main thread only (PR_SET_PDEATHSIG fires when the forking *thread* exits).
_BIND = {"depth": 0, "parent": 0, "main_thread": False}


def _before_fork() -> None:
    _BIND["main_thread"] = threading.current_thread() is threading.main_thread()


def _after_fork_in_child() -> None:
    if not (_BIND["depth"] and _BIND["main_thread"]):
        return
    _BIND["depth"] = 0  # the child's own children are its business
    # Ctrl-C reaches the whole process group: this process (a pool's worker) leaves it to its
    # parent, which ends at once and takes it along (signals_end_pools); SIGTERM kills it.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    if sys.platform.startswith("linux"):
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    if os.getppid() != _BIND["parent"]:  # the parent died before that took effect
        os._exit(1)


os.register_at_fork(before=_before_fork, after_in_child=_after_fork_in_child)


@contextlib.contextmanager
def children_die_with_this_process():
    """Children forked inside die when this process does: a `distill prepare` killed with
    SIGKILL (the OOM killer's signal) left datasets' idle workers and Manager behind, about
    400 MB each, for minutes."""
    _BIND.update(depth=_BIND["depth"] + 1, parent=os.getpid())
    try:
        yield
    finally:
        _BIND["depth"] -= 1


def _flat(column) -> np.ndarray:
    """A (chunked) Arrow list column -> its values, flat, as one numpy array."""
    parts = [c.flatten().to_numpy(zero_copy_only=False) for c in column.chunks]
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)


def _cut_text(column, carry: dict, block: int, documents: bool):
    """A text chunk's documents (an Arrow list column of ids, EOS after each) joined after the
    carried tokens and cut into blocks -> (ids (n, block), keep (n, block) bool or None,
    starts (n, block) bool or None, the shard's state: what is carried on, tokens).

    documents: a document's first token is no target (its context is cut off from it) and
    starts a row; so does each block's first token (a document a block cut continues there,
    as a row of its own).  `keep` is then the target mask; concat has no mask (all targets)."""
    new = _flat(column)  # (tokens,) in the shard's dtype: 2 or 4 bytes a token held
    held = carry.get("ids", [])
    flat = np.concatenate([np.asarray(held, dtype=new.dtype), new])
    n = len(flat) // block
    ids, keep, starts = flat[: n * block].reshape(n, block), None, None
    state = {"carry": {"ids": flat[n * block:].tolist()}, "tokens": int(len(flat) - len(held))}
    if documents:
        first = np.zeros(len(flat), dtype=bool)  # (tokens,) a document starts here
        first[np.asarray(carry.get("starts", []), dtype=np.int64)] = True  # the carried documents' starts
        first[len(held) + _offsets(column)[:-1]] = True  # each new document (EOS at least: never empty)
        keep = ~first[: n * block].reshape(n, block)
        starts = first[: n * block].reshape(n, block).copy()
        starts[:, 0] = True
        state["carry"]["starts"] = (np.flatnonzero(first[n * block:])).tolist()
    return ids, keep, starts, state


def _offsets(column) -> np.ndarray:
    """(docs + 1,) where each document of a (chunked) Arrow list column starts in `_flat`'s order."""
    lengths = [c.value_lengths().to_numpy(zero_copy_only=False) for c in column.chunks]
    flat = np.concatenate(lengths) if lengths else np.zeros(0, dtype=np.int64)
    return np.concatenate([[0], np.cumsum(flat, dtype=np.int64)])


def build_split(docs: datasets.Dataset, split: str, text_rows: np.ndarray, chat_rows: np.ndarray, tok, *,
                root: Path, block: int, dtype: str, masked: bool, shard_documents: int, num_proc: int,
                max_blocks: int | None, killer: _Killer, bar, documents: bool = False,
                skip_bad_rows: bool = False) -> dict:
    """Write one split's shards (text chunks, then chat chunks); returns its manifest entry.

    text_rows / chat_rows: row numbers in `docs` of this split's plain and chat documents.
    documents: record where rows start (data.packing: documents), see the module docstring.
    skip_bad_rows: a chat row the template cannot render or split is dropped and counted;
    else it stops the preparation, named (with how many more of its shard fail)."""
    import datasets

    writer = ShardWriter(root, split, block, dtype, masked, killer, documents)
    work = root / ".work"
    work.mkdir(exist_ok=True)
    eos = tok.eos_token_id
    pad = tok.pad_token_id if tok.pad_token_id is not None else eos
    feats = {"text": datasets.Features({"ids": datasets.Sequence(datasets.Value(dtype))}),
             "chat": datasets.Features({"ids": datasets.Sequence(datasets.Value(dtype)),
                                        "tgt": datasets.Sequence(datasets.Value("bool")),
                                        "bad": datasets.Value("string"),
                                        "empty": datasets.Value("int32")})}
    plans = [("text", a, b, text_rows) for a, b in _chunks(len(text_rows), shard_documents)]
    plans += [("chat", a, b, chat_rows) for a, b in _chunks(len(chat_rows), shard_documents)]
    shards, totals = [], dict(documents=0, tokens=0, blocks=0, rows=0)
    counts = PackCounts()  # what packing cut or dropped of the chat rows
    carry: dict = {}
    for index, (kind, a, b, rows) in enumerate(plans):
        if max_blocks is not None and totals["blocks"] >= max_blocks:
            break  # the split is cut there anyway: later documents are never tokenised
        plan = {"split": split, "kind": kind, "documents": [int(a), int(b)]}
        if kind == "chat" and a == 0:
            carry = {}  # text and chat are packed apart: the text remainder was dropped
        rec = writer.existing(index, plan)
        reused = rec is not None  # a killed preparation's shard: no tokenising now
        if rec is None:
            chunk = _tokenized(docs.select(rows[a:b]), _encode_text if kind == "text" else _encode_chat,
                               {"tok": tok, "eos": eos} if kind == "text" else {"tok": tok, "block": block}, feats[kind], num_proc,
                               work, f"{split}-{index:05d}")
            table = chunk.data.table
            if kind == "text":  # join with the carried tokens and cut: (n, block), the rest carried on
                ids, keep, starts, state = _cut_text(table["ids"], carry, block, documents)
            else:  # whole rows into blocks, the block being filled carried on (padded after the last chunk)
                ids, keep, starts, state = _pack_chat(table, carry, pad, block, documents, last=b == len(rows),
                                                      skip_bad_rows=skip_bad_rows)
            del table
            files = [Path(f["filename"]) for f in chunk.cache_files]  # its Arrow files under .work
            del chunk
            rec = writer.write(index, plan, ids, keep, state, starts)
            for f in files:  # the shard holds what counts (`cleanup_cache_files` keeps a dataset's own files)
                f.unlink(missing_ok=True)
        carry = rec["carry"]
        shards.append({k: rec.get(k) for k in ("ids", "mask", "targets", "starts", "blocks") if rec.get(k) is not None})
        totals["documents"] += b - a
        totals["tokens"] += rec["tokens"]
        totals["blocks"] += rec["blocks"]
        counts += PackCounts(**rec.get("counts", {}))
        totals["rows"] += (b - a) if kind == "chat" else 0
        bar.update(b - a, tokens=rec["tokens"], reused=reused)
    kept = totals["blocks"] if max_blocks is None else min(totals["blocks"], max_blocks)
    return {"shards": [s for s in shards if s["blocks"]], "blocks": kept, "blocks_packed": totals["blocks"],
            "documents": totals["documents"], "tokens": totals["tokens"], "chat_rows": totals["rows"],
            "chat_rows_packing": dataclasses.asdict(counts)}


def _pack_chat(table, carry: dict, pad: int, block: int, documents: bool, last: bool, skip_bad_rows: bool):
    """One chunk of tokenised chat rows (an Arrow table: ids, tgt, bad, empty) -> (ids (n, block),
    targets (n, block), row starts (n, block) or None, the shard record's state: the carry,
    tokens, PackCounts).  last: the split's last chunk, whose block being filled is padded and
    kept.  A row that cannot be rendered (`bad` says why) stops it, unless skip_bad_rows."""
    packer = RowPacker(pad, block, carry, documents)
    whys = table["bad"].to_pylist()  # per row: why it cannot be rendered, or ""
    bad = [why for why in whys if why]
    if bad and not skip_bad_rows:
        more = f" ({len(bad) - 1} more of the {len(whys):,} chat rows read with it fail too)" if len(bad) > 1 else ""
        raise BadRow(f"{bad[0]}{more}; data.bad_rows: skip drops such rows, counted")
    pairs = [(i, t) for i, t, why in zip(table["ids"].to_pylist(), table["tgt"].to_pylist(), whys) if not why]
    out_ids, out_tgt = packer.add(pairs)
    packer.counts.bad_rows, packer.counts.bad_example = len(bad), bad[0] if bad else ""
    if last:
        tail_ids, tail_tgt = packer.flush()
        out_ids, out_tgt = out_ids + tail_ids, out_tgt + tail_tgt
    ids = np.asarray(out_ids, dtype=np.int64).reshape(-1, block)
    keep = np.asarray(out_tgt, dtype=bool).reshape(-1, block)
    starts = np.asarray(packer.starts, dtype=bool).reshape(-1, block) if documents else None
    packer.counts.empty_answers = sum(table["empty"].to_pylist())
    state = {"carry": packer.carry, "tokens": sum(len(i) for i, _ in pairs), "counts": dataclasses.asdict(packer.counts)}
    return ids, keep, starts, state


class _Rate:
    """The progress bar's info field: tokens so far and the rate of those tokenised now (the
    shards a resumed preparation reuses are counted, not timed)."""

    def __init__(self, bar):
        self.bar, self.tokens, self.reused, self.t0 = bar, 0, 0, time.monotonic()

    def update(self, docs: int, tokens: int, reused: bool = False) -> None:
        self.tokens += tokens
        self.reused += tokens if reused else 0
        if reused:  # the clock starts at the first chunk tokenised now
            self.t0 = time.monotonic()
        rate = (self.tokens - self.reused) / max(time.monotonic() - self.t0, 1e-9)
        done = f" ({self.reused:,} from the earlier run)" if self.reused else ""
        self.bar.update(docs, info=f"{self.tokens:,} tokens{done}  {rate / 1e6:.2f}M tok/s")


def build_blocks(docs: datasets.Dataset, tok, *, root: Path, seq_len: int, val_fraction: float, in_val,
                 shard_documents: int, num_proc: int | None, max_blocks: dict, meta: dict,
                 packing: str, progress: bool = False, skip_bad_rows: bool = False) -> dict:
    """All splits' shards under `root`, then its manifest (returned).  A complete `root`
    is returned as it is; an unfinished one is resumed.  packing: "documents" records the
    rows' starts and masks each row's first token (module docstring); "concat" does not."""
    with children_die_with_this_process():
        return _build_blocks(docs, tok, root=root, seq_len=seq_len, val_fraction=val_fraction, in_val=in_val,
                             shard_documents=shard_documents, num_proc=num_proc, max_blocks=max_blocks, meta=meta,
                             progress=progress, packing=packing, skip_bad_rows=skip_bad_rows)


def _build_blocks(docs: datasets.Dataset, tok, *, root: Path, seq_len: int, val_fraction: float, in_val,
                  shard_documents: int, num_proc: int | None, max_blocks: dict, meta: dict,
                  packing: str, progress: bool = False, skip_bad_rows: bool = False) -> dict:
    from common.progress import progress_bar

    done = read_manifest(root)
    if done is not None:
        return done
    root.mkdir(parents=True, exist_ok=True)
    block, procs = seq_len + 1, auto_num_proc(num_proc)
    # One pass over the documents: which split (by content hash) and which kind each one is.  Past
    # one chunk it runs in worker processes: reading every text maps the whole Arrow file's pages
    # into whoever reads it, and this process would keep them (RSS grew by the corpus's size).
    flags = docs.map(lambda b: {"val": [in_val(t) for t in b["text"]], "plain": [c == PLAIN for c in b["chat"]]},
                     batched=True, remove_columns=docs.column_names, keep_in_memory=True,
                     num_proc=procs if len(docs) > shard_documents and procs > 1 else None)
    val = np.asarray(flags["val"], dtype=bool)  # (n_docs,): O(documents) bytes, not O(tokens)
    plain = np.asarray(flags["plain"], dtype=bool)
    documents = packing == "documents"
    masked = bool((~plain).any()) or documents  # documents: each document's first token is no target
    dtype = ids_dtype(len(tok))
    killer = _Killer()
    splits = {}
    with progress_bar(len(val), "data", progress) as bar:
        rate = _Rate(bar)
        for name, want_val in (("train", False), ("val", True)):
            rows = val == want_val
            splits[name] = build_split(docs, name, np.flatnonzero(rows & plain), np.flatnonzero(rows & ~plain), tok,
                                       root=root, block=block, dtype=dtype, masked=masked,
                                       shard_documents=shard_documents, num_proc=procs,
                                       max_blocks=max_blocks.get(name), killer=killer, bar=rate,
                                       documents=documents, skip_bad_rows=skip_bad_rows)
    manifest = {"format": FORMAT, "version": VERSION, "seq_len": seq_len, "dtype": dtype, "masked": masked,
                "packing": packing,
                "val_fraction": val_fraction, "shard_documents": shard_documents, **meta,
                "documents": int(len(val)), "tokens": sum(s["tokens"] for s in splits.values()),
                "content": content_digest(root, splits, block, masked), "splits": splits}
    shutil.rmtree(root / ".work", ignore_errors=True)
    atomic_write_json(root / MANIFEST, manifest)
    return manifest
