"""``ort-training``: onnxruntime-training 1.19.2's Module/Optimizer on the training set.

ONNX Runtime's gradient builder made training_model.onnx; its fused
AdamWOptimizer kernel runs optimizer_model.onnx, whose beta1/beta2/eps/weight
decay are attributes fixed at build time. Only lr comes from hp per step;
the other hp entries must equal what the model was built with.

The optimizer's moments live inside ONNX Runtime; the Python API does not
expose them, so they are read from ORT's own checkpoint (a flatbuffer) when
asked for, and a checkpoint of this runtime carries that file whole for an
exact resume.
"""

from __future__ import annotations

import math
import os
import tempfile

import numpy as np

from .base import Runtime
from .checkpoint import Checkpoint
from .errors import CheckpointError, InputError, RuntimeUnavailable
from .ort import session_options
from .ort_checkpoint import read_ort_checkpoint
from .ort_env import import_onnxruntime, stub_training_package


def _import_api():
    """onnxruntime.training.api without importing torch (see ort_env)."""
    if stub_training_package() is None:
        raise RuntimeUnavailable(
            "the ort-training runtime needs onnxruntime-training-cpu==1.19.2 (pip install '.[training]'); "
            "this environment has plain onnxruntime: use runtime 'ort' instead"
        )
    import_onnxruntime()
    from onnxruntime.training.api import CheckpointState, Module, Optimizer

    return CheckpointState, Module, Optimizer


