"""Attack registry. Importing this package registers every attack."""

from .. import adapters  # noqa: F401,E402  (registers the toolkit attacks)
from . import (
    adaptive,  # noqa: F401  (registers the adaptive attacks, the "adaptive" group and transfer)
    kfgsm,  # noqa: F401  (registers)
)
from .adaptive import ADAPTIVE_SUITE
from .base import (
    DEFAULT_TOOLKIT,
    GROUPS,
    REGISTRY,
    Attack,
    AttackSpec,
    get_attack,
    input_gradient,
    parse_attack_list,
    register_group,
)

# The standard suite of the audit and of ``benchmark()``: the paper's attack and AutoAttack's standard members
# (FAB-T aside) run separately, so each one's figure is reported and the worst case is per sample.
STANDARD_SUITE = ("kfgsm", "aa:apgd", "aa:apgd-t", "aa:square")
register_group("standard", STANDARD_SUITE)
# What ``benchmark()`` and ``evaluate`` run when no attacks are named. On a k-NN defense: the cheapest set whose
# per-sample worst case matched the full audit's bound on FULL and the deep k-NN subject (the audit's per-sample
# outcomes, docs/methodology.md "Choosing the default suite"), with a gradient-free attack on the hard vote that no masked
# gradient can stop. On a logit classifier: AutoAttack standard, as RobustBench.
DEFAULT_KNN_SUITE = ("softknn-apgd", "softknn-apgd-dlr", "feature", "vote-square")  # most breaks per second first
DEFAULT_LOGIT_SUITE = ("aa:autoattack",)
register_group("knn-default", DEFAULT_KNN_SUITE)


def default_attacks(is_knn: bool) -> str:
    """The default suite's names for a k-NN defense (``is_knn``) or a logit classifier, as an ``--attacks`` list."""
    return ",".join(DEFAULT_KNN_SUITE if is_knn else DEFAULT_LOGIT_SUITE)

register_group("all", STANDARD_SUITE + ADAPTIVE_SUITE)

__all__ = ["STANDARD_SUITE", "DEFAULT_KNN_SUITE", "DEFAULT_LOGIT_SUITE", "default_attacks", "ADAPTIVE_SUITE", "Attack", "AttackSpec", "REGISTRY", "DEFAULT_TOOLKIT", "GROUPS", "get_attack", "parse_attack_list",
           "input_gradient"]
