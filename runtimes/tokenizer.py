"""The artifact folder's tokenizer, and training text tokenized once per run folder.

A folder whose manifest records a Hugging Face tokenizer (``tokenizer.json``,
copied in by ``graphgen build --from-hf``) trains on that tokenizer's ids, as
the Hugging Face ``tokenizers`` library computes them; every other folder
trains on bytes (runtimes/data.py).

Tokenizing a large corpus takes a while, so ``cached_tokens`` does it once and
keeps the ids beside the run, in ``--out``: ``tokens-<tokenizer sha256>-<data
sha256>-<data bytes>.<dtype>.bin``, raw little-endian ids read back memory-mapped.
The name is the key: other text, or another tokenizer, is another file. It is
written atomically (a temporary file renamed over the name), so a file of that
name is always complete.

The text is the one runtimes/data.py reads (``load_corpus``: files decoded as
UTF-8 with invalid bytes replaced, concatenated; or the default corpus), fed to
the tokenizer in pieces of about a MiB cut only before a line that starts with
a non-space character, where a byte-level BPE's pre-tokenizer splits anyway, so
the ids are those of the whole text at once.
"""

from __future__ import annotations

import codecs
import hashlib
import os
from pathlib import Path
from typing import Iterator

import numpy as np

from contract.files import sha256_file

from .artifacts import Artifacts
from .data import ByteTokenizer, corpus_files, default_corpus
from .errors import ArtifactError, DataError, OutputError

PIECE_CHARS = 1 << 20
BATCH_PIECES = 8
READ_BYTES = 4 << 20
PROGRESS_FROM_BYTES = 4 << 20


class HFTokenizer:
    """A Hugging Face ``tokenizers`` tokenizer from the folder's tokenizer.json."""

    kind = "huggingface"

    def __init__(self, path: Path, sha256: str, vocab_size: int):
        from tokenizers import Tokenizer

        try:
            self._tok = Tokenizer.from_file(str(path))
        except Exception as e:  # the library raises plain Exception for a malformed file
            raise ArtifactError(f"{path}: not a readable tokenizer.json ({' '.join(str(e).split())})") from None
        self.path, self.sha256, self.vocab_size = path, sha256, vocab_size

    def encode(self, text: str) -> np.ndarray:
        """int64 ids of ``text``, without special tokens added around it."""
        return np.asarray(self._tok.encode(text, add_special_tokens=False).ids, dtype=np.int64)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self._tok.encode_batch(texts, add_special_tokens=False)]

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def decode(self, ids) -> str:
        return self._tok.decode([int(i) for i in np.asarray(ids).ravel()], skip_special_tokens=False)


def load_tokenizer(art: Artifacts) -> ByteTokenizer | HFTokenizer:
    """The folder's tokenizer; its file is checked against the manifest's sha256 first."""
    entry = art.tokenizer
    if entry["kind"] == "bytes":
        return ByteTokenizer()
    path = art.path(entry["file"])
    if not path.is_file():
        raise ArtifactError(f"{art.folder}: file {entry['file']} listed in manifest.json is missing")
    if sha256_file(path) != entry["sha256"]:
        raise ArtifactError(f"{path}: sha256 differs from manifest.json (corrupted or from another build)")
    return HFTokenizer(path, entry["sha256"], entry["vocab_size"])


# --------------------------------------------------------------------------- the text, streamed
def _data_key(data: str | None) -> tuple[str, int, list[Path] | None]:
    """(sha256, bytes) of the data as read, and its files (None: the default corpus)."""
    if data is None:
        raw = default_corpus().encode("utf-8")
        return hashlib.sha256(raw).hexdigest(), len(raw), None
    files = corpus_files(data)
    if not files:
        raise DataError(f"corpus folder {data!r} contains no files")
    h, size = hashlib.sha256(), 0
    for f in files:
        with open(f, "rb") as fh:
            for block in iter(lambda: fh.read(READ_BYTES), b""):
                h.update(block)
                size += len(block)
    if size == 0:
        raise DataError(f"corpus {data!r} is empty (0 bytes in {len(files)} file(s))")
    return h.hexdigest(), size, files


def _blocks(files: list[Path] | None, read: list[int]) -> Iterator[str]:
    """The text in blocks; ``read[0]`` counts the bytes consumed so far (for the progress bar)."""
    if files is None:
        text = default_corpus()
        for i in range(0, len(text), READ_BYTES):
            block = text[i:i + READ_BYTES]
            read[0] += len(block.encode("utf-8"))
            yield block
        return
    for f in files:
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        with open(f, "rb") as fh:
            for block in iter(lambda: fh.read(READ_BYTES), b""):
                read[0] += len(block)
                yield decoder.decode(block)
        yield decoder.decode(b"", final=True)


def _cut(buf: str) -> int:
    """The last index at which ``buf`` may be cut (just after a newline followed by a non-space), or 0."""
    i = buf.rfind("\n", 0, len(buf) - 1)
    while i >= 0 and buf[i + 1].isspace():
        i = buf.rfind("\n", 0, i)
    return i + 1


def _pieces(blocks: Iterator[str]) -> Iterator[str]:
    buf = ""
    for block in blocks:
        buf += block
        while len(buf) >= PIECE_CHARS:
            cut = _cut(buf)
            if cut == 0:
                if len(buf) < 16 * PIECE_CHARS:
                    break  # one long line so far: read more before cutting
                cut = PIECE_CHARS  # a line of 16 MiB: cut inside it (ids near the cut may differ)
            yield buf[:cut]
            buf = buf[cut:]
    if buf:
        yield buf


# --------------------------------------------------------------------------- the cache
def cached_tokens(tok: HFTokenizer, data: str | None, folder: Path, progress: bool = True) -> np.ndarray:
    """The ids of the data under ``tok``, memory-mapped from the cache in ``folder`` (written on first use)."""
    data_sha, size, files = _data_key(data)
    dtype = np.dtype("<u2") if tok.vocab_size <= 1 << 16 else np.dtype("<u4")
    path = folder / f"tokens-{tok.sha256[:32]}-{data_sha[:32]}-{size}.{'u16' if dtype.itemsize == 2 else 'u32'}.bin"
    if not path.is_file():
        _tokenize_to(path, tok, files, size, dtype, progress)
    n = path.stat().st_size // dtype.itemsize
    if n == 0 or path.stat().st_size % dtype.itemsize:
        raise DataError(f"{path}: a token cache of {path.stat().st_size} bytes is not whole; delete it to tokenize again")
    return np.memmap(path, dtype=dtype, mode="r", shape=(n,))


def _tokenize_to(path: Path, tok: HFTokenizer, files, size: int, dtype: np.dtype, progress: bool) -> None:
    from tqdm import tqdm

    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    read = [0]
    bar = tqdm(total=size, unit="B", unit_scale=True, desc="tokenizing", dynamic_ncols=True,
               disable=not progress or size < PROGRESS_FROM_BYTES)
    try:
        with open(tmp, "wb") as out:
            batch: list[str] = []

            def flush():
                for ids in tok.encode_batch(batch):
                    out.write(np.asarray(ids, dtype=dtype).tobytes())
                batch.clear()
                bar.update(read[0] - bar.n)

            for piece in _pieces(_blocks(files, read)):
                batch.append(piece)
                if len(batch) == BATCH_PIECES:
                    flush()
            flush()
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, path)
    except OSError as e:
        raise OutputError(f"could not write the token cache {path}: {e.strerror or e}") from None
    finally:
        bar.close()
        if tmp.exists():
            tmp.unlink()
