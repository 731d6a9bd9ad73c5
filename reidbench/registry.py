"""Name -> factory registries, the one place where catalogs are looked up.

Modules in ``attacks/`` and ``defenses/`` (and the dataset builders) register themselves
with a decorator; the engine only ever asks a registry for a name.
"""

from __future__ import annotations

import importlib
from typing import Callable, Generic, Iterator, TypeVar

from .errors import unknown_name

T = TypeVar("T")


class Registry(Generic[T]):
    """A catalog of named factories (classes or functions).

    ``populate`` names the modules whose import fills the registry, so that a lookup
    works without the caller having imported the catalog first.
    """

    def __init__(self, kind: str, populate: tuple[str, ...] = ()):
        self.kind = kind
        self._entries: dict[str, T] = {}
        self._populate = populate
        self._populated = False

    def register(self, name: str) -> Callable[[T], T]:
        def decorator(obj: T) -> T:
            if name in self._entries and self._entries[name] is not obj:
                raise ValueError(f"{self.kind} '{name}' is registered twice")
            self._entries[name] = obj
            try:
                obj.registry_name = name  # type: ignore[attr-defined]
            except (AttributeError, TypeError):
                pass
            return obj

        return decorator

    def _ensure_populated(self) -> None:
        if not self._populated:
            self._populated = True
            for module in self._populate:
                importlib.import_module(module)

    def get(self, name: str) -> T:
        self._ensure_populated()
        if name not in self._entries:
            raise unknown_name(self.kind, name, self._entries)
        return self._entries[name]

    def names(self) -> list[str]:
        self._ensure_populated()
        return sorted(self._entries)

    def __contains__(self, name: str) -> bool:
        self._ensure_populated()
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())


def import_catalog(package: str, path) -> None:
    """Import every module of a catalog package (``attacks``, ``defenses``), so that a new
    module registers itself without a line in any shared file: contributions do not collide."""
    import pkgutil

    for module in pkgutil.iter_modules(path):
        importlib.import_module(f"{package}.{module.name}")


DATASETS: Registry = Registry("dataset", populate=("reidbench.data",))
ATTACKS: Registry = Registry("attack", populate=("attacks",))
DEFENSES: Registry = Registry("defense", populate=("defenses",))
# ReIDModel variants a defense trains and deploys (``model: {head: NAME}`` in a zoo entry).
MODEL_HEADS: Registry = Registry("model head", populate=("defenses",))
