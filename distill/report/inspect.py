"""`distill inspect PATH`: describe (and verify) prepared data, a cache, a checkpoint or a model dir."""
from __future__ import annotations

import json
from pathlib import Path

from rich.console import Console
from rich.table import Table

from common.errors import UserError
from common.fsutil import human_bytes
from distill.chat import PackCounts, cut_share


def _table(title: str, rows: dict) -> Table:
    t = Table(title=title, show_header=False, min_width=len(title))  # the title (a path) unwrapped where it fits
    for k, v in rows.items():
        t.add_row(str(k), json.dumps(v) if isinstance(v, (dict, list)) else str(v))
    return t


def cache_rows(d: dict) -> dict:
    """`describe_cache`'s summary as rounded, human rows."""
    bpt = d["bytes_per_token"]
    rows = {"format": f"v{d['format_version']}, {'complete' if d['complete'] else 'INCOMPLETE'}",
            "estimator": d["estimator"], "encoding": d["encoding"], "k": d["k"], "vocab_size": f"{d['vocab_size']:,}", "seq_len": f"{d['seq_len']:,}",
            "tokens": f"{d['tokens']:,}", "size": f"{human_bytes(d['bytes'])} in {d['shards']:,} shards",
            "bytes/token": "-" if bpt is None else f"{bpt:.1f}",
            "stored": (f"{d['stored_tokens']:,} tokens ("
                       + ("training targets only" if d["stored_positions"] == "targets" else "every position") + "), "
                       + ("-" if d["bytes_per_stored_token"] is None else f"{d['bytes_per_stored_token']:.1f} bytes each")),
            "bytes/block": "-" if d["bytes_per_block"] is None else f"{d['bytes_per_block']:,.0f}",
            "non-finite tokens": f"{d['nonfinite_tokens']:,}"}
    for name, sp in d["splits"].items():
        rows[f"split {name}"] = (f"{sp['sequences']:,} sequences, {sp['tokens']:,} tokens, {sp['shards']:,} shards, "
                                 f"{human_bytes(sp['bytes'])}")
    rows.update({f"identity.{k}": v for k, v in d["identity"].items()})
    return rows


def data_rows(root: Path, m: dict) -> dict:
    """A prepared data dir's manifest (distill/blocks.py) as human rows."""
    files = [p for p in root.iterdir() if p.is_file() and not p.name.startswith(".")]
    size = sum(p.stat().st_size for p in files)
    splits = m["splits"].values()
    shards = sum(len(s["shards"]) for s in splits)
    blocks = sum(s["blocks"] for s in splits)
    stored = sum(s["blocks_packed"] for s in splits)  # the shards hold them all: a max_*_blocks cut is made when read
    tokenised, chat = sum(s["documents"] for s in splits), sum(s["chat_rows"] for s in splits)
    documents = f"{m['documents']:,}"
    if tokenised < m["documents"]:  # data.max_*_blocks: documents past the cut were never tokenised
        documents += f" in the corpus, {tokenised:,} tokenised (data.max_train_blocks / max_val_blocks needed no more)"
    ends = ("an EOS after each plain document" if not chat else "chat rows as their template writes them"
            if chat == tokenised else "an EOS after each plain document; chat rows as their template writes them")
    rows = {"fingerprint": m["fingerprint"], "tokenizer_hash": m["tokenizer_hash"],
            "documents": documents, "tokens": f"{m['tokens']:,} (tokenised; {ends})",
            "blocks": f"{blocks:,} of {m['seq_len'] + 1:,} tokens (seq_len {m['seq_len']:,})",
            "packing": m.get("packing", "concat") + (" (each row its own context)" if m.get("packing") == "documents"
                                                      else " (one stream a block)"),
            "storage": f"{m['dtype']} ids" + (" + target bit mask" if m["masked"] else "")
                       + (" + row start bits" if m.get("packing") == "documents" else ""),
            "size": f"{human_bytes(size)} in {shards:,} shards ({size / max(1, stored * (m['seq_len'] + 1)):.2f} "
                    f"bytes/token)"}
    from distill.blocks import open_blocks

    for name, blocks_of in open_blocks(root).items():
        sp = m["splits"][name]
        cut = f" (of {sp['blocks_packed']:,} packed)" if sp["blocks_packed"] != sp["blocks"] else ""
        rows[f"split {name}"] = (f"{sp['documents']:,} documents, {sp['tokens']:,} tokens, {sp['blocks']:,} blocks{cut}, "
                                 f"{len(sp['shards']):,} shards")
        if m["masked"]:  # prompts, padding and (documents packing) each row's first token are no target
            try:
                targets, positions = int(blocks_of.target_counts().sum()), sp["blocks"] * m["seq_len"]
            except (OSError, ValueError):  # a damaged shard: --verify names it
                rows[f"split {name}"] += "; targets unreadable (a damaged shard: --verify names it)"
                continue
            rows[f"split {name}"] += f"; {targets:,} targets ({targets / max(1, positions):.0%} of the positions)"
        counts = PackCounts(**sp.get("chat_rows_packing", {}))
        if counts.truncated:  # the preparation's [data] lines, which a reuse of the data does not repeat
            rows[f"split {name}"] += (f"; {counts.truncated:,} of {sp['chat_rows']:,} chat rows truncated to the block"
                                      f"{cut_share(counts)}")
        if counts.bad_rows:
            rows[f"split {name}"] += (f"; {counts.bad_rows:,} of {sp['chat_rows']:,} chat rows skipped as bad "
                                      f"(data.bad_rows: skip)")
    return rows


