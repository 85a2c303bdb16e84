"""LoRA adapters over this project's GPT-2: targets, shapes, checks, merging and PEFT's layout.

The builder (graphgen/lora.py) and the runners (runtimes/export.py) both need
these facts, so they live here once.

A target is a Hugging Face GPT-2 module name as PEFT uses it (``c_attn``,
``attn.c_proj``, ``mlp.c_fc``, ``mlp.c_proj``). Each adapter is PEFT's pair:
``A`` (rank, in) and ``B`` (out, rank), and the target's output gains
``(x A^T) B^T * alpha / rank``. ``c_attn`` is one adapter over the fused q, k, v
projection (in d, out 3d, rows q then k then v, head-major as in Hugging Face),
which this project applies to its per-head ``w_q``, ``w_k``, ``w_v``: rows
``i*d .. (i+1)*d`` of B serve the i-th of q, k, v, and head j of each is rows
``j*d_head ..`` of that third, exactly the rows of the flattened (d, d) weight.

Merging (``W + B A alpha/rank``) is what ``runtimes export --hf/--onnx`` write;
``to_peft`` gives the keys ``peft.PeftModel.from_pretrained`` loads.
"""

from __future__ import annotations

import math

import numpy as np

from . import LORA_TARGETS, lora_name

# Each target: the project's weight(s) it adapts (stored (out, in)) and its (in, out) sizes.
_WEIGHTS = {"c_attn": ("w_q", "w_k", "w_v"), "attn.c_proj": ("w_o",), "mlp.c_fc": ("fc_w",), "mlp.c_proj": ("pr_w",)}


class LoraError(ValueError):
    """A LoRA option this model cannot take; the message names the value."""


def target_dims(cfg: dict, target: str) -> tuple[int, int]:
    """(in, out) features of ``target`` for a config dict (d_model, d_ff)."""
    d, f = cfg["d_model"], cfg["d_ff"]
    return {"c_attn": (d, 3 * d), "attn.c_proj": (d, d), "mlp.c_fc": (d, f), "mlp.c_proj": (f, d)}[target]


def parse_targets(text: str | list[str]) -> list[str]:
    """Target names from "a,b" (or a list), in LORA_TARGETS order; LoraError names an unknown one."""
    names = [t.strip() for t in (text.split(",") if isinstance(text, str) else text)]
    unknown = [t for t in names if t not in LORA_TARGETS]
    if unknown or not names:
        raise LoraError(f"--lora-targets {','.join(names)!r}: unknown target {unknown[0] if unknown else '(none)'!r}; "
                        f"choose from {','.join(LORA_TARGETS)} (Hugging Face GPT-2 module names, as PEFT uses them)")
    return [t for t in LORA_TARGETS if t in names]


def check_lora(cfg: dict, rank, alpha, targets: list[str], dropout) -> dict:
    """The manifest's ``lora`` entry for these options, or LoraError naming the bad value."""
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise LoraError(f"--lora-rank {rank!r}: the rank must be an integer >= 1")
    for t in targets:
        d_in, d_out = target_dims(cfg, t)
        if rank > min(d_in, d_out):
            raise LoraError(f"--lora-rank {rank}: larger than min(in, out) = {min(d_in, d_out)} of target {t} "
                            f"({d_in} -> {d_out}); a rank above it adds nothing a full update could not")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha) or alpha <= 0:
        raise LoraError(f"--lora-alpha {alpha!r}: alpha must be a finite number > 0")
    if dropout != 0:
        raise LoraError(f"--lora-dropout {dropout!r}: only 0 is supported (dropout would need random numbers inside "
                        f"the step graphs, which this project's graphs do not draw)")
    return {"rank": rank, "alpha": float(alpha), "dropout": 0.0, "targets": list(targets), "scale": alpha / rank}


def adapter_specs(cfg: dict, rank: int, targets: list[str]) -> list[tuple[str, tuple[int, int]]]:
    """(name, shape) of every adapter tensor: per layer, per target in LORA_TARGETS order, A then B."""
    specs = []
    for layer in range(cfg["n_layers"]):
        for t in (t for t in LORA_TARGETS if t in targets):
            d_in, d_out = target_dims(cfg, t)
            specs += [(lora_name(layer, t, "A"), (rank, d_in)), (lora_name(layer, t, "B"), (d_out, rank))]
    return specs


def delta(adapters: dict[str, np.ndarray], layer: int, target: str, scale: float) -> np.ndarray:
    """The (out, in) float32 update ``B A * scale`` of one target, as PEFT's get_delta_weight computes it."""
    a, b = adapters[lora_name(layer, target, "A")], adapters[lora_name(layer, target, "B")]
    return (b @ a) * np.float32(scale)


def merge(base: dict[str, np.ndarray], adapters: dict[str, np.ndarray], cfg: dict, lora: dict) -> dict[str, np.ndarray]:
    """The base parameters with every adapter merged in (W + B A alpha/rank); the inputs are not changed."""
    out = dict(base)
    d, h = cfg["d_model"], cfg["n_heads"]
    for layer in range(cfg["n_layers"]):
        for t in lora["targets"]:
            dw = delta(adapters, layer, t, lora["scale"])  # (out, in)
            names = [f"h{layer}.{w}" for w in _WEIGHTS[t]]
            if t == "c_attn":
                for i, n in enumerate(names):  # rows q, k, v; (d, d) -> (n_heads, d_head, d)
                    out[n] = (base[n].reshape(d, d) + dw[i * d:(i + 1) * d]).reshape(h, d // h, d)
            else:
                out[names[0]] = base[names[0]] + dw
    return {n: np.ascontiguousarray(a, dtype=np.float32) for n, a in out.items()}


PEFT_PREFIX = "base_model.model.transformer."
# Each target's module under transformer.h.<layer> (PEFT matches a target name as a suffix of the module path).
_MODULE = {"c_attn": "attn.c_attn", "attn.c_proj": "attn.c_proj", "mlp.c_fc": "mlp.c_fc", "mlp.c_proj": "mlp.c_proj"}


def to_peft(adapters: dict[str, np.ndarray], cfg: dict, lora: dict) -> dict[str, np.ndarray]:
    """adapter_model.safetensors' tensors: PEFT's keys (``...h.0.attn.c_attn.lora_A.weight``), same arrays."""
    out = {}
    for layer in range(cfg["n_layers"]):
        for t in lora["targets"]:
            for which in ("A", "B"):
                out[f"{PEFT_PREFIX}h.{layer}.{_MODULE[t]}.lora_{which}.weight"] = np.ascontiguousarray(
                    adapters[lora_name(layer, t, which)], dtype=np.float32)
    return out


def peft_config(lora: dict, base_model: str | None = None) -> dict:
    """adapter_config.json for PEFT's LoraConfig (GPT-2's Conv1D layers: fan_in_fan_out)."""
    return {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model,
        "r": lora["rank"], "lora_alpha": lora["alpha"], "lora_dropout": lora["dropout"],
        "target_modules": list(lora["targets"]), "fan_in_fan_out": True, "bias": "none",
        "inference_mode": True, "init_lora_weights": True, "use_rslora": False, "use_dora": False,
        "modules_to_save": None, "layers_to_transform": None,
    }
