"""The batches, hyperparameters and oracle results the engine checks share (run in .venv).

``write_feeds`` writes the FEEDS file tests/engines/run_engine.py reads; ``oracle`` trains the
PyTorch oracle (tests/oracle) on the same batches from the folder's initial weights.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

import runtimes
from tests.parity_util import F32, batches

STEPS, LR, BETAS, EPS, WD = 10, 1e-3, (0.9, 0.999), 1e-8, 0.01
CLIP = 1.8  # below the gradient norm on most of these steps: the clipping path runs too


def _art(folder: Path):
    return runtimes.load(folder, runtime="reference", verify=False).art


def data(folder: Path, steps: int = STEPS):
    """(forward batch, training batches) on the folder's config: the parity suite's seeds."""
    cfg = _art(folder).config
    return batches(cfg, 1, batch=3, seed=7)[0], batches(cfg, steps, batch=2, seed=9)


def write_feeds(folder: Path, path: Path, steps: int = STEPS, clip: float = CLIP) -> Path:
    fwd, train = data(folder, steps)
    np.savez(path, **{"fwd.tokens": fwd[0], "fwd.positions": fwd[1]},
             tokens=np.stack([b[0] for b in train]), positions=np.stack([b[1] for b in train]),
             labels=np.stack([b[2] for b in train]),
             hp=np.stack([runtimes.make_hp(LR, *BETAS, EPS, WD, step=t + 1) for t in range(steps)]),
             clip=np.float32(clip))
    return path


def oracle(folder: Path, steps: int = STEPS, clip: float = CLIP) -> dict:
    from tests.oracle.torch_gpt2 import TorchGPT2

    art = _art(folder)
    fwd, train = data(folder, steps)
    o = TorchGPT2(art.config, art.initial_weights())
    logits = o.logits(*fwd[:2])
    losses = o.train(train, lr=F32(LR), betas=(F32(BETAS[0]), F32(BETAS[1])), eps=F32(EPS), weight_decay=F32(WD),
                     clip=clip)
    return {"logits": logits, "losses": losses, "grad_norms": list(o.grad_norms), "params": o.parameters()}
