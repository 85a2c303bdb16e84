"""Data-parallel training over MPI (mpi4py on Open MPI), with an optional sharded optimizer (ZeRO-1).

    mpiexec -n N python -m runtimes train --data-parallel [--shard-optimizer] ...

Every rank runs the same program on a whole copy of the model. The data sampler is
deterministic from the seed, so every rank draws the same global batch and keeps its
own rows without talking; the N x K micro-batches of a step (K = --accumulate) are
dealt out in order, rank r taking numbers rK .. rK+K-1. A rank sums its micro-batches'
gradients (grad_step.onnx) in a flat float32 buffer, the ranks sum those with
Allreduce, and the sum is divided by N x K: the same mean gradient as one process
with --accumulate N x K, and, where the summation order is the same (N x K <= 2, or
N = 1), bit for bit the same. Every rank then applies it with apply_step.onnx and
holds identical parameters; only rank 0 writes (log, checkpoints, weights, progress).

Buckets: the flat buffer is reduced in buckets of BUCKET_BYTES, each a non-blocking
Iallreduce, all posted at once; dividing bucket k by N x K overlaps the transfer of
the buckets after it. That is all the overlap there is: ONNX Runtime hands out every
gradient at the end of one grad_step run (no per-layer hook), so there is no backward
pass left to overlap the transfer with.

--shard-optimizer (ZeRO stage 1): the parameters are dealt out whole, in manifest
order, to contiguous ranges balanced by size (partition()); a rank keeps the AdamW
moments of its range only and updates only those parameters, with apply_step.onnx cut
down to them (shard.py: the cut is node for node the same arithmetic, the clipping
norm still over all gradients), then every parameter is broadcast from its owner
straight into the other ranks' live buffers. Results are bit-identical to plain data
parallelism. Whole parameters rather than a flat slice: apply_step.onnx is reused as
it is, and the imbalance is at most one parameter (mid: the embedding, 18%).

Failures: when a rank dies, mpiexec (prterun) sends SIGTERM to the others and SIGKILL
about a second later; a thread woken by the signal (World.watch_sigterm) prints one
line naming the lost rank (found by its process id among the ranks on this host) and
the last checkpoint, and exits with status 2. Every collective is non-blocking and
waited on in a polling loop. A collective
that does not complete in TIMEOUT_S (a rank hung, or a peer on another host gone
without mpiexec noticing) ends the job the same way through MPI_Abort.
"""

from __future__ import annotations

import math
import os
import signal
import socket
import sys
import threading
import time
import traceback

import numpy as np

from .base import Runtime
from .errors import InputError, RuntimeUnavailable, TrainingDiverged

BUCKET_BYTES = 16 << 20
TIMEOUT_S = float(os.environ.get("GPT2_ONNX_DP_TIMEOUT", "1800"))  # one collective; generous for rank 0's checkpoint
POLL_S = 2e-4
EXIT_LOST = 2


def _mpi():
    try:
        from mpi4py import MPI
    except ImportError as e:
        raise RuntimeUnavailable(
            f"--data-parallel needs mpi4py and Open MPI ({e}): pip install '.[mpi]', then run with "
            f"mpiexec -n N python -m runtimes train --data-parallel ...") from None
    return MPI


