"""Benchmark the teacher-signal cache; prints one JSON object.

    python bench/cache.py [--tokens 2048] [--quick]

Reports, for V = 202,048 (Llama 4's vocab):
* bytes/token per encoding at k = 32, 64, 128, on a synthetic Zipf-like teacher and on
  uniform-random logits (worst case for id coding), with reconstruction error for the
  lossy encodings;
* write overhead: wall time of write_cache vs the bare teacher forward it wraps (sampled runs
  at `--samples` draws, 256 as the cache's default; `+difficulty`: with the teacher's
  difficulty statistics recorded, as `distill cache` does; `+chat`: and the
  first half of each sequence a prompt, so the cache stores the second half only), and the
  cache's own share of it (top-k, encoding, files);
* bytes/token of the sampled encoding (n = 16 to 256 draws, + the fp16 entropy);
* read throughput of CachedTeacher on random batches with 0, 1, 2 and 4 prefetch workers
  (the loop announces the next step's batches; workers decode them meanwhile);
* peak memory and time of one teacher step with whole logits vs a chunked lm_head.

Synthetic teacher (`zipf_logits`): logit(v) = -0.5 ln(1 + v) + 2.0 N(0,1) plus 24
"context" tokens with log-uniform ids (frequent ids likelier) boosted by U(3, 10).  It
gives entropy ~1.7 nats, top-1 prob ~0.74, top-64 mass ~0.9 and a median top-64 id of
~5,000 (p90 ~100,000): ids skew to small values as in BPE vocabs, but are far from
concentrated at the head.
"""
from __future__ import annotations

import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's packages first

V_LLAMA4 = 202_048


def zipf_logits(n: int, vocab: int = V_LLAMA4, generator: torch.Generator | None = None) -> torch.Tensor:
    """(n, vocab) fp32 synthetic teacher logits (see module docstring)."""
    v = torch.arange(vocab, dtype=torch.float32)
    x = -0.5 * torch.log1p(v) + 2.0 * torch.randn(n, vocab, generator=generator)
    ids = torch.exp(torch.rand(n, 24, generator=generator) * math.log(vocab)).long().clamp(max=vocab - 1)
    return x.scatter_add_(1, ids, torch.empty(n, 24).uniform_(3.0, 10.0, generator=generator))


SAMPLED_VARIANTS = ((16, 0), (32, 0), (64, 0), (128, 0), (256, 0), (32, 8), (128, 8))  # (draws, cache.exact_top)


def _synthetic_streams(kind: str, n: int, k: int, sampled=SAMPLED_VARIANTS, seed: int = 0):
    """n synthetic tokens' signals, every one from the same logits, made once, 256 tokens at a
    time (a (256, V) fp32 chunk is 200 MB; making it is most of this table's time):
    -> (top-k ids (n, k) int64, log-probs (n, k) fp32),
       {(draws, h): sampled ids (n, h + draws) padded, log-probs (the exact head, then
                    log(m * count / draws)) with -inf padding, fp16 entropy (n,)}."""
    import numpy as np

    from losses.signal import sample_signal

    g = torch.Generator().manual_seed(seed)
    top_ids, top_lp = np.zeros((n, k), np.int64), np.zeros((n, k), np.float32)
    draws = {(d, h): (np.zeros((n, h + d), np.int64), np.full((n, h + d), -np.inf, np.float32), np.zeros(n, np.float16))
             for d, h in sampled}
    for i in range(0, n, 256):
        m = min(256, n - i)
        x = zipf_logits(m, generator=g) if kind == "zipf" else torch.randn(m, V_LLAMA4, generator=g)
        v, j = torch.topk(torch.log_softmax(x, -1), k, -1)
        top_ids[i:i + m], top_lp[i:i + m] = j.numpy(), v.numpy()
        for (d, h), (ids, lp, entropy) in draws.items():
            sig = sample_signal(x, d, 1.0, seed, torch.arange(i, i + m), exact_top=h)
            ids[i:i + m, :sig.k], lp[i:i + m, :sig.k] = sig.topk_ids.numpy(), sig.topk_logprobs.numpy()
            entropy[i:i + m] = sig.entropy.numpy()
    return (top_ids, top_lp), draws


