"""Teacher-signal cache: fidelity, crash safety, corruption, identity, locking, ranks."""
from __future__ import annotations

import errno
import fcntl
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.numpy import load_file

import teachers.cache.writer as cache_mod
from teachers.cache import (CacheCorrupt, CacheLocked, CacheMismatch, CacheReader, CacheWriteError, describe_cache,
                            verify_cache, write_cache)
from losses.signal import TeacherSignal
from tests import _cache_worker as worker
from tests.conftest import spawn

K = worker.K


def _files(d: Path) -> dict[str, bytes]:
    """Shards and manifest by name (locks and per-rank manifests excluded)."""
    return {p.name: p.read_bytes() for p in sorted(d.iterdir())
            if p.name == "manifest.json" or p.name.endswith(".safetensors")}


def _shards(d: Path) -> list[Path]:
    return sorted(d.glob("*.safetensors"))


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """An uninterrupted single-process lossless cache of the worker's setup."""
    return worker.write(tmp_path_factory.mktemp("ref"))


@pytest.fixture(scope="module")
def sampled_reference(tmp_path_factory) -> Path:
    """The same, as a sampled cache (worker.SAMPLING)."""
    return worker.write(tmp_path_factory.mktemp("ref-sampled"), encoding="sampled")


def _all_signals(d: Path, split: str = "train") -> TeacherSignal:
    r = CacheReader(d, split)
    return r.signal(range(len(r)))


def test_lossless_equals_teacher_topk_in_any_order(reference):
    teacher_fn, splits, _ = worker.setup()
    for split in ("train", "val"):
        r = CacheReader(reference, split)
        assert len(r) == len(splits[split])
        idx = list(range(len(r)))[::-1][::2] + [0, 0]  # reversed, strided, repeated
        sig = r.signal(idx)
        ref = TeacherSignal.from_logits(teacher_fn(splits[split][idx]), K)
        assert sig.topk_ids.shape == (len(idx), worker.SEQ_LEN, K)
        assert torch.equal(sig.topk_ids, ref.topk_ids)
        assert torch.equal(sig.topk_logprobs, ref.topk_logprobs)
        assert r.read(idx)[1].all()


@pytest.mark.parametrize("encoding", ["fp16", "bf16", "compact"])
def test_lossy_encodings_match_at_stored_precision(tmp_path, encoding):
    worker.write(tmp_path, encoding=encoding)
    teacher_fn, splits, _ = worker.setup()
    sig = _all_signals(tmp_path)
    ref = TeacherSignal.from_logits(teacher_fn(splits["train"]), K)
    if encoding != "compact":
        dt = torch.float16 if encoding == "fp16" else torch.bfloat16
        assert torch.equal(sig.topk_ids, ref.topk_ids)
        assert torch.equal(sig.topk_logprobs, ref.topk_logprobs.to(dt).float())
    else:
        assert torch.equal(sig.topk_ids[..., 0], ref.topk_ids[..., 0])
        a, b = sig.topk_ids.sort(-1), ref.topk_ids.sort(-1)
        assert torch.equal(a.values, b.values)
        err = sig.topk_logprobs.gather(-1, a.indices) - ref.topk_logprobs.gather(-1, b.indices)
        assert err.abs().max() < 0.52
        assert torch.allclose(sig.tail_logprob().exp(), ref.tail_logprob().exp(), atol=2e-3)


