"""Independent reference implementations used by the parity tests.

Nothing here imports ``graphgen`` or ``runtimes``: the oracle is written from
docs/semantics.md alone, so a mistake shared with the builder
cannot hide behind it.
"""

from .torch_gpt2 import PARAM_KEYS, TorchGPT2, lcg_weights, param_layout, random_weights

__all__ = ["PARAM_KEYS", "TorchGPT2", "lcg_weights", "param_layout", "random_weights"]
