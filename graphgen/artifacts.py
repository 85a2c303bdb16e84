"""Writes an artifact folder: every model, the initial weights and manifest.json.

The manifest is the contract the runners and hosts read (they never import this
package): config, every model's input/output names, dtypes and shapes in order,
the parameter order, the hp layout, opset/IR versions, tool versions and the
sha256 of every file. The folder is built beside the target and renamed into
place, so a failed build never leaves a half-written folder behind.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import tempfile
import time
from importlib import metadata
from pathlib import Path

import onnx
from safetensors.numpy import save_file

from runtimes.artifacts import sha256_file  # the runners verify with the same function

from .adamw import HP_FIELDS
from .config import GPT2Config, param_specs
from .init import init_weights
from .model import IR_VERSION, OPSET, TRAINING_SET_OPSET, build_forward_logits, build_forward_loss
from .ort_training_set import TRAINING_FILES, write_training_set
from .train_step import build_train_step

MANIFEST_FORMAT = "gpt2-onnx-artifacts"
# 2: portable graphs at opset 20 (Gelu) with a race-free embedding gradient. Version 1's
# train_step.onnx used ScatterND add, which loses additions on multithreaded onnxruntime.
MANIFEST_VERSION = 2

_DTYPES = {
    onnx.TensorProto.FLOAT: "float32",
    onnx.TensorProto.INT64: "int64",
    onnx.TensorProto.BOOL: "bool",
    onnx.TensorProto.DOUBLE: "float64",
}


def _tool_versions() -> dict[str, str]:
    tools = {"python": platform.python_version()}
    for dist in ("gpt2-onnx-train", "onnx", "onnxscript", "onnx-ir", "numpy", "onnxruntime-training-cpu", "onnxruntime-training"):
        try:
            tools[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            pass
    return tools


def _value_info(vi: onnx.ValueInfoProto) -> dict:
    t = vi.type
    if t.HasField("tensor_type"):
        tt = t.tensor_type
        shape = None
        if tt.HasField("shape"):
            shape = [d.dim_param if d.dim_param else (d.dim_value if d.HasField("dim_value") else None) for d in tt.shape.dim]
        return {"name": vi.name, "dtype": _DTYPES.get(tt.elem_type, str(tt.elem_type)), "shape": shape}
    return {"name": vi.name, "dtype": "sequence" if t.HasField("sequence_type") else "other", "shape": None}


def _model_io(path: Path) -> dict:
    model = onnx.load(str(path), load_external_data=False)
    inits = {i.name for i in model.graph.initializer}
    return {
        "inputs": [_value_info(i) for i in model.graph.input if i.name not in inits],
        "outputs": [_value_info(o) for o in model.graph.output],
    }


def _save(model: onnx.ModelProto, path: Path) -> None:
    model.ir_version = IR_VERSION
    onnx.checker.check_model(model, full_check=True)
    onnx.save(model, str(path))


def build_artifacts(cfg: GPT2Config, out: Path, log=print) -> dict:
    """Build every artifact for ``cfg`` into ``out``; returns the manifest."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    tmp.chmod(0o755)
    try:
        t0 = time.perf_counter()
        weights = init_weights(cfg)
        log(f"init: {sum(w.size for w in weights.values()):,} parameters ({time.perf_counter() - t0:.1f}s)")
        save_file(weights, str(tmp / "weights.safetensors"), metadata={"init": cfg.init, "seed": str(cfg.seed)})

        _save(build_forward_logits(cfg), tmp / "forward.onnx")
        log(f"forward.onnx ({time.perf_counter() - t0:.1f}s)")

        _save(build_train_step(build_forward_loss(cfg), list(weights)), tmp / "train_step.onnx")
        log(f"train_step.onnx ({time.perf_counter() - t0:.1f}s)")

        write_training_set(build_forward_loss(cfg, gelu="expanded"), weights, cfg, tmp)
        log(f"ONNX Runtime training set ({time.perf_counter() - t0:.1f}s)")

        manifest = _manifest(cfg, tmp)
        with open(tmp / "manifest.json", "w") as f:
            json.dump(manifest, f, indent=1)
        for p in tmp.iterdir():
            p.chmod(0o644)
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log(f"wrote {out} ({time.perf_counter() - t0:.1f}s)")
    return manifest


def _manifest(cfg: GPT2Config, folder: Path) -> dict:
    model_files = sorted(p.name for p in folder.glob("*.onnx"))
    files = sorted(p.name for p in folder.iterdir() if p.is_file())
    return {
        "format": MANIFEST_FORMAT,
        "format_version": MANIFEST_VERSION,
        "name": cfg.name,
        "config": cfg.to_dict(),
        "opset": OPSET,  # train_step.onnx, forward.onnx
        "training_set_opset": TRAINING_SET_OPSET,
        "ir_version": IR_VERSION,
        "parameters": [{"name": n, "shape": list(s), "dtype": "float32"} for n, s in param_specs(cfg)],
        "hp": {
            "dtype": "float32",
            "length": len(HP_FIELDS),
            "layout": list(HP_FIELDS),
            "notes": "beta1h = 1/(1-beta1^t), beta2h = 1/(1-beta2^t) with the float32 betas of hp, in float64, rounded to float32; t = 1 for the first step",
        },
        "training_set": list(TRAINING_FILES),
        "train_step": {
            "file": "train_step.onnx",
            "moments": {"m": "m.<param>", "v": "v.<param>"},
            "outputs": {"param": "new.<param>", "m": "new.m.<param>", "v": "new.v.<param>"},
            "update": "m' = b1 m + (1-b1) g; v' = b2 v + (1-b2) g^2; "
            "w' = w (1 - lr wd) - lr (m' beta1h) / (sqrt(v' beta2h) + eps)",
        },
        "models": {name: _model_io(folder / name) for name in model_files},
        "files": {name: {"sha256": sha256_file(folder / name), "bytes": (folder / name).stat().st_size} for name in files},
        "tools": _tool_versions(),
        "created_unix": int(time.time()),
    }
