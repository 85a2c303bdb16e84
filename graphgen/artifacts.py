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
once before building and again just before the swap (contract/outfolder.py).
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import time
from importlib import metadata
from pathlib import Path

import onnx
from safetensors.numpy import save_file

from contract import (BASE_FILE, BYTES_VOCAB_SIZE, CLIP_INPUT, CONSTANTS, FROZEN_MANIFEST_VERSION, GRAD_NORM_OUTPUT,
                      HP_LAYOUT, IR_VERSION, MANIFEST_FORMAT, MANIFEST_VERSION, OPSET, TRAINING_FILES,
                      TRAINING_SET_OPSET, name_template, new_name)
from contract.files import sha256_file
from contract.lora import adapter_specs
from contract.manifest import describe_io
from contract.outfolder import FolderKind, OutputFolderError, make_temp_sibling, swap_in  # noqa: F401 (re-exported)
from contract.outfolder import check_out_folder as check_out_folder_of

from .config import GPT2Config, param_specs
from .decoder import build_decoder
from .init import init_weights
from .lora import init_adapters
from .model import build_forward_logits, build_forward_loss
from .in_place import parameters_updatable_in_place
from .recompute import checked_kinds, default_recompute, recompute as recompute_pass
from .ort_training_set import training_set_available, write_training_set
from .train_step import build_apply_step, build_grad_step, build_train_step



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


ARTIFACT_FOLDER = FolderKind(marker="manifest.json", format=MANIFEST_FORMAT, noun="an artifact folder", option="--out")


def check_out_folder(out: Path, force: bool = False) -> None:
    """Raise OutputFolderError unless ``out`` may be created or replaced by a build.

    Replaceable: a missing path, an empty folder, or a folder whose manifest.json
    is this project's and which holds only the files that manifest lists (with
    ``force``, other files too). A symbolic link is refused rather than followed.
    """
    check_out_folder_of(out, ARTIFACT_FOLDER, force)


def build_artifacts(cfg: GPT2Config, out: Path, log=print, force: bool = False, imported=None,
                    recompute_attention: bool = False, lora: dict | None = None,
                    recompute: list[str] | None = None) -> dict:
    """Build every artifact for ``cfg`` into ``out``; returns the manifest.

    ``imported`` (an hf_import.Imported) supplies the weights, the files to copy
    in (the tokenizer) and the manifest's ``source`` and ``tokenizer``; without
    it the weights are the LCG init and the tokenizer is bytes. ``recompute``: what the
    step graphs' backward recomputes instead of keeping (graphgen/recompute.py: the same
    numbers, less memory, more work); None: recompute.default_recompute for the context;
    ``recompute_attention`` is ``recompute=["attention"]``.
    ``lora`` (contract.lora.check_lora's entry) makes a LoRA folder: those weights
    become the frozen base (base.safetensors, inputs of every model, never
    updated), the adapters the parameters (weights.safetensors, PEFT's init;
    inputs of forward.onnx and the step graphs; decoder.onnx is the plain model,
    which samplers and exports feed the merged weights W + B A alpha/rank), and
    the manifest is format_version 4 with ``frozen`` and ``lora``. Its ONNX Runtime
    training set trains the adapters with the base as frozen_params.
    Raises OutputFolderError, before any work, when ``out`` may not be replaced
    (see check_out_folder) or its parent cannot be written."""
    out = Path(os.path.abspath(out))  # "." and "..": the folder they name, not an empty name
    check_out_folder(out, force)
    tmp = make_temp_sibling(out, ARTIFACT_FOLDER)
    try:
        t0 = time.perf_counter()
        if imported is None:
            weights = init_weights(cfg)
            meta = {"init": cfg.init, "seed": str(cfg.seed)}
            source = {"kind": "init", "init": cfg.init, "seed": cfg.seed}
            tokenizer = {"kind": "bytes", "vocab_size": BYTES_VOCAB_SIZE}
        else:
            weights, meta = imported.weights, {"source": "huggingface"}
            source, tokenizer = imported.source, imported.tokenizer
            for name, data in imported.files.items():
                (tmp / name).write_bytes(data)
        log(f"{'init' if imported is None else 'imported'}: {sum(w.size for w in weights.values()):,} parameters "
            f"({time.perf_counter() - t0:.1f}s)")
        base: dict = {}  # a LoRA folder's frozen base weights
        if lora is not None:
            # One metadata key: safetensors writes a map's keys in no fixed order, and checkpoints
            # name their base by this file's sha256, which a rebuild must reproduce.
            save_file(weights, str(tmp / BASE_FILE), metadata={"base": json.dumps(meta, sort_keys=True)})
            base, weights = weights, init_adapters(cfg, lora)
            save_file(weights, str(tmp / "weights.safetensors"), metadata={"lora": "init", "seed": str(cfg.seed + 1)})
            log(f"LoRA rank {lora['rank']} on {','.join(lora['targets'])}: {sum(w.size for w in weights.values()):,} "
                f"trainable parameters")
        else:
            save_file(weights, str(tmp / "weights.safetensors"), metadata=meta)

        _save(build_forward_logits(cfg, lora=lora), tmp / "forward.onnx")
        log(f"forward.onnx ({time.perf_counter() - t0:.1f}s)")

        _save(build_decoder(cfg), tmp / "decoder.onnx")  # a LoRA folder's too: samplers merge the adapters in
        log(f"decoder.onnx ({time.perf_counter() - t0:.1f}s)")

        if recompute is None:
            recompute = ["attention"] if recompute_attention else default_recompute(cfg.context)
        recompute = checked_kinds(recompute)
        frozen = tuple(base)
        loss_graph = build_forward_loss(cfg, lora=lora)
        train_step = recompute_pass(build_train_step(loss_graph, list(weights), frozen=frozen), recompute)
        _save(train_step, tmp / "train_step.onnx")
        log(f"train_step.onnx ({time.perf_counter() - t0:.1f}s)")

        _save(recompute_pass(build_grad_step(loss_graph, list(weights), frozen=frozen), recompute),
              tmp / "grad_step.onnx")
        apply_step = build_apply_step(loss_graph, list(weights), frozen=frozen)
        _save(apply_step, tmp / "apply_step.onnx")
        log(f"grad_step.onnx, apply_step.onnx ({time.perf_counter() - t0:.1f}s)")
        # checked on the graphs just written, before they are dropped
        in_place = all(parameters_updatable_in_place(m, list(weights), new_name) for m in (train_step, apply_step))
        del loss_graph, train_step, apply_step

        if training_set_available():
            write_training_set(build_forward_loss(cfg, gelu="expanded", lora=lora), weights, cfg, tmp, frozen=base)
            training_files = list(TRAINING_FILES)
            log(f"ONNX Runtime training set ({time.perf_counter() - t0:.1f}s)")
        else:
            # The other runtimes need only the loss graph of the set; written here in the
            # same spelling and with the same inputs and output as onnxruntime-training's.
            _save(build_forward_loss(cfg, gelu="expanded", lora=lora), tmp / "eval_model.onnx")
            training_files = []
            log("eval_model.onnx; ONNX Runtime training set skipped: onnxruntime-training is not installed "
                "here (pip install '.[training]'), so the ort-training runtime cannot use this folder")

        manifest = _manifest(cfg, tmp, source, tokenizer, training_files, in_place,
                             recompute, lora)
        with open(tmp / "manifest.json", "w") as f:
            json.dump(manifest, f, indent=1)
        for p in tmp.iterdir():
            p.chmod(0o644)
        swap_in(tmp, out, ARTIFACT_FOLDER, force)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log(f"wrote {out} ({time.perf_counter() - t0:.1f}s)")
    return manifest


