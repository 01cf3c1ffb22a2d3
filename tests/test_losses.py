"""Property tests for losses/: divergences, hard CE, adaptive weighting, chunked evaluation."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from losses import (
    DIVERGENCES,
    TAILS,
    TeacherSignal,
    combine,
    hard_ce,
    hard_labels,
    jsd,
    per_token_losses,
    per_token_losses_from_logits,
    soft_weights,
    teacher_argmax_labels,
    teacher_entropy,
)

N, V, K = 12, 40, 6
DT = torch.float64  # reference comparisons run in fp64 so tolerances can be tight


def _kl_ref(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """KL(p || q) per row via torch.nn.functional (note kl_div's swapped argument order)."""
    return F.kl_div(log_q, log_p, reduction="none", log_target=True).sum(-1)


def _reference(name: str, s_logp: torch.Tensor, t_logp: torch.Tensor, **params) -> torch.Tensor:
    """Each divergence written directly from its definition, on log-prob rows."""
    p_s, p_t = s_logp.exp(), t_logp.exp()
    if name == "forward_kl":
        return _kl_ref(t_logp, s_logp)
    if name == "reverse_kl":
        return _kl_ref(s_logp, t_logp)
    if name == "jsd":
        b = params["beta"]
        m = torch.log(b * p_t + (1 - b) * p_s)
        return b * _kl_ref(t_logp, m) + (1 - b) * _kl_ref(s_logp, m)
    if name == "skew_kl":
        a = params["alpha"]
        return _kl_ref(t_logp, torch.log(a * p_t + (1 - a) * p_s))
    if name == "skew_reverse_kl":
        a = params["alpha"]
        return _kl_ref(s_logp, torch.log(a * p_s + (1 - a) * p_t))
    if name == "tv":
        return 0.5 * (p_t - p_s).abs().sum(-1)
    raise AssertionError(name)


PARAMS = {"jsd": {"beta": 0.3}, "skew_kl": {"alpha": 0.2}, "skew_reverse_kl": {"alpha": 0.2}}


def _pair(seed: int = 0, n: int = N, v: int = V, scale: float = 3.0):
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(n, v, generator=g, dtype=DT) * scale
    t = torch.randn(n, v, generator=g, dtype=DT) * scale
    return s, t


def _sparse(t: torch.Tensor, k: int) -> TeacherSignal:
    """Top-k signal kept in t's dtype (`TeacherSignal.from_logits` rounds to fp32)."""
    values, ids = torch.topk(F.log_softmax(t, -1), k, dim=-1)
    return TeacherSignal(ids, values)


def test_registry_is_complete():
    expected = {"forward_kl", "reverse_kl", "jsd", "skew_kl", "skew_reverse_kl", "tv"}
    assert set(DIVERGENCES) == expected


@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("name", sorted(DIVERGENCES))
def test_dense_matches_functional_reference(name, temperature):
    s, t = _pair()
    got = DIVERGENCES[name](s, TeacherSignal.from_logits(t, K, keep_dense=True),
                            temperature=temperature, **PARAMS.get(name, {}))
    ref = _reference(name, F.log_softmax(s / temperature, -1), F.log_softmax(t / temperature, -1),
                     **PARAMS.get(name, {})) * temperature**2
    assert got.shape == (N,)
    torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-12)
    assert (got > 0).all()