def test_k_equal_vocab_reproduces_full_distribution(tmp_path):
    teacher_fn, splits, identity = worker.setup(n_train=5, n_val=1)
    write_cache(tmp_path, teacher_fn, splits, identity=identity, k=worker.VOCAB, progress=False)
    sig = CacheReader(tmp_path, "train").signal(range(5))
    full = torch.log_softmax(teacher_fn(splits["train"]).double(), -1)
    order = sig.topk_ids.argsort(-1)
    assert torch.equal(sig.topk_ids.gather(-1, order), torch.arange(worker.VOCAB).expand_as(order))
    torch.testing.assert_close(sig.topk_logprobs.gather(-1, order).double(), full, rtol=0, atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("encoding", ["lossless", "sampled"])
def test_kill9_then_rerun_is_byte_identical(tmp_path, encoding, request):
    reference = request.getfixturevalue("sampled_reference" if encoding == "sampled" else "reference")
    script = Path(worker.__file__)
    proc = subprocess.Popen([sys.executable, str(script), str(tmp_path), "--delay", "0.15", "--encoding", encoding],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 60
    try:
        while time.time() < deadline:
            try:
                m = json.loads((tmp_path / "manifest.json").read_text())
                if len(m["splits"]["train"]["shards"]) >= 2:
                    break
            except (FileNotFoundError, json.JSONDecodeError):
                pass
            assert proc.poll() is None, proc.stderr.read().decode()
            time.sleep(0.01)
        else:
            pytest.fail("worker never finished two shards")
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    m = json.loads((tmp_path / "manifest.json").read_text())
    assert not m["complete"] and 2 <= len(m["splits"]["train"]["shards"]) < 10
    worker.write(tmp_path, encoding=encoding)
    assert _files(tmp_path) == _files(reference)
    assert not [p for p in tmp_path.iterdir() if ".tmp." in p.name]


@pytest.mark.parametrize("encoding", ["lossless", "sampled"])
def test_flipped_byte_is_reported(tmp_path, encoding):
    worker.write(tmp_path, encoding=encoding)
    shard = _shards(tmp_path)[3]
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0x40
    shard.write_bytes(bytes(data))
    problems = verify_cache(tmp_path)
    assert len(problems) == 1 and shard.name in problems[0] and "sha256" in problems[0]
    with pytest.raises(CacheCorrupt, match=shard.name):
        CacheReader(tmp_path, "train", verify=True)
    CacheReader(tmp_path, "train")  # size still right: only verify=True reads the bytes
    # The real CLI's exit code: `distill inspect --verify && distill train` must not train on it.
    from tests.conftest import run_cli

    r = run_cli("inspect", str(tmp_path), "--verify")
    assert r.returncode == 1, (r.returncode, r.stdout, r.stderr)
    assert shard.name in r.stdout + r.stderr and "Traceback" not in r.stderr


def test_a_decoded_id_outside_the_vocabulary_names_the_shard(tmp_path, monkeypatch):
    """Reads skip the sha256 (verify checks it); ids a damaged shard decodes to past the
    vocabulary are said naming the shard, not left to fail as an index error in a loss."""
    worker.write(tmp_path)
    reader = CacheReader(tmp_path, "train")
    decode = reader.codec.decode

    def damaged(arrays, k, vocab, *args):
        ids, lps = decode(arrays, k, vocab, *args)
        ids[0, 0] = vocab + 6
        return ids, lps

    reader.read([0])  # intact
    monkeypatch.setattr(reader.codec, "decode", damaged)
    with pytest.raises(CacheCorrupt, match=rf"{reader.shards[0]['file']} decodes to teacher id {reader.vocab_size + 6}"):
        reader.read([0])


@pytest.mark.parametrize("damage", ["rice", "id_unary"])
def test_a_damaged_sampled_shard_is_named_when_read(tmp_path, damage):
    """Real bytes: a sampled shard's Rice parameters all set to 20 bits, or its unary quotients'
    first bytes zeroed (quotients that never end).  Either decode runs off the shard's buffers,
    an IndexError / ValueError from deep in the codec before; now one line naming the shard."""
    from teachers.cache.codec import safetensors_header

    worker.write(tmp_path, encoding="sampled")
    shard = _shards(tmp_path)[0]
    base, tensors, _ = safetensors_header(shard)
    _, _, start, end = tensors[damage]
    data = bytearray(shard.read_bytes())
    data[base + start: base + min(end, start + 8)] = bytes([20 if damage == "rice" else 0]) * min(end - start, 8)
    shard.write_bytes(bytes(data))
    split = shard.name.split("-r")[0]
    with pytest.raises(CacheCorrupt, match=rf"{shard.name} does not decode \((IndexError|ValueError): .*: the shard "
                                           rf"is damaged; `distill inspect .* --verify` checks every shard"):
        CacheReader(tmp_path, split).read([0])


def test_truncated_shard_raises(tmp_path):
    worker.write(tmp_path)
    shard = _shards(tmp_path)[0]
    shard.write_bytes(shard.read_bytes()[:-7])
    split = shard.name.split("-r")[0]
    with pytest.raises(CacheCorrupt, match=shard.name):
        CacheReader(tmp_path, split)
    assert any(shard.name in p for p in verify_cache(tmp_path))
    shard.unlink()
    with pytest.raises(CacheCorrupt, match="missing"):
        CacheReader(tmp_path, split)


def test_a_missing_or_truncated_shard_is_computed_again_by_the_next_cache_run(tmp_path, reference, capfd):
    """`distill cache` on a complete cache with a shard gone or cut short (what the reader's
    error tells the user to do) recomputes those shards, keeping the rest, and the cache is
    the uninterrupted one again; before, it returned at once and the error came back."""
    worker.write(tmp_path)
    shards = _shards(tmp_path)
    shards[0].unlink()
    shards[-1].write_bytes(shards[-1].read_bytes()[:-7])
    kept = {p.name: p.stat().st_mtime_ns for p in shards[1:-1]}
    worker.write(tmp_path)
    assert f"2 shard(s) of the cache at {tmp_path} are missing or have another size" in capfd.readouterr().err
    assert _files(tmp_path) == _files(reference)
    assert {p.name: p.stat().st_mtime_ns for p in shards[1:-1]} == kept  # the others were not rewritten
    assert verify_cache(tmp_path) == []


def test_identity_mismatch_refused_then_overwrite(tmp_path):
    teacher_fn, splits, identity = worker.setup()
    write_cache(tmp_path, teacher_fn, splits, identity=identity, k=K, shard_sequences=8, progress=False)
    before = _files(tmp_path)
    with pytest.raises(CacheMismatch) as e:
        write_cache(tmp_path, teacher_fn, splits, identity=dict(identity, tokenizer_hash="tok2"), k=K + 1,
                    progress=False)
    msg = str(e.value)
    assert "tokenizer_hash: 'tok' (cache) vs 'tok2'" in msg and "k: '16' (cache) vs '17'" in msg
    assert "overwrite" in msg and "teacher_weights_hash" not in msg
    with pytest.raises(CacheMismatch, match="splits"):
        write_cache(tmp_path, teacher_fn, {"train": splits["train"]}, identity=identity, k=K, progress=False)
    assert _files(tmp_path) == before, "a refused write must not touch the cache"
    with pytest.raises(CacheMismatch, match="data_fingerprint"):
        CacheReader(tmp_path, "train").check_identity(dict(identity, data_fingerprint="other"))
    CacheReader(tmp_path, "train").check_identity(dict(identity, k=K))
    write_cache(tmp_path, teacher_fn, splits, identity=dict(identity, tokenizer_hash="tok2"), k=K + 1,
                shard_sequences=8, overwrite=True, progress=False)
    r = CacheReader(tmp_path, "train", verify=True)
    assert r.manifest["identity"]["tokenizer_hash"] == "tok2" and r.signal([0]).k == K + 1
    assert verify_cache(tmp_path) == []


def test_a_cache_made_before_the_blocks_digest_was_recorded_still_matches(tmp_path):
    """`data_content` (what the prepared blocks hold) joined the identity later: a cache without
    it is still read and resumed; one with it must match."""
    teacher_fn, splits, identity = worker.setup()
    assert "data_content" not in identity
    write_cache(tmp_path / "old", teacher_fn, splits, identity=identity, k=K, shard_sequences=8, progress=False)
    now = dict(identity, data_content="abcd")
    CacheReader(tmp_path / "old", "train").check_identity(now)  # read as before
    write_cache(tmp_path / "old", teacher_fn, splits, identity=now, k=K, shard_sequences=8, progress=False)  # reused
    write_cache(tmp_path / "new", teacher_fn, splits, identity=now, k=K, shard_sequences=8, progress=False)
    with pytest.raises(CacheMismatch, match="data_content: 'abcd' \\(cache\\) vs 'efgh'"):
        CacheReader(tmp_path / "new", "train").check_identity(dict(now, data_content="efgh"))
    with pytest.raises(CacheMismatch, match="data_content"):
        write_cache(tmp_path / "new", teacher_fn, splits, identity=dict(now, data_content="efgh"), k=K, progress=False)


def test_complete_cache_rerun_is_a_noop(tmp_path):
    worker.write(tmp_path)
    stamps = {p.name: p.stat().st_mtime_ns for p in tmp_path.iterdir()}
    worker.write(tmp_path, delay=10.0)  # would take minutes if the teacher ran
    assert {p.name: p.stat().st_mtime_ns for p in tmp_path.iterdir() if p.name != ".lock"} == \
        {n: t for n, t in stamps.items() if n != ".lock"}


def test_second_writer_is_refused_by_lock(tmp_path):
    fd = os.open(tmp_path / ".lock", os.O_RDWR | os.O_CREAT)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.write(fd, b"4242")
        with pytest.raises(CacheLocked, match="another process.*4242"):
            worker.write(tmp_path)
    finally:
        os.close(fd)
    assert not _shards(tmp_path)
    worker.write(tmp_path)  # lock released -> fine


def test_disk_full_keeps_previous_state_then_resumes(tmp_path, reference, monkeypatch):
    calls = {"n": 0}
    real = cache_mod._write_all

    def flaky(f, data):
        calls["n"] += 1
        if calls["n"] == 5:  # shard, manifest, shard, manifest, then the 3rd shard
            raise OSError(errno.ENOSPC, "No space left on device")
        real(f, data)

    monkeypatch.setattr(cache_mod, "_write_all", flaky)
    with pytest.raises(CacheWriteError, match="train-r0-s000000008.safetensors") as e:  # sequences 8-11
        worker.write(tmp_path)
    assert e.value.errno == errno.ENOSPC
    m = json.loads((tmp_path / "manifest.json").read_text())
    assert [s["file"] for s in m["splits"]["train"]["shards"]] == ["train-r0-s000000000.safetensors",
                                                                   "train-r0-s000000004.safetensors"]
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith(".")) == [
        "manifest.json", "train-r0-s000000000.safetensors", "train-r0-s000000004.safetensors"]
    assert _files(tmp_path)["train-r0-s000000004.safetensors"] == _files(reference)["train-r0-s000000004.safetensors"]
    # `inspect` of the incomplete cache: bytes per block over the 8 sequences written (was: over all 43)
    assert describe_cache(tmp_path)["bytes_per_block"] == sum(len(b) for n, b in _files(tmp_path).items()
                                                             if n.endswith(".safetensors")) / 8
    monkeypatch.setattr(cache_mod, "_write_all", real)
    worker.write(tmp_path)
    assert _files(tmp_path) == _files(reference)


def test_nonfinite_logits_are_counted_and_masked(tmp_path):
    teacher_fn, splits, identity = worker.setup()

    def broken(x):
        out = teacher_fn(x).clone()
        out[x == 7] = float("nan")  # whole row NaN
        out[..., 5][x == 11] = float("inf")
        return out

    write_cache(tmp_path, broken, splits, identity=identity, k=K, shard_sequences=5, progress=False)
    tokens = splits["train"]
    bad = (tokens == 7) | (tokens == 11)
    assert bad.any()
    r = CacheReader(tmp_path, "train")
    assert r.manifest["splits"]["train"]["nonfinite_tokens"] == int(bad.sum())
    assert torch.equal(r.read(range(len(r)))[1], ~bad)
    sig = r.signal(range(len(r)))
    assert torch.equal(sig.topk_ids[bad], torch.arange(K).expand(int(bad.sum()), K))
    assert torch.isfinite(sig.topk_logprobs).all()
    ref = TeacherSignal.from_logits(teacher_fn(tokens), K)
    assert torch.equal(sig.topk_logprobs[~bad], ref.topk_logprobs[~bad])


def test_describe_cache(reference):
    d = describe_cache(reference)
    files = _shards(reference)
    tokens = (37 + 6) * worker.SEQ_LEN
    assert d["shards"] == len(files) == 10 + 2 and d["k"] == K and d["encoding"] == "lossless"
    assert d["bytes_per_token"] == sum(p.stat().st_size for p in files) / tokens
    assert d["complete"] and d["splits"]["train"]["sequences"] == 37


def test_ranks_without_torch_distributed_merge(tmp_path, reference):
    """Ranks run one after the other; the last to finish merges the manifests."""
    worker.write(tmp_path, rank=1, world_size=2)
    assert not (tmp_path / "manifest.json").exists()
    worker.write(tmp_path, rank=0, world_size=2)
    assert torch.equal(_all_signals(tmp_path).topk_logprobs, _all_signals(reference).topk_logprobs)
    assert verify_cache(tmp_path) == []


def test_ranks_that_computed_other_caches_are_not_merged_into_one(tmp_path):
    """Two ranks run with other settings (a node given another --set) each finished a half,
    at the same time, so neither saw the other's manifest before it worked.  The merge took
    rank 0's k for both, `inspect --verify` said ok and training read garbage ids from rank
    1's shards ("the shard is damaged").  Now the merge refuses, naming what differs, and
    `--verify` names shards written with settings other than the manifest's."""
    from teachers.cache.format import CacheMismatch
    from teachers.cache.writer import _merge

    worker.write(tmp_path / "a", rank=0, world_size=2)
    worker.write(tmp_path / "b", rank=1, world_size=2, k=K + 2)
    for f in (tmp_path / "b").iterdir():  # both halves in one dir, as on a shared disk
        if f.name.startswith(("manifest.r1", "train-r1", "val-r1")):
            shutil.copy(f, tmp_path / "a" / f.name)
    with pytest.raises(CacheMismatch, match=rf"its ranks computed different caches \(.*k: {K} \(rank 0\) vs {K + 2} \(rank 1\)"):
        _merge(tmp_path / "a", 2, cleanup=False)
    assert not (tmp_path / "a" / "manifest.json").exists()


@pytest.mark.slow
def test_ranks_writing_where_rank_0_cannot_read_are_refused_at_the_merge(tmp_path):
    """Ranks whose cache dirs are not one (node-local disks: `distill cache` checks that first,
    tests/test_data_parallel.py; this is the writer's own guard): rank 0's merge found rank 1's
    manifest missing and every rank returned as if done, leaving no manifest.json.  Now rank 0
    names what it cannot see and the others say it could not merge; its shards are kept."""
    spawn(worker.split_dirs_worker, (2, str(tmp_path / "init"), str(tmp_path)))
    rank0, rank1 = ((tmp_path / f"outcome.r{r}").read_text() for r in range(2))
    assert rank0.startswith("CacheWriteError: cache at ") and "rank 0 does not see the finished manifest.r1.json" in rank0
    assert rank1.startswith("CacheWriteError: ") and "rank 0 could not merge the per-rank manifests" in rank1
    assert list((tmp_path / "node0").glob("train-r0-*.safetensors")) and not (tmp_path / "node0" / "manifest.json").exists()


def test_verify_names_a_shard_written_with_other_settings_than_the_manifests(tmp_path):
    cache = worker.write(tmp_path / "c")
    manifest = json.loads((cache / "manifest.json").read_text())
    manifest["k"] = K + 2
    (cache / "manifest.json").write_text(json.dumps(manifest))
    problems = verify_cache(cache)
    assert problems and all(f"written with k {K} (manifest: {K + 2})" in p for p in problems), problems
    from tests.conftest import run_cli

    r = run_cli("inspect", str(cache), "--verify")
    assert r.returncode == 1 and f"written with k {K} (manifest: {K + 2})" in " ".join(r.stdout.split()), r.stdout
    assert "Traceback" not in r.stderr


def test_verify_names_a_shard_whose_header_safetensors_refuses(tmp_path):
    """A digit of a tensor's offsets edited in a shard's header (the JSON still valid, the size the
    same): `inspect --verify` read its metadata with safetensors, which refuses such a header, and
    crashed with its traceback; now the shard is named, exit 1."""
    cache = worker.write(tmp_path / "c")
    shard = _shards(cache)[0]
    data = bytearray(shard.read_bytes())
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + n])
    tensors = sorted((v["data_offsets"], k) for k, v in header.items() if k != "__metadata__" and v["data_offsets"][1])
    (start, end), name = tensors[0]  # the first in the data, not the last: the file's size still accounted for
    assert len(tensors) > 1 and end > start + 1
    text = data[8:8 + n].decode()
    edited = text.replace(f'"data_offsets":[{start},{end}]', f'"data_offsets":[{start},{end - 1}]', 1)
    assert edited != text and len(edited) == len(text) - (len(str(end)) - len(str(end - 1)))
    edited = edited + " " * (n - len(edited))  # the same header length
    shard.write_bytes(bytes(data[:8]) + edited.encode() + bytes(data[8 + n:]))
    from tests.conftest import run_cli

    r = run_cli("inspect", str(cache), "--verify")
    assert r.returncode == 1 and "Traceback" not in r.stderr, (r.stdout, r.stderr[-2000:])
    assert f"shard {shard.name}: unreadable header" in " ".join(r.stdout.split()), r.stdout


