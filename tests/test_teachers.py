"""Teacher sources: vocab padding handled, different tokenizers refused, one forward per signal."""
import math

import pytest
import torch

from common.errors import UserError
from students.build import build_model
from students.presets import dense
from teachers import IGNORE, Batch, LiveTeacher


def tiny_teacher(vocab: int):
    return build_model(dense(vocab_size=vocab, hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1,
                             head_dim=16, intermediate_size=64), seed=0)


def test_padded_teacher_vocab_is_cut_to_the_tokenizer():
    teacher = LiveTeacher(tiny_teacher(320), k=400, vocab_size=300, device=torch.device("cpu"))
    assert teacher.k == 300  # k is capped at the real vocab
    ids = torch.randint(0, 300, (2, 8))
    sig, valid = teacher.signal(Batch([0, 1], ids, ids))
    assert sig.topk_ids.shape == (2, 8, 300) and int(sig.topk_ids.max()) < 300
    assert valid.all()
    # the cut distribution is renormalised over the real vocab: top-k = everything -> mass 1
    assert torch.allclose(sig.topk_logprobs.exp().sum(-1), torch.ones(2, 8), atol=1e-5)
    assert teacher.forward_calls == 1


def test_smaller_teacher_vocab_means_another_tokenizer():
    with pytest.raises(UserError, match=r"teacher vocab \(290\) is smaller than the tokenizer's \(300\)"):
        LiveTeacher(tiny_teacher(290), k=8, vocab_size=300, device=torch.device("cpu"))


@pytest.mark.parametrize("path", ["chunked", "full", "dense"])
def test_nonfinite_teacher_logits_are_masked(path):
    teacher = LiveTeacher(tiny_teacher(64), k=8, vocab_size=64, device=torch.device("cpu"), keep_dense=path == "dense")
    teacher.chunked_head = path == "chunked"

    def poison(module, args, out):  # (0, 3): a NaN hidden state -> NaN logits
        out = out.clone()
        out[0, 3, 5] = float("nan")
        return out

    def mask_vocab(module, args, out):  # (1, 2): some -inf logits, a valid (masked-vocab) distribution
        out = out.clone()
        out[1, 2, :10] = float("-inf")
        return out

    teacher.model.model.norm.register_forward_hook(poison)
    if path != "chunked":  # the chunked path calls F.linear, not the lm_head module
        teacher.model.lm_head.register_forward_hook(mask_vocab)
    ids = torch.randint(0, 64, (2, 6))
    sig, valid = teacher.signal(Batch([0, 1], ids, ids))
    assert not valid[0, 3] and int((~valid).sum()) == 1
    assert torch.isfinite(sig.topk_logprobs).all()
    if path != "chunked":
        assert int(sig.topk_ids[1, 2].min()) >= 10  # masked ids never enter the top-k
    assert teacher.forward_calls == 1


@pytest.mark.parametrize("path", ["chunked", "full"])
def test_dense_signal_is_log_probabilities_with_their_entropy(path):
    """keep_dense: students get the teacher's log-probabilities (each row's logsumexp 0) and
    their entropy, computed once per step for all of them: log_softmax of its logits, a
    masked id's -inf kept; a NaN token (invalid) gets the uniform placeholder."""
    teacher = LiveTeacher(tiny_teacher(64), k=8, vocab_size=64, device=torch.device("cpu"), keep_dense=True)
    teacher.chunked_head = path == "chunked"

    def poison(module, args, out):  # (0, 3): a NaN hidden state -> NaN logits
        out = out.clone()
        out[0, 3, 5] = float("nan")
        return out

    def mask_vocab(module, args, out):  # (1, 2): some -inf logits (the full path's lm_head only)
        out = out.clone()
        out[1, 2, :10] = float("-inf")
        return out

    teacher.model.model.norm.register_forward_hook(poison)
    if path == "full":  # the chunked path calls F.linear, not the lm_head module
        teacher.model.lm_head.register_forward_hook(mask_vocab)
    ids = torch.randint(0, 64, (2, 6), generator=torch.Generator().manual_seed(0))
    sig, valid = teacher.signal(Batch([0, 1], ids, ids))
    want = torch.log_softmax(teacher.logits(ids), -1)  # (2, 6, 64), the same hooks
    assert int((~valid).sum()) == 1 and not valid[0, 3]
    torch.testing.assert_close(sig.logits[valid], want[valid], rtol=0, atol=2e-6)
    torch.testing.assert_close(sig.dense_entropy[valid], torch.special.entr(want.exp()).sum(-1)[valid],
                               rtol=0, atol=2e-6)
    assert torch.isneginf(sig.logits[1, 2, :10]).all() == (path == "full")
    assert torch.equal(sig.logits[0, 3], torch.full((64,), -math.log(64)))
    assert float(sig.dense_entropy[0, 3]) == pytest.approx(math.log(64))