@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0])
@pytest.mark.parametrize("name", sorted(DIVERGENCES))
def test_dense_teacher_over_fewer_ids_than_the_student(name, temperature):
    """A student vocab padded past the tokenizer's (dense teacher logits (N, V - 4)): the
    missing ids are ones the teacher never predicts, at the bucket's floor below its max
    (times max(T, 1)).
    Every divergence stays finite, matches the reference with the teacher so padded, and the
    chunked loss (forward and the student's gradient) agrees with it."""
    from losses.divergences import TAIL_FLOOR_LOGPROB

    from losses.divergences import dense_over

    s, t = _pair(4)
    t = t[:, : V - 4]  # (N, V - 4)
    sig = TeacherSignal.from_logits(t, K, keep_dense=True)
    # widened, the logits are no longer log-probabilities: the loss must not read them as such
    assert sig.dense_entropy is not None and dense_over(sig, V, temperature).dense_entropy is None
    assert dense_over(sig, V - 4, temperature) is sig
    kw = dict(temperature=temperature, **PARAMS.get(name, {}))
    got = DIVERGENCES[name](s, sig, **kw)
    floor = t.amax(-1, keepdim=True) + max(temperature, 1.0) * TAIL_FLOOR_LOGPROB
    wide = torch.cat([t, floor.expand(-1, 4)], -1)  # (N, V)
    ref = _reference(name, F.log_softmax(s / temperature, -1), F.log_softmax(wide / temperature, -1),
                     **PARAMS.get(name, {})) * temperature**2
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-12)
    if name == "forward_kl":  # the floor's mass is negligible: as if the teacher gave those ids 0
        t_logp = F.log_softmax(F.pad(t, (0, 4), value=-math.inf) / temperature, -1)
        terms = t_logp.exp() * (t_logp - F.log_softmax(s / temperature, -1))
        exact = torch.where(torch.isinf(t_logp), 0.0, terms).sum(-1) * temperature**2
        torch.testing.assert_close(got, exact, rtol=1e-5, atol=1e-6)
    z = s.clone().requires_grad_(True)
    labels = torch.zeros(N, dtype=torch.long)
    _, soft = per_token_losses_from_logits(z, sig, labels, None, divergence=name, chunk_size=5, **kw)
    (soft * torch.linspace(0.5, 1.5, N, dtype=DT)).sum().backward()
    z_ref = s.clone().requires_grad_(True)
    (DIVERGENCES[name](z_ref, sig, **kw) * torch.linspace(0.5, 1.5, N, dtype=DT)).sum().backward()
    torch.testing.assert_close(soft.to(DT), ref, rtol=1e-6, atol=1e-8)
    torch.testing.assert_close(z.grad, z_ref.grad, rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("form", ["log_normalised", "raw_logits"])
@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0])
def test_dense_forward_kl_with_teacher_logits_at_minus_inf(temperature, form):
    """A teacher that rules ids out (-inf logits: p_t = 0 there) adds nothing there to the
    chunked forward KL, as KL's 0 log 0 = 0, not NaN: values and both gradients (hidden
    states and lm_head) against F.kl_div over the unchunked logits, in fp64.  Both forms of
    a dense signal: log-probabilities with their entropy, as the live teacher hands them
    over (at T = 1 the loss then reads them), and raw logits (a padded student vocab)."""
    g = torch.Generator().manual_seed(7)
    hidden = torch.randn(N, 8, generator=g, dtype=DT).requires_grad_(True)
    weight = torch.randn(V, 8, generator=g, dtype=DT).requires_grad_(True)
    t = torch.randn(N, V, generator=g, dtype=DT) * 3
    t[:, :5] = -math.inf  # ids no row may take
    t[2, 5:20] = -math.inf
    sig = TeacherSignal.from_logits(t, K, keep_dense=True)
    if form == "raw_logits":
        sig = TeacherSignal(sig.topk_ids, sig.topk_logprobs, t + 4.0)  # shifted: not log-probabilities
    else:
        assert sig.dense_entropy is not None
    labels = torch.randint(5, V, (N,), generator=g)
    weights = torch.linspace(0.5, 1.5, N, dtype=DT)
    _, soft = per_token_losses(hidden, weight, sig, labels, None, temperature=temperature, chunk_size=5)
    got = torch.autograd.grad((soft * weights).sum(), (hidden, weight))
    log_s = F.log_softmax(hidden @ weight.T / temperature, -1)
    ref = F.kl_div(log_s, F.softmax(t / temperature, -1), reduction="none").sum(-1) * temperature**2
    want = torch.autograd.grad((ref * weights).sum(), (hidden, weight))
    assert torch.isfinite(soft).all()
    torch.testing.assert_close(soft.to(DT), ref.detach(), rtol=1e-9, atol=1e-10)
    for a, b in zip(got, want):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)


def test_dense_forward_kl_at_t1_reads_the_teachers_entropy_from_the_signal():
    """At T = 1 the dense forward KL takes H(t) from `dense_entropy` rather than recomputing it
    (KL = -H(t) - p_t . z + lse(z)): an entropy off by d moves each value by -d and no gradient,
    so the per-step normalisation (once for every student) is what the loss reads.  At T = 2
    the entropy at T = 1 is of no use, and the value does not move."""
    s, t = _pair(3)
    sig = TeacherSignal.from_logits(t, K, keep_dense=True)
    shifted = TeacherSignal(sig.topk_ids, sig.topk_logprobs, sig.logits, dense_entropy=sig.dense_entropy + 0.25)
    labels = torch.zeros(N, dtype=torch.long)
    for temperature, moved in ((1.0, -0.25), (2.0, 0.0)):
        out = []
        for signal in (sig, shifted):
            z = s.clone().requires_grad_(True)
            _, soft = per_token_losses_from_logits(z, signal, labels, None, temperature=temperature, chunk_size=5)
            soft.sum().backward()
            out.append((soft.detach(), z.grad))
        torch.testing.assert_close(out[1][0], out[0][0] + moved, rtol=0, atol=1e-12)
        torch.testing.assert_close(out[1][1], out[0][1], rtol=0, atol=0)


