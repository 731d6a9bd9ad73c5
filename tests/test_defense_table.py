"""benchmarks/defense_table.py on a real-shaped store: re-ranked numbers appear in brackets when
the cells have them, and no bracket of dashes stands in for them when the run skipped them."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from conftest import cell_record

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "defense_table.py"


def _table(root: Path, **fields) -> str:
    path = root / "v2" / "synthetic" / "m-none" / "m-ifgsm-eps5.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(cell_record(**fields).to_json()))
    done = subprocess.run([sys.executable, str(SCRIPT), str(root), "m-ifgsm"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    return next(line for line in done.stdout.splitlines() if line.startswith("| m-none"))


def test_reranked_numbers_in_brackets(tmp_path):
    row = _table(tmp_path)
    assert "15.0 / 30.0 (20.0 / 25.0)" in row


def test_run_without_reranking_has_no_bracket(tmp_path):
    row = _table(tmp_path, clean_reranked={}, attacked_reranked={})
    assert "| 15.0 / 30.0 |" in row and "(" not in row
