"""Encodings of the cached top-k signal: exact round trips, error bounds, sizes."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from bench.cache import V_LLAMA4, zipf_logits
from teachers.cache.codec import (CODECS, CompactCodec, gather_segments, get_codec, id_bits, pack_fixed, pack_groups,
                           pack_unary_groups, read_unary, read_varwidth, unpack_fixed, windows32)


def _topk(logits: torch.Tensor, k: int):
    v, i = torch.topk(torch.log_softmax(logits.float(), -1), k, -1)
    return i.numpy(), v.numpy()


@pytest.fixture(scope="module")
def zipf64():
    """256 tokens = 4 groups of 64, top-64 of the synthetic Zipf teacher at V=202,048."""
    return _topk(zipf_logits(256, generator=torch.Generator().manual_seed(0)), 64)


def _by_id(ids, lp):
    o = np.argsort(ids, 1)
    return np.take_along_axis(ids, o, 1), np.take_along_axis(lp, o, 1).astype(np.float64)


def test_bit_helpers_round_trip():
    rng = np.random.default_rng(0)
    widths = [1, 18, 7, 25, 3]
    vals = np.stack([rng.integers(0, 2 ** w, 50) for w in widths], 1)
    assert (unpack_fixed(pack_fixed(vals, widths), widths) == vals).all()
    assert (unpack_fixed(pack_fixed(vals[:, 1:2], 18), 18, 1) == vals[:, 1:2]).all()

    w = rng.integers(0, 26, (3, 40))
    v = rng.integers(0, 2 ** 25, (3, 40)) & ((1 << w) - 1)
    buf, offs = pack_groups(v, w)
    local_buf, local = gather_segments(buf, offs[[2, 0]], offs[[3, 1]])  # groups 2 and 0
    pos = 8 * local[:, None] + np.cumsum(w[[2, 0]], 1) - w[[2, 0]]
    assert (read_varwidth(windows32(local_buf), pos, w[[2, 0]]) == v[[2, 0]]).all()

    q = rng.integers(0, 30, (3, 17))
    ubuf, uoffs = pack_unary_groups(q)
    assert (read_unary(*gather_segments(ubuf, uoffs[[2, 0]], uoffs[[3, 1]]), 17) == q[[2, 0]]).all()
    assert id_bits(V_LLAMA4) == 18 and id_bits(2) == 1 and id_bits(1) == 1


TOPK_CODECS = sorted(n for n, c in CODECS.items() if c.signal == "topk")


@pytest.mark.parametrize("name", TOPK_CODECS)
def test_every_codec_round_trips(name, zipf64):
    ids, lp = zipf64
    codec = get_codec(name)
    arrays = codec.encode(ids, lp, V_LLAMA4, group=64)
    again = codec.encode(ids, lp, V_LLAMA4, group=64)
    assert arrays.keys() == again.keys() and all(np.array_equal(arrays[a], again[a]) for a in arrays)
    di, dl = codec.decode(arrays, 64, V_LLAMA4, 64)
    assert di.shape == ids.shape and di.dtype == np.int64 and dl.dtype == np.float32
    assert (di[:, 0] == ids[:, 0]).all(), "the teacher's argmax must survive"
    si, sl = _by_id(ids, lp)
    dsi, dsl = _by_id(di, dl)
    assert (si == dsi).all(), "the set of top-k ids must survive"
    # Random access: groups 3 and 1 decode to the same rows as the full decode.
    pi, pl = codec.decode(arrays, 64, V_LLAMA4, 64, groups=[3, 1])
    assert (pi == np.concatenate([di[192:], di[64:128]])).all()
    assert (pl == np.concatenate([dl[192:], dl[64:128]])).all()
    if name == "lossless":
        assert (di == ids).all() and (dl == lp).all()
    elif name in ("fp16", "bf16"):
        dt = torch.float16 if name == "fp16" else torch.bfloat16
        assert (di == ids).all()
        assert (dl == torch.from_numpy(lp).to(dt).float().numpy()).all()
    else:
        err = np.abs(dsl - sl)
        assert err.max() < 0.52, "log-space step 1.0 bounds the error at ~0.5 nats"
        p, q = np.exp(sl), np.exp(dsl)
        pn, qn = p / p.sum(1, keepdims=True), q / q.sum(1, keepdims=True)
        kl_norm = (pn * (np.log(pn) - np.log(qn))).sum(1).mean()
        assert kl_norm < 1e-3
        # The top-k mass (so the tail) is kept to fp16 precision.
        np.testing.assert_allclose(np.log(q.sum(1)), np.log(p.sum(1)), atol=2e-3)
        assert np.all(np.diff(dl[:, 1:], axis=1) <= 0), "entries after the top-1 come most likely first"


def test_compact_meets_size_target(zipf64):
    ids, lp = zipf64
    arrays = CODECS["compact"].encode(ids, lp, V_LLAMA4, group=64)
    per_token = sum(a.nbytes for a in arrays.values()) / len(ids)
    # The per-shard id table (~790 B) is amortised over only 256 tokens here (~3 B/token).
    assert per_token < 130, per_token
    lossless = CODECS["lossless"].encode(ids, lp, V_LLAMA4)
    assert sum(a.nbytes for a in lossless.values()) / len(ids) == 64 * 18 / 8 + 64 * 4  # 18-bit ids + fp32


def test_codecs_handle_minus_inf_and_edge_shapes():
    # k == V with masked (-inf) entries, and the smallest vocab.
    logits = torch.randn(8, 5)
    logits[:, 3] = float("-inf")
    ids, lp = _topk(logits, 5)
    for name in TOPK_CODECS:
        codec = CODECS[name]
        di, dl = codec.decode(codec.encode(ids, lp, 5, group=4), 5, 5, 4)
        assert (np.sort(di, 1) == np.arange(5)).all(), name
        if name == "lossless":
            assert (dl == lp).all()
    ids1, lp1 = np.zeros((3, 1), np.int64), np.zeros((3, 1), np.float32)
    for name in TOPK_CODECS:
        codec = CODECS[name]
        di, dl = codec.decode(codec.encode(ids1, lp1, 1, group=3), 1, 1, 3)
        assert (di == 0).all() and np.allclose(dl, 0, atol=1e-3), name


def test_compact_rejects_bad_input():
    codec = CompactCodec()
    with pytest.raises(ValueError, match="distinct"):
        codec.encode(np.array([[3, 3]]), np.array([[-1.0, -2.0]], np.float32), 10)
    with pytest.raises(ValueError, match="outside"):
        codec.encode(np.array([[3, 10]]), np.array([[-1.0, -2.0]], np.float32), 10)
    with pytest.raises(ValueError, match="unknown cache encoding"):
        get_codec("zstd")


def test_compact_worst_case_uniform_logits():
    """Uniform-random logits: ids cost ~log2 C(V, k), the error stays small."""
    ids, lp = _topk(torch.randn(64, V_LLAMA4, generator=torch.Generator().manual_seed(1)), 64)
    codec = CODECS["compact"]
    arrays = codec.encode(ids, lp, V_LLAMA4, group=64)
    di, dl = codec.decode(arrays, 64, V_LLAMA4, 64)
    si, sl = _by_id(ids, lp)
    dsi, dsl = _by_id(di, dl)
    assert (si == dsi).all() and (di[:, 0] == ids[:, 0]).all()
    assert np.abs(dsl - sl).max() < 0.1  # a flat top-k lives in the fine sqrt part of the grid
    assert sum(a.nbytes for a in arrays.values()) / len(ids) < 150


# ---- the sampled encoding ---------------------------------------------------------------------

def _sampled_arrays(n_tok: int, vocab: int, n: int, seed: int = 0, scale: float = 2.0, exact_top: int = 0):
    from losses.signal import sample_signal

    logits = torch.randn(n_tok, vocab, generator=torch.Generator().manual_seed(seed)) * scale
    sig = sample_signal(logits, n, 1.0, seed, torch.arange(n_tok), exact_top=exact_top)
    ids = np.zeros((n_tok, exact_top + n), np.int64)
    lp = np.full((n_tok, exact_top + n), -np.inf, np.float32)
    ids[:, :sig.k], lp[:, :sig.k] = sig.topk_ids.numpy(), sig.topk_logprobs.numpy()
    return ids, lp


@pytest.mark.parametrize("vocab,n,scale", [(V_LLAMA4, 32, 2.0), (300, 16, 0.1), (7, 32, 5.0), (1, 8, 1.0)])
def test_sampled_codec_round_trips_exactly(vocab, n, scale):
    ids, lp = _sampled_arrays(96, vocab, n, scale=scale)
    codec = CODECS["sampled"]
    arrays = codec.encode(ids, lp, vocab, group=32)
    di, dl = codec.decode(arrays, n, vocab, 32)
    assert np.array_equal(di, ids) and np.array_equal(dl, lp)  # lossless, same layout
    pi, pl = codec.decode(arrays, n, vocab, 32, groups=[2, 0])
    assert np.array_equal(pi, np.concatenate([ids[64:], ids[:32]])) and np.array_equal(pl, np.concatenate([lp[64:], lp[:32]]))
    shuffled = np.random.default_rng(0).permuted(np.arange(n))  # entries in any order encode the same
    again = codec.encode(ids[:, shuffled], lp[:, shuffled], vocab, group=32)
    assert all(np.array_equal(arrays[a], again[a]) for a in arrays)


@pytest.mark.parametrize("vocab,n,h,scale", [(V_LLAMA4, 32, 16, 2.0), (300, 16, 8, 0.1), (7, 32, 3, 5.0),
                                              (4, 8, 4, 1.0), (50, 8, 2, 60.0)])
def test_sampled_codec_with_an_exact_head_round_trips_exactly(vocab, n, h, scale):
    """The head's ids and log-probs and the draws' ids and weights m * count / n come back
    bitwise, for any selection of groups; (4, 8, 4) leaves no tail (its mass held at the
    floor) and scale 60 a tail of mass ~1e-20.  A placeholder row (an invalid token: every
    entry -log(h + n)) is encoded too (bitwise back at these sizes; at some other (h, n) its
    fp32 log-probs come back an ulp or so off, its counts always exactly)."""
    ids, lp = _sampled_arrays(96, vocab, n, scale=scale, exact_top=h)
    if vocab >= h + n:  # the writer's placeholder (a cache needs h + n <= vocab)
        ids[5], lp[5] = np.arange(h + n), -np.log(h + n)
    codec = get_codec("sampled", exact_top=h)
    arrays = codec.encode(ids, lp, vocab, group=32)
    assert {"head_ids", "head_values"} <= set(arrays)
    di, dl = codec.decode(arrays, h + n, vocab, 32)
    assert np.array_equal(di, ids) and np.array_equal(dl, lp)
    pi, pl = codec.decode(arrays, h + n, vocab, 32, groups=[2, 0])
    assert np.array_equal(pi, np.concatenate([ids[64:], ids[:32]])) and np.array_equal(pl, np.concatenate([lp[64:], lp[:32]]))
    weights = np.exp(dl.astype(np.float64)).sum(1)
    np.testing.assert_allclose(weights, 1.0, rtol=1e-5)  # the head's mass and the tail's add up to 1


@pytest.mark.parametrize("h", [0, 4])
def test_a_sampled_shard_encoded_in_chunks_is_byte_identical(monkeypatch, h):
    """A shard is encoded a few groups at a time (bounded memory); the arrays equal encoding
    it whole, byte for byte, and decode the same, also when the last chunk is short."""
    import teachers.cache.sampled_codec as sampled_codec

    ids, lp = _sampled_arrays(7 * 16, 300, 16, exact_top=h)
    codec = get_codec("sampled", exact_top=h)
    whole = codec.encode(ids, lp, 300, group=16)
    monkeypatch.setattr(sampled_codec, "ENCODE_ENTRIES", 3 * 16 * 16)  # 3 groups a chunk: 3 + 3 + 1
    chunked = codec.encode(ids, lp, 300, group=16)
    assert set(chunked) == set(whole) and all(np.array_equal(chunked[a], whole[a]) for a in whole)
    di, dl = codec.decode(chunked, h + 16, 300, 16, groups=[6, 2])
    assert np.array_equal(di, np.concatenate([ids[96:], ids[32:48]])) and np.array_equal(dl, np.concatenate([lp[96:], lp[32:48]]))


def test_sampled_codec_rejects_counts_that_do_not_add_up():
    ids, lp = _sampled_arrays(4, 50, 8)
    lp[0, 0] = np.log(0.5) if lp[0, 0] != np.log(0.5) else np.log(0.25)
    with pytest.raises(ValueError, match="sum to the 8 draws"):
        CODECS["sampled"].encode(ids, lp, 50, group=4)
