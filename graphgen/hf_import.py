"""A Hugging Face GPT-2 folder as an artifact folder's config, weights and tokenizer.

``python -m graphgen build --from-hf DIR --out ART`` reads, from a folder the
user has (``save_pretrained`` output, or a hub download made by the user):

- ``config.json``: n_embd, n_head, n_layer, n_positions, vocab_size, n_inner
  (unset: 4 n_embd). What this project's model does not compute is refused,
  naming the key: another activation than the tanh GELU, a LayerNorm epsilon
  other than 1e-5, unscaled or layer-scaled attention, reordered-upcast
  attention, cross-attention, an untied output layer.
- ``model.safetensors``, or the shards a ``model.safetensors.index.json`` names.
  Never a pickle (``pytorch_model.bin``): unpickling runs code. float16 and
  bfloat16 tensors are widened to float32; other dtypes are refused.
- the tokenizer, when there is one: ``tokenizer.json`` as it is, or
  ``vocab.json`` + ``merges.txt`` built into a byte-level BPE by the
  ``tokenizers`` library and saved as ``tokenizer.json``.

Every refusal is an ImportRefused naming the file and key; the caller turns it
into one line and exit status 2.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from contract import BYTES_VOCAB_SIZE, TOKENIZER_FILE
from contract.files import sha256_file
from contract.hf_layout import LM_HEAD, MASK_BUFFERS, PREFIX, from_hf, hf_shapes
from contract.jsonlimits import loads_limited

from .config import LN_EPS, GPT2Config, param_specs

TANH_GELUS = ("gelu_new", "gelu_pytorch_tanh")
# config.json switches of Hugging Face's GPT-2 that change the math, with the value this project computes.
FIXED_SWITCHES = {
    "scale_attn_weights": True,
    "scale_attn_by_inverse_layer_idx": False,
    "reorder_and_upcast_attn": False,
    "add_cross_attention": False,
    "tie_word_embeddings": True,
}
MAX_HEADER_BYTES = 100 << 20


class ImportRefused(ValueError):
    """The folder is not a GPT-2 this project can compute; the message names the file and key."""


@dataclass
class Imported:
    config: GPT2Config
    weights: dict[str, np.ndarray]  # manifest order, float32
    files: dict[str, bytes]  # copied into the artifact folder (the tokenizer)
    source: dict  # the manifest's "source"
    tokenizer: dict  # the manifest's "tokenizer"


# --------------------------------------------------------------------------- config.json
def read_config(folder: Path, **options) -> GPT2Config:
    """The GPT2Config of ``folder/config.json``; ``options`` are the optimizer and label fields."""
    path = folder / "config.json"
    if not path.is_file():
        raise ImportRefused(f"{folder} has no config.json; a Hugging Face GPT-2 folder holds config.json and model.safetensors")
    try:
        raw = loads_limited(path.read_bytes(), str(path), ImportRefused)
    except OSError as e:
        raise ImportRefused(f"{path} cannot be read: {e.strerror or e}") from None
    if not isinstance(raw, dict):
        raise ImportRefused(f"{path} is a JSON {type(raw).__name__}, expected an object")

    def size(key: str) -> int:
        v = raw.get(key)
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ImportRefused(f"{path}: {key} = {v!r}, expected a positive integer")
        return v

    if raw.get("model_type", "gpt2") != "gpt2":
        raise ImportRefused(f"{path}: model_type = {raw['model_type']!r}; only GPT-2 (model_type 'gpt2') imports")
    act = raw.get("activation_function", "gelu_new")
    if act not in TANH_GELUS:
        raise ImportRefused(
            f"{path}: activation_function = {act!r}; this project's MLP computes the tanh GELU "
            f"({' or '.join(TANH_GELUS)})"
        )
    eps = raw.get("layer_norm_epsilon", LN_EPS)
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or eps != LN_EPS:
        raise ImportRefused(f"{path}: layer_norm_epsilon = {eps!r}; this project's LayerNorm epsilon is {LN_EPS:g}")
    for key, ours in FIXED_SWITCHES.items():
        if key in raw and raw[key] != ours:
            raise ImportRefused(
                f"{path}: {key} = {json.dumps(raw[key])}; this project computes GPT-2 with {key} = {json.dumps(ours)}"
            )
    d = size("n_embd")
    d_ff = 4 * d if raw.get("n_inner") is None else size("n_inner")
    return GPT2Config(
        vocab=size("vocab_size"), context=size("n_positions"), d_model=d, n_heads=size("n_head"),
        d_ff=d_ff, n_layers=size("n_layer"), name=folder.resolve().name, **options,
    )


# --------------------------------------------------------------------------- safetensors
def _header(path: Path) -> tuple[dict, int]:
    """(tensor entries, data start) of a safetensors file, checked against its size."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            raw = f.read(8)
            n = int.from_bytes(raw, "little") if len(raw) == 8 else -1
            if not 0 < n <= min(MAX_HEADER_BYTES, size - 8):
                raise ImportRefused(f"{path}: not a safetensors file (header length {n})")
            header = loads_limited(f.read(n), f"{path}: its header", ImportRefused, max_bytes=MAX_HEADER_BYTES)
    except OSError as e:
        raise ImportRefused(f"{path} cannot be read: {e.strerror or e}") from None
    if not isinstance(header, dict):
        raise ImportRefused(f"{path}: not a safetensors file (its header is not an object)")
    header.pop("__metadata__", None)
    for key, entry in header.items():
        ok = (isinstance(entry, dict) and isinstance(entry.get("dtype"), str) and isinstance(entry.get("shape"), list)
              and isinstance(entry.get("data_offsets"), list) and len(entry["data_offsets"]) == 2
              and all(isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in entry["shape"] + entry["data_offsets"]))
        if not ok or not entry["data_offsets"][0] <= entry["data_offsets"][1] <= size - 8 - n:
            raise ImportRefused(f"{path}: tensor {key!r} has a malformed entry {entry!r}")
    return header, 8 + n


