"""The training loop: batches in, losses out, with progress, checkpoints, a plot and a sample.

Everything a run writes goes under ``--out``: ``log.jsonl`` (one JSON object per
step: step, loss, lr, grad_norm (the global gradient norm before clipping; null on
ort-training, whose kernel does not report it), tokens_per_s, and val_loss where evaluated),
``checkpoint.safetensors`` (resumable: parameters, moments, step, the data
sampler's state), ``weights.safetensors`` (the trained weights alone),
``loss.png``, ``sample.txt``, ``summary.json`` and, for a folder with a Hugging
Face tokenizer, the data's token ids (``tokens-*.bin``, see tokenizer.py: made
once, reused by every later run in the folder). Every one is written
atomically (a temporary file in the folder, renamed over the target), so a
symbolic link planted in ``--out`` is replaced, never followed; nothing is
written anywhere else. A run holds ``--out/.lock`` for its whole life (see
runlock.py): a second run on the same folder is refused with the holder's PID.

Order of checks, all before the first step: options, the artifact manifest,
the data (DataError when empty or shorter than one sequence), the output folder
(OutputError when it is, or lies inside, an artifact folder, when it cannot be
created or written, when another run holds it, or when its disk has less free
space than a checkpoint, the weights and the log need), then the runtime and,
on resume, the checkpoint and the sampler state.

Nothing lost: checkpoints are atomic (checkpoint.write_atomic), so an
interrupted or killed run always leaves its last good checkpoint; it holds the
sampler's RNG state and position, so ``--resume`` draws exactly the batches an
uninterrupted run would and, on the CPU provider, reproduces its losses and
weights bit for bit.

Divergence: a step whose loss is NaN or infinite stops the run with
TrainingDiverged (``ort`` and ``reference`` raise it themselves; ``reference``
commits nothing, ``ort`` has written the update in place (its moments always,
its parameters where the manifest allows in-place updates); ``ort-training``
updates everything in place and returns the NaN). A
gradient that overflows can leave parameters or moments non-finite while the
loss of that step is still finite; train() therefore checks that every
parameter and both AdamW moments are finite before it writes a checkpoint (and
the weights), and stops with TrainingDiverged instead of writing them. Either
way the last checkpoint on disk is the last good one, and the message names it.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from contract.files import refuse_artifact_folder, write_atomic
from contract.hp import check_clip, make_hp
from contract.jsonlimits import loads_limited

from . import base
from .artifacts import Artifacts, load_artifacts
from .checkpoint import save_checkpoint
from .data import (BatchSampler, ByteTokenizer, corpus_files, decode, dense_labels, encode, fixed_batches, load_tokens,
                   train_val_split)
from .errors import DataError, GPT2OnnxError, InputError, OutputError, TrainingDiverged
from .runlock import RunLock
from .tokenizer import HFTokenizer, cached_tokens, load_tokenizer


DEFAULT_SEQ = 64


@dataclass
class TrainOptions:
    artifacts: str = "artifacts/small"
    runtime: str = "ort"
    device: str = "cpu"
    # Defaults are `make train`'s, the best validation loss of a grid over lr and warmup
    # with clipping at 1.0 (README): small goes from 5.36 to about 1.49 in these 1200
    # steps of 16x64 tokens, with no training loss above the step-0 loss after step 5.
    # Short sequences buy more updates per second than context does.
    steps: int = 1200
    batch: int = 16
    seq: int | None = None  # None: DEFAULT_SEQ, or the context if that is smaller
    lr: float = 1.5e-3
    min_lr: float = 4e-4
    warmup: int = 100
    seed: int = 1
    data: str | None = None
    out: str = "runs/default"
    eval_every: int = 100
    eval_batches: int = 8
    checkpoint_every: int = 500
    threads: int | None = None
    sample_bytes: int = 300
    resume: str | None = None
    progress: bool = True
    stop_after: int | None = None  # stop (with a checkpoint) after this step; the lr schedule still spans `steps`
    # Global gradient-norm clipping threshold (0: off). None: 1.0, except on ort-training,
    # whose threshold is fixed in its optimizer model: there None means the built one.
    clip: float | None = None
    # Gradient accumulation: each batch of `batch` sequences runs as this many micro-batches of
    # batch/accumulate through grad_step.onnx, then one apply_step.onnx (1: train_step.onnx).
    accumulate: int = 1
    # Data parallel over MPI (runtimes/distributed.py): this process is one of mpiexec's ranks; each
    # takes its share of every batch. shard_optimizer: each rank keeps 1/N of the AdamW moments.
    data_parallel: bool = False
    shard_optimizer: bool = False


DEFAULT_CLIP = 1.0


def clip_for(opts: TrainOptions, art: Artifacts) -> float:
    if opts.clip is not None:
        return opts.clip
    return float(art.config.get("clip", 0.0)) if opts.runtime == "ort-training" else DEFAULT_CLIP


def lr_at(step: int, opts: TrainOptions) -> float:
    """Linear warmup to ``lr`` over ``warmup`` steps, then cosine decay to ``min_lr``."""
    if opts.warmup > 0 and step <= opts.warmup:
        return opts.lr * step / opts.warmup
    span = max(1, opts.steps - opts.warmup)
    frac = min(1.0, (step - opts.warmup) / span)
    return opts.min_lr + 0.5 * (opts.lr - opts.min_lr) * (1.0 + math.cos(math.pi * frac))


def _check_options(o: TrainOptions) -> None:
    checks = [
        ("steps", o.steps, o.steps >= 1, ">= 1"),
        ("batch", o.batch, o.batch >= 1, ">= 1"),
        ("lr", o.lr, o.lr >= 0 and math.isfinite(o.lr), ">= 0"),
        ("min_lr", o.min_lr, 0 <= o.min_lr <= max(o.lr, 0), "in [0, lr]"),
        ("warmup", o.warmup, o.warmup >= 0, ">= 0"),
        ("eval_every", o.eval_every, o.eval_every >= 1, ">= 1"),
        ("eval_batches", o.eval_batches, o.eval_batches >= 1, ">= 1"),
        ("checkpoint_every", o.checkpoint_every, o.checkpoint_every >= 1, ">= 1"),
        ("sample_bytes", o.sample_bytes, o.sample_bytes >= 0, ">= 0"),
        ("stop_after", o.stop_after, o.stop_after is None or o.stop_after >= 1, ">= 1"),
        ("threads", o.threads, o.threads is None or o.threads >= 1, ">= 1"),
        ("clip", o.clip, o.clip is None or (o.clip >= 0 and not math.isnan(o.clip)), ">= 0 (0: off)"),
    ]
    for name, value, ok, rng in checks:
        if not ok:
            raise InputError(f"--{name.replace('_', '-')} must be {rng}, got {value!r}")
    if o.accumulate < 1 or o.batch % o.accumulate:
        raise InputError(f"--accumulate must be >= 1 and divide --batch {o.batch} (equal micro-batches), "
                         f"got {o.accumulate!r}")
    for flag, on in (("--accumulate", o.accumulate > 1), ("--data-parallel", o.data_parallel)):
        if on and o.runtime == "ort-training":
            raise InputError(f"{flag} needs the split step graphs, which ort-training does not run; use --runtime ort")
    if o.shard_optimizer and not o.data_parallel:
        raise InputError("--shard-optimizer shares the optimizer state among data-parallel ranks: add --data-parallel")


CHECKPOINT_NAME = "checkpoint.safetensors"


def _space_needed(art: Artifacts, opts: TrainOptions, out: Path) -> tuple[int, int, int]:
    """(bytes needed on --out's disk, checkpoint size, weights size), estimated from the manifest.

    A checkpoint holds parameters and both moments (ort-training: ONNX Runtime's
    own checkpoint of the same again); the weights file the parameters. Files
    the run will replace count as free, but one checkpoint's worth must be free
    for the temporary copy an atomic replace writes.
    """
    n = sum(4 * math.prod(p["shape"]) for p in art.manifest["parameters"])
    frozen = sum(4 * math.prod(s) for s in art.frozen_shapes.values())  # in ORT's own checkpoint (LoRA)
    ckpt = (6 * n + frozen if opts.runtime == "ort-training" else 3 * n) + (1 << 20)
    weights = n + (64 << 10)
    rest = 200 * opts.steps + (1 << 20)  # log.jsonl, loss.png, sample.txt, summary.json
    existing = sum((out / f).stat().st_size for f in (CHECKPOINT_NAME, "weights.safetensors") if (out / f).is_file())
    return max(ckpt + weights - existing, ckpt) + rest, ckpt, weights


def _prepare_out(out: Path, art: Artifacts | None = None, opts: TrainOptions | None = None) -> None:
    """Fail before training, not after an hour, when the output folder is unusable or its disk too full."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".write-test-{os.getpid()}"
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            os.write(fd, b"\0" * 4096)
            os.fsync(fd)
        finally:
            os.close(fd)
            probe.unlink()
    except OSError as e:
        raise OutputError(f"--out {out} is not a writable folder: {e.strerror or e}") from None
    if art is not None and opts is not None:
        need, ckpt, weights = _space_needed(art, opts, out)
        free = shutil.disk_usage(out).free
        if free < need:
            raise OutputError(
                f"--out {out} has {free:,} bytes free on its disk; this run needs about {need:,} "
                f"(checkpoint ~{ckpt:,}, weights ~{weights:,}): free some space or choose another --out"
            )


def _nonfinite(snap) -> str | None:
    """The first parameter or AdamW moment of a checkpoint snapshot holding NaN or inf, or None."""
    for name, a in snap.params.items():
        if not np.isfinite(a).all():
            return f"parameter {name!r}"
    for which, d in (("first moment (m)", snap.adam_m), ("second moment (v)", snap.adam_v)):
        for name, a in (d or {}).items():
            if not np.isfinite(a).all():
                return f"AdamW {which} of {name!r}"
    return None


def sample_text(rt: base.Runtime, prompt: str, n_bytes: int, temperature: float = 0.8, seed: int = 0,
                tokenizer: ByteTokenizer | HFTokenizer | None = None) -> str:
    """Generate ``n_bytes`` tokens (bytes, on a byte folder) after ``prompt`` with decoder.onnx's key/value
    cache (runtimes/sample.py continue_ids: past the context it refills the cache from the last half
    context); a folder built before decoder.onnx slides a context-sized window over forward.onnx.
    The text is the tokenizer's decoding of prompt and sample."""
    from .sample import DECODER, Decoder, continue_ids

    ctx = rt.art.config["context"]
    byte_level = tokenizer is None or tokenizer.kind == "bytes"
    if byte_level:
        ids, limit = list(encode(prompt)) or [10], rt.art.config["vocab"]
    else:  # ids past the tokenizer's vocab (padding rows of the embedding) decode to nothing: never drawn
        ids = [int(i) for i in tokenizer.encode(prompt or "\n")]
        limit = tokenizer.vocab_size
    if DECODER in rt.art.manifest["files"]:
        ids += continue_ids(Decoder(rt.art, rt.parameters(), rt.threads), ids, n_bytes, temperature, seed, limit)
    else:
        rng = np.random.default_rng(seed)
        for _ in range(n_bytes):
            window = np.array(ids[-ctx:], dtype=np.int64)[None, :]
            pos = np.arange(window.shape[1], dtype=np.int64)[None, :]
            logits = rt.logits(window, pos)[0, -1, :limit].astype(np.float64) / temperature
            p = np.exp(logits - logits.max())
            ids.append(int(rng.choice(len(p), p=p / p.sum())))
    return decode(np.array(ids, dtype=np.uint8)) if byte_level else tokenizer.decode(ids)


def _plot(log: list[dict], path: Path, start: tuple[int, float] | None = None, clip: float = 0.0,
          unit: str = "byte", vocab: int = 256) -> None:
    """Train and validation loss per step (``start``: (step, val loss) before the first update),
    and below it the gradient norm before clipping where the runtime reports it.
    Rendered in memory and written atomically, like every file of a run."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    norms = [(r["step"], r["grad_norm"]) for r in log if r.get("grad_norm") is not None]
    if norms:
        fig, (ax, nax) = plt.subplots(2, 1, figsize=(7, 6), dpi=100, sharex=True, height_ratios=(2, 1))
        nax.semilogy([s for s, _ in norms], [n for _, n in norms], lw=0.8, color="tab:green", label="gradient norm")
        if 0 < clip < math.inf:
            nax.axhline(clip, color="tab:red", ls="--", lw=0.8, label=f"clip {clip:g}")
        nax.set_xlabel("step")
        nax.set_ylabel("global L2 norm")
        nax.legend()
        nax.grid(alpha=0.3)
    else:
        fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
        ax.set_xlabel("step")
    ax.plot([r["step"] for r in log], [r["loss"] for r in log], lw=0.8, label="train loss")
    val = ([start] if start else []) + [(r["step"], r["val_loss"]) for r in log if "val_loss" in r]
    if val:
        ax.plot([s for s, _ in val], [v for _, v in val], "o-", label="validation loss")
    ax.axhline(math.log(vocab), color="grey", ls=":", lw=0.8, label=f"ln({vocab})")
    ax.set_ylabel(f"loss (nats/{unit})")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    png = io.BytesIO()
    fig.savefig(png, format="png")
    plt.close(fig)
    write_atomic(path, png.getvalue())


@dataclass
class _Data:
    """The run's batches: the training sampler and the fixed validation batches."""

    name: str
    train_bytes: int  # tokens: bytes on a byte folder
    val_bytes: int
    seq: int
    sampler: BatchSampler
    val_batches: list
    unit: str = "bytes"

    @staticmethod
    def check(opts: TrainOptions, cfg: dict, tokenizer) -> int:
        """What can be checked before the run folder exists; returns the sequence length."""
        if tokenizer.kind == "bytes" and cfg["vocab"] < 256:
            raise DataError(f"byte-level data needs vocab >= 256; these artifacts have vocab {cfg['vocab']}")
        seq = min(DEFAULT_SEQ, cfg["context"]) if opts.seq is None else opts.seq
        if not 1 <= seq <= cfg["context"]:
            raise InputError(f"--seq must be in [1, {cfg['context']}] (the context), got {seq}")
        if opts.data is not None:
            corpus_files(opts.data)  # DataError when it does not exist
        return seq

    @classmethod
    def load(cls, opts: TrainOptions, cfg: dict, tokenizer=None, cache: Path | None = None) -> "_Data":
        """The batches; a Hugging Face tokenizer's ids come from (or go to) the cache in ``cache``."""
        tokenizer = tokenizer or ByteTokenizer()
        seq = cls.check(opts, cfg, tokenizer)
        if tokenizer.kind == "bytes":
            ids = load_tokens(opts.data)
        else:
            ids = cached_tokens(tokenizer, opts.data, cache, progress=opts.progress)
        train_ids, val_ids = train_val_split(ids)
        name = opts.data or "default corpus (Python standard library sources)"
        sampler = BatchSampler(train_ids, opts.batch, seq, seed=opts.seed, vocab=cfg["vocab"], name=name)
        val_seq = min(seq, len(val_ids) - 1)
        if val_seq < 1:
            raise DataError(f"{name}: the validation split holds {len(val_ids)} tokens, too few for one sequence")
        val_batches = fixed_batches(val_ids, opts.batch, val_seq, opts.eval_batches, seed=12345)
        if cfg["labels"] == "dense":
            val_batches = [(t, p, dense_labels(l, cfg["vocab"])) for t, p, l in val_batches]
        return cls(name, len(train_ids), len(val_ids), seq, sampler, val_batches,
                   "bytes" if tokenizer.kind == "bytes" else "tokens")

    def next_batch(self, cfg: dict):
        batch = self.sampler.next()
        if cfg["labels"] == "dense":
            batch = (batch[0], batch[1], dense_labels(batch[2], cfg["vocab"]))
        return batch


class _Run:
    """One training run: prepared (every check before the first step), then stepped,
    evaluated and checkpointed, then finished (weights, plot, sample, summary).

    It holds the run folder's lock from prepare() until close()."""

    def __init__(self, opts: TrainOptions, echo, world=None):
        # Data parallel: every rank runs this, rank 0 alone (the writer) touches --out and speaks.
        self.world, self.writer = world, world is None or world.rank == 0
        self.opts, self.echo = opts, echo if self.writer else (lambda *a, **k: None)
        if world is not None and opts.batch % (world.size * opts.accumulate):
            raise InputError(f"--batch {opts.batch} must be divisible by ranks x --accumulate "
                             f"({world.size} x {opts.accumulate}): every rank takes an equal share")
        self.out = Path(opts.out)
        self.art = load_artifacts(opts.artifacts, verify=False)  # the manifest alone; the runtime verifies every file
        self.cfg = self.art.config
        self.tokenizer = load_tokenizer(self.art)
        # byte data is read now; a tokenizer's ids are cached in --out, so they wait for the folder and its lock
        self.data = _Data.load(opts, self.cfg) if self.tokenizer.kind == "bytes" else None
        if self.data is None:
            _Data.check(opts, self.cfg, self.tokenizer)
        self.clip = clip_for(opts, self.art)
        refuse_artifact_folder(self.out, "--out")
        self.lock = None
        if self.writer:
            _prepare_out(self.out, self.art, opts)
            self.lock = RunLock(self.out)
            self.lock.acquire()
        try:
            if self.data is None and self.writer:
                self.data = _Data.load(opts, self.cfg, self.tokenizer, cache=self.out)
            if world is not None:
                world.barrier("the start")  # rank 0 holds --out (and made a tokenizer's id cache there)
            if self.data is None:
                self.data = _Data.load(opts, self.cfg, self.tokenizer, cache=self.out)
            self.rt = self._runtime()
        except BaseException:
            self.close()
            raise
        self.ckpt_path = self.out / CHECKPOINT_NAME
        self.last_good = (str(opts.resume), self.rt.step_count) if opts.resume else None
        if world is not None:
            world.last_checkpoint = self.last_good  # what a lost rank's message names until the next one
        self.stop = min(opts.steps, opts.stop_after or opts.steps)
        self.log_path = self.out / "log.jsonl"
        self.log: list[dict] = []
        self.tokens_done, self.last_val = 0, None

    def _runtime(self) -> base.Runtime:
        o, cfg = self.opts, self.cfg
        threads = o.threads or (self.world.default_threads() if self.world else None)
        if o.resume:
            rt = base.resume(o.resume, runtime=o.runtime, device=o.device, threads=threads, artifacts=o.artifacts)
        else:
            rt = base.load(o.artifacts, o.runtime, o.device, threads)
        if o.accumulate > 1 or self.world:  # an older folder without them says to rebuild, before the first step
            rt.art.path("grad_step.onnx"), rt.art.path("apply_step.onnx")
        if self.world:
            from .distributed import DataParallel

            rt = DataParallel(rt, self.world, shard_optimizer=o.shard_optimizer)
        rt._check_hp_supported(make_hp(o.lr, cfg["beta1"], cfg["beta2"], cfg["eps"], cfg["weight_decay"]),
                               check_clip(self.clip))  # ort-training: a threshold other than the built one fails now
        if o.resume and "sampler" in rt.resumed_extra:
            self.data.sampler.load_state_dict(rt.resumed_extra["sampler"])
        return rt

    def close(self) -> None:
        if self.lock is not None:
            self.lock.release()

    # --- messages -----------------------------------------------------------

    def where_good(self) -> str:
        if self.last_good is None:
            return (f"no checkpoint was written yet (the first is due at step {self.opts.checkpoint_every}); "
                    f"start again with a lower --lr")
        path, step = self.last_good
        return f"the last good checkpoint is {path} (step {step}); continue with --resume {path} and a lower --lr"

    # --- the run --------------------------------------------------------------

    def start(self) -> None:
        """Keep a resumed run's log up to its checkpoint (rewritten atomically, then appended
        to), announce the run and measure the validation loss before the first update."""
        o, rt = self.opts, self.rt
        if o.resume and self.log_path.exists():
            try:
                lines = self.log_path.read_text().splitlines()
                self.log = [loads_limited(line, "log line", ValueError) for line in lines if line.strip()]
            except (OSError, ValueError):
                self.log = []  # a damaged log is not worth failing the resume for; it restarts here
            self.log = [r for r in self.log if isinstance(r, dict) and r.get("step", math.inf) <= rt.step_count]
        if self.writer:
            write_atomic(self.log_path, "".join(json.dumps(r) + "\n" for r in self.log).encode())
        d = self.data
        self.echo(
            f"training {rt.art.folder} on {o.runtime}/{o.device}: {d.train_bytes:,} train {d.unit}, "
            f"{d.val_bytes:,} validation {d.unit}, batch {o.batch}x{d.seq}, steps {rt.step_count + 1}..{self.stop}"
            + (f" (of {o.steps})" if self.stop < o.steps else "")
            + f", gradient clipping {'at ' + format(self.clip, 'g') if 0 < self.clip < math.inf else 'off'}"
            + (f", {self.world.size} data-parallel ranks" + (" sharing the optimizer state" if o.shard_optimizer else "")
               if self.world else "")
            + ", {:,} of {:,} parameters trained".format(*rt.art.param_counts)
        )
        self.start_step, self.first_val = rt.step_count, self.evaluate()
        self.echo(f"validation loss at step {rt.step_count}: {self.first_val:.4f}")

    def evaluate(self) -> float:
        v = float(np.mean(self.rt.losses(self.data.val_batches)))
        if not math.isfinite(v):
            raise TrainingDiverged(f"validation loss became {v} at step {self.rt.step_count}; {self.where_good()}")
        return v

    def step(self) -> dict:
        """One update; returns its log row (with val_loss where one is due)."""
        o, rt, t = self.opts, self.rt, self.rt.step_count + 1
        batch = self.data.next_batch(self.cfg)
        lr = lr_at(t, o)
        hp = make_hp(lr, self.cfg["beta1"], self.cfg["beta2"], self.cfg["eps"], self.cfg["weight_decay"], step=t)
        t0 = time.perf_counter()
        try:
            parts = o.accumulate * (self.world.size if self.world else 1)  # micro-batches, dealt out to the ranks
            if parts > 1 or self.world:
                loss = rt.step_accumulated(list(zip(*(np.split(a, parts) for a in batch))), hp, self.clip)
            else:
                loss = rt.step(*batch, hp, self.clip)
        except TrainingDiverged as e:  # ort / reference: the parameters were not updated
            raise TrainingDiverged(f"{e}; {self.where_good()}") from None
        dt = time.perf_counter() - t0
        if not math.isfinite(loss):
            raise TrainingDiverged(f"loss became {loss} at step {t}; {self.where_good()}")
        self.tokens_done += batch[0].size
        row = {"step": t, "loss": loss, "lr": lr, "grad_norm": rt.last_grad_norm,
               "tokens_per_s": batch[0].size / dt if dt > 0 else None}
        if t % o.eval_every == 0 or t == o.steps:
            row["val_loss"] = self.evaluate()
        self.last_val = row.get("val_loss", self.last_val)
        self.log.append(row)
        return row

    def checkpoint(self) -> None:
        """One snapshot of the state, checked finite, then written: never a non-finite checkpoint."""
        rt = self.rt
        snap = rt.snapshot(extra={"sampler": self.data.sampler.state_dict(), "options": asdict(self.opts)})
        if snap is None:  # data parallel: rank 0 writes it; known written once rank 0 is at the next exchange
            self.world.checkpoint_due = (str(self.ckpt_path), rt.step_count)
            return
        bad = _nonfinite(snap)
        if bad:
            raise TrainingDiverged(
                f"{bad} became NaN or infinite by step {rt.step_count} (the loss was still finite: a gradient "
                f"or update overflowed); no checkpoint written for it; {self.where_good()}"
            )
        save_checkpoint(self.ckpt_path, snap)
        self.last_good = (str(self.ckpt_path), rt.step_count)
        if self.world:
            self.world.last_checkpoint = self.last_good

    def finish(self, elapsed: float) -> dict:
        """The trained weights, the plot, a sample and the summary."""
        rt, o, out = self.rt, self.opts, self.out
        log = self.log
        final_val = (log[-1]["val_loss"] if "val_loss" in log[-1] else self.evaluate()) if log else self.first_val
        if not self.writer:
            return {"steps": rt.step_count, "first_val_loss": self.first_val, "final_val_loss": final_val,
                    "seconds": elapsed, "tokens_per_s": self.tokens_done / elapsed if elapsed > 0 else None, "out": None}
        rt.export_weights(out / "weights.safetensors")
        _plot(self.log, out / "loss.png", start=(self.start_step, self.first_val), clip=self.clip,
              unit="byte" if self.tokenizer.kind == "bytes" else "token",
              vocab=256 if self.tokenizer.kind == "bytes" else self.tokenizer.vocab_size)
        summary = {
            "steps": rt.step_count,
            "first_val_loss": self.first_val,
            "final_val_loss": final_val,
            "seconds": elapsed,
            "tokens_per_s": self.tokens_done / elapsed if elapsed > 0 else None,
            "out": str(out),
        }
        if o.sample_bytes:
            text = sample_text(rt, "def ", o.sample_bytes, seed=o.seed, tokenizer=self.tokenizer)
            write_atomic(out / "sample.txt", text.encode())
            summary["sample"] = text
        write_atomic(out / "summary.json", json.dumps({k: v for k, v in summary.items() if k != "sample"}, indent=1).encode())
        return summary


def train(opts: TrainOptions, echo=print) -> dict:
    """Run (or resume) a training run; returns a summary dict."""
    _check_options(opts)
    world = None
    if opts.data_parallel:
        from .distributed import join

        world = join()
    run = _Run(opts, echo, world)
    try:
        run.start()
        from tqdm import tqdm

        trained, total = run.rt.art.param_counts
        bar = tqdm(total=run.stop, initial=min(run.rt.step_count, run.stop), disable=not (opts.progress and run.writer), unit="step",
                   dynamic_ncols=True, desc=f"train {trained:,}/{total:,}" if trained < total else None)
        t_start = time.perf_counter()
        try:
            # O_NOFOLLOW: the log was just replaced atomically; a link planted since is refused, not followed
            fd = (os.open(run.log_path, os.O_WRONLY | os.O_APPEND | os.O_NOFOLLOW | os.O_CLOEXEC) if run.writer
                  else os.open(os.devnull, os.O_WRONLY))  # data parallel: rank 0 keeps the log
            with os.fdopen(fd, "a") as logf:
                while run.rt.step_count < run.stop:
                    row = run.step()
                    logf.write(json.dumps(row) + "\n")
                    logf.flush()
                    shown = {"loss": f"{row['loss']:.3f}", "tok/s": f"{run.tokens_done / (time.perf_counter() - t_start):.0f}"}
                    if row["grad_norm"] is not None:
                        shown["|g|"] = f"{row['grad_norm']:.3g}"
                    bar.set_postfix(shown, **({"val": f"{run.last_val:.3f}"} if run.last_val is not None else {}))
                    bar.update(1)
                    if row["step"] % opts.checkpoint_every == 0 or row["step"] == run.stop:
                        run.checkpoint()
            return run.finish(time.perf_counter() - t_start)
        except OSError as e:  # log, plot, sample or summary (checkpoints raise OutputError themselves)
            where = f"; the last good checkpoint is {run.last_good[0]} (step {run.last_good[1]})" if run.last_good else ""
            raise OutputError(f"could not write to {run.out}: {e.strerror or e}{where}") from None
        finally:
            bar.close()
    finally:
        run.close()


__all__ = ["TrainOptions", "train", "lr_at", "sample_text", "GPT2OnnxError"]
