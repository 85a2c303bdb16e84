"""Initial weights: the seed engine's LCG, reproduced bit for bit.

The seed draws ``rng = (rng * 1103515245 + 12345) & 0x7fffffff`` once per weight
element, row-major, in allocation order (wte, wpe, then per layer ln1, per head
q/k/v, o, ln2, fc, proj; gains and biases draw nothing), and stores
``unit * 0.02`` computed in float64 and rounded to float32.

Two unit maps of the same stream:
- ``init="seed"``: the seed's ``(rng >> 8) / 8388608 - 1``. Its comment promises
  [-1, 1), but a 31-bit state shifted by 8 leaves 23 bits, so the map gives
  [-1, 0): every weight is negative. Kept exactly, for parity with the seed.
- ``init="lcg"`` (default): ``(rng >> 7) / 8388608 - 1``, the [-1, 1) range the
  seed intended.

The generator is sequential (each state depends on the previous one), but it is
affine, so n states can be computed at once: state_k = A_k * s0 + C_k (mod 2^31)
with A_k = a^k and C_k = c * (1 + a + ... + a^(k-1)). Those coefficient tables
are built by doubling in int64 arithmetic, which keeps gpt2's 124M draws fast.
"""

from __future__ import annotations

import numpy as np

from .config import GPT2Config, param_specs

LCG_A = 1103515245
LCG_C = 12345
LCG_MASK = 0x7FFFFFFF
SCALE = 0.02

_SHIFT = {"seed": 8, "lcg": 7}


def _mulmod(x: np.ndarray, y: np.ndarray | int) -> np.ndarray:
    """(x * y) mod 2^31 for int64 operands < 2^31, without int64 overflow.

    Splits y into 16-bit halves so every partial product stays below 2^47.
    """
    y_hi, y_lo = np.int64(y) >> 16, np.int64(y) & 0xFFFF
    hi = ((x * y_hi) & LCG_MASK) << 16
    return (hi + x * y_lo) & LCG_MASK


def lcg_states(state: int, n: int) -> tuple[np.ndarray, int]:
    """The next n LCG states after ``state`` (int64 array) and the final state."""
    if n == 0:
        return np.zeros(0, dtype=np.int64), state
    # a_pow[k] = a^(k+1), c_sum[k] = c * (1 + a + ... + a^k), all mod 2^31, so that
    # state_{k+1} = a_pow[k] * s0 + c_sum[k]. Built by doubling the filled prefix.
    a_pow = np.empty(n, dtype=np.int64)
    c_sum = np.empty(n, dtype=np.int64)
    a_pow[0], c_sum[0] = LCG_A, LCG_C
    filled = 1
    while filled < n:
        take = min(filled, n - filled)
        # step by `filled` more: s_{filled+k+1} = A_filled * s_{k+1} + C_filled
        a_f, c_f = a_pow[filled - 1], c_sum[filled - 1]
        a_pow[filled : filled + take] = _mulmod(a_pow[:take], a_f)
        c_sum[filled : filled + take] = (_mulmod(c_sum[:take], a_f) + c_f) & LCG_MASK
        filled += take
    states = (_mulmod(a_pow, state & LCG_MASK) + c_sum) & LCG_MASK
    return states, int(states[-1])


def lcg_units(state: int, n: int, init: str) -> tuple[np.ndarray, int]:
    """n float64 units in the given init mode, and the LCG state after them."""
    states, last = lcg_states(state, n)
    units = (states >> _SHIFT[init]).astype(np.float64) / 8388608.0 - 1.0
    return units, last


def _is_gain(name: str) -> bool:
    return name.endswith(("ln1_g", "ln2_g", "lnf_g"))


def init_weights(cfg: GPT2Config) -> dict[str, np.ndarray]:
    """All parameters as float32 arrays, in ``param_specs`` order.

    The stream is consumed in the seed's order, which interleaves heads: layer l
    draws w_q of head 0, then w_k of head 0, w_v of head 0, then head 1, ... So
    the per-layer stacked (n_heads, d_head, d_model) tensors are filled head by
    head, one head's q, k, v at a time.
    """
    state = cfg.seed
    specs = dict(param_specs(cfg))
    out: dict[str, np.ndarray] = {}

    def draw(shape: tuple[int, ...]) -> np.ndarray:
        nonlocal state
        n = int(np.prod(shape))
        units, state = lcg_units(state, n, cfg.init)
        return (units * SCALE).astype(np.float32).reshape(shape)

    def const(name: str) -> np.ndarray:
        return np.full(specs[name], 1.0 if _is_gain(name) else 0.0, dtype=np.float32)

    out["wte"] = draw(specs["wte"])
    out["wpe"] = draw(specs["wpe"])
    for layer in range(cfg.n_layers):
        p = f"h{layer}."
        out[p + "ln1_g"], out[p + "ln1_b"] = const(p + "ln1_g"), const(p + "ln1_b")
        heads = {k: [] for k in ("w_q", "w_k", "w_v")}
        for _ in range(cfg.n_heads):
            for k in ("w_q", "w_k", "w_v"):
                heads[k].append(draw((cfg.d_head, cfg.d_model)))
        for k in ("w_q", "w_k", "w_v"):
            out[p + k] = np.stack(heads[k])
        for k in ("b_q", "b_k", "b_v"):
            out[p + k] = const(p + k)
        out[p + "w_o"] = draw(specs[p + "w_o"])
        out[p + "b_o"] = const(p + "b_o")
        out[p + "ln2_g"], out[p + "ln2_b"] = const(p + "ln2_g"), const(p + "ln2_b")
        out[p + "fc_w"] = draw(specs[p + "fc_w"])
        out[p + "fc_b"] = const(p + "fc_b")
        out[p + "pr_w"] = draw(specs[p + "pr_w"])
        out[p + "pr_b"] = const(p + "pr_b")
    out["lnf_g"], out["lnf_b"] = const("lnf_g"), const("lnf_b")
    return {name: out[name] for name in specs}
