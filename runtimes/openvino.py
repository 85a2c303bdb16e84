"""``openvino``: OpenVINO's CPU plugin on the portable train_step.onnx.

The same graph the ``ort`` runtime runs (backward and AdamW as ordinary ONNX
ops), read by OpenVINO's ONNX frontend and compiled for its CPU device with
``INFERENCE_PRECISION_HINT=f32``: without it the plugin may run matmuls in
bf16 on CPUs that have it, which no parity tolerance survives.

State lives in NumPy arrays that OpenVINO tensors wrap without a copy
(``ov.Tensor(array, shared_memory=True)``), bound as input and output tensors:
the step reads one full set (parameters and both moments) and the CPU plugin
writes ``new.*`` straight into a second set; the two sets swap after a step
whose loss is finite. Two infer requests on the one compiled model hold the
two directions (set 0 -> 1, set 1 -> 0) with their tensors bound once, so a
step sets only tokens, positions, labels, hp and clip and reads back only the
loss and gradient norm. (On the CPU device host memory is device memory: this
is OpenVINO's counterpart of ``ort``'s IO binding, and nothing is copied.)
Unlike ``ort``, the moments are not updated in place: OpenVINO gives no
guarantee about an input tensor aliased by an output, so they are
double-buffered too (two more copies of the model's size). In exchange a
diverged step changes nothing: the state stays at the last good step and
training may go on.

``loss`` runs eval_model.onnx and ``logits`` forward.onnx, compiled on first
use, on the current parameter tensors. ``pip install '.[openvino]'``.
"""

from __future__ import annotations

import numpy as np

from contract import (BATCH_INPUTS, CLIP_INPUT, GRAD_NORM_OUTPUT, HP_INPUT, LOGITS_OUTPUT, LOSS_OUTPUT, m_name, new_m_name,
                      new_name, new_v_name, v_name)

from .base import Runtime
from .checkpoint import Checkpoint
from .errors import CheckpointError, RuntimeUnavailable, TrainingDiverged

GRAD_HP = np.array([0.0, 0.0, 0.5, 1.0, 0.0, 1.0, 2.0], dtype=np.float32)  # beta1 = 0: new.m = g (see ort.py)


def _import_openvino():
    try:
        import openvino
    except ImportError as e:
        raise RuntimeUnavailable(f"runtime 'openvino' needs the openvino package (pip install '.[openvino]'): {e}") from None
    return openvino


def compile_config(threads: int | None) -> dict:
    """CPU plugin properties: float32 throughout, and the thread count when one is given."""
    config = {"INFERENCE_PRECISION_HINT": "f32"}
    if threads:
        config["INFERENCE_NUM_THREADS"] = int(threads)
    return config


