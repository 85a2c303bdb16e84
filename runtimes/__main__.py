"""CLI: ``python -m runtimes train --artifacts artifacts/small --steps N [...]``.

Exit status: 0 on success; 2 with one line ``error: ...`` on stderr for every
error this package raises on purpose (bad option, artifacts, data, checkpoint,
unwritable or full --out, divergence: the message names the last good
checkpoint); 130 on Ctrl-C (the last checkpoint is kept).
"""

from __future__ import annotations

import argparse
import sys

from .base import DEVICES, REGISTRY
from .errors import GPT2OnnxError
from .ort_env import import_onnxruntime
from .train import DEFAULT_CLIP, DEFAULT_SEQ, TrainOptions, train

_D = TrainOptions()


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m runtimes")
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="train from an artifact folder on byte-level text")
    t.add_argument("--artifacts", default=_D.artifacts, help=f"artifact folder (default {_D.artifacts})")
    t.add_argument("--runtime", default=_D.runtime, choices=sorted(REGISTRY))
    t.add_argument("--device", default=_D.device, choices=DEVICES)
    t.add_argument("--steps", type=int, default=_D.steps, help=f"total steps (default {_D.steps})")
    t.add_argument("--batch", type=int, default=_D.batch, help=f"sequences per step (default {_D.batch})")
    t.add_argument("--seq", type=int, default=None,
                   help=f"tokens per sequence, at most the context (default {DEFAULT_SEQ}, or the context if smaller)")
    t.add_argument("--lr", type=float, default=_D.lr, help=f"peak learning rate (default {_D.lr})")
    t.add_argument("--min-lr", type=float, default=_D.min_lr, help=f"final learning rate of the cosine (default {_D.min_lr})")
    t.add_argument("--warmup", type=int, default=_D.warmup, help=f"linear warmup steps (default {_D.warmup})")
    t.add_argument("--clip", type=float, default=None,
                   help=f"clip the global gradient norm to this before AdamW; 0: off (default {DEFAULT_CLIP:g}; "
                        "ort-training: the threshold its artifacts were built with)")
    t.add_argument("--seed", type=int, default=_D.seed, help="data sampler seed")
    t.add_argument("--data", default=None, help="text file or folder (default: the Python standard library's sources)")
    t.add_argument("--out", default=_D.out, help=f"run folder (default {_D.out})")
    t.add_argument("--eval-every", type=int, default=_D.eval_every)
    t.add_argument("--eval-batches", type=int, default=_D.eval_batches)
    t.add_argument("--checkpoint-every", type=int, default=_D.checkpoint_every)
    t.add_argument("--threads", type=int, default=None, help="intra-op threads (default: all cores)")
    t.add_argument("--sample-bytes", type=int, default=_D.sample_bytes, help="bytes of text to generate at the end")
    t.add_argument("--resume", default=None, help="checkpoint to continue from (e.g. runs/NAME/checkpoint.safetensors)")
    t.add_argument("--stop-after", type=int, default=None,
                   help="stop after this step with a checkpoint (the lr schedule still spans --steps); resume later")
    t.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def main(argv: list[str] | None = None) -> int:
    a = _parser().parse_args(argv)
    opts = TrainOptions(
        artifacts=a.artifacts, runtime=a.runtime, device=a.device, steps=a.steps, batch=a.batch, seq=a.seq,
        lr=a.lr, min_lr=a.min_lr, warmup=a.warmup, seed=a.seed, data=a.data, out=a.out,
        eval_every=a.eval_every, eval_batches=a.eval_batches, checkpoint_every=a.checkpoint_every,
        threads=a.threads, sample_bytes=a.sample_bytes, resume=a.resume, progress=not a.no_progress,
        stop_after=a.stop_after, clip=a.clip,
    )
    import_onnxruntime()  # before train() loads a runtime: skips the training wheel's torch import
    try:
        s = train(opts)
    except GPT2OnnxError as e:
        print("error: " + " ".join(str(e).split()), file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; the last checkpoint is kept", file=sys.stderr)
        return 130
    print(f"validation loss {s['first_val_loss']:.4f} -> {s['final_val_loss']:.4f} in {s['steps']} steps, "
          f"{s['seconds']:.0f}s, {s['tokens_per_s']:.0f} tokens/s; wrote {s['out']}/loss.png")
    if "sample" in s:
        print("sample:\n" + s["sample"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
