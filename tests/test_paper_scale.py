"""The GPU paper-scale script, run on the CPU at toy size so it works the first time a GPU is
there: its records are ordinary cells the leaderboard renders, its table names the hardware."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu" / "paper_scale.sh"


@pytest.mark.slow
def test_toy_run_writes_records_the_leaderboard_renders(tmp_path):
    from conftest import random_mobilenet_trunk
    from reidbench.leaderboard import render_site

    weights = tmp_path / "mnv2.safetensors"
    sha = random_mobilenet_trunk(weights)
    out = tmp_path / "out"
    env = dict(os.environ, DEVICE="cpu", REIDBENCH_CACHE=str(tmp_path / "cache"))
    done = subprocess.run(
        ["bash", str(SCRIPT), str(out), "300", "--toy", "--size", "64", "32", "--pretrained-file", str(weights),
         "--pretrained-sha256", sha], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    records = [json.loads(p.read_text()) for p in (out / "results").rglob("*.json")]
    baseline = "mobilenetv2_100-toy-paper-none"
    assert any(r["model"]["id"] == baseline for r in records), done.stdout[-2000:]
    timings = json.loads((out / "timings.json").read_text())
    assert timings["hardware"]["device"] == "cpu" and timings["elapsed_s"] <= 300 + 60
    table = (out / "paper_scale.md").read_text()
    assert "Hardware: device cpu" in table and baseline in table
    index = render_site(out / "results", tmp_path / "site")
    assert baseline in index.read_text() or any(baseline in p.name for p in (tmp_path / "site").rglob("*.html"))


def test_table_of_an_empty_run_is_written(tmp_path):
    """An interrupted run before any cell still gets a table (the shell wrapper always writes it)."""
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu" / "paper_scale.py"), "table", "--out",
                           str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "Paper scale on one GPU" in (tmp_path / "paper_scale.md").read_text()
