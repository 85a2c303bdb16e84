"""CLI: ``python -m graphgen build --config tiny --out artifacts/tiny [...]``, or
``python -m graphgen build --from-hf DIR --out ART [...]`` for a Hugging Face GPT-2 folder;
``--lora-rank R`` (either way) builds a LoRA folder: the model frozen, adapters trained."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .config import INIT_MODES, LABEL_MODES, PRESETS, ConfigError, GPT2Config
from .recompute import AUTO_CONTEXT, KINDS as RECOMPUTE_KINDS, checked_kinds


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m graphgen", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build", help="build an artifact folder for a GPT-2 configuration")
    b.add_argument("--config", default=None, help=f"preset: {', '.join(PRESETS)} (default tiny)")
    b.add_argument("--from-hf", type=Path, default=None, metavar="DIR",
                   help="import a Hugging Face GPT-2 folder (config.json, model.safetensors, tokenizer) instead of "
                        "a preset: its config, weights and tokenizer")
    b.add_argument("--out", type=Path, help="output folder (default artifacts/<config>, or artifacts/<DIR's name>)")
    b.add_argument("--seed", type=int, default=None, help="init seed (default 42)")
    b.add_argument("--init", choices=INIT_MODES, default=None, help="init mode (default lcg)")
    b.add_argument("--labels", choices=LABEL_MODES, default="index")
    b.add_argument("--beta1", type=float, default=0.9)
    b.add_argument("--beta2", type=float, default=0.999)
    b.add_argument("--eps", type=float, default=1e-8)
    b.add_argument("--weight-decay", type=float, default=0.01)
    b.add_argument("--clip", type=float, default=0.0,
                   help="gradient-norm clipping built into the ONNX Runtime training set's optimizer (default 0: off; "
                        "train_step.onnx takes the threshold at every step instead)")
    b.add_argument("--recompute", default="auto", metavar="auto|none|attention,gelu",
                   help="what the backward recomputes instead of keeping from the forward: each layer's attention "
                        "probabilities from q and k (gpt2 1x1024: about 430 MB less, one more q k^T product per "
                        "layer) and GELU outputs from their inputs (about 140 MB less, one more GELU per layer). "
                        f"auto (default): both from a context of {AUTO_CONTEXT} up, neither below")
    b.add_argument("--recompute-attention", action="store_true", help="the same as --recompute attention")
    b.add_argument("--force", action="store_true",
                   help="replace an artifact folder even if it holds files the build did not write "
                        "(never a folder that is not an artifact folder)")
    b.add_argument("--lora-rank", type=int, default=None, metavar="R",
                   help="build a LoRA folder: the model's weights frozen, rank-R adapters (PEFT's) trained")
    b.add_argument("--lora-alpha", type=float, default=None, metavar="A",
                   help="LoRA scaling alpha (the update is B A alpha/R; default 8, PEFT's)")
    b.add_argument("--lora-targets", default=None, metavar="T,T",
                   help="Hugging Face GPT-2 module names to adapt (default c_attn,attn.c_proj,mlp.c_fc,mlp.c_proj)")
    b.add_argument("--lora-dropout", type=float, default=None, metavar="P", help="LoRA dropout (only 0 is supported)")
    for f in ("vocab", "context", "d-model", "n-heads", "d-ff", "n-layers"):
        b.add_argument(f"--{f}", type=int, help=f"override the preset's {f.replace('-', '_')}")
    return p


def _fail(message: str) -> int:
    print("error: " + " ".join(str(message).split()), file=sys.stderr)
    return 2


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    imported = None
    if args.from_hf is not None:
        # the model's shape and weights are the folder's: preset, size and init options have no meaning here
        given = [f"--{k.replace('_', '-')}" for k in ("config", "seed", "init", "vocab", "context", "d_model",
                                                      "n_heads", "d_ff", "n_layers") if getattr(args, k) is not None]
        if given:
            return _fail(f"--from-hf takes the model from {args.from_hf}; {', '.join(given)} cannot be combined with it")
        from .hf_import import ImportRefused, import_hf

        try:
            imported = import_hf(args.from_hf, labels=args.labels, beta1=args.beta1, beta2=args.beta2, eps=args.eps,
                                 weight_decay=args.weight_decay, clip=args.clip)
        except (ImportRefused, ConfigError) as e:
            return _fail(str(e))
        except MemoryError:
            return _fail(f"not enough memory to import {args.from_hf}")
        cfg = imported.config
        if imported.tokenizer["kind"] == "bytes":
            print(f"note: {args.from_hf} has no tokenizer (tokenizer.json, or vocab.json + merges.txt); "
                  f"the folder will train on bytes", flush=True)
    if imported is None:
        try:
            cfg = GPT2Config.preset(
                args.config or "tiny",
                vocab=args.vocab,
                context=args.context,
                d_model=args.d_model,
                n_heads=args.n_heads,
                d_ff=args.d_ff,
                n_layers=args.n_layers,
                seed=args.seed,
                init=args.init,
                labels=args.labels,
                beta1=args.beta1,
                beta2=args.beta2,
                eps=args.eps,
                weight_decay=args.weight_decay,
                clip=args.clip,
            )
        except ConfigError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
    recompute = None  # auto
    if args.recompute_attention:
        if args.recompute != "auto":
            return _fail(f"--recompute-attention is --recompute attention; --recompute {args.recompute} says otherwise")
        recompute = ["attention"]
    elif args.recompute == "none":
        recompute = []
    elif args.recompute != "auto":
        try:
            recompute = checked_kinds([k.strip() for k in args.recompute.split(",")])
        except ValueError:
            return _fail(f"--recompute {args.recompute!r}: give auto, none, or a comma-separated list of "
                         f"{', '.join(RECOMPUTE_KINDS)}")
    lora = None
    lora_given = [f"--lora-{k}" for k in ("alpha", "targets", "dropout") if getattr(args, f"lora_{k}") is not None]
    if args.lora_rank is None and lora_given:
        return _fail(f"{', '.join(lora_given)} need --lora-rank (a LoRA folder)")
    if args.lora_rank is not None:
        from contract import LORA_TARGETS
        from contract.lora import LoraError, check_lora, parse_targets

        try:
            targets = parse_targets(args.lora_targets if args.lora_targets is not None else list(LORA_TARGETS))
            lora = check_lora(cfg.to_dict(), args.lora_rank, 8.0 if args.lora_alpha is None else args.lora_alpha,
                              targets, 0.0 if args.lora_dropout is None else args.lora_dropout)
        except LoraError as e:
            return _fail(str(e))
    from .artifacts import OutputFolderError, build_artifacts  # heavy imports only once the config is valid

    out = args.out or Path("artifacts") / (cfg.name if imported is not None else args.config or "tiny")
    print(f"building {cfg.name}: {cfg.to_dict()}", flush=True)
    try:
        build_artifacts(cfg, out, log=lambda m: print(m, flush=True), force=args.force, imported=imported,
                        recompute=recompute, lora=lora)
    except OutputFolderError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except MemoryError:
        print(f"error: not enough memory to build {cfg.name} ({cfg.to_dict()}); nothing was written to {out}",
              file=sys.stderr)
        return 2
    except OSError as e:  # the disk filled or the folder became unwritable mid-build
        print(f"error: could not write the artifacts for {out}: {e.strerror or e}; nothing was written to {out}",
              file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
