"""One checkpoint format for every runtime: a single safetensors file.

Tensors: ``param/<name>`` for every parameter, ``adam_m/<name>`` and
``adam_v/<name>`` (AdamW moments) where the runtime can export them, and
``native/<runtime>`` (uint8 bytes) for state only a runtime's own format holds
(ONNX Runtime training's checkpoint). Metadata (safetensors' string map):
format and version, runtime, step count, the artifact folder and its model
fingerprint, and ``extra`` (JSON: the data sampler's state, run options).

Writes are atomic: the bytes go to a temporary file in the target's folder,
which is fsynced, renamed over the target, and the folder fsynced. A crash at
any point leaves either the old file or the new one, never half of one.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .errors import CheckpointError

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


def write_atomic(path: Path, data: bytes) -> None:
    path = Path(path)
    folder = path.parent if str(path.parent) else Path(".")
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    dfd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


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
        "extra": json.dumps(ckpt.extra),
    }
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
        extra = json.loads(meta.get("extra", "{}"))
    except (KeyError, ValueError) as e:
        raise CheckpointError(f"{path}: malformed metadata: {e}") from None

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
    return Checkpoint(
        runtime=meta.get("runtime", ""),
        step=step,
        artifacts=meta.get("artifacts", ""),
        fingerprint=meta.get("fingerprint", ""),
        params=params,
        adam_m=group("adam_m"),
        adam_v=group("adam_v"),
        native=native,
        extra=extra,
    )
