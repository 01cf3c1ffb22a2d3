"""The sampled signal's draws (`losses.signal.sample_signal`): the inverse CDF they come from,
against one fp64 cumulative sum over the whole vocabulary, and never an id of probability 0."""
from __future__ import annotations

import pytest
import torch

from losses.signal import counter_uniform, sample_signal


def _zipf_logits(rows: int, vocab: int, seed: int) -> torch.Tensor:
    """(rows, vocab) fp32: a Zipf-like slope plus noise, as bench/cache.py's synthetic teacher."""
    g = torch.Generator().manual_seed(seed)
    return 2.0 * torch.randn(rows, vocab, generator=g) - 0.5 * torch.log1p(torch.arange(vocab, dtype=torch.float32))


def _counts(ids: torch.Tensor, freq: torch.Tensor, vocab: int) -> torch.Tensor:
    """(N, w) ids and frequencies (count / n) -> (N, vocab) frequencies."""
    return torch.zeros(ids.shape[0], vocab, dtype=torch.float64).scatter_add_(1, ids, freq.double())


@pytest.mark.parametrize("vocab,n,temperature", [(300, 256, 1.0), (4096, 256, 0.5), (4096, 32, 2.0),
                                                 (50_000, 256, 1.0), (50_000, 32, 1.0)])
