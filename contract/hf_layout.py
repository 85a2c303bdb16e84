"""Hugging Face's GPT-2 tensor layout and this project's, both ways.

The builder imports Hugging Face folders (graphgen/hf_import.py) and the runners
export them (runtimes/export.py); the mapping lives here once.

Hugging Face (``GPT2LMHeadModel``, names under ``transformer.``) keeps its
linear layers as ``Conv1D``, weight (in, out), ``y = x W + b``; the query, key
and value projections are one ``attn.c_attn`` of (d, 3d) whose output columns
are q, k, v, each head-major (head j is columns j*dh .. (j+1)*dh of its third).
This project stores (out, in) and stacks heads on a leading axis: ``w_q`` is
(n_heads, d_head, d_model) (docs/semantics.md). Its value bias is added after
attention, which equals Hugging Face's ``p (v + b_v)`` because each row of p
sums to 1, so ``b_v`` maps as it is. ``lm_head.weight`` is tied to ``wte``.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

PREFIX = "transformer."
LM_HEAD = "lm_head.weight"
# Causal-mask buffers older transformers releases saved with the weights; not parameters.
MASK_BUFFERS = ("attn.bias", "attn.masked_bias")


def _dims(cfg: dict) -> tuple[int, int, int, int]:
    d, h = cfg["d_model"], cfg["n_heads"]
    return d, h, d // h, cfg["d_ff"]


def hf_shapes(cfg: dict) -> dict[str, tuple[int, ...]]:
    """Every Hugging Face tensor name (without the ``transformer.`` prefix) and its shape."""
    d, _, _, f = _dims(cfg)
    shapes = {"wte.weight": (cfg["vocab"], d), "wpe.weight": (cfg["context"], d)}
    for layer in range(cfg["n_layers"]):
        k = f"h.{layer}."
        shapes.update({
            k + "ln_1.weight": (d,), k + "ln_1.bias": (d,),
            k + "attn.c_attn.weight": (d, 3 * d), k + "attn.c_attn.bias": (3 * d,),
            k + "attn.c_proj.weight": (d, d), k + "attn.c_proj.bias": (d,),
            k + "ln_2.weight": (d,), k + "ln_2.bias": (d,),
            k + "mlp.c_fc.weight": (d, f), k + "mlp.c_fc.bias": (f,),
            k + "mlp.c_proj.weight": (f, d), k + "mlp.c_proj.bias": (d,),
        })
    shapes.update({"ln_f.weight": (d,), "ln_f.bias": (d,)})
    return shapes


def from_hf(get: Callable[[str], np.ndarray], cfg: dict) -> dict[str, np.ndarray]:
    """This project's parameters from Hugging Face tensors; ``get(name)`` returns the float32
    tensor of a name of hf_shapes (already checked against its shape). Order: the manifest's."""
    d, h, dh, _ = _dims(cfg)
    out = {"wte": get("wte.weight"), "wpe": get("wpe.weight")}
    for layer in range(cfg["n_layers"]):
        p, k = f"h{layer}.", f"h.{layer}."
        out[p + "ln1_g"], out[p + "ln1_b"] = get(k + "ln_1.weight"), get(k + "ln_1.bias")
        qkv_w = get(k + "attn.c_attn.weight").T  # (3d, d): (out, in), rows q, k, v
        qkv_b = get(k + "attn.c_attn.bias")  # (3d,)
        for i, x in enumerate("qkv"):
            out[p + f"w_{x}"] = qkv_w[i * d:(i + 1) * d].reshape(h, dh, d)  # (n_heads, d_head, d_model)
            out[p + f"b_{x}"] = qkv_b[i * d:(i + 1) * d].reshape(h, dh)  # (n_heads, d_head)
        out[p + "w_o"] = get(k + "attn.c_proj.weight").T  # (d, d) (out, in)
        out[p + "b_o"] = get(k + "attn.c_proj.bias")
        out[p + "ln2_g"], out[p + "ln2_b"] = get(k + "ln_2.weight"), get(k + "ln_2.bias")
        out[p + "fc_w"] = get(k + "mlp.c_fc.weight").T  # (d_ff, d)
        out[p + "fc_b"] = get(k + "mlp.c_fc.bias")
        out[p + "pr_w"] = get(k + "mlp.c_proj.weight").T  # (d, d_ff)
        out[p + "pr_b"] = get(k + "mlp.c_proj.bias")
    out["lnf_g"], out["lnf_b"] = get("ln_f.weight"), get("ln_f.bias")
    return {name: np.ascontiguousarray(a, dtype=np.float32) for name, a in out.items()}


def to_hf(params: dict[str, np.ndarray], cfg: dict) -> dict[str, np.ndarray]:
    """Hugging Face tensors (``transformer.``-prefixed names, Conv1D layout, c_attn fused) of this
    project's parameters; ``lm_head.weight`` is left out, as Hugging Face saves tied weights."""
    d, _, _, _ = _dims(cfg)
    out = {"wte.weight": params["wte"], "wpe.weight": params["wpe"]}
    for layer in range(cfg["n_layers"]):
        p, k = f"h{layer}.", f"h.{layer}."
        out[k + "ln_1.weight"], out[k + "ln_1.bias"] = params[p + "ln1_g"], params[p + "ln1_b"]
        qkv_w = np.concatenate([params[p + f"w_{x}"].reshape(d, d) for x in "qkv"])  # (3d, d) (out, in)
        out[k + "attn.c_attn.weight"] = qkv_w.T  # (d, 3d) (in, out)
        out[k + "attn.c_attn.bias"] = np.concatenate([params[p + f"b_{x}"].reshape(d) for x in "qkv"])  # (3d,)
        out[k + "attn.c_proj.weight"] = params[p + "w_o"].T  # (d, d) (in, out)
        out[k + "attn.c_proj.bias"] = params[p + "b_o"]
        out[k + "ln_2.weight"], out[k + "ln_2.bias"] = params[p + "ln2_g"], params[p + "ln2_b"]
        out[k + "mlp.c_fc.weight"] = params[p + "fc_w"].T  # (d, d_ff)
        out[k + "mlp.c_fc.bias"] = params[p + "fc_b"]
        out[k + "mlp.c_proj.weight"] = params[p + "pr_w"].T  # (d_ff, d)
        out[k + "mlp.c_proj.bias"] = params[p + "pr_b"]
    out["ln_f.weight"], out["ln_f.bias"] = params["lnf_g"], params["lnf_b"]
    return {PREFIX + name: np.ascontiguousarray(a, dtype=np.float32) for name, a in out.items()}
