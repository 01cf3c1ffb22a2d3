"""Corpus -> tokenizer -> packed token blocks, on Hugging Face `datasets`.

Documents are split into train/validation by a hash of their content (stable when files
are added or reordered), tokenised, joined with EOS after each document and cut into
blocks of `seq_len + 1` tokens, so each of the `seq_len` input positions has a
next-token label.  Every artefact made from the data records `fingerprint`.
"""
from __future__ import annotations

import hashlib
import json
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import datasets
import torch
from safetensors.torch import load_file, save

from common.errors import UserError
from common.fsutil import atomic_write_bytes
from distill.config import DataConfig
from distill.layout import RunLayout

EOS = "<|endoftext|>"
TEXT_SUFFIXES = {".txt", ".py", ".md", ".rst", ".text"}
JSON_SUFFIXES = {".jsonl", ".json"}
PARQUET_SUFFIXES = {".parquet"}
SKIP_DIRS = {"site-packages", "test", "tests", "idle_test", "__pycache__"}


@dataclass
class PackedData:
    """Token blocks, (N, seq_len + 1) int64 each, plus what made them."""

    train: torch.Tensor
    val: torch.Tensor
    tokenizer: object  # transformers.PreTrainedTokenizerFast
    fingerprint: str
    tokenizer_hash: str

    @property
    def seq_len(self) -> int:
        return self.train.shape[1] - 1


# ----------------------------------------------------------------------------- corpus


def stdlib_dir() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def corpus_files(cfg: DataConfig) -> list[Path]:
    """Every input file, sorted; the stdlib's own sources when `cfg.stdlib`."""
    roots = list(cfg.paths)
    # The stdlib corpus is its Python sources only (no bundled .txt data, tests or site-packages).
    stdlib = stdlib_dir()
    files: list[Path] = [
        f for f in stdlib.rglob("*.py") if not SKIP_DIRS.intersection(f.relative_to(stdlib).parts[:-1])
    ] if cfg.stdlib else []
    for root in roots:
        if not root.exists():
            raise UserError(f"data path {root} does not exist")
        if root.is_file():
            files.append(root)
        elif (root / "dataset_info.json").exists() or (root / "dataset_dict.json").exists():
            files.append(root)  # a datasets.save_to_disk dir, read whole
        else:
            suffixes = TEXT_SUFFIXES | JSON_SUFFIXES | PARQUET_SUFFIXES
            files += [
                f for f in root.rglob("*")
                if f.is_file() and f.suffix in suffixes
                and not SKIP_DIRS.intersection(f.relative_to(root).parts[:-1])
            ]
    files = sorted(set(files))
    if not files:
        raise UserError(f"data: no readable files under {', '.join(map(str, roots or [stdlib_dir()]))} "
                        f"(looked for {', '.join(sorted(TEXT_SUFFIXES | JSON_SUFFIXES | PARQUET_SUFFIXES))})")
    return files


def _read_text_file(path: Path) -> str:
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: not UTF-8 (bad byte at offset {e.start}); convert it "
                        f"(e.g. `iconv -t utf-8`) or remove it from data.paths") from None


def load_documents(cfg: DataConfig) -> datasets.Dataset:
    """All documents as a `datasets.Dataset` with one column `text`."""
    parts: list[datasets.Dataset] = []
    plain: list[str] = []
    for f in corpus_files(cfg):
        if f.is_dir():
            ds = datasets.load_from_disk(str(f))
            ds = ds["train"] if isinstance(ds, datasets.DatasetDict) else ds
        elif f.suffix in TEXT_SUFFIXES:
            plain.append(_read_text_file(f))
            continue
        else:
            builder = "json" if f.suffix in JSON_SUFFIXES else "parquet"
            try:
                ds = datasets.load_dataset(builder, data_files=str(f), split="train")
            except Exception as e:  # datasets wraps parse errors in many types
                raise UserError(f"{f}: could not be read as {builder} ({type(e).__name__}: "
                                f"{str(e).splitlines()[0][:200]})") from None
        if cfg.text_field not in ds.column_names:
            raise UserError(f"{f}: no column {cfg.text_field!r} (columns: {', '.join(ds.column_names)}); "
                            f"set data.text_field")
        parts.append(ds.select_columns([cfg.text_field]).rename_column(cfg.text_field, "text"))
    if plain:
        parts.insert(0, datasets.Dataset.from_dict({"text": plain}))
    docs = datasets.concatenate_datasets(parts) if len(parts) > 1 else parts[0]
    docs = docs.filter(lambda b: [bool(t and t.strip()) for t in b["text"]], batched=True)
    if cfg.max_documents is not None:
        docs = docs.select(range(min(cfg.max_documents, len(docs))))
    if len(docs) == 0:
        raise UserError("data: the corpus has no non-empty documents; check data.paths")
    return docs


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

    if not (path / "tokenizer.json").exists() and not (path / "tokenizer_config.json").exists():
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
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def vocab_size_of(tok) -> int:
    """The tokenizer's real size (ids 0..n-1), not a model's padded embedding size."""
    return len(tok)


