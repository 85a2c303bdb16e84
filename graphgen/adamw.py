"""AdamW in standard ONNX ops, driven by the 7-float hyperparameter input ``hp``.

``hp = [lr, beta1, beta2, eps, weight_decay, beta1h, beta2h]`` with
``beta1h = 1/(1-beta1^t)`` and ``beta2h = 1/(1-beta2^t)`` (t counted from 1), supplied
by the caller at every step (``runtimes.make_hp`` builds it), so schedules need no rebuild. Per parameter::

    m' = b1*m + (1-b1)*g
    v' = b2*v + (1-b2)*g*g
    w' = w*(1 - lr*wd) - lr*(m'*beta1h) / (sqrt(v'*beta2h) + eps)

The last line is evaluated as torch.optim.AdamW does it (same math, torch's rounding
order): ``w*(1-lr*wd) - (m' / (sqrt(v')*sqrt(beta2h) + eps)) * (lr*beta1h)``. The seven
scalars and the scalar combinations (1-b1, 1-b2, 1-lr*wd, lr*beta1h, sqrt(beta2h)) are
computed once and shared by every parameter; each parameter then costs 12 elementwise
nodes (Mul/Add/Sub/Div/Sqrt), which ONNX Runtime can schedule and fuse freely.

Global-norm gradient clipping, as ``torch.nn.utils.clip_grad_norm_`` then AdamW, from
the float32 scalar input ``clip`` (0 or inf: off)::

    norm = sqrt(sum over every parameter of sum(g*g))            # output grad_norm
    coef = min(1, clip / (norm + 1e-6))  if clip > 0  else 1
    g   <- g * coef

The clipped gradient is never materialised: ``coef`` folds into the scalars that
multiply g in the moment updates, ``(1-b1)*coef`` and ``(1-b2)*coef^2``, so clipping
costs one read of every gradient (its sum of squares) and nothing per element
after that. With clipping off or inactive, coef is exactly 1 and the update is
bit-identical to the unclipped one.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper, numpy_helper

from contract import CLIP_EPS  # noqa: E402  (torch.nn.utils.clip_grad_norm_'s, added to the norm before dividing)
from contract import HP_LAYOUT as HP_FIELDS  # noqa: E402


@dataclass(frozen=True)
class AdamWSlot:
    """Value names for one parameter's update."""

    param: str
    grad: str
    m: str
    v: str
    new_param: str
    new_m: str
    new_v: str


def clip_coefficient(grads, clip: float) -> tuple[float, float]:
    """(global norm, coefficient) of :func:`adamw_nodes`' clipping, in float64."""
    norm = float(np.sqrt(sum(float(np.sum(np.square(np.asarray(g, np.float64)))) for g in grads)))
    coef = min(1.0, clip / (norm + CLIP_EPS)) if clip > 0 else 1.0
    return norm, coef


def adamw_reference(w, g, m, v, hp, coef: float = 1.0):
    """NumPy AdamW with the exact rounding order of :func:`adamw_nodes` (dtype of the inputs);
    ``coef`` is the clipping coefficient (see clip_coefficient)."""
    dt = np.asarray(w).dtype
    lr, b1, b2, eps, wd, b1h, b2h = (dt.type(x) for x in np.asarray(hp))
    one, c = dt.type(1), dt.type(coef)
    m2 = m * b1 + g * ((one - b1) * c)
    v2 = v * b2 + (g * g) * ((one - b2) * (c * c))
    denom = np.sqrt(v2) * np.sqrt(b2h) + eps
    w2 = w * (one - lr * wd) - (m2 / denom) * (lr * b1h)
    return w2.astype(dt), m2.astype(dt), v2.astype(dt)


def adamw_nodes(slots: list[AdamWSlot], hp: str = "hp", clip: str = "clip", grad_norm: str = "grad_norm",
                prefix: str = "adamw/") -> tuple[list[onnx.NodeProto], list[onnx.TensorProto]]:
    """Nodes (topologically ordered) and initializers computing the AdamW update of every
    slot from the float32[7] value ``hp`` and the float32 scalar ``clip``, and the global
    gradient norm before clipping as ``grad_norm``. Parameters, gradients and moments
    must be float32."""
    nodes: list[onnx.NodeProto] = []
    inits: list[onnx.TensorProto] = []

    def node(op, inputs, out, **attrs):
        short = out[len(prefix):] if out.startswith(prefix) else out
        nodes.append(helper.make_node(op, inputs, [out], name=prefix + "n/" + short, **attrs))
        return out

    def const(name, value):
        inits.append(numpy_helper.from_array(np.asarray(value), prefix + name))
        return prefix + name

    s = {}
    for i, f in enumerate(HP_FIELDS):
        idx = const(f"idx{i}", np.array(i, dtype=np.int64))
        s[f] = node("Gather", [hp, idx], prefix + f, axis=0)  # rank-0 scalars
    one = const("one", np.array(1.0, dtype=np.float32))
    zero = const("zero", np.array(0.0, dtype=np.float32))
    squares = [node("ReduceSumSquare", [sl.grad], f"{prefix}{k}/sumsq", keepdims=0) for k, sl in enumerate(slots)]
    total = node("Sum", squares, prefix + "sumsq") if len(squares) > 1 else squares[0]
    norm = node("Sqrt", [total], grad_norm)
    ratio = node("Div", [clip, node("Add", [norm, const("clip_eps", np.array(CLIP_EPS, np.float32))],
                                    prefix + "norm_eps")], prefix + "clip_ratio")
    coef = node("Where", [node("Greater", [clip, zero], prefix + "clip_on"),
                          node("Min", [ratio, one], prefix + "clip_min"), one], prefix + "clip_coef")
    c1 = node("Mul", [node("Sub", [one, s["beta1"]], prefix + "one_minus_b1"), coef], prefix + "c1_coef")
    c2 = node("Mul", [node("Sub", [one, s["beta2"]], prefix + "one_minus_b2"),
                      node("Mul", [coef, coef], prefix + "coef_sq")], prefix + "c2_coef")
    decay = node("Sub", [one, node("Mul", [s["lr"], s["weight_decay"]], prefix + "lr_wd")], prefix + "decay")
    step = node("Mul", [s["lr"], s["beta1h"]], prefix + "step_size")
    sb2h = node("Sqrt", [s["beta2h"]], prefix + "sqrt_b2h")

    for k, sl in enumerate(slots):
        p = f"{prefix}{k}/"
        m_a = node("Mul", [sl.m, s["beta1"]], p + "m_b1")
        m_b = node("Mul", [sl.grad, c1], p + "g_c1")
        node("Add", [m_a, m_b], sl.new_m)
        v_a = node("Mul", [sl.v, s["beta2"]], p + "v_b2")
        gg = node("Mul", [sl.grad, sl.grad], p + "gg")
        v_b = node("Mul", [gg, c2], p + "gg_c2")
        node("Add", [v_a, v_b], sl.new_v)
        den = node("Add", [node("Mul", [node("Sqrt", [sl.new_v], p + "sqrt_v"), sb2h], p + "sqrt_vh"),
                           s["eps"]], p + "denom")
        upd = node("Mul", [node("Div", [sl.new_m, den], p + "ratio"), step], p + "update")
        w_d = node("Mul", [sl.param, decay], p + "w_decayed")
        node("Sub", [w_d, upd], sl.new_param)
    return nodes, inits
