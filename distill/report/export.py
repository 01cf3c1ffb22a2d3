"""Export a student checkpoint as a standard Hugging Face model dir.

Dense students are `LlamaForCausalLM`, MoE students `Llama4ForCausalLM`; the sparse MoE
forward is a runtime swap over stock parameter names, so the dir loads in stock
transformers with no project code.  The dir is written under a temp name and renamed.

A student trained with aux-loss-free balancing (`bias_update_rate > 0`) routes with an
expert bias that stock Llama 4 has no place for.  It cannot be folded into the router
exactly: it moves only which experts are picked, while a router bias would also move the
gates sigmoid(logit).  So the export drops it and says what that costs: the share of
held-out tokens whose experts change (`routing_note`), printed and in the model card.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from common.errors import UserError
from common.fsutil import sha256_file, staged_dir
from distill.chat import stop_ids
from distill.config import shard_size_problem
from distill.layout import RunLayout, has_tokenizer
from distill.train import checkpoint
from students.build import check_finite_weights, model_dir_problems
from students.presets import align_moe_step

META = "distill_meta.json"  # an export's record: which student, step and run, and its weights files' hashes
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_checkpoint(path: Path) -> Path:
    """A step dir, a checkpoints dir or a student dir -> the step dir to export."""
    path = Path(path)
    if (path / "meta.json").exists() and (path / "model.safetensors").exists():
        return path
    for root in (path, path / "checkpoints"):
        found = checkpoint.latest(root)
        if found is not None:
            return found
    steps = sorted(p.name for p in path.parent.glob("step_*") if (p / "meta.json").exists()) \
        if path.parent.is_dir() else []
    there = f"; the checkpoints beside it are {', '.join(steps[-3:])}" if steps else ""
    raise UserError(f"{path}: no checkpoint found (give a step dir such as step_00000030, holding model.safetensors "
                    f"and meta.json, its checkpoints dir or the student's dir for the latest){there}")


def load_checkpoint_model(ckpt: Path):
    """The stock transformers model a checkpoint holds (no sparse swap: export is stock)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(str(ckpt))
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = checkpoint.load_weights(ckpt, model, "export an earlier checkpoint")
    missing = [m for m in missing if not (m == "lm_head.weight" and config.tie_word_embeddings)]
    if missing or unexpected:
        raise UserError(f"{ckpt}: weights do not match config.json (missing {missing[:3]}, unexpected {unexpected[:3]})")
    return model


def _read_checkpoint(ckpt: Path, out: Path, overwrite: bool):
    """(meta, model, expert biases) of step dir `ckpt`, once `out` is known to be writable for
    it (before the weights are read); weights holding NaN or inf are refused: an export of them
    only fails its users later."""
    meta = checkpoint.load_meta(ckpt)
    meta.setdefault("student", ckpt.parent.parent.name)
    check_export_target(out, meta, overwrite, source=ckpt)
    model = load_checkpoint_model(ckpt)
    biases = checkpoint.load_state(ckpt).get("expert_bias", [])
    try:
        check_finite_weights(model)
    except ValueError as e:
        earlier = [d.name for d in checkpoint.step_dirs(ckpt.parent) if d != ckpt]
        hint = f" (the others here: {', '.join(earlier[-3:])})" if earlier else ""
        raise UserError(f"{ckpt}: {e}; export an earlier step{hint}") from None
    return meta, model, biases


