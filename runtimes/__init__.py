"""Runners for GPT-2 training artifacts: one interface, several backends.

    import runtimes
    rt = runtimes.load("artifacts/tiny", runtime="ort-training", device="cpu")
    loss = rt.step(tokens, positions, labels, runtimes.make_hp(1e-3, step=rt.step_count + 1))
    rt.save("run.ckpt"); rt = runtimes.resume("run.ckpt")
"""

from .base import REGISTRY, Runtime, load, resume
from .errors import (
    ArtifactError,
    CheckpointError,
    DataError,
    GPT2OnnxError,
    InputError,
    OutOfMemory,
    OutputError,
    RuntimeUnavailable,
    TrainingDiverged,
)
from .hp import HP_LAYOUT, check_hp, make_hp

__all__ = [
    "REGISTRY", "Runtime", "load", "resume", "make_hp", "check_hp", "HP_LAYOUT",
    "GPT2OnnxError", "InputError", "ArtifactError", "CheckpointError", "DataError", "OutputError", "OutOfMemory",
    "RuntimeUnavailable", "TrainingDiverged",
]
