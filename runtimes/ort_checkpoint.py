"""Read ONNX Runtime training's checkpoint file (a flatbuffer) without the training API.

onnxruntime 1.19's Python API gives parameters but not the optimizer's
moments. The checkpoint it saves holds them (optimizer group -> per-parameter
momentums, in the order AdamW keeps them: first then second moment), and the
onnxruntime wheel ships the flatbuffer schema's Python bindings, so we read it
directly: this is how the parity suite compares ORT's moments with ours.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field

import numpy as np

from .errors import CheckpointError

_FLOAT = 1  # onnx TensorProto.FLOAT


def _fbs():
    try:
        return importlib.import_module("onnxruntime.tools.ort_format_model.ort_flatbuffers_py.fbs.Checkpoint")
    except ImportError as e:  # flatbuffers missing, or an onnxruntime without the tools
        raise CheckpointError(f"cannot read ONNX Runtime checkpoints here: {e}") from None


def _tensor(t) -> tuple[str, np.ndarray]:
    if t.DataType() != _FLOAT:
        raise CheckpointError(f"tensor {t.Name()!r} in ORT checkpoint has data type {t.DataType()}, expected float")
    dims = tuple(int(d) for d in t.DimsAsNumpy()) if not t.DimsIsNone() else ()
    data = t.RawDataAsNumpy()
    if isinstance(data, int):  # flatbuffers returns 0 for an absent vector
        raise CheckpointError(f"tensor {t.Name()!r} in ORT checkpoint has no inline data")
    return t.Name().decode(), np.frombuffer(data.tobytes(), dtype=np.float32).reshape(dims).copy()


@dataclass
class OrtCheckpoint:
    step: int = 0
    params: dict[str, np.ndarray] = field(default_factory=dict)
    moments: tuple[dict[str, np.ndarray], dict[str, np.ndarray]] | None = None


def read_ort_checkpoint(data: bytes) -> OrtCheckpoint:
    mod = _fbs()
    try:
        ck = mod.Checkpoint.GetRootAs(data, 0)
        out = OrtCheckpoint()
        ms = ck.ModuleState()
        if ms is not None:
            for j in range(ms.RequiresGradParamsLength()):
                name, arr = _tensor(ms.RequiresGradParams(j))
                out.params[name] = arr
        if ck.OptimizerGroupsLength() > 0:
            group = ck.OptimizerGroups(0)
            out.step = int(group.Step())
            m, v = {}, {}
            for j in range(group.OptimizerStatesLength()):
                st = group.OptimizerStates(j)
                pname = st.ParamName().decode()
                if st.MomentumsLength() != 2:
                    raise CheckpointError(f"ORT checkpoint: parameter {pname!r} has {st.MomentumsLength()} momentums, expected 2")
                m[pname] = _tensor(st.Momentums(0))[1]
                v[pname] = _tensor(st.Momentums(1))[1]
            out.moments = (m, v) if m else None
        return out
    except CheckpointError:
        raise
    except Exception as e:
        raise CheckpointError(f"malformed ONNX Runtime checkpoint: {e}") from None