def test_draws_are_the_inverse_cdf_of_the_whole_vocabulary(vocab, n, temperature):
    """Each draw is the id whose fp64 cumulative probability first passes its uniform, as one
    cumulative sum over all V entries would give (the sampler reads 32 values a draw): equal
    for all but at most 1 in 20,000 draws, where rounding at a boundary may differ."""
    rows = 4096 // n * 8 if vocab < 10_000 else 6
    logits = _zipf_logits(rows, vocab, seed=vocab + n)
    keys = torch.arange(rows) + 1_000
    sig = sample_signal(logits, n, temperature, seed=7, keys=keys)
    got = _counts(sig.topk_ids, sig.topk_logprobs.exp(), vocab)
    e = ((logits - logits.amax(-1, keepdim=True)) / temperature).exp().double()  # the sampler's fp32 exps
    u = counter_uniform(7, keys, n) * e.sum(-1, keepdim=True)
    ref = torch.searchsorted(e.cumsum(-1), u, right=True).clamp_(max=vocab - 1)  # (rows, n)
    want = _counts(ref, torch.full(ref.shape, 1.0 / n), vocab)
    moved = (got - want).abs().sum() * n / 2  # draws that landed elsewhere
    assert moved <= max(1, rows * n // 20_000), (moved, rows * n)
    assert torch.allclose(got.sum(-1), torch.ones(rows, dtype=torch.float64))


def test_no_draw_lands_on_an_id_of_probability_zero():
    """-inf logits at the end of a sub-block, of a 256-id block, of the vocabulary and at every
    other id: many draws, none of them on such an id, at T = 0.5 / 1 / 2 and with an exact head."""
    vocab = 1000
    logits = _zipf_logits(64, vocab, seed=3)
    logits[:, 240:256] = float("-inf")  # the last sub-block of the first block
    logits[:, 496:512] = float("-inf")
    logits[:, 990:] = float("-inf")  # the vocabulary's end, before the padding to whole blocks
    logits[:32, 1::2] = float("-inf")  # half the rows: every other id
    logits[40, :] = float("-inf")
    logits[40, 255] = 0.0  # one row of a single finite id, at a block's last entry
    finite = torch.isfinite(logits)
    for temperature in (0.5, 1.0, 2.0):
        for exact_top in (0, 4):
            sig = sample_signal(logits, 512, temperature, seed=1, keys=torch.arange(64), exact_top=exact_top)
            drawn = torch.isfinite(sig.topk_logprobs)  # the entries that carry weight
            ids = sig.topk_ids[drawn]
            rows = torch.arange(64)[:, None].expand_as(sig.topk_ids)[drawn]
            assert finite[rows, ids].all(), (temperature, exact_top)
    assert sample_signal(logits[40:41], 64, 1.0, seed=0, keys=torch.zeros(1)).topk_ids[0, 0] == 255


@pytest.mark.parametrize("device", ["cpu", "accelerator"])
def test_a_value_past_the_end_lands_on_the_last_entry_of_positive_mass(device, monkeypatch):
    """The guard for rounding: a uniform at or past a sub-block's (or block's) summed mass, which
    fp32 and fp64 sums of the same entries can make, takes the last entry that has mass, not the
    zero-mass entries after it (clamping to the end would draw them).  On the CPU the fix-up
    runs when a value is past the end; on an accelerator always (no host read): both here."""
    from losses import signal

    if device == "accelerator":
        monkeypatch.setattr(signal, "_host_reads_are_cheap", lambda device: False)
    cdf = torch.tensor([[0.0, 0.25, 0.5, 0.5, 0.5], [0.0, 0.0, 0.0, 0.0, 0.0]], dtype=torch.float64)
    v = torch.tensor([[0.0, 0.3, 0.5, 0.7], [0.0, 0.1, 0.2, 0.3]], dtype=torch.float64)
    assert signal._search(cdf, v).tolist() == [[1, 2, 2, 2], [0, 0, 0, 0]]  # no mass at all: the first entry
    inside = torch.tensor([[0.1, 0.3, 0.49, 0.0]], dtype=torch.float64)
    assert signal._search(cdf[:1], inside).tolist() == [[1, 2, 2, 1]]  # nothing past the end


def test_only_the_cpu_asks_the_host():
    """The branch the two tests above and below force: the CPU reads `past.any()` back (cheap
    there); an accelerator never does."""
    from losses import signal

    assert signal._host_reads_are_cheap(torch.device("cpu"))
    assert not any(signal._host_reads_are_cheap(torch.device(d)) for d in ("cuda", "cuda:1", "xpu", "mps"))


def test_draws_under_bf16_autocast_are_the_fp32_draws():
    """The live teacher draws inside its autocast context (bf16 on an accelerator, or
    train.precision: bf16): the sampler's sums must not drop to bf16 there, which moved about
    one draw in seven to another id."""
    logits = _zipf_logits(32, 4096, seed=5)
    keys = torch.arange(32)
    plain = sample_signal(logits, 256, 1.0, seed=2, keys=keys)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under = sample_signal(logits, 256, 1.0, seed=2, keys=keys)
    assert torch.equal(plain.topk_ids, under.topk_ids) and torch.equal(plain.topk_logprobs, under.topk_logprobs)


def test_draws_read_nothing_back_to_the_host_on_an_accelerator(monkeypatch):
    """On a GPU the inverse CDF runs once per chunk of rows; a host read inside it (asking
    whether any draw ran past its level's mass, 3 levels) would sync the host 3 times a chunk.
    Under FakeTensorMode tensors carry no values, so any such read raises: the accelerator's
    path (the fix-up always applied) runs through it whole.  (Fake CUDA tensors cannot stand
    in: a CPU build of torch refuses to index them.)"""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from losses import signal

    monkeypatch.setattr(signal, "_host_reads_are_cheap", lambda device: False)
    with FakeTensorMode():
        blocks = torch.rand(4, 3, 256)  # (N, blocks, 256) unnormalised probabilities
        u = torch.rand(4, 8, dtype=torch.float64)
        ids = signal._inverse_cdf(blocks, u)
    assert ids.shape == (4, 8)


def test_distinct_counts_of_draws():
    """The sampled signal's layout from raw draws: distinct ids ascending, their counts, rows
    with fewer distinct ids padded with id 0 at count 0; no draws, no columns."""
    from losses.signal import distinct_counts

    distinct, counts = distinct_counts(torch.tensor([[5, 2, 5, 5], [7, 7, 7, 7]]))
    assert distinct.tolist() == [[2, 5], [7, 0]] and counts.tolist() == [[1.0, 3.0], [4.0, 0.0]]
    distinct, counts = distinct_counts(torch.empty(0, 4, dtype=torch.int64))
    assert distinct.shape == (0, 0) and counts.shape == (0, 0)
