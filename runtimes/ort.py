"""``ort``: plain onnxruntime ``InferenceSession`` on the portable train_step.onnx.

Works on any onnxruntime (1.19 from the training wheel, or current releases,
CPU or CUDA): the backward pass and AdamW are ordinary ONNX ops in the graph.

State stays on the device. Parameters and moments are OrtValues bound as
inputs with IO binding. Only tokens, positions, labels and hp cross from the
host, and only the loss comes back.

- Parameters: the step writes the new ones into a second, preallocated set and
  the two sets swap. They cannot be updated in place: the backward still reads
  a weight (dX = dY W) after its own update could have been written.
- Moments: updated in place (``new.m.<p>`` is bound to the ``m.<p>`` buffer).
  That is safe by data dependency: the only reader of ``m.<p>`` is the node
  computing ``b1 * m``, which ``new.m.<p>``'s node depends on. It saves two
  copies of the model's size (about 1 GiB on gpt2).

- Frozen inputs (a LoRA folder's base weights): uploaded once, bound as inputs of
  every run and never an output, so they stay bit-identical however long it trains.

A step whose loss is not finite does not commit the parameters (no swap), but
its moments are already written, as with ``ort-training``'s in-place update:
the runtime then refuses to step again until a checkpoint is restored (train()
stops there and names the last good checkpoint).
"""

from __future__ import annotations

import ctypes
import math

import numpy as np

from contract import (BATCH_INPUTS, CLIP_INPUT, GRAD_NORM_OUTPUT, HP_INPUT, LOGITS_OUTPUT, LOSS_OUTPUT, grad_name, m_name,
                      new_m_name, new_name, new_v_name, v_name)

from .base import Runtime, mean_gradients
from .checkpoint import Checkpoint
from .errors import CheckpointError, RuntimeUnavailable, TrainingDiverged
from .ort_env import import_onnxruntime


_ENV_ARENA: list[bool] = []  # [True] once the shared CPU arena is registered, [False] if that failed


def _shared_cpu_arena(ort) -> bool:
    """Register (once per process) a CPU arena allocator that grows by what is requested.

    ONNX Runtime's default CPU arena grows in powers of two, which on a train step
    (hundreds of MiB of activations and state) overshoots: on mid 8x256 the peak RSS
    measured 2.99 GiB with it and 2.14 GiB with this one, at the same step time
    (bench/; see README). Sessions opt in with ``session.use_env_allocators``."""
    if not _ENV_ARENA:
        try:
            info = ort.OrtMemoryInfo("Cpu", ort.OrtAllocatorType.ORT_ARENA_ALLOCATOR, 0, ort.OrtMemType.DEFAULT)
            ort.create_and_register_allocator(info, ort.OrtArenaCfg({"arena_extend_strategy": 1}))  # kSameAsRequested
            _ENV_ARENA.append(True)
        except Exception:  # an older/other build without the API: keep the session's own arena
            _ENV_ARENA.append(False)
    return _ENV_ARENA[0]


def session_options(threads: int | None, shared_arena: bool = True):
    """The options measured to matter on CPU (docs/dependencies.md): denormals flushed
    (the masked softmax's exp produces them), arena on, memory pattern off,
    sequential execution, all graph optimisations; the arena grows by what is
    requested rather than in powers of two (see _shared_cpu_arena) unless
    ``shared_arena`` is False. The memory pattern (one block planned for every
    intermediate of a run) costs a train step more than it saves: gpt2 at 1x1024
    peaks 265 MiB higher with it, and no size runs faster with it."""
    ort = import_onnxruntime()
    so = ort.SessionOptions()
    if shared_arena and _shared_cpu_arena(ort):
        so.add_session_config_entry("session.use_env_allocators", "1")
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.enable_mem_pattern = False
    so.add_session_config_entry("session.set_denormal_as_zero", "1")
    if threads:
        so.intra_op_num_threads = threads
    so.log_severity_level = 3
    return so



