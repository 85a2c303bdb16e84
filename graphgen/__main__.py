"""CLI: ``python -m graphgen build --config tiny --out artifacts/tiny [...]``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .config import INIT_MODES, LABEL_MODES, PRESETS, ConfigError, GPT2Config


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m graphgen", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build", help="build an artifact folder for a GPT-2 configuration")
    b.add_argument("--config", default="tiny", help=f"preset: {', '.join(PRESETS)} (default tiny)")
    b.add_argument("--out", type=Path, help="output folder (default artifacts/<config>)")
    b.add_argument("--seed", type=int, default=42)
    b.add_argument("--init", choices=INIT_MODES, default="lcg")
    b.add_argument("--labels", choices=LABEL_MODES, default="index")
    b.add_argument("--beta1", type=float, default=0.9)
    b.add_argument("--beta2", type=float, default=0.999)
    b.add_argument("--eps", type=float, default=1e-8)
    b.add_argument("--weight-decay", type=float, default=0.01)
    b.add_argument("--clip", type=float, default=0.0,
                   help="gradient-norm clipping built into the ONNX Runtime training set's optimizer (default 0: off; "
                        "train_step.onnx takes the threshold at every step instead)")
    b.add_argument("--force", action="store_true",
                   help="replace an artifact folder even if it holds files the build did not write "
                        "(never a folder that is not an artifact folder)")
    for f in ("vocab", "context", "d-model", "n-heads", "d-ff", "n-layers"):
        b.add_argument(f"--{f}", type=int, help=f"override the preset's {f.replace('-', '_')}")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        cfg = GPT2Config.preset(
            args.config,
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
    from .artifacts import OutputFolderError, build_artifacts  # heavy imports only once the config is valid

    out = args.out or Path("artifacts") / args.config
    print(f"building {cfg.name}: {cfg.to_dict()}", flush=True)
    try:
        build_artifacts(cfg, out, log=lambda m: print(m, flush=True), force=args.force)
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
