"""How well each cached teacher signal estimates the exact forward-KL gradient, per byte.

    python bench/estimators.py [--tokens 256] [--run runs/demo]

For a set of teacher distributions and a student, and each estimator as the cache would
store it (top-k in the `compact` encoding, read back; sampled draws in the `sampled`
encoding), at T in {1, 2}:
  bytes_per_token   what the cache stores per token (its encoding's arrays, + entropy)
  grad_cosine       mean over tokens of cos(g, g*), g = d soft / d student logits of the
                    estimator, g* = that of the exact dense forward KL
  grad_rel_l2       |G - G*| / |G*| over all tokens' gradients together (Frobenius norms:
                    a per-token mean would be ruled by tokens whose exact gradient is ~0)
Teachers: `zipf`, the synthetic Zipf-like one of bench/cache.py at V = 202,048 (student:
teacher logits * 0.7 + N(0, 1)); `demo`, the demo teacher's real logits on validation blocks
and the demo's distilled dense student (with --run OUT of a finished `distill demo`).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.cache import zipf_logits  # noqa: E402
from losses import DIVERGENCES, TeacherSignal  # noqa: E402
from losses.signal import sample_signal, topk_logprobs  # noqa: E402
from teachers.cache.codec import get_codec  # noqa: E402

TOPK = (4, 8, 16, 32, 64)
SAMPLES = (8, 16, 32, 64, 128)


def _grad(student: torch.Tensor, signal: TeacherSignal, temperature: float, tail: str) -> torch.Tensor:
    z = student.clone().requires_grad_(True)
    DIVERGENCES["forward_kl"](z, signal, temperature=temperature, tail=tail).sum().backward()
    return z.grad


def _quality(g: torch.Tensor, exact: torch.Tensor) -> dict:
    cos = torch.nn.functional.cosine_similarity(g, exact, dim=-1)
    rel = (g - exact).norm() / exact.norm().clamp_min(1e-30)
    return {"grad_cosine": round(float(cos.mean()), 4), "grad_rel_l2": round(float(rel), 4)}


def _topk_via_cache(teacher: torch.Tensor, k: int) -> tuple[TeacherSignal, float]:
    """Top-k through the compact codec, as training would read it; bytes per token."""
    vocab = teacher.shape[-1]
    values, ids = topk_logprobs(teacher, k)
    codec = get_codec("compact")
    arrays = codec.encode(ids.numpy(), values.numpy(), vocab, group=teacher.shape[0])
    di, dl = codec.decode(arrays, k, vocab, teacher.shape[0])
    size = sum(a.nbytes for a in arrays.values()) / teacher.shape[0]
    return TeacherSignal(torch.from_numpy(di), torch.from_numpy(dl)), size


def _sampled_via_cache(teacher: torch.Tensor, n: int, temperature: float) -> tuple[TeacherSignal, float]:
    vocab, tokens = teacher.shape[-1], teacher.shape[0]
    sig = sample_signal(teacher, n, temperature, seed=0, keys=torch.arange(tokens))
    ids = np.zeros((tokens, n), np.int64)
    lp = np.full((tokens, n), -np.inf, np.float32)
    ids[:, :sig.k], lp[:, :sig.k] = sig.topk_ids.numpy(), sig.topk_logprobs.numpy()
    codec = get_codec("sampled")
    arrays = codec.encode(ids, lp, vocab, group=tokens)
    di, dl = codec.decode(arrays, n, vocab, tokens)
    size = sum(a.nbytes for a in arrays.values()) / tokens + 2  # + the fp16 entropy
    entropy = torch.from_numpy(sig.entropy.numpy().astype(np.float16).astype(np.float32))
    return TeacherSignal(torch.from_numpy(di), torch.from_numpy(dl), kind="sampled", entropy=entropy,
                         temperature=temperature), size


def evaluate(teacher: torch.Tensor, student: torch.Tensor) -> dict:
    """teacher, student: (N, V) fp32 logits of the same tokens."""
    out = {"tokens": teacher.shape[0], "vocab": teacher.shape[1]}
    dense = TeacherSignal.from_logits(teacher, 1, keep_dense=True)
    for temperature in (1.0, 2.0):
        exact = _grad(student, dense, temperature, "bucket")
        rows = {}
        for k in TOPK:
            sig, size = _topk_via_cache(teacher, k)
            for tail in ("bucket", "renorm"):
                rows[f"top{k}/{tail}"] = {"bytes_per_token": round(size, 1),
                                          **_quality(_grad(student, sig, temperature, tail), exact)}
        for n in SAMPLES:
            sig, size = _sampled_via_cache(teacher, n, temperature)
            rows[f"sampled{n}"] = {"bytes_per_token": round(size, 1),
                                   **_quality(_grad(student, sig, temperature, "sampled"), exact)}
        out[f"T={temperature:g}"] = rows
    return out


def _demo_logits(run: Path, tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The demo teacher's and distilled dense student's logits on held-out blocks."""
    from safetensors.torch import load_file

    from students.build import load_causal_lm

    blocks = load_file(str(next((run / "data").glob("blocks-*.safetensors"))))["val"]
    n_blocks = -(-tokens // (blocks.shape[1] - 1))
    ids = blocks[:n_blocks, :-1]
    with torch.no_grad():
        teacher = load_causal_lm(run / "teacher")(input_ids=ids).logits
        student = load_causal_lm(run / "students" / "dense" / "export")(input_ids=ids).logits
    vocab = min(teacher.shape[-1], student.shape[-1])
    return (teacher[..., :vocab].reshape(-1, vocab)[:tokens].float(),
            student[..., :vocab].reshape(-1, vocab)[:tokens].float())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tokens", type=int, default=256)
    p.add_argument("--run", type=Path, default=None, help="a finished `distill demo` dir: adds the demo teacher")
    args = p.parse_args()
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    teacher = zipf_logits(args.tokens, generator=g)
    student = teacher * 0.7 + torch.randn(teacher.shape, generator=g)
    result = {"machine": f"torch {torch.__version__}, {torch.get_num_threads()} threads",
              "zipf": evaluate(teacher, student)}
    if args.run is not None:
        result["demo"] = evaluate(*_demo_logits(args.run, args.tokens))
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