@pytest.mark.slow
@pytest.mark.parametrize("encoding", ["lossless", "compact", "sampled"])
def test_two_gloo_processes_match_one(tmp_path, encoding):
    one = worker.write(tmp_path / "one", encoding=encoding)
    two = tmp_path / "two"
    spawn(worker.dist_worker, (2, str(tmp_path / "init"), str(two), encoding))
    assert verify_cache(two) == []
    m = json.loads((two / "manifest.json").read_text())
    assert {e["file"].split("-")[1] for e in m["splits"]["train"]["shards"]} == {"r0", "r1"}
    for split in ("train", "val"):
        a, b = _all_signals(one, split), _all_signals(two, split)
        assert torch.equal(a.topk_ids, b.topk_ids) and torch.equal(a.topk_logprobs, b.topk_logprobs)


@pytest.mark.slow
def test_lockstep_ranks_call_a_collective_teacher_equally_often(tmp_path, reference):
    """37 train + 6 val blocks over 2 ranks: rank 0 has 18+3, rank 1 has 19+3 blocks, so
    rank 0 runs one padding batch.  Then a resume where only rank 1 has work left."""
    cache = tmp_path / "c"
    run = lambda tag: spawn(worker.lockstep_worker, (2, str(tmp_path / f"init{tag}"), str(cache)))
    run("a")
    assert [(cache / f"outcome.r{r}").read_text() for r in (0, 1)] == ["ok", "ok"]
    calls = [int((cache / f"calls.r{r}").read_text()) for r in (0, 1)]
    assert calls[0] == calls[1] == 10 + 2  # rank 1: 5+5 train shards' batches of 2 (4+4+4+4+3), 2 val batches
    for split in ("train", "val"):
        a, b = _all_signals(reference, split), _all_signals(cache, split)
        assert torch.equal(a.topk_ids, b.topk_ids) and torch.equal(a.topk_logprobs, b.topk_logprobs)
    assert not list(cache.glob("manifest.r*.json"))  # merged, then removed
    last = json.loads((cache / "manifest.json").read_text())["splits"]["train"]["shards"][-1]["file"]
    (cache / last).unlink()  # rank 1's last train shard (3 blocks = 2 batches) is lost
    run("b")
    assert [int((cache / f"calls.r{r}").read_text()) for r in (0, 1)] == [2, 2]
    assert verify_cache(cache) == []
    assert torch.equal(_all_signals(cache).topk_logprobs, _all_signals(reference).topk_logprobs)