@pytest.mark.parametrize("path", ["chunked", "full"])
@pytest.mark.parametrize("autocast", [None, torch.bfloat16])
def test_dense_log_probabilities_stay_normalised_at_large_logits(path, autocast):
    """Logits of a few hundred (a sharp teacher): every computed row's log-probs still sum to
    probability 1 to fp32 rounding at the scale of x - max, not of x (x - logsumexp in one
    step was off by 7.5e-6 here), at the labelled positions of a chat-like batch; masked
    (-inf) ids stay -inf and weigh 0 in the entropy."""
    model = tiny_teacher(64)
    ids = torch.randint(0, 64, (2, 6), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        model.lm_head.weight.mul_(300.0 / model(ids).logits.abs().max())
    teacher = LiveTeacher(model, k=8, vocab_size=64, device=torch.device("cpu"), keep_dense=True,
                          autocast_dtype=autocast)
    teacher.chunked_head, teacher.chunk_tokens = path == "chunked", 5
    if path == "full":  # a masked vocab too (-inf logits; the chunked path calls F.linear, no hook)
        model.lm_head.register_forward_hook(lambda module, args, out: out.index_fill(-1, torch.arange(10), float("-inf")))
    want = torch.log_softmax(teacher.logits(ids).double(), -1)
    assert torch.isneginf(want[..., :10]).all() == (path == "full")
    entropy = torch.special.entr(want.exp()).sum(-1)
    tol = 1e-5 if autocast is None else 0.5  # bf16 logits of ~300 round by up to 1
    prompt = ids.clone()
    prompt[0, :3] = IGNORE  # chat-like: only labelled rows reach the lm_head
    for labels in (ids, prompt):
        sig, valid = teacher.signal(Batch([0, 1], ids, labels))
        where = labels != IGNORE
        assert valid.all()
        lse = torch.logsumexp(sig.logits[where].double(), -1)  # (12,) then (9,)
        assert float(lse.abs().max()) < 1e-6
        torch.testing.assert_close(sig.logits[where].double(), want[where], rtol=0, atol=tol * 10)
        torch.testing.assert_close(sig.dense_entropy[where].double(), entropy[where], rtol=0, atol=tol)


@pytest.mark.parametrize("kind", ["dense", "behemoth"])
def test_chunked_lm_head_topk_equals_topk_of_full_logits(kind):
    """LiveTeacher.topk runs the lm_head 5 tokens at a time on a teacher padded to 320 ids."""
    from losses.signal import topk_logprobs
    from students.presets import behemoth

    args = dict(vocab_size=320, hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1, head_dim=16)
    model = build_model(dense(**args) if kind == "dense" else behemoth(**args, num_experts=4), seed=0)
    teacher = LiveTeacher(model, k=16, vocab_size=300, device=torch.device("cpu"))
    teacher.chunk_tokens = 5
    assert teacher.chunked_head
    ids = torch.randint(0, 300, (3, 7))
    values, top = teacher.topk(ids)
    ref_values, ref_ids = topk_logprobs(teacher.logits(ids), 16)
    assert values.shape == top.shape == (3, 7, 16) and int(top.max()) < 300
    assert torch.equal(top, ref_ids)
    torch.testing.assert_close(values, ref_values, rtol=0, atol=1e-5)
    assert teacher.forward_calls == 2


def test_models_with_other_heads_take_the_full_logits_path():
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(vocab_size=50, n_positions=16, n_embd=16, n_layer=1, n_head=2))
    teacher = LiveTeacher(model, k=4, vocab_size=50, device=torch.device("cpu"))
    assert not teacher.chunked_head
    ids = torch.randint(0, 50, (2, 5))
    values, top = teacher.topk(ids)
    ref = torch.topk(torch.log_softmax(model(ids).logits.double(), -1), 4, -1)
    assert torch.equal(top, ref.indices)
    torch.testing.assert_close(values.double(), ref.values, rtol=0, atol=1e-5)


