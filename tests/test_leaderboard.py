import base64
import csv
import importlib.util
import io
import json
import re
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from reidbench.checks import worst_case
from reidbench.leaderboard import page_name, render_site, results_table
from reidbench.metrics import identity_spread
from reidbench.record import CellRecord
from conftest import cell_record, zoo_with_borrower
from reidbench.results import cell_path, write_cell

REPO = Path(__file__).resolve().parents[1]
NUM_QUERY = 12
QUERY_PIDS = np.repeat(np.arange(4), 3).astype(np.int64)
TINY_PNG = base64.b64encode(bytes.fromhex(
    "89504e470d0a1a0a0000000d4948445200000001000000010806000000"
    "1f15c4890000000d49444154789c6360f8cfc0f01f0005ff02fea7d5b8"
    "c80000000049454e44ae426082")).decode()


def _outcomes(seed: int, clean_hit=None) -> dict:
    rng = np.random.default_rng(seed)
    clean = np.zeros(NUM_QUERY, dtype=np.int32) if clean_hit is None else clean_hit
    return {"clean_ap": np.ones(NUM_QUERY, dtype=np.float32), "clean_first_hit": clean,
            "attacked_ap": rng.uniform(0.1, 1.0, NUM_QUERY).astype(np.float32),
            "attacked_first_hit": rng.integers(0, 3, NUM_QUERY).astype(np.int32), "query_pids": QUERY_PIDS}


def _record(model="m-none", attack="m-ifgsm", threat="white-box", eps255=5, perturbed="query", mAP=0.3,
            defense="none", **extra) -> CellRecord:
    record = cell_record(**{
        "attack_id": f"{attack}-eps{eps255}", "threat_model": threat, "perturbed": perturbed,
        "dataset": {"name": "synthetic", "split_hash": "s1", "num_query": NUM_QUERY},
        "attack": {"name": attack, "eps": eps255 / 255},
        "attacked": {"rank1": mAP / 2, "rank5": 0.5, "rank10": 0.6, "mAP": mAP, "mINP": 0.1},
        "perturbation": {"eps": eps255 / 255, "linf_max": eps255 / 255, "l2_mean": 1.0}, **extra})
    return replace(record, model=replace(record.model, id=model, defense={"name": defense}))


def _write(root: Path, record: dict, seed: int = 0, per_query=True) -> Path:
    path = cell_path(root, "v2", record.dataset.name, record.model.id, record.attack_id)
    write_cell(path, record, _outcomes(seed) if per_query else None)
    return path


def _example() -> dict:
    return {"query_index": 3, "query_pid": 1, "query_camid": 0, "thumbnail_size": [64, 32],
            "clean": {"gallery_index": list(range(10)), "match": [True, True] + [False] * 8},
            "attacked": {"gallery_index": list(range(10, 20)), "match": [False] * 9 + [True]},
            "thumbnails": {"query": TINY_PNG, "query_attacked": TINY_PNG,
                           "gallery": {str(g): TINY_PNG for g in (0, 10, 1, 11)}}}


@pytest.fixture
def results(tmp_path):
    root = tmp_path / "results"
    _write(root, _record(mAP=0.30, example=_example()), seed=1)
    _write(root, _record(attack="sma", mAP=0.20), seed=2)
    _write(root, _record(attack="sma", eps255=8, mAP=0.05), seed=3)
    _write(root, _record(attack="transfer", threat="transfer", mAP=0.6), seed=4)
    _write(root, _record(attack="eot", mAP=0.25), seed=5)  # a variant outside the protocol grid
    _write(root, _record(attack="m-ifgsm-gallery", perturbed="gallery", mAP=0.4), seed=6)
    _write(root, _record(model="m-at", defense="at", mAP=0.5, example=_example()), seed=7)
    _write(root, _record(model="m-at", attack="sma", mAP=0.45), seed=8)
    return root


