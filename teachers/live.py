"""A live teacher: one no-grad forward per batch, top-k (or dense) signal out.

Vocab padding: checkpoints of one family are often padded to different embedding
sizes (e.g. 152,064 vs 151,936).  The teacher's logits are cut to the tokenizer's real
size, so ids beyond it (never produced by the tokenizer) cannot leak into the signal.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

from distill.errors import UserError
from losses.signal import TeacherSignal


def load_teacher_model(path: Path, dtype: torch.dtype = torch.float32):
    """A local Hugging Face causal-LM dir, with the sparse MoE forward enabled."""
    from students.build import load_causal_lm

    try:
        return load_causal_lm(path, dtype=dtype)
    except ValueError as e:
        raise UserError(f"teacher: {e}") from None


def _weights_digest(path: Path) -> str:
    """Hash of every weights file's size and 64 KiB samples at 64 evenly spaced offsets.

    Reading a multi-TB teacher whole for an identity check is not practical; a strided
    sample plus the safetensors header (which names every tensor) catches a different
    checkpoint in practice.
    """
    h = hashlib.sha256()
    files = sorted(p for p in path.iterdir() if p.suffix in (".safetensors", ".bin"))
    for f in files:
        size = f.stat().st_size
        h.update(f"{f.name}:{size}".encode())
        with open(f, "rb") as fh:
            for i in range(64):
                fh.seek(size * i // 64)
                h.update(fh.read(65536))
    return h.hexdigest()[:16]


def teacher_identity(path: Path | None, model=None) -> dict:
    """{"teacher_config_hash", "teacher_weights_hash"} of a checkpoint dir (or an in-memory model)."""
    if path is not None and (path / "config.json").exists():
        config_text = json.dumps(json.loads((path / "config.json").read_text()), sort_keys=True)
        weights = _weights_digest(path)
    elif model is not None:
        config_text = model.config.to_json_string(use_diff=False)
        h = hashlib.sha256()
        for name, p in sorted(model.state_dict().items()):
            h.update(name.encode())
            h.update(p.detach().float().cpu().numpy().tobytes())
        weights = h.hexdigest()[:16]
    else:
        raise UserError(f"teacher: {path} has no config.json")
    return {"teacher_config_hash": hashlib.sha256(config_text.encode()).hexdigest()[:16],
            "teacher_weights_hash": weights}


class LiveTeacher:
    """Runs the teacher under no_grad; exactly one forward per `signal()` call."""

    def __init__(self, model, k: int, vocab_size: int, device: torch.device,
                 autocast_dtype: torch.dtype | None = None, keep_dense: bool = False):
        # A model already on `device` (e.g. ZeRO-3 partitioned by DeepSpeed) is not moved.
        if next(model.parameters()).device != device:
            model = model.to(device)
        self.model = model.eval()
        model_vocab = model.config.vocab_size
        if model_vocab < vocab_size:
            raise UserError(f"teacher vocab ({model_vocab}) is smaller than the tokenizer's ({vocab_size}): "
                            f"they are different tokenizers; use the teacher's own tokenizer")
        self.k = min(k, vocab_size)
        self.vocab_size = vocab_size
        self.device = device
        self.autocast_dtype = autocast_dtype
        self.keep_dense = keep_dense
        self.forward_calls = 0

    @torch.no_grad()
    def logits(self, input_ids: torch.Tensor) -> torch.Tensor:
        """(B, T) -> (B, T, V) fp32 logits cut to the tokenizer's real vocab."""
        self.forward_calls += 1
        input_ids = input_ids.to(self.device)
        if self.autocast_dtype is not None:
            with torch.autocast(self.device.type, dtype=self.autocast_dtype):
                out = self.model(input_ids=input_ids).logits
        else:
            out = self.model(input_ids=input_ids).logits
        return out[..., : self.vocab_size].float()

    def signal(self, indices: list[int] | None, input_ids: torch.Tensor) -> tuple[TeacherSignal, torch.Tensor]:
        """(TeacherSignal (B, T, k), valid (B, T)); tokens with non-finite logits are invalid."""
        logits = self.logits(input_ids)
        valid = torch.isfinite(logits).all(dim=-1)  # (B, T)
        if not bool(valid.all()):
            logits = torch.where(valid[..., None], logits, torch.zeros_like(logits))
        sig = TeacherSignal.from_logits(logits, self.k, keep_dense=self.keep_dense)
        return sig, valid.cpu()
