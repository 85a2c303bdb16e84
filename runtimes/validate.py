"""Batch checks at the runner boundary, before anything runs.

A bad batch must never reach a session: ONNX Runtime's Gather clamps or crashes
on an out-of-range index depending on the provider, and a NaN label silently
poisons every moment. Each check names the input, the bad value and the range.

Documented inputs (every other form is an InputError, and nothing runs):

- tokens, positions: numpy arrays of any integer dtype (bool is not an integer),
  shape (B, T) with B >= 1 and 1 <= T <= context; token ids in [0, vocab),
  positions in [0, context). Masked arrays (np.ma) are refused: which value a
  masked entry holds is the caller's choice to make. Ranges are checked on the values as given, before
  the conversion to int64, so a uint64 id of 2**63 is reported as itself.
- labels, index mode: integer array of the tokens' shape, ids in [0, vocab).
- labels, dense mode: float32 array (B, T, vocab), every entry finite and >= 0,
  every row summing to 1 within DENSE_SUM_TOL (absolute, on the float64 sum).
- hp: see hp.py (float32[7], finite, ranges, bias corrections for the step).
"""

from __future__ import annotations

import numpy as np

from .errors import InputError

from contract import DENSE_SUM_TOL  # noqa: E402


def refuse_masked(name: str, a) -> None:
    """A masked array's range checks see the fill value while the runtime gets the data
    underneath (a masked -1 would train as token 255): the caller must choose."""
    if isinstance(a, np.ma.MaskedArray):
        raise InputError(f"{name} is a masked array; pass a plain numpy array ({name}.filled(value) chooses what masked entries hold)")


def _int_array(name: str, a) -> np.ndarray:
    refuse_masked(name, a)
    if not isinstance(a, np.ndarray):
        raise InputError(f"{name} must be a numpy integer array, got {type(a).__name__}")
    if not np.issubdtype(a.dtype, np.integer):
        raise InputError(f"{name} must have an integer dtype (int64), got {a.dtype}")
    if a.ndim != 2:
        raise InputError(f"{name} must have shape (batch, seq), got {a.shape}")
    return a


def _range(name: str, a: np.ndarray, hi: int, what: str) -> None:
    lo_v, hi_v = int(a.min()), int(a.max())
    if lo_v < 0 or hi_v >= hi:
        bad = lo_v if lo_v < 0 else hi_v
        where = tuple(int(i) for i in np.argwhere((a < 0) | (a >= hi))[0])
        raise InputError(f"{name}{list(where)} = {bad} is out of range: {what} must be in [0, {hi})")


def _int64(a: np.ndarray) -> np.ndarray:
    """int64, C-contiguous (called after the range check, so values fit)."""
    return np.ascontiguousarray(a, dtype=np.int64)


def check_tokens(tokens, positions, vocab: int, context: int) -> tuple[np.ndarray, np.ndarray]:
    tokens = _int_array("tokens", tokens)
    positions = _int_array("positions", positions)
    b, t = tokens.shape
    if b == 0 or t == 0:
        raise InputError(f"tokens has shape {tokens.shape}: batch and seq must both be >= 1")
    if t > context:
        raise InputError(f"tokens has seq length {t} > context {context}: T must be in [1, {context}]")
    if positions.shape != tokens.shape:
        raise InputError(f"positions shape {positions.shape} differs from tokens shape {tokens.shape}")
    _range("tokens", tokens, vocab, f"token ids (vocab {vocab})")
    _range("positions", positions, context, f"positions (context {context})")
    return _int64(tokens), _int64(positions)


def check_labels(labels, shape: tuple[int, int], vocab: int, mode: str) -> np.ndarray:
    refuse_masked("labels", labels)
    if not isinstance(labels, np.ndarray):
        raise InputError(f"labels must be a numpy array, got {type(labels).__name__}")
    if mode == "index":
        if not np.issubdtype(labels.dtype, np.integer):
            raise InputError(
                f"labels must be integer (B, T) next-token ids for these index-mode artifacts, got {labels.dtype}{list(labels.shape)}"
            )
        if labels.shape != shape:
            raise InputError(f"labels shape {labels.shape} differs from tokens shape {shape}")
        _range("labels", labels, vocab, f"label ids (vocab {vocab})")
        return _int64(labels)
    if labels.dtype != np.float32:
        raise InputError(
            f"labels must be float32 (B, T, {vocab}) distributions for these dense-mode artifacts, got {labels.dtype}{list(labels.shape)}"
        )
    if labels.shape != (*shape, vocab):
        raise InputError(f"labels shape {labels.shape} must be {(*shape, vocab)} (tokens shape + vocab)")
    if not np.isfinite(labels).all():
        where = tuple(int(i) for i in np.argwhere(~np.isfinite(labels))[0])
        raise InputError(f"labels{list(where)} is {labels[where]}: dense labels must be finite")
    if (labels < 0).any():
        where = tuple(int(i) for i in np.argwhere(labels < 0)[0])
        raise InputError(f"labels{list(where)} = {labels[where]} is negative: dense labels must be >= 0")
    sums = labels.sum(axis=-1, dtype=np.float64)
    bad = np.abs(sums - 1.0) > DENSE_SUM_TOL
    if bad.any():
        where = tuple(int(i) for i in np.argwhere(bad)[0])
        raise InputError(
            f"labels row {list(where)} sums to {sums[where]:.6g}: each dense label row must sum to 1 (tolerance {DENSE_SUM_TOL})"
        )
    return np.ascontiguousarray(labels)
