"""The Runtime interface every backend implements, and the registry by name.

A runtime owns the training state (parameters, AdamW moments, step count) for
one artifact folder. The public methods check every input first (validate.py,
hp.py) and only then call the backend's ``_``-prefixed hooks, so a bad batch
raises InputError and leaves the state untouched on every backend alike.

Adding a backend is one file with a ``Runtime`` subclass and one line in
``REGISTRY``. Entries are import paths so that a backend's dependencies
(onnxruntime-training, which cannot share an environment with current
onnxruntime) load only when that backend is chosen.
"""

from __future__ import annotations

import importlib
from pathlib import Path

import numpy as np

from contract import BATCH_INPUTS, LOGITS_OUTPUT

from .artifacts import Artifacts, check_models, check_weights, load_artifacts
from .checkpoint import Checkpoint, check_base, load_checkpoint, save_checkpoint
from .errors import CheckpointError, InputError, OutOfMemory, RuntimeUnavailable
from .ort_env import import_onnxruntime
from .hp import check_clip, check_hp
from .validate import check_labels, check_tokens

REGISTRY: dict[str, str] = {
    "ort-training": "runtimes.ort_training:OrtTrainingRuntime",
    "ort": "runtimes.ort:OrtRuntime",
    "reference": "runtimes.reference:ReferenceRuntime",
    "openvino": "runtimes.openvino:OpenVinoRuntime",
}
DEVICES = ("cpu", "cuda")

# How the allocators report exhaustion: Python/NumPy raise MemoryError; onnxruntime
# raises its own RuntimeException (CPU arena, std::bad_alloc, CUDA) with one of these.
_OOM_MARKS = ("failed to allocate", "bad_alloc", "bad allocation", "out of memory", "cudaerrormemoryallocation")


def _out_of_memory(e: BaseException) -> bool:
    return isinstance(e, MemoryError) or any(k in str(e).lower() for k in _OOM_MARKS)


