"""Packed token blocks on disk, read by index through memory maps.

A prepared data dir (OUT/data/blocks-FP/, written by distill/packing.py) holds, per split,
shards of whole blocks and a manifest written last:

    manifest.json               seq_len, dtype, per split its shards and block counts, counts
    {split}-{i:05d}.ids.npy     (n, seq_len + 1) uint16 (vocab <= 65,536) or uint32 token ids
    {split}-{i:05d}.mask.npy    (n, ceil((seq_len + 1) / 8)) uint8: bit set = training target
                                (only when the corpus has chat rows)
    {split}-{i:05d}.targets.npy (n,) int32: targets among positions 1.. (only with a mask)
    {split}-{i:05d}.starts.npy  (n, ceil((seq_len + 1) / 8)) uint8: bit set = a row (document,
                                chat row, padding) starts there (only with data.packing: documents)
    {split}-{i:05d}.json        the shard's record: what a resumed preparation continues from

Ids are unsigned and the target mask is a separate bit array, rather than int32 with the
mask in the sign: a text corpus with a vocab under 65,536 (GPT-2, Llama 2, the demo's BPE)
then costs 2 bytes a token on disk and in the page cache instead of 4, and a chat corpus
2.125.  Readers still get today's convention: an int64 tensor, non-targets as -(id + 1)
(teachers.protocol.untrained), so the loop, the cache writer and eval index it unchanged.
Row starts are read apart, as position ids that restart at 0 per row (`Blocks.positions`):
given those and no attention mask, transformers' masking (masking_utils.
find_packed_sequence_indices) lets each position attend within its own row only.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from common.errors import UserError
from common.fsutil import sha256_file

MANIFEST = "manifest.json"
FORMAT = "codistill-blocks"
VERSION = 1


def ids_dtype(vocab_size: int) -> str:
    """The narrowest unsigned type that holds every id of the vocabulary."""
    return "uint16" if vocab_size <= 1 << 16 else "uint32"


def shard_name(split: str, index: int, part: str) -> str:
    return f"{split}-{index:05d}.{part}"


class Blocks:
    """One split's blocks, (N, seq_len + 1), read from memory-mapped shards on demand.

    Supports what callers did with the old all-in-RAM tensor: len(), .shape, and
    x[i] / x[slice] / x[list | tensor | ndarray of indices], optionally with a column
    slice (x[:, :-1]); each returns an int64 tensor in the signed convention.  Only the
    rows asked for are read, so memory follows the batch, not the corpus."""

    def __init__(self, root: Path, shards: list[dict], n: int, block: int, masked: bool,
                 vocab_size: int | None = None):
        self.root, self.block, self.masked = Path(root), block, masked
        self.vocab_size = vocab_size  # set: every id read is checked against it (a damaged shard fails here)
        counts = [s["blocks"] for s in shards]
        self.shards = shards
        self.starts = np.concatenate([[0], np.cumsum(counts, dtype=np.int64)])  # (S + 1,) first row of each shard
        self.n = min(int(n), int(self.starts[-1]))
        self._maps: dict[int, tuple[np.ndarray, np.ndarray | None]] = {}
        self.documents = bool(shards) and all("starts" in s for s in shards)  # rows' starts recorded

    def __len__(self) -> int:
        return self.n

    @property
    def shape(self) -> tuple[int, int]:
        return (self.n, self.block)

    def dim(self) -> int:
        return 2

    ndim = 2

    def size(self, dim: int | None = None):
        return self.shape if dim is None else self.shape[dim]

    def _open(self, s: int) -> tuple[np.ndarray, np.ndarray | None]:
        if s not in self._maps:
            entry = self.shards[s]
            ids = np.load(self.root / entry["ids"], mmap_mode="r")  # (n_s, block) unsigned
            mask = np.load(self.root / entry["mask"], mmap_mode="r") if self.masked else None
            self._maps[s] = (ids, mask)
        return self._maps[s]

    def _index(self, key) -> np.ndarray:
        """(n,) int64 row numbers of a key as __getitem__ takes it (no column slice)."""
        if isinstance(key, (int, np.integer)) or (torch.is_tensor(key) and key.dim() == 0):
            return np.array([int(key) + (self.n if int(key) < 0 else 0)], dtype=np.int64)
        if isinstance(key, slice):
            return np.arange(*key.indices(self.n), dtype=np.int64)
        idx = np.asarray(key.cpu().numpy() if torch.is_tensor(key) else key, dtype=np.int64).reshape(-1)
        return np.where(idx < 0, idx + self.n, idx)

    def positions(self, key) -> torch.Tensor | None:
        """(n, block) int64 position ids of the rows `key` (indices or a slice): 0 where a row
        of the block starts, counting up within it; None when the blocks record no rows
        (data.packing: concat), where the models read each block as one sequence."""
        if not self.documents:
            return None
        idx = self._index(key)
        out = np.zeros((len(idx), self.block), dtype=np.int64)
        if len(idx) and (idx.min() < 0 or idx.max() >= self.n):
            raise IndexError(f"block index out of range for {self.n} blocks")
        shard = np.searchsorted(self.starts, idx, side="right") - 1
        col = np.arange(self.block, dtype=np.int64)
        for s in np.unique(shard):
            at = np.flatnonzero(shard == s)
            bits = np.load(self.root / self.shards[int(s)]["starts"], mmap_mode="r")[idx[at] - self.starts[s]]
            starts = np.unpackbits(bits, axis=1, count=self.block).astype(bool)  # (n, block)
            last = np.maximum.accumulate(np.where(starts, col, 0), axis=1)  # (n, block) where each token's row starts
            out[at] = col - last
        return torch.from_numpy(out)

    def _rows(self, idx: np.ndarray) -> torch.Tensor:
        """(len(idx), block) int64, signed convention, rows in the order asked."""
        out = np.empty((len(idx), self.block), dtype=np.int64)
        if len(idx) == 0:
            return torch.from_numpy(out)
        if idx.min() < 0 or idx.max() >= self.n:
            raise IndexError(f"block index out of range for {self.n} blocks")
        shard = np.searchsorted(self.starts, idx, side="right") - 1  # (n,) shard of each row
        for s in np.unique(shard):
            at = np.flatnonzero(shard == s)
            local = idx[at] - self.starts[s]
            ids, mask = self._open(int(s))
            # contiguous rows (a slice) are read as one range; others by one fancy index
            contiguous = bool(np.all(np.diff(local) == 1))
            pick = slice(int(local[0]), int(local[-1]) + 1) if contiguous else local
            rows = ids[pick].astype(np.int64)  # (n, block)
            if self.vocab_size is not None and rows.size and int(rows.max()) >= self.vocab_size:
                raise UserError(damaged(self.root / self.shards[int(s)]["ids"],
                                        f"token id {int(rows.max())} >= the vocabulary's {self.vocab_size}"))
            if mask is not None:
                keep = np.unpackbits(mask[pick], axis=1, count=self.block).astype(bool)  # (n, block)
                rows = np.where(keep, rows, -rows - 1)
            out[at] = rows
        return torch.from_numpy(out)

    def __getitem__(self, key) -> torch.Tensor:
        cols = None
        if isinstance(key, tuple):
            if len(key) != 2 or not isinstance(key[1], slice):
                raise TypeError("Blocks take [rows] or [rows, column slice]")
            key, cols = key
        if isinstance(key, (int, np.integer)) or (torch.is_tensor(key) and key.dim() == 0):
            i = int(key) + (self.n if int(key) < 0 else 0)
            row = self._rows(np.array([i], dtype=np.int64))[0]
            return row if cols is None else row[cols]
        if isinstance(key, slice):
            idx = np.arange(*key.indices(self.n), dtype=np.int64)
        else:
            idx = np.asarray(key.cpu().numpy() if torch.is_tensor(key) else key, dtype=np.int64).reshape(-1)
            idx = np.where(idx < 0, idx + self.n, idx)
        rows = self._rows(idx)
        return rows if cols is None else rows[:, cols]

    def chunks(self, size: int):
        """(start, (n, block) tensor) over the split in order, `size` rows at a time."""
        for s0 in range(0, self.n, size):
            yield s0, self[s0: min(s0 + size, self.n)]

    def target_counts(self) -> torch.Tensor:
        """(N,) int64: training targets per block (positions 1..), recorded at preparation."""
        if not self.masked:
            return torch.full((self.n,), self.block - 1, dtype=torch.int64)
        parts = [np.load(self.root / e["targets"], mmap_mode="r") for e in self.shards]
        flat = np.concatenate(parts) if parts else np.zeros(0, np.int32)
        return torch.from_numpy(flat[: self.n].astype(np.int64))

    def columns(self, cols: slice, plain: bool = False, positions: bool = False) -> "BlockColumns":
        """A lazy (N, len(cols)) view: x.columns(slice(None, -1), plain=True) are a split's
        inputs, x.columns(slice(None, -1), positions=True) their position ids."""
        return BlockColumns(self, cols, plain, positions)


def first_blocks(blocks, n: int):
    """The first n blocks: of `Blocks` a `Blocks` (its row starts kept, nothing read yet), of a tensor a tensor."""
    return Blocks(blocks.root, blocks.shards, min(n, blocks.n), blocks.block, blocks.masked, blocks.vocab_size) \
        if isinstance(blocks, Blocks) else blocks[:n]


def block_positions(blocks, key) -> torch.Tensor | None:
    """Position ids (n, T+1) of blocks[key] when `blocks` records its rows, else None (a
    plain tensor of blocks, as tests and on-policy samples make, is one sequence a row)."""
    return blocks.positions(key) if isinstance(blocks, Blocks) else None


class BlockColumns:
    """Blocks seen through a column slice, plain ids, signed or position ids; indexed like a
    tensor of its shape, so the cache writer streams inputs and targets by shard without a copy."""

    def __init__(self, blocks: Blocks, cols: slice, plain: bool, positions: bool = False):
        self.blocks, self.cols, self.plain, self.positions = blocks, cols, plain, positions
        self.shape = (blocks.n, len(range(*cols.indices(blocks.block))))

    def __len__(self) -> int:
        return self.shape[0]

    def dim(self) -> int:
        return 2

    def __getitem__(self, key) -> torch.Tensor:
        if self.positions:
            return self.blocks.positions(key)[:, self.cols]
        x = self.blocks[key, self.cols]
        return torch.where(x < 0, -x - 1, x) if self.plain else x


def read_manifest(root: Path) -> dict | None:
    try:
        m = json.loads((Path(root) / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    return m if m.get("format") == FORMAT else None


def unusable(root: Path) -> str | None:
    """Why a prepared data dir cannot be read as it stands (no manifest, an unreadable one, a
    shard file missing or of another size than written), or None.  A stat per file; the
    sha256 of each is for `inspect --verify`."""
    m = read_manifest(root)
    if m is None:
        return "manifest.json missing or unreadable"
    for info in m["splits"].values():
        for entry in info["shards"]:
            problem = next(shard_file_problems(root, entry, hashed=False), None)
            if problem is not None:
                return problem
    return None


def shard_file_problems(root: Path, entry: dict, hashed: bool):
    """Each problem of one shard's files (a manifest entry: its ids, mask, targets and starts
    files) against the record written with them: missing, another size, and with `hashed`
    another sha256 (shards from before the digests were recorded: size only)."""
    record = _record_of(root, entry["ids"])
    for part in ("ids", "mask", "targets", "starts"):
        name = entry.get(part)
        if name is None:
            continue
        path = root / name
        if not path.is_file():
            yield f"shard file {name} is missing"
            continue
        size, digest = record.get("bytes", {}).get(name), record.get("sha256", {}).get(name)
        if size is not None and path.stat().st_size != size:
            yield f"{name} has {path.stat().st_size} bytes, {size} were written"
        elif hashed and digest is not None and sha256_file(path) != digest:
            yield f"{name}: sha256 mismatch (bytes changed on disk)"


def open_blocks(root: Path) -> dict[str, Blocks]:
    """{"train": Blocks, "val": Blocks} of a complete prepared data dir."""
    m = read_manifest(root)
    if m is None:
        raise UserError(f"{root}: no complete prepared data (manifest.json missing or unreadable); the next "
                        f"command that reads the data prepares it again")
    return {name: Blocks(root, s["shards"], s["blocks"], m["seq_len"] + 1, m["masked"], m.get("vocab_size"))
            for name, s in m["splits"].items()}


def content_digest(root: Path, splits: dict, block: int, masked: bool) -> str:
    """A digest of what the prepared blocks hold, 16 hex digits: each split's kept blocks as
    readers see them (signed ids: targets and not; position ids where rows are recorded), in
    order, whichever shards hold them (data.shard_documents cuts the shards but not the blocks,
    and how a shard's first block records its first row's start is not what it reads as).
    The data fingerprint names the inputs by sampling large files, so an edit that keeps a large
    file's size is missed, and a preparation made again after `OUT/data` was deleted gets the
    old fingerprint: caches and checkpoints record this digest too, and it tells the two apart.
    splits: the manifest's."""
    import hashlib

    h = hashlib.sha256()
    for name in sorted(splits):
        h.update(name.encode())
        blocks = Blocks(root, splits[name]["shards"], splits[name]["blocks"], block, masked)
        for start, rows in blocks.chunks(4096):  # (n, block), a few MB at a time; int32 holds every signed id
            h.update(rows.numpy().astype(np.int32).tobytes())
            positions = blocks.positions(slice(start, start + len(rows)))
            if positions is not None:
                h.update(positions.numpy().astype(np.int32).tobytes())
    return h.hexdigest()[:16]