def save_hf_dir(model, tokenizer, out: Path, dtype: str = "fp32", max_shard_size: str = "2GB",
                card: str | None = None, generation_config=None, state_dict: dict | None = None,
                meta: dict | None = None) -> Path:
    """save_pretrained + tokenizer + generation config (+ README.md), atomically.

    generation_config: kept as given (a pretrained student's own), plus the tokenizer's stop ids
    (`distill.chat.stop_ids`: EOS, and the chat template's end of turn where it is another token;
    completions and turns were trained to end with them); default: those and 64 new tokens.
    state_dict: the weights to save when the model holds only partitions of them (ZeRO-3).
    meta: what the export is of (`export_checkpoint`), published in the same rename as
    distill_meta.json with each file's size and SHA-256 (`files`; the model card aside, which
    eval rewrites), which `distill inspect --verify` and `distill eval` check."""
    from transformers import GenerationConfig

    if dtype not in DTYPES:
        raise UserError(f"--dtype {dtype!r}: choose one of {', '.join(DTYPES)}")
    if shard_size_problem(max_shard_size):
        raise UserError(f"--max-shard-size: {shard_size_problem(max_shard_size)}")
    out = Path(out)
    with staged_dir(out) as tmp:
        model = model.to(DTYPES[dtype])
        model.config.architectures = [type(model).__name__]
        if state_dict is not None:
            state_dict = {k: v.to(DTYPES[dtype]) for k, v in state_dict.items()}
        if dtype == "fp16":  # bf16 keeps fp32's range: only fp16 can turn finite weights into inf
            _check_range(state_dict if state_dict is not None else dict(model.named_parameters()), dtype)
        model.save_pretrained(str(tmp), max_shard_size=max_shard_size, safe_serialization=True, state_dict=state_dict)
        if generation_config is not None:
            for stop in stop_ids(tokenizer) if tokenizer is not None else []:
                _stop_at(generation_config, stop)
            generation_config.save_pretrained(str(tmp))
        if tokenizer is not None:
            _save_tokenizer(tokenizer, tmp, getattr(model.config, "max_position_embeddings", None))
        if tokenizer is not None and generation_config is None:
            eos = tokenizer.eos_token_id
            pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
            stops = stop_ids(tokenizer)  # EOS, and a chat template's end of turn where it is another token
            GenerationConfig(eos_token_id=stops[0] if len(stops) == 1 else stops or None,
                             bos_token_id=tokenizer.bos_token_id, pad_token_id=pad,
                             max_new_tokens=64).save_pretrained(str(tmp))
        if card is not None:
            (tmp / "README.md").write_text(card)
        if meta is not None:
            files = {f.name: {"bytes": f.stat().st_size, "sha256": sha256_file(f)}
                     for f in sorted(tmp.iterdir()) if f.is_file() and f.name != "README.md"}
            (tmp / META).write_text(json.dumps({**meta, "files": files}, indent=2, default=str))
    return out


def export_problems(path: Path) -> tuple[list[str], str | None]:
    """What `distill inspect --verify` and `distill eval` find wrong with a model dir ->
    (problems, one line each; a note on what could not be checked, or None).  Its structure
    (`model_dir_problems`), its config, and, for an export of this toolkit, every file it wrote
    against the size and SHA-256 recorded then: a flipped byte, a file deleted or truncated."""
    from transformers import AutoConfig

    problems = model_dir_problems(path)
    flagged = {p.split(":", 1)[0] for p in problems}  # a file already named is not named twice
    if (path / "config.json").is_file():
        try:
            AutoConfig.from_pretrained(str(path))
        except (OSError, ValueError) as err:
            problems.append(f"{path / 'config.json'}: unreadable config ({str(err).splitlines()[0][:200]})")
    recorded = export_meta(path).get("files")
    if not isinstance(recorded, dict):
        return problems, ("no recorded file hashes (not an export of this toolkit, or one made before they were "
                          "recorded): the weights' structure was checked, not their bytes")
    for name, want in recorded.items():
        file = path / name
        if str(file) in flagged or (name == "config.json" and not file.is_file()):
            continue
        if not file.is_file():
            problems.append(f"{file}: missing (the export wrote it)")
            continue
        want = want if isinstance(want, dict) else {}
        size = file.stat().st_size
        if size != want.get("bytes"):
            problems.append(f"{file}: damaged ({size:,} bytes, the export wrote {want.get('bytes', 0):,})")
        elif sha256_file(file) != want.get("sha256"):
            problems.append(f"{file}: damaged (its SHA-256 differs from the one recorded when it was written)")
    extra = sorted(f.name for f in path.glob("*.safetensors") if f.name not in recorded)
    if extra:
        problems.append(f"{path}: weights files the export did not write: {', '.join(extra)}")
    return problems, None


def _check_range(tensors: dict, dtype: str) -> None:
    """UserError when weights (finite before: export_checkpoint checks) overflowed `dtype`
    (fp16 stops at 65,504): an export of inf weights loads, and every answer is NaN."""
    bad = [(name, int((~torch.isfinite(t)).sum())) for name, t in tensors.items() if t.is_floating_point()]
    bad = [(name, n) for name, n in bad if n]
    if bad:
        where = "; ".join(f"{name}: {n:,}" for name, n in bad[:3]) + (f" and {len(bad) - 3} more" if len(bad) > 3 else "")
        raise UserError(f"--dtype {dtype}: weights past {dtype}'s range became inf ({where}); export with --dtype bf16 "
                        f"(fp32's range) or fp32 (export.dtype in a run's config)")