def _prepared_dirs(path: Path) -> list[tuple[Path, dict]]:
    """OUT/data/blocks-FP (or every one under OUT/data) with a complete manifest."""
    from distill.blocks import read_manifest

    roots = [path] if (path / "manifest.json").exists() else sorted(path.glob("blocks-*"))
    return [(r, m) for r in roots if (m := read_manifest(r)) is not None]


BARS = " ▁▂▃▄▅▆▇█"


def bars(counts: list[int]) -> str:
    """[0, 3, 9, 1] -> ' ▃█▁': one character per bin, scaled to the largest."""
    top = max(counts) or 1
    return "".join(BARS[0 if c == 0 else max(1, round(8 * c / top))] for c in counts)


def difficulty_rows(stats) -> dict:
    """Per statistic of (N, 4) per-sequence stats: quantiles and a histogram line."""
    from distill.train.selection import histogram
    from losses.difficulty import STATS

    rows = {}
    for j, name in enumerate(STATS):
        col = stats[:, j]
        col = col[col.isfinite()].double()
        if col.numel() == 0:
            rows[name] = "no scored sequence"
            continue
        q = col.quantile(col.new_tensor([0.1, 0.5, 0.9])).tolist()
        lo, hi = float(col.min()), float(col.max())
        rows[name] = f"mean {float(col.mean()):.3f}  p10 {q[0]:.3f}  p50 {q[1]:.3f}  p90 {q[2]:.3f}"
        rows[f"{name} histogram"] = f"{lo:.3g} |{bars(histogram(col, lo, hi, 20))}| {hi:.3g}"
    return rows


def inspect_path(path: Path, verify: bool = False) -> bool:
    """Print a summary of what `path` is (prepared data, a cache, a checkpoint, a model dir, or a
    run's out_dir, each part of it in turn); returns False when verification finds a problem."""
    from distill.train import checkpoint

    console = Console()
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path} does not exist")
    prepared = _prepared_dirs(path) if path.is_dir() else []
    if prepared:
        return all([_inspect_prepared(console, root, manifest, verify) for root, manifest in prepared])
    if path.name.startswith("blocks-") and path.parent.name == "data":  # prepared data whose manifest is unreadable
        raise UserError(f"{path}: no complete prepared data (manifest.json missing or unreadable); the next command "
                        f"that reads the data prepares it again")
    if (path / "manifest.json").exists():
        return _inspect_cache(console, path, verify)
    ckpt = path if (path / "meta.json").exists() else checkpoint.latest(path / "checkpoints") or checkpoint.latest(path)
    if ckpt is not None:
        return _inspect_checkpoint(console, ckpt, verify)
    if (path / "config.json").exists() or (path / "distill_meta.json").exists():  # an export, its config lost too
        return _inspect_model(console, path, verify)
    parts = _run_parts(path)
    if parts:  # a run's out_dir: each thing in it (one unfinished, e.g. a killed preparation, said in a line)
        ok = True
        for part in parts:
            try:
                ok = inspect_path(part.parent if part.name == "checkpoints" else part, verify=verify) and ok
            except UserError as e:
                if not verify:
                    console.print(f"{part}: nothing complete to describe ({e})")
                    continue
                ok = _said(console, [f"{part}: {e}"]) and ok  # what cannot be described is no verified part
        return ok
    raise UserError(f"{path}: not prepared data, a cache (manifest.json), checkpoint (meta.json), model dir "
                    f"(config.json) or a run's out_dir (data/, cache/, students/)")


def _said(console: Console, problems: list[str]) -> bool:
    """Print verification's problems (one BAD line each) and its verdict; True when none."""
    for p in problems:
        console.print(f"[red]BAD[/red] {p}")
    console.print("verify: " + ("ok" if not problems else f"{len(problems)} problem(s)"))
    return not problems


def _inspect_prepared(console: Console, root: Path, manifest: dict, verify: bool) -> bool:
    console.print(_table(f"prepared data {root}", data_rows(root, manifest)))
    if not verify:
        return True
    from distill.blocks import verify_blocks

    return _said(console, verify_blocks(root))


def _inspect_cache(console: Console, path: Path, verify: bool) -> bool:
    from teachers.cache.reader import describe_cache, verify_cache

    console.print(_table(f"cache {path}", cache_rows(describe_cache(path))))
    _print_difficulty(console, path)
    return _said(console, verify_cache(path)) if verify else True


