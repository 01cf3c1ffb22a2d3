"""Per-student training checkpoints, written atomically, last K kept.

Layout: OUT/students/NAME/checkpoints/step_00000100/
    model.safetensors   the student's weights (stock transformers names)
    config.json         the transformers config (so `distill export` needs nothing else)
    state.pt            optimizer, LR scheduler, RNG states, counters, expert biases; only
                        tensors and plain Python values, read back with weights_only=True
    meta.json           step, run identity hash, written last inside the temp dir

The whole dir is written under a temp name and renamed, so a crash leaves either the
previous checkpoint or the complete new one.  `latest()` only trusts dirs with meta.json.

Students commit together: a step's checkpoints are published one student after another,
then OUT/students/committed.json ({student: step}) is rewritten atomically, last.  Until
then the step does not exist for `latest()` (so for --resume, export and inspect): a kill
between two students' saves resumes every student from the step committed before, and
pruning (after the commit) never removes a student's committed step.
"""
from __future__ import annotations

import json
import os
import pickle
import signal
import time
import random
import re
import shutil
import zipfile
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from common.errors import UserError
from common.fsutil import atomic_write_json, staged_dir
from students.build import safetensors_problem

STEP_DIR = re.compile(r"^step_(\d{8})$")
COMMITTED = "committed.json"  # in OUT/students: {"students": {name: step}}
# Fault injection for tests: the process kills itself (SIGKILL, as a crash would) after this
# many student checkpoints were published.
KILL_AFTER_SAVES = "DISTILL_TEST_KILL_AFTER_CHECKPOINTS"
_saves_published = 0


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


def step_of(ckpt: Path) -> int:
    return int(STEP_DIR.match(ckpt.name).group(1))


def _marker(ckpt_root: Path) -> Path:
    """OUT/students/NAME/checkpoints -> OUT/students/committed.json."""
    return ckpt_root.parent.parent / COMMITTED


def committed_steps(students_dir: Path) -> dict[str, int]:
    """{student: its last committed step} of a run's students dir ({}: none committed yet,
    or a run from before commit markers)."""
    path = students_dir / COMMITTED
    return _read_committed(path) if path.exists() else {}


def _read_committed(path: Path) -> dict[str, int]:
    try:
        steps = json.loads(path.read_text())["students"]
        if isinstance(steps, dict) and all(isinstance(v, int) for v in steps.values()):
            return steps
        problem = "not a map of student to step"
    except (OSError, ValueError, KeyError, TypeError) as e:
        problem = type(e).__name__
    raise UserError(f"{path}: the run's commit marker is unreadable ({problem}); it is written whole, so something "
                    f"else changed it: restore it, or delete it to count every complete checkpoint as committed")


def committed_step(ckpt_root: Path) -> int | None:
    """The committed step of the student whose checkpoints are under `ckpt_root`; None when
    the run has no commit marker (then every complete checkpoint counts, as before)."""
    path = _marker(ckpt_root)
    if not path.exists():
        return None
    return _read_committed(path).get(ckpt_root.parent.name, 0)


def latest(ckpt_root: Path) -> Path | None:
    """The newest committed checkpoint (a step published by some students but not yet
    committed by all is not one)."""
    dirs = step_dirs(ckpt_root)
    step = committed_step(ckpt_root)
    if step is not None:
        dirs = [d for d in dirs if step_of(d) <= step]
    return dirs[-1] if dirs else None


def commit(students_dir: Path, steps: dict[str, int], keep_last: int) -> None:
    """Mark each student's checkpoint at `steps[name]` as committed, in one atomic write
    (the other students' entries kept), then prune each of them: the newest `keep_last`
    committed checkpoints stay, any newer uncommitted one (from a killed run) goes."""
    atomic_write_json(students_dir / COMMITTED, {"students": {**committed_steps(students_dir), **steps}})
    for name, step in steps.items():
        root = students_dir / name / "checkpoints"
        kept = [d for d in step_dirs(root) if step_of(d) <= step][-keep_last:]
        for old in step_dirs(root):
            if old not in kept:
                # Renamed first, so a reader (`distill export` during the run) sees the step whole or
                # gone, never its dir without its files; a kill mid-removal leaves a .pruned- dir.
                gone = root / f".pruned-{old.name}"
                shutil.rmtree(gone, ignore_errors=True)
                old.rename(gone)
                shutil.rmtree(gone, ignore_errors=True)
                shutil.rmtree(root / "deepspeed" / old.name, ignore_errors=True)  # the same tag
        for left in root.glob(".pruned-*"):  # an earlier kill's
            shutil.rmtree(left, ignore_errors=True)


