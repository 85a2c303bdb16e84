"""make_hp / check_hp / check_clip, owned by the contract package; kept here for ``runtimes.hp`` imports."""

from contract.hp import HP_LAYOUT, HP_RTOL, check_clip, check_hp, make_hp  # noqa: F401
