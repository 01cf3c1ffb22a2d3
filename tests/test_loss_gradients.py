"""The chunked loss's analytic gradients, the estimators' consistency at every temperature,
and the sampled estimator's unbiasedness.  References are autograd over the unchunked
reference functions in losses/divergences.py (themselves tested against torch.nn.functional
in test_losses.py)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import losses.chunked as chunked
import losses.divergences as divergences
from losses import DIVERGENCES, TeacherSignal, hard_ce, hard_labels, per_token_losses, per_token_losses_from_logits
from losses.signal import sample_signal

TEMPERATURES = (0.5, 1.0, 2.0, 4.0)
PARAMS = {"jsd": {"beta": 0.3}, "skew_kl": {"alpha": 0.2}, "skew_reverse_kl": {"alpha": 0.2}}
CLOSED_FORM = sorted(n for n, d in DIVERGENCES.items() if d.outcome_grad is not None)
ESTIMATORS = ("bucket", "renorm", "dense", "sampled")


def _cases(names):
    """(divergence, estimator) pairs that exist: a sampled signal serves only the divergences
    it estimates without bias (the others are refused: tested below)."""
    return [(n, e) for n in names for e in ESTIMATORS if e != "sampled" or DIVERGENCES[n].sampled]
N, H, V, K = 37, 12, 45, 7  # 37 tokens in chunks of 8: 5 chunks of 8 or 7 tokens


def _problem(seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(N, H, generator=g, dtype=dtype).requires_grad_(True)
    weight = (torch.randn(V, H, generator=g, dtype=dtype) * 0.7).requires_grad_(True)
    bias = torch.randn(V, generator=g, dtype=dtype).requires_grad_(True)
    teacher = torch.randn(N, V, generator=g, dtype=torch.float64) * 2.5
    labels = torch.randint(0, V, (N,), generator=g)
    labels[3] = -100  # padding
    mask = torch.rand(N, generator=g) > 0.25
    weights = torch.rand(N, generator=g, dtype=dtype)  # per-token upstream weights (adaptive KD)
    return hidden, weight, bias, teacher, labels, mask, weights


def _signal(teacher: torch.Tensor, estimator: str, temperature: float, k: int = K) -> TeacherSignal:
    if estimator == "dense":
        return TeacherSignal.from_logits(teacher, k, keep_dense=True)
    if estimator == "sampled":
        keys = torch.arange(teacher.shape[0])
        return sample_signal(teacher, 32, temperature, seed=3, keys=keys)
    values, ids = torch.topk(F.log_softmax(teacher, -1), k, dim=-1)  # fp64: exact references
    return TeacherSignal(ids, values)


class _Spy:
    """Counts calls of a function in losses.chunked (which path ran)."""

    def __init__(self, monkeypatch, name):
        self.calls = 0
        original = getattr(chunked, name)

        def wrapper(*a, **kw):
            self.calls += 1
            return original(*a, **kw)

        monkeypatch.setattr(chunked, name, wrapper)


def _loss_and_grads(hidden, weight, bias, sig, labels, mask, weights, name, estimator, temperature, chunked_path,
                    chunk_size=8, head=None):
    tail = "bucket" if estimator == "dense" else estimator
    kw = dict(divergence=name, temperature=temperature, tail=tail, **PARAMS.get(name, {}))
    head = head or {}  # the model's head transform: logit_scale, softcap
    if chunked_path:
        hard, soft = per_token_losses(hidden, weight, sig, labels, mask, chunk_size=chunk_size, bias=bias, **kw,
                                      **head)
    else:
        logits = hidden @ weight.T + bias
        if "logit_scale" in head:  # as transformers' Cohere / Granite heads
            logits = logits * head["logit_scale"]
        if "softcap" in head:  # as transformers' Gemma 2 head
            logits = torch.tanh(logits / head["softcap"]) * head["softcap"]
        hard = hard_ce(logits, hard_labels("labels", labels, sig, mask))
        soft = DIVERGENCES[name](logits, sig, mask=mask, temperature=temperature, tail=tail, **PARAMS.get(name, {}))
    total = (0.7 * hard + weights * soft).sum()
    return (hard, soft), torch.autograd.grad(total, (hidden, weight, bias))


@pytest.mark.parametrize("chunk_size", [8, None], ids=["chunks_of_8", "auto"])
@pytest.mark.parametrize("temperature", TEMPERATURES)
@pytest.mark.parametrize("name,estimator", _cases(CLOSED_FORM))
def test_analytic_gradients_equal_autograd_in_fp64(name, estimator, temperature, chunk_size, monkeypatch):
    """Chunks of 8: 5 chunks, the last one's exp pass kept by forward, the others recomputed;
    auto: one chunk (V = 45), kept where backward needs only softmax(z)."""
    hidden, weight, bias, teacher, labels, mask, weights = _problem()
    sig = _signal(teacher, estimator, temperature)
    analytic = _Spy(monkeypatch, "_analytic_backward")
    generic = _Spy(monkeypatch, "_generic_losses")
    got_losses, got = _loss_and_grads(hidden, weight, bias, sig, labels, mask, weights, name, estimator,
                                      temperature, chunked_path=True, chunk_size=chunk_size)
    ref_losses, ref = _loss_and_grads(hidden, weight, bias, sig, labels, mask, weights, name, estimator,
                                      temperature, chunked_path=False)
    assert analytic.calls == (5 if chunk_size else 1) and generic.calls == 0  # every chunk closed-form
    for a, b in zip(got_losses, ref_losses):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-11)
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)


HEADS = {"softcap": {"softcap": 3.0}, "scale": {"logit_scale": 0.25}, "both": {"logit_scale": 1.5, "softcap": 2.0}}


@pytest.mark.parametrize("head", sorted(HEADS))
@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0])
@pytest.mark.parametrize("name,estimator", [("forward_kl", e) for e in ESTIMATORS] + [("reverse_kl", "bucket"),
                                                                                      ("tv", "bucket"), ("jsd", "dense")])
def test_a_scaled_or_soft_capped_head_trains_the_function_the_model_computes(name, estimator, temperature, head):
    """Gemma 2/3 soft-cap their logits (cap * tanh(z / cap)); Cohere and Granite scale them.
    The chunked losses and their gradients (closed form and autograd fallback: tv) equal
    autograd through the same head, at several temperatures; the cap is large enough here to
    bend the logits (|z| up to ~3x the cap before it)."""
    hidden, weight, bias, teacher, labels, mask, weights = _problem(5)
    sig = _signal(teacher, estimator, temperature)
    got_losses, got = _loss_and_grads(hidden, weight, bias, sig, labels, mask, weights, name, estimator,
                                      temperature, chunked_path=True, head=HEADS[head])
    ref_losses, ref = _loss_and_grads(hidden, weight, bias, sig, labels, mask, weights, name, estimator,
                                      temperature, chunked_path=False, head=HEADS[head])
    plain_losses, _ = _loss_and_grads(hidden, weight, bias, sig, labels, mask, weights, name, estimator,
                                      temperature, chunked_path=False)
    assert not torch.allclose(ref_losses[0], plain_losses[0], rtol=1e-3)  # the head changes the function
    for a, b in zip(got_losses, ref_losses):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-11)
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("estimator,temperature,name,kept", [
    ("bucket", 2.0, "forward_kl", True), ("renorm", 0.5, "reverse_kl", True), ("sampled", 1.0, "forward_kl", True),
    ("dense", 1.0, "forward_kl", True), (None, 1.0, "forward_kl", True),
    ("sampled", 2.0, "forward_kl", False), ("dense", 2.0, "forward_kl", False), ("dense", 1.0, "reverse_kl", False),
])
@pytest.mark.parametrize("chunk_size", [8, None], ids=["chunks_of_8", "auto"])
def test_backward_recomputes_every_chunk_but_the_one_forward_kept(estimator, temperature, name, kept, chunk_size,
                                                                  monkeypatch):
    """Forward keeps the last chunk's exp pass where backward needs only softmax(z), so that
    chunk costs backward no lm_head matmul (with one chunk, none is recomputed).  Elsewhere
    (a dense teacher under reverse KL or at T != 1, a sampled signal at T != 1) every chunk
    is.  The gradients are checked against autograd above, and here against chunks of 3."""
    hidden, weight, bias, teacher, labels, mask, weights = _problem(4)
    sig = None if estimator is None else _signal(teacher, estimator, temperature)
    tail = "bucket" if estimator in ("dense", None) else estimator
    kw = dict(divergence=name, temperature=temperature, tail=tail)
    hard, soft = per_token_losses(hidden, weight, sig, labels, mask, chunk_size=chunk_size, bias=bias, **kw)
    matmuls = _Spy(monkeypatch, "_chunk_logits")
    got = torch.autograd.grad((0.7 * hard + weights * soft).sum(), (hidden, weight, bias))
    chunks = 5 if chunk_size else 1  # 37 tokens; auto at V = 45: one chunk
    assert matmuls.calls == chunks - (1 if kept else 0)
    monkeypatch.undo()
    hard, soft = per_token_losses(hidden, weight, sig, labels, mask, chunk_size=3, bias=bias, **kw)
    want = torch.autograd.grad((0.7 * hard + weights * soft).sum(), (hidden, weight, bias))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-11)


def test_nothing_is_kept_without_a_backward_to_come(monkeypatch):
    """Validation (no_grad) and inputs that need no gradient keep no exp pass; a training
    forward keeps the last chunk's."""
    hidden, weight, bias, teacher, labels, mask, weights = _problem(5)
    sig = _signal(teacher, "bucket", 1.0)
    kept = []
    original = chunked._analytic_forward
    monkeypatch.setattr(chunked, "_analytic_forward",
                        lambda *a, keep_exp=False, **kw: kept.append(keep_exp) or original(*a, keep_exp=keep_exp, **kw))
    with torch.no_grad():
        per_token_losses(hidden, weight, sig, labels, mask, chunk_size=8, bias=bias)
    per_token_losses(hidden.detach(), weight.detach(), sig, labels, mask, chunk_size=8, bias=bias.detach())
    assert kept == [False] * 10
    kept.clear()
    per_token_losses(hidden, weight, sig, labels, mask, chunk_size=8, bias=bias)
    assert kept == [False] * 4 + [True]