def _save_tokenizer(tokenizer, out: Path, max_positions: int | None) -> None:
    """tokenizer.save_pretrained, its model_max_length at most the model's positions: a
    tokenizer that sets none says 1e30 (ours 2**30), which truncation=True reads as no limit
    and a model past its positions answers with garbage.  The caller's tokenizer is unchanged."""
    own = tokenizer.model_max_length
    if max_positions and (own is None or own > max_positions):
        tokenizer.model_max_length = max_positions
    try:
        tokenizer.save_pretrained(str(out))
    finally:
        tokenizer.model_max_length = own
    _drop_load_options(out / "tokenizer_config.json")


# How the tokenizer was loaded here (offline, from a local dir), which transformers saves
# with it; a user of the export loads it their own way.
_LOAD_OPTIONS = ("is_local", "local_files_only")


def _drop_load_options(path: Path) -> None:
    if not path.exists():
        return
    config = json.loads(path.read_text())
    if any(key in config for key in _LOAD_OPTIONS):
        path.write_text(json.dumps({k: v for k, v in config.items() if k not in _LOAD_OPTIONS}, indent=2) + "\n")


def _stop_at(generation_config, eos: int | None) -> None:
    """Add `eos` to the config's stop ids, keeping its own (a base model's may be another token)."""
    have = generation_config.eos_token_id
    have = [] if have is None else [have] if isinstance(have, int) else list(have)
    if eos is not None and eos not in have:
        generation_config.eos_token_id = have + [eos] if have else eos


def model_card(name: str, meta: dict, metrics: dict | None = None) -> str:
    """A short model card: teacher, data, loss recipe, token budget, eval metrics."""
    sc = meta.get("student_config", {})
    loss = sc.get("loss", {})
    sched = loss.get("soft_weight", {})
    lines = [
        f"# {name}", "",
        "Distilled with the co-distillation toolkit (one teacher pass shared by several students).", "",
        "| field | value |", "|---|---|",
        f"| architecture | {_model_source(sc.get('model', {}))} |",
        f"| kind | {'CE-only baseline' if sc.get('baseline') else 'distilled'} |",
        f"| teacher | {teacher_name(meta)} |",
        f"| data fingerprint | {meta.get('data_fingerprint', '?')} |",
        f"| tokenizer hash | {meta.get('tokenizer_hash', '?')} |",
        f"| divergence | {loss.get('divergence', '-')} (T={loss.get('temperature', '-')}, tail={loss.get('tail', '-')}) |",
        f"| soft-weight schedule | {sched.get('kind', '-')} {sched.get('start', '-')} -> {sched.get('end', '-')} |",
        f"| hard target | {loss.get('hard_target', '-')} |",
        f"| steps | {meta.get('step', '?')} |",
        f"| train tokens (positions read) | {meta.get('tokens_seen', '?')} |",
        f"| training targets (tokens learnt from) | {meta.get('targets_seen') if meta.get('targets_seen') is not None else '?'} |",
    ]
    note = meta.get("routing_without_bias")
    if note:  # see routing_note: the exported router differs from the trained one
        share = note["tokens_changing_expert"]
        lines.append(f"| expert bias | {note['expert_bias']} |")
        lines.append("| tokens changing expert without it | " + (
            f"{share:.2%} of {note['held_out_tokens']:,} held-out tokens (per MoE layer: {note['per_layer']}) |"
            if isinstance(share, float) else f"{share} |"))
    for k, v in (metrics or {}).items():
        lines.append(f"| {k} | {v:.4g} |" if isinstance(v, float) else f"| {k} | {v} |")
    lines += ["", "Load with `transformers.AutoModelForCausalLM.from_pretrained(dir)`.", ""]
    return "\n".join(lines)


def teacher_name(meta: dict) -> str:
    """The teacher as a reader of the card knows it: a served model's name, else its dir's
    (`_model_name`); the absolute path on the machine that trained stays in distill_meta.json."""
    served = (meta.get("teacher_identity") or {}).get("teacher_server_model")
    if served:
        return f"{served} (served)"
    return _model_name(meta["teacher"]) if meta.get("teacher") else "?"


def _model_name(path: str) -> str:
    """A model dir's name: the Hub id of a Hugging Face cache path (`.../models--ORG--NAME/
    snapshots/SHA`), else the dir's own name."""
    parts = Path(path).parts
    for i, part in enumerate(parts[:-1]):
        if part.startswith("models--") and parts[i + 1] == "snapshots":
            return part[len("models--"):].replace("--", "/")
    return Path(path).name