def damaged(path: Path, what: str) -> str:
    """The one line for a prepared shard that no longer holds what was written."""
    return (f"prepared data {path}: {what}: the shard is damaged; `distill inspect {path.parent} --verify` "
            f"checks every shard, and deleting {path.parent} makes the next command prepare the data again")


def verify_blocks(root: Path) -> list[str]:
    """Every problem of a prepared data dir (empty: ok): a missing or resized file, a sha256
    that differs from the one recorded when the shard was written (shards from before the
    digests were recorded: size only), ids past the vocabulary, a shard of the wrong shape."""
    root = Path(root)
    m = read_manifest(root)
    if m is None:
        return [f"{root}: no complete prepared data (manifest.json missing or unreadable)"]
    problems, block, vocab = [], m["seq_len"] + 1, m.get("vocab_size")
    for split, info in m["splits"].items():
        for entry in info["shards"]:
            problems += [f"{split}: {problem}" for problem in shard_file_problems(root, entry, hashed=True)]
            try:
                ids = np.load(root / entry["ids"], mmap_mode="r")
            except (OSError, ValueError) as e:
                problems.append(f"{split}: {entry['ids']} is unreadable ({e})")
                continue
            if ids.shape != (entry["blocks"], block):
                problems.append(f"{split}: {entry['ids']} holds {ids.shape}, the manifest says ({entry['blocks']}, {block})")
            elif vocab is not None and ids.size and int(ids.max()) >= vocab:
                problems.append(f"{split}: {entry['ids']}: token id {int(ids.max())} >= the vocabulary's {vocab}")
    return problems


def _record_of(root: Path, ids_name: str) -> dict:
    """The shard's record ({split}-{i}.json, written with it), or {} when it is unreadable."""
    try:
        return json.loads((root / ids_name.replace(".ids.npy", ".json")).read_text())
    except (OSError, ValueError):
        return {}
