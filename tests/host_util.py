"""The JavaScript hosts' batch sampling replayed in Python (hosts/common/samplers.mjs), so the
host tests can run the same batches through the Python runtimes."""

from __future__ import annotations

import numpy as np


def mulberry32(seed: int):
    """The hosts' PRNG (hosts/common/samplers.mjs), in Python: floats in [0, 1)."""
    a = seed & 0xFFFFFFFF
    m = 0xFFFFFFFF

    def nxt() -> float:
        nonlocal a
        a = (a + 0x6D2B79F5) & m
        x = a
        x = ((x ^ (x >> 15)) * (x | 1)) & m
        x = (x ^ ((x + ((x ^ (x >> 7)) * (x | 61))) & m)) & m
        return ((x ^ (x >> 14)) & m) / 4294967296

    return nxt


def window_batches(ids, batch: int, seq: int, seed: int, n: int):
    """The n batches byteSampler / tokenSampler draw from token ids (a text's bytes, or a
    tokenizer's ids of it): (tokens, positions, labels), each int64 (batch, seq)."""
    arr = np.asarray(ids, dtype=np.int64)
    rand, high = mulberry32(seed), len(arr) - seq
    out = []
    for _ in range(n):
        offs = [int(rand() * high) for _ in range(batch)]
        win = np.stack([arr[o: o + seq + 1] for o in offs])
        out.append((win[:, :-1].copy(), np.broadcast_to(np.arange(seq, dtype=np.int64), (batch, seq)).copy(), win[:, 1:].copy()))
    return out
