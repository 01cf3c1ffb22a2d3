"""Teacher-judged data selection: which training blocks each student learns from.

The cache holds, per training block, the teacher's mean nll, entropy and top-1 probability
over the block's training targets (losses/difficulty.py).  A `select` rule ranks blocks by
one of them and keeps a subset; students with the same rule form one `DataView` and share
its batches and their teacher signal, so per-student subsets still cost one teacher pass
(the cache's) and one cache read per view and micro-batch.

Determinism: the ranking is a stable sort on (hardness, block index), so a selection is a
function of the cache and the rule alone; the loop draws batches from the kept blocks with
the same seeded per-epoch permutation as from all of them.  The kept blocks' digest goes
into the run identity: a resumed run with another selection is refused.
"""
from __future__ import annotations

import functools
import hashlib
import math
from dataclasses import dataclass, field

import torch

from common.errors import UserError
from distill.config import SelectConfig
from losses.difficulty import COUNT, STATS, hardness

HISTOGRAM_BINS = 10


def select_blocks(rule: SelectConfig, sequence_stats: torch.Tensor, where: str) -> torch.Tensor:
    """(N, 4) per-block stats -> the kept block indices (M,) int64, ascending.

    keep_hardest f keeps round(f * N) blocks, drop_easiest f keeps N - round(f * N), the
    hardest by `rule.by`, ties broken by block index; min/max keep blocks whose statistic
    lies within them.  A block with no scored target (all masked) counts as the easiest and
    never passes a threshold.  Raises UserError naming `where` when nothing is kept."""
    n = sequence_stats.shape[0]
    if rule.min is not None or rule.max is not None:
        value = sequence_stats[:, STATS.index(rule.by)]  # fp32: a bound compares in the stats' own precision
        keep = ~torch.isnan(value) & (sequence_stats[:, COUNT] > 0)
        if rule.min is not None:
            keep &= value >= rule.min
        if rule.max is not None:
            keep &= value <= rule.max
        kept = torch.nonzero(keep).flatten()
    else:
        count = n - round(rule.drop_easiest * n) if rule.drop_easiest is not None else round(rule.keep_hardest * n)
        # Stable descending sort on hardness: among equals the lower block index ranks first.
        order = torch.sort(hardness(sequence_stats, rule.by), descending=True, stable=True).indices
        kept = torch.sort(order[:count]).values
    if kept.numel() == 0:
        scored = sequence_stats[:, STATS.index(rule.by)]
        scored = scored[torch.isfinite(scored)]
        span = f"{float(scored.min()):.3g}..{float(scored.max()):.3g}" if scored.numel() else "none scored"
        raise UserError(f"{where}: {rule.describe()} keeps none of the {n:,} training blocks (their {rule.by} "
                        f"spans {span}); loosen it")
    return kept


def histogram(values: torch.Tensor, lo: float, hi: float, bins: int = HISTOGRAM_BINS) -> list[int]:
    """Counts of finite `values` in `bins` equal bins over [lo, hi] (the edges are shared by
    every selection of one run, so their histograms compare)."""
    v = values[torch.isfinite(values)].double()
    if v.numel() == 0 or not hi > lo:
        return [int(v.numel())] + [0] * (bins - 1)
    return torch.histc(v.clamp(lo, hi), bins=bins, min=lo, max=hi).long().tolist()


UNIFORM_SHARE = 0.25  # dynamic selection: this share of each draw's probability is uniform over the view


