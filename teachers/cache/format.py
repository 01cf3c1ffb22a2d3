"""What a cache dir's reader and writer agree on: the format version, the manifest's
name, the cache's errors, checksums and identity comparison.  See writer.py for the layout."""
from __future__ import annotations

import json
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import torch

from common.errors import UserError
from common.fsutil import sha256_file  # noqa: F401  (the cache's readers and writer take it from here)

FORMAT_VERSION = 3  # the newest this reader reads; 2: shards may store the training targets only (rows.py)
# 3: a sampled cache keeps an exact head (Sampling.exact_top): written only by such caches, so an
# older reader refuses them instead of misreading the head as draws, and other caches stay at 2.
MANIFEST = "manifest.json"


@dataclass(frozen=True)
class Sampling:
    """A sampled cache (estimator "sampled"): n draws per token from softmax(logits / T),
    seeded by (seed, split, sequence, position) alone, so a resumed or multi-rank cache is
    byte-identical.  exact_top h > 0: the h most likely ids are kept with their exact
    probabilities and the draws come from the rest (`losses.signal.sample_signal`).  Stored
    with the encoding "sampled"; the manifest's k is the width, h + n."""

    n: int = 32
    temperature: float = 1.0
    seed: int = 0
    exact_top: int = 0

    @property
    def width(self) -> int:
        """Entries per token: the exact head, then at most n distinct drawn ids."""
        return self.exact_top + self.n

    def keys(self, split: str, sequences, seq_len: int) -> torch.Tensor:
        """(B, seq_len) int64 draw keys of the blocks `sequences` (B,) of `split`: 22 bits of the
        split's crc32 in bits 40-61, the token's index in the split (sequence * T + position) below."""
        seqs = torch.as_tensor(sequences, dtype=torch.int64).reshape(-1, 1)
        return ((zlib.crc32(split.encode()) & 0x3FFFFF) << 40) + seqs * seq_len + torch.arange(seq_len)

    def identity(self) -> dict[str, str]:
        head = {"sample_exact_top": str(self.exact_top)} if self.exact_top else {}  # absent: 0, as before it existed
        return {"estimator": "sampled", "samples": str(self.n), "sample_temperature": repr(float(self.temperature)),
                "sample_seed": str(self.seed), **head}

    @staticmethod
    def of_manifest(manifest: Mapping) -> "Sampling | None":
        ident = manifest.get("identity", {})
        if ident.get("estimator") != "sampled":
            return None
        return Sampling(int(ident["samples"]), float(ident["sample_temperature"]), int(ident["sample_seed"]),
                        int(ident.get("sample_exact_top", 0)))


def format_version(sampling: Sampling | None) -> int:
    """The format a cache of this signal is written in: the oldest that reads it."""
    return 3 if sampling is not None and sampling.exact_top else 2

# The cache's errors are the user's to fix (the CLI prints one line, exit 2), wherever
# they surface: cache, train or eval.
class CacheMismatch(UserError, ValueError):
    """The cache dir holds a cache for a different teacher/tokenizer/data/k/encoding."""


class CacheLocked(UserError, RuntimeError):
    """Another process is writing this cache dir."""


class CacheCorrupt(UserError, ValueError):
    """A shard or the manifest disagrees with what was written."""


class CacheWriteError(UserError, OSError):
    """Writing a cache file failed (disk full, permissions); earlier files are intact."""


def read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CacheCorrupt(f"{path} is not valid JSON ({e}); remove it, or rerun `distill cache --overwrite`") from e


# Identity keys added after caches were written without them: such a cache still matches.
RECORDED_SINCE = frozenset({"data_content"})  # 2026-12-05: what the prepared blocks hold


def identity_diffs(old: Mapping, new: Mapping, keys=None) -> list[str]:
    """old: the cache's identity; new: the one requested."""
    keys = sorted(set(old) | set(new)) if keys is None else keys
    return [f"{key}: {old.get(key)!r} (cache) vs {new.get(key)!r} (requested)"
            for key in keys if str(old.get(key)) != str(new.get(key))
            and not (key in RECORDED_SINCE and key not in old)]


def mismatch_error(cache_dir: Path, diffs: list[str]) -> CacheMismatch:
    return CacheMismatch(f"cache at {cache_dir} was written for a different setup: " + "; ".join(diffs)
                         + ". `distill cache --overwrite` replaces it; or set cache.dir to another dir.")