def earlier_checkpoints(students_dir: Path) -> dict[str, int]:
    """{student: newest step} of every student under `students_dir` that has any checkpoint
    dir, committed or not, whatever its name: what a fresh run into this dir would mix with
    (a renamed or dropped student's too: its steps would stay in the commit marker)."""
    dirs = sorted(d for d in students_dir.iterdir() if d.is_dir()) if students_dir.is_dir() else []
    found = {d.name: step_dirs(d / "checkpoints") for d in dirs}
    return {n: step_of(steps[-1]) for n, steps in found.items() if steps}


def _fault_injection() -> None:
    global _saves_published
    _saves_published += 1
    if os.environ.get(KILL_AFTER_SAVES) == str(_saves_published):
        os.kill(os.getpid(), signal.SIGKILL)
        time.sleep(60)  # never returns


def save(ckpt_root: Path, step: int, model: torch.nn.Module, state: dict, meta: dict,
         weights: dict | None = None) -> Path:
    """Write step_{step}/ atomically (not committed yet: see `commit`, which also prunes).
    weights: the model's full state dict when the model itself holds only partitions
    (ZeRO-3); default model.state_dict()."""
    final = ckpt_root / f"step_{step:08d}"
    with staged_dir(final) as tmp:
        weights = {k: v.detach().contiguous().cpu() for k, v in (weights or model.state_dict()).items()}
        save_file(_untie(weights), str(tmp / "model.safetensors"), metadata={"format": "pt"})
        model.config.to_json_file(str(tmp / "config.json"))
        torch.save(state, tmp / "state.pt")
        atomic_write_json(tmp / "meta.json", {**meta, "step": step})
    _fault_injection()
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
    try:
        meta = json.loads((ckpt / "meta.json").read_text())
    except (OSError, ValueError) as e:
        meta = type(e).__name__
    if not isinstance(meta, dict):
        problem = meta if isinstance(meta, str) else "not a JSON object"
        raise UserError(f"{ckpt / 'meta.json'}: checkpoint is unreadable ({problem}); delete this step dir to fall "
                        f"back to the previous one")
    return meta


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


def checkpoint_problems(ckpt: Path) -> list[str]:
    """What `distill inspect --verify` finds wrong with a checkpoint step dir, one line each:
    meta.json and config.json unreadable, model.safetensors whose header does not cover the
    file, and every torch file (state.pt, DeepSpeed's partitions) that is no complete zip or
    whose members fail their CRC-32 (torch.save records one per member, the pickle and each
    tensor: a byte flipped in them shows; one in the zip's alignment padding, which no load
    reads, passes).  The safetensors weights carry no checksum: a byte flipped inside them passes."""
    problems = []
    for name in ("meta.json", "config.json"):
        try:
            if not isinstance(json.loads((ckpt / name).read_text()), dict):
                problems.append(f"{ckpt / name}: not a JSON object")
        except (OSError, ValueError) as e:
            problems.append(f"{ckpt / name}: unreadable ({type(e).__name__})")
    weights = ckpt / "model.safetensors"
    damaged = safetensors_problem(weights) if weights.exists() else f"{ckpt}: no model.safetensors"
    problems += [damaged] if damaged else []
    partitions = ckpt.parent / "deepspeed" / ckpt.name  # DeepSpeed's files of this step (engines.py)
    for file in sorted(ckpt.rglob("*.pt")) + sorted(partitions.rglob("*.pt")):
        try:
            with zipfile.ZipFile(file) as archive:
                bad = archive.testzip()
        except Exception as e:  # a damaged zip directory raises more than BadZipFile (EOFError, NotImplementedError, ...)
            problems.append(f"{file}: unreadable ({type(e).__name__}: {str(e)[:200]})")
            continue
        if bad is not None:
            problems.append(f"{file}: damaged (member {bad} fails its CRC)")
    return [p + "; delete this step dir to fall back to the previous one" for p in problems]


