"""Per-student training checkpoints, written atomically, last K kept.

Layout: OUT/students/NAME/checkpoints/step_00000100/
    model.safetensors   the student's weights (stock transformers names)
    config.json         the transformers config (so `distill export` needs nothing else)
    state.pt            optimizer, LR scheduler, RNG states, counters, expert biases; only
                        tensors and plain Python values, read back with weights_only=True
    meta.json           step, run identity hash, written last inside the temp dir

The whole dir is written under a temp name and renamed, so a crash leaves either the
previous checkpoint or the complete new one.  `latest()` only trusts dirs with meta.json.
"""
from __future__ import annotations

import json
import pickle
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from common.errors import UserError
from common.fsutil import atomic_write_json, describe_os_error, publish_dir, writable_temp_dir

STEP_DIR = re.compile(r"^step_(\d{8})$")


def rng_state() -> dict:
    """Every RNG stream, as tensors and plain values only, so `torch.load(weights_only=True)`
    reads it back: numpy's (624,) uint32 key array is stored as an int64 tensor."""
    kind, key, pos, has_gauss, cached = np.random.get_state()
    state = {"python": random.getstate(), "torch": torch.get_rng_state(),
             "numpy": (kind, torch.from_numpy(key.astype(np.int64)), int(pos), int(has_gauss), float(cached))}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    kind, key, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, key.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def step_dirs(ckpt_root: Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    if not ckpt_root.is_dir():
        return []
    found = [p for p in ckpt_root.iterdir() if STEP_DIR.match(p.name) and (p / "meta.json").exists()]
    return sorted(found, key=lambda p: int(STEP_DIR.match(p.name).group(1)))


def latest(ckpt_root: Path) -> Path | None:
    dirs = step_dirs(ckpt_root)
    return dirs[-1] if dirs else None


def save(ckpt_root: Path, step: int, model: torch.nn.Module, state: dict, meta: dict, keep_last: int,
         weights: dict | None = None) -> Path:
    """Write step_{step}/ atomically; drop all but the newest `keep_last` (DeepSpeed's own
    checkpoint dirs under deepspeed/ too).  weights: the model's full state dict when the
    model itself holds only partitions (ZeRO-3); default model.state_dict()."""
    final = ckpt_root / f"step_{step:08d}"
    tmp = writable_temp_dir(final)
    try:
        weights = {k: v.detach().contiguous().cpu() for k, v in (weights or model.state_dict()).items()}
        save_file(_untie(weights), str(tmp / "model.safetensors"), metadata={"format": "pt"})
        model.config.to_json_file(str(tmp / "config.json"))
        torch.save(state, tmp / "state.pt")
        atomic_write_json(tmp / "meta.json", {**meta, "step": step})
        publish_dir(tmp, final)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise UserError(describe_os_error(e, final)) from e
    except UserError:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for old in step_dirs(ckpt_root)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
        shutil.rmtree(ckpt_root / "deepspeed" / old.name, ignore_errors=True)  # the same tag
    return final


def _untie(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """safetensors refuses shared storage (tied embeddings); store independent copies."""
    seen: dict[int, str] = {}
    out = {}
    for k, v in weights.items():
        ptr = v.untyped_storage().data_ptr()
        out[k] = v.clone() if ptr in seen else v
        seen.setdefault(ptr, k)
    return out


def load_meta(ckpt: Path) -> dict:
    return json.loads((ckpt / "meta.json").read_text())


def load_state(ckpt: Path) -> dict:
    """The training state, unpickled with weights_only=True: tensors, numbers, strings and
    containers only.  A state.pt holding any other object (someone else's checkpoint could
    carry code that runs on unpickling) is refused, never executed."""
    try:
        return torch.load(ckpt / "state.pt", weights_only=True)
    except pickle.UnpicklingError:
        raise UserError(f"{ckpt / 'state.pt'}: refused, it holds Python objects other than tensors and plain "
                        f"values (unpickling it could run code); use a checkpoint this toolkit wrote, or delete "
                        f"this step dir to fall back to the previous one") from None
    except Exception as e:
        raise UserError(f"{ckpt / 'state.pt'}: checkpoint is unreadable ({type(e).__name__}); "
                        f"delete this step dir to fall back to the previous one") from None


def load_weights(ckpt: Path, model: torch.nn.Module, what_to_do: str) -> tuple[list[str], list[str]]:
    """A checkpoint's model.safetensors into `model` (strict=False) -> (missing, unexpected)
    names; an unreadable file is one line naming it, ending with `what_to_do`."""
    try:
        weights = load_file(str(ckpt / "model.safetensors"))
    except Exception as e:
        raise UserError(f"{ckpt / 'model.safetensors'}: unreadable ({type(e).__name__}); {what_to_do}") from None
    return model.load_state_dict(weights, strict=False)


def load(ckpt: Path, model: torch.nn.Module | None, expected_run_hash: str | None) -> dict:
    """Load weights into `model` (None: only check and read the state) and return the saved
    training state."""
    meta = load_meta(ckpt)
    if expected_run_hash is not None and meta.get("run_hash") != expected_run_hash:
        raise UserError(
            f"{ckpt}: this checkpoint was made by a different config (run hash {meta.get('run_hash')} "
            f"!= {expected_run_hash}); resume with the config that made it, or start a new out_dir")
    state = load_state(ckpt)
    if model is None:
        return state
    missing, unexpected = load_weights(ckpt, model, "delete this step dir to fall back to the previous one")
    # Tied lm_head may be absent or present depending on the model; anything else is an error.
    missing = [m for m in missing if not m.endswith("lm_head.weight")]
    if missing or unexpected:
        raise UserError(f"{ckpt}: weights do not fit this student (missing {missing[:3]}, "
                        f"unexpected {unexpected[:3]}); the checkpoint is from another config")
    return state
