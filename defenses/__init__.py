"""The catalog of defenses. Importing this package registers every defense in
``reidbench.registry.DEFENSES``; add a module here and import it below to add one."""

from . import baseline  # noqa: F401
from . import adversarial, input_baselines, jad  # noqa: F401
from . import apd  # noqa: F401
from . import ddid  # noqa: F401
from . import sadstrm  # noqa: F401
