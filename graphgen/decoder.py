"""decoder.onnx: the forward graph with a key/value cache, for generation.

One graph serves the prefill and every decode step::

    (tokens (B, T_new), positions (B, T_new), *params, past.<l>.key, past.<l>.value, ...)
        -> (logits (B, T_new, vocab), present.<l>.key, present.<l>.value, ...)

``past.<l>.*`` is float32 (B, n_heads, T_past, d_head), T_past >= 0 (0 for the
prefill); ``present.<l>.*`` is the past with the T_new new positions appended,
(B, n_heads, T_past + T_new, d_head), and is the next call's past. Query i sits at
absolute position T_past + i and sees keys 0..T_past + i. ``positions`` are fed
as given (normally T_past..T_past + T_new - 1), as in forward.onnx.

The math and the ops are forward.onnx's (graphgen/model.py), in its portable
spelling: the blocks are the same methods, only attention reads the cache. The
mask is forward.onnx's (context, context) constant, sliced to rows
[T_past, T_past + T_new) and columns [0, T_past + T_new) with ends taken from
Shape, so no Range or Size appears. T_past + T_new must not exceed the context.
"""

from __future__ import annotations

import math

import numpy as np
import onnx
import onnx_ir as ir

from contract import KV_KINDS, past_name, present_name

from .config import GPT2Config
from .model import SPELLINGS, _Forward

PAST, TOTAL = "past", "past+seq"  # dim names; tract reads a dim name as an expression of the others


class _Decoder(_Forward):
    def __init__(self, cfg: GPT2Config):
        super().__init__(cfg, with_labels=False, spelling=SPELLINGS["portable"])
        self.graph.name = "gpt2_decoder"
        shape = ["batch", cfg.n_heads, PAST, cfg.d_head]
        # after the parameters, so the inputs read tokens, positions, params, caches
        self.past = [{kind: self.gb.input(past_name(layer, kind), ir.DataType.FLOAT, shape) for kind in KV_KINDS}
                     for layer in range(cfg.n_layers)]
        self.present: list[dict[str, ir.Value]] = []

    def cache_mask(self) -> ir.Value:
        """(T_new, T_past + T_new) additive mask: row i is forward.onnx's mask row T_past + i."""
        op, c = self.op, self.cfg.context
        full = np.triu(np.full((c, c), -np.inf, np.float32), k=1)  # (C, C), -inf above the diagonal
        seq = op.Shape(self.tokens, start=1, end=2)  # (1,) = [T_new]
        past = op.Shape(self.past[0]["key"], start=2, end=3)  # (1,) = [T_past]
        total = op.Add(past, seq)  # (1,) = [T_past + T_new]
        starts = op.Concat(past, self.const([0], np.int64), axis=0)  # (2,) = [T_past, 0]
        ends = op.Concat(total, total, axis=0)  # (2,) = [T_past + T_new, T_past + T_new]
        mask = op.Slice(self.const(full), starts, ends, self.const([0, 1], np.int64))  # (T_new, T_past + T_new)
        mask.shape = ir.Shape(["seq", TOTAL])
        return mask

    def attention(self, x: ir.Value, layer: int, mask: ir.Value) -> ir.Value:
        cfg, op, pre = self.cfg, self.op, f"h{layer}."
        d, h, dh = cfg.d_model, cfg.n_heads, cfg.d_head
        flat_w = self.const([d, d], np.int64)
        flat_b = self.const([d], np.int64)
        split = self.const([0, 0, h, dh], np.int64)

        def heads(name: str, with_bias: bool) -> ir.Value:
            w = op.Reshape(self.p[pre + "w_" + name], flat_w)  # (d, d): head j rows j*dh..
            b = op.Reshape(self.p[pre + "b_" + name], flat_b) if with_bias else None
            y = op.Reshape(self.linear(x, w, b), split)  # (B, T_new, H, dh)
            return op.Transpose(y, perm=[0, 2, 1, 3])  # (B, H, T_new, dh)

        q = heads("q", True)  # (B, H, T_new, dh)
        cache = {}
        for kind, new in (("key", heads("k", True)), ("value", heads("v", False))):  # v: bias after attention
            cache[kind] = op.Concat(self.past[layer][kind], new, axis=2)  # (B, H, T_past + T_new, dh)
        self.present.append(cache)
        k_t = op.Transpose(cache["key"], perm=[0, 1, 3, 2])  # (B, H, dh, T_past + T_new)
        scores = op.Mul(op.MatMul(q, k_t), self.const(1.0 / math.sqrt(dh)))  # (B, H, T_new, T_past + T_new)
        scores = op.Add(scores, mask)
        probs = op.Softmax(scores, axis=3)
        b_v = op.Reshape(self.p[pre + "b_v"], self.const([h, 1, dh], np.int64))
        out = op.Add(op.MatMul(probs, cache["value"]), b_v)  # (B, H, T_new, dh)
        out = op.Reshape(op.Transpose(out, perm=[0, 2, 1, 3]), self.const([0, 0, d], np.int64))  # (B, T_new, d)
        return self.linear(out, self.p[pre + "w_o"], self.p[pre + "b_o"])  # (B, T_new, d)

    def causal_mask(self) -> ir.Value:  # what logits() adds to every layer's scores
        return self.cache_mask()


def build_decoder(cfg: GPT2Config) -> onnx.ModelProto:
    """decoder.onnx for ``cfg``: forward.onnx's logits with a key/value cache (module docstring)."""
    f = _Decoder(cfg)
    logits = f.logits()
    outputs = {"logits": (logits, ["batch", "seq", cfg.vocab])}
    cache_shape = ["batch", cfg.n_heads, TOTAL, cfg.d_head]
    for layer, cache in enumerate(f.present):
        for kind in KV_KINDS:
            outputs[present_name(layer, kind)] = (cache[kind], cache_shape)
    return f.finish(outputs)
