"""The budget sweep (benchmarks/attack_budget.py): its flag rule, and a run on the tiny model
that writes the file the leaderboard reads."""

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

from reidbench.results import BUDGET_FLAG, budget_sweep_path, read_budget_sweep

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "attack_budget.py"


@pytest.fixture(scope="module")
def budget():
    spec = importlib.util.spec_from_file_location("attack_budget", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def point(rank1, half=0.05):
    return {"rank1": rank1, "interval": [rank1 - half, rank1 + half]}


def test_the_flag_needs_a_drop_beyond_the_interval_at_the_protocol_budget(budget):
    converged = budget.assess({15: point(0.30), 100: point(0.28), 500: point(0.27)}, 15)
    assert not converged["flag"] and not converged["still_falling"]
    masked = budget.assess({15: point(0.60), 100: point(0.40), 500: point(0.20)}, 15)
    assert masked["flag"] and masked["still_falling"] and masked["drop"] == pytest.approx(0.40)
    settled_late = budget.assess({15: point(0.60), 100: point(0.30), 500: point(0.29)}, 15)
    assert settled_late["flag"] and not settled_late["still_falling"]


def test_the_local_interval_resamples_identities(budget):
    pids = np.repeat(np.arange(20), 3)
    first_hit = np.where(pids < 10, 0, 4)  # half the identities at Rank-1
    lo, hi = budget.rank1_interval(first_hit, pids)
    assert lo < 0.5 < hi and hi - lo > 0.1
    assert budget.rank1_interval(first_hit, pids) == [lo, hi]  # seeded
    assert budget.rank1_interval(np.zeros(6, dtype=int), np.arange(6)) == [1.0, 1.0]


def test_a_sweep_on_the_tiny_model_writes_what_the_leaderboard_reads(budget, tiny_model, tiny_zoo_file, tmp_path, capsys):
    results = tmp_path / "results"
    budget.main(["tiny-none", "--attack", "m-ifgsm", "--iterations", "1", "4", "--protocol", "v1",
                 "--results", str(results), "--zoo", str(tiny_zoo_file), "--device", "cpu"])
    out = capsys.readouterr().out
    assert "| tiny-none | m-ifgsm |" in out
    found = read_budget_sweep(results, "v1")
    entry = found["tiny-none"]
    assert set(entry["points"]) == {"1", "4"} and isinstance(entry["flag"], bool)
    assert entry["points"]["4"]["rank1"] <= entry["points"]["1"]["rank1"]
    assert entry["flag_name"] in (BUDGET_FLAG, None) and entry["command"].startswith("python benchmarks/attack_budget.py")
    payload = json.loads(budget_sweep_path(results, "v1").read_text())
    assert payload["protocol"]["version"] == "v1"
    assert read_budget_sweep(results, "v2") == {}


def test_an_attack_without_iterations_is_refused(budget, tiny_model, tiny_zoo_file, tmp_path):
    with pytest.raises(SystemExit, match="no iteration count"):
        budget.main(["tiny-none", "--attack", "m-fgsm", "--iterations", "1", "2", "--protocol", "v1",
                     "--results", str(tmp_path), "--zoo", str(tiny_zoo_file), "--device", "cpu"])