class World:
    """This process's place among the ranks: communicator, rank, size, the peers' (host, pid),
    and the last checkpoint (named when the job fails)."""

    def __init__(self, MPI, comm):
        self.MPI, self.comm = MPI, comm
        self.rank, self.size = comm.Get_rank(), comm.Get_size()
        self.host = socket.gethostname()
        self.peers: list[tuple[str, int]] = comm.allgather((self.host, os.getpid()))
        self.local_size = sum(h == self.host for h, _ in self.peers)
        self.last_checkpoint: tuple[str, int] | None = None
        self.checkpoint_due: tuple[str, int] | None = None  # ranks > 0: rank 0 is writing it

    # --- waiting, with a watchdog ------------------------------------------------------------

    def wait(self, requests, what: str) -> None:
        """Wait for non-blocking requests, polling (signals are handled meanwhile); TIMEOUT_S ends the job."""
        MPI = self.MPI
        deadline = time.monotonic() + TIMEOUT_S
        while not MPI.Request.Testall(requests):
            if time.monotonic() > deadline:
                self.fail(f"{what} did not complete within {TIMEOUT_S:.0f} s: {self.lost_peers() or 'a rank hangs'}")
            time.sleep(POLL_S)

    def barrier(self, what: str = "barrier") -> None:
        self.wait([self.comm.Ibarrier()], what)

    def allgather_floats(self, values: list[float], what: str) -> list[float]:
        """Every rank's list of floats (equal lengths), concatenated in rank order."""
        send = np.asarray(values, dtype=np.float64)
        recv = np.empty(send.size * self.size, dtype=np.float64)
        self.wait([self.comm.Iallgather(send, recv)], what)
        return recv.tolist()

    # --- failure ----------------------------------------------------------------------------

    def lost_peers(self) -> str | None:
        """'rank 1 (pid 123 on host)' for each rank on this host whose process is gone."""
        lost = []
        for r, (host, pid) in enumerate(self.peers):
            if r != self.rank and host == self.host and not _alive(pid):
                lost.append(f"rank {r} (pid {pid} on {host})")
        return ", ".join(lost) or None

    def _where(self) -> str:
        if self.last_checkpoint is None:
            return "no checkpoint was written yet"
        path, step = self.last_checkpoint
        return f"the last checkpoint is {path} (step {step}): continue with --resume {path}"

    def fail(self, reason: str) -> None:
        """One line on stderr, then end every rank (MPI_Abort)."""
        print(f"error: rank {self.rank}: {reason}; {self._where()}", file=sys.stderr, flush=True)
        self.comm.Abort(EXIT_LOST)

    def watch_sigterm(self) -> None:
        """Answer mpiexec's SIGTERM from a thread: the main thread may be inside a long ONNX Runtime
        run, and prterun follows up with SIGKILL about a second later. The C-level handler writes
        the signal's number to a pipe (signal.set_wakeup_fd) that this thread waits on."""
        rfd, wfd = os.pipe()
        os.set_blocking(wfd, False)
        signal.signal(signal.SIGTERM, lambda signum, frame: None)  # the thread below does the work
        signal.set_wakeup_fd(wfd, warn_on_full_buffer=False)

        def watch():
            while os.read(rfd, 1) != bytes([signal.SIGTERM]):  # SIGINT and others go on as usual
                pass
            self.on_sigterm()

        threading.Thread(target=watch, name="sigterm-watch", daemon=True).start()

    def on_sigterm(self) -> None:
        lost = self.lost_peers()
        what = (f"{lost} was lost (it exited or was killed)" if lost else
                "stopped by mpiexec: another rank failed or was lost (mpiexec's message names it), or the job was "
                "interrupted")
        print(f"error: rank {self.rank}: {what}; {self._where()}", file=sys.stderr, flush=True)
        os._exit(EXIT_LOST)

    def default_threads(self) -> int:
        """The cores of this host shared out among its ranks."""
        return max(1, (os.cpu_count() or 1) // self.local_size)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie waiting for its parent is gone too
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return True


_WORLD: list[World] = []


def join() -> World:
    """Initialise MPI once per process (a singleton without mpiexec); SIGTERM and uncaught
    exceptions then end this rank with one line instead of leaving the others waiting."""
    if _WORLD:
        return _WORLD[0]
    MPI = _mpi()
    world = World(MPI, MPI.COMM_WORLD)
    _WORLD.append(world)
    if world.size > 1:
        world.watch_sigterm()
        hook = sys.excepthook

        def abort_on_uncaught(kind, value, tb):
            if issubclass(kind, KeyboardInterrupt):
                return hook(kind, value, tb)
            traceback.print_exception(kind, value, tb)
            world.fail(f"{kind.__name__}: {value}")

        sys.excepthook = abort_on_uncaught
    return world


def abort_on_error() -> None:
    """After an error line: end the other ranks, which would otherwise wait for this one."""
    if _WORLD and _WORLD[0].size > 1:
        sys.stderr.flush()
        _WORLD[0].comm.Abort(EXIT_LOST)


def partition(sizes: list[int], n: int) -> list[int]:
    """The owner rank of each parameter (element counts, in order): contiguous ranges, each
    parameter going to the rank whose equal share of the total holds its midpoint."""
    total, start, owners = sum(sizes), 0, []
    for s in sizes:
        owners.append(min(n - 1, int((start + s / 2) * n // total)))
        start += s
    return owners


class DataParallel(Runtime):
    """A runtime's state, stepped by all ranks together: ``step_accumulated`` takes the global
    step's N x K micro-batches and each rank runs its own (see the module docstring)."""

    accumulates = True

    def __init__(self, inner: Runtime, world: World, shard_optimizer: bool = False, bucket_bytes: int = BUCKET_BYTES):
        if not inner.accumulates:
            raise InputError(f"runtime {inner.name!r} cannot hand out gradients, which --data-parallel exchanges; "
                             f"use --runtime ort")
        if shard_optimizer and inner.device != "cpu":
            raise RuntimeUnavailable("--shard-optimizer exchanges parameters in host memory: run it with --device cpu")
        super().__init__(inner.art, inner.device, inner.threads)
        self.name, self.inner, self.world = inner.name, inner, world
        self.step_count, self.resumed_extra = inner.step_count, inner.resumed_extra
        self._names = inner.art.param_names
        shapes = inner.art.param_shapes
        sizes = [math.prod(shapes[n]) for n in self._names]
        offsets = np.cumsum([0] + sizes)
        self._flat = np.empty(int(offsets[-1]), np.float32)  # the gradient sum, all parameters end to end
        self._grads = {n: self._flat[offsets[i]:offsets[i + 1]].reshape(shapes[n]) for i, n in enumerate(self._names)}
        self._scratch = None  # a second flat buffer, for micro-batches after a rank's first
        self._shard_of = self._shards(bucket_bytes)
        self.owner: dict[str, int] | None = None
        if shard_optimizer:
            self.owner = dict(zip(self._names, partition(sizes, world.size)))
            inner._shard_moments([n for n in self._names if self.owner[n] == world.rank])
        # Seconds spent so far in each phase of the step, on this rank (bench/dp.py reads them).
        self.seconds = {"grad": 0.0, "allreduce": 0.0, "apply": 0.0, "broadcast": 0.0}

    def _shards(self, bucket_bytes: int) -> list[slice]:
        step = max(1, bucket_bytes // 4)
        return [slice(i, min(i + step, self._flat.size)) for i in range(0, self._flat.size, step)]

    # --- the step -------------------------------------------------------------------------

    def _step(self, tokens, positions, labels, hp, clip) -> float:
        if tokens.shape[0] % self.world.size:
            raise InputError(f"a batch of {tokens.shape[0]} sequences cannot be shared out equally among "
                             f"{self.world.size} ranks")
        return self._step_accumulated(list(zip(*(np.split(a, self.world.size) for a in (tokens, positions, labels)))),
                                      hp, clip)

    def _step_accumulated(self, batches, hp, clip) -> float:
        w, n = self.world, len(batches)
        if n % w.size:
            raise InputError(f"{n} micro-batches cannot be shared out equally among {w.size} ranks: --batch must be "
                             f"divisible by ranks x --accumulate")
        k = n // w.size
        mine = batches[w.rank * k:(w.rank + 1) * k]
        t0 = time.perf_counter()
        losses = []
        for i, mb in enumerate(mine):  # summed in order, as base.mean_gradients does
            if i == 0:
                loss, _ = self.inner._micro_gradients(*mb, out=self._grads)
            else:
                if self._scratch is None:
                    self._scratch = np.empty_like(self._flat)
                    offsets = np.cumsum([0] + [g.size for g in self._grads.values()])
                    self._scratch_views = {name: self._scratch[offsets[j]:offsets[j + 1]].reshape(g.shape)
                                           for j, (name, g) in enumerate(self._grads.items())}
                loss, _ = self.inner._micro_gradients(*mb, out=self._scratch_views)
                self._flat += self._scratch
            losses.append(loss)
        self.seconds["grad"] += time.perf_counter() - t0
        losses = w.allgather_floats(losses, "the exchange of losses")
        if w.checkpoint_due:  # rank 0 got here, so it has written the checkpoint
            w.last_checkpoint, w.checkpoint_due = w.checkpoint_due, None
        loss = float(np.mean(losses))  # every micro-batch's, in order: as one process would
        if not np.isfinite(loss):  # every rank sees the same: all stop before any update
            raise TrainingDiverged(f"mean loss is {loss} at step {self.step_count + 1}; the update was not applied")
        self._allreduce_mean(np.float32(n))
        self.inner.step_count = self.step_count
        t0 = time.perf_counter()
        self.inner._apply_gradients(self._grads, hp, clip)
        self.seconds["apply"] += time.perf_counter() - t0
        self.last_grad_norm = self.inner.last_grad_norm
        if self.owner is not None:
            self._gather_parameters()
        self.inner.step_count = self.step_count + 1
        return loss

    def _allreduce_mean(self, count: np.float32) -> None:
        """Sum the flat gradient over the ranks in buckets (all in flight at once), dividing each
        bucket by ``count`` as soon as it is in while the later ones still travel."""
        w, MPI = self.world, self.world.MPI
        t0 = time.perf_counter()
        reqs = [w.comm.Iallreduce(MPI.IN_PLACE, self._flat[s], op=MPI.SUM) for s in self._shard_of]
        for req, s in zip(reqs, self._shard_of):
            w.wait([req], "the gradient Allreduce")
            np.divide(self._flat[s], count, out=self._flat[s])
        self.seconds["allreduce"] += time.perf_counter() - t0

    def _gather_parameters(self) -> None:
        """Every parameter from its owner into the live buffers of the others (ZeRO-1's gather)."""
        w = self.world
        t0 = time.perf_counter()
        bufs = self.inner._parameter_buffers(self._names)
        reqs = [w.comm.Ibcast(bufs[n], root=self.owner[n]) for n in self._names]
        w.wait(reqs, "the parameter broadcast")
        self.seconds["broadcast"] += time.perf_counter() - t0

    # --- the rest of the Runtime interface ------------------------------------------------

    def losses(self, batches) -> list[float]:
        """Each rank evaluates every N-th batch; the losses come back in the batches' order."""
        w, batches = self.world, list(batches)
        per = -(-len(batches) // w.size)
        mine = [self.loss(*batches[i]) if i < len(batches) else math.nan
                for i in range(w.rank * per, (w.rank + 1) * per)]
        return w.allgather_floats(mine, "the exchange of validation losses")[:len(batches)]

    def _loss(self, tokens, positions, labels) -> float:
        return self.inner._loss(tokens, positions, labels)

    def _logits(self, tokens, positions) -> np.ndarray:
        return self.inner._logits(tokens, positions)

    def parameters(self) -> dict[str, np.ndarray]:
        return self.inner.parameters()

    def moments(self):
        """Every moment on rank 0 (the owners send theirs); the others' own share elsewhere."""
        m, v = self.inner.moments()
        if self.owner is None:
            return m, v
        w = self.world
        shapes = self.art.param_shapes
        reqs = []
        for n in self._names:
            owner = self.owner[n]
            if owner == 0:
                continue
            if w.rank == owner:
                reqs += [w.comm.Isend(m[n], dest=0, tag=2 * self._names.index(n)),
                         w.comm.Isend(v[n], dest=0, tag=2 * self._names.index(n) + 1)]
            elif w.rank == 0:
                m[n], v[n] = np.empty(shapes[n], np.float32), np.empty(shapes[n], np.float32)
                reqs += [w.comm.Irecv(m[n], source=owner, tag=2 * self._names.index(n)),
                         w.comm.Irecv(v[n], source=owner, tag=2 * self._names.index(n) + 1)]
        w.wait(reqs, "the gathering of the AdamW moments")
        if w.rank == 0:
            m, v = {n: m[n] for n in self._names}, {n: v[n] for n in self._names}
        return m, v

    def snapshot(self, extra: dict | None = None):
        """The whole state on rank 0 (a collective under --shard-optimizer); None on the other ranks."""
        if self.owner is not None:
            self.inner.step_count = self.step_count
            m, v = self.moments()
        if self.world.rank != 0:
            return None
        snap = self.inner.snapshot(extra) if self.owner is None else None
        if snap is None:
            from .checkpoint import Checkpoint

            snap = Checkpoint(runtime=self.name, step=self.step_count, artifacts=str(self.art.folder.resolve()),
                              fingerprint=self.art.fingerprint, params=self.parameters(), adam_m=m, adam_v=v,
                              native=None, extra=extra or {})
        snap.step = self.step_count
        return snap