def test_a_cache_stopped_on_two_ranks_resumes_on_one_keeping_their_shards(tmp_path, reference):
    """A cache job preempted on 8 GPUs and restarted on 4 (2 and 1 here): it started from zero,
    silently, and left the per-rank manifests behind.  Now every finished shard of the earlier
    run is kept (by sequence range, whoever wrote it), the rest is computed in shards that end
    where a kept one starts, and the per-rank manifests go once the cache is complete."""
    cache = tmp_path / "c"
    spawn(worker.lockstep_worker, (2, str(tmp_path / "init"), str(cache), 0))  # rank 0 stops after 1 shard
    assert (cache / "outcome.r0").read_text().startswith("CacheWriteError")
    assert sorted(p.name for p in cache.glob("manifest.r*.json")) == ["manifest.r0.json", "manifest.r1.json"]
    teacher_fn, splits, identity = worker.setup()
    calls = []

    def counting(x):
        calls.append(x.shape[0])
        return teacher_fn(x)

    cache_mod.write_cache(cache, counting, splits, identity=identity, k=worker.K, batch_size=2, shard_sequences=4,
                          progress=False)
    # Kept: rank 0's train [0, 4), rank 1's train [18, 37) and val [3, 6).  Computed: train
    # [4, 8) [8, 12) [12, 16) [16, 18) and val [0, 3), in batches of 2: 7 + 2 calls (22 from nothing).
    assert sum(calls) == 14 + 3 and len(calls) == 9, calls
    assert verify_cache(cache) == [] and not list(cache.glob("manifest.r*.json"))
    m = json.loads((cache / "manifest.json").read_text())
    listed = {e["file"] for split in m["splits"].values() for e in split["shards"]}
    assert listed == {p.name for p in cache.glob("*.safetensors")}  # nothing left over
    assert [e["sequences"] for e in m["splits"]["train"]["shards"]][:5] == [[0, 4], [4, 8], [8, 12], [12, 16], [16, 18]]
    for split in ("train", "val"):
        a, b = _all_signals(reference, split), _all_signals(cache, split)
        assert torch.equal(a.topk_ids, b.topk_ids) and torch.equal(a.topk_logprobs, b.topk_logprobs)


