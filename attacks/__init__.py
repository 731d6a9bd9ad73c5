"""The catalog of attacks. Importing this package registers every attack in
``reidbench.registry.ATTACKS``; add a module here and import it below to add one."""

from . import metric_fgsm  # noqa: F401
from . import bouniot, lta, odfa  # noqa: F401
from . import adaptive, query_based, transfer  # noqa: F401
from . import dmr, uap  # noqa: F401
