"""ONNX Runtime's on-device training set: training/eval/optimizer models and checkpoint.

Made with onnxruntime-training 1.19.2's ``artifacts.generate_artifacts`` (its
gradient builder derives the backward pass; ours in train_step.onnx is an
independent derivation), then corrected where 1.19.2's defaults differ from the
seed (docs/dependencies.md):
- onnxblock's AdamW hard-codes ``adam_mode=1`` (Hugging Face: decay after the
  update). The seed's update is PyTorch's AdamW: ``adam_mode=0`` with
  ``correct_bias=1``; we rewrite the attribute.
- onnx 1.23 saves IR version 11+, which ORT 1.19 cannot read; every model is
  re-saved at IR 10.

Gradient clipping (``cfg.clip`` > 0) is onnxblock's ``ClipGradNorm`` ahead of AdamW:
its InplaceClipGradNorm kernel scales every gradient by
``max_norm / (norm + 1e-6)`` when that is below 1, torch's clip_grad_norm_. Its
``max_norm`` is an attribute, so the threshold is fixed when the set is built, and
the kernel does not report the norm.
"""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
from pathlib import Path

import onnx
from onnx import numpy_helper

from .config import GPT2Config
from contract import IR_VERSION, TRAINING_FILES  # noqa: F401  (TRAINING_FILES: the files this writes)


def training_set_available() -> bool:
    """Whether this environment can write the training set (onnxruntime-training is
    installed). An environment with onnxruntime-gpu cannot hold it: both install the
    same ``onnxruntime`` package."""
    from contract.ort_env import stub_training_package

    return stub_training_package() is not None


def _import_ort_training():
    """onnxruntime.training's artifacts/onnxblock, without torch (runtimes.ort_env says how)."""
    from contract.ort_env import import_onnxruntime, stub_training_package

    if stub_training_package() is None:
        raise ImportError(
            "this environment has no onnxruntime-training; install onnxruntime-training-cpu==1.19.2 "
            "(pip install '.[training]') to build the ONNX Runtime training set"
        )
    onnxruntime = import_onnxruntime()
    onnxruntime.set_default_logger_severity(3)  # its graph transformers log every pass at INFO
    from onnxruntime.training import artifacts, onnxblock  # noqa: E402

    return artifacts, onnxblock


@contextlib.contextmanager
def _quiet_native_stderr():
    """ORT 1.19's gradient builder logs every graph pass at INFO on fd 2, whatever
    the logger severity; hold that output back and replay it only on failure."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as sink:
        os.dup2(sink.fileno(), 2)
        try:
            yield
        except BaseException:
            os.dup2(saved, 2)
            sink.seek(0)
            sys.stderr.write(sink.read().decode(errors="replace")[-5000:])
            raise
        finally:
            os.dup2(saved, 2)
            os.close(saved)


def _with_params_as_initializers(forward: onnx.ModelProto, weights: dict) -> onnx.ModelProto:
    """ORT's gradient builder differentiates initializers: move the parameters there."""
    model = onnx.ModelProto()
    model.CopyFrom(forward)
    keep = [i for i in model.graph.input if i.name not in weights]
    del model.graph.input[:]
    model.graph.input.extend(keep)
    for name, array in weights.items():
        model.graph.initializer.append(numpy_helper.from_array(array, name))
    return model


def _resave_ir10(path: Path, fix_adamw: bool = False) -> None:
    model = onnx.load(str(path))
    model.ir_version = IR_VERSION
    if fix_adamw:
        found = 0
        for node in model.graph.node:
            if node.op_type == "AdamWOptimizer":
                for attr in node.attribute:
                    if attr.name == "adam_mode":
                        attr.i = 0  # PyTorch AdamW (the seed's update)
                    if attr.name == "correct_bias":
                        attr.i = 1
                found += 1
        if found != 1:
            raise RuntimeError(f"expected one AdamWOptimizer node in {path}, found {found}")
    onnx.save(model, str(path))


def write_training_set(
    forward_loss: onnx.ModelProto, weights: dict, cfg: GPT2Config, out: Path, frozen: dict | None = None
) -> None:
    """``weights`` are trained; ``frozen`` (a LoRA folder's base) are initializers too, handed to
    generate_artifacts as frozen_params: in ORT's checkpoint, never given gradients or moments."""
    artifacts, onnxblock = _import_ort_training()
    model = _with_params_as_initializers(forward_loss, {**(frozen or {}), **weights})
    optimizer = onnxblock.optim.AdamW(
        bias_correction=True,
        betas=(cfg.beta1, cfg.beta2),
        eps=cfg.eps,
        weight_decay=cfg.weight_decay,
        clip_grad=onnxblock.optim.ClipGradNorm(cfg.clip) if cfg.clip > 0 else None,
    )
    with _quiet_native_stderr():
        artifacts.generate_artifacts(
            model,
            requires_grad=list(weights),
            frozen_params=list(frozen or {}),
            loss=None,  # the forward graph already ends in the loss
            optimizer=optimizer,
            artifact_directory=str(out),
        )
    for name in ("training_model.onnx", "eval_model.onnx"):
        _resave_ir10(out / name)
    _resave_ir10(out / "optimizer_model.onnx", fix_adamw=True)
