"""A GatherElements for onnx's ReferenceEvaluator, for the hand-made test graphs that use
axis=-1: onnx 1.23's reference kernel reads a negative axis as a cross-section index and
fails, and on rank 3+ takes at most 64 classes (np.choose). The artifacts need none of
this (runtimes/reference.py runs them on the unpatched evaluator); this is the op's
definition written with take_along_axis."""

from __future__ import annotations

import numpy as np
from onnx.reference.op_run import OpRun


class GatherElements(OpRun):
    op_domain = ""

    def _run(self, data, indices, axis=None):
        axis = 0 if axis is None else axis
        idx = np.where(indices < 0, indices + data.shape[axis], indices)
        return (np.take_along_axis(data, idx, axis=axis),)
