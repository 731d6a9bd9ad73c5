"""--queries N: a fixed, seeded query subset, filed and ranked apart from full cells."""

import json

import torch

from reidbench.cli import main
from reidbench.data.split import query_subset
from reidbench.protocol import CURRENT_VERSION


def test_the_subset_is_seeded_nested_and_keeps_the_gallery(tiny_split):
    a, b = query_subset(tiny_split, 5, seed=0), query_subset(tiny_split, 10, seed=0)
    assert len(a.query) == 5 and len(b.query) == 10 and len(a.gallery) == len(tiny_split.gallery)
    again = query_subset(tiny_split, 5, seed=0)
    assert torch.equal(a.query.images, again.query.images)
    pairs = lambda s: {(p, c, hash(i.numpy().tobytes())) for p, c, i in zip(s.pids.tolist(), s.camids.tolist(), s.images)}
    assert pairs(a.query) <= pairs(b.query)
    assert a.info["query_subset"] == {"queries": 5, "of": len(tiny_split.query), "seed": 0}
    assert a.split_hash == tiny_split.split_hash
    assert not torch.equal(query_subset(tiny_split, 5, seed=1).query.pids, a.query.pids) or len(tiny_split.query) <= 5


def test_subset_cells_are_recorded_filed_apart_and_not_ranked_with_full_ones(tiny_zoo_file, tiny_model, tmp_path):
    results, site = tmp_path / "results", tmp_path / "site"
    argv = ["run", "--model", "tiny-none", "--attack", "m-fgsm", "--zoo", str(tiny_zoo_file), "--results", str(results),
            "--site", str(site), "--device", "cpu", "--no-rerank"]
    assert main(argv + ["--queries", "12"]) == 0
    assert main(argv) == 0
    folder = results / CURRENT_VERSION / "synthetic" / "tiny-none"
    subset = json.loads((folder / "m-fgsm-eps5-q12.json").read_text())
    full = json.loads((folder / "m-fgsm-eps5.json").read_text())
    assert subset["dataset"]["num_query"] == 12 and subset["dataset"]["query_subset"]["queries"] == 12
    assert subset["dataset"]["query_subset"]["seed"] == subset["seed"]
    assert "query_subset" not in full["dataset"] and full["dataset"]["num_query"] > 12
    assert subset["input_key"] != full["input_key"]
    html = (site / "index.html").read_text()
    total = full["dataset"]["num_query"]
    assert f"synthetic (subset: 12 of {total} queries)" in html
    cells = json.loads((site / "cells.json").read_text())
    assert sorted(c["dataset"] for c in cells) == ["synthetic", f"synthetic (subset: 12 of {total} queries)"]
    summaries = sorted(p.name for p in (site / "tables").glob("*summary*.json"))
    assert len(summaries) == 2  # one ranking each, never one ranking of both


def test_more_queries_than_the_split_has_is_one_line(tiny_zoo_file, tiny_model, tmp_path, capsys):
    argv = ["run", "--model", "tiny-none", "--attack", "m-fgsm", "--zoo", str(tiny_zoo_file), "--results",
            str(tmp_path / "r"), "--site", str(tmp_path / "s"), "--device", "cpu", "--queries", "100000"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("reidbench: error: --queries 100000: dataset 'synthetic' has "), err
    assert main(argv[:-1] + ["0"]) == 2
    assert not (tmp_path / "r").exists()
