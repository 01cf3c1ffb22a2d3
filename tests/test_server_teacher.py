"""A teacher served by a real vLLM server (teachers/server.py), through the real CLI.

One server per module (startup takes 1-2 minutes on 2 cores) on a tiny stock-transformers
Llama with a `tokenizers` tokenizer; the kill/restart test runs its own.  `make test-server`
builds vLLM's CPU venv and runs these (tests/vllm_server.py says how the venv is found).
"""
from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
import time

import pytest
import torch
import yaml

from tests import vllm_server
from tests.conftest import ROOT, kill_group, run_cli
from tests.hf_models import chat_rows, make_tokenizer, save_model, write_jsonl

pytestmark = pytest.mark.server

NAME = "teacher-tiny"
STUDENT = {"hidden_size": 32, "num_layers": 1, "num_heads": 2, "num_kv_heads": 1, "head_dim": 16}


@pytest.fixture(scope="module")
def served(stdlib_corpus, tmp_path_factory):
    """A jsonl with a `text` column, a tiny Llama teacher (head_dim 32: a size vLLM's CPU
    attention serves) with its tokenizer saved beside it, and a vLLM server serving it."""
    work = tmp_path_factory.mktemp("served")
    texts = [p.read_text() for p in sorted(stdlib_corpus.glob("*.py"))]
    tok = make_tokenizer(texts, work / "teacher")
    model = save_model("llama", len(tok), work / "teacher", tok, seed=1, hidden_size=64, intermediate_size=128,
                       num_attention_heads=2, num_key_value_heads=1, head_dim=32)
    # 30 documents, a few thousand tokens: every cache below is a few hundred requests to a CPU server
    data = write_jsonl([{"text": t[i:i + 250]} for t in texts[:10] for i in range(0, 750, 250)], work / "corpus.jsonl")
    with vllm_server.running(model, NAME, work / "vllm.log") as server:
        yield {"work": work, "model": model, "data": data, "server": server, "texts": texts}


def _config(served, out, url=None, **over) -> dict:
    raw = {"out_dir": str(out), "seed": 0,
           "data": {"paths": [str(served["data"])], "seq_len": 32, "val_fraction": 0.2,
                    "tokenizer": {"path": str(served["model"])}},
           "teacher": {"source": "server", "server": {"url": url or served["server"].url, "model": NAME,
                                                      "timeout_s": 30, "max_retries": 2}},
           "cache": {"k": 16, "batch_size": 4, "shard_sequences": 64},
           "students": [{"name": "dense", "model": {"preset": "dense", "args": STUDENT},
                         "optim": {"lr": 3e-3, "warmup_steps": 1}}],
           "train": {"mode": "cached", "steps": 3, "batch_size": 4, "eval_every": 0, "eval_blocks": 2,
                     "checkpoint_every": 0}}
    for key, value in over.items():  # "a.b": value
        *path, last = key.split(".")
        node = raw
        for p in path:
            node = node[p]
        node[last] = value
    return raw


def _write(raw: dict, path) -> str:
    path.write_text(yaml.safe_dump(raw))
    return str(path)


