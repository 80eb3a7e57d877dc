"""Attack registry. Importing this package registers every attack."""

from .base import (DEFAULT_TOOLKIT, GROUPS, REGISTRY, Attack, AttackSpec, get_attack, input_gradient,
                   parse_attack_list)
from . import kfgsm  # noqa: F401  (registers)
from . import adaptive  # noqa: F401  (registers the adaptive attacks, the "adaptive" group and transfer)
from .. import adapters  # noqa: F401,E402  (registers the toolkit attacks)

__all__ = ["Attack", "AttackSpec", "REGISTRY", "DEFAULT_TOOLKIT", "GROUPS", "get_attack", "parse_attack_list",
           "input_gradient"]