class Runtime:
    """Training state for one artifact folder, advanced one batch at a time."""

    name = ""
    needs: tuple[str, ...] = ()  # artifact files this backend opens
    accumulates = False  # implements _step_accumulated (grad_step.onnx + apply_step.onnx)
    frozen_inputs = False  # binds a LoRA folder's frozen inputs (base weights) and never updates them

    def __init__(self, art: Artifacts, device: str = "cpu", threads: int | None = None):
        self.art = art
        self.device = device
        self.threads = threads
        self.step_count = 0  # updates applied so far; the next one is t = step_count + 1
        self.resumed_extra: dict = {}  # what the checkpoint we resumed from carried (sampler state...)
        self.last_grad_norm: float | None = None  # global gradient norm of the last step, where reported
        self._forward = None

    # --- public API -------------------------------------------------------

    def step(self, tokens, positions, labels, hp, clip: float = 0.0) -> float:
        """Train on one batch; returns the loss of that batch before the update.

        ``clip`` > 0 scales the gradients so that their global L2 norm is at most
        ``clip`` before AdamW (torch.nn.utils.clip_grad_norm_); 0 or inf: off. The
        norm before clipping is then ``last_grad_norm`` (None where not reported)."""
        tokens, positions, labels = self._batch(tokens, positions, labels)
        hp = check_hp(hp, self.step_count + 1)
        clip = check_clip(clip)
        self._check_hp_supported(hp, clip)
        loss = self._guard_memory(tokens.shape, "step", self._step, tokens, positions, labels, hp, clip)
        self.step_count += 1
        return loss

    def step_accumulated(self, micro_batches, hp, clip: float = 0.0) -> float:
        """One update from several micro-batches (gradient accumulation); returns their mean loss.

        ``micro_batches`` is a sequence of (tokens, positions, labels), all of the same
        shapes: each goes through grad_step.onnx, the gradients are averaged, and one
        apply_step.onnx applies clipping (to the averaged gradient's norm) and AdamW. With
        equal shapes every micro-batch has the same number of tokens, so the mean of their
        mean losses is the mean loss of the concatenated batch and the averaged gradient
        is its gradient: the update is ``step`` on the concatenation, up to float rounding.
        Raises InputError for no micro-batches, unequal shapes, or a backend without it."""
        batches = [self._batch(*mb) for mb in self._micro_batches(micro_batches)]
        shapes = {(t.shape, l.shape) for t, _, l in batches}
        if len(shapes) > 1:
            raise InputError(
                f"micro-batches must all have the same shapes (equal token counts keep the average of their "
                f"mean losses the batch's mean loss); got tokens/labels shapes {sorted(shapes)}")
        if not self.accumulates:
            raise InputError(f"runtime {self.name!r} has no gradient accumulation (its optimizer runs inside one "
                             f"training graph); use --runtime ort")
        hp = check_hp(hp, self.step_count + 1)
        clip = check_clip(clip)
        self._check_hp_supported(hp, clip)
        shape = (sum(t.shape[0] for t, _, _ in batches), batches[0][0].shape[1])
        loss = self._guard_memory(shape, "accumulated step", self._step_accumulated, batches, hp, clip)
        self.step_count += 1
        return loss

    @staticmethod
    def _micro_batches(micro_batches) -> list:
        try:
            batches = [tuple(mb) for mb in micro_batches]
        except TypeError:
            raise InputError("micro_batches must be a sequence of (tokens, positions, labels)") from None
        if not batches or any(len(mb) != 3 for mb in batches):
            raise InputError("micro_batches must be a non-empty sequence of (tokens, positions, labels)")
        return batches

    def losses(self, batches) -> list[float]:
        """``loss`` of each (tokens, positions, labels) in order (data parallel: shared out among the ranks)."""
        return [self.loss(*b) for b in batches]

    def loss(self, tokens, positions, labels) -> float:
        """Mean loss of a batch under the current parameters; no update."""
        tokens, positions, labels = self._batch(tokens, positions, labels)
        return self._guard_memory(tokens.shape, "loss", self._loss, tokens, positions, labels)

    def gradients(self, tokens, positions, labels) -> dict[str, np.ndarray]:
        """d loss / d parameter for one batch under the current parameters; no update."""
        tokens, positions, labels = self._batch(tokens, positions, labels)
        return self._guard_memory(tokens.shape, "gradients", self._gradients, tokens, positions, labels)

    def logits(self, tokens, positions) -> np.ndarray:
        """(B, T, vocab) float32 logits under the current parameters."""
        tokens, positions = check_tokens(tokens, positions, self.art.config["vocab"], self.art.config["context"])
        return self._guard_memory(tokens.shape, "logits", self._logits, tokens, positions)

    def _guard_memory(self, shape, what: str, fn, *args):
        """``fn(*args)``, with an allocation failure turned into OutOfMemory naming the batch.

        Allocation fails in the forward and backward, whose activations grow with the
        batch, before AdamW writes anything: the state is still the last step's."""
        try:
            return fn(*args)
        except Exception as e:
            if not _out_of_memory(e):
                raise
            self._after_failed_run()
            first = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
            raise OutOfMemory(
                f"{what} on a batch of {shape[0]}x{shape[1]} tokens did not fit in memory ({first}); nothing was "
                f"applied and the state is unchanged (step {self.step_count}): use a smaller batch or sequence"
            ) from None

    def parameters(self) -> dict[str, np.ndarray]:
        """Copies of every parameter, in manifest order."""
        raise NotImplementedError

    def moments(self) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]] | None:
        """Copies of AdamW's (m, v) per parameter, or None where the backend cannot export them."""
        return None

    def save(self, path: str | Path, extra: dict | None = None) -> None:
        """Write a checkpoint atomically: parameters, moments, step, and ``extra``."""
        save_checkpoint(path, self.snapshot(extra))

    def snapshot(self, extra: dict | None = None) -> Checkpoint:
        """The whole training state, copied once (what save writes)."""
        moments = self.moments()
        return Checkpoint(
            runtime=self.name,
            step=self.step_count,
            artifacts=str(self.art.folder.resolve()),
            fingerprint=self.art.fingerprint,
            params=self.parameters(),
            adam_m=moments[0] if moments else None,
            adam_v=moments[1] if moments else None,
            native=self._native_state(),
            extra=extra or {},
            base=self.art.base_ref,
        )

    def export_weights(self, path: str | Path) -> None:
        """Trained weights as safetensors, in the same layout as weights.safetensors."""
        from safetensors.numpy import save

        from contract.files import write_atomic

        write_atomic(Path(path), save(self.parameters(), metadata={"step": str(self.step_count)}))

    # --- hooks for backends ----------------------------------------------

    def _step(self, tokens, positions, labels, hp, clip) -> float:
        """One update; sets ``self.last_grad_norm``."""
        raise NotImplementedError

    def _step_accumulated(self, batches, hp, clip) -> float:
        """One update from checked, equally shaped micro-batches; sets ``self.last_grad_norm``
        (of the averaged gradient) and returns the mean of their losses."""
        raise NotImplementedError

    # The split step, for backends with ``accumulates`` (runtimes/distributed.py drives these directly).

    def _micro_gradients(self, tokens, positions, labels, out=None) -> tuple[float, dict[str, np.ndarray]]:
        """grad_step.onnx on one checked micro-batch under the current parameters: (loss, gradients).
        ``out`` ({param: C-contiguous float32 array}): the gradients are written there (and returned)."""
        raise NotImplementedError

    def _apply_gradients(self, grads: dict[str, np.ndarray], hp, clip) -> None:
        """apply_step.onnx with these gradients (clipping by their global norm, AdamW), committed; sets
        ``last_grad_norm``. After ``_shard_moments`` only the parameters it kept are updated."""
        raise NotImplementedError

    def _shard_moments(self, owned: list[str]) -> None:
        """Keep the AdamW moments of ``owned`` parameters only (ZeRO-1); from then on ``_apply_gradients``
        updates those parameters alone and ``moments`` returns theirs."""
        raise NotImplementedError

    def _parameter_buffers(self, names: list[str]) -> dict[str, np.ndarray]:
        """Writable float32 host arrays that are the live storage of these parameters (no copy)."""
        raise NotImplementedError

    def _loss(self, tokens, positions, labels) -> float:
        raise NotImplementedError

    def _gradients(self, tokens, positions, labels) -> dict[str, np.ndarray]:
        raise NotImplementedError

    def _after_failed_run(self) -> None:
        """Backends that accumulate across calls (gradient buffers) clear what a failed run left."""

    def _check_hp_supported(self, hp: np.ndarray, clip: np.ndarray) -> None:
        """Backends with hyperparameters fixed at build time reject others here."""

    def _native_state(self) -> bytes | None:
        return None

    def _restore(self, ckpt: Checkpoint) -> None:
        raise NotImplementedError

    def _logits(self, tokens, positions) -> np.ndarray:
        """Default: forward.onnx in a plain InferenceSession with the current parameters."""
        if self._forward is None:
            ort = import_onnxruntime()

            so = ort.SessionOptions()
            if self.threads:
                so.intra_op_num_threads = self.threads
            self._forward = ort.InferenceSession(
                str(self.art.path("forward.onnx")), so, providers=["CPUExecutionProvider"]
            )
        feeds = {**dict(zip(BATCH_INPUTS, (tokens, positions))), **self.art.frozen_weights(), **self.parameters()}
        return self._forward.run([LOGITS_OUTPUT], feeds)[0]

    # --- shared helpers -----------------------------------------------------

    def _batch(self, tokens, positions, labels):
        cfg = self.art.config
        tokens, positions = check_tokens(tokens, positions, cfg["vocab"], cfg["context"])
        labels = check_labels(labels, tokens.shape, cfg["vocab"], cfg["labels"])
        return tokens, positions, labels


