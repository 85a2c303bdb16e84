"""LoRA on the oracle GPT-2, in plain PyTorch: the independent oracle for LoRA folders.

Written from PEFT's definition of LoRA (``lora.Linear``: ``base(x) +
lora_B(lora_A(x)) * (alpha / r)``, no dropout, no bias), not from this project's
graph builder or contract: adapters are given as ``{(layer, target): (A, B)}``
with ``A`` (r, in) and ``B`` (out, r). Targets are Hugging Face GPT-2 module
names; ``c_attn`` is the fused q, k, v projection (out 3d, rows q, k, v), which
the oracle's per-head loop applies head by head: head j of q gets rows
``j*dh .. (j+1)*dh`` of B's first third, of k of its second, of v of its third.

The base weights are constants (no gradient); only the adapters are trained,
by ``torch.optim.AdamW`` over the adapters alone (TorchGPT2.train).
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np
import torch

from .torch_gpt2 import TorchGPT2, gelu_tanh, layer_norm

TARGETS = ("c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")


class TorchGPT2LoRA(TorchGPT2):
    """TorchGPT2 whose trainable parameters are LoRA adapters over frozen base weights.

    ``adapters``: {name: array}, named ``h{layer}.{target}.lora_A`` / ``lora_B``
    (the names only key the results; the oracle reads layer and target from them).
    """

    def __init__(self, config, base: Mapping[str, np.ndarray], adapters: Mapping[str, np.ndarray],
                 alpha: float, rank: int, threads: int = 1) -> None:
        super().__init__(config, base, threads=threads)
        for t in self.params.values():
            t.requires_grad_(False)
        self.scale = alpha / rank
        self.adapters: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
        names = []
        for name, arr in adapters.items():
            layer_s, rest = name.split(".", 1)
            target, which = rest.rsplit(".", 1)
            if target not in TARGETS or which not in ("lora_A", "lora_B"):
                raise ValueError(f"adapter name {name!r} is not h<layer>.<target>.lora_A|lora_B")
            t = torch.tensor(np.array(arr, dtype=np.float32, copy=True)).requires_grad_(True)
            self.adapters.setdefault((int(layer_s[1:]), target), {})[which[-1]] = t
            self.params[name] = t
            names.append(name)
        self.names = names  # grads, train, parameters and moments cover the adapters only
        self.layout = [(n, tuple(self.params[n].shape)) for n in names]

    def base_weights(self) -> dict[str, np.ndarray]:
        return {n: t.detach().numpy().copy() for n, t in self.params.items() if n not in self.names}

    def _lora(self, x: torch.Tensor, layer: int, target: str, rows: slice | None = None) -> torch.Tensor | float:
        ab = self.adapters.get((layer, target))
        if ab is None:
            return 0.0
        b = ab["B"] if rows is None else ab["B"][rows]
        return ((x @ ab["A"].T) @ b.T) * self.scale

    def _forward(self, tok: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        p, c = self.params, self.config
        d, n_heads = c["d_model"], c["n_heads"]
        dh = d // n_heads
        t = tok.shape[1]
        scale = 1.0 / math.sqrt(dh)
        causal = torch.ones(t, t, dtype=torch.bool).tril()
        x = p["wte"][tok] + p["wpe"][pos]
        for layer in range(c["n_layers"]):
            h = f"h{layer}."
            a = layer_norm(x, p[h + "ln1_g"], p[h + "ln1_b"])
            heads = []
            for j in range(n_heads):
                def rows(third: int) -> slice:
                    return slice(third * d + j * dh, third * d + (j + 1) * dh)
                q = a @ p[h + "w_q"][j].T + p[h + "b_q"][j] + self._lora(a, layer, "c_attn", rows(0))
                k = a @ p[h + "w_k"][j].T + p[h + "b_k"][j] + self._lora(a, layer, "c_attn", rows(1))
                v = a @ p[h + "w_v"][j].T + self._lora(a, layer, "c_attn", rows(2))
                scores = ((q @ k.transpose(-1, -2)) * scale).masked_fill(~causal, float("-inf"))
                heads.append(torch.softmax(scores, dim=-1) @ v + p[h + "b_v"][j])
            concat = torch.cat(heads, dim=-1)
            x = x + concat @ p[h + "w_o"].T + p[h + "b_o"] + self._lora(concat, layer, "attn.c_proj")
            m = layer_norm(x, p[h + "ln2_g"], p[h + "ln2_b"])
            hidden = gelu_tanh(m @ p[h + "fc_w"].T + p[h + "fc_b"] + self._lora(m, layer, "mlp.c_fc"))
            x = x + hidden @ p[h + "pr_w"].T + p[h + "pr_b"] + self._lora(hidden, layer, "mlp.c_proj")
        x = layer_norm(x, p["lnf_g"], p["lnf_b"])
        return x @ p["wte"].T