def _manifest(cfg: GPT2Config, folder: Path, source: dict, tokenizer: dict, training_files: list[str],
              in_place: bool, recompute: list[str], lora: dict | None = None) -> dict:
    model_files = sorted(p.name for p in folder.glob("*.onnx"))
    files = sorted(p.name for p in folder.iterdir() if p.is_file())
    base = [{"name": n, "shape": list(s), "dtype": "float32"} for n, s in param_specs(cfg)]
    lora_part = {}
    if lora is not None:
        lora_part = {"frozen": {"file": BASE_FILE, "sha256": sha256_file(folder / BASE_FILE), "parameters": base},
                     "lora": dict(lora)}
        base = [{"name": n, "shape": list(s), "dtype": "float32"}
                for n, s in adapter_specs(cfg.to_dict(), lora["rank"], lora["targets"])]
    return {
        "format": MANIFEST_FORMAT,
        "format_version": MANIFEST_VERSION if lora is None else FROZEN_MANIFEST_VERSION,
        "name": cfg.name,
        "config": cfg.to_dict(),
        "opset": OPSET,  # train_step.onnx, forward.onnx, decoder.onnx
        "training_set_opset": TRAINING_SET_OPSET,
        "ir_version": IR_VERSION,
        "parameters": base,
        **lora_part,
        "hp": {
            "dtype": CONSTANTS["hp"]["dtype"],
            "length": len(HP_LAYOUT),
            "layout": list(HP_LAYOUT),
            "notes": CONSTANTS["hp"]["notes"],
        },
        "training_set": training_files,  # empty when built without onnxruntime-training
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
            # true: in train_step.onnx and apply_step.onnx every reader of a parameter (or of a
            # view of it) is an ancestor of the node writing its new.* output, so a runner may
            # bind new.<p> to <p>'s own buffer (graphgen/in_place.py checked the graphs written)
            "in_place": in_place,
            # what the backward of train_step.onnx and grad_step.onnx recomputes instead of
            # keeping from the forward (build --recompute): a subset of ["attention", "gelu"]
            "recompute": recompute,
        },
        "models": {name: _model_io(folder / name) for name in model_files},
        "files": {name: {"sha256": sha256_file(folder / name), "bytes": (folder / name).stat().st_size} for name in files},
        "source": source,
        "tokenizer": tokenizer,
        "tools": _tool_versions(),
        "created_unix": int(time.time()),
    }