@pytest.mark.parametrize("form", ["log_normalised", "raw_logits"])
@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0])
def test_dense_forward_kl_value_is_not_rounded_to_bf16_under_autocast(temperature, form):
    """A bf16 run's loss forward runs under autocast, which would round the forward KL's row
    dot (p_t . z over the vocabulary) to bf16: at V = 32,000 and logits near 15 that is off by
    about the KL itself.  The lm_head's logits are bf16 by design; what follows them is not."""
    g = torch.Generator().manual_seed(5)
    vocab = 32_000
    hidden = torch.randn(6, 16, generator=g)
    weight = torch.randn(vocab, 16, generator=g) / 4 + torch.randn(vocab, 1, generator=g)  # logits ~ 15 +- 4
    bias = torch.full((vocab,), 15.0)
    logits = F.linear(hidden.bfloat16(), weight.bfloat16(), bias.bfloat16()).double()  # what autocast computes
    t = logits + torch.randn(6, vocab, generator=g, dtype=DT) * 0.3  # a teacher near the student
    sig = TeacherSignal.from_logits(t.float(), K, keep_dense=True)
    if form == "raw_logits":
        sig = TeacherSignal(sig.topk_ids, sig.topk_logprobs, t.float())
    labels = torch.zeros(6, dtype=torch.long)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _, soft = per_token_losses(hidden, weight, sig, labels, None, bias=bias, temperature=temperature)
    want = _kl_ref(F.log_softmax(t / temperature, -1), F.log_softmax(logits / temperature, -1)) * temperature**2
    assert float(want.mean()) > 0.01
    torch.testing.assert_close(soft.double(), want, rtol=1e-3, atol=5e-4)  # fp32 sums over V; bf16 is ~0.04 off


def test_teacher_entropy_is_not_rounded_to_bf16_under_autocast():
    """A bf16 teacher's lm_head chunks are reduced inside its autocast: the top-k's difficulty
    (the curriculum's entropy) and a sampled signal's entropy (its KL's value) must not take
    bf16 operands (0.01 nats off at V = 32,000)."""
    from losses.signal import sample_signal, topk_logprobs

    g = torch.Generator().manual_seed(0)
    x = torch.randn(8, 32_000, generator=g) * 3 + 10
    targets = torch.randint(0, 32_000, (8,), generator=g)
    keys = torch.arange(8)
    plain = topk_logprobs(x, 8, targets)[2], sample_signal(x, 16, 1.0, 0, keys).entropy
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under = topk_logprobs(x, 8, targets)[2], sample_signal(x, 16, 1.0, 0, keys).entropy
    for a, b in zip(plain, under):
        torch.testing.assert_close(b, a, rtol=0, atol=1e-5)


def test_log_normalize_gives_log_probabilities_and_their_entropy():
    """`log_normalize_` leaves log_softmax of each row in place (chunk by chunk: 4 chunks at this
    vocab) and returns its entropy; -inf stays -inf and weighs 0; a NaN row stays NaN."""
    from losses.signal import log_normalize_

    g = torch.Generator().manual_seed(0)
    for dtype, vocab in ((torch.float64, 40), (torch.float32, 300_000)):
        x = torch.randn(20, vocab, generator=g, dtype=dtype) * 4
        x[3, :7] = -math.inf
        x[5, 1] = math.nan
        want = F.log_softmax(x.double(), -1)  # fp64 references (fp32's log_softmax is 10x further off)
        want_entropy = torch.special.entr(want.exp()).sum(-1)
        y = x.clone()
        entropy = log_normalize_(y)
        ok = torch.arange(20) != 5
        tol = dict(rtol=0, atol=1e-12) if dtype == torch.float64 else dict(rtol=0, atol=1e-5)
        torch.testing.assert_close(y[ok].double(), want[ok], **tol)
        torch.testing.assert_close(entropy[ok].double(), want_entropy[ok], **tol)
        assert torch.isneginf(y[3, :7]).all() and torch.isnan(y[5]).all() and torch.isnan(entropy[5])
        assert entropy.dtype == dtype


