"""`runtimes train`'s sample at the end of a run (runtimes/train.py sample_text): decoder.onnx's
key/value cache, refilled from the last half context when the sequence fills the context, decoded
by the folder's tokenizer. Held to forward.onnx recomputing every token's logits on the same
window (runtimes' `logits`), with the same draws."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

import runtimes
from runtimes.sample import pick
from runtimes.train import sample_text


def forward_oracle(rt, prompt: list[int], n: int, temperature: float, seed: int, limit: int) -> list[int]:
    """The ids sample_text must give, each from forward.onnx on the whole window the cache holds:
    the sequence since the window's start, which moves to the last half context once a full
    window has produced a token."""
    ctx, keep = rt.art.config["context"], rt.art.config["context"] // 2
    rng, seq = np.random.default_rng(seed), list(prompt)
    start = max(0, len(seq) - ctx)
    for _ in range(n):
        window = np.array(seq[start:], np.int64)[None]  # (1, <= context)
        logits = rt.logits(window, np.arange(window.shape[1], dtype=np.int64)[None])[0, -1]
        seq.append(pick(logits[:limit], temperature, 0, 1.0, rng))
        if window.shape[1] == ctx:
            start = len(seq) - keep
    return seq[len(prompt):]


@pytest.mark.parametrize("folder", ["tiny_index", "tiny_hf"])
def test_sample_uses_the_cache_and_matches_forward(folder, request, monkeypatch):
    """150 tokens on a context of 64 (bytes) or 32 (BPE): the cache is refilled several times."""
    from runtimes.artifacts import load_artifacts
    from runtimes.tokenizer import load_tokenizer

    art = request.getfixturevalue(folder)
    rt = runtimes.load(art, runtime="ort")
    tok = load_tokenizer(load_artifacts(art))
    prompt = [int(i) for i in tok.encode("def ")]
    limit = rt.art.config["vocab"] if tok.kind == "bytes" else tok.vocab_size
    want = forward_oracle(rt, prompt, 150, 0.8, 3, limit)
    with monkeypatch.context() as m:
        m.setattr(rt, "logits", lambda *a: pytest.fail("sample_text ran forward.onnx, not the cache"))
        text = sample_text(rt, "def ", 150, seed=3, tokenizer=tok)
    assert text == tok.decode(prompt + want)
    assert len(set(want)) > 5  # sampled, not one token repeated


def test_folder_without_decoder_samples_with_forward(tiny_index, tmp_path):
    """A folder built before decoder.onnx existed: forward.onnx over a sliding window, the same
    tokens as the cache while the sequence fits the context."""
    old = tmp_path / "old"
    shutil.copytree(tiny_index, old)
    m = json.loads((old / "manifest.json").read_text())
    del m["files"]["decoder.onnx"], m["models"]["decoder.onnx"]
    (old / "manifest.json").write_text(json.dumps(m))
    (old / "decoder.onnx").unlink()
    n = 40  # "def " + 40 bytes < 64
    assert sample_text(runtimes.load(old, runtime="ort"), "def ", n, seed=5) == \
        sample_text(runtimes.load(tiny_index, runtime="ort"), "def ", n, seed=5)
