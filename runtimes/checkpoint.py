"""One checkpoint format for every runtime: a single safetensors file.

Tensors: ``param/<name>`` for every parameter, ``adam_m/<name>`` and
``adam_v/<name>`` (AdamW moments) where the runtime can export them, and
``native/<runtime>`` (uint8 bytes) for state only a runtime's own format holds
(ONNX Runtime training's checkpoint). Metadata (safetensors' string map):
format and version, runtime, step count, the artifact folder and its model
fingerprint, and ``extra`` (JSON: the data sampler's state, run options).
A LoRA checkpoint holds the adapters as its parameters (and their moments) and
``base`` (JSON: path and sha256 of the base.safetensors it trained on), which
resume checks: the frozen base is not in the file.

Writes are atomic (contract.files.write_atomic): a crash at any point leaves
either the old file or the new one, never half of one; a write that fails
raises OutputError and leaves the target as it was.

Loading checks, before any runtime sees the tensors: the file is complete
(safetensors' header and sizes), of this format and version, its step is a
non-negative integer, every tensor is float32, the moments (if any) cover
exactly the parameters with the same shapes, every value is finite (a
checkpoint is only written from a finite state), and the sha256 of the
tensors recorded at save time still matches (a flipped bit is caught, not
trained on). Anything else is a CheckpointError naming the file.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from contract.files import write_atomic
from contract.jsonlimits import dumps_strict, loads_limited

from .errors import CheckpointError, InputError

FORMAT = "gpt2-onnx-checkpoint"
VERSION = 1


@dataclass
class Checkpoint:
    runtime: str
    step: int
    artifacts: str
    fingerprint: str
    params: dict[str, np.ndarray]
    adam_m: dict[str, np.ndarray] | None = None
    adam_v: dict[str, np.ndarray] | None = None
    native: bytes | None = None
    extra: dict = field(default_factory=dict)
    base: dict | None = None  # a LoRA checkpoint's base weights: {"path", "sha256"}


def _tensors_sha256(tensors: dict[str, np.ndarray]) -> str:
    h = hashlib.sha256()
    for k in sorted(tensors):
        a = np.ascontiguousarray(tensors[k])
        h.update(f"{k}|{a.dtype.str}|{list(a.shape)}|".encode())
        h.update(memoryview(a).cast("B"))
    return h.hexdigest()


def save_checkpoint(path: str | Path, ckpt: Checkpoint) -> None:
    from safetensors.numpy import save

    tensors = {f"param/{k}": np.ascontiguousarray(v) for k, v in ckpt.params.items()}
    for prefix, d in (("adam_m", ckpt.adam_m), ("adam_v", ckpt.adam_v)):
        for k, v in (d or {}).items():
            tensors[f"{prefix}/{k}"] = np.ascontiguousarray(v)
    if ckpt.native is not None:
        tensors[f"native/{ckpt.runtime}"] = np.frombuffer(ckpt.native, dtype=np.uint8)
    meta = {
        "format": FORMAT,
        "version": str(VERSION),
        "runtime": ckpt.runtime,
        "step": str(ckpt.step),
        "artifacts": ckpt.artifacts,
        "fingerprint": ckpt.fingerprint,
        "extra": dumps_strict(ckpt.extra, "checkpoint extra", InputError),
        "tensors_sha256": _tensors_sha256(tensors),
    }
    if ckpt.base is not None:
        meta["base"] = dumps_strict(ckpt.base, "checkpoint base", InputError)
    write_atomic(Path(path), save(tensors, metadata=meta))


def load_checkpoint(path: str | Path) -> Checkpoint:
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        with safe_open(str(path), framework="numpy") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors raises its own error types for truncation/corruption
        raise CheckpointError(f"checkpoint {path} is unreadable (truncated or not a checkpoint): {e}") from None
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a {FORMAT} file (format={meta.get('format')!r})")
    if meta.get("version") != str(VERSION):
        raise CheckpointError(f"{path}: checkpoint version {meta.get('version')!r}, this runner reads {VERSION}")
    try:
        step = int(meta["step"])
        extra = loads_limited(meta.get("extra", "{}"), f"{path}: metadata 'extra'", CheckpointError)
    except (KeyError, ValueError) as e:
        raise CheckpointError(f"{path}: malformed metadata: {e}") from None
    if step < 0:
        raise CheckpointError(f"{path}: step is {step}, must be >= 0")
    if not isinstance(extra, dict):
        raise CheckpointError(f"{path}: metadata 'extra' is a {type(extra).__name__}, expected a JSON object")
    base = None
    if "base" in meta:
        base = loads_limited(meta["base"], f"{path}: metadata 'base'", CheckpointError)
        if not isinstance(base, dict) or not all(isinstance(base.get(k), str) for k in ("path", "sha256")):
            raise CheckpointError(f"{path}: metadata 'base' = {meta['base']!r} is not {{path, sha256}}")
    want_sha = meta.get("tensors_sha256")
    if want_sha is not None and _tensors_sha256(tensors) != want_sha:
        raise CheckpointError(f"{path}: tensor data does not match the sha256 recorded when it was saved (corrupted file)")

    def group(prefix: str) -> dict[str, np.ndarray] | None:
        d = {k[len(prefix) + 1 :]: v for k, v in tensors.items() if k.startswith(prefix + "/")}
        return d or None

    native = None
    nkey = f"native/{meta.get('runtime')}"
    if nkey in tensors:
        native = tensors[nkey].tobytes()
    params = group("param")
    if not params:
        raise CheckpointError(f"{path}: holds no parameters")
    adam_m, adam_v = group("adam_m"), group("adam_v")
    if (adam_m is None) != (adam_v is None):
        raise CheckpointError(f"{path}: holds {'adam_m' if adam_m else 'adam_v'} without {'adam_v' if adam_m else 'adam_m'}")
    for gname, g in (("param", params), ("adam_m", adam_m), ("adam_v", adam_v)):
        if g is None:
            continue
        if gname != "param" and set(g) != set(params):
            diff = sorted(set(g) ^ set(params))
            raise CheckpointError(f"{path}: {gname} and the parameters name different tensors ({diff[:5]})")
        for k, a in g.items():
            if a.dtype != np.float32:
                raise CheckpointError(f"{path}: {gname}/{k} is {a.dtype}, expected float32")
            if gname != "param" and a.shape != params[k].shape:
                raise CheckpointError(f"{path}: {gname}/{k} has shape {list(a.shape)}, its parameter {list(params[k].shape)}")
            if not np.isfinite(a).all():
                raise CheckpointError(f"{path}: {gname}/{k} holds NaN or infinite values; it cannot be trained from")
    return Checkpoint(
        runtime=meta.get("runtime", ""),
        step=step,
        artifacts=meta.get("artifacts", ""),
        fingerprint=meta.get("fingerprint", ""),
        params=params,
        adam_m=adam_m,
        adam_v=adam_v,
        native=native,
        extra=extra,
        base=base,
    )


def check_base(ckpt: Checkpoint, art, where: str) -> None:
    """A LoRA checkpoint resumes only on the base weights it trained (same sha256); CheckpointError otherwise."""
    want, have = ckpt.base, art.base_ref
    if want is None and have is None:
        return
    if want is None or have is None:
        raise CheckpointError(
            f"{where} {'holds adapters of a LoRA folder' if want else 'holds a full model'}, but {art.folder} "
            f"{'is not a LoRA folder' if want else 'is a LoRA folder'}: resume it on the folder it was written for")
    if want["sha256"] != have["sha256"]:
        raise CheckpointError(
            f"{where} trained adapters on base weights {want['path']} (sha256 {want['sha256'][:16]}...), but "
            f"{have['path']} has sha256 {have['sha256'][:16]}...: a LoRA checkpoint resumes only on its own base")