def _ok(proc):
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def test_the_served_cache_is_the_in_process_signal_and_trains(served, tmp_path):
    from distill.config import check_config, parse_config
    from distill.runtime import prepare
    from teachers import LiveTeacher, load_teacher_model
    from teachers.cache import CacheReader

    out = tmp_path / "run"
    cfg_path = _write(_config(served, out), tmp_path / "run.yaml")
    _ok(run_cli("cache", "-c", cfg_path))
    cfg = check_config(parse_config(yaml.safe_load(open(cfg_path))))
    data = prepare(cfg)
    live = LiveTeacher(load_teacher_model(served["model"]), 16, len(data.tokenizer), torch.device("cpu"))
    for split, blocks in (("train", data.train), ("val", data.val)):
        reader = CacheReader(out / "cache", split)
        n = len(reader)
        assert n == blocks.n and n > 0
        rows = list(range(min(n, 24)))
        sig, valid = reader.read(rows)
        x = blocks.columns(slice(None, -1), plain=True)[rows[0]:rows[-1] + 1]
        t = blocks.columns(slice(1, None), plain=True)[rows[0]:rows[-1] + 1]
        # data.packing: documents (the default): the in-process teacher reads each packed row alone, as the server does
        pos = blocks.columns(slice(None, -1), positions=True)[rows[0]:rows[-1] + 1]
        assert pos is not None and bool((pos[:, 1:] == 0).any()), "no block holds two rows: the test shows nothing"
        vals, ids, stats = live.topk(torch.as_tensor(x), torch.as_tensor(t), pos)
        assert bool(valid.all())
        # The cache stores the training targets only (teachers/cache/rows.py): a row's last position,
        # which predicts the next row's first token, is none; compare at the targets.
        trained = torch.as_tensor(blocks.columns(slice(1, None))[rows[0]:rows[-1] + 1]) >= 0  # (B, T)
        assert bool(trained.any()) and not bool(trained.all())
        vals, ids, stats = vals[trained], ids[trained], stats[trained]  # (M, k), (M, k), (M, 3)
        assert torch.equal(sig.topk_ids[trained], ids), f"{split}: top-k ids differ from the in-process teacher"
        assert (sig.topk_logprobs[trained] - vals).abs().max() < 1e-4
        got = sig.difficulty[trained]  # [nll, entropy, top1]; stored as fp16
        assert torch.allclose(got[..., 0], stats[..., 0], rtol=2e-3, atol=2e-3)  # nll: exact, any rank
        assert torch.allclose(got[..., 2], stats[..., 2], rtol=2e-3, atol=1e-4)  # top1: exact
        # entropy with the tail as one outcome: that formula over the in-process top-k, a lower bound of the full one
        p = vals.double().exp()
        tail = (1 - p.sum(-1)).clamp(min=0)
        bound = (-(p * vals.double()).sum(-1) - torch.xlogy(tail, tail)).float()
        assert torch.allclose(got[..., 1], bound, rtol=2e-3, atol=1e-3)
        assert bool((got[..., 1] <= stats[..., 1] + 1e-3).all())
    manifest = json.loads((out / "cache" / "manifest.json").read_text())
    assert manifest["complete"] and manifest["identity"]["teacher_server_model"] == NAME
    assert "tail as one outcome" in manifest["identity"]["teacher_signal"]
    shown = _ok(run_cli("inspect", str(out / "cache"))).stdout
    assert "tail as one outcome" in " ".join(shown.split())
    # a run trains from that cache and exports
    _ok(run_cli("train", "-c", cfg_path))
    ckpt = sorted((out / "students" / "dense" / "checkpoints").glob("step_*"))[-1]
    _ok(run_cli("export", str(ckpt), "--out", str(tmp_path / "export")))
    assert (tmp_path / "export" / "config.json").exists() and (tmp_path / "export" / "model.safetensors").exists()


def _refused(served, tmp_path, **over):
    out = tmp_path / "run"
    proc = run_cli("cache", "-c", _write(_config(served, out, **over), tmp_path / "run.yaml"))
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert not out.exists(), "a refused handshake wrote something"
    return lines[0]


def test_no_server_at_the_url(served, tmp_path):
    line = _refused(served, tmp_path, url=f"http://127.0.0.1:{vllm_server.free_port()}")
    assert "teacher.server.url" in line and "no vLLM server" in line


def test_a_model_the_server_does_not_serve(served, tmp_path):
    line = _refused(served, tmp_path, **{"teacher.server.model": "other"})
    assert "teacher.server.model" in line and "'other'" in line and NAME in line


def test_a_block_longer_than_the_servers_context(served, tmp_path):
    line = _refused(served, tmp_path, **{"data.seq_len": 511})
    assert "--max-model-len 513" in line and "512" in line


def test_k_beyond_the_servers_max_logprobs(served, tmp_path):
    line = _refused(served, tmp_path, **{"cache.k": 65})
    assert "cache.k" in line and "--max-logprobs 65" in line


def test_a_different_tokenizer_is_refused(served, tmp_path):
    other = tmp_path / "other_tok"
    make_tokenizer([json.dumps(r) for r in chat_rows()], other)  # same kind and size, other merges and ids
    line = _refused(served, tmp_path, **{"data.tokenizer": {"path": str(other)}})
    assert "tokenizer" in line and NAME in line and str(other) in line
    # The served tokenizer with two ids swapped: every probe string still splits alike (before,
    # a whole cache was written with those two tokens' signal read as each other's).
    swapped = tmp_path / "swapped_tok"
    shutil.copytree(served["model"], swapped, ignore=lambda d, names: [n for n in names if "safetensors" in n])
    table = json.loads((swapped / "tokenizer.json").read_text())
    vocab = table["model"]["vocab"]
    a, b = sorted(vocab, key=vocab.get)[-2:]  # the last two merges: in no probe string
    vocab[a], vocab[b] = vocab[b], vocab[a]
    (swapped / "tokenizer.json").write_text(json.dumps(table))
    line = _refused(served, tmp_path, **{"data.tokenizer": {"path": str(swapped)}})
    assert f"numbers its tokens otherwise than the run's ({swapped}): token id {vocab[b]} is" in line, line


