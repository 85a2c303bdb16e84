"""The error classes, owned by the contract package (the builder raises some of them too)."""

from contract.errors import *  # noqa: F401,F403
from contract.errors import __all__  # noqa: F401
