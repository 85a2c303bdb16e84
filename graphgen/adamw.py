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
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper, numpy_helper

HP_FIELDS = ("lr", "beta1", "beta2", "eps", "weight_decay", "beta1h", "beta2h")


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


def adamw_reference(w, g, m, v, hp):
    """NumPy AdamW with the exact rounding order of :func:`adamw_nodes` (dtype of the inputs)."""
    dt = np.asarray(w).dtype
    lr, b1, b2, eps, wd, b1h, b2h = (dt.type(x) for x in np.asarray(hp))
    one = dt.type(1)
    m2 = m * b1 + g * (one - b1)
    v2 = v * b2 + (g * g) * (one - b2)
    denom = np.sqrt(v2) * np.sqrt(b2h) + eps
    w2 = w * (one - lr * wd) - (m2 / denom) * (lr * b1h)
    return w2.astype(dt), m2.astype(dt), v2.astype(dt)


def adamw_nodes(slots: list[AdamWSlot], hp: str = "hp", prefix: str = "adamw/"
                ) -> tuple[list[onnx.NodeProto], list[onnx.TensorProto]]:
    """Nodes (topologically ordered) and initializers computing the AdamW update of every
    slot from the float32[7] value ``hp``. Parameters, gradients and moments must be float32."""
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
    c1 = node("Sub", [one, s["beta1"]], prefix + "one_minus_b1")
    c2 = node("Sub", [one, s["beta2"]], prefix + "one_minus_b2")
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
