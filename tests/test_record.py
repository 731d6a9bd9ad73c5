"""The cell record: stored records read and write back to the same bytes; a record of another
schema or a malformed one is one line naming its file."""

import json
from pathlib import Path

import pytest

from conftest import cell_record
from reidbench.errors import ReIDBenchError
from reidbench.record import CellRecord
from reidbench.results import read_cell, write_cell

REPO = Path(__file__).resolve().parents[1]


def _text(record: CellRecord) -> str:
    return json.dumps(record.to_json(), indent=2, sort_keys=True, allow_nan=False) + "\n"


def test_committed_records_write_back_byte_identical():
    paths = sorted((REPO / "benchmarks" / "results").rglob("v*/*/*/*.json"))
    assert paths
    for path in paths:
        assert _text(CellRecord.from_json(json.loads(path.read_text()), source=path)) == path.read_text(), path


def test_a_written_record_reads_back_equal(tmp_path):
    record = cell_record(example={"query_index": 3}, surrogate={"id": "s", "weights_sha256": "cd" * 32},
                         reported={"source": "Doe 2024", "attacked": {"mAP": 0.4}})
    write_cell(tmp_path / "cell.json", record)
    assert read_cell(tmp_path / "cell.json") == record


@pytest.mark.parametrize("change, reason", [
    ({"schema": 2}, "schema 2; this reidbench reads schema 1"),
    ({"model": {"backbone": "resnet18"}}, "model.id must be a string"),
    ({"attacked": None}, "needs both 'clean' and 'attacked' numbers"),
    ({"sanity_flags": "none"}, "sanity_flags must be a list"),
    ({"reported": {"source": " "}, "clean": None, "attacked": None}, "'reported' needs a non-empty 'source'"),
])
def test_a_record_of_another_schema_or_malformed_is_one_line_naming_the_file(change, reason):
    data = {**cell_record().to_json(), **change}
    data = {key: value for key, value in data.items() if value is not None}
    with pytest.raises(ReIDBenchError) as info:
        CellRecord.from_json(data, source="results/v2/synthetic/m/m-ifgsm-eps5.json")
    message = str(info.value)
    assert "\n" not in message and message.startswith("results/v2/synthetic/m/m-ifgsm-eps5.json: ")
    assert reason in message


def test_read_cell_skips_another_schema_with_one_warning(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("REIDBENCH_QUIET", "0")
    path = tmp_path / "cell.json"
    path.write_text(json.dumps({**cell_record().to_json(), "schema": 7}))
    assert read_cell(path) is None
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1 and "cell.json" in lines[0] and "schema 7" in lines[0]
