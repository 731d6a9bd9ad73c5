"""benchmarks/compare_runs.py, the check that a change moved no number: it must see a moved
metric, a missing cell and changed weights, and must not count provenance as a difference."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

from conftest import cell_record

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "compare_runs.py"


def _run(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *map(str, args)], capture_output=True, text=True)


def _store(root: Path, **records) -> Path:
    for name, record in records.items():
        path = root / "v2" / "synthetic" / "m-none" / f"{name}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(record.to_json()))
    return root


def _weights(cache: Path, value: float) -> Path:
    path = cache / "weights" / "m-none-abc" / "model.safetensors"
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({"w": torch.full((2, 2), value)}, str(path))
    return cache


def test_provenance_is_not_a_difference(tmp_path):
    a = _store(tmp_path / "a", cell=cell_record(wall_time_s=1.0))
    b = _store(tmp_path / "b", cell=cell_record(wall_time_s=9.0))
    done = _run(a, b, "--caches", _weights(tmp_path / "ca", 1.0), _weights(tmp_path / "cb", 1.0))
    assert done.returncode == 0 and "identical" in done.stdout, done.stdout + done.stderr


def test_a_moved_metric_a_missing_cell_and_other_weights_are_reported(tmp_path):
    moved = cell_record(attacked={"rank1": 0.16, "rank5": 0.5, "rank10": 0.6, "mAP": 0.3, "mINP": 0.1})
    a = _store(tmp_path / "a", cell=cell_record(), extra=cell_record())
    b = _store(tmp_path / "b", cell=moved)
    done = _run(a, b, "--caches", _weights(tmp_path / "ca", 1.0), _weights(tmp_path / "cb", 2.0))
    assert done.returncode == 1
    assert "cell.json: attacked differs" in done.stdout
    assert "only in" in done.stdout and "extra.json" in done.stdout
    assert "weights differ: m-none-abc" in done.stdout