def test_online_and_on_policy_against_the_server(served, tmp_path):
    data = write_jsonl(chat_rows(), tmp_path / "chat.jsonl")
    raw = _config(served, tmp_path / "run", **{"data.paths": [str(data)], "data.seq_len": 96,
                                              "train.mode": "online", "train.steps": 4})
    raw["train"]["on_policy"] = {"share": {"kind": "constant", "start": 0.5}, "max_new_tokens": 6}
    _ok(run_cli("train", "-c", _write(raw, tmp_path / "run.yaml")))
    rows = [json.loads(line) for line in (tmp_path / "run" / "students" / "dense" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if r.get("kind", "train") == "train"]
    assert len(steps) == 4
    kinds = {bool(r.get("on_policy")) for r in steps}
    assert kinds == {True, False}, "expected both on-policy and corpus steps"
    # every step, corpus or on-policy, was scored by the server: all tokens valid, and the random
    # teacher's nll of them near log V (its distributions are near uniform)
    vocab = len(json.loads((served["model"] / "tokenizer.json").read_text())["model"]["vocab"])
    assert all(r["teacher_nonfinite_tokens"] == 0 and abs(r["teacher_nll"] - math.log(vocab)) < 0.5 for r in steps), steps
    summary = json.loads((tmp_path / "run" / "train_summary.json").read_text())
    assert summary["teacher_forward_calls"] >= 4


def test_a_server_killed_mid_cache_resumes_to_the_same_bytes(served, tmp_path):
    # reference: an uninterrupted cache from the module's server
    ref_raw = _config(served, tmp_path / "ref", **{"cache.shard_sequences": 8, "cache.batch_size": 2})
    _ok(run_cli("cache", "-c", _write(ref_raw, tmp_path / "ref.yaml")))
    ref = tmp_path / "ref" / "cache"
    shards = json.loads((ref / "manifest.json").read_text())["splits"]["train"]["shards"]
    assert len(shards) >= 5, "too little data to kill the server mid-cache"

    port = vllm_server.free_port()
    log = tmp_path / "own-vllm.log"
    server = vllm_server.start(served["model"], NAME, log, port=port)
    raw = _config(served, tmp_path / "run", url=server.url, **{"cache.shard_sequences": 8, "cache.batch_size": 2})
    cfg_path = _write(raw, tmp_path / "run.yaml")
    manifest = tmp_path / "run" / "cache" / "manifest.json"
    proc = subprocess.Popen([sys.executable, str(ROOT / "cli.py"), "cache", "-c", cfg_path], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while True:  # kill the server once two shards are written
            done = json.loads(manifest.read_text())["splits"]["train"]["shards"] if manifest.exists() else []
            if len(done) >= 2 or proc.poll() is not None or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        vllm_server.stop(server)
        _, err = proc.communicate(timeout=300)
    finally:
        kill_group(proc)
    assert proc.returncode == 2, err[-2000:]
    lines = err.strip().splitlines()
    assert "cache shard train-r0-" in lines[-1] and server.url in lines[-1] and "failed 3 time(s)" in lines[-1], err
    partial = json.loads(manifest.read_text())
    assert not partial["complete"] and 2 <= len(partial["splits"]["train"]["shards"]) < len(shards)

    with vllm_server.running(served["model"], NAME, log, port=port):
        _ok(run_cli("cache", "-c", cfg_path))
    got = tmp_path / "run" / "cache"
    names = sorted(p.name for p in ref.iterdir() if not p.name.startswith(".lock"))  # a lock holds its writer's pid
    assert "manifest.json" in names and len(names) > len(shards)
    assert sorted(p.name for p in got.iterdir() if not p.name.startswith(".lock")) == names
    for name in names:
        assert (got / name).read_bytes() == (ref / name).read_bytes(), f"{name} differs from the uninterrupted cache"


def test_another_model_served_under_the_same_name_is_refused_on_resume(served, tmp_path):
    """A name says nothing of the weights: a cache or an online run begun with one model, resumed
    against a server that serves another under the same name, is refused (the handshake's probe,
    teachers/server.py), while the same model served again resumes (the kill/restart test).
    The other model's vocab is padded past the tokenizer: the cache made from it anyway marks the
    positions whose top-k holds a padded id, and goes on."""
    from students.build import load_causal_lm

    other = tmp_path / "other-teacher"
    shutil.copytree(served["model"], other)
    model = load_causal_lm(other)
    vocab = model.config.vocab_size
    # The same tokenizer; peaked distributions; and its vocab padded 8 rows past the tokenizer (as
    # Llama 4's and Qwen's are), rows a random model ranks in the top-k at some positions.
    model.resize_token_embeddings(vocab + 8, mean_resizing=False)
    with torch.no_grad():
        head = model.get_output_embeddings().weight  # (V + 8, H)
        head.mul_(20.0)
        head[vocab:] = torch.randn(8, head.shape[1], generator=torch.Generator().manual_seed(0)) * 2.0
    model.save_pretrained(other)
    cache_raw = _config(served, tmp_path / "run")
    online_raw = _config(served, tmp_path / "online", **{"train.mode": "online", "train.steps": 2,
                                                         "train.checkpoint_every": 1})
    _ok(run_cli("cache", "-c", _write(cache_raw, tmp_path / "cache.yaml")))
    _ok(run_cli("train", "-c", str(tmp_path / "cache.yaml")))  # cached mode: the server is not asked
    _ok(run_cli("train", "-c", _write(online_raw, tmp_path / "online.yaml")))
    cached = json.loads((tmp_path / "run" / "cache" / "manifest.json").read_text())["teacher_probe"]
    assert len(cached["ids"]) == 33 and len(cached["nll"]) == 32  # seq_len 32 + 1: the probe fits a block
    with vllm_server.running(other, NAME, tmp_path / "other-vllm.log") as server:
        for raw, cmd, what in ((cache_raw, ("cache",), "the cache at"), (online_raw, ("train", "--resume"), "the checkpoints at")):
            proc = run_cli(*cmd, "-c", _write(_served_by(raw, server.url), tmp_path / "other.yaml"))
            lines = proc.stderr.strip().splitlines()
            assert proc.returncode == 2 and len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
            assert f"teacher.server: '{NAME}' at {server.url} answers as another model than the one {what}" in lines[0]
            assert "teacher.server.drift_tolerance: 0.2" in lines[0], lines[0]
            assert ("serve the weights it began with" if cmd == ("cache",) else
                    "resume with the server serving the weights they learnt from") in lines[0], lines[0]
        # the cache made again from the other model: the cached run's checkpoints learnt from the first
        remade = _write(_served_by(cache_raw, server.url), tmp_path / "remade.yaml")
        made = _ok(run_cli("cache", "--overwrite", "-c", remade))
        # padded ids in a position's top-k leave it without a soft target (before: the run stopped)
        assert made.stderr.count(f"[teacher] the served model ranks token ids past the tokenizer's {vocab}") == 1
        counts = json.loads((tmp_path / "run" / "cache" / "manifest.json").read_text())["splits"]["train"]
        assert 0 < counts["nonfinite_tokens"] < counts["tokens"], counts
        proc = run_cli("train", "--resume", "-c", remade)
        assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
        assert (f"teacher.server: the cache's teacher ({tmp_path / 'run' / 'cache'}) answers as another model than the "
                f"one the checkpoints at") in proc.stderr, proc.stderr
        assert "resume with a cache made from the model they learnt from" in proc.stderr, proc.stderr
        # a run that raises the tolerance takes the other model knowingly
        loose = _served_by(online_raw, server.url, drift_tolerance=100.0)
        _ok(run_cli("train", "--resume", "-c", _write(loose, tmp_path / "loose.yaml")))


def _served_by(raw: dict, url: str, **server) -> dict:
    """raw with its teacher at another server url (and other teacher.server keys)."""
    return {**raw, "teacher": {**raw["teacher"], "server": {**raw["teacher"]["server"], "url": url, **server}}}


def test_prefetched_batches_are_scored_before_they_are_asked_for(served):
    from teachers import Batch
    from teachers.server import ServerTeacher
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(served["model"]))
    ids = tok.encode(served["texts"][0], add_special_tokens=False)[:66]
    blocks = torch.tensor([ids[:33], ids[33:66]])
    teacher = ServerTeacher(served["server"].url, NAME, 8, len(tok))
    batch = Batch.of(blocks, [5, 9])
    teacher.prefetch([batch])
    teacher._ahead[(5, 9)][1].result(timeout=120)  # the requests went out (and came back) before signal()
    sig, valid = teacher.signal(batch)
    assert (5, 9) not in teacher._ahead and teacher.forward_calls == 1
    fresh, _ = teacher.signal(batch)  # not prefetched: asked now
    assert torch.equal(sig.topk_ids, fresh.topk_ids) and torch.equal(sig.topk_logprobs, fresh.topk_logprobs)
    assert bool(valid.all()) and sig.topk_ids.shape == (2, 32, 8)
    teacher.close()