_WIDTH = {"F32": 4, "F16": 2, "BF16": 2}


def _read_tensor(path: Path, start: int, key: str, entry: dict) -> np.ndarray:
    """One tensor as float32 (float16 and bfloat16 widened exactly)."""
    dtype, shape = entry["dtype"], tuple(entry["shape"])
    if dtype not in _WIDTH:
        raise ImportRefused(
            f"{path}: tensor {key!r} is {dtype}; only float32, float16 and bfloat16 weights import (as float32)"
        )
    lo, hi = entry["data_offsets"]
    if hi - lo != math.prod(shape) * _WIDTH[dtype]:
        raise ImportRefused(f"{path}: tensor {key!r} holds {hi - lo} bytes, its {dtype}{list(shape)} needs "
                            f"{math.prod(shape) * _WIDTH[dtype]}")
    with open(path, "rb") as f:
        f.seek(start + lo)
        raw = f.read(hi - lo)
    if dtype == "F32":
        a = np.frombuffer(raw, dtype="<f4").astype(np.float32)
    elif dtype == "F16":
        a = np.frombuffer(raw, dtype="<f2").astype(np.float32)
    else:  # bfloat16 is the top half of a float32
        a = (np.frombuffer(raw, dtype="<u2").astype(np.uint32) << 16).view(np.float32)
    return a.reshape(shape)


def _weight_files(folder: Path) -> list[Path]:
    single, index = folder / "model.safetensors", folder / "model.safetensors.index.json"
    if single.is_file():
        return [single]
    if index.is_file():
        doc = loads_limited(index.read_bytes(), str(index), ImportRefused)
        wmap = doc.get("weight_map") if isinstance(doc, dict) else None
        if not isinstance(wmap, dict) or not wmap:
            raise ImportRefused(f"{index}: weight_map is missing or empty")
        shards = []
        for key, name in wmap.items():
            if not isinstance(name, str) or Path(name).name != name or name in ("", ".", ".."):
                raise ImportRefused(f"{index}: weight_map[{key!r}] = {name!r} is not a file name in {folder}")
            if not (folder / name).is_file():
                raise ImportRefused(f"{index}: weight_map[{key!r}] names {name}, which is not in {folder}")
            if folder / name not in shards:
                shards.append(folder / name)
        return shards
    if (folder / "pytorch_model.bin").exists() or (folder / "pytorch_model.bin.index.json").exists():
        raise ImportRefused(
            f"{folder} holds its weights only as pytorch_model.bin, a Python pickle, which this importer never "
            f"loads (unpickling runs code); convert them to model.safetensors first with a tool you trust "
            f"(transformers' save_pretrained writes safetensors)"
        )
    raise ImportRefused(f"{folder} has no model.safetensors (nor model.safetensors.index.json)")


def read_weights(folder: Path, cfg: GPT2Config) -> tuple[dict[str, np.ndarray], list[Path]]:
    """This project's parameters from the folder's safetensors, and the files read."""
    files = _weight_files(folder)
    where: dict[str, tuple[Path, int, str, dict]] = {}  # name without prefix -> (file, data start, key, entry)
    for path in files:
        header, start = _header(path)
        for key, entry in header.items():
            name = key[len(PREFIX):] if key.startswith(PREFIX) else key
            if name in where:
                raise ImportRefused(f"{path}: tensor {key!r} is also in {where[name][0]} as {where[name][2]!r}")
            where[name] = (path, start, key, entry)
    shapes = hf_shapes(cfg.to_dict())
    for name, (path, _, key, _) in where.items():
        if name not in shapes and name != LM_HEAD and not name.endswith(MASK_BUFFERS):
            raise ImportRefused(
                f"{path}: tensor {key!r} is not one of GPT-2's language-model weights as this project computes them "
                f"(cross-attention, another head, or another architecture?)"
            )

    def get(name: str) -> np.ndarray:
        if name not in where:
            raise ImportRefused(f"{folder}: the weights lack {name!r} (nor {PREFIX + name!r})")
        path, start, key, entry = where[name]
        if tuple(entry["shape"]) != shapes[name]:
            raise ImportRefused(
                f"{path}: tensor {key!r} has shape {entry['shape']}, config.json implies {list(shapes[name])}"
            )
        a = _read_tensor(path, start, key, entry)
        if not np.isfinite(a).all():
            raise ImportRefused(f"{path}: tensor {key!r} holds NaN or infinite values")
        return a

    weights = from_hf(get, cfg.to_dict())
    if LM_HEAD in where:
        path, start, key, entry = where[LM_HEAD]
        head = _read_tensor(path, start, key, entry)
        if head.shape != weights["wte"].shape or not np.array_equal(head, weights["wte"]):
            raise ImportRefused(
                f"{path}: tensor {key!r} differs from the token embedding (an untied output layer); this project "
                f"ties the output layer to wte (tie_word_embeddings)"
            )
    assert list(weights) == [n for n, _ in param_specs(cfg)]
    return weights, files