def mean_gradients(per_batch) -> tuple[float, dict[str, np.ndarray]]:
    """(mean loss, mean gradient) of an iterable of (loss, {param: float32 gradient}).

    Summed in float32 in micro-batch order, then divided by the count (exact for a
    power of two), on the CPU in NumPy."""
    losses, acc = [], None
    for loss, grads in per_batch:
        losses.append(float(loss))
        if acc is None:
            acc = {n: np.array(g, dtype=np.float32, copy=True) for n, g in grads.items()}
        else:
            for n, g in grads.items():
                acc[n] += g
    k = np.float32(len(losses))
    for g in acc.values():
        np.divide(g, k, out=g)
    return float(np.mean(losses)), acc


def _runtime_class(name: str) -> type[Runtime]:
    if name not in REGISTRY:
        raise RuntimeUnavailable(f"unknown runtime {name!r}; choose one of {sorted(REGISTRY)}")
    module, cls = REGISTRY[name].split(":")
    try:
        return getattr(importlib.import_module(module), cls)
    except ImportError as e:
        raise RuntimeUnavailable(f"runtime {name!r} cannot load in this environment: {e}") from None


def check_device(device: str) -> None:
    if device not in DEVICES:
        raise InputError(f"device must be one of {DEVICES}, got {device!r}")
    if device == "cuda":
        ort = import_onnxruntime()

        if "CUDAExecutionProvider" not in ort.get_available_providers():
            raise RuntimeUnavailable(
                "device 'cuda' needs onnxruntime's CUDAExecutionProvider, which this installation lacks "
                f"(available: {ort.get_available_providers()}); install a CUDA build "
                "(onnxruntime-gpu, or onnxruntime-training for the ort-training runtime) on a machine with a GPU"
            )


