"""The catalog of attacks. Importing this package registers every attack in
``reidbench.registry.ATTACKS``; to add one, add a module here (it is imported below)."""

from . import metric_fgsm  # noqa: F401
from . import bouniot, lta, odfa  # noqa: F401
from . import adaptive, query_based, transfer  # noqa: F401
from . import dmr, uap  # noqa: F401

# Any other module of this package registers itself too: a new attack is one new file.
from reidbench.registry import import_catalog  # noqa: E402

import_catalog(__name__, __path__)
