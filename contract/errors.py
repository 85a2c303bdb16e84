"""The error classes every runner, CLI and host check raises.

One base class so callers can catch everything this package signals on purpose;
one subclass per boundary so tests (and users) can tell a bad batch from a bad
artifact folder. Every message names the offending value, the allowed range and
the input it came from.
"""


class GPT2OnnxError(Exception):
    """Base of every error this package raises on purpose."""


class InputError(GPT2OnnxError, ValueError):
    """A batch or hyperparameter vector is malformed; nothing was run or changed."""


class ArtifactError(GPT2OnnxError):
    """An artifact folder is incomplete, corrupted, or from another version or config."""


class CheckpointError(GPT2OnnxError):
    """A checkpoint file is missing, truncated, or does not match the artifacts."""


class OutputError(GPT2OnnxError):
    """An output (run folder, checkpoint, weights, log) cannot be written: the folder is
    not a writable directory, or the disk is full. Files are replaced atomically, so the
    previous version of the file that failed is left as it was."""


class DataError(GPT2OnnxError, ValueError):
    """Training text is missing, empty, or too short for one batch."""


class OutOfMemory(GPT2OnnxError, MemoryError):
    """A batch did not fit in memory; the step was not applied (parameters and step count
    unchanged). A smaller batch or sequence length fits."""


class RuntimeUnavailable(GPT2OnnxError):
    """The requested runtime or device is not available in this environment."""


class TrainingDiverged(GPT2OnnxError):
    """The loss or an updated tensor became NaN or infinite.

    ``reference`` does not commit a step whose loss is not finite; ``ort`` does
    not commit its parameters but has already updated its moments in place, and
    then refuses further steps; ``ort-training`` updates everything in place. None
    can roll back in memory, so ``train`` stops and keeps the last checkpoint
    whose parameters and moments were finite."""


__all__ = ["GPT2OnnxError", "InputError", "ArtifactError", "CheckpointError", "OutputError", "DataError",
           "OutOfMemory", "RuntimeUnavailable", "TrainingDiverged"]
