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

from collections.abc import Mapping

import numpy as np
import torch

from .torch_gpt2 import TorchGPT2

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
        """(x A^T) B^T * alpha/r for the adapter on ``target`` (TorchGPT2's forward adds it)."""
        ab = self.adapters.get((layer, target))
        if ab is None:
            return 0.0
        b = ab["B"] if rows is None else ab["B"][rows]
        return ((x @ ab["A"].T) @ b.T) * self.scale