def test_chunks_are_near_equal_and_never_over_the_size():
    assert chunked._spans(1000, 448) == [(0, 334), (334, 667), (667, 1000)]  # the kept last chunk: not 104 tokens
    assert chunked._spans(0, 8) == [] and chunked._spans(5, 100) == [(0, 5)]
    for n in range(1, 60):
        for c in range(1, 20):
            spans = chunked._spans(n, c)
            sizes = [e - s for s, e in spans]
            assert spans[0][0] == 0 and spans[-1][1] == n and all(a[1] == b[0] for a, b in zip(spans, spans[1:]))
            assert len(sizes) == -(-n // c) and max(sizes) <= c and max(sizes) - min(sizes) <= 1


def test_divergence_without_closed_form_takes_the_autograd_fallback(monkeypatch):
    """tv has none; and forward KL registered without its closed form takes the fallback too,
    giving the closed form's numbers."""
    assert DIVERGENCES["tv"].outcome_grad is None
    fkl = DIVERGENCES["forward_kl"]
    monkeypatch.setitem(DIVERGENCES, "forward_kl_generic", divergences.Divergence(fkl.fn, fkl.value))
    hidden, weight, bias, teacher, labels, mask, weights = _problem(1)
    sig = _signal(teacher, "bucket", 2.0)
    generic = _Spy(monkeypatch, "_generic_losses")
    analytic = _Spy(monkeypatch, "_analytic_backward")
    _, got = _loss_and_grads(hidden, weight, bias, sig, labels, mask, weights, "forward_kl_generic", "bucket", 2.0,
                             chunked_path=True)
    assert generic.calls == 10 and analytic.calls == 0  # 5 chunks, forward and backward
    _, want = _loss_and_grads(hidden, weight, bias, sig, labels, mask, weights, "forward_kl", "bucket", 2.0,
                              chunked_path=True)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("head", [{}, {"softcap": 3.0}, {"logit_scale": 0.5}], ids=["plain", "softcap", "scale"])
@pytest.mark.parametrize("name", ["forward_kl", "jsd", "tv"])
def test_bf16_autocast_gradient_equals_unchunked_in_the_same_precision(name, head):
    """Backward recomputes the chunk's logits under forward's autocast (bf16 here), so the
    gradient is that of the function forward computed, within bf16 rounding; through a
    soft-capped or scaled head too (Gemma 2/3, Cohere), as the model computes it in bf16."""
    hidden, weight, bias, teacher, labels, mask, weights = _problem(2, dtype=torch.float32)
    sig = TeacherSignal.from_logits(teacher.float(), K)
    kw = dict(divergence=name, temperature=2.0, tail="bucket", **PARAMS.get(name, {}))
    with torch.autocast("cpu", dtype=torch.bfloat16):  # forward only, as a training step does
        hard, soft = per_token_losses(hidden, weight, sig, labels, mask, chunk_size=8, bias=bias, **kw, **head)
        logits = F.linear(hidden, weight, bias)  # bf16, as an unchunked lm_head under autocast
        if "logit_scale" in head:
            logits = logits * head["logit_scale"]
        if "softcap" in head:  # as transformers' Gemma 2 head, in the logits' dtype
            logits = torch.tanh(logits / head["softcap"]) * head["softcap"]
        assert logits.dtype == torch.bfloat16
        ref_hard = hard_ce(logits, hard_labels("labels", labels, sig, mask))
        ref_soft = DIVERGENCES[name](logits, sig, mask=mask, temperature=2.0, tail="bucket", **PARAMS.get(name, {}))
    # backward outside autocast, as `loss.backward()` after the autocast block
    got = torch.autograd.grad((0.7 * hard + weights * soft).sum(), (hidden, weight, bias))
    ref = torch.autograd.grad((0.7 * ref_hard + weights * ref_soft).sum(), (hidden, weight, bias))
    torch.testing.assert_close(hard, ref_hard, rtol=1e-5, atol=1e-5)
    for a, b in zip(got, ref):
        assert a.dtype == b.dtype == torch.float32
        torch.testing.assert_close(a, b, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("temperature", TEMPERATURES)
@pytest.mark.parametrize("name,estimator", _cases(sorted(DIVERGENCES)))
def test_identical_student_gives_zero_loss_and_zero_gradient(name, estimator, temperature):
    _, _, _, teacher, labels, mask, _ = _problem(3)
    if estimator == "sampled":  # exact frequencies: the sample average's limit
        logp = F.log_softmax(teacher / temperature, -1)
        sig = TeacherSignal(torch.arange(V).expand(N, V), logp, kind="sampled",
                            entropy=-(logp.exp() * logp).sum(-1), temperature=temperature)
    else:
        sig = _signal(teacher, estimator, temperature)
    tail = "bucket" if estimator == "dense" else estimator
    kw = dict(temperature=temperature, tail=tail, **PARAMS.get(name, {}))
    student = teacher.clone().requires_grad_(True)
    direct = DIVERGENCES[name](student, sig, **kw)
    (g_direct,) = torch.autograd.grad(direct.sum(), student)
    _, soft = per_token_losses_from_logits(student, sig, labels, mask, divergence=name, chunk_size=8, **kw)
    (g_chunked,) = torch.autograd.grad(soft.sum(), student)
    zeros = torch.zeros(N, V, dtype=torch.float64)
    torch.testing.assert_close(direct, zeros[:, 0], atol=1e-12, rtol=0)
    torch.testing.assert_close(soft, zeros[:, 0], atol=1e-12, rtol=0)
    if name == "tv":
        return  # |p_t - p_s| is not differentiable at p_t = p_s: any subgradient is right there
    torch.testing.assert_close(g_direct, zeros, atol=1e-10, rtol=0)
    torch.testing.assert_close(g_chunked, zeros, atol=1e-10, rtol=0)


def test_bucket_is_not_zero_for_a_different_student_at_any_temperature():
    """Guards the test above: the bucket is a real divergence at T != 1, not a constant."""
    _, _, _, teacher, _, _, _ = _problem(4)
    sig = _signal(teacher, "bucket", 2.0)
    for temperature in TEMPERATURES:
        assert (DIVERGENCES["forward_kl"](teacher * 0.5, sig, temperature=temperature) > 1e-4).all()


@pytest.mark.parametrize("temperature", TEMPERATURES)
@pytest.mark.parametrize("name", sorted(DIVERGENCES))
def test_bucket_branch_with_k_equal_vocab_equals_dense(name, temperature, monkeypatch):
    calls = []
    original = divergences.bucket_tails

    def spy(s_tail, t_tail, empty):
        calls.append(empty)
        return original(s_tail, t_tail, empty)

    monkeypatch.setattr(divergences, "bucket_tails", spy)
    _, _, _, teacher, _, _, _ = _problem(5)
    student = torch.randn(N, V, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * 2
    kw = dict(temperature=temperature, **PARAMS.get(name, {}))
    dense = DIVERGENCES[name](student, TeacherSignal.from_logits(teacher, V, keep_dense=True), **kw)
    bucket = DIVERGENCES[name](student, _signal(teacher, "bucket", temperature, k=V), tail="bucket", **kw)
    assert calls == [True]  # the bucket branch ran, with an empty tail on both sides
    torch.testing.assert_close(bucket, dense, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_sampled_estimate_is_unbiased_over_seeds(temperature):
    """Mean over R independent draws of n = 32 per token of the sampled forward KL's value and
    gradient converges to the exact dense ones, within 5 standard errors per entry."""
    rounds, n_tok, vocab, n = 4000, 3, 25, 32
    g = torch.Generator().manual_seed(7)
    teacher = torch.randn(n_tok, vocab, generator=g, dtype=torch.float64) * 2
    student = torch.randn(n_tok, vocab, generator=g, dtype=torch.float64) * 2
    keys = torch.arange(rounds * n_tok)  # every (round, token) its own draws
    sig = sample_signal(teacher.repeat(rounds, 1), n, temperature, seed=11, keys=keys)
    z = student.repeat(rounds, 1).requires_grad_(True)
    _, soft = per_token_losses_from_logits(z, sig, torch.zeros(len(z), dtype=torch.long), None,
                                           temperature=temperature, tail="sampled", chunk_size=1000)
    (grad,) = torch.autograd.grad(soft.sum(), z)
    mean_grad = grad.reshape(rounds, n_tok, vocab).mean(0)
    mean_value = soft.reshape(rounds, n_tok).mean(0)

    exact = student.clone().requires_grad_(True)
    dense = DIVERGENCES["forward_kl"](exact, TeacherSignal.from_logits(teacher, 4, keep_dense=True),
                                      temperature=temperature)
    (exact_grad,) = torch.autograd.grad(dense.sum(), exact)
    p_t = F.softmax(teacher / temperature, -1)
    grad_se = temperature * (p_t * (1 - p_t) / (n * rounds)).sqrt()  # d/dz = T (p_s - f)
    assert ((mean_grad - exact_grad).abs() <= 5 * grad_se + 1e-12).all()
    value_se = soft.reshape(rounds, n_tok).std(0) / rounds ** 0.5
    assert ((mean_value - dense.detach()).abs() <= 5 * value_se).all()
    # Not trivially so: one round alone is off by far more than the bound.
    assert (grad[:n_tok] - exact_grad).abs().max() > 20 * grad_se.max()


@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0])
def test_an_exact_head_keeps_the_sampled_estimate_unbiased_with_less_variance(temperature):
    """exact_top h: the h most likely ids carry their exact probabilities, the n draws come
    from the rest weighted by its mass.  Every round's gradient is exact on the head ids;
    the mean over rounds converges to the dense gradient within 5 standard errors
    (T * sqrt(p (m - p) / (n R)) on the tail, m the tail's mass); and its per-round error is
    well below that of the same number of pure draws."""
    rounds, n_tok, vocab, n, h = 4000, 3, 25, 16, 4
    g = torch.Generator().manual_seed(7)
    teacher = torch.randn(n_tok, vocab, generator=g, dtype=torch.float64) * 2
    student = torch.randn(n_tok, vocab, generator=g, dtype=torch.float64) * 2
    keys = torch.arange(rounds * n_tok)

    def grads(exact_top):
        sig = sample_signal(teacher.repeat(rounds, 1), n, temperature, seed=11, keys=keys, exact_top=exact_top)
        z = student.repeat(rounds, 1).requires_grad_(True)
        _, soft = per_token_losses_from_logits(z, sig, torch.zeros(len(z), dtype=torch.long), None,
                                               temperature=temperature, tail="sampled", chunk_size=1000)
        return torch.autograd.grad(soft.sum(), z)[0].reshape(rounds, n_tok, vocab), soft.reshape(rounds, n_tok), sig

    grad, soft, sig = grads(h)
    exact = student.clone().requires_grad_(True)
    dense = DIVERGENCES["forward_kl"](exact, TeacherSignal.from_logits(teacher, 4, keep_dense=True),
                                      temperature=temperature)
    (exact_grad,) = torch.autograd.grad(dense.sum(), exact)
    p_t = F.softmax(teacher / temperature, -1)
    head = torch.zeros_like(p_t, dtype=torch.bool).scatter_(1, p_t.topk(h, -1).indices, True)
    assert torch.equal(sig.topk_ids[:n_tok, :h].sort(-1).values, p_t.topk(h, -1).indices.sort(-1).values)
    torch.testing.assert_close(grad[:, head], exact_grad[head].expand(rounds, -1), rtol=1e-5, atol=1e-6)
    mass = 1 - (p_t * head).sum(-1, keepdim=True)
    grad_se = temperature * (p_t * (mass - p_t).clamp(min=0) / (n * rounds)).sqrt()
    assert ((grad.mean(0) - exact_grad).abs() <= 5 * grad_se + 1e-6).all()  # the signal is fp32
    value_se = soft.std(0) / rounds ** 0.5
    assert ((soft.mean(0) - dense.detach()).abs() <= 5 * value_se).all()
    pure, _, _ = grads(0)
    assert ((grad - exact_grad) ** 2).mean() < 0.5 * ((pure - exact_grad) ** 2).mean()


def test_sampled_signal_refuses_what_it_cannot_estimate():
    _, _, _, teacher, labels, _, _ = _problem(6)
    sig = sample_signal(teacher, 16, 2.0, seed=0, keys=torch.arange(N))
    student = torch.zeros(N, V, dtype=torch.float64)
    with pytest.raises(ValueError, match="reverse_kl.*cannot be estimated without bias"):
        DIVERGENCES["reverse_kl"](student, sig, temperature=2.0, tail="sampled")
    with pytest.raises(ValueError, match="sampled at temperature 2 but the loss uses 1"):
        per_token_losses_from_logits(student, sig, labels, None, temperature=1.0, tail="sampled")
    with pytest.raises(ValueError, match="signal is 'sampled' but the loss's estimator is 'bucket'"):
        DIVERGENCES["forward_kl"](student, sig, temperature=2.0, tail="bucket")
    topk = _signal(teacher, "bucket", 1.0)
    with pytest.raises(ValueError, match="signal is 'topk' but the loss's estimator is 'sampled'"):
        DIVERGENCES["forward_kl"](student, topk, tail="sampled")


def test_sampled_draws_depend_only_on_seed_and_key():
    teacher = torch.randn(6, 40, generator=torch.Generator().manual_seed(8), dtype=torch.float64)
    keys = torch.arange(100, 106)
    whole = sample_signal(teacher, 32, 1.0, seed=5, keys=keys)
    part = sample_signal(teacher[3:5], 32, 1.0, seed=5, keys=keys[3:5])  # another batch, another order
    width = part.k
    assert torch.equal(part.topk_ids, whole.topk_ids[3:5, :width])
    assert torch.equal(part.topk_logprobs, whole.topk_logprobs[3:5, :width])
    other = sample_signal(teacher, 32, 1.0, seed=6, keys=keys)
    assert not torch.equal(other.topk_logprobs.exp().sum(), torch.tensor(0.0))
    assert not (torch.equal(other.topk_ids, whole.topk_ids) and torch.equal(other.topk_logprobs, whole.topk_logprobs))
    counts = whole.topk_logprobs.exp() * 32
    torch.testing.assert_close(counts.sum(-1), torch.full((6,), 32.0))


@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0])
def test_tail_auto_takes_the_estimator_its_signal_needs(temperature):
    """loss.tail: auto (the config's default) is `sampled` on a sampled signal and `bucket` on
    a top-k one: the same values and gradients as naming them."""
    _, _, _, teacher, labels, _, _ = _problem(7)
    signals = {"sampled": sample_signal(teacher, 16, temperature, seed=0, keys=torch.arange(N)),
               "bucket": _signal(teacher, "bucket", temperature)}
    for named, sig in signals.items():
        out = []
        for tail in ("auto", named):
            student = torch.randn(N, V, dtype=torch.float64, generator=torch.Generator().manual_seed(3),
                                  requires_grad=True)
            _, soft = per_token_losses_from_logits(student, sig, labels, None, temperature=temperature, tail=tail)
            soft.sum().backward()
            out.append((soft.detach(), student.grad))
        assert divergences.resolve_tail("auto", sig) == named
        torch.testing.assert_close(out[0], out[1], rtol=0, atol=0)
