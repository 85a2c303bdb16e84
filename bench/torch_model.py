"""The benchmark's PyTorch baseline: the oracle's GPT-2 with all heads batched.

Same math as tests/oracle/torch_gpt2.py (and docs/semantics.md): pre-LN, LN eps 1e-5,
tanh GELU, per-head attention with the value bias added after attention, tied
logits, mean cross-entropy over positions; parameters in the same names and
shapes. The difference is speed only: the oracle loops over heads for
independence; here each projection's stacked (H, dh, d) weight is viewed as
(d, d) so one matmul computes every head, and attention runs as one batched
(B, H, T, T) matmul/softmax. PyTorch's own fused kernels are used where they
compute the same function (F.linear, F.layer_norm, F.gelu(approximate="tanh"),
F.cross_entropy). ``attention="sdpa"`` swaps the explicit masked softmax for
F.scaled_dot_product_attention(is_causal=True) (same math, PyTorch's fastest
CPU kernel), reported as a second baseline.

The optimizer is torch.optim.AdamW with every parameter decayed, ``foreach=True``
(the multi-tensor implementation).
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

ATTENTION = ("matmul", "sdpa")


class BatchedGPT2:
    def __init__(self, config: dict, weights: dict[str, np.ndarray], attention: str = "matmul",
                 device: str = "cpu"):
        if attention not in ATTENTION:
            raise ValueError(f"attention must be one of {ATTENTION}, got {attention!r}")
        self.cfg = {k: int(config[k]) for k in ("vocab", "context", "d_model", "n_heads", "d_ff", "n_layers")}
        self.attention = attention
        self.device = torch.device(device)
        self.names = list(weights)
        self.params = {
            n: torch.tensor(np.asarray(w, dtype=np.float32), device=self.device).requires_grad_(True)
            for n, w in weights.items()
        }
        self._mask: dict[int, torch.Tensor] = {}
        self.optimizer: torch.optim.AdamW | None = None

    def _causal(self, t: int) -> torch.Tensor:
        if t not in self._mask:
            self._mask[t] = torch.ones(t, t, dtype=torch.bool, device=self.device).tril()
        return self._mask[t]

    def logits(self, tok: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        p, c = self.params, self.cfg
        d, h = c["d_model"], c["n_heads"]
        dh = d // h
        b, t = tok.shape
        x = F.embedding(tok, p["wte"]) + F.embedding(pos, p["wpe"])
        for layer in range(c["n_layers"]):
            pre = f"h{layer}."
            a = F.layer_norm(x, (d,), p[pre + "ln1_g"], p[pre + "ln1_b"], 1e-5)

            def heads(name: str, bias: bool) -> torch.Tensor:
                w = p[pre + "w_" + name].view(d, d)  # head j's rows at j*dh: one matmul, all heads
                y = F.linear(a, w, p[pre + "b_" + name].view(d) if bias else None)
                return y.view(b, t, h, dh).transpose(1, 2)  # (B, H, T, dh)

            q, k, v = heads("q", True), heads("k", True), heads("v", False)
            if self.attention == "sdpa":
                o = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            else:
                s = torch.matmul(q, k.transpose(-1, -2)) * (1.0 / math.sqrt(dh))
                s = s.masked_fill(~self._causal(t), float("-inf"))
                o = torch.matmul(torch.softmax(s, dim=-1), v)
            o = o + p[pre + "b_v"].view(h, 1, dh)  # value bias after attention, as the seed
            o = o.transpose(1, 2).reshape(b, t, d)
            x = x + F.linear(o, p[pre + "w_o"], p[pre + "b_o"])
            m = F.layer_norm(x, (d,), p[pre + "ln2_g"], p[pre + "ln2_b"], 1e-5)
            hid = F.gelu(F.linear(m, p[pre + "fc_w"], p[pre + "fc_b"]), approximate="tanh")
            x = x + F.linear(hid, p[pre + "pr_w"], p[pre + "pr_b"])
        x = F.layer_norm(x, (d,), p["lnf_g"], p["lnf_b"], 1e-5)
        return F.linear(x, p["wte"])  # tied unembedding

    def loss(self, tok, pos, labels) -> torch.Tensor:
        logits = self.logits(tok, pos)
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1))

    def step(self, tok, pos, labels, lr: float, betas=(0.9, 0.999), eps: float = 1e-8,
             weight_decay: float = 0.01) -> float:
        """One full training step: forward, loss, backward, AdamW. Returns the loss before the update."""
        if self.optimizer is None:
            self.optimizer = torch.optim.AdamW(
                [self.params[n] for n in self.names], lr=lr, betas=betas, eps=eps,
                weight_decay=weight_decay, foreach=True,
            )
        self.optimizer.zero_grad(set_to_none=True)
        loss = self.loss(tok, pos, labels)
        loss.backward()
        self.optimizer.step()
        return float(loss.detach())
