import json
import time

import pytest

from conftest import zoo_with_borrower
from reidbench.cli import main
from reidbench.data import build_dataset
from reidbench.leaderboard import render_site
from reidbench.results import read_per_query


def test_run_all_writes_cells_skips_unchanged_ones_and_renders(tiny_zoo_file, tiny_model, tmp_path):
    results, site = tmp_path / "results", tmp_path / "site"
    argv = ["run", "--all", "--zoo", str(tiny_zoo_file), "--results", str(results), "--site", str(site), "--device", "cpu",
            "--attack", "m-ifgsm"]
    assert main(argv) == 0
    cells = sorted(results.rglob("*.json"))
    assert [c.relative_to(results).as_posix() for c in cells] == ["v2/synthetic/tiny-none/m-ifgsm-eps5.json"]
    record = json.loads(cells[0].read_text())
    for key in ("input_key", "protocol", "model", "dataset", "attack", "threat_model", "clean", "attacked",
                "clean_reranked", "attacked_reranked", "perturbation", "seed", "environment", "wall_time_s", "sanity_flags"):
        assert key in record, key
    assert record["model"]["weights_sha256"] and record["dataset"]["split_hash"]
    assert record["perturbation"]["linf_max"] <= 5 / 255 + 1e-6
    assert record["attacked"]["mAP"] < record["clean"]["mAP"]
    per_query = read_per_query(cells[0])
    assert per_query["clean_ap"].shape == per_query["attacked_ap"].shape == (record["dataset"]["num_query"],)
    # Protocol v2: every Rank-1 / mAP / mINP with its interval, the per-query INP they come
    # from, and re-ranked numbers under attack marked non-adaptive.
    assert record["protocol"]["version"] == "v2"
    for label in ("clean", "attacked", "clean_reranked", "attacked_reranked"):
        for metric in ("rank1", "mAP", "mINP"):
            lo, hi = record[label]["ci95"][metric]
            assert lo <= record[label][metric] <= hi, (label, metric)
        lo, hi = record[label]["per_identity"]["rank1_var_ci95"]
        assert lo <= record[label]["per_identity"]["rank1_var"] <= hi
    assert record["attacked_reranked"]["adaptive"] is False and "adaptive" not in record["clean_reranked"]
    assert per_query["attacked_inp"].shape == per_query["attacked_ap"].shape
    html = (site / "index.html").read_text()
    assert "tiny-none" in html and "m-ifgsm-eps5" in html

    before = cells[0].stat().st_mtime_ns
    started = time.time()
    assert main(argv) == 0
    assert cells[0].stat().st_mtime_ns == before, "an unchanged cell was recomputed"
    assert time.time() - started < 30


def test_leaderboard_is_a_pure_function_and_escapes_html(tmp_path):
    record = {
        "attack_id": "m-ifgsm-eps5", "threat_model": "white-box", "protocol": {"version": "v2"},
        "model": {"id": "<script>alert(1)</script>", "backbone": "resnet18", "defense": {"name": "none"}},
        "dataset": {"name": "synthetic", "split_hash": "abc"}, "attack": {"name": "m-ifgsm"},
        "clean": {"rank1": 0.9, "mAP": 0.8}, "attacked": {"rank1": 0.1, "mAP": 0.05, "mINP": 0.01},
        "sanity_flags": [],
    }
    folder = tmp_path / "results" / "v2" / "synthetic" / "x"
    folder.mkdir(parents=True)
    (folder / "m-ifgsm-eps5.json").write_text(json.dumps(record))
    (folder / "broken.json").write_text("{not json")
    first = render_site(tmp_path / "results", tmp_path / "a").read_bytes()
    second = render_site(tmp_path / "results", tmp_path / "b").read_bytes()
    assert first == second
    assert b"<script>alert(1)</script>" not in first and b"&lt;script&gt;" in first
    assert b"90.0" in first and b"5.0" in first


def test_defended_entries_borrow_weights_get_eot_and_reproduce(tiny_zoo_file, tiny_model, tmp_path):
    """An inference-only defense runs on the baseline's weights; against its stochastic
    transform the white-box attack is averaged over draws (EOT); two forced runs agree."""
    zoo = zoo_with_borrower(tiny_zoo_file, tmp_path / "zoo.yaml", "tiny-rrp", defense="rrp")
    results = tmp_path / "results"
    argv = ["run", "--model", "tiny-rrp", "--zoo", str(zoo), "--results", str(results), "--site", str(tmp_path / "site"),
            "--device", "cpu", "--attack", "m-fgsm", "--no-rerank", "--no-train"]
    assert main(argv) == 0  # --no-train: the borrowed weights already exist (tiny_model trained them)
    cell = results / "v2/synthetic/tiny-rrp/m-fgsm-eps5.json"
    first = json.loads(cell.read_text())
    assert first["model"]["stochastic"] and first["attack"]["eot_samples"] == 10
    assert first["model"]["weights_sha256"]
    assert first["model"]["recipe"]["batch"] == {"p": 8, "k": 4}  # the recipe that trained the borrowed weights
    assert main(argv + ["--force"]) == 0
    second = json.loads(cell.read_text())
    assert first["clean"] == second["clean"] and first["attacked"] == second["attacked"]