class OrtTrainingRuntime(Runtime):
    name = "ort-training"
    frozen_inputs = True  # a LoRA folder's base: frozen_params of the training set, in ORT's checkpoint
    needs = ("training_model.onnx", "eval_model.onnx", "optimizer_model.onnx", "checkpoint")

    def __init__(self, art, device="cpu", threads=None):
        super().__init__(art, device, threads)
        self._api = _import_api()
        self._open(str(art.path("checkpoint")))

    def _open(self, checkpoint_path: str) -> None:
        CheckpointState, Module, Optimizer = self._api
        # the `ort` runtime's options (denormals flushed, the shared arena that grows by what is
        # requested, no memory pattern): gpt2 1x1024 peak 4,826 -> 4,726 MiB, the same losses
        so = session_options(self.threads)
        self._state = CheckpointState.load_checkpoint(checkpoint_path)
        try:
            self._module = Module(
                str(self.art.path("training_model.onnx")),
                self._state,
                str(self.art.path("eval_model.onnx")),
                device=self.device,
                session_options=so,
            )
        except Exception as e:
            if self.device == "cuda":
                raise RuntimeUnavailable(f"ort-training could not start on cuda: {e}") from None
            raise
        self._optimizer = Optimizer(str(self.art.path("optimizer_model.onnx")), self._module)

    def _check_hp_supported(self, hp: np.ndarray, clip: np.ndarray) -> None:
        cfg = self.art.config
        built, fed = float(cfg.get("clip", 0.0)), float(clip)
        fed = 0.0 if math.isinf(fed) else fed
        if abs(fed - built) > 1e-6 * max(built, 1e-30):
            raise InputError(
                f"clip = {float(clip)!r}, but optimizer_model.onnx was built with clip={built!r} (0: off): ONNX Runtime's "
                f"gradient clipping fixes its threshold when it is built. Rebuild with `python -m graphgen build ... "
                f"--clip {np.format_float_positional(np.float32(fed))}`, or use the 'ort' runtime, which reads it every step"
            )
        for i, key in ((1, "beta1"), (2, "beta2"), (3, "eps"), (4, "weight_decay")):
            built = np.float32(cfg[key])
            if abs(float(hp[i]) - float(built)) > 1e-6 * max(abs(float(built)), 1e-30):
                flag = "--" + key.replace("_", "-")
                raise InputError(
                    f"hp[{i}] ({key}) = {float(hp[i])!r}, but optimizer_model.onnx was built with {key}={cfg[key]!r}: "
                    f"ONNX Runtime's optimizer model fixes beta1/beta2/eps/weight decay when it is built. "
                    f"Rebuild with `python -m graphgen build ... {flag} {np.format_float_positional(hp[i])}`, or use the 'ort' runtime, "
                    f"which reads all seven hp values every step"
                )

    def _step(self, tokens, positions, labels, hp, clip) -> float:  # clip: checked equal to the built one
        self._module.train()
        loss = self._module(tokens, positions, labels)
        self._optimizer.set_learning_rate(float(hp[0]))
        self._optimizer.step()
        self._module.lazy_reset_grad()
        return float(loss)

    def _after_failed_run(self) -> None:
        try:  # gradients accumulate across calls until reset: a failed call must not leak into the next
            self._module.lazy_reset_grad()
        except Exception:
            pass

    def _loss(self, tokens, positions, labels) -> float:
        self._module.eval()
        try:
            return float(self._module(tokens, positions, labels))
        finally:
            self._module.train()

    def _gradients(self, tokens, positions, labels) -> dict[str, np.ndarray]:
        self._module.train()
        self._module.lazy_reset_grad()
        self._module(tokens, positions, labels)
        grads = {n: np.array(self._state.parameters[n].grad, copy=True) for n in self.art.param_names}
        self._module.lazy_reset_grad()
        return grads

    def parameters(self) -> dict[str, np.ndarray]:
        return {n: np.array(self._state.parameters[n].data, copy=True) for n in self.art.param_names}

    def frozen(self) -> dict[str, np.ndarray]:
        """A LoRA folder's base weights as ONNX Runtime holds them (frozen_params of its checkpoint)."""
        return {n: np.array(self._state.parameters[n].data, copy=True) for n in self.art.frozen_shapes}

    def _native_state(self) -> bytes:
        fd, tmp = tempfile.mkstemp(prefix="ort-ckpt-")
        os.close(fd)
        try:
            self._api[0].save_checkpoint(self._state, tmp, include_optimizer_state=True)
            with open(tmp, "rb") as f:
                return f.read()
        finally:
            os.unlink(tmp)

    def moments(self):
        return self._moments_of(read_ort_checkpoint(self._native_state()))

    def _moments_of(self, state):
        if not state.moments:  # before the first step ORT holds no optimizer state
            zeros = {n: np.zeros(s, np.float32) for n, s in self.art.param_shapes.items()}
            return zeros, {n: z.copy() for n, z in zeros.items()}
        return state.moments

    def snapshot(self, extra: dict | None = None) -> Checkpoint:
        """ONNX Runtime's own checkpoint is serialised once; parameters and moments are read from it."""
        native = self._native_state()
        state = read_ort_checkpoint(native)
        m, v = self._moments_of(state)
        return Checkpoint(runtime=self.name, step=self.step_count, artifacts=str(self.art.folder.resolve()),
                          fingerprint=self.art.fingerprint, params={n: state.params[n] for n in self.art.param_names},
                          adam_m=m, adam_v=v, native=native, extra=extra or {})

    def _restore(self, ckpt: Checkpoint) -> None:
        if ckpt.native is None:
            raise CheckpointError(
                f"this checkpoint was written by runtime {ckpt.runtime!r} and holds no ONNX Runtime training state; "
                "resume it with runtime='ort' (or --runtime ort), which restores parameters and moments from any checkpoint"
            )
        state = read_ort_checkpoint(ckpt.native)  # CheckpointError when the blob is not one
        if set(state.params) != set(self.art.param_names) or any(
                state.params[n].shape != ckpt.params[n].shape for n in self.art.param_names):
            raise CheckpointError(
                f"the ONNX Runtime training state in this checkpoint holds other parameters than the artifacts "
                f"({sorted(set(state.params) ^ set(self.art.param_names))[:5]} differ, or their shapes do)"
            )
        fd, tmp = tempfile.mkstemp(prefix="ort-ckpt-")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(ckpt.native)
            try:
                self._open(tmp)
            except Exception as e:  # onnxruntime's own error for a blob it cannot use
                raise CheckpointError(f"the ONNX Runtime training state in this checkpoint cannot be loaded: {e}") from None
        finally:
            os.unlink(tmp)
