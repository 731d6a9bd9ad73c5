"""The engine's version, in a module of its own: the runner and the hub record it, and
``import reidbench`` re-exports it, without either reaching back into the package's
``__init__`` (which lazily imports the Python API, and so the runner)."""

__version__ = "0.1.0"
