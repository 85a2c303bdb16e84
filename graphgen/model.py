"""The GPT-2 forward graph (and its loss), authored with onnxscript's GraphBuilder.

One function per block, in the order the seed's ``build_forward!`` runs them.
Everything is in the default ONNX domain, so the graph runs on any ONNX runtime.
It comes in two spellings of the same math, differing only in GELU:

- ``gelu="op"`` (opset 20, the portable graphs: train_step.onnx, forward.onnx):
  one ``Gelu(approximate="tanh")`` node. One pass instead of nine, and our
  autodiff's Gelu rule keeps only its input for the backward instead of six
  intermediates (mid 8x256 peak RSS 1,873 -> 1,424 MiB).
- ``gelu="expanded"`` (opset 17, the ONNX Runtime training set): the tanh formula
  written out in Mul/Add/Tanh. onnxruntime-training 1.19.2's gradient builder
  differentiates an opset-20 tanh ``Gelu`` with the exact (erf) ``GeluGrad``,
  which is the gradient of a different function; the written-out form it gets right.

Parameters are graph inputs here; ``artifacts`` turns them into initializers
where ONNX Runtime's training tools want them that way.

Attention is the seed's per-head attention, computed for all heads at once: the
stacked (n_heads, d_head, d_model) projections flatten to (d_model, d_model)
with head j's rows at j*d_head, so one MatMul gives every head's q and a
Reshape/Transpose splits them into (B, H, T, d_head). Head j still sees only its
own weights; concatenating heads "along features in head order" is the inverse
Transpose/Reshape. The value bias is added after attention, as the seed does.
"""

from __future__ import annotations

import math

import numpy as np
import onnx
import onnx_ir as ir
from onnxscript import GraphBuilder

from .config import LN_EPS, GPT2Config, param_specs

OPSET = 20  # the portable graphs (Gelu-20)
TRAINING_SET_OPSET = 17  # the forward handed to onnxruntime-training's gradient builder
GELU_SPELLINGS = {"op": OPSET, "expanded": TRAINING_SET_OPSET}
IR_VERSION = 10  # onnxruntime 1.19 reads IR <= 10; onnx 1.23 would write 11+
GELU_C = math.sqrt(2.0 / math.pi)


