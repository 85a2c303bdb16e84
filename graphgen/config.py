"""GPT-2 configuration: presets, validation, and the parameter layout.

The parameter layout is the contract every artifact, runtime and host shares:
names, shapes and order. The order is the seed engine's allocation order (wte,
wpe, then per layer ln1, per head q/k/v, o, ln2, fc, proj, then lnf), with one
change: each layer's per-head tensors are stacked along a leading head axis,
``w_q`` is (n_heads, d_head, d_model) instead of n_heads separate
(d_head, d_model) matrices. The math stays the seed's per-head attention (head j
uses ``w_q[j]`` and only it); stacking lets every head run in one batched MatMul
and keeps the graph's input count independent of the head count.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

import numpy as np

LABEL_MODES = ("index", "dense")
INIT_MODES = ("lcg", "seed")
LN_EPS = 1e-5
# safetensors, numpy and ONNX Runtime all index a tensor with 64-bit sizes, but a
# model past 2^31 parameters (8 GiB of float32, four times that to train) is far
# outside what these graphs are laid out for; refusing it here turns a MemoryError
# deep in the init into a one-line message.
MAX_PARAMETERS = 2**31 - 1
# The portable graphs carry the causal mask as a (context, context) float32 constant
# (see model.causal_mask): 16,384 makes it 1 GiB, half of what one ONNX protobuf may hold.
MAX_CONTEXT = 16384

# name: (vocab, context, d_model, n_heads, d_ff, n_layers)
PRESETS: dict[str, tuple[int, int, int, int, int, int]] = {
    "tiny": (256, 64, 64, 4, 256, 2),
    "small": (256, 256, 256, 8, 1024, 4),
    "mid": (8192, 256, 512, 8, 2048, 6),
    "gpt2": (50257, 1024, 768, 12, 3072, 12),
}


class ConfigError(ValueError):
    """A configuration value is out of its allowed range; the message names the field."""


@dataclass(frozen=True)
class GPT2Config:
    vocab: int
    context: int
    d_model: int
    n_heads: int
    d_ff: int
    n_layers: int
    seed: int = 42
    init: str = "lcg"
    labels: str = "index"
    # AdamW constants baked into the ONNX Runtime optimizer model (optimizer_model.onnx).
    # The portable train_step.onnx reads them from hp at every step instead.
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    weight_decay: float = 0.01
    # Global gradient-norm clipping of the ONNX Runtime training set, fixed when its
    # optimizer model is built (0: off). train_step.onnx reads its threshold every step.
    clip: float = 0.0
    name: str = field(default="custom", compare=False)

    def __post_init__(self) -> None:
        for f in ("vocab", "context", "d_model", "n_heads", "d_ff", "n_layers"):
            v = getattr(self, f)
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                raise ConfigError(f"{f} must be a positive integer, got {v!r}")
        if self.context > MAX_CONTEXT:
            raise ConfigError(
                f"context must be at most {MAX_CONTEXT:,} (the causal mask is a (context, context) constant "
                f"in the graphs), got {self.context:,}"
            )
        if self.d_model % self.n_heads != 0:
            raise ConfigError(
                f"d_model ({self.d_model}) must be divisible by n_heads ({self.n_heads})"
            )
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or not 0 <= self.seed < 2**31:
            raise ConfigError(f"seed must be an integer in [0, 2^31), got {self.seed!r}")
        if self.init not in INIT_MODES:
            raise ConfigError(f"init must be one of {INIT_MODES}, got {self.init!r}")
        if self.labels not in LABEL_MODES:
            raise ConfigError(f"labels must be one of {LABEL_MODES}, got {self.labels!r}")
        for f in ("beta1", "beta2"):
            v = getattr(self, f)
            # float32 is what the optimizer model and the hp vector carry: 0.99999999 rounds to 1
            if not 0.0 <= v < 1.0 or not np.float32(v) < 1.0:
                raise ConfigError(f"{f} must be in [0, 1) (and below 1 in float32), got {v!r}")
        if not (self.eps > 0.0 and math.isfinite(self.eps) and np.float32(self.eps) > 0):
            raise ConfigError(f"eps must be finite and > 0 (and above 0 in float32), got {self.eps!r}")
        if not (self.weight_decay >= 0.0 and math.isfinite(self.weight_decay)):
            raise ConfigError(f"weight_decay must be finite and >= 0, got {self.weight_decay!r}")
        if isinstance(self.clip, bool) or not isinstance(self.clip, (int, float)) or not (
                math.isfinite(self.clip) and self.clip >= 0):
            raise ConfigError(f"clip must be a finite number >= 0 (0: no clipping), got {self.clip!r}")
        n = sum(math.prod(shape) for _, shape in param_specs(self))
        if n > MAX_PARAMETERS:
            raise ConfigError(
                f"this configuration has {n:,} parameters, more than the {MAX_PARAMETERS:,} these artifacts "
                f"support (vocab {self.vocab}, context {self.context}, d_model {self.d_model}, "
                f"d_ff {self.d_ff}, n_layers {self.n_layers})"
            )

    @property
    def d_head(self) -> int:
        return self.d_model // self.n_heads

    @classmethod
    def preset(cls, name: str, **overrides) -> "GPT2Config":
        if name not in PRESETS:
            raise ConfigError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
        keys = ("vocab", "context", "d_model", "n_heads", "d_ff", "n_layers")
        values = dict(zip(keys, PRESETS[name]))
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(name=name, **values)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d.pop("name")
        return d

    @classmethod
    def from_dict(cls, d: dict, name: str = "custom") -> "GPT2Config":
        fields = {f.name for f in dataclasses.fields(cls)} - {"name"}
        unknown = set(d) - fields
        if unknown:
            raise ConfigError(f"unknown config keys {sorted(unknown)}")
        return cls(name=name, **d)


def param_specs(cfg: GPT2Config) -> list[tuple[str, tuple[int, ...]]]:
    """(name, shape) of every trainable tensor, in the seed's allocation order."""
    d, h, dh, f = cfg.d_model, cfg.n_heads, cfg.d_head, cfg.d_ff
    specs: list[tuple[str, tuple[int, ...]]] = [("wte", (cfg.vocab, d)), ("wpe", (cfg.context, d))]
    for layer in range(cfg.n_layers):
        p = f"h{layer}."
        specs += [
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
    specs += [("lnf_g", (d,)), ("lnf_b", (d,))]
    return specs
