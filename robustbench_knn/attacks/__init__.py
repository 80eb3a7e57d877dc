"""Attack registry. Importing this package registers every attack."""

from .base import (DEFAULT_TOOLKIT, GROUPS, REGISTRY, Attack, AttackSpec, get_attack, input_gradient,
                   parse_attack_list, register_group)
from . import kfgsm  # noqa: F401  (registers)
from . import adaptive  # noqa: F401  (registers the adaptive attacks, the "adaptive" group and transfer)
from .adaptive import ADAPTIVE_SUITE
from .. import adapters  # noqa: F401,E402  (registers the toolkit attacks)

# The standard suite of the audit and of ``benchmark()``: the paper's attack and AutoAttack's standard members
# (FAB-T aside) run separately, so each one's figure is reported and the worst case is per sample.
STANDARD_SUITE = ("kfgsm", "aa:apgd", "aa:apgd-t", "aa:square")
register_group("standard", STANDARD_SUITE)
register_group("all", STANDARD_SUITE + ADAPTIVE_SUITE)

__all__ = ["STANDARD_SUITE", "ADAPTIVE_SUITE", "Attack", "AttackSpec", "REGISTRY", "DEFAULT_TOOLKIT", "GROUPS", "get_attack", "parse_attack_list",
           "input_gradient"]
