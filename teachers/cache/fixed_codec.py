"""The fixed-width top-k encodings (`lossless`, `fp16`, `bf16`): bit-packed ids and one
value per entry.  Also the exact head of a sampled cache (sampled_codec.py)."""
from __future__ import annotations

import numpy as np
import torch

from teachers.cache.bits import id_bits, pack_fixed, unpack_fixed

Arrays = dict[str, np.ndarray]


def _rows(groups: np.ndarray | None, group: int, n: int) -> np.ndarray | slice:
    """Token rows of the selected groups (in the order given)."""
    if groups is None:
        return slice(0, n)
    g = np.asarray(groups, np.int64)
    return (g[:, None] * group + np.arange(group)).reshape(-1)


class FixedCodec:
    """Bit-packed ids + one value per entry at a fixed width, in the given rank order.

    value_dtype: "fp32" (lossless), "fp16" or "bf16".  16-bit values are stored as their
    raw uint16 bits (numpy has no bfloat16); rounding is torch's round-to-nearest-even,
    so encoding is deterministic, and decoding widens them exactly.
    """

    def __init__(self, name: str, value_dtype: str):
        self.name, self.value_dtype = name, value_dtype
        self.lossless = value_dtype == "fp32"
        self.signal = "topk"

    def encode(self, ids, logprobs, vocab_size, group=None) -> Arrays:
        ids = np.asarray(ids, np.int64)
        lp = torch.as_tensor(np.asarray(logprobs, np.float32))
        if ids.size and (ids.min() < 0 or ids.max() >= vocab_size):
            raise ValueError(f"ids outside [0, {vocab_size})")
        if self.value_dtype == "fp32":
            values = lp.numpy()
        else:
            dt = torch.float16 if self.value_dtype == "fp16" else torch.bfloat16
            values = lp.to(dt).view(torch.int16).numpy().view(np.uint16)
        return {"ids": pack_fixed(ids, id_bits(vocab_size)), "values": np.ascontiguousarray(values)}

    def decode(self, arrays, k, vocab_size, group, groups=None):
        rows = _rows(groups, group, arrays["values"].shape[0])
        ids = unpack_fixed(np.asarray(arrays["ids"][rows]), id_bits(vocab_size), k)
        raw = np.asarray(arrays["values"][rows])
        if self.value_dtype == "fp32":
            return ids, raw.astype(np.float32, copy=False)
        if self.value_dtype == "fp16":
            return ids, raw.view(np.float16).astype(np.float32)
        # bf16 is the top half of an fp32: widening is a shift, exact.
        return ids, (raw.astype(np.uint32) << np.uint32(16)).view(np.float32)