@dataclass
class DataView:
    """Blocks a group of students learns from: all training blocks or a selection of them.

    blocks: the kept global block indices (M,) int64 ascending, None for every block.

    Static (rule.rescore_every == 0): step s takes the blocks at positions
    `batch_indices(s)` of a seeded per-epoch permutation of the view.  Dynamic: the view
    keeps a gap table, per kept block the students' loss on it minus the teacher's (nats,
    from the training steps: `record`), and at each window start (every rescore_every
    steps) turns it into draw weights, softmax(gap / rescore_temperature) mixed with
    uniform (UNIFORM_SHARE) so no block is starved; a block not yet seen counts as the
    mean seen gap.  Step s draws its batch from the window's weights with a generator
    seeded by (seed, s).  The table and the window's weights are the whole state
    (`state_dict`, checkpointed with each member student), so a resume at any step draws
    what the uninterrupted run would have."""

    rule: SelectConfig | None
    where: str  # the config key of the rule, for messages
    blocks: torch.Tensor | None
    students: list[str] = field(default_factory=list)
    keys: dict[str, str] = field(default_factory=dict)  # student -> the config key of its rule
    summary: dict = field(default_factory=dict)
    n_total: int = 0  # training blocks in the split
    gaps: torch.Tensor | None = None  # (M,) fp64, dynamic only
    seen: torch.Tensor | None = None  # (M,) bool
    weights: torch.Tensor | None = None  # (M,) fp64: the current window's draw weights

    def __post_init__(self):
        if self.dynamic:
            m = self.size
            self.gaps, self.seen = torch.zeros(m, dtype=torch.float64), torch.zeros(m, dtype=torch.bool)
            self.weights = torch.full((m,), 1.0 / m, dtype=torch.float64)

    @property
    def dynamic(self) -> bool:
        return self.rule is not None and self.rule.rescore_every > 0

    @property
    def size(self) -> int:
        return self.n_total if self.blocks is None else int(self.blocks.numel())

    def report(self, name: str) -> dict:
        """What OUT/students/NAME/data.json holds: the rule, its digest and the summary."""
        return {"student": name, "key": self.keys.get(name, self.where), "digest": self.digest(), **self.summary}

    def digest(self) -> str:
        """Identity of the kept blocks and how they are drawn (part of the run identity)."""
        if self.blocks is None and not self.dynamic:
            return "all"
        kept = torch.arange(self.n_total) if self.blocks is None else self.blocks
        how = f"{self.rule.rescore_every}:{self.rule.rescore_temperature!r}" if self.dynamic else ""
        return hashlib.sha256(kept.numpy().tobytes() + how.encode()).hexdigest()[:16]

    def global_indices(self, step: int, batch_size: int, seed: int) -> list[int]:
        """The global block indices of `step`'s whole batch (every rank's share).  Dynamic
        views: call `reweigh(step)` first (the loop does), so the window's weights are current."""
        if not self.dynamic:
            pos = batch_indices(step, batch_size, self.size, seed)
        else:
            g = torch.Generator().manual_seed(seed * 1_000_003 + step)
            pos = torch.multinomial(self.weights, batch_size, replacement=self.size < batch_size, generator=g).tolist()
        return pos if self.blocks is None else self.blocks[pos].tolist()

    def reweigh(self, step: int) -> None:
        """At a window start (a multiple of rescore_every past 0), weights from the gap table."""
        if not self.dynamic or step == 0 or step % self.rule.rescore_every:
            return
        gaps = self.gaps.clone()
        fill = gaps[self.seen].mean() if bool(self.seen.any()) else torch.zeros((), dtype=torch.float64)
        gaps[~self.seen] = fill
        soft = torch.softmax(gaps / self.rule.rescore_temperature, dim=0)
        self.weights = (1 - UNIFORM_SHARE) * soft + UNIFORM_SHARE / self.size

    def record(self, indices: list[int], gaps: torch.Tensor) -> None:
        """The students' gap (nats) on the blocks `indices` (global) just trained on; a
        non-finite gap (NaN: a block with no scored target; inf: a diverged loss) is left out."""
        idx = torch.as_tensor(indices, dtype=torch.int64)
        pos = idx if self.blocks is None else torch.searchsorted(self.blocks, idx)
        ok = torch.isfinite(gaps)
        self.gaps[pos[ok]] = gaps[ok].double()
        self.seen[pos[ok]] = True

    def state_dict(self) -> dict:
        return {"gaps": self.gaps, "seen": self.seen, "weights": self.weights}

    def load_state_dict(self, state: dict) -> None:
        if state["gaps"].shape != (self.size,):
            raise UserError(f"{self.where}: the checkpoint's gap table has {state['gaps'].shape[0]} blocks, this "
                            f"selection {self.size}; resume with the selection it was trained on")
        self.gaps, self.seen, self.weights = state["gaps"].double(), state["seen"].bool(), state["weights"].double()