class _Forward:
    """Holds the builder and the parameter values while the graph is traced."""

    def __init__(self, cfg: GPT2Config, with_labels: bool, gelu: str = "op"):
        if gelu not in GELU_SPELLINGS:
            raise ValueError(f"gelu must be one of {sorted(GELU_SPELLINGS)}, got {gelu!r}")
        self.cfg = cfg
        self.gelu_spelling = gelu
        self.graph = ir.Graph([], [], nodes=[], opset_imports={"": GELU_SPELLINGS[gelu]}, name="gpt2")
        self.gb = GraphBuilder(self.graph)
        self.op = self.gb.op
        self.tokens = self.gb.input("tokens", ir.DataType.INT64, ["batch", "seq"])
        self.positions = self.gb.input("positions", ir.DataType.INT64, ["batch", "seq"])
        self.labels = None
        if with_labels:
            if cfg.labels == "index":
                self.labels = self.gb.input("labels", ir.DataType.INT64, ["batch", "seq"])
            else:
                self.labels = self.gb.input(
                    "labels", ir.DataType.FLOAT, ["batch", "seq", cfg.vocab]
                )
        self.p = {
            name: self.gb.input(name, ir.DataType.FLOAT, list(shape))
            for name, shape in param_specs(cfg)
        }

    def const(self, value, dtype=np.float32) -> ir.Value:
        return self.op.Constant(value=ir.tensor(np.asarray(value, dtype=dtype)))

    # --- blocks -------------------------------------------------------------

    def layer_norm(self, x: ir.Value, g: str, b: str) -> ir.Value:
        # Mean and InvStdDev are declared because ORT's gradient builder needs them.
        y, _mean, _inv_std = self.op.LayerNormalization(
            x, self.p[g], self.p[b], axis=-1, epsilon=LN_EPS, _outputs=3
        )
        return y

    def linear(self, x: ir.Value, w: ir.Value, b: ir.Value | None) -> ir.Value:
        """x @ w^T (+ b); w stored (out, in) as in the seed. A plain Transpose
        feeding MatMul lets ORT fuse it into one FusedMatMul."""
        y = self.op.MatMul(x, self.op.Transpose(w, perm=[1, 0]))
        return y if b is None else self.op.Add(y, b)

    def causal_mask(self) -> ir.Value:
        """(T, T) float additive mask: 0 where query i may see key j (j <= i), -inf elsewhere.

        Added to the scores (x + 0 = x and x + -inf = -inf exactly, so the softmax is the
        masked one). An Add is cheaper than a Where on the (B, H, T, T) scores, and its
        backward passes the cotangent straight through (the mask depends on no parameter),
        where a Where's backward would be another (B, H, T, T) select."""
        seq = self.op.Shape(self.tokens, start=1, end=2)  # (1,)
        t = self.op.Squeeze(seq, self.const([0], np.int64))
        r = self.op.Range(self.const(0, np.int64), t, self.const(1, np.int64))  # (T,)
        rows = self.op.Unsqueeze(r, self.const([1], np.int64))  # (T, 1)
        cols = self.op.Unsqueeze(r, self.const([0], np.int64))  # (1, T)
        visible = self.op.GreaterOrEqual(rows, cols)
        mask = self.op.Where(visible, self.const(0.0), self.const(-np.inf))
        # Stated so shape inference ties the score dims to `seq`; without it the
        # autodiff cannot prove which dims broadcast and reduces at run time.
        mask.shape = ir.Shape(["seq", "seq"])
        return mask

    def attention(self, x: ir.Value, layer: int, mask: ir.Value) -> ir.Value:
        cfg, op, pre = self.cfg, self.op, f"h{layer}."
        d, h, dh = cfg.d_model, cfg.n_heads, cfg.d_head
        flat_w = self.const([d, d], np.int64)
        flat_b = self.const([d], np.int64)
        split = self.const([0, 0, h, dh], np.int64)

        def heads(name: str, with_bias: bool, perm: list[int]) -> ir.Value:
            w = op.Reshape(self.p[pre + "w_" + name], flat_w)  # (d, d): head j rows j*dh..
            b = op.Reshape(self.p[pre + "b_" + name], flat_b) if with_bias else None
            y = op.Reshape(self.linear(x, w, b), split)  # (B, T, H, dh)
            return op.Transpose(y, perm=perm)

        q = heads("q", True, [0, 2, 1, 3])  # (B, H, T, dh)
        k_t = heads("k", True, [0, 2, 3, 1])  # (B, H, dh, T)
        v = heads("v", False, [0, 2, 1, 3])  # (B, H, T, dh); bias after attention
        scores = op.Mul(op.MatMul(q, k_t), self.const(1.0 / math.sqrt(dh)))  # (B, H, T, T)
        scores = op.Add(scores, mask)  # causal: -inf above the diagonal
        probs = op.Softmax(scores, axis=-1)
        b_v = op.Reshape(self.p[pre + "b_v"], self.const([h, 1, dh], np.int64))
        out = op.Add(op.MatMul(probs, v), b_v)  # (B, H, T, dh)
        out = op.Reshape(op.Transpose(out, perm=[0, 2, 1, 3]), self.const([0, 0, d], np.int64))
        return self.linear(out, self.p[pre + "w_o"], self.p[pre + "b_o"])  # (B, T, d)

    def gelu(self, x: ir.Value) -> ir.Value:
        # 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))), the seed's tanh form
        op = self.op
        if self.gelu_spelling == "op":
            return op.Gelu(x, approximate="tanh")
        cube = op.Mul(op.Mul(x, x), x)
        inner = op.Mul(op.Add(x, op.Mul(cube, self.const(0.044715))), self.const(GELU_C))
        return op.Mul(op.Mul(x, self.const(0.5)), op.Add(op.Tanh(inner), self.const(1.0)))

    def mlp(self, x: ir.Value, layer: int) -> ir.Value:
        pre = f"h{layer}."
        hidden = self.gelu(self.linear(x, self.p[pre + "fc_w"], self.p[pre + "fc_b"]))  # (B,T,F)
        return self.linear(hidden, self.p[pre + "pr_w"], self.p[pre + "pr_b"])  # (B, T, d)

    def logits(self) -> ir.Value:
        op = self.op
        x = op.Add(
            op.Gather(self.p["wte"], self.tokens, axis=0), op.Gather(self.p["wpe"], self.positions, axis=0)
        )  # (B, T, d)
        mask = self.causal_mask()
        for layer in range(self.cfg.n_layers):
            self.gb.push_module(f"h{layer}")
            x = op.Add(x, self.attention(self.layer_norm(x, f"h{layer}.ln1_g", f"h{layer}.ln1_b"), layer, mask))
            x = op.Add(x, self.mlp(self.layer_norm(x, f"h{layer}.ln2_g", f"h{layer}.ln2_b"), layer))
            self.gb.pop_module()
        x = self.layer_norm(x, "lnf_g", "lnf_b")
        return self.linear(x, self.p["wte"], None)  # (B, T, V), tied unembedding

    def loss(self, logits: ir.Value) -> ir.Value:
        """Mean over positions of -sum(labels * log_softmax(logits))."""
        op = self.op
        logp = op.LogSoftmax(logits, axis=-1)  # (B, T, V)
        if self.cfg.labels == "index":
            idx = op.Unsqueeze(self.labels, self.const([-1], np.int64))  # (B, T, 1)
            picked = op.GatherElements(logp, idx, axis=-1)  # (B, T, 1)
        else:
            picked = op.ReduceSum(op.Mul(self.labels, logp), self.const([-1], np.int64), keepdims=0)
        return op.Neg(op.ReduceMean(picked, keepdims=0))  # scalar

    def finish(self, outputs: dict[str, tuple[ir.Value, list]]) -> onnx.ModelProto:
        """Name the outputs and declare their shapes (symbolic dims survive Reshape only if stated)."""
        for name, (value, shape) in outputs.items():
            self.gb.add_output(value, name)
            value.type = ir.TensorType(ir.DataType.FLOAT)
            value.shape = ir.Shape(shape)
        model = ir.Model(self.graph, ir_version=IR_VERSION, producer_name="graphgen")
        proto = ir.serde.serialize_model(model)
        proto.ir_version = IR_VERSION
        return proto


def build_forward_loss(cfg: GPT2Config, gelu: str = "op") -> onnx.ModelProto:
    """(tokens, positions, labels, *params) -> loss. Parameters are graph inputs."""
    f = _Forward(cfg, with_labels=True, gelu=gelu)
    return f.finish({"loss": (f.loss(f.logits()), [])})


def build_forward_logits(cfg: GPT2Config, gelu: str = "op") -> onnx.ModelProto:
    """(tokens, positions, *params) -> logits (B, T, vocab)."""
    f = _Forward(cfg, with_labels=False, gelu=gelu)
    return f.finish({"logits": (f.logits(), ["batch", "seq", cfg.vocab])})
