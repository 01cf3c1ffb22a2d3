"""The cache benchmark runs end to end and prints one JSON object (figures are not asserted: no timed tests)."""
import json
import math
import subprocess
import sys

import pytest

from tests.conftest import ROOT

pytestmark = pytest.mark.slow


def test_cache_bench_quick_prints_json():
    r = subprocess.run([sys.executable, str(ROOT / "bench" / "cache.py"), "--quick"], cwd=ROOT,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout)
    # Exact sizes of the fixed-width encodings at V = 202,048: 18-bit ids + 4- or 2-byte values.
    assert out["sizes"]["zipf/k64/lossless"]["bytes_per_token"] == 64 * (18 / 8 + 4)
    assert out["sizes"]["zipf/k64/fp16"]["bytes_per_token"] == 64 * (18 / 8 + 2)
    assert out["sizes"]["zipf/k64/compact"]["bytes_per_token"] < 130
    assert out["sizes"]["zipf/n32/sampled"]["bytes_per_token"] < 48  # the sampled cache's target at V = 202,048
    assert set(out["write_read"][0]["sampled"]["read_tokens_per_s_by_workers"]) == {"0", "1", "2", "4"}
    # Given the targets, the cache stores the teacher's difficulty statistics, 3 fp16 numbers per
    # token and 16 bytes per sequence, and the stored positions' bits (8 bytes per sequence) with
    # offsets per 32-token group (16-48 bytes more per sequence), plus three tensors' safetensors
    # header entries per shard (~230 bytes: shards of one 64-token sequence here).
    row = out["write_read"][0]
    extra = row["sampled+difficulty"]["file_bytes_per_token"] - row["sampled"]["file_bytes_per_token"]
    assert 6.0 + 16 / 64 <= extra <= 6.0 + (16 + 8 + 48 + 250) / 64 and row["difficulty_us_per_token"] > 0
    # Half of each block a prompt: the cache stores the other half (statistics and headers on top).
    for codec in ("compact", "sampled"):
        chat, text = row[f"{codec}+chat"], row[codec]
        assert chat["file_bytes_per_block"] < 0.7 * text["file_bytes_per_block"]
        assert abs(chat["file_bytes_per_stored_token"] - 2 * chat["file_bytes_per_token"]) <= 0.2  # rounded to 0.1
    step = out["teacher_step"]
    assert {"full", "chunked"} <= set(step) and step["chunked"]["peak_rss_mb"] > 0


def _json_of(*args, timeout=600) -> dict:
    r = subprocess.run([sys.executable, *map(str, args)], cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout)


def test_loss_bench_compares_kd_with_ce_through_the_same_code():
    out = _json_of(ROOT / "bench" / "loss.py", "--bt", 64, "--hidden", 16, "--vocab", 2000, "--k", 8, "--iters", 1)
    row = out["V=2000"]
    assert {"ce_ms", "kd_ms", "kd_generic_ms", "kd_over_ce", "chunk"} <= set(row)
    assert set(row["peak_mb"]) == {"ce", "kd", "kd_generic", "naive"}
    assert out["liger"].startswith("not run")  # Liger's fused losses run beside ours on CUDA only
    some = _json_of(ROOT / "bench" / "loss.py", "--bt", 64, "--hidden", 16, "--vocab", 2000, "--k", 8, "--iters", 1,
                    "--memory-variants", "kd", "liger_jsd")["V=2000"]
    assert set(some["peak_mb"]) == {"kd"} and some["chunk"] == 11184  # auto_chunk_size(2000) on a CPU


def test_sampling_bench_times_the_on_policy_path():
    """bench/sampling.py --quick: the students' seeded sampling, stock sampling, and one on-policy
    step (every student samples, one teacher forward) on the CPU."""
    out = _json_of(ROOT / "bench" / "sampling.py", "--quick")
    assert all(out[k]["tokens_per_s"] > 0 for k in ("sample", "sample_bf16", "stock_sample"))
    step = out["step"]  # 2 students x 4 prompts x 8 new tokens, none stopped early by EOS
    assert step["sampled_tokens"] <= 2 * 4 * 8 and step["sampled_tokens"] > 0 and step["teacher_s"] > 0


def test_step_bench_runs_both_students():
    out = _json_of(ROOT / "bench" / "step.py", "--quick", "--peak-tflops", 1)
    assert out["dense"]["tokens_per_s"] > 0 and out["scout"]["params_active"] < out["scout"]["params_total"]


def test_step_bench_compares_the_cached_kd_step_with_the_ce_step():
    out = _json_of(ROOT / "bench" / "step.py", "--vs-ce", "--quick")
    assert set(out["step_s"]) == {"ce", "kd", "kd_prefetched"} and all(v > 0 for v in out["step_s"].values())
    assert set(out["breakdown_s"]) == {"read", "copy", "forward_loss_backward", "optimizer"}
    assert out["breakdown_s"]["read"] > 0  # the signal came from a cache on disk