@functools.lru_cache(maxsize=2)  # this epoch's and the next: a step may span the turn
def epoch_permutation(n: int, seed: int) -> torch.Tensor:
    """(n,) int64, a seeded permutation of range(n): made once per epoch, not once per step
    (at 100M blocks one takes about 10 s and 800 MB)."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed))


def batch_indices(step: int, batch_size: int, n_blocks: int, seed: int) -> list[int]:
    """Positions for `step`: consecutive slices of a per-epoch seeded permutation of n_blocks."""
    out: list[int] = []
    pos = step * batch_size
    while len(out) < batch_size:
        epoch, offset = divmod(pos, n_blocks)
        perm = epoch_permutation(n_blocks, seed * 1_000_003 + epoch)
        take = min(batch_size - len(out), n_blocks - offset)
        out += perm[offset: offset + take].tolist()
        pos += take
    return out


def plan_views(rules: list[tuple[str, str, SelectConfig | None]], sequence_stats: torch.Tensor | None,
               n_blocks: int, block_tokens: torch.Tensor | None = None) -> list[DataView]:
    """rules: per student (name, config key, rule or None) -> one DataView per distinct rule,
    in the students' order.  sequence_stats: (N, 4) from the cache (None: no rule may be
    given).  block_tokens: (N,) training targets per block, for the summary (default: the
    stats' count column).  `drop_easiest: 0` and no rule are the same view."""
    views: dict[str, DataView] = {}
    for name, where, rule in rules:
        if rule is not None and rule.keeps_all:
            rule = None
        if rule is not None and sequence_stats is None:
            raise UserError(f"{where}: the cache holds no teacher difficulty statistics; rerun `distill cache "
                            f"--overwrite` to record them")
        key = "all" if rule is None else rule.model_dump_json()
        if key not in views:
            blocks = None if rule is None else select_blocks(rule, sequence_stats, where)
            views[key] = DataView(rule, where, blocks, n_total=n_blocks)
        views[key].students.append(name)
        views[key].keys[name] = where
    for view in views.values():
        view.summary = summarize(view, sequence_stats, n_blocks, block_tokens)
    return list(views.values())


def summarize(view: DataView, sequence_stats: torch.Tensor | None, n_blocks: int,
              block_tokens: torch.Tensor | None) -> dict:
    """What the view's students see: blocks and target tokens kept, and per statistic the
    histogram of the kept blocks on the edges of all blocks (for the log and the report)."""
    tokens = block_tokens if block_tokens is not None else (
        sequence_stats[:, COUNT] if sequence_stats is not None else None)
    kept = view.blocks if view.blocks is not None else torch.arange(n_blocks)
    out = {"rule": "every block" if view.rule is None else view.rule.describe(), "blocks_kept": int(kept.numel()),
           "blocks_total": n_blocks, "fraction_kept": kept.numel() / n_blocks if n_blocks else 0.0}
    if tokens is not None:
        out |= {"tokens_kept": int(tokens[kept].sum()), "tokens_total": int(tokens.sum())}
    if sequence_stats is not None:
        hist = {}
        for j, stat in enumerate(STATS):
            col = sequence_stats[:, j]
            finite = col[torch.isfinite(col)]
            lo, hi = (float(finite.min()), float(finite.max())) if finite.numel() else (0.0, 0.0)
            sel = col[kept]
            sel_finite = sel[torch.isfinite(sel)]
            hist[stat] = {"edges": [lo, hi], "counts": histogram(sel, lo, hi),
                          "mean": float(sel_finite.mean()) if sel_finite.numel() else math.nan}
        out["difficulty"] = hist
    return out
