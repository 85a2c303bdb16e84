"""Training data: byte tokenizer, corpora, train/validation split, batches, labels.

numpy only: no torch, no graphgen, no download.

Tokenizer
    Byte level: the ids of a text are the bytes of its UTF-8 encoding (vocab
    256). ``decode`` turns ids back into text, replacing invalid UTF-8.

Corpora
    ``default_corpus()`` is the text of the running interpreter's own standard
    library ``.py`` files (``sysconfig.get_paths()["stdlib"]``), so a fresh
    machine has several MB of text with no download. Files are taken in sorted
    order of their relative POSIX paths; directories named in
    ``STDLIB_SKIP_DIRS`` (site-packages, tests, idlelib, caches, ...) are
    skipped; whole files are appended until the next would pass
    ``DEFAULT_CORPUS_MAX_BYTES`` (8 MiB) of UTF-8. The result is the same on
    every call and every machine with the same Python version.
    ``load_corpus(path)`` reads one file, or every non-hidden file under a
    folder (recursively, sorted by relative POSIX path), as UTF-8 with invalid
    bytes replaced. Files are concatenated as they are, with nothing between.

Split
    ``train_val_split(tokens, val_fraction=0.05)``: the validation set is the
    last ``round(n * val_fraction)`` tokens (at least one when the fraction is
    > 0), the training set everything before. Contiguous, disjoint, and
    deterministic. Batches never straddle the two.

Batches
    ``BatchSampler(tokens, batch, seq_len, seed)``: each ``next()`` draws ``batch``
    start offsets uniformly from ``[0, n - seq_len - 1]`` with a numpy
    ``Generator(PCG64(seed))`` and returns ``(tokens, positions, labels)``, all
    int64 (B, T): ``tokens[b] = data[o_b : o_b + T]``, ``positions[b] = 0..T-1``,
    ``labels[b] = data[o_b + 1 : o_b + T + 1]`` (the next tokens).
    ``state_dict()`` is a JSON-serialisable dict (the PCG64 state, its 128-bit
    integers written as decimal strings; the number of
    batches drawn, the shape and a fingerprint of the data);
    ``load_state_dict()`` restores it, so a resumed run draws exactly the
    batches an uninterrupted one would.
"""

from __future__ import annotations

import os
import sys
import sysconfig
import zlib
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterator, Union

import numpy as np

from .errors import DataError, InputError

VOCAB_SIZE = 256
DEFAULT_CORPUS_MAX_BYTES = 8 * 1024 * 1024
DEFAULT_VAL_FRACTION = 0.05
STDLIB_SKIP_DIRS = frozenset(
    {
        "site-packages",
        "dist-packages",
        "test",
        "tests",
        "idle_test",
        "idlelib",
        "__pycache__",
        "ensurepip",
        "turtledemo",
        "config-" + sysconfig.get_python_version(),
    }
)
STATE_VERSION = 1

PathLike = Union[str, "os.PathLike[str]"]


# --------------------------------------------------------------------- tokenizer
def encode(text: Union[str, bytes, bytearray], dtype: Any = np.uint8) -> np.ndarray:
    """Byte ids (0..255) of ``text`` (str is UTF-8 encoded), as a 1-D array of ``dtype``."""
    if isinstance(text, str):
        raw = text.encode("utf-8")
    elif isinstance(text, (bytes, bytearray, memoryview)):
        raw = bytes(text)
    else:
        raise InputError(f"encode takes str or bytes, got {type(text).__name__}")
    dt = np.dtype(dtype)
    if dt.kind not in "iu" or (dt.kind == "i" and dt.itemsize < 2):
        raise InputError(f"encode dtype must be an integer type holding 0..255, got {dt}")
    return np.frombuffer(raw, dtype=np.uint8).astype(dt, copy=True)


def decode(ids: Any) -> str:
    """Text of byte ids (any shape, read in C order); invalid UTF-8 becomes U+FFFD."""
    arr = np.asarray(ids)
    if arr.size == 0:
        return ""
    if arr.dtype.kind not in "iu":
        raise InputError(f"decode takes integer ids, got dtype {arr.dtype}")
    lo, hi = int(arr.min()), int(arr.max())
    if lo < 0 or hi >= VOCAB_SIZE:
        raise InputError(f"byte ids must lie in [0, {VOCAB_SIZE}), got range [{lo}, {hi}]")
    return arr.astype(np.uint8).ravel().tobytes().decode("utf-8", errors="replace")