# --------------------------------------------------------------------------- tokenizer
def _bpe_from_vocab_merges(folder: Path):
    """GPT-2's byte-level BPE from vocab.json + merges.txt, as the tokenizers library builds it."""
    from tokenizers import AddedToken, Tokenizer, decoders, pre_tokenizers, processors
    from tokenizers.models import BPE

    vocab, merges = folder / "vocab.json", folder / "merges.txt"
    try:
        tok = Tokenizer(BPE.from_file(str(vocab), str(merges)))
    except Exception as e:  # the library raises plain Exception subclasses for malformed files
        raise ImportRefused(f"{vocab} + {merges}: not a byte-level BPE vocabulary ({e})") from None
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    specials = ["<|endoftext|>"]
    stm = folder / "special_tokens_map.json"
    if stm.is_file():
        doc = loads_limited(stm.read_bytes(), str(stm), ImportRefused)
        for v in (doc.values() if isinstance(doc, dict) else ()):
            v = v.get("content") if isinstance(v, dict) else v
            if isinstance(v, str) and v not in specials:
                specials.append(v)
    known = tok.get_vocab()
    tok.add_special_tokens([AddedToken(s, special=True) for s in specials if s in known])
    return tok


def read_tokenizer(folder: Path, vocab: int) -> tuple[dict, dict[str, bytes], list[Path]] | None:
    """(manifest entry, files to copy in, source files read) of the folder's tokenizer, or None."""
    from tokenizers import Tokenizer

    tj, vj, mt = folder / TOKENIZER_FILE, folder / "vocab.json", folder / "merges.txt"
    if tj.is_file():
        data = tj.read_bytes()
        try:
            tok = Tokenizer.from_str(data.decode("utf-8"))
        except Exception as e:  # tokenizers raises plain Exception for malformed JSON
            raise ImportRefused(f"{tj}: not a tokenizers tokenizer.json ({' '.join(str(e).split())})") from None
        read = [tj]
    elif vj.is_file() or mt.is_file():
        if not (vj.is_file() and mt.is_file()):
            have, lack = (vj, mt) if vj.is_file() else (mt, vj)
            raise ImportRefused(f"{folder} has {have.name} but no {lack.name}; a byte-level BPE needs both")
        tok = _bpe_from_vocab_merges(folder)
        data = tok.to_str().encode("utf-8")
        read = [vj, mt]
    else:
        return None
    ids = tok.get_vocab(with_added_tokens=True).values()
    size = max(tok.get_vocab_size(with_added_tokens=True), max(ids, default=-1) + 1)
    if size > vocab:
        raise ImportRefused(
            f"{read[0]}: the tokenizer has {size:,} token ids, more than the model's vocab_size {vocab:,} "
            f"(config.json): its ids would not fit the embedding"
        )
    entry = {"kind": "huggingface", "file": TOKENIZER_FILE, "sha256": hashlib.sha256(data).hexdigest(),
             "vocab_size": size}
    return entry, {TOKENIZER_FILE: data}, read


# --------------------------------------------------------------------------- all of it
def import_hf(folder: str | Path, **options) -> Imported:
    """Config, weights and tokenizer of a Hugging Face GPT-2 folder (ImportRefused when it cannot be)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ImportRefused(f"--from-hf {folder} is not a folder")
    cfg = read_config(folder, **options)
    weights, weight_files = read_weights(folder, cfg)
    tok = read_tokenizer(folder, cfg.vocab)
    read = [folder / "config.json", *weight_files]
    if (folder / "model.safetensors.index.json").is_file() and weight_files[0].name != "model.safetensors":
        read.append(folder / "model.safetensors.index.json")
    if tok is None:
        entry, files = {"kind": "bytes", "vocab_size": BYTES_VOCAB_SIZE}, {}
    else:
        entry, files, tok_read = tok
        read += tok_read
    source = {"kind": "huggingface", "files": {p.name: sha256_file(p) for p in read}}
    return Imported(config=cfg, weights=weights, files=files, source=source, tokenizer=entry)
