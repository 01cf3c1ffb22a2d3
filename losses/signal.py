"""The one typed object that crosses the teacher/loss border.

A `TeacherSignal` says, for every token position, what the teacher believed the next
token would be.  Losses never care whether it came from a live teacher or a cache.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from losses.difficulty import STATS, from_shifted, token_difficulty

SIGNAL_KINDS = ("topk", "sampled")


@dataclass
class TeacherSignal:
    """Teacher's next-token beliefs, sparse (top-k or sampled) and optionally dense.

    kind "topk" (the default):
      topk_ids:      (..., k) int64   the k most likely token ids, most likely first.
      topk_logprobs: (..., k) float32 their log-probabilities under the *full* softmax at
                     temperature 1 (so they sum to <= 1; the rest is the tail's mass).
    kind "sampled" (Anshumann et al. 2025, https://arxiv.org/abs/2503.16870): n draws from
    the teacher's softmax at `temperature`, unique ids kept with their frequencies:
      topk_ids:      (..., u) int64   the distinct sampled ids (padding: any id),
      topk_logprobs: (..., u) float32 log(count / n) (padding: -inf, i.e. frequency 0); with an
                     exact head (`sample_signal`'s exact_top h) the first h entries are the
                     teacher's top ids and log-probs, the draws' log(m * count / n) after them
                     (m: the mass outside the head),
      entropy:       (...,)  float32 the teacher's entropy at `temperature` (nats), so the
                     KL estimate's value is unbiased too, not only its gradient.
    logits:        (..., V) optional dense teacher logits (online mode may pass them;
                   exact losses then use them instead of the sparse estimate).
    dense_entropy: (...,) optional, only beside `logits` that are log-probabilities (each
                   row's logsumexp 0, as `log_normalize_` leaves them): the teacher's entropy
                   at T = 1.  The dense forward KL at T = 1 then reads p_t = exp(logits) and
                   this instead of taking the teacher's log-softmax again for every student.
    difficulty:    (..., 3) optional fp32 [nll, entropy, top1] of the true next token
                   (losses/difficulty.py); losses ignore it, the loop logs and selects by it.

    Leading dims are (B, T) from a batch, or (N,) once flattened to tokens.
    """

    topk_ids: torch.Tensor
    topk_logprobs: torch.Tensor
    logits: torch.Tensor | None = None
    kind: str = "topk"
    entropy: torch.Tensor | None = None
    temperature: float = 1.0  # sampled: the temperature the draws were made at
    difficulty: torch.Tensor | None = None
    dense_entropy: torch.Tensor | None = None

    def __post_init__(self):
        if self.kind not in SIGNAL_KINDS:
            raise ValueError(f"unknown signal kind {self.kind!r}; expected one of {SIGNAL_KINDS}")
        if self.kind == "sampled" and self.entropy is None:
            raise ValueError("a sampled signal needs the teacher's entropy at its temperature")

    @property
    def k(self) -> int:
        return self.topk_ids.shape[-1]

    def tail_logprob(self) -> torch.Tensor:
        """log(1 - sum(top-k probs)), shape (...,); -inf when top-k holds all the mass.
        Computed in fp32, or fp64 for an fp64 signal."""
        top = self.topk_logprobs if self.topk_logprobs.dtype == torch.float64 else self.topk_logprobs.float()
        top_mass = torch.logsumexp(top, dim=-1)
        # log1p(-exp(x)) is accurate for x near 0 (tail almost empty).
        return torch.log1p(-torch.exp(top_mass).clamp(max=1.0))

    def most_likely(self) -> torch.Tensor:
        """(...,) int64: the teacher's argmax (dense), its top-1 (top-k, in whatever order the
        ids are stored), or the most frequent draw (sampled: an estimate of the argmax)."""
        if self.logits is not None:
            return self.logits.argmax(dim=-1)
        best = self.topk_logprobs.argmax(dim=-1, keepdim=True)  # (..., 1)
        return self.topk_ids.gather(-1, best).squeeze(-1)

    def apply(self, fn) -> "TeacherSignal":
        """The same signal with `fn` applied to every tensor (token dims leading)."""
        def maybe(x):
            return None if x is None else fn(x)

        return TeacherSignal(fn(self.topk_ids), fn(self.topk_logprobs), maybe(self.logits), self.kind,
                             maybe(self.entropy), self.temperature, maybe(self.difficulty), maybe(self.dense_entropy))

    def flatten(self) -> "TeacherSignal":
        """(B, T, ...) -> (B*T, ...)."""
        lead = self.topk_ids.shape[:-1]
        return self.apply(lambda x: x.reshape(-1, *x.shape[len(lead):]))

    def rows(self, start: int, end: int) -> "TeacherSignal":
        """Tokens start..end of a flattened (N, ...) signal."""
        return self.apply(lambda x: x[start:end])

    def to(self, device) -> "TeacherSignal":
        return self.apply(lambda x: x.to(device, non_blocking=True))

    @staticmethod
    def from_logits(logits: torch.Tensor, k: int, keep_dense: bool = False) -> "TeacherSignal":
        """Top-k of a teacher's logits (..., V), computed in fp32 (see `topk_logprobs`).
        keep_dense: also a log-normalised copy of the logits (fp32, fp64 stays fp64) and
        their entropy, the form the live teacher hands students (it builds its own from its
        top-k pass, teachers/live.py); this is the reference tests and benches compare with."""
        k = min(k, logits.shape[-1])
        values, ids = topk_logprobs(logits, k)
        if not keep_dense:
            return TeacherSignal(ids, values)
        dense = logits.to(torch.float64 if logits.dtype == torch.float64 else torch.float32,
                          memory_format=torch.contiguous_format, copy=True)  # (..., V), normalised in place
        entropy = log_normalize_(dense.reshape(-1, dense.shape[-1]))
        return TeacherSignal(ids, values, dense, dense_entropy=entropy.reshape(logits.shape[:-1]))


def log_normalize_(logits: torch.Tensor) -> torch.Tensor:
    """(N, V) fp32 or fp64 dense teacher logits -> their log-probabilities at T = 1, in place
    (each row's logsumexp becomes 0), and returns (N,) the rows' entropies (nats), in the
    logits' dtype: the form `dense_entropy` asks for (`from_logits` and callers holding
    whole logits; the live teacher reads the same off its top-k pass).  A -inf entry stays
    -inf and weighs 0 in the entropy; a row holding NaN or +inf, or only -inf, comes out
    NaN.  Per chunk of rows with one scratch buffer of ~8 MB on CPU (128 MB on an
    accelerator)."""
    vocab = logits.shape[-1]
    entropy = logits.new_empty(logits.shape[0])
    rows = max(1, min(logits.shape[0], (1 << (21 if logits.device.type == "cpu" else 25)) // max(1, vocab)))
    scratch = logits.new_empty(rows, vocab)
    for i in range(0, logits.shape[0], rows):
        x = logits[i:i + rows]  # (r, V), a view: shifted and normalised in place
        x.sub_(x.amax(dim=-1, keepdim=True))
        e = torch.exp(x, out=scratch[: x.shape[0]])
        stats = from_shifted(x, e, x[:, :1])  # (r, 3): [-, entropy, 1 / Z]
        entropy[i:i + rows] = stats[:, 1]
        x.add_(stats[:, 2:].log())  # x - max - log Z
    return entropy


def topk_logprobs(logits: torch.Tensor, k: int, targets: torch.Tensor | None = None):
    """(..., V) logits -> (values (..., k) fp32 log-probs, ids (..., k) int64), most likely first.

    The one place teacher log-probs are computed, so live and cached signals are bitwise
    equal.  No (N, V) log-softmax is materialised: per chunk of rows it finds the row max
    m, sums exp(x - m) in a reused scratch buffer, top-k's the raw logits (log-softmax is
    monotonic in x) and returns (top - m) - log(sum): faster than log_softmax + topk and
    closer to fp64 (figures in BENCHMARKS.md, teacher-logit cache).  Scratch memory is
    ~16 MB on CPU, ~256 MB on an accelerator (as two half-size buffers with targets).  A row holding NaN
    or +inf (or only -inf) comes out NaN.

    targets (...,) the true next tokens: a third result, their difficulty (..., 3) fp32
    (losses/difficulty.py), from the same pass (one more scratch buffer and one dot product
    per row instead of a second pass over the logits).
    """
    vocab = logits.shape[-1]
    flat = logits.reshape(-1, vocab)
    shape = logits.shape[:-1] + (k,)
    flat_targets = None if targets is None else targets.reshape(-1, 1).to(flat.device)
    if flat.shape[0] == 0:
        empty = (flat.new_empty(shape, dtype=torch.float32), torch.empty(shape, dtype=torch.long, device=flat.device))
        return empty if targets is None else (*empty, flat.new_empty((*logits.shape[:-1], len(STATS)), dtype=torch.float32))
    budget = (22 if flat.device.type == "cpu" else 26) - (targets is not None)  # two buffers with targets
    rows = max(1, min(flat.shape[0], (1 << budget) // vocab))
    scratch = torch.empty(rows, vocab, dtype=torch.float32, device=flat.device)
    exps = None if targets is None else torch.empty_like(scratch)
    values, ids, stats = [], [], []
    for i in range(0, flat.shape[0], rows):
        x = flat[i:i + rows]  # (r, V) in the logits' dtype: no fp32 copy of a bf16 chunk
        top, idx, row_max = _topk_and_max(x, k)
        top, row_max = top.float(), row_max.float()  # exact casts
        buf = scratch[: x.shape[0]]
        torch.sub(x, row_max, out=buf)  # promotes into the fp32 scratch
        if exps is None:
            log_norm = buf.exp_().sum(dim=-1, keepdim=True).log_()  # (r, 1)
        else:  # keep x - m for the entropy's dot product
            e = torch.exp(buf, out=exps[: x.shape[0]])
            log_norm = e.sum(dim=-1, keepdim=True).log_()
            stats.append(from_shifted(buf, e, buf.gather(-1, flat_targets[i:i + rows])))
        values.append(top.sub_(row_max).sub_(log_norm))
        ids.append(idx)
    out = torch.cat(values).reshape(shape), torch.cat(ids).reshape(shape)
    return out if targets is None else (*out, torch.cat(stats).reshape(*logits.shape[:-1], len(STATS)))


def placeholder_invalid(values: torch.Tensor, ids: torch.Tensor, vocab_size: int):
    """Top-k (values, ids) (..., k) from `topk_logprobs` -> (values, ids, valid (...,) bool).

    A token whose logits held NaN or +inf (or only -inf) came out NaN; it is marked
    invalid and given a uniform placeholder (ids 0..k-1, log-prob -log V) so nothing
    non-finite reaches a loss or a cache shard.  The one rule for live and cached signals.
    """
    valid = ~torch.isnan(values).any(dim=-1) & torch.isfinite(values[..., 0])
    if not bool(valid.all()):
        k = values.shape[-1]
        values = torch.where(valid[..., None], values, torch.full_like(values, -math.log(vocab_size)))
        ids = torch.where(valid[..., None], ids, torch.arange(k, device=ids.device).expand_as(ids))
    return values, ids, valid


_BLOCK = 64  # vocab entries per block in _topk_and_max


def _topk_and_max(x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(r, V) -> top-k values (r, k), their ids (r, k), row max (r, 1).

    Two-stage top-k, exact: the k largest entries of a row lie in the k blocks with the
    largest block maxima (any entry outside them is beaten by k block maxima), so one
    block-max pass, a top-k over V/64 maxima and a top-k over k*64 gathered entries
    replace a top-k over all V (measured in BENCHMARKS.md).  The row max falls out
    of the block maxima.  Ties may be ordered differently from torch.topk's.
    """
    r, vocab = x.shape
    n_blocks = vocab // _BLOCK
    if n_blocks < 4 * k:  # small vocab: the plain top-k is cheap
        top, idx = torch.topk(x, k, dim=-1)
        return top, idx, x.amax(dim=-1, keepdim=True)
    main = n_blocks * _BLOCK
    blocks = x[:, :main].reshape(r, n_blocks, _BLOCK)
    block_max = blocks.amax(dim=-1)  # (r, n_blocks)
    best = torch.topk(block_max, k, dim=-1).indices  # (r, k)
    cand = blocks.gather(1, best[..., None].expand(r, k, _BLOCK)).reshape(r, k * _BLOCK)
    cand_ids = (best[..., None] * _BLOCK + torch.arange(_BLOCK, device=x.device)).reshape(r, k * _BLOCK)
    row_max = block_max.amax(dim=-1, keepdim=True)
    if main < vocab:  # the last V % 64 entries are always candidates
        rest = x[:, main:]
        cand = torch.cat([cand, rest], dim=1)
        cand_ids = torch.cat([cand_ids, torch.arange(main, vocab, device=x.device).expand(r, -1)], dim=1)
        row_max = torch.maximum(row_max, rest.amax(dim=-1, keepdim=True))
    top, pos = torch.topk(cand, k, dim=-1)
    return top, cand_ids.gather(1, pos), row_max


# ---- sampled signals ---------------------------------------------------------------------------

_MASK64 = (1 << 64) - 1


def _as_int64(x: int) -> int:
    """An unsigned 64-bit constant as the int64 with the same bits (torch has no uint64 math)."""
    x &= _MASK64
    return x - (1 << 64) if x >= 1 << 63 else x


_GOLDEN, _MIX1, _MIX2 = (_as_int64(c) for c in (0x9E3779B97F4A7C15, 0xBF58476D1CE4E5B9, 0x94D049BB133111EB))


def _shr(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Logical right shift of int64 bit patterns (torch's >> is arithmetic)."""
    return (x >> bits) & ((1 << (64 - bits)) - 1)


def counter_uniform(seed: int, keys: torch.Tensor, n: int) -> torch.Tensor:
    """(...,) int64 keys -> (..., n) float64 uniforms in [0, 1), a pure function of (seed, key,
    draw): splitmix64 over a counter, so a token's draws do not depend on which rank, batch or
    order computed them (a resumed or multi-rank cache is byte-identical)."""
    draw = torch.arange(n, dtype=torch.int64, device=keys.device)
    x = (keys.to(torch.int64)[..., None] * n + draw + 1) * _GOLDEN + _as_int64(seed * 0x2545F4914F6CDD1D)
    x = (x ^ _shr(x, 30)) * _MIX1
    x = (x ^ _shr(x, 27)) * _MIX2
    x = x ^ _shr(x, 31)
    return _shr(x, 11).to(torch.float64) * (1.0 / (1 << 53))  # the top 53 bits


_CDF_BLOCK = 256  # vocab entries per block of the inverse CDF (the fp32 buffer is padded to whole blocks)
_CDF_SUB = 16  # entries per sub-block: a block is 16 sub-blocks of 16


def _search(cdf: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """cdf (..., m) non-decreasing cumulative masses, v (..., j) -> (..., j) the index i with
    cdf[i - 1] <= v < cdf[i].  Where rounding puts v at or past cdf[-1], the last entry of
    positive mass (the number of entries below cdf[-1]), never an entry of mass 0."""
    i = torch.searchsorted(cdf, v, right=True)
    past = i == cdf.shape[-1]
    # Rare.  On the CPU the fix-up runs only when needed (always running it cost 25% of the
    # draws); on an accelerator always, as asking would sync the host 3 times a chunk of rows.
    if _host_reads_are_cheap(cdf.device) and not bool(past.any()):
        return i
    return torch.where(past, (cdf < cdf[..., -1:]).sum(-1, keepdim=True), i)


def _host_reads_are_cheap(device: torch.device) -> bool:
    """Whether reading a value back to the host costs little here (the CPU), where on an
    accelerator it waits for the queued work: the one place `_search` decides it."""
    return device.type == "cpu"


def _mass_below(cdf: torch.Tensor, i: torch.Tensor) -> torch.Tensor:
    """cdf (..., m) cumulative masses, i (..., j) indices -> (..., j) the mass before entry i:
    cdf[i - 1], 0 where i = 0."""
    return torch.where(i > 0, cdf.gather(-1, (i - 1).clamp_min(0)), torch.zeros((), dtype=cdf.dtype, device=cdf.device))


def _inverse_cdf(blocks: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Ids drawn by inverse CDF: blocks (N, nb, 256) fp32 unnormalised probabilities (the vocab
    in blocks of 256, zero-padded past V), u (N, n) fp64 uniforms in [0, 1) -> ids (N, n) int64
    (at most nb * 256 - 1; the caller clamps to V - 1).

    Three levels, each a cumulative sum in fp64 over what it chooses among: the block (N, nb),
    the sub-block of 16 within it (N, n, 16) and the entry within that (N, n, 16).  So a draw
    reads 32 values, where one block's 256 were read before (at 256 draws a token that was 16x
    the vocabulary of a 4,096-token model), and no (N, V) cumulative sum is made.  The ids are
    those of one fp64 cumulative sum over the whole vocabulary but for rounding at a boundary
    (all but 1 of 338k draws on Zipf-like rows at V = 300 to 202,048; tests/test_signal_draws.py)."""
    rows, nb, _ = blocks.shape
    fine = blocks.view(rows, nb * _CDF_SUB, _CDF_SUB)  # (N, nb * 16, 16)
    # The sub-block masses in fp32, on CPU as one matrix-vector product (a reduction over a last
    # dim of 16 ran 10x slower there), with autocast off (a bf16 product would bias the draws);
    # on an accelerator a plain sum (no TF32).  The inner level's fp64 sums may end 1e-6
    # relative past them: `_search`.
    with torch.autocast(fine.device.type, enabled=False):
        sub = fine @ fine.new_ones(_CDF_SUB, 1) if fine.device.type == "cpu" else fine.sum(-1)
    sub = sub.reshape(rows, nb, _CDF_SUB).double()  # (N, nb, 16)
    block_cdf = sub.sum(-1).cumsum(-1)  # (N, nb)
    u = u * block_cdf[:, -1:]
    which = _search(block_cdf, u)  # (N, n)
    v = u - _mass_below(block_cdf, which)
    sub_cdf = sub.gather(1, which[..., None].expand(-1, -1, _CDF_SUB)).cumsum(-1)  # (N, n, 16)
    j = _search(sub_cdf, v[..., None])  # (N, n, 1)
    v = v - _mass_below(sub_cdf, j).squeeze(-1)
    j = j.squeeze(-1)
    k = which * _CDF_SUB + j  # (N, n) the sub-block, over the padded vocab
    inner = fine.gather(1, k[..., None].expand(-1, -1, _CDF_SUB)).double().cumsum(-1)  # (N, n, 16)
    return k * _CDF_SUB + _search(inner, v[..., None]).squeeze(-1)


def sample_signal(logits: torch.Tensor, n: int, temperature: float, seed: int, keys: torch.Tensor,
                  targets: torch.Tensor | None = None, exact_top: int = 0) -> TeacherSignal:
    """n draws per token from softmax(logits / T) -> a sampled `TeacherSignal` (kind "sampled").

    logits: (..., V) teacher logits; keys: (...,) int64, one per token, e.g. global sequence
    index * seq_len + position.  The draws are inverse-CDF lookups of `counter_uniform`
    numbers (see `_inverse_cdf`).  Returns the distinct ids per token, sorted
    ascending (width = the most distinct ids any token has; padding: id 0 at frequency 0),
    log(count / n), and the entropy of softmax(logits / T).  A token with NaN/+inf logits
    comes out with NaN entropy (`placeholder_invalid` rules apply to it as to top-k).

    targets (...,) the true next tokens: the signal also carries their difficulty (..., 3)
    (losses/difficulty.py, at temperature 1).  At T = 1 it comes out of the same pass as the
    draws (the shifted logits and their exps are shared); at another T it takes one more.

    exact_top h > 0: the h most likely ids at T come first with their exact probabilities p_i,
    and the n draws are made from the rest of the distribution (the head's entries zeroed),
    each distinct drawn id weighted m * count / n, m = 1 - sum(p_head) the tail's mass.  The
    weights still sum to 1 and E[weight of id j] = p_j for every j, so the forward KL stays
    unbiased, with no variance on the head and the tail's variance scaled by about m
    (p_j (m - p_j) / n against p_j (1 - p_j) / n).  Layout: the head (most likely first),
    then the tail's distinct ids ascending, padding (id 0, -inf) last (a head entry is -inf
    too where fewer than h logits are finite).  m is held at >= 2**-100 so a tail weight stays
    invertible to its count (`SampledCodec`); a row with no tail mass draws its top-1 again.

    Per chunk of rows, in two fp32 scratch buffers (~8 MB each on CPU, so they stay in
    cache): s = (x - max x) / T, e = exp(s) in a buffer padded to whole CDF blocks with
    zeros, then the entropy (one dot product), the difficulty and the draws, all from them.
    """
    lead, vocab = logits.shape[:-1], logits.shape[-1]
    flat = logits.reshape(-1, vocab)
    flat_keys = keys.reshape(-1).to(flat.device)  # the uniforms are made where the logits are
    flat_targets = None if targets is None else targets.reshape(-1, 1).to(flat.device)
    tokens, padded = flat.shape[0], vocab + (-vocab) % _CDF_BLOCK
    # rows a chunk: (r, V) fp32 buffers of ~2M entries (32M on an accelerator), and the draws'
    # (r, n, 16) fp64 cumulative sums of at most that
    budget = 1 << (21 if flat.device.type == "cpu" else 25)
    rows = max(1, min(tokens, budget // padded, budget // (n * _CDF_SUB)))
    shifted = torch.empty(rows, vocab, dtype=torch.float32, device=flat.device)
    exps = torch.zeros(rows, padded, dtype=torch.float32, device=flat.device)  # columns past V stay 0: no mass
    drawn, entropy, stats, head_ids, head_logp = [], [], [], [], []
    for i in range(0, tokens, rows):
        x = flat[i:i + rows]  # (r, V) in the logits' dtype
        s, e_blocks = shifted[: x.shape[0]], exps[: x.shape[0]]
        e = e_blocks[:, :vocab]
        torch.sub(x, x.amax(dim=-1, keepdim=True).float(), out=s)  # promotes into fp32; NaN rows stay NaN
        if temperature != 1.0:
            s.div_(temperature)  # (x - max x) / T = x / T - max(x / T) for T > 0
        torch.exp(s, out=e)
        at_target = s.gather(-1, flat_targets[i:i + rows]) if flat_targets is not None else s[:, :1]
        h = from_shifted(s, e, at_target)  # (r, 3) at this T; its entropy is the signal's
        entropy.append(h[:, 1])
        if flat_targets is not None:
            stats.append(h if temperature == 1.0 else token_difficulty(x, flat_targets[i:i + rows, 0]))
        if exact_top:  # the head's exact probabilities, then draw from the rest only
            top_ids, top_logp = _take_head(s, e, exact_top)
            head_ids.append(top_ids)
            head_logp.append(top_logp)
        u = counter_uniform(seed, flat_keys[i:i + rows], n)  # (r, n) fp64
        drawn.append(_inverse_cdf(e_blocks.view(x.shape[0], -1, _CDF_BLOCK), u).clamp_(max=vocab - 1))
    ids = torch.cat(drawn) if drawn else torch.empty(0, n, dtype=torch.int64, device=flat.device)
    distinct, counts = distinct_counts(ids)
    width = distinct.shape[1]
    logfreq = (counts / n).log()  # (N, width) fp64; padding: log 0 = -inf
    if exact_top:  # the head first; each draw weighs m * count / n
        head_lp = torch.cat(head_logp) if head_logp else flat.new_empty(0, exact_top, dtype=torch.float32)
        logfreq = torch.cat([head_lp.double(), logfreq + log_tail_mass(head_lp)[:, None]], dim=1)
        distinct = torch.cat([torch.cat(head_ids) if head_ids else distinct[:, :0], distinct], dim=1)
        width += exact_top
    logfreq = logfreq.float()
    entropy = torch.cat(entropy) if entropy else flat.new_empty(0, dtype=torch.float32)
    difficulty = None if flat_targets is None else (
        torch.cat(stats) if stats else flat.new_empty(0, len(STATS), dtype=torch.float32)).reshape(*lead, len(STATS))
    return TeacherSignal(distinct.reshape(*lead, width), logfreq.reshape(*lead, width), kind="sampled",
                         entropy=entropy.reshape(lead), temperature=float(temperature), difficulty=difficulty)


def _take_head(s: torch.Tensor, e: torch.Tensor, h: int) -> tuple[torch.Tensor, torch.Tensor]:
    """exact_top: the h most likely ids of each row, taken out of the draws.  s: (r, V) shifted
    logits at T; e: (r, V) their exps, in which the head's entries are zeroed in place (so the
    draws come from the rest).  -> (ids (r, h) most likely first, their log-probs (r, h) at T:
    -inf where the row has fewer than h finite logits)."""
    top_s, top_ids = _topk_and_max(s, h)[:2]
    z = e.sum(-1, keepdim=True)  # (r, 1), before the head is zeroed
    e.scatter_(1, top_ids, 0.0)
    no_tail = e.sum(-1, keepdim=True) == 0  # (r, 1) the head holds every finite entry, or the rest underflowed
    # There, draw the top-1 again (weight m = 2**-100): never an id of probability 0.  Its
    # column was just zeroed, so writing no_tail (1 or 0) into it touches those rows only,
    # with no host read (an accelerator would sync once a chunk to ask which rows).
    e.scatter_(1, top_ids[:, :1], no_tail.to(e.dtype))
    return top_ids, top_s - z.log()


def distinct_counts(ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, n) drawn ids -> (the distinct ids of each row, ascending (N, w) int64; how often each
    was drawn (N, w) fp64), w the most distinct ids any row has; a row with fewer is padded with
    id 0 at count 0.  One sort; `width` is one host read."""
    ids, _ = ids.sort(dim=-1)
    new = torch.ones_like(ids, dtype=torch.bool)
    new[:, 1:] = ids[:, 1:] != ids[:, :-1]
    run = new.cumsum(-1) - 1  # (N, n): which distinct id each draw is
    width = int(run.max()) + 1 if run.numel() else 0
    counts = torch.zeros(ids.shape[0], width, dtype=torch.float64, device=ids.device).scatter_add_(
        1, run, torch.ones_like(ids, dtype=torch.float64))
    distinct = torch.zeros(ids.shape[0], width, dtype=torch.int64, device=ids.device).scatter_(1, run, ids)
    return distinct, counts


MIN_TAIL_MASS = 2.0 ** -100  # the tail's mass never reaches 0: its weights stay invertible to counts


def log_tail_mass(head_logprobs: torch.Tensor) -> torch.Tensor:
    """(N, h) exact log-probs of a sampled signal's head -> (N,) fp64 log m, m = 1 - sum p_head
    held at >= MIN_TAIL_MASS.  The one formula the sampler and `SampledCodec` share, so a
    tail weight m * count / n decodes back to its count exactly."""
    mass = torch.exp(head_logprobs.double()).sum(-1)
    return torch.log1p(-mass.clamp(max=1.0)).clamp(min=math.log(MIN_TAIL_MASS))