# ----------------------------------------------------------------------------- packing


def _doc_in_val(text: str, val_fraction: float) -> bool:
    h = int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little")
    return (h % 1_000_000) < val_fraction * 1_000_000


def pack(token_lists, eos_id: int, block: int) -> torch.Tensor:
    """Join documents with EOS after each and cut into (N, block) rows; the remainder is dropped."""
    flat: list[int] = []
    for ids in token_lists:
        flat.extend(ids)
        flat.append(eos_id)
    n = len(flat) // block
    return torch.tensor(flat[: n * block], dtype=torch.int64).view(n, block)


def fingerprint(files: list[Path], tok_hash: str, cfg: DataConfig) -> str:
    """Changes when any input file, the tokenizer, seq_len or the split changes; not otherwise."""
    h = hashlib.sha256()
    for f in files:
        h.update(str(f.name).encode())
        for sub in sorted(f.rglob("*")) if f.is_dir() else [f]:
            if sub.is_file():
                h.update(hashlib.sha256(sub.read_bytes()).digest())
    for part in (tok_hash, cfg.seq_len, cfg.val_fraction, cfg.text_field, cfg.max_documents,
                 cfg.max_train_blocks, cfg.max_val_blocks):
        h.update(repr(part).encode())
    return h.hexdigest()[:16]


def prepare_data(cfg: DataConfig, out_dir: Path, progress: bool = False) -> PackedData:
    """Build (or reuse) the packed blocks under OUT/data; the tokenizer under OUT/tokenizer."""
    datasets.disable_progress_bars()  # our own progress bars instead
    layout = RunLayout(out_dir, tokenizer_path=cfg.tokenizer.path)
    files = corpus_files(cfg)
    tok_dir = layout.tokenizer
    docs = None
    if cfg.tokenizer.path is not None or (tok_dir / "tokenizer.json").exists():
        tok = load_tokenizer(tok_dir)
    else:
        docs = load_documents(cfg)
        tok = train_tokenizer(docs, cfg.tokenizer.vocab_size, tok_dir)
    tok_hash = tokenizer_hash(tok)
    fp = fingerprint(files, tok_hash, cfg)

    packed_path = layout.packed_blocks(fp)
    if packed_path.exists():
        blocks = load_file(str(packed_path))
        return PackedData(blocks["train"], blocks["val"], tok, fp, tok_hash)

    docs = docs if docs is not None else load_documents(cfg)
    docs = docs.map(lambda b: {"val": [_doc_in_val(t, cfg.val_fraction) for t in b["text"]]}, batched=True)
    block = cfg.seq_len + 1
    splits = {}
    for name, want_val in (("train", False), ("val", True)):
        part = docs.filter(lambda b: [v == want_val for v in b["val"]], batched=True)
        ids = part.map(lambda b: {"ids": tok(b["text"], add_special_tokens=False)["input_ids"]},
                       batched=True, remove_columns=part.column_names)
        splits[name] = pack(ids["ids"] if len(ids) else [], tok.eos_token_id, block)
    if cfg.max_train_blocks is not None:
        splits["train"] = splits["train"][: cfg.max_train_blocks]
    if cfg.max_val_blocks is not None:
        splits["val"] = splits["val"][: cfg.max_val_blocks]
    for name, t in splits.items():
        if len(t) == 0:
            raise UserError(f"data: the {name} split has no complete block of {block} tokens; "
                            f"add data, lower data.seq_len or raise data.val_fraction")
    packed_path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(packed_path, save({k: v.contiguous() for k, v in splits.items()}, metadata={"fingerprint": fp}))
    return PackedData(splits["train"], splits["val"], tok, fp, tok_hash)