def _inspect_checkpoint(console: Console, ckpt: Path, verify: bool) -> bool:
    from distill.train import checkpoint

    problems = checkpoint.checkpoint_problems(ckpt) if verify else []
    try:
        meta = checkpoint.load_meta(ckpt)
    except UserError:
        if not verify:
            raise
        meta = {}  # described as far as it can be; the problems say what is damaged
    try:
        cfg = json.loads((ckpt / "config.json").read_text())
    except (OSError, ValueError):
        cfg = {}  # --verify says so
    cfg = cfg if isinstance(cfg, dict) else {}
    console.print(_table(f"checkpoint {ckpt}", {
        "student": meta.get("student"), "step": meta.get("step"), "run_hash": meta.get("run_hash"),
        "architecture": cfg.get("model_type"), "vocab_size": cfg.get("vocab_size"),
        "data_fingerprint": meta.get("data_fingerprint")}))
    return _said(console, problems) if verify else True


def _inspect_model(console: Console, path: Path, verify: bool) -> bool:
    from distill.report.export import export_problems
    from students.presets import param_counts
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(str(path))
    except (OSError, ValueError) as err:
        if not verify:
            raise UserError(f"{path / 'config.json'}: unreadable config ({str(err).splitlines()[0][:200]})") from None
        console.print(f"model {path}")
        return _said(console, export_problems(path)[0])
    text = config.get_text_config()  # a multimodal dir (Llama 4 as Meta ships it): its language model
    total, active = param_counts(text)
    kind = config.model_type if text is config else f"{config.model_type} (its text model, {text.model_type}, counted)"
    rows = {"model_type": kind, "vocab_size": text.vocab_size, "params_total": f"{total:,}",
            "params_active": f"{active:,}", "dtype": str(getattr(config, "dtype", None) or "-").removeprefix("torch.")}
    rows.update(_export_rows(path))
    console.print(_table(f"model {path}", rows))
    if not verify:
        return True
    problems, note = export_problems(path)
    if note:
        console.print(f"note: {note}")
    return _said(console, problems)


def _run_parts(out: Path) -> list[Path]:
    """What a run's out_dir holds that `inspect` describes, in order: data, cache, teacher (its
    own, or the checkpoint teacher outside OUT its students name), each student's checkpoints
    and export; empty for a dir that is no run's."""
    parts = [p for p in (out / "data", out / "cache", out / "teacher") if p.is_dir() and any(p.iterdir())]
    for student in sorted(p for p in (out / "students").glob("*") if p.is_dir()):
        parts += [p for p in (student / "checkpoints", student / "export") if p.is_dir() and any(p.iterdir())]
    teacher = _run_teacher(out)
    if teacher is not None and out / "teacher" not in parts:  # a checkpoint teacher outside OUT
        parts.insert(min(2, len(parts)), teacher)
    return parts


def _run_teacher(out: Path) -> Path | None:
    """The teacher dir a run's checkpoints name (its `teacher` meta), where it is a model dir."""
    from distill.train import checkpoint

    for ckpt_root in sorted(out.glob("students/*/checkpoints")):
        try:
            latest = checkpoint.latest(ckpt_root)
            teacher = checkpoint.load_meta(latest).get("teacher") if latest is not None else None
        except UserError:
            continue
        if teacher and (Path(teacher) / "config.json").is_file():
            return Path(teacher)
    return None


def _export_rows(path: Path) -> dict:
    """What a model dir this toolkit wrote was made from: an export's student, step and run
    (its distill_meta.json), a pretrained preset teacher's steps and held-out perplexity
    (pretrain_done.json); {} for any other model dir."""
    from distill.report.export import export_meta

    meta = export_meta(path)
    if meta.get("student"):
        return {"exported from": f"student {meta['student']}, step {meta.get('step', '?')}, "
                                 f"run hash {meta.get('run_hash', '?')}"}
    try:
        done = json.loads((path / "pretrain_done.json").read_text())
        return {"pretrained": f"{done['steps']:,} steps by `distill pretrain`, held-out perplexity {done['val_ppl']:.2f}"}
    except (OSError, ValueError, KeyError, TypeError):
        return {}


def _print_difficulty(console: Console, path: Path) -> None:
    """The teacher's per-sequence difficulty (mean over training targets), per split."""
    from teachers.cache.format import CacheCorrupt
    from teachers.cache.reader import CacheReader

    try:
        manifest = json.loads((path / "manifest.json").read_text())
        readers = [CacheReader(path, split) for split in manifest["splits"]]
    except (CacheCorrupt, OSError, ValueError, KeyError):
        return  # incomplete or damaged: the table above (and --verify) say so
    for reader in readers:
        if not reader.has_difficulty:
            console.print("teacher difficulty: not recorded in this cache (made before it was); "
                          "`distill cache --overwrite` records it")
            return
        stats = reader.sequence_stats()
        note = manifest.get("identity", {}).get("teacher_signal")  # a server teacher's: how entropy was estimated
        title = (f"teacher difficulty per sequence, split {reader.split} ({len(reader):,} sequences; mean over "
                 f"training targets; histogram min |...| max){'; ' + note if note else ''}")
        console.print(_table(title, difficulty_rows(stats)))