def _tree(folder: Path) -> dict:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_render_is_a_pure_function_of_the_results(results, tmp_path):
    render_site(results, tmp_path / "a")
    render_site(results, tmp_path / "b")
    first, second = _tree(tmp_path / "a"), _tree(tmp_path / "b")
    assert first == second
    assert {"index.html", "cells.csv", "cells.json", "assets/site.js", "assets/site.css",
            "models/m-none.html", "models/m-at.html"} <= set(first)
    # Re-rendering into the same folder after a model is gone removes its page.
    for path in (results / "v2/synthetic/m-at").iterdir():
        path.unlink()
    render_site(results, tmp_path / "a")
    assert not (tmp_path / "a/models/m-at.html").exists()
    index = (tmp_path / "a/index.html").read_text()
    assert "https://" not in index and "http://" not in index  # no CDN: opens from file:// offline


def test_index_tables_per_threat_model_with_worst_case_and_variants(results, tmp_path):
    index = render_site(results, tmp_path / "site").read_text()
    tables = tmp_path / "site/tables"
    names = sorted(p.name for p in tables.glob("*.json"))
    assert names == ["synthetic-eps5-summary.json", "synthetic-eps5-transfer.json", "synthetic-eps5-white-box-gallery-perturbed.json",
                     "synthetic-eps5-white-box.json", "synthetic-eps8-summary.json", "synthetic-eps8-white-box.json"]
    for name in names:  # every table is linked from the page, as CSV and JSON
        assert f'href="tables/{name}"' in index and f'href="tables/{name[:-5]}.csv"' in index

    cells = results_table(results)
    none5 = cells[(cells["model"] == "m-none") & ((cells["eps"] * 255 - 5).abs() < 1e-6)]
    white = json.loads((tables / "synthetic-eps5-white-box.json").read_text())
    row = next(r for r in white["rows"] if r["model"] == "m-none")
    expected = worst_case(none5[none5["threat_model"] == "white-box"])
    assert expected["attacks"] == 3  # m-ifgsm, sma, eot; the gallery attack has its own table
    assert row["worst.mAP"] == pytest.approx(expected["mAP"], abs=1e-6)
    assert row["worst.rank1"] == pytest.approx(expected["rank1"], abs=1e-6)
    assert row["sma-eps5.mAP"] == pytest.approx(0.20) and row["clean.rank1"] == pytest.approx(0.9)
    assert row["var.worst"] == pytest.approx(expected["identity_var"], abs=1e-6)

    summary = json.loads((tables / "synthetic-eps5-summary.json").read_text())
    top = summary["rows"][0]
    assert top["model"] == "m-at"  # most robust first
    none = next(r for r in summary["rows"] if r["model"] == "m-none")
    assert none["standardized.attacks"] == 3 and none["adaptive.attacks"] == 4  # eot is outside the grid
    assert none["adaptive.mAP"] <= none["standardized.mAP"]
    assert top.get("adaptive.mAP") is None  # no variant was run on m-at
    groups = {c["group"] for c in summary["columns"]}
    assert {"standardized", "adaptive"} <= groups and "reported" not in groups

    with open(tables / "synthetic-eps5-white-box.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert [r["model"] for r in rows] == [r["model"] for r in white["rows"]]
    assert float(next(r for r in rows if r["model"] == "m-none")["sma-eps5.mAP"]) == pytest.approx(0.2)


def test_identity_variance_of_old_records_comes_from_their_outcomes(results):
    cells = results_table(results)
    row = cells[(cells["model"] == "m-none") & (cells["attack"] == "sma-eps5")].iloc[0]
    outcomes = _outcomes(2)
    expected = identity_spread(torch.from_numpy(outcomes["attacked_first_hit"].astype(np.int64)), torch.from_numpy(QUERY_PIDS))
    assert row["var"] == pytest.approx(expected["rank1_var"])
    assert row["clean_var"] == pytest.approx(0.0)  # every clean query hits


def test_html_in_model_id_and_footnote_renders_as_text_and_file_names_are_safe(tmp_path):
    evil = '<script>alert(1)</script>/../x'
    record = _record(model=evil, reported={"source": "<b>paper</b>", "url": "javascript:alert(3)",
                                           "footnote": "<img src=x onerror=alert(2)>",
                                           "clean": {"rank1": 0.95, "mAP": 0.9}, "attacked": {"rank1": 0.5, "mAP": 0.4}})
    root = tmp_path / "results"
    folder = root / "v2/synthetic/evil"
    folder.mkdir(parents=True)
    write_cell(folder / "m-ifgsm-eps5.json", record, _outcomes(0))
    site = tmp_path / "site"
    index = render_site(root, site).read_text()
    pages = sorted((site / "models").glob("*.html"))
    assert [p.name for p in pages] == [f"{page_name(evil)}.html"]
    assert re.fullmatch(r"[A-Za-z0-9._-]+\.html", pages[0].name) and pages[0].parent == site / "models"
    for html in (index, pages[0].read_text()):
        assert "<script>alert" not in html and "<img src=x" not in html and "<b>paper" not in html
        assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html
        assert "javascript:" not in html  # only http(s) sources become links
    assert "&lt;img src=x onerror=alert(2)&gt;" in index
    assert f'href="models/{pages[0].name}"' in index


def test_reported_numbers_have_their_own_columns_and_never_enter_a_worst_case(results, tmp_path):
    claim = _record(model="m-paper", mAP=0.0, reported={"source": "Doe 2024, Table 3", "url": "https://example.org/p",
                                                        "clean": {"rank1": 0.95, "mAP": 0.9},
                                                        "attacked": {"rank1": 0.7, "mAP": 0.6}},
                    clean=None, attacked=None, clean_reranked=None, attacked_reranked=None)
    _write(results, claim, per_query=False)
    index = render_site(results, tmp_path / "site").read_text()
    summary = json.loads((tmp_path / "site/tables/synthetic-eps5-summary.json").read_text())
    assert "reported" in {c["group"] for c in summary["columns"]}
    paper = next(r for r in summary["rows"] if r["model"] == "m-paper")
    assert paper["reported.robust.mAP"] == pytest.approx(0.6) and paper["reported.clean.rank1"] == pytest.approx(0.95)
    assert paper["standardized.mAP"] is None and paper["clean.rank1"] is None
    none = next(r for r in summary["rows"] if r["model"] == "m-none")
    assert none.get("reported.source") is None
    assert 'href="https://example.org/p"' in index and "Doe 2024, Table 3" in index


def test_malformed_results_are_reported_once_each_and_skipped(results, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("REIDBENCH_QUIET", "0")
    folder = results / "v2/synthetic/m-none"
    (folder / "broken.json").write_text("{not json")
    _write(results, _record(model="bad-number", attacked={"rank1": "high", "mAP": 0.1}))
    _write(results, _record(model="bad-claim", reported={"source": "x", "attacked": {"mAP": 1.5}}))
    capsys.readouterr()
    index = render_site(results, tmp_path / "site").read_text()
    lines = [line for line in capsys.readouterr().err.splitlines() if "warning" in line]
    assert len(lines) == 3, lines
    assert any("broken.json" in line for line in lines)
    assert any("bad-number" in line for line in lines) and any("bad-claim" in line for line in lines)
    assert "m-none" in index and "bad-number" not in index and "bad-claim" not in index


def test_model_page_has_every_cell_a_robustness_plot_an_example_and_provenance(results, tmp_path):
    render_site(results, tmp_path / "site")
    page = (tmp_path / "site/models/m-none.html").read_text()
    assert page.count('<svg xmlns="http://www.w3.org/2000/svg" class="plot"') == 2  # mAP and Rank-1 against ε
    assert page.count("<polyline") == 2  # sma was run at two ε: joined; single-ε attacks are points
    assert page.count('<circle') == 2 * 6  # m-ifgsm, sma ×2, transfer, eot, gallery attack
    assert page.count('class="hit"') == 3 and page.count('class="miss"') == 17  # clean 2 hits, attacked 1 hit
    assert page.count(f"data:image/png;base64,{TINY_PNG}") == 2 + 4  # both queries, 4 gallery thumbnails
    assert "#12" in page  # a ranked image without thumbnail shows its index
    assert "ab" * 32 in page and "abc1234" in page and "&#34;epochs&#34;: 30" in page
    table = json.loads((tmp_path / "site/models/m-none.json").read_text())
    assert len(table["rows"]) == 6
    row = next(r for r in table["rows"] if r["attack"] == "m-ifgsm-eps5")
    assert row["attacked_reranked.mAP"] == pytest.approx(0.25) and row["clean.mAP"] == pytest.approx(0.8)
    assert 'href="m-none.csv"' in page and 'href="m-none.json"' in page
    # a thumbnail that is not base64 never reaches the page
    record = json.loads((results / "v2/synthetic/m-none/m-ifgsm-eps5.json").read_text())
    record["example"]["thumbnails"]["query"] = '" onerror="alert(1)'
    (results / "v2/synthetic/m-none/m-ifgsm-eps5.json").write_text(json.dumps(record))
    render_site(results, tmp_path / "site")
    assert "onerror" not in (tmp_path / "site/models/m-none.html").read_text()


def test_model_page_names_the_cpu_kernels_only_where_records_carry_them(results, tmp_path):
    from reidbench.leaderboard.model_page import provenance

    records = [CellRecord.from_json(json.loads(p.read_text()), p) for p in sorted(results.glob("v2/synthetic/m-none/*.json"))]
    assert "CPU kernels" not in dict(provenance(records))  # records written before it was kept render as before
    kernels = [replace(r, environment={**(r.environment or {}), "cpu_capability": k})
               for r, k in zip(records[:2], ("AVX2", "AVX512"))]
    assert dict(provenance(kernels))["CPU kernels"] == "AVX2 (1 cells); AVX512 (1 cells)"


def test_runner_records_a_compact_example(tiny_zoo_file, tiny_model, tmp_path):
    from PIL import Image

    from reidbench.protocol import Protocol, load_protocol
    from reidbench.results import read_per_query
    from reidbench.runner import Runner
    from reidbench.zoo import load_zoo

    zoo = load_zoo(tiny_zoo_file)
    raw = load_protocol().raw  # two iterations are enough to check what is recorded
    protocol = Protocol("v2", {**raw, "perturbation": {**raw["perturbation"], "iterations": 2}})
    runner = Runner(zoo, results_root=tmp_path / "results", protocol=protocol, device="cpu", train_missing=False,
                    rerank=False, progress=False)
    paths = runner.run([zoo["tiny-none"]], ["m-fgsm", "m-ifgsm-gallery"])
    records = [json.loads(p.read_text()) for p in paths]
    query = {r["example"]["query_index"] for r in records}
    assert len(query) == 1  # the protocol seed picks one query for every cell of a model
    example = records[0]["example"]
    per_query = read_per_query(paths[0])
    index = example["query_index"]
    assert per_query["clean_first_hit"][index] >= 0  # a query the metrics score
    for label in ("clean", "attacked"):
        ranking = example[label]
        assert len(ranking["gallery_index"]) == len(ranking["match"]) == 10
        hit = per_query[f"{label}_first_hit"][index]
        assert (ranking["match"].index(True) if True in ranking["match"] else 10) == min(hit, 10)
    thumbs = example["thumbnails"]
    assert len(thumbs["gallery"]) <= 10 and set(thumbs) == {"query", "query_attacked", "gallery"}
    images = [thumbs["query"], thumbs["query_attacked"], *thumbs["gallery"].values()]
    decoded = [np.asarray(Image.open(io.BytesIO(base64.b64decode(b)))) for b in images]
    assert all(d.shape == (64, 32, 3) for d in decoded)
    difference = np.abs(decoded[0].astype(int) - decoded[1].astype(int)).max()
    assert 0 < difference <= 5 + 1  # the attacked query, within ε = 5/255 (rounding)
    # at most 12 thumbnails of 64×32 pixels: the block stays below their raw size in base64
    assert len(json.dumps(example)) < 12 * 64 * 32 * 3 * 4 // 3 + 2_000
    assert "query_attacked" not in records[1]["example"]["thumbnails"]  # the gallery attack leaves the query clean


def test_browser_sorts_a_column_and_follows_a_model_link(results, tmp_path):
    """Headless Chromium through Qt WebEngine (``pip install reidbench[browser]``)."""
    try:
        found = importlib.util.find_spec("PySide6.QtWebEngineWidgets") is not None
    except ImportError:
        found = False
    if not found:
        pytest.skip("no headless Chromium: install the 'browser' extra (PySide6 Qt WebEngine)")
    render_site(results, tmp_path / "site")
    screenshot = tmp_path / "model-page.png"
    run = subprocess.run([sys.executable, str(REPO / "tests/browser_check.py"), str(tmp_path / "site"), str(screenshot)],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    report = json.loads(run.stdout.strip().splitlines()[-1])
    values = [float(v) for v in report["index"]["ascending"]]
    assert len(values) > 1 and values == sorted(values)
    assert [float(v) for v in report["index"]["descending"]] == sorted(values, reverse=True)
    assert report["index"]["aria"] == "descending"
    assert report["url"].startswith("file://") and report["url"].endswith("/site/" + report["index"]["link"])
    assert report["model"]["svgs"] == 2 and report["model"]["hits"] + report["model"]["misses"] == 20
    assert report["screenshot"] and screenshot.stat().st_size > 10_000
    print(f"screenshot: {screenshot}")


# --- protocol v2: intervals, consistent worst cases, versions apart -------------------------------
def test_every_number_carries_its_interval(results, tmp_path):
    from reidbench.metrics import metric_intervals, rank1_variance_interval

    index = render_site(results, tmp_path / "site").read_text()
    cells = results_table(results)
    cell = cells[(cells["model"] == "m-none") & (cells["attack"] == "sma-eps5")].iloc[0]
    # These records predate stored intervals: they come from the per-query file, seeded.
    outcomes = _outcomes(2)
    expected = metric_intervals(outcomes["attacked_first_hit"], QUERY_PIDS, outcomes["attacked_ap"])
    assert (cell["rank1_lo"], cell["rank1_hi"]) == pytest.approx(tuple(expected["rank1"]))
    assert (cell["mAP_lo"], cell["mAP_hi"]) == pytest.approx(tuple(expected["mAP"]))
    assert (cell["var_lo"], cell["var_hi"]) == pytest.approx(
        tuple(rank1_variance_interval(outcomes["attacked_first_hit"], QUERY_PIDS)))
    assert np.isnan(cell["mINP_lo"]) and np.isnan(cell["rr_rank1_lo"])  # not in an old per-query file

    white = json.loads((tmp_path / "site/tables/synthetic-eps5-white-box.json").read_text())
    keys = [c["key"] for c in white["columns"]]
    assert keys[keys.index("worst.mAP"):keys.index("worst.mAP") + 3] == ["worst.mAP", "worst.mAP.lo", "worst.mAP.hi"]
    for row in white["rows"]:  # (the fixture's summary numbers are not its per-query files')
        for key in ("worst.rank1", "worst.mAP", "var.worst"):
            assert row[f"{key}.lo"] <= row[key] + 1e-6 and row[key] <= row[f"{key}.hi"] + 1e-6, (row["model"], key)
    none = next(r for r in white["rows"] if r["model"] == "m-none")
    assert (none["sma-eps5.mAP.lo"], none["sma-eps5.mAP.hi"]) == pytest.approx((cell["mAP_lo"], cell["mAP_hi"]), abs=1e-6)
    assert none["clean.rank1.lo"] == none["clean.rank1.hi"] == 1.0  # every clean query of the files hits
    half = 100 * (none["worst.mAP.hi"] - none["worst.mAP.lo"]) / 2
    assert f"{100 * none['worst.mAP']:.1f} ± {half:.1f}" in index
    with open(tmp_path / "site/tables/synthetic-eps5-summary.csv", newline="") as fh:
        header = next(csv.reader(fh))
    assert {"standardized.mAP.lo", "standardized.mAP.hi", "var.worst.lo"} <= set(header)


def test_stored_intervals_are_used_and_checked(tmp_path):
    root = tmp_path / "results"
    attacked = {"rank1": 0.15, "rank5": 0.5, "rank10": 0.6, "mAP": 0.3, "mINP": 0.1,
                "ci95": {"rank1": [0.05, 0.25], "mAP": [0.2, 0.4], "mINP": [0.05, 0.2]},
                "per_identity": {"rank1_var": 100.0, "rank1_var_ci95": [50.0, 300.0]}}
    _write(root, _record(attacked=attacked))
    cell = results_table(root).iloc[0]
    assert (cell["mINP_lo"], cell["mINP_hi"], cell["var_lo"], cell["var_hi"]) == (0.05, 0.2, 50.0, 300.0)
    _write(root, _record(model="bad-interval", attacked={**attacked, "ci95": {"mAP": [0.4, 0.2]}}))
    assert list(results_table(root)["model"]) == ["m-none"]  # a reversed interval is a malformed record


def _weights(record: CellRecord, sha: str) -> CellRecord:
    return replace(record, model=replace(record.model, weights_sha256=sha))


def test_worst_case_refuses_mixed_weights(tmp_path):
    root = tmp_path / "results"
    _write(root, _weights(_record(attack="m-ifgsm"), "aa" * 32), seed=1)
    _write(root, _weights(_record(attack="sma"), "bb" * 32), seed=2)
    cells = results_table(root)
    worst = worst_case(cells)
    assert worst["rank1"] is None and worst["mAP"] is None  # one cell each: no telling which is current
    assert worst["stale"] == ["m-ifgsm-eps5", "sma-eps5"]

    # With a third cell on the new weights, the two of them make the worst case; the old one
    # is listed, and the numbers are exactly those of the two consistent cells.
    _write(root, _weights(_record(attack="fna"), "bb" * 32), seed=3)
    cells = results_table(root)
    worst = worst_case(cells)
    assert worst["stale"] == ["m-ifgsm-eps5"] and worst["attacks"] == 2
    current = worst_case(cells[cells["attack"] != "m-ifgsm-eps5"])
    assert worst["mAP"] == current["mAP"] and worst["rank1"] == current["rank1"]
    a, b = _outcomes(2), _outcomes(3)
    assert worst["mAP"] == pytest.approx(np.minimum(a["attacked_ap"], b["attacked_ap"]).mean())
    render_site(root, tmp_path / "site")
    summary = json.loads((tmp_path / "site/tables/synthetic-eps5-summary.json").read_text())
    assert "stale cells, left out of the worst case" in summary["rows"][0]["flags"]
    assert "m-ifgsm-eps5" in summary["rows"][0]["flags"]

    # Another split or another protocol fingerprint is stale in the same way.
    for changed in ({"dataset": {"name": "synthetic", "split_hash": "s2", "num_query": NUM_QUERY}},
                    {"protocol": {"version": "v2", "fingerprint": "other"}}):
        folder = tmp_path / f"r-{len(changed)}-{list(changed)[0]}"
        _write(folder, _record(attack="sma"), seed=2)
        _write(folder, _record(attack="fna"), seed=3)
        _write(folder, _record(attack="m-ifgsm", **changed), seed=1)
        assert worst_case(results_table(folder))["stale"] == ["m-ifgsm-eps5"]


def test_black_box_beating_white_box_on_rank1_alone_is_flagged(tmp_path):
    from reidbench.checks import cross_cell_flags

    root = tmp_path / "results"
    white = {"rank1": 0.4, "rank5": 0.5, "rank10": 0.6, "mAP": 0.3, "mINP": 0.1}
    _write(root, _record(attack="m-ifgsm", attacked=white))
    _write(root, _record(attack="transfer", threat="transfer", attacked={**white, "rank1": 0.2, "mAP": 0.35}))
    assert cross_cell_flags(results_table(root)) == ["black-box-beats-white-box (Rank-1)"]
    _write(root, _record(attack="transfer", threat="transfer", attacked={**white, "rank1": 0.45, "mAP": 0.35}))
    assert cross_cell_flags(results_table(root)) == []


def test_reranked_numbers_under_attack_are_labelled_non_adaptive(results, tmp_path):
    index = render_site(results, tmp_path / "site").read_text()
    page = json.loads((tmp_path / "site/models/m-none.json").read_text())
    groups = {c["key"]: c["group"] for c in page["columns"]}
    assert groups["attacked_reranked.mAP"] == "attacked, re-ranked: non-adaptive"
    assert "non-adaptive" in page["note"]
    assert "re-ranked" not in " ".join(groups[k] for k in groups if not k.startswith(("attacked_reranked", "clean_reranked")))
    for table in (tmp_path / "site/tables").glob("*.json"):  # headline and worst-case tables hold none
        assert not any("rerank" in c["key"] for c in json.loads(table.read_text())["columns"])
    assert "non-adaptive" in index
    assert not results_table(results)["rr_adaptive"].any()


def test_v1_and_v2_results_render_apart_with_a_note(results, tmp_path):
    old = _record(model="m-old", mAP=0.9, protocol={"version": "v1", "fingerprint": "f1"})
    write_cell(cell_path(results, "v1", "synthetic", "m-old", old.attack_id), old, _outcomes(9))
    site = tmp_path / "site"
    index = render_site(results, site).read_text()
    assert "m-old" not in index and "m-none" in index
    assert 'href="protocol-v1/index.html"' in index and "rendered apart" in index
    old_index = (site / "protocol-v1/index.html").read_text()
    assert "m-old" in old_index and "m-none" not in old_index
    assert "not the protocol of the main leaderboard (v2)" in old_index and 'href="../index.html"' in old_index
    assert (site / "protocol-v1/models/m-old.html").is_file() and (site / "protocol-v1/assets/site.css").is_file()
    assert "ordered by gallery index" in old_index and "ranks after it" in index
    assert not (site / "models/m-old.html").exists()
    # Once the v1 cells are gone, their pages go too.
    for path in (results / "v1/synthetic/m-old").iterdir():
        path.unlink()
    (results / "v1/synthetic/m-old").rmdir(), (results / "v1/synthetic").rmdir(), (results / "v1").rmdir()
    assert "protocol-v1" not in render_site(results, site).read_text()
    assert not (site / "protocol-v1").exists()


def test_a_version_this_package_does_not_ship_renders_apart(results, tmp_path):
    record = _record(model="m-future", protocol={"version": "v9", "fingerprint": "f9"})
    write_cell(cell_path(results, "v9", "synthetic", "m-future", record.attack_id), record, _outcomes(4))
    site = tmp_path / "site"
    assert 'href="protocol-v9/index.html"' in render_site(results, site).read_text()
    assert "does not ship protocol v9" in (site / "protocol-v9/index.html").read_text()


def test_a_budget_sensitive_model_is_flagged_in_the_summary(results, tmp_path):
    """The budget sweep's finding (reidbench sweep) reaches the summary's flags."""
    from reidbench.protocol import CURRENT_VERSION
    from reidbench.results import BUDGET_FLAG, budget_sweep_path

    from reidbench.results import iter_cells

    def measured_on(model):  # the finding of a sweep of the weights the model's cells hold
        record = next(r for _, r in iter_cells(results / CURRENT_VERSION / "synthetic" / model))
        return {"weights_sha256": record.model.weights_sha256, "protocol_fingerprint": record.protocol.fingerprint}

    path = budget_sweep_path(results, CURRENT_VERSION)
    path.parent.mkdir(parents=True)
    findings = {"m-at": {"flag": True, **measured_on("m-at")}, "m-none": {"flag": False, **measured_on("m-none")}}
    path.write_text(json.dumps({"flag": BUDGET_FLAG, "models": findings}))

    def rows():
        index = render_site(results, tmp_path / "site").read_text()
        summary = index[index.index("<table"):index.index("</table>")]  # past the picture, which links models too
        return [summary[summary.index(f"{m}.html"):].split("</tr>")[0] for m in ("m-at", "m-none")]

    at_row, none_row = rows()
    assert BUDGET_FLAG in at_row and BUDGET_FLAG not in none_row and "stale" not in at_row + none_row
    findings["m-at"]["weights_sha256"] = "0" * 64  # a retraining since the sweep: its flag is not these cells'
    path.write_text(json.dumps({"flag": BUDGET_FLAG, "models": findings}))
    at_row, _ = rows()
    assert BUDGET_FLAG not in at_row and "budget sweep stale" in at_row


def test_incomplete_models_follow_the_complete_ones_unranked(tmp_path):
    """A model with one attack must not sit above one with the whole grid (issue: `cs` with
    1 attack at worst Rank-1 50 above the baseline with 13 at 5.9)."""
    from reidbench.protocol import load_protocol

    root = tmp_path / "results"
    grid = load_protocol("v2").attacks()
    for i, attack in enumerate(grid):
        threat = "transfer" if attack in ("transfer", "dmr") else "query-based" if attack == "rank-query" else "white-box"
        _write(root, _record(model="m-full", attack=attack, threat=threat, mAP=0.2), seed=10 + i)
    _write(root, _record(model="m-one", defense="cs", mAP=0.9, attacked={"rank1": 0.9, "rank5": 1.0, "rank10": 1.0,
                                                                            "mAP": 0.9, "mINP": 0.5}), seed=99)
    render_site(root, tmp_path / "site")
    rows = json.loads((tmp_path / "site/tables/synthetic-eps5-summary.json").read_text())["rows"]
    assert [r["model"] for r in rows] == ["m-full", "m-one"]
    assert rows[0]["rank"] == 1 and rows[1]["rank"] is None
    assert f"incomplete (1 of {len(grid)} attacks)" in rows[1]["flags"]
    assert rows[1]["standardized.rank1"] > rows[0]["standardized.rank1"]  # more robust-looking, still below


def test_the_index_picture_has_one_linked_point_per_model(results, tmp_path):
    index = render_site(results, tmp_path / "site").read_text()
    picture = index[index.index('<figure class="map">'):index.index("</figure>")]
    links = re.findall(r'<a href="models/([^"]+)\.html"><g>', picture)
    assert sorted(links) == sorted(page_name(m) for m in ("m-none", "m-at"))
    assert "clean Rank-1" in picture and "worst-case Rank-1" in picture and "adversarial training" in picture


def test_the_robustness_plot_needs_two_budgets(results, tmp_path):
    render_site(results, tmp_path / "site")
    two = (tmp_path / "site/models" / f"{page_name('m-none')}.html").read_text()  # sma at 5 and 8
    one = (tmp_path / "site/models" / f"{page_name('m-at')}.html").read_text()  # m-ifgsm at 5 only
    assert "<svg" in two and "<svg" not in one


def test_a_real_run_ranks_complete_models_first_draws_one_point_each_and_plots_only_two_budgets(
        tiny_zoo_file, tiny_model, tmp_path, monkeypatch):
    """Cells of a real run: the tiny baseline under the whole grid, and the same weights under
    one attack of it (as after `run --model X --attack m-fgsm`). The grid is narrowed to two
    cheap attacks so that the test takes seconds; over fewer attacks the copy's worst case can
    only look more robust, yet it follows the complete model, unranked and marked."""
    from reidbench.protocol import Protocol, load_protocol
    from reidbench.runner import Runner
    from reidbench.zoo import load_zoo

    zoo = load_zoo(zoo_with_borrower(tiny_zoo_file, tmp_path / "zoo.yaml", "tiny-copy"))
    raw = load_protocol().raw
    protocol = Protocol("v2", {**raw, "perturbation": {**raw["perturbation"], "iterations": 2}})
    runner = Runner(zoo, results_root=tmp_path / "results", protocol=protocol, device="cpu", train_missing=False,
                    rerank=False, progress=False)
    grid = ["m-fgsm", "m-ifgsm"]
    runner.run([zoo["tiny-none"]], grid)
    runner.run([zoo["tiny-copy"]], grid[:1])
    monkeypatch.setattr(Protocol, "attacks", lambda self, threat_model=None: [] if threat_model else list(grid))

    index = render_site(tmp_path / "results", tmp_path / "site").read_text()
    rows = json.loads((tmp_path / "site/tables/synthetic-eps5-summary.json").read_text())["rows"]
    assert [(r["model"], r["rank"]) for r in rows] == [("tiny-none", 1), ("tiny-copy", None)]
    assert rows[1]["standardized.rank1"] >= rows[0]["standardized.rank1"]  # it would have been ranked first
    assert "incomplete (1 of 2 attacks)" in rows[1]["flags"] and "incomplete" not in rows[0]["flags"]

    picture = index[index.index('<figure class="map">'):index.index("</figure>")]
    points = re.findall(r'<a href="models/([^"]+)\.html"><g>.*?<title>([^<]+)</title>', picture)
    assert sorted(model for model, _ in points) == ["tiny-copy", "tiny-none"]
    for (model, title), row in zip(sorted(points), sorted(rows, key=lambda r: r["model"])):
        assert title.startswith(model) and f"worst-case Rank-1 {100 * row['standardized.rank1']:.1f}" in title
    assert 'class="legend">undefended</text>' in picture

    for model in ("tiny-none", "tiny-copy"):  # one ε each: the table says it all, no curve
        assert "<svg" not in (tmp_path / "site/models" / f"{model}.html").read_text()
    runner.run([zoo["tiny-none"]], grid[:1], eps_values=[8 / 255])
    render_site(tmp_path / "results", tmp_path / "site")
    assert "<svg" in (tmp_path / "site/models/tiny-none.html").read_text()
    assert "<svg" not in (tmp_path / "site/models/tiny-copy.html").read_text()
