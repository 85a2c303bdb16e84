"""The seed's hyperparameter vector: float32[7] = [lr, beta1, beta2, eps, wd, beta1h, beta2h].

beta1h = 1/(1 - beta1^t) and beta2h = 1/(1 - beta2^t) are AdamW's bias
corrections for step t, counted from 1. They travel in the vector (rather than
being derived in the graph) because that is the seed's and ggml's layout; the
runners check that they agree with the step they are about to run.
"""

from __future__ import annotations

import math

import numpy as np

from . import HP_LAYOUT, HP_RTOL  # noqa: F401  (HP_RTOL: relative tolerance on beta1h/beta2h, see below)
from .errors import InputError

# HP_RTOL is loose enough for a caller's float32 arithmetic and tight enough to
# catch a step count that is off by one while the corrections still change from
# step to step (at beta2=0.999, until t ~ 2000; after that both sides are ~1 and
# an off-by-one is numerically harmless).


def _check_values(values, where) -> None:
    """Ranges of lr, beta1, beta2, eps, weight_decay; ``where(i, name)`` names the value in messages."""
    for i, (name, x) in enumerate(zip(HP_LAYOUT, values)):
        if not math.isfinite(x):
            raise InputError(f"{where(i, name)} must be finite, got {x!s}")
    lr, b1, b2, eps, wd = values
    if lr < 0:
        raise InputError(f"{where(0, 'lr')} must be >= 0, got {lr!s}")
    for i, (name, b) in enumerate((("beta1", b1), ("beta2", b2)), start=1):
        if not 0.0 <= b < 1.0:
            raise InputError(f"{where(i, name)} must be in [0, 1), got {b!s}")
    if not eps > 0:
        raise InputError(f"{where(3, 'eps')} must be > 0, got {eps!s}")
    if wd < 0:
        raise InputError(f"{where(4, 'weight_decay')} must be >= 0, got {wd!s}")


def make_hp(lr: float, beta1: float = 0.9, beta2: float = 0.999, eps: float = 1e-8,
            weight_decay: float = 0.01, step: int = 1) -> np.ndarray:
    """The float32[7] vector for update number ``step`` (1 for the first update).

    Raises InputError for a value out of range (the same ranges check_hp applies),
    including a beta that rounds to 1 in float32.
    """
    if isinstance(step, bool) or not isinstance(step, (int, np.integer)) or step < 1:
        raise InputError(f"step must be an integer >= 1 (t counts from 1), got {step!r}")
    try:
        values = [float(x) for x in (lr, beta1, beta2, eps, weight_decay)]
    except (TypeError, ValueError):
        raise InputError(f"make_hp takes numbers, got lr={lr!r} beta1={beta1!r} beta2={beta2!r} "
                         f"eps={eps!r} weight_decay={weight_decay!r}") from None
    _check_values(values, lambda i, name: name)
    lr, beta1, beta2, eps, weight_decay = values
    for name, b in (("beta1", beta1), ("beta2", beta2)):
        if not float(np.float32(b)) < 1.0:  # the vector is float32: the bias correction would divide by 0
            raise InputError(f"{name} = {b!r} becomes 1.0 in float32, outside its range [0, 1) (see runtimes.hp.check_hp)")
    step = int(step)
    # The corrections use the betas the vector carries (float32), so that they agree
    # with the graph's own 1 - beta: at t = 1, (1 - b1) * beta1h is then 1 to within
    # float32 rounding. From the decimal betas, 1/(1 - 0.999) against 1 - float32(0.999)
    # biases every first update by 6.7e-6 relative, and the trajectory drifts.
    b1, b2 = float(np.float32(beta1)), float(np.float32(beta2))
    b1h = 1.0 / (1.0 - b1**step) if b1 > 0 else 1.0
    b2h = 1.0 / (1.0 - b2**step) if b2 > 0 else 1.0
    with np.errstate(over="ignore"):
        hp = np.array([lr, beta1, beta2, eps, weight_decay, b1h, b2h], dtype=np.float32)
    for i, name in enumerate(HP_LAYOUT):  # float32 rounding: 0.99999999 -> 1.0, 1e39 -> inf
        if not math.isfinite(float(hp[i])) or (i in (1, 2) and float(hp[i]) >= 1.0) or (i == 3 and float(hp[i]) <= 0):
            raise InputError(f"{name} = {values[i] if i < 5 else (b1h, b2h)[i - 5]!r} becomes {hp[i]} in float32, "
                             f"outside its range (see runtimes.hp.check_hp)")
    return hp


def check_hp(hp, step: int) -> np.ndarray:
    """Validate ``hp`` for update number ``step``; returns it as float32[7].

    Raises InputError naming the element, its value and the allowed range.
    """
    if not isinstance(hp, np.ndarray) or isinstance(hp, np.ma.MaskedArray):
        raise InputError(f"hp must be a numpy float32 array of 7, got {type(hp).__name__}")
    if hp.dtype != np.float32:
        raise InputError(f"hp must be float32, got {hp.dtype} (use runtimes.make_hp)")
    if hp.shape != (7,):
        raise InputError(f"hp must have shape (7,) {list(HP_LAYOUT)}, got {hp.shape}")
    for i, name in enumerate(HP_LAYOUT):
        if not math.isfinite(float(hp[i])):
            raise InputError(f"hp[{i}] ({name}) must be finite, got {hp[i]!s}")
    _check_values(list(hp[:5]), lambda i, name: f"hp[{i}] ({name})")  # float32 scalars print as float32
    lr, b1, b2, eps, wd = (float(x) for x in hp[:5])
    expected = make_hp(lr, b1, b2, eps, wd, step)
    for i, name, base in ((5, "beta1h", "beta1"), (6, "beta2h", "beta2")):
        want = float(expected[i])
        if abs(float(hp[i]) - want) > HP_RTOL * want:
            raise InputError(
                f"hp[{i}] ({name}) = {hp[i]!s} disagrees with step t={step}: expected 1/(1-{base}^{step}) = {expected[i]!s} "
                f"(relative tolerance {HP_RTOL}); build hp with runtimes.make_hp(..., step={step})"
            )
    return np.ascontiguousarray(hp)


def check_clip(clip) -> np.ndarray:
    """The gradient-clipping threshold as the float32 scalar train_step.onnx reads.

    A number >= 0; 0 and inf turn clipping off. Raises InputError for anything else
    (NaN, negative, not a number)."""
    if isinstance(clip, bool) or isinstance(clip, np.ma.MaskedArray):
        raise InputError(f"clip must be a number >= 0 (0 or inf: off), got {clip!r}")
    try:
        value = float(clip)
    except (TypeError, ValueError):
        raise InputError(f"clip must be a number >= 0 (0 or inf: off), got {clip!r}") from None
    if math.isnan(value) or value < 0:
        raise InputError(f"clip must be a number >= 0 (0 or inf: off), got {value!r}")
    return np.array(value, dtype=np.float32)
