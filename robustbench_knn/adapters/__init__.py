"""Toolkit adapters: thin layers over each toolkit's public API. Importing registers their attacks.

Every toolkit sees the classifier's ``forward`` (real logits, or a k-NN surrogate); the evaluator judges
what comes back with ``predict``.
"""

# order matters: the first toolkit to register a name is its default (aa: marks its own names default)
from . import torchattacks_adapter, autoattack_adapter, art_adapter  # noqa: F401,I001  (register)