class OpenVinoRuntime(Runtime):
    name = "openvino"
    frozen_inputs = True  # bound once per request from arrays no output is ever written to
    needs = ("train_step.onnx", "eval_model.onnx", "forward.onnx", "weights.safetensors")

    def __init__(self, art, device="cpu", threads=None):
        if device != "cpu":
            raise RuntimeUnavailable("the openvino runtime runs on OpenVINO's CPU device only (device='cpu')")
        super().__init__(art, device, threads)
        self._ov = _import_openvino()
        self._core = self._ov.Core()
        self._requests: dict[str, object] = {}  # eval_model.onnx / forward.onnx, compiled on first use
        self._names = art.param_names
        # train_step's state inputs, each with its output and its parameter
        self._out_of = {**{n: new_name(n) for n in self._names}, **{m_name(n): new_m_name(n) for n in self._names},
                        **{v_name(n): new_v_name(n) for n in self._names}}
        self._param_of = {**{n: n for n in self._names}, **{m_name(n): n for n in self._names},
                          **{v_name(n): n for n in self._names}}
        self._keys = list(self._out_of)
        self._sets = (self._new_state(), self._new_state())
        self._which = 0  # self._sets[self._which] is the current state; a step writes the other, then they swap
        self._fill(self._sets[0], art.initial_weights(), None, None)
        self._frozen = art.frozen_weights()  # a LoRA folder's base weights: inputs only
        self._frozen_t = {n: self._wrap(a) for n, a in self._frozen.items()}
        # scalars: OpenVINO-allocated (a tensor wrapping a 0-d array has shape (1,), which a scalar port refuses)
        self._scalars = {name: self._ov.Tensor(self._ov.Type.f32, self._ov.Shape([]))
                         for name in (CLIP_INPUT, LOSS_OUTPUT, GRAD_NORM_OUTPUT)}
        # Two infer requests on the one compiled step, each with its state tensors bound once: set 0 -> set 1
        # and set 1 -> set 0 (binding the 6 x n_params tensors anew every step cost 2 ms, as much as a tiny step).
        compiled = self._compile("train_step.onnx")
        self._step_reqs = []
        for src, dst in ((0, 1), (1, 0)):
            req = compiled.create_infer_request()
            for key in self._keys:
                req.set_tensor(key, self._sets[src][key][1])
                req.set_tensor(self._out_of[key], self._sets[dst][key][1])
            for name, t in (*self._scalars.items(), *self._frozen_t.items()):
                req.set_tensor(name, t)
            self._step_reqs.append(req)

    @property
    def _cur(self) -> dict:
        return self._sets[self._which]

    @property
    def _next(self) -> dict:
        return self._sets[1 - self._which]

    # --- state ----------------------------------------------------------------

    def _wrap(self, array: np.ndarray):
        return self._ov.Tensor(array, shared_memory=True)

    def _new_state(self) -> dict[str, tuple[np.ndarray, object]]:
        """One zeroed set of parameters and moments: {input name: (array, tensor sharing its memory)}."""
        shapes = self.art.param_shapes
        out = {}
        for key in self._keys:
            a = np.zeros(shapes[self._param_of[key]], np.float32)
            out[key] = (a, self._wrap(a))
        return out

    def _fill(self, state, params, m, v) -> None:
        for name, d in ((str, params), (m_name, m), (v_name, v)):
            for n in self._names:
                dst = state[name(n)][0]
                if d is None:
                    dst.fill(0.0)
                    continue
                src = np.asarray(d[n])
                if src.shape != dst.shape:
                    raise CheckpointError(f"{prefix or 'param '}{n}: shape {src.shape}, expected {dst.shape}")
                np.copyto(dst, src, casting="same_kind")

    def _compile(self, model: str):
        return self._core.compile_model(self._core.read_model(str(self.art.path(model))), "CPU",
                                        compile_config(self.threads))

    def _request(self, model: str):
        if model not in self._requests:
            self._requests[model] = self._compile(model).create_infer_request()
        return self._requests[model]

    # --- the step -------------------------------------------------------------

    def _run(self, tokens, positions, labels, hp, clip) -> float:
        """One train_step from the current set into the next one (not yet swapped); returns the loss."""
        req = self._step_reqs[self._which]
        for name, arr in (*zip(BATCH_INPUTS, (tokens, positions, labels)), (HP_INPUT, hp)):
            req.set_tensor(name, self._ov.Tensor(np.ascontiguousarray(arr)))
        self._scalars[CLIP_INPUT].data[...] = clip
        req.infer()
        return float(self._scalars[LOSS_OUTPUT].data)

    def _step(self, tokens, positions, labels, hp, clip) -> float:
        loss = self._run(tokens, positions, labels, hp, clip)
        self.last_grad_norm = float(self._scalars[GRAD_NORM_OUTPUT].data)
        if not np.isfinite(loss):
            raise TrainingDiverged(f"loss is {loss} at step {self.step_count + 1}; the update was not applied "
                                   f"(parameters and moments stay at step {self.step_count})")
        self._which = 1 - self._which
        return loss

    def _gradients(self, tokens, positions, labels) -> dict[str, np.ndarray]:
        # beta1 = 0 makes new.m the gradient; it lands in the spare set, which is never swapped in.
        self._run(tokens, positions, labels, GRAD_HP, np.array(0.0, np.float32))
        return {n: self._next[m_name(n)][0].copy() for n in self._names}

    def _run_on_state(self, model: str, data: dict, output: str) -> np.ndarray:
        req = self._request(model)
        for n, t in self._frozen_t.items():
            req.set_tensor(n, t)
        for n in self._names:
            req.set_tensor(n, self._cur[n][1])
        for name, arr in data.items():
            req.set_tensor(name, self._ov.Tensor(np.ascontiguousarray(arr)))
        req.infer()
        return req.get_tensor(output).data.copy()

    def _loss(self, tokens, positions, labels) -> float:
        return float(self._run_on_state("eval_model.onnx", dict(zip(BATCH_INPUTS, (tokens, positions, labels))),
                                        LOSS_OUTPUT))

    def _logits(self, tokens, positions) -> np.ndarray:
        return self._run_on_state("forward.onnx", dict(zip(BATCH_INPUTS, (tokens, positions))), LOGITS_OUTPUT)

    # --- export and restore -----------------------------------------------------

    def frozen(self) -> dict[str, np.ndarray]:
        return {n: a.copy() for n, a in self._frozen.items()}

    def parameters(self) -> dict[str, np.ndarray]:
        return {n: self._cur[n][0].copy() for n in self._names}

    def moments(self):
        return ({n: self._cur[m_name(n)][0].copy() for n in self._names},
                {n: self._cur[v_name(n)][0].copy() for n in self._names})

    def _restore(self, ckpt: Checkpoint) -> None:
        if (ckpt.adam_m is None or ckpt.adam_v is None) and ckpt.step != 0:
            raise CheckpointError(f"checkpoint at step {ckpt.step} holds no AdamW moments; cannot resume exactly")
        self._fill(self._next, ckpt.params, ckpt.adam_m, ckpt.adam_v)  # the spare set: a bad tensor changes nothing
        self._which = 1 - self._which