def _load_cuda_libraries(ort) -> None:
    """Load CUDA and cuDNN from the nvidia-* wheels that ``onnxruntime-gpu[cuda,cudnn]`` installs.

    Those wheels put the libraries in site-packages, where the dynamic loader does not
    look; ONNX Runtime's own ``preload_dlls`` finds them. Without it (older releases) or
    when the libraries come from the system (LD_LIBRARY_PATH), session creation finds
    them as usual, so a failure here is not an error.
    """
    preload = getattr(ort, "preload_dlls", None)
    if preload is None or "CUDAExecutionProvider" not in ort.get_available_providers():
        return
    try:
        preload(msvc=False)
    except Exception:  # noqa: BLE001 - the session below reports what is really missing
        pass

class OrtRuntime(Runtime):
    name = "ort"
    accumulates = True
    frozen_inputs = True
    needs = ("train_step.onnx", "eval_model.onnx", "forward.onnx", "weights.safetensors")

    def __init__(self, art, device="cpu", threads=None):
        super().__init__(art, device, threads)
        ort = import_onnxruntime()

        self._ort = ort
        # use_tf32 off: the CUDA provider otherwise rounds MatMul inputs to TF32 (10-bit
        # mantissa), about 5e-4 relative on every gradient, where this project computes float32.
        self._providers = ([("CUDAExecutionProvider", {"use_tf32": "0"}), "CPUExecutionProvider"]
                           if device == "cuda" else ["CPUExecutionProvider"])
        if device == "cuda":
            _load_cuda_libraries(ort)
        try:
            self._sess = ort.InferenceSession(str(art.path("train_step.onnx")), session_options(threads), providers=self._providers)
        except Exception as e:
            if device == "cuda":
                raise RuntimeUnavailable(f"runtime 'ort' could not start on cuda: {e}") from None
            raise
        if device == "cuda" and "CUDAExecutionProvider" not in self._sess.get_providers():
            # ONNX Runtime falls back to the CPU when the CUDA provider cannot load its
            # libraries; a run asked for cuda must not silently train on the CPU instead.
            raise RuntimeUnavailable("runtime 'ort' could not start on cuda: ONNX Runtime could not load its CUDA "
                                     "provider (CUDA 13 and cuDNN 9 libraries; pip install '.[cuda]' brings them)")
        self._sessions: dict[str, object] = {}  # eval_model.onnx / forward.onnx, made on first use
        self._ort_device = "cuda" if device == "cuda" else "cpu"
        self._names = art.param_names
        self._out_names = [o.name for o in self._sess.get_outputs()]
        # The manifest says whether the step graphs let new parameters be written over the
        # old ones (graphgen/in_place.py checks every reader of a weight runs first): then
        # one set of parameters; else a spare set takes the update and the sets swap.
        self._in_place = bool(art.manifest["train_step"].get("in_place"))
        weights = art.initial_weights()
        zeros = {n: np.zeros_like(w) for n, w in weights.items()}
        self._owned: list[str] | None = None  # parameters whose moments this process keeps (None: all)
        self._sharded_apply = None
        self._set_state(weights, zeros, zeros)
        self._frozen = self._upload_frozen(art.frozen_weights())  # bound as inputs, never written
        self._stale_moments_at: int | None = None  # the step whose diverged update left the moments written
        self._loss_out = ort.OrtValue.ortvalue_from_shape_and_type([], np.float32, "cpu", 0)  # the step's loss lands here
        self._norm_out = ort.OrtValue.ortvalue_from_shape_and_type([], np.float32, "cpu", 0)  # and its gradient norm

    # --- state on the device ------------------------------------------------

    def _set_state(self, params, m, v) -> None:
        self._state = self._upload(params, m, v)
        # in place, the "spare" buffers are the parameters themselves and the swap is a no-op
        self._spare = {n: self._state[n] for n in self._names} if self._in_place else self._upload(params)

    def _upload(self, params, m=None, v=None) -> dict[str, object]:
        """OrtValues keyed by train_step input name: <p>, and m.<p>, v.<p> when given.

        Each is allocated by ONNX Runtime and filled by copy: an OrtValue made
        from a NumPy array on the CPU would alias that array's memory, and the
        step writes into these buffers.
        """
        out = {}
        for name, d in ((str, params), (m_name, m), (v_name, v)):
            if d is None:
                continue
            for n in self._names:
                value = self._ort.OrtValue.ortvalue_from_shape_and_type(
                    list(d[n].shape), np.float32, self._ort_device, 0
                )
                value.update_inplace(np.ascontiguousarray(d[n], dtype=np.float32))
                out[name(n)] = value
        return out

    def _upload_frozen(self, weights: dict[str, np.ndarray]) -> dict[str, object]:
        out = {}
        for n, w in weights.items():
            value = self._ort.OrtValue.ortvalue_from_shape_and_type(list(w.shape), np.float32, self._ort_device, 0)
            value.update_inplace(np.ascontiguousarray(w, dtype=np.float32))
            out[n] = value
        return out

    def _bind_frozen(self, b) -> None:
        for name, value in self._frozen.items():
            b.bind_ortvalue_input(name, value)

    def frozen(self) -> dict[str, np.ndarray]:
        """Copies of the frozen inputs as the device holds them (tests: unchanged by training)."""
        return {n: v.numpy().copy() for n, v in self._frozen.items()}

    def _run(self, tokens, positions, labels, hp, clip, moments_out=None):
        """One train_step: new parameters into the spare buffers (not yet committed), new moments
        into ``moments_out`` (default: in place, over the current ones); returns the loss."""
        moments_out = self._state if moments_out is None else moments_out
        b = self._sess.io_binding()
        self._bind_frozen(b)
        for name, value in self._state.items():
            b.bind_ortvalue_input(name, value)
        for name, arr in (*zip(BATCH_INPUTS, (tokens, positions, labels)), (HP_INPUT, hp), (CLIP_INPUT, clip)):
            b.bind_cpu_input(name, arr)
        b.bind_ortvalue_output(LOSS_OUTPUT, self._loss_out)
        b.bind_ortvalue_output(GRAD_NORM_OUTPUT, self._norm_out)
        for n in self._names:
            b.bind_ortvalue_output(new_name(n), self._spare[n])
            b.bind_ortvalue_output(new_m_name(n), moments_out[m_name(n)])
            b.bind_ortvalue_output(new_v_name(n), moments_out[v_name(n)])
        self._sess.run_with_iobinding(b)
        # Only the loss comes back: copy_outputs_to_cpu() would copy every bound output,
        # the whole new state included (30 ms of a 125 ms step on small).
        return float(self._loss_out.numpy())

    def _step(self, tokens, positions, labels, hp, clip) -> float:
        self._check_moments()
        if self._owned is not None:
            raise RuntimeUnavailable("with sharded moments only the split step runs (runtimes/distributed.py)")
        loss = self._run(tokens, positions, labels, hp, clip)
        self.last_grad_norm = float(self._norm_out.numpy())
        if not np.isfinite(loss):
            self._stale_moments_at = self.step_count + 1
            if self._in_place:
                raise TrainingDiverged(
                    f"loss is {loss} at step {self.step_count + 1}; its update was written in place over the "
                    f"parameters and the AdamW moments")
            raise TrainingDiverged(
                f"loss is {loss} at step {self.step_count + 1}; the update was not applied to the parameters "
                f"(they stay at step {self.step_count}), but the AdamW moments were updated in place"
            )
        for n in self._names:
            self._state[n], self._spare[n] = self._spare[n], self._state[n]
        return loss

    def snapshot(self, extra: dict | None = None):
        self._check_moments()  # a diverged step's half-applied state is nothing to resume from
        return super().snapshot(extra)

    def _check_moments(self) -> None:
        if self._stale_moments_at is not None:
            kept = "parameters and AdamW moments" if self._in_place else "AdamW moments"
            raise TrainingDiverged(
                f"step {self._stale_moments_at} diverged and its in-place {kept} were kept; "
                f"continue from a checkpoint (runtimes.resume or --resume)")

    def _gradients(self, tokens, positions, labels) -> dict[str, np.ndarray]:
        # With beta1 = 0 the step's new first moment is exactly the gradient
        # (m' = 0*m + 1*g); lr = wd = 0, the parameters are never committed, and the
        # moments go to scratch buffers, not over the state's.
        hp = np.array([0.0, 0.0, 0.5, 1.0, 0.0, 1.0, 2.0], dtype=np.float32)
        scratch = {name(n): self._ort.OrtValue.ortvalue_from_shape_and_type(
                       list(self.art.param_shapes[n]), np.float32, self._ort_device, 0)
                   for name in (m_name, v_name) for n in self._names}
        self._run(tokens, positions, labels, hp, np.array(0.0, np.float32), moments_out=scratch)
        return {n: scratch[m_name(n)].numpy().copy() for n in self._names}

    def _session(self, model: str):
        """A session on another model of the folder, made on first use."""
        if model not in self._sessions:
            self._sessions[model] = self._ort.InferenceSession(
                str(self.art.path(model)), session_options(self.threads), providers=self._providers
            )
        return self._sessions[model]

    def _micro_gradients(self, tokens, positions, labels, out=None) -> tuple[float, dict[str, np.ndarray]]:
        """grad_step.onnx on the parameters where they live; loss and gradients come back to the CPU
        (on the CPU provider straight into ``out``'s arrays, which the outputs are bound to: no copy)."""
        sess = self._session("grad_step.onnx")
        b = sess.io_binding()
        self._bind_frozen(b)
        for n in self._names:
            b.bind_ortvalue_input(n, self._state[n])
        for name, arr in zip(BATCH_INPUTS, (tokens, positions, labels)):
            b.bind_cpu_input(name, arr)
        b.bind_ortvalue_output(LOSS_OUTPUT, self._loss_out)
        direct = out is not None and self._ort_device == "cpu"
        for n in self._names:
            if direct:  # an OrtValue over the array's own memory: grad_step writes the gradient there
                b.bind_ortvalue_output(grad_name(n), self._ort.OrtValue.ortvalue_from_numpy(out[n]))
            else:
                b.bind_output(grad_name(n), "cpu")
        sess.run_with_iobinding(b)
        loss = float(self._loss_out.numpy())
        if direct:
            return loss, out
        grads = dict(zip(self._names, b.copy_outputs_to_cpu()[1:]))
        if out is not None:
            for n in self._names:
                np.copyto(out[n], grads[n])
            return loss, out
        return loss, grads

    def _step_accumulated(self, batches, hp, clip) -> float:
        # The gradient sum is kept in NumPy on the CPU (base.mean_gradients): one copy of
        # each micro-batch's gradients to the host and of the mean back to the device.
        self._check_moments()
        loss, grads = mean_gradients(self._micro_gradients(*mb) for mb in batches)
        if not np.isfinite(loss):  # known before any state is written: nothing is applied
            raise TrainingDiverged(f"mean loss is {loss} at step {self.step_count + 1}; the update was not applied")
        self._apply_gradients(grads, hp, clip)
        return loss

    def _apply_gradients(self, grads, hp, clip) -> None:
        """apply_step.onnx (or, with sharded moments, its cut to the owned parameters: shard.py)."""
        if self._owned is None:
            sess, updated = self._session("apply_step.onnx"), self._names
        else:
            sess, updated = self._sharded_apply, self._owned
        b = sess.io_binding()
        for n in updated:
            for name in (n, m_name(n), v_name(n)):
                b.bind_ortvalue_input(name, self._state[name])
        for n in self._names:
            b.bind_cpu_input(grad_name(n), grads[n])
        b.bind_cpu_input(HP_INPUT, hp)
        b.bind_cpu_input(CLIP_INPUT, clip)
        b.bind_ortvalue_output(GRAD_NORM_OUTPUT, self._norm_out)
        for n in updated:  # as in _run: parameters to the spare set, moments in place
            b.bind_ortvalue_output(new_name(n), self._spare[n])
            b.bind_ortvalue_output(new_m_name(n), self._state[m_name(n)])
            b.bind_ortvalue_output(new_v_name(n), self._state[v_name(n)])
        sess.run_with_iobinding(b)
        self.last_grad_norm = float(self._norm_out.numpy())
        for n in updated:
            self._state[n], self._spare[n] = self._spare[n], self._state[n]

    def _shard_moments(self, owned) -> None:
        """Drop the moments (and, where the folder does not update in place, the spare parameter
        buffers) of every parameter not in ``owned``: 2 (or 3) x (N-1)/N of the parameters' bytes per
        rank. The cut apply_step keeps in_place's guarantee: the same nodes, and every update still
        waits for the global gradient norm."""
        from .shard import sharded_apply_model

        self._owned = [n for n in self._names if n in set(owned)]
        model = sharded_apply_model(self.art.path("apply_step.onnx"), self._owned, self._names)
        self._sharded_apply = self._ort.InferenceSession(model.SerializeToString(), session_options(self.threads),
                                                         providers=self._providers)
        for n in self._names:
            if n not in self._owned:
                del self._state[m_name(n)], self._state[v_name(n)], self._spare[n]

    def _parameter_buffers(self, names) -> dict[str, np.ndarray]:
        if self._ort_device != "cpu":
            raise RuntimeUnavailable("the sharded optimizer exchanges parameters in host memory: run it on the CPU")
        out = {}
        for n in names:
            shape = self.art.param_shapes[n]
            raw = (ctypes.c_float * math.prod(shape)).from_address(self._state[n].data_ptr())
            out[n] = np.ctypeslib.as_array(raw).reshape(shape)  # a view of ONNX Runtime's buffer
        return out

    def _run_on_state(self, model: str, data: dict, output: str) -> np.ndarray:
        """Run eval_model.onnx or forward.onnx on the parameters where they live (no host copy)."""
        sess = self._session(model)
        b = sess.io_binding()
        self._bind_frozen(b)
        for n in self._names:
            b.bind_ortvalue_input(n, self._state[n])
        for name, arr in data.items():
            b.bind_cpu_input(name, arr)
        b.bind_output(output, "cpu")
        sess.run_with_iobinding(b)
        return b.copy_outputs_to_cpu()[0]

    def _loss(self, tokens, positions, labels) -> float:
        data = {"tokens": tokens, "positions": positions, "labels": labels}
        return float(self._run_on_state("eval_model.onnx", data, LOSS_OUTPUT))

    def _logits(self, tokens, positions) -> np.ndarray:
        return self._run_on_state("forward.onnx", dict(zip(BATCH_INPUTS, (tokens, positions))), LOGITS_OUTPUT)

    def parameters(self) -> dict[str, np.ndarray]:
        if self._in_place:
            self._check_moments()  # a diverged in-place step left no good parameters to read
        return {n: self._state[n].numpy().copy() for n in self._names}

    def moments(self):
        """(m, v) of every parameter, or of the owned ones after _shard_moments."""
        names = self._names if self._owned is None else self._owned
        return (
            {n: self._state[m_name(n)].numpy().copy() for n in names},
            {n: self._state[v_name(n)].numpy().copy() for n in names},
        )

    def _restore(self, ckpt: Checkpoint) -> None:
        if self._owned is not None:
            raise CheckpointError("this runtime's moments are sharded; restore a checkpoint before sharding")
        if ckpt.adam_m is None or ckpt.adam_v is None:
            if ckpt.step == 0:
                zeros = {n: np.zeros(s, np.float32) for n, s in self.art.param_shapes.items()}
                ckpt.adam_m, ckpt.adam_v = zeros, zeros
            else:
                raise CheckpointError(f"checkpoint at step {ckpt.step} holds no AdamW moments; cannot resume exactly")
        self._set_state(ckpt.params, ckpt.adam_m, ckpt.adam_v)
        self._stale_moments_at = None
