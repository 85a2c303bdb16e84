"""Writes an artifact folder: every model, the initial weights and manifest.json.

The manifest is the contract the runners and hosts read (they never import this
package): config, every model's input/output names, dtypes and shapes in order,
the parameter order, the hp layout, opset/IR versions, tool versions and the
sha256 of every file.

The folder is built in a temporary sibling and swapped into place, so a failed
build never leaves a half-written folder behind. The target is replaced only
when it is empty or is an artifact folder of this project holding nothing but
its own files (``force`` also accepts unknown extra files in an artifact
folder); anything else is a user's folder and is refused untouched, checked
once before building and again just before the swap.
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

from contract import (CLIP_INPUT, CONSTANTS, GRAD_NORM_OUTPUT, HP_LAYOUT, IR_VERSION, MANIFEST_FORMAT, MANIFEST_VERSION,
                      OPSET, TRAINING_FILES, TRAINING_SET_OPSET, name_template)
from contract.files import sha256_file
from contract.manifest import describe_io

from .config import GPT2Config, param_specs
from .init import init_weights
from .model import build_forward_logits, build_forward_loss
from .ort_training_set import write_training_set
from .train_step import build_train_step



def _tool_versions() -> dict[str, str]:
    tools = {"python": platform.python_version()}
    for dist in ("gpt2-onnx-train", "onnx", "onnxscript", "onnx-ir", "numpy", "onnxruntime-training-cpu", "onnxruntime-training"):
        try:
            tools[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            pass
    return tools


def _model_io(path: Path) -> dict:
    return describe_io(onnx.load(str(path), load_external_data=False))


def _save(model: onnx.ModelProto, path: Path) -> None:
    model.ir_version = IR_VERSION
    onnx.checker.check_model(model, full_check=True)
    onnx.save(model, str(path))


class OutputFolderError(Exception):
    """``--out`` cannot be (re)placed: a user's folder, a file, or not writable. Nothing was touched."""


def _describe(names: list[str], limit: int = 5) -> str:
    shown = ", ".join(sorted(names)[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def check_out_folder(out: Path, force: bool = False) -> None:
    """Raise OutputFolderError unless ``out`` may be created or replaced by a build.

    Replaceable: a missing path, an empty folder, or a folder whose manifest.json
    is this project's and which holds only the files that manifest lists (with
    ``force``, other files too). A symbolic link is refused rather than followed:
    replacing it would swap the link, not the folder it names.
    """
    if out.is_symlink():
        raise OutputFolderError(f"--out {out} is a symbolic link; give the folder's real path ({out.resolve()})")
    if not out.exists():
        return
    if not out.is_dir():
        raise OutputFolderError(f"--out {out} is an existing file, not a folder; nothing was written")
    try:
        entries = os.listdir(out)
    except OSError as e:
        raise OutputFolderError(f"--out {out} cannot be read: {e.strerror or e}") from None
    if not entries:
        return
    manifest = None
    try:
        with open(out / "manifest.json", "rb") as f:
            manifest = json.loads(f.read(64 << 20))
    except (OSError, ValueError, RecursionError):
        pass
    listed = manifest.get("files") if isinstance(manifest, dict) and manifest.get("format") == MANIFEST_FORMAT else None
    if not isinstance(listed, dict):
        raise OutputFolderError(
            f"--out {out} is not empty and is not an artifact folder (it holds {_describe(entries)}); "
            f"nothing was touched: choose an empty or new folder"
        )
    extra = [e for e in entries if e != "manifest.json" and e not in listed]
    if extra and not force:
        raise OutputFolderError(
            f"--out {out} is an artifact folder that also holds files it did not build ({_describe(extra)}); "
            f"nothing was touched: move them away, or pass --force to replace the folder with them"
        )


def _swap_in(tmp: Path, out: Path, force: bool) -> None:
    """Move the finished build ``tmp`` to ``out``, replacing what check_out_folder allows."""
    check_out_folder(out, force)  # again: the folder may have changed during the build
    if out.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old.", dir=out.parent))
        os.rmdir(old)
        os.replace(out, old)
        try:
            os.replace(tmp, out)
        except BaseException:
            os.replace(old, out)
            raise
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out)


def build_artifacts(cfg: GPT2Config, out: Path, log=print, force: bool = False) -> dict:
    """Build every artifact for ``cfg`` into ``out``; returns the manifest.

    Raises OutputFolderError, before any work, when ``out`` may not be replaced
    (see check_out_folder) or its parent cannot be written."""
    out = Path(os.path.abspath(out))  # "." and "..": the folder they name, not an empty name
    check_out_folder(out, force)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    except OSError as e:
        raise OutputFolderError(f"--out {out}: cannot create a folder in {out.parent}: {e.strerror or e}") from None
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
        _swap_in(tmp, out, force)
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
            "dtype": CONSTANTS["hp"]["dtype"],
            "length": len(HP_LAYOUT),
            "layout": list(HP_LAYOUT),
            "notes": CONSTANTS["hp"]["notes"],
        },
        "training_set": list(TRAINING_FILES),
        "train_step": {
            "file": "train_step.onnx",
            "moments": {"m": name_template("m"), "v": name_template("v")},
            "outputs": {"param": name_template("new_param"), "m": name_template("new_m"), "v": name_template("new_v")},
            "clip": {"input": CLIP_INPUT, "dtype": "float32", "shape": [], "off": CONSTANTS["clip"]["off"],
                     "norm_output": GRAD_NORM_OUTPUT,
                     "rule": "norm = sqrt(sum over parameters of sum(g^2)); "
                             "g <- g * min(1, clip / (norm + 1e-6)) before AdamW (torch.nn.utils.clip_grad_norm_)"},
            "update": "m' = b1 m + (1-b1) g; v' = b2 v + (1-b2) g^2; "
            "w' = w (1 - lr wd) - lr (m' beta1h) / (sqrt(v' beta2h) + eps)",
        },
        "models": {name: _model_io(folder / name) for name in model_files},
        "files": {name: {"sha256": sha256_file(folder / name), "bytes": (folder / name).stat().st_size} for name in files},
        "tools": _tool_versions(),
        "created_unix": int(time.time()),
    }