@pytest.mark.parametrize("name", sorted(DIVERGENCES))
def test_bucket_matches_reference_on_aggregated_distributions(name):
    """At T=1 the bucket estimator is the divergence between the (k+1)-outcome distributions."""
    s, t = _pair(1)
    sig = _sparse(t, K)
    ids = sig.topk_ids

    def aggregate(logits):
        p = F.softmax(logits, -1)
        top = p.gather(-1, ids)
        return torch.log(torch.cat([top, 1 - top.sum(-1, keepdim=True)], -1))

    got = DIVERGENCES[name](s, sig, tail="bucket", **PARAMS.get(name, {}))
    ref = _reference(name, aggregate(s), aggregate(t), **PARAMS.get(name, {}))
    # TeacherSignal.tail_logprob() works in fp32, hence the fp32-level tolerance.
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", sorted(DIVERGENCES))
def test_renorm_matches_reference_on_restricted_softmax(name):
    s, t = _pair(2)
    sig = _sparse(t, K)
    got = DIVERGENCES[name](s, sig, tail="renorm", temperature=2.0, **PARAMS.get(name, {}))
    ids = sig.topk_ids
    ref = _reference(name, F.log_softmax(s.gather(-1, ids) / 2.0, -1),
                     F.log_softmax(t.gather(-1, ids) / 2.0, -1), **PARAMS.get(name, {})) * 4.0
    torch.testing.assert_close(got, ref, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("tail", TAILS)
@pytest.mark.parametrize("temperature", [1.0, 0.7, 3.0])
@pytest.mark.parametrize("name", sorted(DIVERGENCES))
def test_sparse_with_k_equal_vocab_equals_dense(name, tail, temperature):
    s, t = _pair(3)
    kw = dict(temperature=temperature, **PARAMS.get(name, {}))
    dense = DIVERGENCES[name](s, TeacherSignal.from_logits(t, V, keep_dense=True), **kw)
    sparse = DIVERGENCES[name](s, _sparse(t, V), tail=tail, **kw)
    torch.testing.assert_close(sparse, dense, rtol=1e-9, atol=1e-10)


def test_sparse_estimators_differ_when_tail_matters():
    """Guards the test above: with k < V the two estimators are genuinely different."""
    s, t = _pair(4, scale=1.0)
    sig = TeacherSignal.from_logits(t, K)
    bucket = DIVERGENCES["forward_kl"](s, sig, tail="bucket")
    renorm = DIVERGENCES["forward_kl"](s, sig, tail="renorm")
    assert (bucket - renorm).abs().max() > 1e-3


def test_jsd_beta_extremes_are_the_two_kls():
    s, t = _pair(6)
    sig = TeacherSignal.from_logits(t, K, keep_dense=True)
    fkl = DIVERGENCES["forward_kl"](s, sig, temperature=1.5)
    rkl = DIVERGENCES["reverse_kl"](s, sig, temperature=1.5)
    torch.testing.assert_close(jsd(s, sig, temperature=1.5, beta=0.0), fkl)
    torch.testing.assert_close(jsd(s, sig, temperature=1.5, beta=1.0), rkl)
    # And the formula approaches them continuously, scaled by beta (resp. 1 - beta).
    eps = 1e-8
    torch.testing.assert_close(jsd(s, sig, temperature=1.5, beta=eps) / eps, fkl, rtol=1e-4, atol=0)
    torch.testing.assert_close(jsd(s, sig, temperature=1.5, beta=1 - eps) / eps, rkl, rtol=1e-4,
                               atol=0)


def test_skew_divergences_at_alpha_zero_are_the_kls_and_are_bounded():
    s, t = _pair(7, scale=8.0)
    sig = TeacherSignal.from_logits(t, K, keep_dense=True)
    torch.testing.assert_close(DIVERGENCES["skew_kl"](s, sig, alpha=0.0),
                               DIVERGENCES["forward_kl"](s, sig))
    torch.testing.assert_close(DIVERGENCES["skew_reverse_kl"](s, sig, alpha=0.0),
                               DIVERGENCES["reverse_kl"](s, sig))
    # KL(p || a p + (1-a) q) <= log(1/a): the point of skewing.
    assert (DIVERGENCES["skew_kl"](s, sig, alpha=0.1) <= math.log(10) + 1e-9).all()


@pytest.mark.parametrize("tail", TAILS)
@pytest.mark.parametrize("name", sorted(DIVERGENCES))
def test_mask_zeroes_tokens_and_fully_masked_is_zero_not_nan(name, tail):
    s, t = _pair(8)
    s.requires_grad_(True)
    sig = TeacherSignal.from_logits(t, K)
    mask = torch.arange(N) % 3 != 0
    full = DIVERGENCES[name](s, sig, tail=tail, **PARAMS.get(name, {}))
    sig.topk_logprobs[~mask] = float("-inf")  # padding rows of a cache may hold anything
    part = DIVERGENCES[name](s, sig, tail=tail, mask=mask, **PARAMS.get(name, {}))
    torch.testing.assert_close(part[mask], full[mask])
    assert (part[~mask] == 0).all()
    (g,) = torch.autograd.grad(part.sum(), s)
    assert torch.isfinite(g).all() and (g[~mask] == 0).all()

    none = DIVERGENCES[name](s, sig, tail=tail, mask=torch.zeros(N, dtype=torch.bool),
                             **PARAMS.get(name, {}))
    total, _ = combine(torch.zeros(N, dtype=DT), none, torch.zeros(N, dtype=torch.bool), 1.0, 1.0)
    total.backward()
    assert total.item() == 0.0 and (none == 0).all()
    assert torch.isfinite(s.grad).all() and (s.grad == 0).all()


@pytest.mark.parametrize("case", ["fp32_1e4", "bf16_1e4", "padded_vocab"])
@pytest.mark.parametrize("tail", ["dense", *TAILS])
@pytest.mark.parametrize("name", sorted(DIVERGENCES))
def test_finite_values_and_grads_in_hard_cases(name, tail, case):
    g = torch.Generator().manual_seed(9)
    if case == "padded_vocab":  # padded columns at -inf in both models: impossible, not NaN
        s, t = _pair(14)
        s[:, -5:] = t[:, -5:] = float("-inf")
    else:  # logits at +-1e4, and half the rows with a top-k that holds all the teacher's mass
        dtype = torch.bfloat16 if case == "bf16_1e4" else torch.float32
        s, t = ((torch.randint(-1, 2, (N, V), generator=g) * 1e4).to(dtype) for _ in range(2))
        t[: N // 2] = -1e4
        t[: N // 2, :2] = 1e4
    s.requires_grad_(True)
    sig = TeacherSignal.from_logits(t, K, keep_dense=tail == "dense")
    out = DIVERGENCES[name](s, sig, tail="bucket" if tail == "dense" else tail,
                            temperature=2.0, **PARAMS.get(name, {}))
    out.sum().backward()
    assert torch.isfinite(out).all() and torch.isfinite(s.grad).all()
    if case == "padded_vocab":
        assert (s.grad[:, -5:] == 0).all()


def test_invalid_arguments_raise():
    s, t = _pair()
    sig = TeacherSignal.from_logits(t, K)
    with pytest.raises(ValueError, match="tail"):
        DIVERGENCES["forward_kl"](s, sig, tail="nope")
    with pytest.raises(ValueError, match="temperature"):
        DIVERGENCES["forward_kl"](s, sig, temperature=0.0)
    with pytest.raises(ValueError, match="beta"):
        jsd(s, sig, beta=1.5)


# ---- hard targets ------------------------------------------------------------------------------

def test_hard_ce_matches_cross_entropy_and_ignores_padding():
    s, _ = _pair(10)
    labels = torch.randint(0, V, (N,))
    labels[::4] = -100
    got = hard_ce(s, labels)
    ref = -F.log_softmax(s, -1).gather(-1, labels.clamp_min(0)[:, None]).squeeze(-1)
    torch.testing.assert_close(got[labels != -100], ref[labels != -100])
    assert (got[labels == -100] == 0).all()


def test_teacher_argmax_labels_and_hard_label_selection():
    _, t = _pair(11)
    sig = TeacherSignal.from_logits(t, K)
    assert torch.equal(teacher_argmax_labels(sig), t.argmax(-1))
    # An unsorted cache still yields the top-1.
    perm = torch.randperm(K)
    shuffled = TeacherSignal(sig.topk_ids[:, perm], sig.topk_logprobs[:, perm])
    assert torch.equal(teacher_argmax_labels(shuffled), t.argmax(-1))

    labels = torch.randint(0, V, (N,))
    labels[0] = -100
    mask = torch.ones(N, dtype=torch.bool)
    mask[1] = False
    got = hard_labels("teacher_argmax", labels, sig, mask)
    assert got[0] == -100 and got[1] == -100 and torch.equal(got[2:], t.argmax(-1)[2:])
    assert torch.equal(hard_labels("labels", labels, None, mask)[2:], labels[2:])
    with pytest.raises(ValueError, match="hard_target"):
        hard_labels("soft", labels, sig)


# ---- adaptive weighting --------------------------------------------------------------------------

@pytest.mark.parametrize("mode", ["uniform", "confidence", "entropy", "disagreement"])
def test_adaptive_weights_average_to_w_soft_over_valid_tokens(mode):
    s, t = _pair(12)
    sig = TeacherSignal.from_logits(t.float(), K)
    soft = DIVERGENCES["forward_kl"](s.float(), sig)
    mask = torch.arange(N) % 4 != 0
    w = soft_weights(mode, 0.7, mask, signal=sig, soft=soft)
    assert w.shape == (N,) and (w[~mask] == 0).all() and (w >= 0).all()
    assert w[mask].mean().item() == pytest.approx(0.7, rel=1e-6)
    if mode != "uniform":
        assert w[mask].std() > 1e-3  # it really adapts
    none = torch.zeros(N, dtype=torch.bool)
    assert (soft_weights(mode, 0.7, none, signal=sig, soft=soft) == 0).all()


def test_adaptive_weights_follow_the_teacher():
    v = 10
    peaked = torch.tensor([[8.0] + [0.0] * (v - 1)])
    flat = torch.zeros(1, v)
    sig = TeacherSignal.from_logits(torch.cat([peaked, flat]), 3)
    for mode in ("confidence", "entropy"):
        w = soft_weights(mode, 1.0, None, signal=sig)
        assert w[0] > w[1], mode
    # Top-k + tail entropy is exact when k = V, and a lower bound otherwise.
    logits = torch.randn(5, v)
    exact = teacher_entropy(TeacherSignal.from_logits(logits, v, keep_dense=True))
    torch.testing.assert_close(teacher_entropy(TeacherSignal.from_logits(logits, v)), exact)
    assert (teacher_entropy(TeacherSignal.from_logits(logits, 3)) <= exact + 1e-6).all()
    # No disagreement anywhere: fall back to uniform weights.
    torch.testing.assert_close(soft_weights("disagreement", 0.5, None, soft=torch.zeros(4)),
                               torch.full((4,), 0.5))


def test_combine_matches_formula_and_reports_stats():
    hard = torch.tensor([1.0, 2.0, 3.0, 100.0], requires_grad=True)
    soft = torch.tensor([0.5, 0.25, 1.0, 100.0], requires_grad=True)
    mask = torch.tensor([True, True, True, False])
    w = torch.tensor([0.2, 0.4, 0.6, 9.0])
    total, stats = combine(hard, soft, mask, 0.5, w)
    expected = (0.5 * (1 + 2 + 3) + (0.2 * 0.5 + 0.4 * 0.25 + 0.6 * 1.0)) / 3
    assert total.item() == pytest.approx(expected)
    assert stats == pytest.approx({"loss": expected, "hard": 2.0, "soft": 1.75 / 3,
                                   "w_hard": 0.5, "w_soft": 0.4, "n_valid": 3})
    total.backward()
    assert hard.grad[3] == 0 and soft.grad[3] == 0 and soft.grad[2].item() == pytest.approx(0.2)


# ---- chunked evaluation --------------------------------------------------------------------------

def _head_problem(n=37, h=16, v=50, dtype=torch.float32, seed=13, scale=1.0, dense=False):
    g = torch.Generator().manual_seed(seed)
    hidden = (torch.randn(n, h, generator=g) * scale).to(dtype).requires_grad_(True)
    weight = torch.randn(v, h, generator=g).to(dtype).requires_grad_(True)
    bias = torch.randn(v, generator=g).to(dtype).requires_grad_(True)
    t = torch.randn(n, v, generator=g, dtype=dtype if dense else torch.float32) * 3
    sig = TeacherSignal.from_logits(t, 8, keep_dense=dense)
    labels = torch.randint(0, v, (n,), generator=g)
    mask = torch.rand(n, generator=g) > 0.2
    return hidden, weight, bias, sig, labels, mask


def _grads(loss, *tensors):
    return torch.autograd.grad(loss, tensors)


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 1e-5)])
@pytest.mark.parametrize("hard_target", ["labels", "teacher_argmax"])
@pytest.mark.parametrize("divergence,params,dense", [
    ("forward_kl", {}, False), ("jsd", {"beta": 0.4}, False),
    ("skew_reverse_kl", {"alpha": 0.1}, False), ("reverse_kl", {}, True), ("tv", {}, True)])
