"""The GPT-2 forward graph (and its loss), authored with onnxscript's GraphBuilder.

One function per block, in the order the seed's ``build_forward!`` runs them.
Everything is in the default ONNX domain, so the graph runs on any ONNX runtime.
It comes in two spellings of the same math (:data:`SPELLINGS`):

- ``"portable"`` (train_step.onnx, forward.onnx): written for every ONNX engine,
  not only ONNX Runtime. GELU is one ``Gelu(approximate="tanh")`` node (opset
  20): one pass instead of nine, and our autodiff's Gelu rule keeps only its
  input for the backward instead of six intermediates (measured on ONNX Runtime
  1.19, 2 threads: the written-out form at opset 17 ran 4-5% slower on mid 8x256
  and small 1x256, and mid's peak RSS was 1,714 MiB against 1,270). LayerNormalization
  declares only Y (some engines implement no other output, one fills them with
  zeros); the backward recomputes mean and rstd from X (0-1.5% of a train step
  on small and mid, against reading saved statistics). Axes are non-negative,
  the causal mask is a constant sliced to (T, T) (no Shape -> Range chain), and
  the loss is logsumexp minus the label's logit on 2-D (B*T, vocab) rows (the
  opset-17 spelling below picks from a LogSoftmax: see ``_Forward.loss``).
- ``"ort-training"`` (opset 17, the forward handed to onnxruntime-training
  1.19.2's gradient builder): the tanh GELU written out in Mul/Add/Tanh (the
  builder differentiates an opset-20 tanh ``Gelu`` with the exact (erf)
  ``GeluGrad``, the gradient of a different function), and LayerNormalization
  declaring Mean and InvStdDev, which its LayerNormalizationGrad reads.

Parameters are graph inputs here; ``artifacts`` turns them into initializers
where ONNX Runtime's training tools want them that way.

With ``lora`` (a manifest ``lora`` entry, contract/lora.py), the adapters'
``A`` (rank, in) and ``B`` (out, rank) are inputs too, after the base weights,
and each target's output gains ``((x A^T) B^T) * alpha/rank`` (PEFT's order of
operations). Unmerged, so a train step differentiated for the adapters only
never forms a full-size weight gradient. For ``c_attn`` the (B, T, 3d) update
is split into q, k, v thirds, each added before that projection's heads split.

Attention is the seed's per-head attention, computed for all heads at once: the
stacked (n_heads, d_head, d_model) projections flatten to (d_model, d_model)
with head j's rows at j*d_head, so one MatMul gives every head's q and a
Reshape/Transpose splits them into (B, H, T, d_head). Head j still sees only its
own weights; concatenating heads "along features in head order" is the inverse
Transpose/Reshape. The value bias is added after attention, as the seed does.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import onnx
import onnx_ir as ir
from onnxscript import GraphBuilder

from contract import IR_VERSION, OPSET, TRAINING_SET_OPSET, lora_name
from contract.lora import adapter_specs

from .config import LN_EPS, GPT2Config, param_specs


@dataclass(frozen=True)
class Spelling:
    opset: int
    gelu_op: bool  # one Gelu node (opset >= 20), else the tanh formula in Mul/Add/Tanh
    ln_statistics: bool  # LayerNormalization declares its Mean and InvStdDev outputs


SPELLINGS = {
    "portable": Spelling(opset=OPSET, gelu_op=True, ln_statistics=False),  # train_step.onnx, forward.onnx
    "ort-training": Spelling(opset=TRAINING_SET_OPSET, gelu_op=False, ln_statistics=True),
}
# The `gelu=` argument of the builders names a spelling by its GELU.
GELU_SPELLINGS = {"op": "portable", "expanded": "ort-training"}
GELU_C = math.sqrt(2.0 / math.pi)


def _spelling(spelling: str | None, gelu: str | None) -> Spelling:
    if gelu is not None:
        if gelu not in GELU_SPELLINGS:
            raise ValueError(f"gelu must be one of {sorted(GELU_SPELLINGS)}, got {gelu!r}")
        if spelling is not None and spelling != GELU_SPELLINGS[gelu]:
            raise ValueError(f"gelu={gelu!r} is the {GELU_SPELLINGS[gelu]!r} spelling, not {spelling!r}")
        spelling = GELU_SPELLINGS[gelu]
    spelling = spelling or "portable"
    if spelling not in SPELLINGS:
        raise ValueError(f"spelling must be one of {sorted(SPELLINGS)}, got {spelling!r}")
    return SPELLINGS[spelling]


class _Forward:
    """Holds the builder and the parameter values while the graph is traced."""

    def __init__(self, cfg: GPT2Config, with_labels: bool, spelling: Spelling, lora: dict | None = None):
        self.cfg = cfg
        self.lora = lora
        self.spelling = spelling
        self.graph = ir.Graph([], [], nodes=[], opset_imports={"": spelling.opset}, name="gpt2")
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
        if lora is not None:
            for name, shape in adapter_specs(cfg.to_dict(), lora["rank"], lora["targets"]):
                self.p[name] = self.gb.input(name, ir.DataType.FLOAT, list(shape))

    def const(self, value, dtype=np.float32) -> ir.Value:
        return self.op.Constant(value=ir.tensor(np.asarray(value, dtype=dtype)))

    # --- blocks -------------------------------------------------------------

    def layer_norm(self, x: ir.Value, g: str, b: str) -> ir.Value:
        # x (B, T, d), normalised over d (axis 2)
        if self.spelling.ln_statistics:
            y, _mean, _inv_std = self.op.LayerNormalization(
                x, self.p[g], self.p[b], axis=2, epsilon=LN_EPS, _outputs=3
            )
            return y
        return self.op.LayerNormalization(x, self.p[g], self.p[b], axis=2, epsilon=LN_EPS)

    def linear(self, x: ir.Value, w: ir.Value, b: ir.Value | None) -> ir.Value:
        """x @ w^T (+ b); w stored (out, in) as in the seed. A plain Transpose
        feeding MatMul lets ORT fuse it into one FusedMatMul."""
        y = self.op.MatMul(x, self.op.Transpose(w, perm=[1, 0]))
        return y if b is None else self.op.Add(y, b)

    def lora_delta(self, x: ir.Value, layer: int, target: str) -> ir.Value | None:
        """((x A^T) B^T) * scale of ``target``'s adapter, (B, T, out); None where it has none."""
        if self.lora is None or target not in self.lora["targets"]:
            return None
        a, b = (self.p[lora_name(layer, target, w)] for w in ("A", "B"))
        u = self.linear(x, a, None)  # (B, T, rank)
        return self.op.Mul(self.linear(u, b, None), self.const(self.lora["scale"]))  # (B, T, out)

    def adapted(self, x: ir.Value, w: ir.Value, b: ir.Value | None, layer: int, target: str) -> ir.Value:
        """linear(x, w, b) plus the target's adapter update, if any."""
        y = self.linear(x, w, b)
        extra = self.lora_delta(x, layer, target)
        return y if extra is None else self.op.Add(y, extra)

    def qkv_deltas(self, x: ir.Value, layer: int) -> list:
        """The c_attn adapter's update split into its q, k, v thirds, each (B, T, d); [None]*3 without one."""
        extra = self.lora_delta(x, layer, "c_attn")
        if extra is None:
            return [None, None, None]
        d = self.cfg.d_model
        return list(self.op.Split(extra, self.const([d, d, d], np.int64), axis=2, _outputs=3))

    def causal_mask(self) -> ir.Value:
        """(T, T) float additive mask: 0 where query i may see key j (j <= i), -inf elsewhere.

        Added to the scores (x + 0 = x and x + -inf = -inf exactly, so the softmax is the
        masked one). An Add is cheaper than a Where on the (B, H, T, T) scores, and its
        backward passes the cotangent straight through (the mask depends on no parameter),
        where a Where's backward would be another (B, H, T, T) select.

        The (context, context) mask is a constant sliced to (T, T): every engine runs a Slice
        whose ends come from Shape, where a Range with a limit from Shape defeats some."""
        c = self.cfg.context
        full = np.triu(np.full((c, c), -np.inf, np.float32), k=1)  # (C, C), -inf above the diagonal
        seq = self.op.Shape(self.tokens, start=1, end=2)  # (1,) = [T]
        ends = self.op.Concat(seq, seq, axis=0)  # (2,) = [T, T]
        mask = self.op.Slice(self.const(full), self.const([0, 0], np.int64), ends,
                             self.const([0, 1], np.int64))  # (T, T)
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

        dq, dk, dv = self.qkv_deltas(x, layer)  # adapter updates, (B, T, d) or None

        def heads(name: str, with_bias: bool, perm: list[int], extra) -> ir.Value:
            w = op.Reshape(self.p[pre + "w_" + name], flat_w)  # (d, d): head j rows j*dh..
            b = op.Reshape(self.p[pre + "b_" + name], flat_b) if with_bias else None
            y = self.linear(x, w, b)  # (B, T, d)
            y = op.Reshape(y if extra is None else op.Add(y, extra), split)  # (B, T, H, dh)
            return op.Transpose(y, perm=perm)

        q = heads("q", True, [0, 2, 1, 3], dq)  # (B, H, T, dh)
        k_t = heads("k", True, [0, 2, 3, 1], dk)  # (B, H, dh, T)
        v = heads("v", False, [0, 2, 1, 3], dv)  # (B, H, T, dh); bias after attention
        scores = op.Mul(op.MatMul(q, k_t), self.const(1.0 / math.sqrt(dh)))  # (B, H, T, T)
        scores = op.Add(scores, mask)  # causal: -inf above the diagonal
        probs = op.Softmax(scores, axis=3)
        b_v = op.Reshape(self.p[pre + "b_v"], self.const([h, 1, dh], np.int64))
        out = op.Add(op.MatMul(probs, v), b_v)  # (B, H, T, dh)
        out = op.Reshape(op.Transpose(out, perm=[0, 2, 1, 3]), self.const([0, 0, d], np.int64))
        return self.adapted(out, self.p[pre + "w_o"], self.p[pre + "b_o"], layer, "attn.c_proj")  # (B, T, d)

    def gelu(self, x: ir.Value) -> ir.Value:
        # 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))), the seed's tanh form
        op = self.op
        if self.spelling.gelu_op:
            return op.Gelu(x, approximate="tanh")
        cube = op.Mul(op.Mul(x, x), x)
        inner = op.Mul(op.Add(x, op.Mul(cube, self.const(0.044715))), self.const(GELU_C))
        return op.Mul(op.Mul(x, self.const(0.5)), op.Add(op.Tanh(inner), self.const(1.0)))

    def mlp(self, x: ir.Value, layer: int) -> ir.Value:
        pre = f"h{layer}."
        hidden = self.gelu(self.adapted(x, self.p[pre + "fc_w"], self.p[pre + "fc_b"], layer, "mlp.c_fc"))  # (B,T,F)
        return self.adapted(hidden, self.p[pre + "pr_w"], self.p[pre + "pr_b"], layer, "mlp.c_proj")  # (B, T, d)

    def logits(self) -> ir.Value:
        """(B, T, V): the final hidden state times the tied embedding."""
        return self.linear(self.hidden(), self.p["wte"], None)  # (B, T, V), tied unembedding

    def hidden(self) -> ir.Value:
        """(B, T, d): the final LayerNorm's output, which the unembedding multiplies."""
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
        return self.layer_norm(x, "lnf_g", "lnf_b")  # (B, T, d)

    def loss(self, hidden: ir.Value) -> ir.Value:
        """Mean over positions of -sum(labels * log_softmax(logits)), from the final hidden state.

        Index labels: -log_softmax(x)[label] = logsumexp(x) - x[label], per row of the 2-D
        (B*T, vocab) logits. Spelled so, the step keeps the logits alone for the backward
        (softmax = exp(x - logsumexp), the label's entry scattered in) where a LogSoftmax
        would keep its (B*T, vocab) output beside them (gpt2 at 1x1024: 196 MiB each).
        GatherElements on rank 2 along axis 1 is the form every engine's kernel handles
        (onnx's reference evaluator takes a rank-3 one with more than 64 classes apart),
        at no cost (Reshape is a view). The hidden state is flattened before the unembedding,
        not the logits after it: the backward of a Reshape reads its input's shape, and
        reading the logits' would keep them alive until then."""
        op, v = self.op, self.cfg.vocab
        if self.cfg.labels == "index":
            flat = op.Reshape(hidden, self.const([-1, self.cfg.d_model], np.int64))  # (B*T, d)
            rows = self.linear(flat, self.p["wte"], None)  # (B*T, V), tied unembedding
            idx = op.Reshape(self.labels, self.const([-1, 1], np.int64))  # (B*T, 1)
            # Stated so the autodiff sees that the picked entries and the rows match, and
            # scatters the label's term into the softmax instead of adding a zeros tensor.
            # The dim is named by its value: tract reads dim names as expressions and
            # refuses a free symbol here.
            rows.shape = ir.Shape(["batch*seq", v])
            idx.shape = ir.Shape(["batch*seq", 1])
            if self.spelling.opset >= 18:
                lse = op.ReduceLogSumExp(rows, self.const([1], np.int64), keepdims=1)  # (B*T, 1)
                nll = op.Sub(lse, op.GatherElements(rows, idx, axis=1))  # (B*T, 1)
                return op.ReduceMean(nll, keepdims=0)  # scalar
            # Before opset 18 ReduceLogSumExp takes its axes as an attribute, which OpenVINO
            # (2026.4) ignores, reducing over every axis; this spelling's graphs are
            # onnxruntime-training's to differentiate, so they keep the LogSoftmax.
            logp = op.LogSoftmax(rows, axis=1)  # (B*T, V)
            logp.shape = ir.Shape(["batch*seq", v])
            picked = op.GatherElements(logp, idx, axis=1)  # (B*T, 1)
        else:
            logp = op.LogSoftmax(self.linear(hidden, self.p["wte"], None), axis=2)  # (B, T, V)
            picked = op.ReduceSum(op.Mul(self.labels, logp), self.const([2], np.int64), keepdims=0)  # (B, T)
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


def build_forward_loss(cfg: GPT2Config, spelling: str | None = None, *, gelu: str | None = None,
                       lora: dict | None = None) -> onnx.ModelProto:
    """(tokens, positions, labels, *params[, *adapters]) -> loss. Parameters are graph inputs.
    ``spelling`` is a key of :data:`SPELLINGS` (default "portable"); ``gelu`` ("op" or
    "expanded") names the same choice by its GELU; ``lora`` adds adapters (module docstring)."""
    f = _Forward(cfg, with_labels=True, spelling=_spelling(spelling, gelu), lora=lora)
    return f.finish({"loss": (f.loss(f.hidden()), [])})


def build_forward_logits(cfg: GPT2Config, spelling: str | None = None, *, gelu: str | None = None,
                         lora: dict | None = None) -> onnx.ModelProto:
    """(tokens, positions, *params[, *adapters]) -> logits (B, T, vocab)."""
    f = _Forward(cfg, with_labels=False, spelling=_spelling(spelling, gelu), lora=lora)
    return f.finish({"logits": (f.logits(), ["batch", "seq", cfg.vocab])})
