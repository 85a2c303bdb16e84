"""Importing onnxruntime's training pieces without torch.

onnxruntime-training 1.19.2's ``import onnxruntime`` validates its build by
importing ``onnxruntime.training.ortmodule``, which imports torch (~5 s), and
``onnxruntime.training.__init__`` imports ``amp``/``optim``, which need torch.
None of this package uses them. Registering a bare package module for
``onnxruntime.training`` whose __path__ is the package folder lets ``api``,
``artifacts`` and ``onnxblock`` import alone (docs/dependencies.md), and an absent
``ortmodule`` makes the build validation skip. With plain onnxruntime (no
training folder) nothing is stubbed.
"""

from __future__ import annotations

import importlib.util
import sys
import types
from pathlib import Path


def training_folder() -> Path | None:
    """onnxruntime/training when this environment has onnxruntime-training, else None."""
    spec = importlib.util.find_spec("onnxruntime")
    if spec is None or not spec.submodule_search_locations:
        return None
    folder = Path(list(spec.submodule_search_locations)[0]) / "training"
    return folder if (folder / "api").is_dir() else None


def stub_training_package() -> Path | None:
    """Register the torch-free ``onnxruntime.training`` package; returns its folder or None."""
    folder = training_folder()
    if folder is not None and "onnxruntime.training" not in sys.modules:
        pkg = types.ModuleType("onnxruntime.training")
        pkg.__path__ = [str(folder)]
        sys.modules["onnxruntime.training"] = pkg
    return folder


def import_onnxruntime():
    """``import onnxruntime``, skipping the training wheel's torch import."""
    if "onnxruntime" in sys.modules:
        return sys.modules["onnxruntime"]
    if stub_training_package() is not None and "onnxruntime.training.ortmodule" not in sys.modules:
        sys.modules["onnxruntime.training.ortmodule"] = None  # importing it raises ImportError: validation skips
        try:
            import onnxruntime
        finally:
            del sys.modules["onnxruntime.training.ortmodule"]
        return onnxruntime
    import onnxruntime

    return onnxruntime
