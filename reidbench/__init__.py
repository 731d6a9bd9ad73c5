"""reidbench: adversarial robustness benchmark for person re-identification.

The engine lives here (data, models, training loop, metrics, protocol, zoo, runner,
results, leaderboard, CLI); the catalogs of attacks and defenses live in the top-level
packages ``attacks`` and ``defenses``.
"""

__version__ = "0.1.0"
