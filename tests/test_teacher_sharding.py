"""teacher.sharding=zero3: the teacher split over 2 CPU processes caches what one unsharded process does."""
import re

import pytest
import torch

from teachers.cache.reader import CacheReader, verify_cache
from tests.conftest import run_cli, run_deepspeed_cli

pytestmark = pytest.mark.slow


# A few hundred blocks, not the setup's 512: the ranks' per-layer gathers make every sharded step
# slow on CPU.  Odd counts, so the ranks' shares differ by one (151 / 150 and 16 / 15 blocks, in
# batches of 3): one rank runs a padding forward through the gathers for the other's last batch.
SOME_BLOCKS = ("--set", "data.max_train_blocks=301", "--set", "data.max_val_blocks=31")


def test_zero3_sharded_teacher_caches_the_same_signal(online_setup):
    work, cfg = online_setup
    single = run_cli("cache", "-c", str(cfg), "--quiet", "--set", f"out_dir={work / 'z3-single'}", *SOME_BLOCKS)
    assert single.returncode == 0, single.stderr[-3000:]
    r = run_deepspeed_cli("cache", "-c", str(cfg), "--set", f"out_dir={work / 'z3'}", "--set", "teacher.sharding=zero3",
                          "--set", "cache.batch_size=3", *SOME_BLOCKS)
    assert r.returncode == 0, (r.stdout[-3000:], r.stderr[-3000:])
    assert r.shm_left == [], "each rank removes its DeepSpeed shared-memory buffer at exit"

    # Each rank stores about half of the teacher's weights (ZeRO pads partitions slightly).
    shares = re.findall(r"rank (\d) holds ([\d,]+) of ([\d,]+) weights", r.stdout + r.stderr)
    assert sorted(s[0] for s in shares) == ["0", "1"], r.stdout[-2000:]
    for _, local, total in shares:
        local, total = int(local.replace(",", "")), int(total.replace(",", ""))
        assert total / 2 <= local <= total / 2 + 64, (local, total)

    one, two = work / "z3-single" / "cache", work / "z3" / "cache"
    assert verify_cache(two) == []
    for split in ("train", "val"):
        a, b = CacheReader(one, split), CacheReader(two, split)
        assert len(a) == len(b) == {"train": 301, "val": 31}[split]
        sa, sb = a.signal(range(len(a))), b.signal(range(len(b)))
        assert torch.equal(sa.topk_ids[..., :4], sb.topk_ids[..., :4])
        torch.testing.assert_close(sa.topk_logprobs, sb.topk_logprobs, rtol=0, atol=1e-5)


def test_zero3_teacher_refused_for_online_training(online_setup):
    work, cfg = online_setup
    r = run_cli("train", "-c", str(cfg), "--set", f"out_dir={work / 'z3-online'}", "--set", "teacher.sharding=zero3")
    assert r.returncode == 2
    assert "teacher.sharding=zero3 works with `distill cache` only" in r.stderr
    assert "Traceback" not in r.stderr
    assert not any((work / "z3-online").glob("**/*")), "refused before writing anything"
