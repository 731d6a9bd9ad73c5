"""reidbench: adversarial robustness benchmark for person re-identification.

The engine lives here (data, models, training loop, metrics, protocol, zoo, runner,
results, leaderboard, CLI); the catalogs of attacks and defenses live in the top-level
packages ``attacks`` and ``defenses``.
"""

from .version import __version__

__all__ = ["benchmark", "__version__"]


def __getattr__(name: str):
    # Lazy: `import reidbench` stays cheap (no torch) for the CLI's start and for tools.
    if name == "benchmark":
        from .api import benchmark

        return benchmark
    raise AttributeError(f"module 'reidbench' has no attribute '{name}'")