def test_chunked_equals_unchunked(divergence, params, dense, hard_target, dtype, tol):
    """Same math, so fp64 agrees to 1e-10; fp32 differs only by the matmul's blocking."""
    hidden, weight, bias, sig, labels, mask = _head_problem(dtype=dtype, dense=dense)
    kw = dict(divergence=divergence, temperature=2.0, tail="bucket", hard_target=hard_target,
              **params)
    hard, soft = per_token_losses(hidden, weight, sig, labels, mask, chunk_size=8, bias=bias, **kw)

    logits = hidden @ weight.T + bias  # the naive path, written out
    targets = hard_labels(hard_target, labels, sig, mask)
    ref_hard = hard_ce(logits, targets)
    ref_soft = DIVERGENCES[divergence](logits, sig, temperature=2.0, tail="bucket", mask=mask,
                                       **params)
    torch.testing.assert_close(hard, ref_hard, rtol=tol, atol=tol)
    torch.testing.assert_close(soft, ref_soft, rtol=tol, atol=tol)

    wts = torch.rand(hidden.shape[0], generator=torch.Generator().manual_seed(0), dtype=dtype)
    got = _grads((0.3 * hard + wts * soft).sum(), hidden, weight, bias)
    ref = _grads((0.3 * ref_hard + wts * ref_soft).sum(), hidden, weight, bias, logits)
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, rtol=tol, atol=tol)

    lg = logits.detach().requires_grad_(True)
    hard2, soft2 = per_token_losses_from_logits(lg, sig, labels, mask, chunk_size=5, **kw)
    torch.testing.assert_close(hard2, ref_hard, rtol=tol, atol=tol)
    torch.testing.assert_close(soft2, ref_soft, rtol=tol, atol=tol)
    (g_lg,) = _grads((0.3 * hard2 + wts * soft2).sum(), lg)
    torch.testing.assert_close(g_lg, ref[-1], rtol=tol, atol=tol)