def _errors(ids, lp, di, dl) -> dict:
    """Reconstruction error of decoded (di, dl) vs original (ids, lp), matched by id."""
    import numpy as np

    o1, o2 = np.argsort(ids, 1), np.argsort(di, 1)
    a = np.take_along_axis(lp, o1, 1).astype(np.float64)
    b = np.take_along_axis(dl, o2, 1).astype(np.float64)
    err = np.abs(a - b)
    p, q = np.exp(a), np.exp(b)
    pn, qn = p / p.sum(1, keepdims=True), q / q.sum(1, keepdims=True)
    kl_norm = (pn * (np.log(pn) - np.log(qn))).sum(1)
    tp, tq = np.clip(1 - p.sum(1), 0, 1), np.clip(1 - q.sum(1), 1e-30, 1)
    with np.errstate(divide="ignore", invalid="ignore"):
        kl_tail = (p * (a - b)).sum(1) + np.where(tp > 0, tp * (np.log(tp) - np.log(tq)), 0.0)
    return {"max_abs_logprob_err": float(err.max()), "p99_abs_logprob_err": float(np.quantile(err, 0.99)),
            "mean_kl_topk_normalised": float(kl_norm.mean()), "mean_kl_with_tail": float(kl_tail.mean()),
            "top1_same": float((di[:, 0] == ids[:, 0]).mean()),
            "id_sets_same": float((np.take_along_axis(ids, o1, 1) == np.take_along_axis(di, o2, 1)).all(1).mean())}


def bench_sizes(n_tokens: int, group: int) -> dict:
    """bytes/token, coding speed and reconstruction error per (teacher, k, encoding)."""
    import time

    import numpy as np

    from teachers.cache.codec import CODECS, get_codec

    out = {}
    for kind in ("zipf", "uniform"):
        (ids128, lp128), sampled = _synthetic_streams(kind, n_tokens, 128)
        for k in (32, 64, 128):
            ids, lp = ids128[:, :k].copy(), lp128[:, :k].copy()
            for name, codec in CODECS.items():
                if codec.signal != "topk":
                    continue
                t0 = time.perf_counter()
                arrays = codec.encode(ids, lp, V_LLAMA4, group=group)
                t1 = time.perf_counter()
                di, dl = codec.decode(arrays, k, V_LLAMA4, group)
                t2 = time.perf_counter()
                row = {"bytes_per_token": round(sum(a.nbytes for a in arrays.values()) / n_tokens, 2),
                       "encode_us_per_token": round((t1 - t0) / n_tokens * 1e6, 2),
                       "decode_us_per_token": round((t2 - t1) / n_tokens * 1e6, 2)}
                if not codec.lossless:
                    row.update({key: float(f"{v:.3g}") for key, v in _errors(ids, lp, di, dl).items()})
                out[f"{kind}/k{k}/{name}"] = row
        for (n, head), (ids, lp, entropy) in sampled.items():  # head: cache.exact_top
            codec = get_codec("sampled", head)
            t0 = time.perf_counter()
            arrays = codec.encode(ids, lp, V_LLAMA4, group=group)
            t1 = time.perf_counter()
            codec.decode(arrays, head + n, V_LLAMA4, group)
            t2 = time.perf_counter()
            out[f"{kind}/n{n}{f'+top{head}' if head else ''}/sampled"] = {
                "bytes_per_token": round(sum(a.nbytes for a in arrays.values()) / n_tokens + entropy.itemsize, 2),
                "distinct_ids_per_token": round(float((lp > -np.inf).sum(1).mean()), 2),
                "encode_us_per_token": round((t1 - t0) / n_tokens * 1e6, 2),
                "decode_us_per_token": round((t2 - t1) / n_tokens * 1e6, 2)}
    return out