def _model_source(model: dict) -> str:
    if model.get("path"):
        return f"pretrained {_model_name(model['path'])}"
    return model.get("preset") or ("cut from the teacher" if model.get("from_teacher") is not None else "?")


def _source_generation_config(meta: dict):
    """The generation_config.json (sampling defaults, stop ids) of the model a student came
    from, if it had one: a pretrained student's own, a student cut from the teacher the
    teacher's."""
    from transformers import GenerationConfig

    model = (meta.get("student_config") or {}).get("model", {})
    src = model.get("path") or (meta.get("teacher") if model.get("from_teacher") is not None else None)
    if src and (Path(src) / "generation_config.json").exists():
        return GenerationConfig.from_pretrained(src)
    return None


def _find_tokenizer_dir(ckpt: Path, meta: dict) -> Path | None:
    """The tokenizer the run trained with: the dir its checkpoints record (runs from before
    they did: the run's own OUT/tokenizer, then the teacher's dir)."""
    recorded = [meta.get("tokenizer")]
    recorded += [parent / "tokenizer" for parent in ckpt.parents]  # .../OUT/students/NAME/checkpoints/step_N
    recorded += [meta.get("teacher")]
    for candidate in recorded:
        if candidate and has_tokenizer(candidate):
            return Path(candidate)
    return None


def _held_out_blocks(ckpt: Path, meta: dict, n: int = 32):
    """The run's first `n` validation blocks (`Blocks`, (N, T+1)), found from the checkpoint's run dir."""
    if len(ckpt.parents) < 4 or "data_fingerprint" not in meta:
        return None
    packed = RunLayout(ckpt.parents[3]).packed_blocks(meta["data_fingerprint"])  # OUT/students/NAME/checkpoints/step_N
    if not (packed / "manifest.json").exists():
        return None
    from distill.blocks import first_blocks, open_blocks

    return first_blocks(open_blocks(packed)["val"], n)


@torch.no_grad()
def routing_note(model, biases: list[torch.Tensor], held_out, batch_size: int = 8) -> dict:
    """What dropping the expert bias does: share of held-out tokens (blocks (N, T+1), `Blocks`
    or a tensor, signed ids) for which some MoE layer picks another expert without it, router
    inputs from the model with the bias, each packed row read alone (its position ids).  {} when
    the bias is zero everywhere (nothing is lost)."""
    from distill.blocks import block_positions
    from students.sparse_moe import enable_sparse_moe, routing_changes_without_bias, set_expert_biases

    if not any(bool(b.abs().sum()) for b in biases):
        return {}
    note = {"expert_bias": "dropped: stock Llama 4 has no expert bias and it cannot be folded exactly "
                           "(it moves the expert choice, not the gates)"}
    if held_out is None or not len(held_out):
        note["tokens_changing_expert"] = "not measured: no held-out data found for this run"
        return note
    enable_sparse_moe(model)
    set_expert_biases(model, biases)
    changed, per_layer, n = 0, 0, 0
    for start in range(0, len(held_out), batch_size):
        rows = slice(start, min(start + batch_size, len(held_out)))
        x = held_out[rows][:, :-1]  # (B, T): a masked (untrained) position's id is stored as -(id + 1)
        pos = block_positions(held_out, rows)
        model.model(input_ids=torch.where(x < 0, -x - 1, x), position_ids=None if pos is None else pos[:, :-1])
        tokens, layers = routing_changes_without_bias(model)  # (N,) bool, (L,) counts
        changed, per_layer, n = changed + int(tokens.sum()), per_layer + layers, n + tokens.numel()
    set_expert_biases(model, [torch.zeros_like(b) for b in biases])  # export what stock code will run
    note.update(tokens_changing_expert=changed / max(n, 1), held_out_tokens=n,
                per_layer=[round(int(c) / max(n, 1), 4) for c in per_layer])
    return note


def export_meta(out: Path) -> dict:
    """An export dir's distill_meta.json (which student, which run), or {}."""
    try:
        meta = json.loads((Path(out) / META).read_text())
    except (OSError, ValueError):
        return {}
    return meta if isinstance(meta, dict) else {}


def _run_files(out: Path, source: Path | None) -> str | None:
    """What in `out` no export may replace, even with --overwrite: the checkpoint being
    exported (`out` is it or holds it) or a training run's files; None when there is none."""
    resolved = out.resolve()
    if source is not None and (resolved == source.resolve() or resolved in source.resolve().parents):
        return f"the checkpoint being exported ({source})"
    if (out / "students").is_dir() or (out / "committed.json").exists():
        return "a training run's students and checkpoints"
    if (out / "meta.json").exists() and (out / "state.pt").exists():
        return "a training checkpoint"
    if (out / "manifest.json").exists():
        return "a teacher cache or prepared data (manifest.json)"
    return None


