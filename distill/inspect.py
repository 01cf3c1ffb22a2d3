"""`distill inspect PATH`: describe (and verify) a cache, a checkpoint or a model dir."""
from __future__ import annotations

import json
from pathlib import Path

from rich.console import Console
from rich.table import Table

from distill.errors import UserError


def _table(title: str, rows: dict) -> Table:
    t = Table(title=title, show_header=False)
    for k, v in rows.items():
        t.add_row(str(k), json.dumps(v) if isinstance(v, (dict, list)) else str(v))
    return t


def inspect_path(path: Path, verify: bool = False) -> bool:
    """Print a summary; returns False when verification finds a problem."""
    from distill import checkpoint

    console = Console()
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path} does not exist")
    if (path / "manifest.json").exists():
        from distill.cache_reader import describe_cache, verify_cache

        console.print(_table(f"cache {path}", describe_cache(path)))
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