def test_chunked_saves_no_full_vocab_tensors_for_backward():
    hidden, weight, _, sig, labels, _ = _head_problem(n=64, v=200)
    chunk, inputs = 8, {hidden.untyped_storage().data_ptr(), weight.untyped_storage().data_ptr()}

    def largest_saved(fn):  # numel of the largest tensor autograd keeps that is not an input
        sizes = [0]

        def pack(t):
            sizes.append(t.numel() * (t.untyped_storage().data_ptr() not in inputs))
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            fn()
        return max(sizes)

    chunked = largest_saved(lambda: per_token_losses(hidden, weight, sig, labels, None,
                                                     chunk_size=chunk))
    naive = largest_saved(lambda: DIVERGENCES["forward_kl"](hidden @ weight.T, sig))
    assert naive >= 64 * 200  # the check can see a full (N, V) tensor ...
    assert chunked < chunk * 200  # ... and the chunked path keeps none, not even a chunk's


def test_auto_chunk_size_follows_the_device(monkeypatch):
    """A CPU keeps a chunk's (C, V) fp32 buffers within 256 MiB; an accelerator gets 2 GiB (small
    chunks left an H200 at 1.8x the time at Liger's shape, BENCHMARKS.md); the chunked loss asks
    with the device its rows are on."""
    import losses.chunked as chunked

    assert chunked.auto_chunk_size(128_256) == chunked.auto_chunk_size(128_256, "cpu") == 160
    assert chunked.auto_chunk_size(128_256, torch.device("cuda")) == chunked.auto_chunk_size(128_256, "cuda:1") == 1392
    assert chunked.auto_chunk_size(128_256, "cuda", budget_bytes=256 << 20) == 160
    with pytest.raises(TypeError, match="budget_bytes="):
        chunked.auto_chunk_size(128_256, 256 << 20)  # the old positional budget is not taken for a device
    for vocab in (4_096, 49_152, 202_048):
        for device, budget in (("cpu", 256 << 20), ("cuda", 2 << 30)):
            c = chunked.auto_chunk_size(vocab, device)
            assert c % 16 == 0 and 3 * 4 * vocab * c <= budget < 3 * 4 * vocab * (c + 16)
    asked = []
    real = chunked.auto_chunk_size
    monkeypatch.setattr(chunked, "auto_chunk_size", lambda vocab, device=None, buffers=chunked._LIVE_BUFFERS:
                        asked.append((vocab, device, buffers)) or real(vocab, device, buffers=buffers))
    hidden, weight, _, sig, labels, _ = _head_problem(n=16, v=200)
    per_token_losses(hidden, weight, sig, labels, None)
    per_token_losses(hidden, weight, sig, labels, None, softcap=30.0)  # a soft cap's slope: one buffer more
    assert asked == [(200, hidden.device, 3), (200, hidden.device, 4)]
    assert chunked.auto_chunk_size(128_256, "cpu", buffers=4) == 128  # 3/4 of the budget's 160, in 16s


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("divergence", sorted(DIVERGENCES))
def test_chunked_grads_finite_at_extreme_logits(divergence, dtype):
    hidden, weight, _, sig, labels, mask = _head_problem(dtype=dtype, scale=2e3)
    with torch.no_grad():
        assert (hidden @ weight.T).float().abs().max() > 1e4  # really extreme
    hard, soft = per_token_losses(hidden, weight, sig, labels, mask, divergence=divergence,
                                  chunk_size=16, **PARAMS.get(divergence, {}))
    total, _ = combine(hard, soft, mask, 0.5, 0.5)
    total.backward()
    assert torch.isfinite(total)
    assert torch.isfinite(hidden.grad).all() and torch.isfinite(weight.grad).all()
    assert hidden.grad.dtype == dtype


