"""CLI: ``python -m runtimes train --artifacts artifacts/small --steps N [...]``, and
``python -m runtimes sample (--checkpoint CKPT | --artifacts ART) --prompt TEXT [...]``.

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
    t.add_argument("--accumulate", type=int, default=_D.accumulate, metavar="K",
                   help="split each batch into K equal micro-batches whose gradients are averaged before one update "
                        "(grad_step.onnx + apply_step.onnx; --batch must be divisible by K; default 1: train_step.onnx)")
    t.add_argument("--data-parallel", action="store_true",
                   help="one of N ranks under mpiexec -n N (MPI; pip install '.[mpi]'): each takes 1/N of every batch, "
                        "gradients are averaged with Allreduce; --batch must be divisible by N x --accumulate")
    t.add_argument("--shard-optimizer", action="store_true",
                   help="with --data-parallel: each rank keeps and updates the AdamW moments of 1/N of the parameters "
                        "(ZeRO stage 1), then the parameters are broadcast")
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

    s = sub.add_parser("sample", help="generate text with decoder.onnx's key/value cache",
                       description="Streams the prompt and the generated text to stdout. The model reads at most "
                                   "`context` tokens and a key/value cache cannot slide, so generation stops, with a "
                                   "message on stderr, when the sequence fills the context.")
    s.error = _one_line_error  # a bad option is one line, like every other error here
    s.add_argument("--checkpoint", default=None,
                   help="checkpoint to take the parameters from (on the artifact folder it records, or --artifacts)")
    s.add_argument("--artifacts", default=None, help="artifact folder (its initial weights unless --checkpoint)")
    s.add_argument("--prompt", required=True, help="text to continue")
    s.add_argument("--max-new-tokens", type=int, default=200, help="tokens to generate (default 200)")
    s.add_argument("--temperature", type=float, default=0.8, help="0: greedy (default 0.8)")
    s.add_argument("--top-k", type=int, default=50, help="keep the k most probable tokens; 0: off (default 50)")
    s.add_argument("--top-p", type=float, default=1.0,
                   help="keep the most probable tokens whose probabilities reach p; 1: off (default 1.0)")
    s.add_argument("--seed", type=int, default=1, help="sampling seed (default 1)")
    s.add_argument("--threads", type=int, default=None, help="intra-op threads (default: all cores)")

    e = sub.add_parser("export", help="write weights as a Hugging Face GPT-2 folder (transformers' from_pretrained, "
                                      "or transformers.js with --onnx)")
    e.error = _one_line_error
    e.add_argument("--hf", default=None, metavar="DIR", help="folder to write (new, empty, or an earlier export)")
    e.add_argument("--onnx", default=None, metavar="DIR",
                   help="write a transformers.js folder instead: onnx/model.onnx with the weights, config, tokenizer")
    e.add_argument("--peft", default=None, metavar="DIR",
                   help="a LoRA folder's adapters as PEFT saves them (adapter_config.json, adapter_model.safetensors); "
                        "--hf and --onnx write its merged model")
    e.add_argument("--checkpoint", default=None, help="export a checkpoint's parameters")
    e.add_argument("--artifacts", default=None,
                   help="artifact folder: its initial weights when alone; the folder of --weights or --checkpoint")
    e.add_argument("--weights", default=None, help="export a weights file (e.g. runs/NAME/weights.safetensors)")
    e.add_argument("--force", action="store_true", help="replace an earlier export even if it holds other files")
    return p


def _one_line_error(message: str):
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def _sample(a) -> int:
    from .sample import SampleOptions, sample

    opts = SampleOptions(checkpoint=a.checkpoint, artifacts=a.artifacts, prompt=a.prompt,
                         max_new_tokens=a.max_new_tokens, temperature=a.temperature, top_k=a.top_k,
                         top_p=a.top_p, seed=a.seed, threads=a.threads)
    import_onnxruntime()
    try:
        sample(opts)
    except GPT2OnnxError as e:
        print("error: " + " ".join(str(e).split()), file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    if sys.stdout.isatty():
        print()
    return 0


def main(argv: list[str] | None = None) -> int:
    a = _parser().parse_args(argv)
    if a.command == "sample":
        return _sample(a)
    if a.command == "export":
        from .export import main as export_main

        return export_main(a)
    opts = TrainOptions(
        artifacts=a.artifacts, runtime=a.runtime, device=a.device, steps=a.steps, batch=a.batch, seq=a.seq,
        lr=a.lr, min_lr=a.min_lr, warmup=a.warmup, seed=a.seed, data=a.data, out=a.out,
        eval_every=a.eval_every, eval_batches=a.eval_batches, checkpoint_every=a.checkpoint_every,
        threads=a.threads, sample_bytes=a.sample_bytes, resume=a.resume, progress=not a.no_progress,
        stop_after=a.stop_after, clip=a.clip, accumulate=a.accumulate,
        data_parallel=a.data_parallel, shard_optimizer=a.shard_optimizer,
    )
    import_onnxruntime()  # before train() loads a runtime: skips the training wheel's torch import
    try:
        s = train(opts)
    except GPT2OnnxError as e:
        print("error: " + " ".join(str(e).split()), file=sys.stderr)
        if opts.data_parallel:
            from .distributed import abort_on_error

            abort_on_error()  # the other ranks would wait for this one
        return 2
    except KeyboardInterrupt:
        print("interrupted; the last checkpoint is kept", file=sys.stderr)
        return 130
    if s["out"] is None:  # a data-parallel rank other than 0: rank 0 reports
        return 0
    print(f"validation loss {s['first_val_loss']:.4f} -> {s['final_val_loss']:.4f} in {s['steps']} steps, "
          f"{s['seconds']:.0f}s, {s['tokens_per_s']:.0f} tokens/s; wrote {s['out']}/loss.png")
    if "sample" in s:
        print("sample:\n" + s["sample"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