def test_gpu_script_says_no_cuda_and_exits_0():
    r = subprocess.run(["bash", str(ROOT / "bench" / "gpu.sh")], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout) == {"cuda": False, "note": "no CUDA device: nothing measured"}


def test_readme_memory_table_is_what_the_formula_gives():
    """README's per-GPU ZeRO table is bench/zero_memory.py's output (param_counts of PUBLISHED)."""
    r = subprocess.run([sys.executable, str(ROOT / "bench" / "zero_memory.py")], cwd=ROOT, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    readme = (ROOT / "README.md").read_text()
    rows = [line for line in r.stdout.splitlines() if line.startswith("| scout") or line.startswith("| maverick")]
    assert len(rows) == 6 and all(row in readme for row in rows), rows


def test_data_bench_quick_prints_json():
    """bench/data.py --quick: ~1M tokens prepared, indexed and compared with the tokenizer (no figure asserted)."""
    out = _json_of(ROOT / "bench" / "data.py", "--quick")
    row = out["sizes"]["1M"]
    assert row["prepare"]["tokens"] > 500_000 and row["prepare"]["peak_rss_mb"] > 0
    assert row["prepare"]["disk_bytes_per_token"] < 2.3  # uint16 ids (vocab 4096), 1 bit of row start, 1 of target
    assert row["index"]["batch_shape"] == [8, out["seq_len"] + 1] and row["baseline"]["tokens_per_s"] > 0


def test_on_policy_bench_quick_scores_every_scheme_from_the_warm_students():
    """bench/on_policy.py --quick: teacher, warm start, the 3 schemes and the cost comparison at the tiniest size."""
    out = _json_of(ROOT / "bench" / "on_policy.py", "--quick")
    assert set(out["summary"]) == {"warm", "off", "on", "ramp"}
    names = set(out["students"])
    for scheme in out["summary"].values():
        assert set(scheme) == names and all(len(v["exact_match"]) == 1 for v in scheme.values())
    assert out["schemes"]["on"]["0"]["teacher_forwards_per_step"] == 1.0  # every student's samples, one forward
    assert out["cost"]["teacher_forwards_per_step_single_runs"] == 3.0


def test_peer_bench_scores_the_tokens_chat_training_learns_by_the_torch_formulas(tmp_path):
    """bench/peer.py's one stock-transformers scorer (TRL's students and ours alike) reads the
    assistant tokens the project's chat rendering trains on, and gives exp(F.cross_entropy)
    and F.kl_div of them; a model scored against itself is at KL 0."""
    import torch
    import torch.nn.functional as F

    sys.path.insert(0, str(ROOT / "bench"))
    import peer

    from distill.chat import render

    rows = peer.stdlib_rows(200)[:30]
    tok = peer.make_tokenizer([m["content"] for r in rows for m in r["messages"]], 400, tmp_path / "tok")
    teacher = peer.llama(tok, 64, 2, seed=1, max_len=1024).eval()
    student = peer.llama(tok, 32, 1, seed=2, max_len=1024).eval()
    student.save_pretrained(str(tmp_path / "s"))
    teacher.save_pretrained(str(tmp_path / "t"))
    held = rows[:5]
    got = peer.score(tmp_path / "s", teacher, tok, held)
    nll = kl = n = 0.0
    with torch.no_grad():
        for row in held:
            ids, targets = render(tok, json.dumps(row))
            pos = torch.tensor([t for t in range(1, len(ids)) if targets[t]])  # assistant tokens, predicted from t - 1
            x = torch.tensor([ids])
            s, t = student(input_ids=x).logits[0, pos - 1], teacher(input_ids=x).logits[0, pos - 1]
            nll += float(F.cross_entropy(s, x[0, pos], reduction="sum"))
            kl += float(F.kl_div(F.log_softmax(s, -1), F.log_softmax(t, -1), log_target=True, reduction="sum"))
            n += len(pos)
    assert got["tokens"] == n
    assert abs(got["ppl"] - math.exp(nll / n)) <= 1e-3 * got["ppl"]
    assert abs(got["kl"] - kl / n) <= 1e-3 and got["kl"] > 0.01
    assert peer.score(tmp_path / "t", teacher, tok, held)["kl"] == 0.0


def test_chat_render_bench_quick_prints_json():
    r = subprocess.run([sys.executable, str(ROOT / "bench" / "chat_render.py"), "--quick"], cwd=ROOT,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    row, = json.loads(r.stdout)["rows"]
    assert row["turns"] == 10 and row["tokens"] > 0 and row["whole_s"] > 0 and row["block_1025_s"] > 0