@pytest.mark.parametrize("exact_top", [0, 3])
def test_chunked_sampling_equals_sampling_the_full_logits(exact_top):
    """LiveTeacher.sample draws chunk by chunk (5 tokens at a time) exactly what drawing from
    the whole logits with the same seed and keys gives (after an exact head of 3 too)."""
    from losses.signal import sample_signal
    from teachers.cache.format import Sampling

    model = tiny_teacher(64)
    sampling = Sampling(n=12, temperature=1.5, seed=4, exact_top=exact_top)
    teacher = LiveTeacher(model, k=8, vocab_size=64, device=torch.device("cpu"), sampling=sampling)
    teacher.chunk_tokens = 5
    ids = torch.randint(0, 64, (3, 7))
    keys = sampling.keys("train", [10, 11, 12], 7)
    got = teacher.sample(ids, keys)
    ref = sample_signal(teacher.logits(ids), 12, 1.5, 4, keys, exact_top=exact_top)
    assert got.kind == "sampled" and got.topk_ids.shape == (3, 7, 12 + exact_top)
    assert torch.equal(got.topk_ids[..., :ref.k], ref.topk_ids)
    torch.testing.assert_close(got.topk_logprobs[..., :ref.k], ref.topk_logprobs)
    torch.testing.assert_close(got.entropy, ref.entropy, atol=1e-5, rtol=1e-5)
    sig, valid = teacher.signal(Batch([10, 11, 12], ids, ids))  # online: the same draws for these blocks
    assert valid.all()
    torch.testing.assert_close(sig.topk_logprobs.exp().sum(-1), torch.ones(3, 7))


@pytest.mark.parametrize("estimator", ["topk", "sampled", "dense"])
@pytest.mark.parametrize("chunked", [True, False])
def test_online_signal_is_computed_at_labelled_positions_only(estimator, chunked):
    """Chat data: positions without a label (the prompt) skip the lm_head and the top-k,
    draws or dense logits.  The labelled ones get the signal a full computation gives; the
    others a placeholder, valid, with NaN difficulty (dense: the uniform distribution)."""
    import teachers.live as live
    from teachers.cache.format import Sampling

    model = tiny_teacher(64)
    sampling = Sampling(n=12, temperature=1.0, seed=4) if estimator == "sampled" else None
    teacher = LiveTeacher(model, k=8, vocab_size=64, device=torch.device("cpu"), sampling=sampling,
                          keep_dense=estimator == "dense")
    teacher.chunked_head, teacher.chunk_tokens = chunked and teacher.chunked_head, 5
    ids = torch.randint(0, 64, (3, 7), generator=torch.Generator().manual_seed(0))
    labels = torch.roll(ids, -1, 1)
    masked = labels.clone()
    masked[0, :4], masked[2, :] = IGNORE, IGNORE  # a prompt; a block without a label
    full, _ = teacher.signal(Batch([0, 1, 2], ids, labels))
    seen = []
    reduce = live.topk_logprobs if sampling is None else live.sample_signal
    spy = lambda logits, *a, **kw: seen.append(logits.shape[0]) or reduce(logits, *a, **kw)  # noqa: E731
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(live, "topk_logprobs" if sampling is None else "sample_signal", spy)
        part, valid = teacher.signal(Batch([0, 1, 2], ids, masked))
    where = masked != IGNORE
    assert sum(seen) == int(where.sum()) == 10  # rows that reached the top-k or the draws
    assert valid.all()
    width = part.topk_ids.shape[-1]
    assert torch.equal(part.topk_ids[where], full.topk_ids[where][:, :width])
    # The lm_head over other rows rounds differently (matmul blocking): close, not bitwise.
    torch.testing.assert_close(part.topk_logprobs[where], full.topk_logprobs[where][:, :width], rtol=0, atol=1e-5)
    torch.testing.assert_close(part.difficulty[where], full.difficulty[where])
    assert torch.isnan(part.difficulty[~where]).all()
    if sampling is not None:
        torch.testing.assert_close(part.entropy[where], full.entropy[where])  # other chunks: rounding
        assert (part.entropy[~where] == 0).all()
        assert (part.topk_logprobs[~where][:, 0] == 0).all()
    else:
        assert torch.equal(part.topk_ids[~where], torch.arange(8).expand(int((~where).sum()), 8))
    if estimator == "dense":  # the model's log-probs where a loss reads them, uniform elsewhere
        plain = torch.log_softmax(teacher.logits(ids), -1)  # (3, 7, 64): one forward, every position
        torch.testing.assert_close(part.logits[where], plain[where], rtol=0, atol=1e-5)
        torch.testing.assert_close(full.logits, plain, rtol=0, atol=1e-5)
        torch.testing.assert_close(part.logits[~where], torch.full_like(part.logits[~where], -math.log(64)))
        torch.testing.assert_close(part.dense_entropy[where], full.dense_entropy[where], rtol=0, atol=1e-5)
        torch.testing.assert_close(part.dense_entropy[~where], torch.full_like(part.dense_entropy[~where], math.log(64)))
    else:
        assert part.logits is None