@pytest.mark.slow
def test_lockstep_rank_with_full_disk_fails_both_ranks_cleanly(tmp_path):
    """Rank 0's disk fills after its first shard: it keeps making its collective calls, then
    both ranks stop with an error (no hang), and a rerun completes the cache."""
    cache = tmp_path / "c"
    spawn(worker.lockstep_worker, (2, str(tmp_path / "init"), str(cache), 0))
    outcomes = [(cache / f"outcome.r{r}").read_text() for r in (0, 1)]
    assert outcomes[0].startswith("CacheWriteError") and "No space left" in outcomes[0], outcomes
    assert outcomes[1].startswith("RuntimeError: another rank failed"), outcomes
    assert [int((cache / f"calls.r{r}").read_text()) for r in (0, 1)] == [12, 12]
    spawn(worker.lockstep_worker, (2, str(tmp_path / "init2"), str(cache)))
    assert verify_cache(cache) == []


def test_shards_are_plain_safetensors(reference, tmp_path):
    from safetensors.numpy import load_file

    for shard in _shards(reference)[:2]:
        arrays = load_file(shard)
        assert arrays["values"].shape == (4 * worker.SEQ_LEN, K) and arrays["invalid"].shape == (0,)
    worker.write(tmp_path, encoding="compact")
    assert "offsets" in load_file(_shards(tmp_path)[0])


