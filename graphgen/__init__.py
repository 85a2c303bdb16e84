"""GPT-2 training steps emitted as ONNX.

Importing the package imports :mod:`graphgen.vjp_rules`, which registers the VJP rules
into the autodiff engine's table (:data:`graphgen.autodiff.RULES`). The engine does
not import its rules (they depend on it, not the other way round), and doing it here
rather than in one caller (e.g. ``train_step``) means that whatever ``graphgen`` module
is imported first, ``add_vjp`` / ``add_gradients`` find the table filled.
"""

from graphgen import vjp_rules as _vjp_rules  # noqa: F401  (fills graphgen.autodiff.RULES)