def test_cross_dataset_cells_are_filed_under_the_test_dataset(tiny_zoo_file, tiny_model, tmp_path, monkeypatch):
    """Train on A (synthetic), test on B (a Market-1501-format folder): `run --dataset B`."""
    from test_market import market_layout

    data = tmp_path / "data"
    market_layout(data / "Market-1501-v15.09.15", train_ids=(2, 7), test_ids=(5, 11, 13), cams=(1, 2, 3))
    monkeypatch.setenv("REIDBENCH_DATA", str(data))
    results = tmp_path / "results"
    argv = ["run", "--model", "tiny-none", "--zoo", str(tiny_zoo_file), "--results", str(results), "--site",
            str(tmp_path / "site"), "--device", "cpu", "--attack", "m-fgsm", "--dataset", "market1501"]
    assert main(argv) == 0
    (cell,) = results.rglob("*.json")
    assert cell.relative_to(results).as_posix() == "v2/market1501/tiny-none/m-fgsm-eps5.json"
    record = json.loads(cell.read_text())
    assert record["model"]["train_dataset"]["name"] == "synthetic" and record["dataset"]["name"] == "market1501"
    assert record["dataset"]["image_size"] == [64, 32] and record["dataset"]["num_query"] == 3


def test_run_takes_the_test_dataset_as_a_mapping_with_options(tiny_zoo_file, tiny_model, tmp_path):
    """`run --dataset '{name: ..., <options>}'` for a zoo model, as in a zoo entry: the options
    reach the split (here a test set of other identities than the model's own)."""
    own = build_dataset("synthetic", preset="tiny")
    other = build_dataset("synthetic", preset="tiny", seed=11)
    assert other.split_hash != own.split_hash
    results = tmp_path / "results"
    argv = ["run", "--model", "tiny-none", "--zoo", str(tiny_zoo_file), "--results", str(results), "--site",
            str(tmp_path / "site"), "--device", "cpu", "--attack", "m-fgsm", "--dataset",
            "{name: synthetic, preset: tiny, seed: 11}"]
    assert main(argv) == 0
    (cell,) = results.rglob("*.json")
    assert json.loads(cell.read_text())["dataset"]["split_hash"] == other.split_hash


@pytest.mark.parametrize("value, message", [
    ("{preset: tiny}", "must be a dataset name or a mapping with a 'name'"),
    ("{name: [synthetic", "neither a dataset name nor a YAML mapping"),
    ("{name: synthetc}", "unknown dataset 'synthetc'"),
])
def test_run_refuses_a_bad_dataset_mapping_in_one_line(tiny_zoo_file, tmp_path, capsys, value, message):
    argv = ["run", "--model", "tiny-none", "--zoo", str(tiny_zoo_file), "--results", str(tmp_path), "--dataset", value]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
    assert not list(tmp_path.rglob("*.json"))