class ByteTokenizer:
    """The byte tokenizer as an object, for code that wants one."""

    kind = "bytes"
    vocab_size = VOCAB_SIZE

    def encode(self, text: Union[str, bytes], dtype: Any = np.uint8) -> np.ndarray:
        return encode(text, dtype)

    def decode(self, ids: Any) -> str:
        return decode(ids)


# ----------------------------------------------------------------------- corpora
def stdlib_source_files(stdlib: PathLike | None = None) -> list[Path]:
    """The ``.py`` files of the standard library in corpus order (sorted relative paths)."""
    root = Path(stdlib if stdlib is not None else sysconfig.get_paths()["stdlib"])
    if not root.is_dir():
        raise DataError(f"standard library folder {str(root)!r} does not exist")
    found: list[tuple[str, Path]] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in STDLIB_SKIP_DIRS and not d.startswith(".")]
        for name in filenames:
            if name.endswith(".py"):
                full = Path(dirpath) / name
                found.append((full.relative_to(root).as_posix(), full))
    found.sort(key=lambda item: item[0])
    return [full for _, full in found]


@lru_cache(maxsize=4)
def _default_corpus(stdlib: str, max_bytes: int) -> str:
    parts: list[str] = []
    total = 0
    for path in stdlib_source_files(stdlib):
        text = path.read_bytes().decode("utf-8", errors="replace")
        size = len(text.encode("utf-8"))
        if total + size > max_bytes:
            break
        parts.append(text)
        total += size
    if not parts:
        raise DataError(
            f"no standard library source fits in {max_bytes} bytes under {stdlib!r} "
            f"(Python {sys.version.split()[0]})"
        )
    return "".join(parts)


def default_corpus(max_bytes: int = DEFAULT_CORPUS_MAX_BYTES) -> str:
    """The standard library's own Python source, up to ``max_bytes`` of UTF-8 (whole files).

    Deterministic for a given Python installation; needs no download. Raises
    DataError when the standard library sources are not installed.
    """
    if isinstance(max_bytes, bool) or not isinstance(max_bytes, int) or max_bytes <= 0:
        raise DataError(f"max_bytes must be a positive integer, got {max_bytes!r}")
    return _default_corpus(sysconfig.get_paths()["stdlib"], max_bytes)


def corpus_files(path: PathLike) -> list[Path]:
    """The files ``load_corpus(path)`` reads, in the order it reads them."""
    p = Path(path)
    if not p.exists():
        raise DataError(f"corpus path {str(p)!r} does not exist")
    if p.is_file():
        return [p]
    if not p.is_dir():
        raise DataError(f"corpus path {str(p)!r} is neither a file nor a folder")
    found: list[tuple[str, Path]] = []
    for dirpath, dirnames, filenames in os.walk(p):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        for name in filenames:
            full = Path(dirpath) / name
            if not name.startswith(".") and full.is_file():
                found.append((full.relative_to(p).as_posix(), full))
    found.sort(key=lambda item: item[0])
    return [full for _, full in found]


def load_corpus(path: PathLike) -> str:
    """Text of a file, or of every non-hidden file under a folder (recursive, sorted).

    Read as UTF-8 with invalid bytes replaced. Raises DataError when the path
    does not exist or the text is empty.
    """
    files = corpus_files(path)
    if not files:
        raise DataError(f"corpus folder {str(path)!r} contains no files")
    text = "".join(f.read_bytes().decode("utf-8", errors="replace") for f in files)
    if not text:
        raise DataError(f"corpus {str(path)!r} is empty (0 bytes in {len(files)} file(s))")
    return text


def load_tokens(path: PathLike | None = None, max_bytes: int = DEFAULT_CORPUS_MAX_BYTES) -> np.ndarray:
    """uint8 byte ids of ``load_corpus(path)``, or of ``default_corpus(max_bytes)`` when path is None."""
    text = default_corpus(max_bytes) if path is None else load_corpus(path)
    return encode(text)


def train_val_split(
    tokens: Any, val_fraction: float = DEFAULT_VAL_FRACTION
) -> tuple[np.ndarray, np.ndarray]:
    """(train, validation): validation is the last ``round(n * val_fraction)`` tokens.

    At least one validation token when ``val_fraction > 0``; the two parts are
    contiguous views of ``tokens`` and never overlap.
    """
    arr = _as_token_array(tokens, "tokens")
    if isinstance(val_fraction, bool) or not isinstance(val_fraction, (int, float)) or not (
        0.0 <= val_fraction < 1.0
    ):
        raise DataError(f"val_fraction must be in [0, 1), got {val_fraction!r}")
    n = arr.shape[0]
    n_val = int(round(n * val_fraction))
    if val_fraction > 0:
        n_val = max(1, n_val)
    if n_val >= n:
        raise DataError(
            f"cannot split {n} tokens with val_fraction {val_fraction}: nothing would be left to train on"
        )
    return arr[: n - n_val], arr[n - n_val :]