def load_weights(ckpt: Path, model: torch.nn.Module, what_to_do: str) -> tuple[list[str], list[str]]:
    """A checkpoint's model.safetensors into `model` (strict=False) -> (missing, unexpected)
    names; an unreadable file is one line naming it, ending with `what_to_do`."""
    try:
        weights = load_file(str(ckpt / "model.safetensors"))
    except Exception as e:
        raise UserError(f"{ckpt / 'model.safetensors'}: unreadable ({type(e).__name__}); {what_to_do}") from None
    return model.load_state_dict(weights, strict=False)


DATA_KEY = "data (its fingerprint)"  # the run identity's data entry (distill/stages.py::run_identity)


def identity_changes(then: dict, now: dict) -> str:
    """What differs between two named run identities (distill/stages.py), e.g. "train.steps
    60 -> 70; student dense: optim"."""
    said = []
    for key in dict.fromkeys([*now, *then]):
        a, b = then.get(key), now.get(key)
        if a == b:
            continue
        if key == "students" and isinstance(a, list) and isinstance(b, list):
            names_then, names_now = [s.get("name") for s in a], [s.get("name") for s in b]
            if names_then != names_now:
                said.append(f"students {names_then} -> {names_now}")
            else:
                for x, y in zip(a, b):
                    fields = [k for k in dict.fromkeys([*y, *x]) if x.get(k) != y.get(k)]
                    if fields:
                        said.append(f"student {y.get('name')}: {', '.join(fields)}")
        elif isinstance(a, (int, float, str, type(None))) and isinstance(b, (int, float, str, type(None))):
            said.append(f"{key} {a} -> {b}")
        else:
            said.append(key)
    return "; ".join(said)


def load(ckpt: Path, model: torch.nn.Module | None, expected_run_hash: str | None,
         expected_identity: dict | None = None, also: tuple[str, ...] = (), data_content: str | None = None) -> dict:
    """Load weights into `model` (None: only check and read the state) and return the saved
    training state.  expected_identity: the run's named identity, to say what changed; also:
    the hashes the same run had under earlier rules (accepted too); data_content: what the
    prepared blocks hold (distill/blocks.py content_digest), checked where the checkpoint has it."""
    meta = load_meta(ckpt)
    if expected_run_hash is not None and meta.get("run_hash") not in (expected_run_hash, *also):
        then = meta.get("run_identity") if isinstance(meta.get("run_identity"), dict) else None
        changes = identity_changes(then, expected_identity) if then and expected_identity else ""
        only_data = changes and set(then) == set(expected_identity) and \
            then.get(DATA_KEY) != expected_identity.get(DATA_KEY) and \
            all(then.get(k) == v for k, v in expected_identity.items() if k != DATA_KEY)
        if only_data:
            raise UserError(f"{ckpt}: this checkpoint was made from other data (its fingerprint "
                            f"{then.get(DATA_KEY)} -> {expected_identity[DATA_KEY]}: a data file, the tokenizer or a "
                            f"data setting changed); resume with the data it was trained on, or start afresh in this "
                            f"out_dir with --overwrite")
        what = (f"another config ({changes})" if changes else
                f"a different config (run hash {meta.get('run_hash')} != {expected_run_hash})")
        # More steps is the change users most often mean to make: the LR schedule spans
        # train.steps, so the steps taken would have had other rates.  Training on goes through
        # the exports, as a new run.
        export_them = ("`distill export` them and start a new run (another out_dir) with students.N.model.path set "
                       "to each export")
        if then and expected_identity:
            further = (f"; to train these students further, {export_them}"
                       if then.get("train.steps") != expected_identity.get("train.steps") else "")
        else:  # a checkpoint from before 2026-12-03 records no identity: what changed is not known
            further = f"; if train.steps changed, to train these students further, {export_them}"
        raise UserError(f"{ckpt}: this checkpoint was made by {what}; resume with the config that made it, or "
                        f"start afresh in this out_dir with --overwrite{further}")
    # After the fingerprint (in the run hash): other content under the same fingerprint is the case left.
    if data_content is not None and meta.get("data_content") not in (None, data_content):
        raise UserError(f"{ckpt}: this checkpoint was trained on other blocks of data with the same fingerprint: the "
                        f"data was prepared again and came out different (an edit that kept a large file's size, "
                        f"which the fingerprint's sampling missed); resume with the data it was trained on, or "
                        f"start afresh in this out_dir with --overwrite")
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
