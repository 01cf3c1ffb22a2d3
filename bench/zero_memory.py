"""Per-GPU memory of a student's model states under each ZeRO stage, for the published Scout and
Maverick shapes (students/presets.py PUBLISHED, counted by `param_counts`).

Model states of mixed-precision AdamW are 16 bytes per parameter (Rajbhandari et al. 2020, ZeRO,
sec. 3.1): 2 (bf16 weights) + 2 (bf16 grads) + 12 (fp32 master weights, Adam m and v).  With
P parameters on N data-parallel GPUs each GPU holds:
    DDP / ZeRO-0   16 P             (everything replicated)
    ZeRO-1          4 P + 12 P / N  (optimizer states partitioned)
    ZeRO-2          2 P + 14 P / N  (+ gradients partitioned)
    ZeRO-3         16 P / N         (+ weights partitioned; one layer gathered at a time on top)
Activations, the teacher signal and the chunked loss's (C, V) buffers come on top.

Usage:  python bench/zero_memory.py     # prints a Markdown table (GiB per GPU)
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from students.presets import PRESETS, PUBLISHED, param_counts  # noqa: E402

GiB = 1 << 30


def per_gpu_bytes(params: int, gpus: int) -> dict[str, float]:
    return {"ddp": 16 * params, "zero1": 4 * params + 12 * params / gpus,
            "zero2": 2 * params + 14 * params / gpus, "zero3": 16 * params / gpus}


def main() -> None:
    rows = ["| student | total params | GPUs | DDP | ZeRO-1 | ZeRO-2 | ZeRO-3 |", "|---|---|---|---|---|---|---|"]
    out = {}
    for name in ("scout", "maverick"):
        total, _active = param_counts(PRESETS[name](**PUBLISHED[name]))
        for gpus in (8, 16, 64):
            b = per_gpu_bytes(total, gpus)
            out[f"{name}/{gpus}"] = {k: round(v / GiB, 1) for k, v in b.items()}
            rows.append(f"| {name} | {total / 1e9:.1f} B | {gpus} | " + " | ".join(f"{v / GiB:,.0f}" for v in b.values())
                        + " |")
    print("\n".join(rows))
    print(json.dumps(out))


if __name__ == "__main__":
    main()
