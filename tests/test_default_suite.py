"""The whole default suite, as `reidbench run --all` runs it for a newcomer (slow: the cold
run's time is in the README), in an isolated cache: every registered defense has a row with
every grid cell the protocol defines for its dataset, and the leaderboard renders them."""

import pytest

from reidbench.cli import main
from reidbench.protocol import load_protocol
from reidbench.registry import ATTACKS, DEFENSES
from reidbench.results import iter_cells
from reidbench.grid import protocol_grid, undefined_cell
from reidbench.runner import attack_id
from reidbench.zoo import DEFAULT_ZOO, load_zoo


@pytest.mark.slow
def test_run_all_covers_every_defense_and_every_grid_cell(tmp_path):
    results, site = tmp_path / "results", tmp_path / "site"
    assert main(["run", "--all", "--results", str(results), "--site", str(site), "--device", "cpu"]) == 0

    protocol = load_protocol()
    default = [entry for entry in load_zoo(DEFAULT_ZOO).values() if "default" in entry.suite]
    assert {entry.defense["name"] for entry in default} == set(DEFENSES.names())
    written = {(record.model.id, record.attack_id) for _, record in iter_cells(results, protocol.version)}
    # The protocol's whole suite (grid, secondary ε, oblivious reference), minus cells it does not define.
    expected = {(entry.id, attack_id(name, eps)) for entry, name, eps in protocol_grid(protocol, default)}
    for entry in default:
        grid = {attack_id(name, protocol.eps) for name in protocol.attacks()
                if not undefined_cell(protocol, name, entry.dataset_name)}
        assert grid <= {cell for model, cell in expected if model == entry.id}, entry.id
    missing = sorted(expected - written)
    assert not missing, f"cells missing after run --all: {missing}"
    index = (site / "index.html").read_text()
    for entry in default:
        assert entry.id in index, entry.id
    # Every grid attack is a registered one (a renamed attack would leave its column empty).
    assert set(protocol.attacks()) <= set(ATTACKS.names())
