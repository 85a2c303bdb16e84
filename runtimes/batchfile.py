"""Batch files: a fixed sequence of training batches and their hyperparameters, for other hosts.

A batch file is safetensors with three int64 tensors of shape (N, B, T):
``tokens``, ``positions`` and ``labels`` (next-token ids; hosts make dense labels
from them when the artifacts want dense ones), and string metadata:

    format          "gpt2-onnx-batches"
    format_version  "1"
    lr, beta1, beta2, eps, weight_decay   the AdamW constants, as decimal strings
                    (lr is constant; update i of the file is t = i + 1)
    config          JSON of the artifacts' architecture {vocab, context, d_model,
                    n_heads, d_ff, n_layers, labels}: a reader refuses artifacts
                    whose manifest disagrees

The Node host (hosts/node/train.mjs --batches FILE) trains on exactly these
batches, so its losses can be compared with a Python runtime's.

    python -m runtimes.batchfile --artifacts DIR --out FILE --steps N --batch B --seq T --seed S [--data FILE]
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import numpy as np

from contract import HP_LAYOUT

from .errors import DataError, GPT2OnnxError, InputError

FORMAT = "gpt2-onnx-batches"
FORMAT_VERSION = "1"
ARCH_KEYS = ("vocab", "context", "d_model", "n_heads", "d_ff", "n_layers", "labels")
HP_KEYS = HP_LAYOUT[:5]  # the constants a file records; the bias corrections follow from the step


def write_batches(path, batches, hp: dict, config: dict | None = None) -> None:
    """Write ``batches`` (a list of (tokens, positions, labels) int (B, T) arrays) to ``path``.

    ``hp`` holds lr, beta1, beta2, eps, weight_decay. ``config`` is the artifacts' config
    (only ARCH_KEYS are recorded). Written atomically.
    """
    from safetensors.numpy import save

    from contract.files import write_atomic

    if not batches:
        raise InputError("a batch file needs at least one batch")
    missing = [k for k in HP_KEYS if k not in hp]
    if missing:
        raise InputError(f"hp lacks {missing}; a batch file records {list(HP_KEYS)}")
    for k in HP_KEYS:
        if not math.isfinite(float(hp[k])):
            raise InputError(f"hp {k} must be finite, got {hp[k]!r}")
    stacked = {}
    for i, name in enumerate(("tokens", "positions", "labels")):
        arrays = [np.asarray(b[i]) for b in batches]
        shape = arrays[0].shape
        for j, a in enumerate(arrays):
            if a.ndim != 2 or a.shape != shape:
                raise InputError(f"batch {j}: {name} has shape {a.shape}, expected (B, T) = {shape} like batch 0")
            if a.dtype.kind not in "iu":
                raise InputError(f"batch {j}: {name} must be integer ids, got dtype {a.dtype}")
        stacked[name] = np.ascontiguousarray(np.stack(arrays).astype(np.int64))
    meta = {"format": FORMAT, "format_version": FORMAT_VERSION}
    meta.update({k: repr(float(hp[k])) for k in HP_KEYS})
    if config is not None:
        meta["config"] = json.dumps({k: config[k] for k in ARCH_KEYS if k in config}, sort_keys=True)
    write_atomic(Path(path), save(stacked, metadata=meta))


def read_batches(path) -> tuple[list[tuple[np.ndarray, np.ndarray, np.ndarray]], dict]:
    """(batches, meta): the int64 (B, T) batches of a batch file, and its metadata with
    hp values as floats and config as a dict."""
    from safetensors import SafetensorError
    from safetensors.numpy import load

    p = Path(path)
    if not p.is_file():
        raise DataError(f"batch file {p} does not exist")
    try:
        from safetensors import safe_open

        raw = p.read_bytes()
        tensors = load(raw)
        with safe_open(str(p), framework="numpy") as f:
            meta = dict(f.metadata() or {})
    except (SafetensorError, OSError, ValueError) as e:
        raise DataError(f"{p} is not a readable safetensors batch file: {e}") from None
    if meta.get("format") != FORMAT:
        raise DataError(f"{p}: metadata format {meta.get('format')!r} is not {FORMAT!r}")
    for name in ("tokens", "positions", "labels"):
        if name not in tensors:
            raise DataError(f"{p}: no tensor {name!r}")
        t = tensors[name]
        if t.dtype != np.int64 or t.ndim != 3 or t.shape != tensors["tokens"].shape:
            raise DataError(f"{p}: {name} is {t.dtype}{list(t.shape)}, expected int64 (N, B, T) like tokens")
    out = {k: float(meta[k]) for k in HP_KEYS if k in meta}
    out["config"] = json.loads(meta["config"]) if "config" in meta else None
    n = tensors["tokens"].shape[0]
    batches = [(tensors["tokens"][i], tensors["positions"][i], tensors["labels"][i]) for i in range(n)]
    return batches, out


def make_batch_file(artifacts, out, steps: int, batch: int, seq: int | None = None, seed: int = 0,
                    data=None, lr: float = 1e-3, max_corpus_bytes: int = 200_000) -> Path:
    """Sample ``steps`` batches (runtimes.data.fixed_batches) from ``data`` (a file or folder of
    text; default: the standard library's sources, first ``max_corpus_bytes``) and write them
    with the artifacts' AdamW constants and ``lr``."""
    from .artifacts import load_artifacts
    from .data import default_corpus, encode, fixed_batches, load_corpus

    art = load_artifacts(artifacts, verify=False)
    cfg = art.config
    for name, value in (("steps", steps), ("batch", batch)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise InputError(f"--{name} must be an integer >= 1, got {value!r}")
    seq = cfg["context"] if seq is None else seq
    if isinstance(seq, bool) or not isinstance(seq, int) or not 1 <= seq <= cfg["context"]:
        raise InputError(f"--seq must be an integer in [1, {cfg['context']}] (the artifacts' context), got {seq!r}")
    if not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr >= 0):
        raise InputError(f"--lr must be a finite number >= 0, got {lr!r}")
    text = load_corpus(data) if data is not None else default_corpus(max_bytes=max_corpus_bytes)
    tokens = encode(text)
    if cfg["vocab"] < 256:
        raise DataError(f"byte tokens (0..255) do not fit the artifacts' vocab {cfg['vocab']}")
    batches = fixed_batches(tokens, batch, seq, steps, seed=seed)
    hp = {"lr": lr, **{k: cfg[k] for k in ("beta1", "beta2", "eps", "weight_decay")}}
    write_batches(out, batches, hp, cfg)
    return Path(out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m runtimes.batchfile", description="write a batch file for other hosts (hosts/node)")
    p.add_argument("--artifacts", required=True, help="artifact folder (its config and AdamW constants)")
    p.add_argument("--out", required=True, help="batch file to write (safetensors)")
    p.add_argument("--steps", type=int, required=True, help="number of batches N")
    p.add_argument("--batch", type=int, default=2, help="sequences per batch B (default 2)")
    p.add_argument("--seq", type=int, default=None, help="tokens per sequence T (default: the context)")
    p.add_argument("--seed", type=int, default=0, help="sampler seed (default 0)")
    p.add_argument("--lr", type=float, default=1e-3, help="constant learning rate recorded in the file (default 1e-3)")
    p.add_argument("--data", default=None, help="text file or folder (default: the standard library's sources)")
    a = p.parse_args(argv)
    try:
        path = make_batch_file(a.artifacts, a.out, a.steps, a.batch, a.seq, a.seed, a.data, a.lr)
    except GPT2OnnxError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {a.steps} batches to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