def test_chunked_edge_cases_fully_masked_no_teacher_and_no_grad():
    hidden, weight, bias, sig, labels, mask = _head_problem()
    none = torch.zeros(hidden.shape[0], dtype=torch.bool)
    total, stats = combine(*per_token_losses(hidden, weight, sig, labels, none, chunk_size=8),
                           none, 0.5, 0.5)
    total.backward()  # fully masked: 0, not NaN, with zero gradients
    assert total.item() == 0.0 and stats["n_valid"] == 0
    assert (hidden.grad == 0).all() and (weight.grad == 0).all()

    hidden.requires_grad_(False)
    hidden.grad = weight.grad = None
    hard, soft = per_token_losses(hidden, weight, None, labels, mask, chunk_size=8, bias=bias)
    assert (soft == 0).all()  # no teacher: plain CE
    ref = hard_ce(hidden @ weight.T + bias, hard_labels("labels", labels, None, mask))
    torch.testing.assert_close(hard, ref, rtol=1e-5, atol=1e-5)
    hard.sum().backward()
    assert hidden.grad is None and weight.grad is not None and bias.grad is not None

    with torch.no_grad():
        hard_ng, _ = per_token_losses(hidden, weight, None, labels, mask, chunk_size=8, bias=bias)
    assert not hard_ng.requires_grad
    torch.testing.assert_close(hard_ng, hard.detach())


