"""A live teacher: one no-grad forward per batch, top-k (or dense) signal out.

Vocab padding: checkpoints of one family are often padded to different embedding
sizes (e.g. 152,064 vs 151,936).  The teacher's logits are cut to the tokenizer's real
size, so ids beyond it (never produced by the tokenizer) cannot leak into the signal.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F

from common.errors import UserError
from losses.difficulty import STATS
from losses.signal import TeacherSignal, placeholder_invalid, sample_signal, topk_logprobs
from teachers.cache.format import Sampling
from teachers.protocol import IGNORE, Batch


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


def teacher_identity(path: Path) -> dict:
    """{"teacher_config_hash", "teacher_weights_hash"} of a checkpoint dir."""
    if not (path / "config.json").exists():
        raise UserError(f"teacher: {path} has no config.json")
    config_text = json.dumps(json.loads((path / "config.json").read_text()), sort_keys=True)
    return {"teacher_config_hash": hashlib.sha256(config_text.encode()).hexdigest()[:16],
            "teacher_weights_hash": _weights_digest(path)}


# Model types whose logits are exactly lm_head(final hidden state): no soft-capping or
# logit scaling, so the lm_head can run over a few tokens at a time (see LiveTeacher.topk).
_PLAIN_LM_HEAD = {"llama", "llama4", "llama4_text", "mistral", "mixtral", "qwen2", "qwen2_moe", "qwen3", "qwen3_moe"}


class LiveTeacher:
    """A `Teacher` that runs the model under no_grad: exactly one forward per `signal()`."""

    def __init__(self, model, k: int, vocab_size: int, device: torch.device,
                 autocast_dtype: torch.dtype | None = None, keep_dense: bool = False,
                 sampling: Sampling | None = None):
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
        self.sampling = sampling  # set: `signal` draws sampled tokens (and `sample` works)
        self.forward_calls = 0
        self.reads = 0  # a live teacher reads no cache
        self.chunked_head = (model.config.model_type in _PLAIN_LM_HEAD and hasattr(model, "model")
                             and isinstance(getattr(model, "lm_head", None), torch.nn.Linear))
        self.chunk_tokens: int | None = None  # lm_head chunk in tokens; None = auto (see topk)

    def _autocast(self):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def _positions(self, position_ids: torch.Tensor | None) -> dict:
        """The forward's position_ids argument: (B, T) restarting per packed row (each row then
        attends within itself: transformers derives the mask from them), or none at all."""
        return {} if position_ids is None else {"position_ids": position_ids.to(self.device)}

    @torch.no_grad()
    def logits(self, input_ids: torch.Tensor, position_ids: torch.Tensor | None = None) -> torch.Tensor:
        """(B, T) -> (B, T, V) fp32 logits cut to the tokenizer's real vocab."""
        self.forward_calls += 1
        with self._autocast():
            out = self.model(input_ids=input_ids.to(self.device), use_cache=False,
                             **self._positions(position_ids)).logits
        return out[..., : self.vocab_size].float()

    @torch.no_grad()
    def _reduced(self, input_ids: torch.Tensor, reduce, position_ids: torch.Tensor | None = None,
                 rows: torch.Tensor | None = None) -> list:
        """One forward; `reduce(logits (c, V), start, end)` applied to the logits of tokens
        start..end of the flattened (B*T) batch, chunk by chunk, never the whole (B, T, V).
        rows (M,) int64: only these flat token indices go through the lm_head and `reduce`
        (start..end then count among them).

        The decoder's hidden states (B, T, H) go through the lm_head a chunk of tokens at a
        time.  At V = 202,048 a batch of 8 x 4096 tokens would otherwise need 13 GB of bf16
        logits (26 GB as fp32).  A chunk is ~1 GB of fp32 logits (1,328 tokens at that V)
        and at least 512 tokens, because every chunk re-reads the (V, H) weight (smaller
        chunks were measurably slower: BENCHMARKS.md, teacher-logit cache).  Models outside
        _PLAIN_LM_HEAD take the full-logits path (one chunk).
        """
        if not self.chunked_head:
            logits = self.logits(input_ids, position_ids)
            flat = logits.reshape(-1, logits.shape[-1])
            flat = flat if rows is None else flat[rows.to(flat.device)]
            return [reduce(flat, 0, flat.shape[0])]
        self.forward_calls += 1
        with self._autocast():
            out = self.model.model(input_ids=input_ids.to(self.device), use_cache=False,
                                   **self._positions(position_ids))
            hidden = out.last_hidden_state  # (B, T, H)
            flat = hidden.reshape(-1, hidden.shape[-1])
            flat = flat if rows is None else flat[rows.to(flat.device)]  # (M, H): the lm_head skips the rest
            chunk = self.chunk_tokens or max(512, (1 << 28) // self.vocab_size)  # ~1 GB of fp32 logits
            head = self.model.lm_head
            with _gathered(head):  # ZeRO-3: one gather per forward, whatever B*T is
                weight = head.weight[: self.vocab_size]  # (V, H): padded rows never enter the softmax
                bias = None if head.bias is None else head.bias[: self.vocab_size]
                if self.autocast_dtype is not None:  # cast once, not once per chunk
                    weight = weight.to(self.autocast_dtype)
                return [reduce(F.linear(flat[i:i + chunk], weight, bias), i, min(i + chunk, flat.shape[0]))
                        for i in range(0, flat.shape[0], chunk)]

    def topk(self, input_ids: torch.Tensor, targets: torch.Tensor | None = None,
             position_ids: torch.Tensor | None = None, where: torch.Tensor | None = None,
             dense_out: torch.Tensor | None = None):
        """(B, T) -> top-k (values (B, T, k) fp32 log-probs, ids (B, T, k)), one forward.
        A token whose logits hold NaN/+inf comes out NaN.  targets (B, T) plain next-token
        ids: also their difficulty (B, T, 3) (losses/difficulty.py), a third element.
        position_ids (B, T): packed rows' positions (see `Batch`), or None.  where (B, T)
        bool: compute the signal at these positions only; the others get the placeholder
        ids 0..k-1 at log-prob -log V and NaN difficulty (for positions no loss reads).
        dense_out (B*T, V) fp32: also receives the log-probabilities of every position computed
        (the others keep what it held), chunk by chunk, so no second (B, T, V) copy is made;
        their normaliser is read off the top-k pass (the top-1's logit and log-prob), not taken
        again."""
        rows = _rows_of(where)
        flat_targets = None if targets is None else targets.reshape(-1)
        flat_targets = flat_targets if rows is None or flat_targets is None else flat_targets[rows]
        dense_rows = None if rows is None or dense_out is None else rows.to(dense_out.device)

        def reduce(logits, start, end):
            if flat_targets is None:
                top = (*topk_logprobs(logits, self.k), None)
            else:
                top = topk_logprobs(logits, self.k, flat_targets[start:end])  # one pass: top-k and difficulty
            if dense_out is not None:  # (c, V) in the autocast dtype -> fp32 log-probs, into its rows
                # log p = (x - m) + log p_top1, with m the row max (the top-1 logit, so log p_top1 =
                # -log sum exp(x - m)): as `topk_logprobs` rounds, at the scale of x - m, not of x
                # (x - lse in one step would round at the size of the logits).  NaN rows stay NaN.
                row_max = logits.gather(1, top[1][:, :1]).float()  # (c, 1)
                if dense_rows is None:
                    torch.sub(logits, row_max, out=dense_out[start:end]).add_(top[0][:, :1])
                else:  # one fp32 (c, V) temporary, as the copy it replaces
                    dense_out[dense_rows[start:end]] = (logits - row_max).add_(top[0][:, :1])
            return top

        parts = self._reduced(input_ids, reduce, position_ids, rows) or [  # no position to compute at
            (torch.zeros(0, self.k), torch.zeros(0, self.k, dtype=torch.int64), torch.zeros(0, len(STATS)))]
        tokens, shape = input_ids.numel(), input_ids.shape + (self.k,)
        values = _spread(torch.cat([p[0] for p in parts]), rows, tokens, torch.tensor(-math.log(self.vocab_size)))
        ids = _spread(torch.cat([p[1] for p in parts]), rows, tokens, torch.arange(self.k))
        if targets is None:
            return values.reshape(shape), ids.reshape(shape)
        stats = _spread(torch.cat([p[2] for p in parts]), rows, tokens, torch.tensor(float("nan")))
        return values.reshape(shape), ids.reshape(shape), stats.reshape(*input_ids.shape, len(STATS))

    def sample(self, input_ids: torch.Tensor, keys: torch.Tensor, targets: torch.Tensor | None = None,
               position_ids: torch.Tensor | None = None, where: torch.Tensor | None = None) -> TeacherSignal:
        """(B, T) -> a sampled TeacherSignal (B, T, w): `self.sampling.n` draws per token at
        its temperature (after its exact head, if any), seeded by (sampling.seed, keys (B, T)),
        one forward; padded to w = `sampling.width`.
        targets (B, T) plain next-token ids: the signal carries their difficulty too.
        where (B, T) bool: draw at these positions only; the others get one id (0) at
        frequency 1, entropy 0 and NaN difficulty (for positions no loss reads)."""
        n, flat_keys = self.sampling.width, keys.reshape(-1).to(self.device)
        flat_targets = None if targets is None else targets.reshape(-1)
        rows = _rows_of(where)
        if rows is not None:
            flat_keys = flat_keys[rows.to(flat_keys.device)]
            flat_targets = None if flat_targets is None else flat_targets[rows]

        def draw(logits, start, end):
            sig = sample_signal(logits, self.sampling.n, self.sampling.temperature, self.sampling.seed,
                                flat_keys[start:end], None if flat_targets is None else flat_targets[start:end],
                                exact_top=self.sampling.exact_top)  # one pass, difficulty too
            return sig.topk_ids, sig.topk_logprobs, sig.entropy, sig.difficulty

        parts = self._reduced(input_ids, draw, position_ids, rows) or [  # no position to draw at
            (torch.zeros(0, n, dtype=torch.int64), torch.zeros(0, n), torch.zeros(0), torch.zeros(0, len(STATS)))]
        ids = torch.cat([F.pad(p[0], (0, n - p[0].shape[-1])) for p in parts])  # (M, n)
        logfreq = torch.cat([F.pad(p[1], (0, n - p[1].shape[-1]), value=float("-inf")) for p in parts])
        entropy = torch.cat([p[2] for p in parts])
        difficulty = None if targets is None else torch.cat([p[3] for p in parts])
        tokens = input_ids.numel()  # back to every position, the skipped ones as placeholders:
        one_id = torch.full((n,), float("-inf"))
        one_id[0] = 0.0  # id 0 at frequency 1
        ids = _spread(ids, rows, tokens, torch.tensor(0))
        logfreq = _spread(logfreq, rows, tokens, one_id)
        entropy = _spread(entropy.float(), rows, tokens, torch.tensor(0.0))
        if difficulty is not None:
            difficulty = _spread(difficulty, rows, tokens, torch.tensor(float("nan"))).reshape(*input_ids.shape, len(STATS))
        return TeacherSignal(ids.reshape(*input_ids.shape, n), logfreq.reshape(*input_ids.shape, n), kind="sampled",
                             entropy=entropy.reshape(input_ids.shape), temperature=self.sampling.temperature,
                             difficulty=difficulty)

    def prefetch(self, batches) -> None:
        pass  # the forward runs when asked: it shares the device with the students

    def signal(self, batch: Batch) -> tuple[TeacherSignal, torch.Tensor]:
        """(TeacherSignal (B, T, k), valid (B, T)) for `batch.input_ids`.  A token whose logits
        hold NaN or +inf, or are all -inf, is invalid and gets a placeholder signal, as in the
        cache; -inf on some entries (masked vocab) is a valid distribution.  The signal
        carries the teacher's difficulty of each label.  Positions without a label (chat
        prompts) get no lm_head, top-k, draws or dense logits: a placeholder that
        no loss reads, valid, with NaN difficulty (the loop averages over labels only)."""
        targets = batch.labels.clamp(min=0)  # (B, T)
        where = batch.labels != IGNORE  # (B, T): the signal is computed only where a loss reads it
        if self.sampling is not None and not self.keep_dense:
            sig = self.sample(batch.input_ids, self.sampling.keys("online", batch.indices, batch.input_ids.shape[1]),
                              targets, batch.position_ids, where)
            valid = torch.isfinite(sig.entropy)
            if not bool(valid.all()):
                sig.topk_logprobs[~valid] = float("-inf")
                sig.topk_logprobs[~valid, 0] = 0.0  # one id at frequency 1: finite, masked anyway (a cache
                # stores n distinct ids instead, a row its codec encodes: writer.py's `_sampled`)
                sig.entropy[~valid] = 0.0
            return sig.to("cpu"), valid.cpu()
        # keep_dense: the targets' whole distribution too, as log-probs (uniform elsewhere), filled by the same pass
        uniform = -math.log(self.vocab_size)
        dense = torch.full((batch.input_ids.numel(), self.vocab_size), uniform, device=self.device) \
            if self.keep_dense else None
        values, ids, difficulty = self.topk(batch.input_ids, targets, batch.position_ids, where, dense_out=dense)
        values, ids, valid = placeholder_invalid(values, ids, self.vocab_size)  # valid: (B, T)
        entropy = None
        if dense is not None:
            # The entropy at T = 1 came out of the same pass (the difficulty's); rows never
            # computed (NaN there) are uniform: log V.  Once for every student (`dense_entropy`).
            entropy = difficulty[..., STATS.index("entropy")].to(self.device)  # (B, T)
            entropy = torch.where(torch.isnan(entropy), -uniform, entropy)
            dense = dense.reshape(*batch.input_ids.shape, -1)  # (B, T, V)
            if not bool(valid.all()):  # NaN/+inf logits: uniform placeholders, as the top-k's
                invalid = ~valid.to(dense.device)
                dense.masked_fill_(invalid[..., None], uniform)
                entropy.masked_fill_(invalid, -uniform)
        return TeacherSignal(ids, values, dense, difficulty=difficulty.cpu(), dense_entropy=entropy), valid.cpu()


def _rows_of(where: torch.Tensor | None) -> torch.Tensor | None:
    """(B, T) bool positions to compute at -> their flat indices (M,); None: every position."""
    return None if where is None or bool(where.all()) else where.reshape(-1).nonzero().squeeze(1)


def _spread(x: torch.Tensor, rows: torch.Tensor | None, tokens: int, fill: torch.Tensor) -> torch.Tensor:
    """x (M, ...) computed at flat positions `rows` -> (tokens, ...), `fill` (broadcast to x's
    trailing shape) at the others; rows None: x is every position already."""
    if rows is None:
        return x
    out = fill.to(x.dtype).expand(tokens, *x.shape[1:]).clone().to(x.device)
    out[rows.to(x.device)] = x
    return out


def _gathered(module: torch.nn.Module):
    """Context in which a ZeRO-3 partitioned module's parameters are whole on every rank
    (a collective); plain parameters need nothing."""
    params = [p for p in module.parameters(recurse=False) if hasattr(p, "ds_id")]
    if not params:
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(params)