def check_export_target(out: Path, meta: dict, overwrite: bool, source: Path | None = None) -> None:
    """An export replaces `out` whole, so it may replace only nothing, an empty dir or an
    earlier export of the same student of the same run (a re-export); anything else is
    someone's files, replaced only with `overwrite`.  A file, the checkpoint `source` being
    exported (or a dir holding it) and a training run's files are never replaced."""
    out, name = Path(out), meta.get("student")
    if out.exists() and not out.is_dir():
        raise UserError(f"export: --out {out} is a file; give a directory path")
    if out.exists() and (held := _run_files(out, source)):
        raise UserError(f"export: --out {out} holds {held}, which an export (it replaces its --out whole) would "
                        f"delete{', --overwrite or not' if overwrite else ''}; choose another --out, e.g. "
                        f"{source.parent.parent / 'export' if source is not None else 'a new dir'}")
    if overwrite or not out.exists() or not any(out.iterdir()):
        return
    held = export_meta(out)
    if held.get("student") == name and held.get("run_hash") == meta.get("run_hash"):
        return
    what = ("files that are not an export" if not held.get("student") else
            f"an export of student {held['student']}" if held["student"] != name else
            f"an export of student {name} from another run (run hash {held.get('run_hash')})")
    raise UserError(f"export: {out} holds {what}, which this export of student {name} would replace; "
                    f"choose another --out, or pass --overwrite to replace it")


def export_checkpoint(path: Path, out: Path, dtype: str = "fp32", tokenizer_dir: Path | None = None,
                      metrics: dict | None = None, held_out=None,
                      overwrite: bool = False, max_shard_size: str = "2GB") -> Path:
    """`distill export`: checkpoint (or student dir) -> Hugging Face model dir at `out`.

    held_out: validation blocks (N, T+1), `Blocks` or a tensor, to measure routing without the expert bias on
    (default: the run's own, found from the checkpoint's run dir).  overwrite: replace `out`
    whatever it holds (else only an earlier export of this student; `check_export_target`).
    max_shard_size: the largest safetensors file (save_pretrained's), e.g. "5GB"."""
    from transformers import AutoTokenizer

    # A run in progress commits newer steps and prunes older ones (train.keep_last) while this
    # reads: the step read may vanish half-way.  Given a student's dir, its newer latest is read.
    for tries in range(5):
        ckpt = resolve_checkpoint(path)
        try:
            meta, model, biases = _read_checkpoint(ckpt, out, overwrite)
            break
        except (UserError, OSError):
            if ckpt.is_dir():
                raise
            if ckpt == Path(path) or tries == 4:  # the step dir itself was named: nothing newer to read
                raise UserError(f"{ckpt}: removed while it was being read (a run in progress pruned it: "
                                f"train.keep_last); export a newer step, or the student's dir for its latest") from None
    name = meta["student"]
    tok_dir = tokenizer_dir or _find_tokenizer_dir(ckpt, meta)
    if tok_dir is None or not has_tokenizer(tok_dir):
        where = f"{tok_dir} holds no tokenizer" if tok_dir else f"no tokenizer was found for the run of {ckpt}"
        raise UserError(f"export: {where}; pass --tokenizer DIR (the run's data.tokenizer.path, or the teacher's dir)")
    tokenizer = AutoTokenizer.from_pretrained(str(tok_dir))
    note = routing_note(model, biases, held_out if held_out is not None else _held_out_blocks(ckpt, meta))
    if note:
        meta["routing_without_bias"] = note
        share = note["tokens_changing_expert"]
        measured = (f"{share:.1%} of {note['held_out_tokens']:,} held-out tokens route to another expert in at "
                    f"least one MoE layer" if isinstance(share, float) else share)
        print(f"[export] {name}: the trained expert bias is {note['expert_bias']}; without it {measured}",
              file=sys.stderr, flush=True)
    unservable = align_moe_step(model.config)  # vLLM reads the MoE layers from another field than transformers
    if unservable:
        print(f"[export] {name}: {unservable}", file=sys.stderr, flush=True)
    save_hf_dir(model, tokenizer, out, dtype=dtype, max_shard_size=max_shard_size, card=model_card(name, meta, metrics),
                generation_config=_source_generation_config(meta),
                meta=meta)  # published with the weights
    return Path(out)