def bench_write_read(hidden: int, n_seq: int, seq_len: int, batch: int, encodings, k: int, reps: int,
                     device: str = "cpu", samples: int = 256) -> dict:
    """Write overhead of write_cache vs the bare teacher forward, then read throughput.

    The machine may be shared and this CPU's timings drift by +-15% run to run, so bare
    and cached runs are interleaved `reps` times and medians are reported.  Inside
    write_cache the teacher's own calls are timed too: `cache_own_s` = write time minus
    teacher time is the cache's own work (top-k, encoding, files), separated from any
    slowdown of the teacher itself.  `topk_us_per_token` isolates `topk_logprobs`, the
    V-wide fp32 work (`log_softmax_topk_us_per_token`: the plain torch.log_softmax +
    torch.topk it replaces); encoding and file writing run in a background thread.
    """
    import statistics
    import tempfile
    import time
    from pathlib import Path

    from teachers.cache.format import Sampling
    from teachers.cache.reader import describe_cache
    from losses.difficulty import token_difficulty
    from teachers.cache.writer import _topk, write_cache

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Embedding(V_LLAMA4, hidden), torch.nn.Linear(hidden, V_LLAMA4)).eval()
    model = model.to(device)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    blocks = torch.randint(0, V_LLAMA4, (n_seq, seq_len))
    chat_targets = blocks.clone()
    chat_targets[:, : seq_len // 2] = -chat_targets[:, : seq_len // 2] - 1  # a prompt: teachers.protocol.untrained
    tokens = n_seq * seq_len
    ident = {"teacher_config_hash": "bench", "teacher_weights_hash": "bench", "tokenizer_hash": "bench",
             "data_fingerprint": "bench", "vocab_size": str(V_LLAMA4)}
    teacher_s = [0.0]

    def teacher(x):
        t0 = time.perf_counter()
        y = model(x.to(device))
        sync()
        teacher_s[0] += time.perf_counter() - t0
        return y

    def timed(fn) -> float:
        t0 = time.perf_counter()
        fn()
        return time.perf_counter() - t0

    def bare():
        with torch.no_grad():
            for i in range(0, n_seq, batch):
                model(blocks[i:i + batch].to(device))
            sync()

    def topk_once(fn) -> float:
        with torch.no_grad():
            logits = model(blocks[:batch].to(device))
        return timed(lambda: fn(logits))

    ours = min(topk_once(lambda x: _topk(x, k, V_LLAMA4, None)) for _ in range(reps))
    targets = torch.randint(0, V_LLAMA4, (batch * seq_len,))
    stats = min(topk_once(lambda x: token_difficulty(x.reshape(-1, V_LLAMA4), targets)) for _ in range(reps))
    plain = min(topk_once(lambda x: torch.topk(torch.log_softmax(x.float(), -1), k, -1)) for _ in range(reps))
    out = {"teacher": f"Embedding({V_LLAMA4},{hidden})->Linear({hidden},{V_LLAMA4})", "tokens": tokens,
           "batch": f"{batch}x{seq_len}", "k": k, "samples": samples, "reps": reps,
           "topk_us_per_token": round(ours / (batch * seq_len) * 1e6, 1),
           "difficulty_us_per_token": round(stats / (batch * seq_len) * 1e6, 1),
           "log_softmax_topk_us_per_token": round(plain / (batch * seq_len) * 1e6, 1)}
    bare()  # warm-up: allocator, thread pool
    for enc in encodings:
        with tempfile.TemporaryDirectory() as d:
            t_bare, t_write, t_own = [], [], []
            for _ in range(reps):
                t_bare.append(timed(bare))
                teacher_s[0] = 0.0
                # "+difficulty": the teacher's statistics too; "+chat": also the first half of every
                # sequence a prompt (no training target), so only the second half is stored
                codec, _, variant = enc.partition("+")
                sampling = Sampling(samples) if codec == "sampled" else None
                fn = (lambda x, keys: teacher(x)) if sampling else teacher
                targets = None if not variant else {"train": blocks if variant == "difficulty" else chat_targets}
                t_write.append(timed(lambda: write_cache(Path(d), fn, {"train": blocks}, identity=ident, k=k,
                                                         encoding=codec, batch_size=batch, overwrite=True,
                                                         shard_sequences=max(1, n_seq // 4), progress=False,
                                                         sampling=sampling, targets=targets)))
                t_own.append(t_write[-1] - teacher_s[0])
            tb, tw, own = (statistics.median(t) for t in (t_bare, t_write, t_own))
            rates = read_rates(Path(d), n_seq, seq_len, reps, seconds=1.0 if reps > 1 else 0.2)
            described = describe_cache(d)
            out[enc] = {"teacher_forward_s": round(tb, 2), "write_cache_s": round(tw, 2),
                        "overhead_pct": round(100 * (tw - tb) / tb, 1),
                        "overhead_us_per_token": round((tw - tb) / tokens * 1e6),
                        "cache_own_s": round(own, 2), "cache_own_pct": round(100 * own / tb, 1),
                        "cache_own_us_per_token": round(own / tokens * 1e6),
                        "file_bytes_per_token": round(described["bytes_per_token"], 1),
                        "file_bytes_per_stored_token": round(described["bytes_per_stored_token"], 1),
                        "file_bytes_per_block": round(described["bytes_per_block"]),
                        "read_tokens_per_s_by_workers": rates,
                        "read_batch": f"8x{seq_len} random sequences"}
    return out


def read_rates(cache_dir, n_seq: int, seq_len: int, reps: int, seconds: float = 1.0) -> dict[str, int]:
    """Tokens/s that CachedTeacher serves random 8-sequence batches at, by prefetch workers:
    each batch is announced one step ahead (`workers` ahead for more workers), as the loop
    does; best of `reps` runs of `seconds`."""
    import time

    import numpy as np

    from teachers import Batch, CachedTeacher

    rng = np.random.default_rng(0)
    out = {}
    for workers in (0, 1, 2, 4):
        teacher = CachedTeacher(cache_dir, "train", workers=workers)
        best = 0.0
        for _ in range(reps):
            batches = [Batch(rng.integers(0, n_seq, 8).tolist(), torch.zeros(1), torch.zeros(1)) for _ in range(400)]
            teacher.signal(batches[0])  # map shards
            n, t0 = 0, time.perf_counter()
            while time.perf_counter() - t0 < seconds and n + 1 + workers < len(batches):
                teacher.prefetch(batches[n + 1:n + 1 + max(1, workers)])
                teacher.signal(batches[n])
                n += 1
            best = max(best, n * 8 * seq_len / (time.perf_counter() - t0))
            teacher.prefetch([])
        out[str(workers)] = round(best)
    return out


def _teacher_step_child(path: str, batch: int, seq_len: int, k: int, conn) -> None:
    """Child process: one cache step of a saved teacher, full-logits vs chunked lm_head."""
    import time

    from students.build import load_causal_lm
    from teachers import LiveTeacher

    model = load_causal_lm(path)
    teacher = LiveTeacher(model, k, V_LLAMA4, torch.device("cpu"))
    teacher.chunked_head = path.endswith("chunked")  # the same weights, saved twice
    ids = torch.randint(0, V_LLAMA4, (batch, seq_len), generator=torch.Generator().manual_seed(0))
    teacher.topk(ids[:1, :8])  # warm-up: thread pool, allocator
    before = _reset_peak_rss_mb()
    t0 = time.perf_counter()
    teacher.topk(ids)
    dt = time.perf_counter() - t0
    peak = _peak_rss_mb()
    conn.send({"step_s": round(dt, 2), "peak_rss_mb": peak, "rss_before_step_mb": before})


def _status_mb(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) // 1024 for line in f if line.startswith(field + ":"))


def _reset_peak_rss_mb() -> int:
    """Reset this process's peak RSS (Linux: clear_refs 5; ru_maxrss would keep the
    parent's peak across fork + exec) and return the current RSS in MB."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return _status_mb("VmRSS")


def _peak_rss_mb() -> int:
    return _status_mb("VmHWM")


def bench_teacher_step(batch: int, seq_len: int, hidden: int, k: int = 64) -> dict:
    """Peak memory and time of one cache step (teacher forward + top-k) at V = 202,048:
    LiveTeacher.topk with the whole (B, T, V) logits vs with the lm_head in chunks.
    Each variant runs in a fresh process whose peak RSS is reset just before the step."""
    import multiprocessing as mp
    import tempfile

    from distill.report.export import save_hf_dir
    from students.build import build_model
    from students.presets import behemoth

    cfg = behemoth(vocab_size=V_LLAMA4, hidden_size=hidden, num_layers=2, num_heads=4, num_kv_heads=2,
                   head_dim=hidden // 4, intermediate_size=hidden, intermediate_size_mlp=2 * hidden, num_experts=4)
    out = {"teacher": f"behemoth preset, 2 layers, hidden {hidden}, 4 experts, V={V_LLAMA4}",
           "batch": f"{batch}x{seq_len}", "full_logits_fp32_mb": round(batch * seq_len * V_LLAMA4 * 4 / 2**20)}
    ctx = mp.get_context("spawn")
    with tempfile.TemporaryDirectory() as d:
        model = build_model(cfg, seed=0)
        for name in ("full", "chunked"):
            save_hf_dir(model, None, f"{d}/{name}")
        del model
        for name in ("full", "chunked"):
            recv, send = ctx.Pipe(duplex=False)
            p = ctx.Process(target=_teacher_step_child, args=(f"{d}/{name}", batch, seq_len, k, send))
            p.start()
            out[name] = recv.recv()
            p.join()
    return out


ENCODINGS = ("lossless", "lossless+difficulty", "fp16", "compact", "sampled", "sampled+difficulty", "compact+chat",
             "sampled+chat")  # the write runs; "+": with the teacher's statistics, or half of each block a prompt


def main() -> None:
    import argparse
    import json
    import os
    import platform

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tokens", type=int, default=2048, help="synthetic tokens for the size table")
    p.add_argument("--hidden", default="256,1024,2048", help="teacher widths for the write-overhead runs")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--sequences", type=int, default=8)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--reps", type=int, default=5, help="interleaved repeats; medians are reported")
    p.add_argument("--step", default="4x2048x512", help="BATCHxSEQxHIDDEN of the teacher-step memory run")
    p.add_argument("--device", default="cpu", help="where the write-overhead teacher runs")
    p.add_argument("--skip", nargs="*", default=[], choices=["sizes", "write_read", "teacher_step"])
    p.add_argument("--samples", type=int, default=256, help="draws per token of the sampled write runs (cache.samples)")
    p.add_argument("--encodings", default=",".join(ENCODINGS), help=f"write runs, of {','.join(ENCODINGS)}")
    p.add_argument("--quick", action="store_true", help="small sizes, for a smoke run")
    a = p.parse_args()
    stdout = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)  # library log lines (DeepSpeed's accelerator notice) go to stderr; stdout is the JSON
    if a.quick:
        a.tokens, a.sequences, a.seq_len, a.hidden, a.reps, a.step = 256, 4, 64, "64", 1, "1x64x64"
        a.samples = min(a.samples, 32)
    result = {"machine": f"{platform.machine()} {torch.get_num_threads()} threads, torch {torch.__version__}",
              "device": a.device, "vocab_size": V_LLAMA4}
    if "sizes" not in a.skip:
        result["sizes"] = bench_sizes(a.tokens, group=min(a.tokens, 512))
    if "write_read" not in a.skip:
        result["write_read"] = [bench_write_read(int(h), a.sequences, a.seq_len, a.batch, a.encodings.split(","),
                                                 k=64, reps=a.reps, device=a.device, samples=a.samples)
                                for h in a.hidden.split(",")]
    if "teacher_step" not in a.skip:
        result["teacher_step"] = bench_teacher_step(*map(int, a.step.split("x")))
    print(json.dumps(result, indent=1), file=stdout)
    stdout.flush()


if __name__ == "__main__":
    main()