@pytest.mark.parametrize("vocab,k", [(40, 6), (40, 40), (1000, 3), (64 * 300, 64), (64 * 300 + 17, 64), (64 * 300 + 17, 1)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_topk_logprobs_matches_fp64_log_softmax_topk(vocab, k, dtype):
    from losses.signal import topk_logprobs

    g = torch.Generator().manual_seed(vocab + k)
    logits = (3 * torch.randn(2, 5, vocab, generator=g)).to(dtype)
    logits[0, 0, -1] = 40.0  # the row max in the ragged tail after the last full block
    logits[1, 2, :7] = -math.inf  # masked vocab entries are fine
    values, ids = topk_logprobs(logits, k)
    ref = torch.topk(torch.log_softmax(logits.double(), -1), k, -1)
    assert values.shape == ids.shape == (2, 5, k) and values.dtype == torch.float32
    torch.testing.assert_close(values.double(), ref.values, rtol=0, atol=1e-5)
    # bf16 logits tie often, and tied ids may come in another order: check ids by value.
    assert all(len(set(r.tolist())) == k for r in ids.reshape(-1, k))
    torch.testing.assert_close(torch.log_softmax(logits.double(), -1).gather(-1, ids), ref.values, rtol=0, atol=1e-5)
    if dtype == torch.float32:
        assert torch.equal(ids, ref.indices)


def test_topk_logprobs_marks_nonfinite_rows_nan():
    from losses.signal import topk_logprobs

    logits = torch.randn(4, 64 * 300)
    logits[0, 5] = math.nan
    logits[1, 9] = math.inf
    logits[2] = -math.inf
    values, _ = topk_logprobs(logits, 8)
    assert values[:3].isnan().any(-1).all()
    assert torch.isfinite(values[3]).all()
    values, ids = topk_logprobs(torch.randn(0, 3, 50), 4)  # no rows
    assert values.shape == ids.shape == (0, 3, 4)
