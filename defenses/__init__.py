"""The catalog of defenses. Importing this package registers every defense in
``reidbench.registry.DEFENSES``; to add one, add a module here (it is imported below)."""

from . import baseline  # noqa: F401
from . import adversarial, input_baselines, jad  # noqa: F401

# Any other module of this package registers itself too: a new defense is one new file.
from reidbench.registry import import_catalog  # noqa: E402

import_catalog(__name__, __path__)
