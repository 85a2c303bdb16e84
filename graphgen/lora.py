"""LoRA adapters' initial values: PEFT's default init from this project's seeded generator.

PEFT initialises ``lora_A`` with ``kaiming_uniform_(a=sqrt(5))``, which is
uniform on ``[-1/sqrt(in), 1/sqrt(in))`` (gain sqrt(2/(1+5)) times sqrt(3/in)),
and ``lora_B`` with zeros, so the adapted model at step 0 is the base model
exactly (B A = 0). Here the uniform draws come from the init LCG (graphgen/init.py,
``lcg`` unit map, [-1, 1)) started at ``seed + 1``, adapters in manifest order,
so a build is reproducible from its config and its stream is not the one that
drew ``wte``.
"""

from __future__ import annotations

import math

import numpy as np

from contract.lora import adapter_specs

from .config import GPT2Config
from .init import LCG_MASK, lcg_units


def init_adapters(cfg: GPT2Config, lora: dict) -> dict[str, np.ndarray]:
    """Every adapter tensor, float32, in manifest order: A uniform in [-1/sqrt(in), 1/sqrt(in)), B zeros."""
    state = (cfg.seed + 1) & LCG_MASK
    out = {}
    for name, shape in adapter_specs(cfg.to_dict(), lora["rank"], lora["targets"]):
        if name.endswith("A"):
            units, state = lcg_units(state, int(np.prod(shape)), "lcg")
            out[name] = (units / math.sqrt(shape[1])).astype(np.float32).reshape(shape)  # (rank, in)
        else:
            out[name] = np.zeros(shape, np.float32)  # (out, rank)
    return out