def test_run_refuses_the_oblivious_attack_on_a_model_without_an_input_transform(tiny_zoo_file, tmp_path, capsys):
    argv = ["run", "--model", "tiny-none", "--zoo", str(tiny_zoo_file), "--results", str(tmp_path),
            "--attack", "m-ifgsm", "oblivious"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "'oblivious' on model 'tiny-none'" in err and "M-I-FGSM itself" in err and len(err.strip().splitlines()) == 1
    assert not list(tmp_path.rglob("*.json"))


def test_run_refuses_an_unknown_test_dataset(tiny_zoo_file, tmp_path, capsys):
    argv = ["run", "--model", "tiny-none", "--zoo", str(tiny_zoo_file), "--results", str(tmp_path), "--dataset", "nope"]
    assert main(argv) == 2
    assert "unknown dataset 'nope'" in capsys.readouterr().err


def test_the_leaderboard_says_where_a_cross_dataset_row_was_trained(tmp_path):
    from reidbench.leaderboard import results_table

    record = {
        "attack_id": "m-ifgsm-eps5", "threat_model": "white-box", "protocol": {"version": "v2"},
        "model": {"id": "m", "backbone": "resnet18", "defense": {"name": "none"}, "train_dataset": {"name": "synthetic"}},
        "dataset": {"name": "market1501", "split_hash": "abc"}, "attack": {"name": "m-ifgsm"},
        "clean": {"rank1": 0.3, "mAP": 0.2}, "attacked": {"rank1": 0.1, "mAP": 0.05, "mINP": 0.01},
        "perturbation": {"eps": 5 / 255}, "sanity_flags": [],
    }
    folder = tmp_path / "results" / "v2" / "market1501" / "m"
    folder.mkdir(parents=True)
    (folder / "m-ifgsm-eps5.json").write_text(json.dumps(record))
    assert list(results_table(tmp_path / "results")["train_dataset"]) == ["synthetic"]
    html = render_site(tmp_path / "results", tmp_path / "site").read_text()
    assert "trained on" in html and '<td data-sort="synthetic">synthetic</td>' in html



def test_transfer_images_are_crafted_once_per_run_and_shared_by_every_target(tiny_zoo_file, tiny_model, tmp_path,
                                                                             monkeypatch):
    """A transfer attack never sees the target, so one run crafts its images once (on the
    surrogate) and every target is scored on those same images."""
    from reidbench.protocol import Protocol, load_protocol
    from reidbench.registry import ATTACKS
    from reidbench.runner import Runner
    from reidbench.zoo import load_zoo

    zoo_file = tmp_path / "zoo.yaml"
    zoo_file.write_text(tiny_zoo_file.read_text() + "".join(f"""
- id: tiny-{name}
  backbone: resnet10t
  dataset: {{name: synthetic, preset: tiny}}
  defense: {name}
  model: {{input_size: [64, 32], last_stride: 1}}
  weights: {{from: tiny-none}}
""" for name in ("cs", "jpeg")))
    zoo = load_zoo(zoo_file)
    raw = json.loads(json.dumps(load_protocol().raw))
    raw["perturbation"]["iterations"] = 2
    raw["transfer"]["surrogates"]["synthetic"] = "tiny-none"
    inner = ATTACKS.get(raw["transfer"]["attack"])
    crafted = []
    original = inner.perturb
    monkeypatch.setattr(inner, "perturb", lambda self, model, queries, ctx: crafted.append(len(queries))
                        or original(self, model, queries, ctx))
    runner = Runner(zoo, results_root=tmp_path / "results", protocol=Protocol("v2", raw), device="cpu",
                    train_missing=False, rerank=False, progress=False)
    paths = runner.run([zoo["tiny-cs"], zoo["tiny-jpeg"]], ["transfer"])
    assert sum(crafted) == len(runner.bundle(zoo["tiny-cs"]).split.query)  # for the first target only
    sizes = [json.loads(p.read_text())["perturbation"] for p in paths]
    assert sizes[0] == sizes[1] and sizes[0]["linf_max"] > 0  # both scored on the very same images



def test_a_cell_is_keyed_by_the_defense_it_ran_not_by_how_the_entry_spelled_it(tiny_zoo_file, tiny_model, tmp_path):
    """A defense's resolved parameters (defaults included) decide a cell: a changed default
    must recompute it, and spelling the default out must not."""
    from reidbench.attack import build_attack
    from reidbench.runner import Runner
    from reidbench.zoo import load_zoo

    attack = build_attack("m-fgsm", eps=5 / 255, step=1 / 255, iterations=1)

    def key(params):
        zoo_file = tmp_path / "zoo.yaml"
        zoo_file.write_text(tiny_zoo_file.read_text() + f"""
- id: tiny-jpeg
  backbone: resnet10t
  dataset: {{name: synthetic, preset: tiny}}
  defense: {{name: jpeg{params}}}
  model: {{input_size: [64, 32], last_stride: 1}}
  weights: {{from: tiny-none}}
""")
        zoo = load_zoo(zoo_file)
        runner = Runner(zoo, results_root=tmp_path / "results", device="cpu", train_missing=False, progress=False)
        return runner.input_key(runner.bundle(zoo["tiny-jpeg"]), attack)

    assert key("") == key(", bpda: differentiable")  # the default, spelled out or not
    assert key("") != key(", bpda: identity")


def test_a_bpda_cell_leaves_the_defended_model_in_eval_mode_for_the_next_cell(tiny_zoo_file, tiny_model, tmp_path):
    """The white-box attack on a non-differentiable defense runs on a BPDA wrapper around the
    same network; restoring the wrapper's mode must not put the shared network in train mode
    (its train-mode output is not an embedding: the default suite's jpeg row once crashed so)."""
    from conftest import zoo_with_borrower
    from reidbench.runner import Runner
    from reidbench.zoo import load_zoo

    zoo = load_zoo(zoo_with_borrower(tiny_zoo_file, tmp_path / "zoo.yaml", "tiny-jpeg", "jpeg"))
    runner = Runner(zoo, results_root=tmp_path / "results", device="cpu", train_missing=False, rerank=False,
                    progress=False)
    paths = runner.run([zoo["tiny-jpeg"]], ["m-fgsm", "fna"])
    assert len(paths) == 2
    assert not runner.bundle(zoo["tiny-jpeg"]).model.model.training