def test_empty_split_and_out_of_range(tmp_path):
    teacher_fn, splits, identity = worker.setup()
    splits["val"] = splits["val"][:0]
    write_cache(tmp_path, teacher_fn, splits, identity=identity, k=K, progress=False)
    r = CacheReader(tmp_path, "val")
    assert len(r) == 0 and r.signal([]).topk_ids.shape == (0, worker.SEQ_LEN, K)
    with pytest.raises(IndexError):
        CacheReader(tmp_path, "train").signal([37])
    with pytest.raises(KeyError, match="test"):
        CacheReader(tmp_path, "test")


def test_sampled_cache_holds_the_teachers_draws(sampled_reference):
    """What the reader returns equals drawing from the teacher's logits directly with the
    same seed and keys, in any order of sequences; and a sampled cache is refused by a
    reader asked for another estimator's identity."""
    from losses.signal import sample_signal

    teacher_fn, splits, _ = worker.setup()
    s = worker.SAMPLING
    for split in ("train", "val"):
        r = CacheReader(sampled_reference, split)
        idx = list(range(len(r)))[::-1][::2]
        sig, valid = r.read(idx)
        ref = sample_signal(teacher_fn(splits[split][idx]), s.n, s.temperature, s.seed,
                            s.keys(split, idx, worker.SEQ_LEN))
        assert sig.kind == "sampled" and sig.temperature == s.temperature and valid.all()
        assert torch.equal(sig.topk_ids, ref.topk_ids[..., :sig.k]) and torch.equal(sig.topk_logprobs, ref.topk_logprobs[..., :sig.k])
        assert (ref.topk_logprobs[..., sig.k:] == float("-inf")).all()  # only padding trimmed
        torch.testing.assert_close(sig.entropy, ref.entropy, atol=5e-3, rtol=1e-3)  # stored as fp16
    assert describe_cache(sampled_reference)["estimator"] == "sampled (n=16, T=2)"
    with pytest.raises(CacheMismatch, match="estimator"):
        CacheReader(sampled_reference, "train").check_identity({"estimator": "topk"})


