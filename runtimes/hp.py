"""The seed's hyperparameter vector: float32[7] = [lr, beta1, beta2, eps, wd, beta1h, beta2h].

beta1h = 1/(1 - beta1^t) and beta2h = 1/(1 - beta2^t) are AdamW's bias
corrections for step t, counted from 1. They travel in the vector (rather than
being derived in the graph) because that is the seed's and ggml's layout; the
runners check that they agree with the step they are about to run.
"""

from __future__ import annotations

import math

import numpy as np

from .errors import InputError

HP_LAYOUT = ("lr", "beta1", "beta2", "eps", "weight_decay", "beta1h", "beta2h")
# Relative tolerance on beta1h/beta2h: loose enough for a caller's float32
# arithmetic, tight enough to catch a step count that is off by one while the
# corrections still change from step to step (at beta2=0.999, until t ~ 2000;
# after that both sides are ~1 and an off-by-one is numerically harmless).
HP_RTOL = 1e-4


def make_hp(lr: float, beta1: float = 0.9, beta2: float = 0.999, eps: float = 1e-8,
            weight_decay: float = 0.01, step: int = 1) -> np.ndarray:
    """The float32[7] vector for update number ``step`` (1 for the first update)."""
    if not isinstance(step, (int, np.integer)) or step < 1:
        raise InputError(f"step must be an integer >= 1 (t counts from 1), got {step!r}")
    b1h = 1.0 / (1.0 - beta1**step) if beta1 > 0 else 1.0
    b2h = 1.0 / (1.0 - beta2**step) if beta2 > 0 else 1.0
    return np.array([lr, beta1, beta2, eps, weight_decay, b1h, b2h], dtype=np.float32)


def check_hp(hp, step: int) -> np.ndarray:
    """Validate ``hp`` for update number ``step``; returns it as float32[7].

    Raises InputError naming the element, its value and the allowed range.
    """
    if not isinstance(hp, np.ndarray):
        raise InputError(f"hp must be a numpy float32 array of 7, got {type(hp).__name__}")
    if hp.dtype != np.float32:
        raise InputError(f"hp must be float32, got {hp.dtype} (use runtimes.make_hp)")
    if hp.shape != (7,):
        raise InputError(f"hp must have shape (7,) {list(HP_LAYOUT)}, got {hp.shape}")
    for i, name in enumerate(HP_LAYOUT):
        if not math.isfinite(float(hp[i])):
            raise InputError(f"hp[{i}] ({name}) must be finite, got {hp[i]}")
    lr, b1, b2, eps, wd, b1h, b2h = (float(x) for x in hp)
    if lr < 0:
        raise InputError(f"hp[0] (lr) must be >= 0, got {lr}")
    for i, (name, b) in enumerate((("beta1", b1), ("beta2", b2)), start=1):
        if not 0.0 <= b < 1.0:
            raise InputError(f"hp[{i}] ({name}) must be in [0, 1), got {b}")
    if not eps > 0:
        raise InputError(f"hp[3] (eps) must be > 0, got {eps}")
    if wd < 0:
        raise InputError(f"hp[4] (weight_decay) must be >= 0, got {wd}")
    expected = make_hp(lr, b1, b2, eps, wd, step)
    for i, name, base in ((5, "beta1h", "beta1"), (6, "beta2h", "beta2")):
        want = float(expected[i])
        if abs(float(hp[i]) - want) > HP_RTOL * want:
            raise InputError(
                f"hp[{i}] ({name}) = {float(hp[i])!r} disagrees with step t={step}: expected 1/(1-{base}^{step}) = {want!r} "
                f"(relative tolerance {HP_RTOL}); build hp with runtimes.make_hp(..., step={step})"
            )
    return hp