def load(artifacts: str | Path, runtime: str = "ort-training", device: str = "cpu",
         threads: int | None = None, verify: bool = True) -> Runtime:
    """A runtime on the artifacts' initial weights."""
    cls = _runtime_class(runtime)
    check_device(device)
    if threads is not None and (not isinstance(threads, int) or threads < 1):
        raise InputError(f"threads must be a positive integer or None, got {threads!r}")
    art = load_artifacts(artifacts, verify=verify, needs=cls.needs)
    if art.lora is not None and not cls.frozen_inputs:
        raise RuntimeUnavailable(f"{art.folder} is a LoRA folder (frozen base weights); runtime {runtime!r} does not "
                                 f"train frozen inputs: use --runtime ort or reference")
    check_models(art)  # before any session reads a model
    return cls(art, device=device, threads=threads)


def resume(path: str | Path, runtime: str | None = None, device: str = "cpu",
           artifacts: str | Path | None = None, threads: int | None = None) -> Runtime:
    """A runtime restored from a checkpoint: parameters, moments and step count.

    ``runtime`` defaults to the one that wrote the checkpoint; ``artifacts`` to
    the folder recorded in it. The checkpoint's ``extra`` (sampler state, run
    options) is on ``rt.resumed_extra``.
    """
    ckpt = load_checkpoint(path)
    rt = load(artifacts or ckpt.artifacts, runtime or ckpt.runtime, device, threads)
    check_base(ckpt, rt.art, str(path))
    if ckpt.fingerprint != rt.art.fingerprint:
        raise CheckpointError(
            f"{path} was written for another model (fingerprint {ckpt.fingerprint}) than the artifacts in "
            f"{rt.art.folder} ({rt.art.fingerprint})"
        )
    check_weights(ckpt.params, rt.art, str(path), error=CheckpointError)
    rt._restore(ckpt)
    rt.step_count = ckpt.step
    rt.resumed_extra = ckpt.extra
    return rt