def test_a_sampled_cache_with_an_exact_head_holds_the_teachers_signal(tmp_path):
    """cache.exact_top: the reader returns what `sample_signal(..., exact_top=h)` gives on the
    teacher's logits (head most likely first, then the draws), bitwise; the manifest's k is
    the width h + n, and the identity names h (so a run asking for another h is refused).
    Also where a row has fewer finite logits than the head, or no mass outside it: the weights
    still sum to 1, only ids of finite logits weigh anything, and the reader keeps every entry."""
    from dataclasses import replace

    from losses.signal import sample_signal

    s = replace(worker.SAMPLING, exact_top=5)
    teacher_fn, splits, identity = worker.setup()

    def masked(x):  # (B, T) -> (B, T, V): token 0's rows keep 3 finite logits, token 1's put all mass on one
        logits = teacher_fn(x).clone()
        logits[..., 3:][x == 0] = float("-inf")
        logits[..., 0][x == 1] = 500.0
        return logits

    splits = {name: t.clone() for name, t in splits.items()}
    splits["train"][:3, ::2], splits["train"][:3, 1::2] = 0, 1
    splits["train"][3] = 0  # read alone below: every row's head holds -inf entries before its draw
    write_cache(tmp_path, lambda x, keys: masked(x), splits, identity=identity, k=worker.K, batch_size=2,
                shard_sequences=4, progress=False, encoding="sampled", sampling=s)
    for split in ("train", "val"):
        r = CacheReader(tmp_path, split)
        for idx in (list(range(len(r)))[::-1][::2], [3]):
            sig, valid = r.read(idx)
            ref = sample_signal(masked(splits[split][idx]), s.n, s.temperature, s.seed,
                                s.keys(split, idx, worker.SEQ_LEN), exact_top=5)
            assert r.k == 21 and sig.kind == "sampled" and valid.all()
            assert torch.equal(sig.topk_ids, ref.topk_ids[..., :sig.k]) and torch.equal(sig.topk_logprobs, ref.topk_logprobs[..., :sig.k])
            assert (ref.topk_logprobs[..., sig.k:] == float("-inf")).all()
            weights = sig.topk_logprobs.double().exp()
            torch.testing.assert_close(weights.sum(-1), torch.ones_like(weights[..., 0]), rtol=1e-5, atol=1e-5)
            logit_at = masked(splits[split][idx]).gather(-1, sig.topk_ids)  # every weighted id has a finite logit
            assert torch.isfinite(logit_at[weights > 0]).all()
    assert json.loads((tmp_path / "manifest.json").read_text())["format_version"] == 3  # older readers refuse it
    assert describe_cache(tmp_path)["estimator"] == "sampled (n=16, T=2, the exact top 5)"
    with pytest.raises(CacheMismatch, match="sample_exact_top"):
        CacheReader(tmp_path, "train").check_identity({**CacheReader(tmp_path, "train").manifest["identity"],
                                                       "sample_exact_top": "8"})