# ----------------------------------------------------------------------- batches
def _as_token_array(tokens: Any, what: str) -> np.ndarray:
    arr = np.asarray(tokens)
    if arr.ndim != 1:
        raise DataError(f"{what} must be a 1-D array of token ids, got shape {arr.shape}")
    if arr.size and arr.dtype.kind not in "iu":
        raise DataError(f"{what} must hold integer token ids, got dtype {arr.dtype}")
    return arr


def _positive_int(value: Any, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0:
        raise DataError(f"{what} must be a positive integer, got {value!r}")
    return int(value)


def _rng_state_to_json(st: dict[str, Any]) -> dict[str, Any]:
    """PCG64 state with its two 128-bit integers as decimal strings (JSON readers in other
    languages, e.g. JavaScript, would round them as numbers)."""
    return {
        "bit_generator": st["bit_generator"],
        "state": {"state": str(st["state"]["state"]), "inc": str(st["state"]["inc"])},
        "has_uint32": int(st["has_uint32"]),
        "uinteger": int(st["uinteger"]),
    }


def _rng_state_from_json(js: Any) -> dict[str, Any]:
    try:
        if js["bit_generator"] != "PCG64":
            raise ValueError(f"bit_generator is {js['bit_generator']!r}, expected 'PCG64'")
        st = {
            "bit_generator": "PCG64",
            "state": {"state": int(js["state"]["state"]), "inc": int(js["state"]["inc"])},
            "has_uint32": int(js["has_uint32"]),
            "uinteger": int(js["uinteger"]),
        }
        np.random.PCG64().state = st  # validates
    except (TypeError, ValueError, KeyError) as exc:
        raise DataError(f"sampler state rng is not a valid PCG64 state: {exc!r}") from None
    return st


class BatchSampler:
    """Random (tokens, positions, labels) batches from one token array; resumable.

    ``tokens``: 1-D integer ids (kept by reference, not copied; any integer
    dtype). ``batch`` B and ``seq_len`` T: positive; the data needs at least
    T + 1 tokens. ``seed``: the PCG64 seed. ``vocab``: when given, every id must
    be below it. ``name`` labels the data in error messages (e.g. a file path).
    """

    def __init__(
        self,
        tokens: Any,
        batch: int,
        seq_len: int,
        seed: int = 0,
        vocab: int | None = None,
        name: str = "tokens",
    ) -> None:
        self.name = name
        self.batch = _positive_int(batch, "batch size B")
        self.seq_len = _positive_int(seq_len, "sequence length T")
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
            raise DataError(f"seed must be a non-negative integer, got {seed!r}")
        self.seed = int(seed)
        self.tokens = _as_token_array(tokens, name)
        n = self.tokens.shape[0]
        if n < self.seq_len + 1:
            raise DataError(
                f"{name} holds {n} tokens; one batch of sequence length T={self.seq_len} "
                f"needs at least T+1 = {self.seq_len + 1}"
            )
        lo, hi = int(self.tokens.min()), int(self.tokens.max())
        if lo < 0 or (vocab is not None and hi >= vocab):
            raise DataError(
                f"{name} ids must lie in [0, {vocab if vocab is not None else 'inf'}), "
                f"got range [{lo}, {hi}]"
            )
        self.vocab = vocab
        self.batches_drawn = 0
        self._rng = np.random.Generator(np.random.PCG64(self.seed))
        self._positions = np.broadcast_to(
            np.arange(self.seq_len, dtype=np.int64), (self.batch, self.seq_len)
        )
        self._fingerprint: str | None = None
        self._window = np.arange(self.seq_len + 1, dtype=np.int64)

    @property
    def n_tokens(self) -> int:
        return int(self.tokens.shape[0])

    def next(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The next batch: (tokens, positions, labels), each a fresh int64 (B, T) array."""
        high = self.n_tokens - self.seq_len  # offsets 0 .. n-T-1 inclusive
        offsets = self._rng.integers(0, high, size=self.batch, dtype=np.int64)
        windows = np.asarray(self.tokens[offsets[:, None] + self._window], dtype=np.int64)
        self.batches_drawn += 1
        return (
            np.ascontiguousarray(windows[:, :-1]),
            self._positions.copy(),
            np.ascontiguousarray(windows[:, 1:]),
        )

    def __iter__(self) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        return self

    def __next__(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        return self.next()

    def fingerprint(self) -> str:
        """crc32 of the token values (as uint8 when they fit, else int64), with the length."""
        if self._fingerprint is None:
            arr = self.tokens
            fits = arr.size == 0 or int(arr.max()) < 256
            crc, step = 0, 1 << 22  # in slices: a memory-mapped corpus is never copied whole as int64
            for i in range(0, arr.shape[0], step):
                raw = np.ascontiguousarray(arr[i:i + step], dtype=np.uint8 if fits else np.int64)
                crc = zlib.crc32(memoryview(raw), crc)
            self._fingerprint = f"{'u8' if fits else 'i64'}:{self.n_tokens}:{crc:08x}"
        return self._fingerprint

    def state_dict(self) -> dict[str, Any]:
        """JSON-serialisable state: RNG state, batches drawn, shape and data fingerprint."""
        return {
            "version": STATE_VERSION,
            "seed": self.seed,
            "batch": self.batch,
            "seq_len": self.seq_len,
            "n_tokens": self.n_tokens,
            "data_fingerprint": self.fingerprint(),
            "batches_drawn": self.batches_drawn,
            "rng": _rng_state_to_json(self._rng.bit_generator.state),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore ``state_dict()`` output (possibly through JSON); the next batch is the one
        an uninterrupted sampler would draw. Raises DataError when the state is malformed or
        belongs to other data or another batch shape; nothing changes then."""
        if not isinstance(state, dict):
            raise DataError(f"sampler state must be a dict, got {type(state).__name__}")
        required = ("version", "batch", "seq_len", "n_tokens", "data_fingerprint", "batches_drawn", "rng")
        missing = [k for k in required if k not in state]
        if missing:
            raise DataError(f"sampler state is missing {missing}")
        if state["version"] != STATE_VERSION:
            raise DataError(f"sampler state version {state['version']!r} is not {STATE_VERSION}")
        for key, mine in (("batch", self.batch), ("seq_len", self.seq_len), ("n_tokens", self.n_tokens)):
            if state[key] != mine:
                raise DataError(f"sampler state has {key}={state[key]!r}, but this sampler has {key}={mine}")
        if state["data_fingerprint"] != self.fingerprint():
            raise DataError(
                f"sampler state was saved for other data (fingerprint {state['data_fingerprint']!r}, "
                f"{self.name} has {self.fingerprint()!r})"
            )
        drawn = state["batches_drawn"]
        if isinstance(drawn, bool) or not isinstance(drawn, int) or drawn < 0:
            raise DataError(f"sampler state batches_drawn must be a non-negative integer, got {drawn!r}")
        candidate = np.random.PCG64()
        candidate.state = _rng_state_from_json(state["rng"])
        self._rng = np.random.Generator(candidate)
        self.batches_drawn = drawn
        if "seed" in state and isinstance(state["seed"], int):
            self.seed = state["seed"]


def fixed_batches(
    tokens: Any, batch: int, seq_len: int, n: int, seed: int = 0
) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """The first ``n`` batches of ``BatchSampler(tokens, batch, seq_len, seed)``, for parity tests."""
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 0:
        raise DataError(f"number of batches n must be a non-negative integer, got {n!r}")
    sampler = BatchSampler(tokens, batch, seq_len, seed)
    return [sampler.next() for _ in range(int(n))]


def dense_labels(labels: Any, vocab: int = VOCAB_SIZE) -> np.ndarray:
    """One-hot float32 (..., vocab) of integer labels (the seed's dense label form)."""
    lab = np.asarray(labels)
    if isinstance(vocab, bool) or not isinstance(vocab, (int, np.integer)) or vocab <= 0:
        raise InputError(f"vocab must be a positive integer, got {vocab!r}")
    if lab.size and lab.dtype.kind not in "iu":
        raise InputError(f"labels must be integer ids, got dtype {lab.dtype}")
    if lab.size and (int(lab.min()) < 0 or int(lab.max()) >= vocab):
        raise InputError(f"labels must lie in [0, {vocab}), got range [{int(lab.min())}, {int(lab.max())}]")
    out = np.zeros(lab.shape + (int(vocab),), dtype=np.float32)
    np.put_along_axis(out, lab.astype(np.int64)[..., None], 1.0, axis=-1)
    return out
