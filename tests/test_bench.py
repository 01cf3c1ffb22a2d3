"""The cache benchmark runs end to end and prints one JSON object (figures are not asserted: no timed tests)."""
import json
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
    step = out["teacher_step"]
    assert {"full", "chunked"} <= set(step) and step["chunked"]["peak_rss_mb"] > 0


def test_readme_memory_table_is_what_the_formula_gives():
    """README's per-GPU ZeRO table is bench/zero_memory.py's output (param_counts of PUBLISHED)."""
    r = subprocess.run([sys.executable, str(ROOT / "bench" / "zero_memory.py")], cwd=ROOT, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    readme = (ROOT / "README.md").read_text()
    rows = [line for line in r.stdout.splitlines() if line.startswith("| scout") or line.startswith("| maverick")]
    assert len(rows) == 6 and all(row in readme for row in rows), rows