def test_prefetched_reads_equal_direct_reads(reference):
    """CachedTeacher decodes announced batches in background threads; what signal() then
    returns is what a direct read gives, and unannounced batches still read on demand."""
    from teachers import Batch, CachedTeacher

    teacher = CachedTeacher(reference, "train", workers=2)
    batches = [Batch(list(range(i, i + 5)), torch.zeros(5, 1), torch.zeros(5, 1)) for i in range(0, 30, 5)]
    teacher.prefetch(batches[:4])
    assert len(teacher._pending) == 4
    for b in batches:
        sig, valid = teacher.signal(b)
        ref_sig, ref_valid = CacheReader(reference, "train").read(b.indices)
        assert torch.equal(sig.topk_ids, ref_sig.topk_ids) and torch.equal(sig.topk_logprobs, ref_sig.topk_logprobs)
        assert torch.equal(valid, ref_valid)
    assert not teacher._pending and teacher.reads == 6


def _prompt_targets(splits: dict) -> dict:
    """Per split (N, T) next tokens, chat-like: a prompt of varied length (no training target)
    opens each sequence, and sequence 1 has no target at all."""
    from teachers import untrained

    out = {}
    for split, x in splits.items():
        t = x.clone()
        for i in range(len(t)):
            t[i, : (5 * i + 3) % t.shape[1]] = untrained(t[i, : (5 * i + 3) % t.shape[1]])
        if len(t) > 1:
            t[1] = untrained(t[1])
        out[split] = t
    return out


@pytest.mark.parametrize("encoding", ["lossless", "fp16", "compact", "sampled"])
def test_only_training_targets_are_stored_and_read_back_as_a_full_cache_reads_them(tmp_path, encoding):
    """Given the targets, shards hold the signal at training targets only; read in any order,
    those positions equal a cache of every position, the others are placeholders (valid, no
    mass a loss could read), and the files are smaller by about the prompts' share."""
    teacher_fn, splits, _ = worker.setup()
    targets = _prompt_targets(splits)
    full = worker.write(tmp_path / "full", encoding=encoding)
    part = worker.write(tmp_path / "part", encoding=encoding, targets=targets)
    assert verify_cache(part) == []
    for split in ("train", "val"):
        rf, rp = CacheReader(full, split), CacheReader(part, split)
        idx = list(range(len(rf)))[::-1] + [1, 0]  # reversed, with the no-target sequence again
        (sf, vf), (sp, vp) = rf.read(idx), rp.read(idx)
        trained = targets[split][idx] >= 0  # (B, T)
        assert trained.any() and not trained.all()
        lf, lp = sf.topk_logprobs[trained], sp.topk_logprobs[trained]
        width = max(lf.shape[-1], lp.shape[-1])  # sampled: the widest token of the batch
        lf = torch.nn.functional.pad(lf, (0, width - lf.shape[-1]), value=float("-inf"))
        lp = torch.nn.functional.pad(lp, (0, width - lp.shape[-1]), value=float("-inf"))
        assert torch.equal(lf, lp)
        drawn = lf > float("-inf")
        assert torch.equal(sf.topk_ids[trained][drawn[:, :sf.k]], sp.topk_ids[trained][drawn[:, :sp.k]])
        assert torch.equal(vf[trained], vp[trained]) and vp[~trained].all()
        if encoding == "sampled":  # one id at frequency 1
            assert torch.equal(sp.topk_logprobs[~trained][:, 0], torch.zeros(int((~trained).sum())))
        else:  # ids 0..k-1 at -log V, as for a non-finite teacher token
            assert torch.equal(sp.topk_ids[~trained], torch.arange(K).expand(int((~trained).sum()), K))
            assert torch.allclose(sp.topk_logprobs[~trained], torch.tensor(-math.log(worker.VOCAB)))
        if encoding == "sampled":
            assert torch.equal(sf.entropy[trained], sp.entropy[trained])
            assert torch.isnan(sp.difficulty[~trained]).all() and torch.isfinite(sp.difficulty[trained]).all()
    d_full, d_part = describe_cache(full), describe_cache(part)
    stored = sum(int((t >= 0).sum()) for t in targets.values())
    assert d_part["stored_tokens"] == stored < d_full["stored_tokens"] == d_full["tokens"] == d_part["tokens"]
    assert d_part["stored_positions"] == "targets" and d_full["stored_positions"] == "all"
    # The signal's arrays shrink with the encoded rows: the stored tokens, padded per sequence
    # to whole groups (the difficulty statistics and the position bits come on top).
    rows = sum(e["rows"] for s in json.loads((part / "manifest.json").read_text())["splits"].values() for e in s["shards"])
    assert stored <= rows < stored + len(splits["train"]) * worker.SEQ_LEN
    signal_bytes = {d: sum(a.nbytes for p in _shards(d) for name, a in load_file(p).items()
                           if name not in ("stored", "token_stats", "sequence_stats", "invalid"))
                    for d in (full, part)}
    assert signal_bytes[part] < signal_bytes[full] * rows / d_full["tokens"] * 1.1 + 64 * len(_shards(part))
