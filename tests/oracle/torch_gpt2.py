"""The GPT-2 of docs/semantics.md in plain PyTorch: the independent test oracle.

Written from the reference semantics only (it imports nothing from ``graphgen``
or ``runtimes``), and deliberately naive where that makes it easier to trust:
attention is an explicit loop over heads, one (d_head, d_model) slice of the
stacked projection weights at a time, exactly as the seed engine's graph does;
LayerNorm and the tanh GELU are written out from their formulas.

Parameter layout (names, shapes, order), for config keys vocab V, context C,
d_model d, n_heads H, d_head dh = d/H, d_ff F, n_layers L::

    wte (V,d), wpe (C,d),
    per layer l: h{l}.ln1_g (d,), h{l}.ln1_b (d,),
                 h{l}.w_q (H,dh,d), h{l}.b_q (H,dh), h{l}.w_k (H,dh,d), h{l}.b_k (H,dh),
                 h{l}.w_v (H,dh,d), h{l}.b_v (H,dh), h{l}.w_o (d,d), h{l}.b_o (d,),
                 h{l}.ln2_g (d,), h{l}.ln2_b (d,), h{l}.fc_w (F,d), h{l}.fc_b (F,),
                 h{l}.pr_w (d,F), h{l}.pr_b (d,),
    lnf_g (d,), lnf_b (d,)

Weight matrices are (out, in): ``y = x @ W^T + b``.

Loss: integer labels (B,T) give the mean over all B*T positions of
``-log_softmax(logits)[label]``; float labels (B,T,V) give the mean over
positions of ``-sum(labels * log_softmax(logits))``.

Training uses ``torch.optim.AdamW`` (single-tensor implementation, every
parameter decayed, one constant learning rate), which is the update of
docs/semantics.md: ``m = b1 m + (1-b1) g; v = b2 v + (1-b2) g^2;
w = w (1 - lr wd) - lr (m / (1-b1^t)) / (sqrt(v / (1-b2^t)) + eps)``.

Torch's global switches (thread count, deterministic algorithms) are set for
the duration of each call and restored afterwards, so using the oracle does not
change the behaviour of other code in the same process.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
import torch

PARAM_KEYS = ("vocab", "context", "d_model", "n_heads", "d_ff", "n_layers")
LN_EPS = 1e-5
_DTYPES = {"float32": torch.float32, "float64": torch.float64}


def _config_dict(config: Any) -> dict[str, int]:
    """The six shape keys from a dict or from any object that has them as attributes."""
    out: dict[str, int] = {}
    for key in PARAM_KEYS:
        if isinstance(config, Mapping):
            if key not in config:
                raise ValueError(f"config is missing {key!r}; it needs {PARAM_KEYS}")
            value = config[key]
        else:
            if not hasattr(config, key):
                raise ValueError(f"config has no attribute {key!r}; it needs {PARAM_KEYS}")
            value = getattr(config, key)
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0:
            raise ValueError(f"config {key} must be a positive integer, got {value!r}")
        out[key] = int(value)
    if out["d_model"] % out["n_heads"]:
        raise ValueError(
            f"config d_model ({out['d_model']}) must be divisible by n_heads ({out['n_heads']})"
        )
    return out


def param_layout(config: Any) -> list[tuple[str, tuple[int, ...]]]:
    """(name, shape) of every parameter, in layout order (see the module docstring)."""
    c = _config_dict(config)
    d, h, f = c["d_model"], c["n_heads"], c["d_ff"]
    dh = d // h
    layout: list[tuple[str, tuple[int, ...]]] = [
        ("wte", (c["vocab"], d)),
        ("wpe", (c["context"], d)),
    ]
    for layer in range(c["n_layers"]):
        p = f"h{layer}."
        layout += [
            (p + "ln1_g", (d,)),
            (p + "ln1_b", (d,)),
            (p + "w_q", (h, dh, d)),
            (p + "b_q", (h, dh)),
            (p + "w_k", (h, dh, d)),
            (p + "b_k", (h, dh)),
            (p + "w_v", (h, dh, d)),
            (p + "b_v", (h, dh)),
            (p + "w_o", (d, d)),
            (p + "b_o", (d,)),
            (p + "ln2_g", (d,)),
            (p + "ln2_b", (d,)),
            (p + "fc_w", (f, d)),
            (p + "fc_b", (f,)),
            (p + "pr_w", (d, f)),
            (p + "pr_b", (d,)),
        ]
    layout += [("lnf_g", (d,)), ("lnf_b", (d,))]
    return layout


def layer_norm(x: torch.Tensor, g: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """LayerNorm over the last axis, biased variance, eps 1e-5."""
    mean = x.mean(dim=-1, keepdim=True)
    centered = x - mean
    var = (centered * centered).mean(dim=-1, keepdim=True)
    return centered / torch.sqrt(var + LN_EPS) * g + b


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    """GELU, tanh form: 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))."""
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x * x * x)))


@contextlib.contextmanager
def _torch_settings(threads: int, deterministic: bool):
    old_threads = torch.get_num_threads()
    old_det = torch.are_deterministic_algorithms_enabled()
    old_warn = torch.is_deterministic_algorithms_warn_only_enabled()
    torch.set_num_threads(threads)
    if deterministic:
        torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.set_num_threads(old_threads)
        torch.use_deterministic_algorithms(old_det, warn_only=old_warn)


class TorchGPT2:
    """GPT-2 (pre-LN, tied embeddings) with AdamW, per docs/semantics.md.

    ``config``: a dict (or object with attributes) holding vocab, context,
    d_model, n_heads, d_ff, n_layers; other keys are ignored.
    ``weights``: name -> array for every parameter of :func:`param_layout`,
    exactly those names and shapes. They are copied; the caller's arrays are
    never modified.
    """

    def __init__(
        self,
        config: Any,
        weights: Mapping[str, np.ndarray],
        dtype: str = "float32",
        threads: int = 1,
        deterministic: bool = True,
    ) -> None:
        self.config = _config_dict(config)
        if dtype not in _DTYPES:
            raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, got {dtype!r}")
        if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
            raise ValueError(f"threads must be an integer >= 1, got {threads!r}")
        self.dtype = dtype
        self.np_dtype = np.dtype(dtype)
        self._tdtype = _DTYPES[dtype]
        self.threads = threads
        self.deterministic = deterministic
        self.layout = param_layout(self.config)
        self.names = [name for name, _ in self.layout]

        expected = dict(self.layout)
        missing = [n for n in self.names if n not in weights]
        extra = sorted(set(weights) - set(expected))
        if missing or extra:
            raise ValueError(f"weights do not match the layout: missing {missing}, unexpected {extra}")
        self.params: dict[str, torch.Tensor] = {}
        for name, shape in self.layout:
            arr = np.asarray(weights[name])
            if tuple(arr.shape) != shape:
                raise ValueError(f"weight {name} has shape {tuple(arr.shape)}, expected {shape}")
            if not np.all(np.isfinite(arr)):
                raise ValueError(f"weight {name} contains NaN or infinity")
            t = torch.tensor(np.array(arr, dtype=self.np_dtype, copy=True), dtype=self._tdtype)
            self.params[name] = t.requires_grad_(True)
        self.optimizer: torch.optim.AdamW | None = None
        self.steps = 0
        self.grad_norms: list[float] = []  # clip_grad_norm_'s results, one per clipped step

    # ----------------------------------------------------------------- inputs
    def _settings(self):
        return _torch_settings(self.threads, self.deterministic)

    def _ids(self, tokens, positions) -> tuple[torch.Tensor, torch.Tensor]:
        tok = np.asarray(tokens)
        pos = np.asarray(positions)
        if tok.ndim != 2 or pos.shape != tok.shape:
            raise ValueError(
                f"tokens and positions must both be (B,T); got {tok.shape} and {pos.shape}"
            )
        for label, arr, limit in (
            ("tokens", tok, self.config["vocab"]),
            ("positions", pos, self.config["context"]),
        ):
            if not np.issubdtype(arr.dtype, np.integer):
                raise ValueError(f"{label} must be integers, got dtype {arr.dtype}")
            if arr.size and (arr.min() < 0 or arr.max() >= limit):
                raise ValueError(
                    f"{label} must lie in [0, {limit}), got range [{arr.min()}, {arr.max()}]"
                )
        if tok.shape[1] > self.config["context"]:
            raise ValueError(f"sequence length {tok.shape[1]} exceeds context {self.config['context']}")
        return torch.from_numpy(tok.astype(np.int64)), torch.from_numpy(pos.astype(np.int64))

    def _labels(self, labels, shape: tuple[int, int]) -> torch.Tensor:
        lab = np.asarray(labels)
        vocab = self.config["vocab"]
        if np.issubdtype(lab.dtype, np.integer):
            if lab.shape != shape:
                raise ValueError(f"index labels must have shape {shape}, got {lab.shape}")
            if lab.size and (lab.min() < 0 or lab.max() >= vocab):
                raise ValueError(f"labels must lie in [0, {vocab}), got range [{lab.min()}, {lab.max()}]")
            return torch.from_numpy(lab.astype(np.int64))
        if np.issubdtype(lab.dtype, np.floating):
            if lab.shape != shape + (vocab,):
                raise ValueError(f"dense labels must have shape {shape + (vocab,)}, got {lab.shape}")
            return torch.tensor(lab.astype(self.np_dtype), dtype=self._tdtype)
        raise ValueError(f"labels must be integer (B,T) or float (B,T,V), got dtype {lab.dtype}")

    # ------------------------------------------------------------------ model
    def _lora(self, x: torch.Tensor, layer: int, target: str, rows: slice | None = None) -> torch.Tensor | float:
        """A LoRA adapter's term in ``target``'s output (Hugging Face module names; ``rows``: the
        part of a fused c_attn output one head's q, k or v takes): none here, see torch_lora."""
        return 0.0

    def _forward(self, tok: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        p = self.params
        c = self.config
        d = c["d_model"]
        n_heads = c["n_heads"]
        d_head = d // n_heads
        t = tok.shape[1]
        scale = 1.0 / math.sqrt(d_head)
        causal = torch.ones(t, t, dtype=torch.bool).tril()  # [i, j] True where j <= i

        x = p["wte"][tok] + p["wpe"][pos]
        for layer in range(c["n_layers"]):
            h = f"h{layer}."
            a = layer_norm(x, p[h + "ln1_g"], p[h + "ln1_b"])
            heads = []
            for j in range(n_heads):
                def rows(third: int) -> slice:  # head j's rows of the fused q, k, v projection
                    return slice(third * d + j * d_head, third * d + (j + 1) * d_head)
                q = a @ p[h + "w_q"][j].T + p[h + "b_q"][j] + self._lora(a, layer, "c_attn", rows(0))
                k = a @ p[h + "w_k"][j].T + p[h + "b_k"][j] + self._lora(a, layer, "c_attn", rows(1))
                v = a @ p[h + "w_v"][j].T + self._lora(a, layer, "c_attn", rows(2))  # value bias added after attention
                scores = (q @ k.transpose(-1, -2)) * scale
                scores = scores.masked_fill(~causal, float("-inf"))
                probs = torch.softmax(scores, dim=-1)
                heads.append(probs @ v + p[h + "b_v"][j])
            concat = torch.cat(heads, dim=-1)
            x = x + concat @ p[h + "w_o"].T + p[h + "b_o"] + self._lora(concat, layer, "attn.c_proj")
            m = layer_norm(x, p[h + "ln2_g"], p[h + "ln2_b"])
            hidden = gelu_tanh(m @ p[h + "fc_w"].T + p[h + "fc_b"] + self._lora(m, layer, "mlp.c_fc"))
            x = x + hidden @ p[h + "pr_w"].T + p[h + "pr_b"] + self._lora(hidden, layer, "mlp.c_proj")
        x = layer_norm(x, p["lnf_g"], p["lnf_b"])
        return x @ p["wte"].T

    @staticmethod
    def _loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        logp = torch.log_softmax(logits, dim=-1)
        if labels.dtype == torch.int64:
            return -logp.gather(-1, labels.unsqueeze(-1)).squeeze(-1).mean()
        return -(labels * logp).sum(dim=-1).mean()

    def _loss_graph(self, tokens, positions, labels) -> torch.Tensor:
        tok, pos = self._ids(tokens, positions)
        lab = self._labels(labels, tuple(tok.shape))
        return self._loss(self._forward(tok, pos), lab)

    # ------------------------------------------------------------- public API
    def logits(self, tokens, positions) -> np.ndarray:
        """(B,T,V) logits."""
        with self._settings(), torch.no_grad():
            tok, pos = self._ids(tokens, positions)
            return self._forward(tok, pos).numpy().copy()

    def loss(self, tokens, positions, labels) -> float:
        with self._settings(), torch.no_grad():
            return float(self._loss_graph(tokens, positions, labels))

    def grads(self, tokens, positions, labels) -> tuple[float, dict[str, np.ndarray]]:
        """(loss, name -> gradient) at the current parameters; changes nothing."""
        with self._settings():
            loss = self._loss_graph(tokens, positions, labels)
            tensors = [self.params[n] for n in self.names]
            grads = torch.autograd.grad(loss, tensors)
            return float(loss.detach()), {n: g.numpy().copy() for n, g in zip(self.names, grads)}

    def train(
        self,
        batches: Iterable[tuple[Any, Any, Any]],
        lr: float,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.01,
        clip: float = 0.0,
    ) -> list[float]:
        """One AdamW step per (tokens, positions, labels) batch; returns each step's loss.

        ``clip`` > 0: ``torch.nn.utils.clip_grad_norm_(params, clip)`` before each step;
        the norms it returns (before clipping) are appended to ``self.grad_norms``.

        The loss reported for a step is computed before that step's update (as a
        train step returns it). The optimizer persists across calls, so
        ``train(a); train(b)`` equals ``train(a + b)``; the hyperparameters of
        the latest call apply from its first step on.
        """
        if not lr > 0 or not math.isfinite(lr):
            raise ValueError(f"lr must be a finite number > 0, got {lr!r}")
        b1, b2 = betas
        for label, value in (("beta1", b1), ("beta2", b2)):
            if not 0.0 <= value < 1.0:
                raise ValueError(f"{label} must be in [0, 1), got {value!r}")
        if not eps > 0:
            raise ValueError(f"eps must be > 0, got {eps!r}")
        if not weight_decay >= 0:
            raise ValueError(f"weight_decay must be >= 0, got {weight_decay!r}")
        tensors = [self.params[n] for n in self.names]
        if self.optimizer is None:
            self.optimizer = torch.optim.AdamW(
                tensors,
                lr=lr,
                betas=(b1, b2),
                eps=eps,
                weight_decay=weight_decay,
                amsgrad=False,
                foreach=False,
                fused=False,
                maximize=False,
                capturable=False,
            )
        group = self.optimizer.param_groups[0]
        group.update(lr=lr, betas=(b1, b2), eps=eps, weight_decay=weight_decay)
        losses: list[float] = []
        with self._settings():
            for tokens, positions, labels in batches:
                self.optimizer.zero_grad(set_to_none=True)
                loss = self._loss_graph(tokens, positions, labels)
                loss.backward()
                if clip > 0:
                    norm = torch.nn.utils.clip_grad_norm_(tensors, clip, foreach=False)
                    self.grad_norms.append(float(norm))
                self.optimizer.step()
                self.steps += 1
                losses.append(float(loss.detach()))
        return losses

    # -------------------------------------------------------------- accessors
    def parameters(self) -> dict[str, np.ndarray]:
        """name -> copy of the current parameter, in layout order."""
        return {n: self.params[n].detach().numpy().copy() for n in self.names}

    def parameter(self, name: str) -> np.ndarray:
        return self.params[name].detach().numpy().copy()

    def _state(self, name: str, key: str) -> np.ndarray:
        if name not in self.params:
            raise KeyError(f"unknown parameter {name!r}")
        if self.optimizer is None:
            return np.zeros(self.params[name].shape, dtype=self.np_dtype)
        state = self.optimizer.state.get(self.params[name], {})
        if key not in state:
            return np.zeros(self.params[name].shape, dtype=self.np_dtype)
        return state[key].detach().numpy().copy()

    def exp_avg(self, name: str) -> np.ndarray:
        """AdamW first moment m of a parameter (zeros before the first step)."""
        return self._state(name, "exp_avg")

    def exp_avg_sq(self, name: str) -> np.ndarray:
        """AdamW second moment v of a parameter (zeros before the first step)."""
        return self._state(name, "exp_avg_sq")

    def moments(self) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
        """(m, v): name -> first / second moment for every parameter, in layout order."""
        return (
            {n: self.exp_avg(n) for n in self.names},
            {n: self.exp_avg_sq(n) for n in self.names},
        )


def lcg_weights(config: Any, seed: int = 42, init: str = "lcg") -> dict[str, np.ndarray]:
    """docs/semantics.md's seeded LCG init, written independently of graphgen's.

    ``rng = (rng*1103515245 + 12345) & 0x7fffffff``; each weight is
    ``unit * 0.02`` with ``unit = (rng >> 7)/2^23 - 1`` (init="lcg") or
    ``(rng >> 8)/2^23 - 1`` (init="seed"), drawn in row-major order and in the
    seed's allocation order (wte, wpe, per layer: per head q, k, v, then o, fc,
    proj); gains are 1, biases 0 and draw nothing. Float64, rounded to float32.
    Pure Python (slow): for tiny configs in tests.
    """
    if init not in ("lcg", "seed"):
        raise ValueError(f"init must be 'lcg' or 'seed', got {init!r}")
    shift = 7 if init == "lcg" else 8
    c = _config_dict(config)
    state = [seed]

    def draw(shape: tuple[int, ...]) -> np.ndarray:
        n = int(np.prod(shape))
        out = np.empty(n, dtype=np.float64)
        rng = state[0]
        for i in range(n):
            rng = (rng * 1103515245 + 12345) & 0x7FFFFFFF
            out[i] = ((rng >> shift) / 8388608.0 - 1.0) * 0.02
        state[0] = rng
        return out.reshape(shape)

    d, h, f = c["d_model"], c["n_heads"], c["d_ff"]
    dh = d // h
    w: dict[str, np.ndarray] = {"wte": draw((c["vocab"], d)), "wpe": draw((c["context"], d))}
    for layer in range(c["n_layers"]):
        p = f"h{layer}."
        w[p + "ln1_g"] = np.ones(d)
        w[p + "ln1_b"] = np.zeros(d)
        wq, wk, wv = np.empty((h, dh, d)), np.empty((h, dh, d)), np.empty((h, dh, d))
        for j in range(h):
            wq[j] = draw((dh, d))
            wk[j] = draw((dh, d))
            wv[j] = draw((dh, d))
        w[p + "w_q"], w[p + "b_q"] = wq, np.zeros((h, dh))
        w[p + "w_k"], w[p + "b_k"] = wk, np.zeros((h, dh))
        w[p + "w_v"], w[p + "b_v"] = wv, np.zeros((h, dh))
        w[p + "w_o"], w[p + "b_o"] = draw((d, d)), np.zeros(d)
        w[p + "ln2_g"], w[p + "ln2_b"] = np.ones(d), np.zeros(d)
        w[p + "fc_w"], w[p + "fc_b"] = draw((f, d)), np.zeros(f)
        w[p + "pr_w"], w[p + "pr_b"] = draw((d, f)), np.zeros(d)
    w["lnf_g"], w["lnf_b"] = np.ones(d), np.zeros(d)
    return {name: w[name].astype(np.float32) for name, _ in param_layout(c)}


def random_weights(config: Any, seed: int = 0, scale: float = 0.1) -> dict[str, np.ndarray]:
    """Non-trivial float32 test weights: every tensor (gains and biases too) random.

    Gains are 1 + noise and biases noise, so a test that, say, drops a bias or
    adds the value bias in the wrong place sees a difference.
    """
    rng = np.random.default_rng(seed)
    out: dict[str, np.ndarray] = {}
    for name, shape in param_layout(config):
        noise = rng.standard_normal(shape) * scale
        if name.endswith("_g"):
            noise = 1.0 + noise
        out[name] = noise.astype(np.float32)
    return out
