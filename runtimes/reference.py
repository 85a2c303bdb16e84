"""``reference``: onnx's own ReferenceEvaluator (NumPy) on train_step.onnx (and, for
gradient accumulation, grad_step.onnx and apply_step.onnx).

Slow, and independent of ONNX Runtime's kernels: the parity suite uses it to
show that what ONNX Runtime computes is what the ONNX graph means. State is a
dict of NumPy arrays.
"""

from __future__ import annotations

import numpy as np

from contract import (BATCH_INPUTS, CLIP_INPUT, GRAD_NORM_OUTPUT, HP_INPUT, LOSS_OUTPUT, grad_name, m_name, new_m_name,
                      new_name, new_v_name, v_name)

from .base import Runtime, mean_gradients
from .checkpoint import Checkpoint
from .errors import CheckpointError, RuntimeUnavailable, TrainingDiverged


def evaluator(path: str):
    """The unpatched evaluator: the artifacts keep to the forms its kernels handle
    (non-negative axes, GatherElements on rank 2), as any other engine's would need."""
    from onnx.reference import ReferenceEvaluator

    return ReferenceEvaluator(path)


class ReferenceRuntime(Runtime):
    name = "reference"
    accumulates = True
    frozen_inputs = True  # a LoRA folder's base weights: in every feed, never replaced
    needs = ("train_step.onnx", "eval_model.onnx", "forward.onnx", "weights.safetensors")

    def __init__(self, art, device="cpu", threads=None):
        if device != "cpu":
            raise RuntimeUnavailable("the reference runtime runs on the CPU only (device='cpu')")
        super().__init__(art, device, threads)
        self._step_eval = evaluator(str(art.path("train_step.onnx")))
        self._loss_eval = None
        self._fwd_eval = None
        self._split_evals = None  # (grad_step, apply_step), made on first use
        self._owned: list[str] | None = None  # parameters whose moments this process keeps (None: all)
        self._sharded_apply = None
        self._names = art.param_names
        self._params = art.initial_weights()
        self._frozen = art.frozen_weights()
        self._m = {n: np.zeros_like(w) for n, w in self._params.items()}
        self._v = {n: np.zeros_like(w) for n, w in self._params.items()}

    def _run(self, tokens, positions, labels, hp, clip):
        feeds = {**self._frozen, **self._params, **{m_name(n): a for n, a in self._m.items()}, **{v_name(n): a for n, a in self._v.items()},
                 **dict(zip(BATCH_INPUTS, (tokens, positions, labels))), HP_INPUT: hp, CLIP_INPUT: clip}
        out = dict(zip(self._step_eval.output_names, self._step_eval.run(None, feeds)))
        return float(out[LOSS_OUTPUT]), out

    def _step(self, tokens, positions, labels, hp, clip) -> float:
        if self._owned is not None:
            raise RuntimeUnavailable("with sharded moments only the split step runs (runtimes/distributed.py)")
        loss, out = self._run(tokens, positions, labels, hp, clip)
        self.last_grad_norm = float(out[GRAD_NORM_OUTPUT])
        if not np.isfinite(loss):
            raise TrainingDiverged(f"loss is {loss} at step {self.step_count + 1}; the update was not applied")
        self._params = {n: out[new_name(n)] for n in self._names}
        self._m = {n: out[new_m_name(n)] for n in self._names}
        self._v = {n: out[new_v_name(n)] for n in self._names}
        return loss

    def _split(self):
        if self._split_evals is None:
            self._split_evals = tuple(evaluator(str(self.art.path(m))) for m in ("grad_step.onnx", "apply_step.onnx"))
        return self._split_evals

    def _micro_gradients(self, tokens, positions, labels, out=None):
        grad_eval = self._split()[0]
        res = grad_eval.run(None, {**self._frozen, **self._params, **dict(zip(BATCH_INPUTS, (tokens, positions, labels)))})
        res = dict(zip(grad_eval.output_names, res))
        grads = {n: res[grad_name(n)] for n in self._names}
        if out is not None:
            for n in self._names:
                np.copyto(out[n], grads[n])
            grads = out
        return float(res[LOSS_OUTPUT]), grads

    def _step_accumulated(self, batches, hp, clip) -> float:
        loss, grads = mean_gradients(self._micro_gradients(*mb) for mb in batches)
        if not np.isfinite(loss):
            raise TrainingDiverged(f"mean loss is {loss} at step {self.step_count + 1}; the update was not applied")
        self._apply_gradients(grads, hp, clip)
        return loss

    def _apply_gradients(self, grads, hp, clip) -> None:
        """apply_step.onnx, or its cut to the owned parameters after _shard_moments (shard.py)."""
        apply_eval = self._split()[1] if self._owned is None else self._sharded_apply
        updated = self._names if self._owned is None else self._owned
        feeds = {**{n: self._params[n] for n in updated}, **{m_name(n): self._m[n] for n in updated},
                 **{v_name(n): self._v[n] for n in updated}, **{grad_name(n): grads[n] for n in self._names},
                 HP_INPUT: hp, CLIP_INPUT: clip}
        out = dict(zip(apply_eval.output_names, apply_eval.run(None, feeds)))
        self.last_grad_norm = float(out[GRAD_NORM_OUTPUT])
        for n in updated:
            self._params[n], self._m[n], self._v[n] = out[new_name(n)], out[new_m_name(n)], out[new_v_name(n)]

    def _shard_moments(self, owned) -> None:
        from onnx.reference import ReferenceEvaluator

        from .shard import sharded_apply_model

        self._owned = [n for n in self._names if n in set(owned)]
        self._sharded_apply = ReferenceEvaluator(
            sharded_apply_model(self.art.path("apply_step.onnx"), self._owned, self._names))
        self._m = {n: self._m[n] for n in self._owned}
        self._v = {n: self._v[n] for n in self._owned}

    def _parameter_buffers(self, names):
        for n in names:  # evaluator outputs and loaded weights alike; the caller writes into them
            self._params[n] = np.require(self._params[n], np.float32, ["C", "W"])
        return {n: self._params[n] for n in names}

    def _gradients(self, tokens, positions, labels):
        hp = np.array([0.0, 0.0, 0.5, 1.0, 0.0, 1.0, 2.0], dtype=np.float32)  # m' = g; see ort.py
        _, out = self._run(tokens, positions, labels, hp, np.array(0.0, np.float32))
        return {n: out[new_m_name(n)] for n in self._names}

    def _loss(self, tokens, positions, labels) -> float:
        if self._loss_eval is None:
            self._loss_eval = evaluator(str(self.art.path("eval_model.onnx")))
        feeds = {**self._frozen, **self._params, "tokens": tokens, "positions": positions, "labels": labels}
        return float(self._loss_eval.run([LOSS_OUTPUT], feeds)[0])

    def _logits(self, tokens, positions) -> np.ndarray:
        if self._fwd_eval is None:
            self._fwd_eval = evaluator(str(self.art.path("forward.onnx")))
        return self._fwd_eval.run(["logits"], {**self._frozen, **self._params, "tokens": tokens, "positions": positions})[0]

    def parameters(self):
        return {n: a.copy() for n, a in self._params.items()}

    def frozen(self) -> dict[str, np.ndarray]:
        return {n: a.copy() for n, a in self._frozen.items()}

    def moments(self):
        return {n: a.copy() for n, a in self._m.items()}, {n: a.copy() for n, a in self._v.items()}

    def _restore(self, ckpt: Checkpoint) -> None:
        if self._owned is not None:
            raise CheckpointError("this runtime's moments are sharded; restore a checkpoint before sharding")
        if ckpt.adam_m is None or ckpt.adam_v is None:
            if ckpt.step != 0:
                raise CheckpointError(f"checkpoint at step {ckpt.step} holds no AdamW moments; cannot resume exactly")
        else:
            self._m = {n: ckpt.adam_m[n].copy() for n in self._names}
            self._v = {n: ckpt.adam_v[n].copy() for n in self._names}
        self._params = {n: ckpt.params[n].copy() for n in self._names}
