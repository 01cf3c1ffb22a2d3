"""`distill inspect PATH`: describe (and verify) a cache, a checkpoint or a model dir."""
from __future__ import annotations

import json
from pathlib import Path

from rich.console import Console
from rich.table import Table

from common.errors import UserError


def _table(title: str, rows: dict) -> Table:
    t = Table(title=title, show_header=False)
    for k, v in rows.items():
        t.add_row(str(k), json.dumps(v) if isinstance(v, (dict, list)) else str(v))
    return t


def human_bytes(n: int) -> str:
    """1234567 -> '1.2 MB' (decimal units, as disks are sold)."""
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:,.0f} {unit}" if unit == "B" else f"{n:,.1f} {unit}"
        n /= 1000
    return f"{n} B"


def cache_rows(d: dict) -> dict:
    """`describe_cache`'s summary as rounded, human rows."""
    bpt = d["bytes_per_token"]
    rows = {"format": f"v{d['format_version']}, {'complete' if d['complete'] else 'INCOMPLETE'}",
            "estimator": d["estimator"], "encoding": d["encoding"], "k": d["k"], "vocab_size": f"{d['vocab_size']:,}", "seq_len": f"{d['seq_len']:,}",
            "tokens": f"{d['tokens']:,}", "size": f"{human_bytes(d['bytes'])} in {d['shards']:,} shards",
            "bytes/token": "-" if bpt is None else f"{bpt:.1f}", "non-finite tokens": f"{d['nonfinite_tokens']:,}"}
    for name, sp in d["splits"].items():
        rows[f"split {name}"] = (f"{sp['sequences']:,} sequences, {sp['tokens']:,} tokens, {sp['shards']:,} shards, "
                                 f"{human_bytes(sp['bytes'])}")
    rows.update({f"identity.{k}": v for k, v in d["identity"].items()})
    return rows


def inspect_path(path: Path, verify: bool = False) -> bool:
    """Print a summary; returns False when verification finds a problem."""
    from distill.train import checkpoint

    console = Console()
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path} does not exist")
    if (path / "manifest.json").exists():
        from teachers.cache.reader import describe_cache, verify_cache

        console.print(_table(f"cache {path}", cache_rows(describe_cache(path))))
        if verify:
            problems = verify_cache(path)
            for p in problems:
                console.print(f"[red]BAD[/red] {p}")
            console.print("verify: " + ("ok" if not problems else f"{len(problems)} problem(s)"))
            return not problems
        return True
    ckpt = path if (path / "meta.json").exists() else checkpoint.latest(path / "checkpoints") or checkpoint.latest(path)
    if ckpt is not None:
        meta = checkpoint.load_meta(ckpt)
        cfg = json.loads((ckpt / "config.json").read_text())
        console.print(_table(f"checkpoint {ckpt}", {
            "student": meta.get("student"), "step": meta.get("step"), "run_hash": meta.get("run_hash"),
            "architecture": cfg.get("model_type"), "vocab_size": cfg.get("vocab_size"),
            "data_fingerprint": meta.get("data_fingerprint")}))
        return True
    if (path / "config.json").exists():
        from students.presets import param_counts
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(str(path))
        total, active = param_counts(config)
        console.print(_table(f"model {path}", {"model_type": config.model_type, "vocab_size": config.vocab_size,
                                               "params_total": f"{total:,}", "params_active": f"{active:,}"}))
        return True
    raise UserError(f"{path}: not a cache (manifest.json), checkpoint (meta.json) or model dir (config.json)")
