"""The budget sweep lives in the package now (``reidbench sweep``, reidbench/sweep.py); this
script stays so that the commands recorded in earlier findings
(``python benchmarks/attack_budget.py ...``) still run. It takes the same arguments."""

import sys

from reidbench.cli import main

if __name__ == "__main__":
    sys.exit(main(["sweep", *sys.argv[1:]]))
