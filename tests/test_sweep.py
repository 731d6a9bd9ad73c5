"""The budget sweep (``reidbench sweep``, reidbench/sweep.py): its flag rule, and a run on the
tiny model that writes the file the leaderboard reads."""

import json

import numpy as np
import pytest
import torch
from conftest import REPO

from reidbench import sweep as budget
from reidbench.cli import main
from reidbench.results import BUDGET_FLAG, budget_sweep_path, read_budget_sweep


def point(rank1, half=0.05):
    return {"rank1": rank1, "interval": [rank1 - half, rank1 + half]}


def test_the_flag_needs_a_drop_beyond_the_interval_at_the_protocol_budget():
    converged = budget.assess({15: point(0.30), 100: point(0.28), 500: point(0.27)}, 15)
    assert not converged["flag"] and not converged["still_falling"]
    masked = budget.assess({15: point(0.60), 100: point(0.40), 500: point(0.20)}, 15)
    assert masked["flag"] and masked["still_falling"] and masked["drop"] == pytest.approx(0.40)
    settled_late = budget.assess({15: point(0.60), 100: point(0.30), 500: point(0.29)}, 15)
    assert settled_late["flag"] and not settled_late["still_falling"]


def test_the_local_interval_resamples_identities():
    pids = np.repeat(np.arange(20), 3)
    first_hit = np.where(pids < 10, 0, 4)  # half the identities at Rank-1
    lo, hi = budget.rank1_interval(first_hit, pids)
    assert lo < 0.5 < hi and hi - lo > 0.1
    assert budget.rank1_interval(first_hit, pids) == [lo, hi]  # seeded
    assert budget.rank1_interval(np.zeros(6, dtype=int), np.arange(6)) == [1.0, 1.0]


def test_a_sweep_on_the_tiny_model_writes_what_the_leaderboard_reads(tiny_model, tiny_zoo_file, tmp_path, capsys):
    results = tmp_path / "results"
    main(["sweep", "tiny-none", "--attack", "m-ifgsm", "--iterations", "1", "4", "--protocol", "v1",
                 "--results", str(results), "--zoo", str(tiny_zoo_file), "--device", "cpu",
                 "--site", str(tmp_path / "site")])
    out = capsys.readouterr().out
    assert "| tiny-none | m-ifgsm |" in out
    assert f"leaderboard: {tmp_path / 'site' / 'index.html'}" in out and (tmp_path / "site" / "index.html").is_file()
    found = read_budget_sweep(results, "v1")
    entry = found["tiny-none"]
    assert set(entry["points"]) == {"1", "4"} and isinstance(entry["flag"], bool)
    assert entry["points"]["4"]["rank1"] <= entry["points"]["1"]["rank1"]
    assert entry["flag_name"] in (BUDGET_FLAG, None) and entry["command"].startswith("reidbench sweep tiny-none --attack m-ifgsm")
    payload = json.loads(budget_sweep_path(results, "v1").read_text())
    assert payload["protocol"]["version"] == "v1"
    assert read_budget_sweep(results, "v2") == {}


def test_an_attack_without_iterations_is_refused(tiny_model, tiny_zoo_file, tmp_path, capsys):
    code = main(["sweep", "tiny-none", "--attack", "m-fgsm", "--iterations", "1", "2", "--protocol", "v1",
                 "--results", str(tmp_path), "--zoo", str(tiny_zoo_file), "--device", "cpu", "--no-render"])
    assert code == 2 and capsys.readouterr().err.strip() == "reidbench: error: attack 'm-fgsm' has no iteration count to sweep"


def test_the_old_script_runs_the_same_sweep(tiny_zoo_file, tmp_path):
    """benchmarks/attack_budget.py stays for the commands recorded in earlier findings."""
    import os
    import subprocess
    import sys

    out = subprocess.run([sys.executable, str(REPO / "benchmarks" / "attack_budget.py"), "tiny-nne", "--zoo",
                          str(tiny_zoo_file), "--results", str(tmp_path)], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "PYTHONPATH": str(REPO)})  # this checkout's reidbench, wherever it is installed
    assert out.returncode == 2 and out.stderr.startswith("reidbench: error: unknown model 'tiny-nne'"), out.stderr


def tiny_runner(tiny_zoo_file, results):
    from reidbench.protocol import load_protocol
    from reidbench.runner import Runner
    from reidbench.zoo import load_zoo

    return Runner(load_zoo(tiny_zoo_file), results_root=results, protocol=load_protocol("v2"), device="cpu",
                  progress=False, rerank=False)


def hits(runner, bundle, feats, adv):
    record, per_query = runner.score(bundle, feats, adv, feats["gallery"])
    return record["attacked"]["rank1"], per_query["attacked_first_hit"] == 0


@pytest.mark.parametrize("name", ["m-ifgsm", "sma"])
def test_budgets_from_one_run_keep_the_rank1_of_separate_runs(name, tiny_model, tiny_zoo_file, tmp_path):
    """Each budget's snapshot of the one early-stopping run leaves the same queries at Rank-1
    as a run of exactly that many iterations (m-ifgsm: deterministic; sma: a random start and
    restarts, whose draws are shared by fewer queries, so only the trend is compared)."""
    from reidbench.zoo import get_entry

    runner = tiny_runner(tiny_zoo_file, tmp_path)
    bundle = runner.bundle(get_entry(runner.zoo, "tiny-none"))
    feats = runner.clean_features(bundle)
    budgets = [1, 2, 5]
    by_budget, linf = runner.attack_images_by_budget(bundle, runner.make_attack(name, runner.protocol.eps, bundle), budgets)
    assert sorted(by_budget) == budgets and linf <= runner.protocol.eps + 1e-6
    swept = {n: hits(runner, bundle, feats, by_budget[n]) for n in budgets}
    assert swept[1][0] >= swept[2][0] >= swept[5][0]  # best iterate: never worse with more budget
    assert not (swept[5][1] & ~swept[2][1]).any()     # a query broken at 2 stays broken at 5
    if name == "m-ifgsm":
        for n in budgets:
            alone = runner.make_attack(name, runner.protocol.eps, bundle)
            alone.iterations = n
            adv, *_ = runner.attack_images(bundle, alone)
            assert (hits(runner, bundle, feats, adv)[1] == swept[n][1]).all(), n


def test_a_stochastic_defense_scores_every_budget_under_the_same_draws(tiny_model, tiny_zoo_file, tmp_path):
    """Budgets of one sweep are compared with each other, so a stochastic defense must embed
    them under common transform draws: the same images then give the same features at every
    budget, and only the attack separates them."""
    from conftest import zoo_with_borrower

    from reidbench.features import embed
    from reidbench.protocol import load_protocol
    from reidbench.runner import Runner
    from reidbench.zoo import get_entry, load_zoo

    zoo = zoo_with_borrower(tiny_zoo_file, tmp_path / "zoo.yaml", "tiny-rrp", defense="rrp")
    runner = Runner(load_zoo(zoo), results_root=tmp_path, protocol=load_protocol("v2"), device="cpu",
                    progress=False, rerank=False)
    bundle = runner.bundle(get_entry(runner.zoo, "tiny-rrp"))
    assert bundle.model.stochastic
    attack = runner.make_attack("m-ifgsm", runner.protocol.eps, bundle)
    attack.by_budget = lambda model, images, ctx, budgets: {n: images.clone() for n in budgets}  # no attack at all
    by_budget, _ = runner.attack_images_by_budget(bundle, attack, [1, 2, 5])
    assert torch.equal(by_budget[1], by_budget[2]) and torch.equal(by_budget[1], by_budget[5])
    images = bundle.split.query.load(torch.arange(4), tuple(bundle.model.input_size))
    with torch.no_grad():
        assert not torch.equal(embed(bundle.model, images, True), embed(bundle.model, images, True))  # draws matter


def test_an_attack_without_a_loop_has_no_budgets(tiny_model, tiny_zoo_file, tmp_path):
    from reidbench.errors import ReIDBenchError
    from reidbench.zoo import get_entry

    runner = tiny_runner(tiny_zoo_file, tmp_path)
    bundle = runner.bundle(get_entry(runner.zoo, "tiny-none"))
    with pytest.raises(ReIDBenchError, match="no iteration count"):
        runner.attack_images_by_budget(bundle, runner.make_attack("m-fgsm", runner.protocol.eps, bundle), [1, 2])


def test_select_keeps_what_was_prepared_for_the_kept_queries():
    import torch

    from reidbench.attack import AttackContext

    ctx = AttackContext(query_pids=torch.arange(4), query_camids=torch.zeros(4), query_feats=torch.eye(4),
                        gallery_feats=torch.ones(6, 4), gallery_pids=torch.arange(6), gallery_camids=torch.ones(6),
                        extra={"guides": torch.arange(8.0).view(4, 2), "gallery_side": torch.arange(6), "tag": "x"})
    kept = ctx.select(torch.tensor([1, 3]))
    assert kept.query_pids.tolist() == [1, 3] and kept.extra["guides"].tolist() == [[2.0, 3.0], [6.0, 7.0]]
    assert kept.extra["gallery_side"].tolist() == list(range(6)) and kept.extra["tag"] == "x"
    assert ctx.extra["guides"].shape == (4, 2)  # the full context is untouched
    assert ctx.batch(torch.tensor([1, 3])).extra["guides"].shape == (4, 2)  # batch() leaves a fresh run to prepare


def test_a_model_at_the_floor_is_recorded_from_its_cell_without_rerunning(tiny_model, tiny_zoo_file, tmp_path,
                                                                         monkeypatch, capsys):
    """The real path: `reidbench run` writes the cell, the sweep reads it. The tiny model's
    M-I-FGSM cell leaves Rank-1 0 with the interval [0, 0], so no budget can flag it: the
    sweep records it from the store without attacking again (for a trained defense, that
    would first mean training it). --rerun-floor attacks it anyway."""
    from reidbench.cli import main as cli_main
    from reidbench.leaderboard import render_site
    from reidbench.runner import Runner

    results = tmp_path / "results"
    cli_main(["run", "--zoo", str(tiny_zoo_file), "--results", str(results), "--model", "tiny-none",
              "--attack", "m-ifgsm", "--no-rerank", "--device", "cpu"])
    stored = json.loads(next(results.glob("v2/*/tiny-none/m-ifgsm-eps5.json")).read_text())
    assert stored["attacked"]["ci95"]["rank1"][0] == 0.0  # the premise: this cell is at the floor
    capsys.readouterr()

    real_bundle = Runner.bundle
    monkeypatch.setattr(Runner, "bundle", lambda *a, **k: pytest.fail("a model at the floor was loaded"))
    main(["sweep", "tiny-none", "--iterations", "15", "100", "--results", str(results), "--zoo", str(tiny_zoo_file),
                 "--device", "cpu", "--no-render"])
    assert "at the floor" in capsys.readouterr().out
    entry = read_budget_sweep(results, "v2")["tiny-none"]
    assert entry["at_floor"] and entry["flag"] is False and entry["attack"] == "m-ifgsm"
    assert entry["points"]["15"]["rank1"] == stored["attacked"]["rank1"]
    assert entry["weights_sha256"] == stored["model"]["weights_sha256"]
    page = (render_site(results, tmp_path / "site").parent / "models" / "tiny-none.html").read_text()
    assert "Budget sweep" in page and "at the floor" in page and "Stale" not in page

    monkeypatch.setattr(Runner, "bundle", real_bundle)
    main(["sweep", "tiny-none", "--iterations", "1", "3", "--rerun-floor", "--results", str(results),
                 "--zoo", str(tiny_zoo_file), "--device", "cpu", "--no-render"])
    entry = read_budget_sweep(results, "v2")["tiny-none"]
    assert not entry.get("at_floor") and set(entry["points"]) == {"1", "3"} and entry["seconds"] >= 0
    entry["weights_sha256"] = "0" * 64  # a sweep of a retraining: the page must not pass it off as this model's
    path = budget_sweep_path(results, "v2")
    payload = json.loads(path.read_text())
    payload["models"]["tiny-none"] = entry
    path.write_text(json.dumps(payload))
    entry["flag"] = True  # even a flag: the index names the finding stale and never flags these cells with it
    payload["models"]["tiny-none"] = entry
    path.write_text(json.dumps(payload))
    index = render_site(results, tmp_path / "site")
    page = (index.parent / "models" / "tiny-none.html").read_text()
    assert "Stale" in page and "budget-sensitive:" in page
    assert "budget sweep stale" in index.read_text() and "budget-sensitive" not in index.read_text()


def test_a_finding_keeps_the_fingerprint_it_was_measured_under(tmp_path):
    """Merging a sweep under an edited protocol into the file leaves the earlier findings under
    their own fingerprint: they are stale there, not silently current."""
    from reidbench.protocol import Protocol, load_protocol
    from reidbench.results import sweep_is_current

    v2 = load_protocol("v2")
    edited = Protocol("v2", {**json.loads(json.dumps(v2.raw)), "note": "an edit"})
    assert edited.fingerprint() != v2.fingerprint()
    budget.write_findings(tmp_path, v2, {"a": {"weights_sha256": "w", "flag": True}}, "first")
    budget.write_findings(tmp_path, edited, {"b": {"weights_sha256": "w", "flag": False}}, "second")
    found = read_budget_sweep(tmp_path, "v2")
    assert found["a"]["protocol_fingerprint"] == v2.fingerprint() and found["b"]["protocol_fingerprint"] == edited.fingerprint()
    assert sweep_is_current(found["a"], {"w"}, {v2.fingerprint()})
    assert not sweep_is_current(found["a"], {"w"}, {edited.fingerprint()}) and not sweep_is_current(found["a"], {"x"}, {v2.fingerprint()})

    # A file written before findings carried their own fingerprint: they read under the file's.
    path = budget_sweep_path(tmp_path, "v2")
    path.write_text(json.dumps({"schema": 1, "protocol": {"version": "v2", "fingerprint": "f0"},
                                "models": {"c": {"weights_sha256": "w"}}}))
    assert read_budget_sweep(tmp_path, "v2")["c"]["protocol_fingerprint"] == "f0"


def test_run_names_the_defenses_left_unswept_until_they_are(tiny_model, tiny_zoo_file, tmp_path, capsys, monkeypatch):
    """The real path: run → the reminder → sweep → run again, which reuses its cells and is quiet about it."""
    from conftest import zoo_with_borrower

    monkeypatch.setenv("REIDBENCH_QUIET", "0")  # the reminder is a log line
    zoo = zoo_with_borrower(tiny_zoo_file, tmp_path / "zoo.yaml", "tiny-jpeg", "jpeg")
    where = ["--zoo", str(zoo), "--results", str(tmp_path / "results"), "--device", "cpu", "--site", str(tmp_path / "site")]
    run = ["run", "--model", "tiny-none", "tiny-jpeg", "--attack", "m-ifgsm", "--no-rerank", *where]
    assert main(run) == 0
    err = capsys.readouterr().err
    assert "budget sweep: 1 defended model(s) without a sweep of their current weights (tiny-jpeg)" in err
    assert f"'reidbench sweep tiny-jpeg --results {tmp_path / 'results'}'" in err
    sweep = ["sweep", "tiny-jpeg", "--iterations", "1", "2", *where]
    assert main(sweep) == 0
    capsys.readouterr()
    assert main(run) == 0
    assert "budget sweep:" not in capsys.readouterr().err

    # A rerun (after an interruption, or with one more model named) keeps a finding that answers it.
    from reidbench.runner import Runner

    real_bundle = Runner.bundle
    monkeypatch.setattr(Runner, "bundle", lambda *a, **k: pytest.fail("a current finding was swept again"))
    before = budget_sweep_path(tmp_path / "results", "v2").read_text()
    assert main(sweep) == 0
    assert "| kept (current finding; --force reruns) |" in capsys.readouterr().out
    assert budget_sweep_path(tmp_path / "results", "v2").read_text() == before
    monkeypatch.setattr(Runner, "bundle", real_bundle)
    # The tiny model is at the floor: --rerun-floor attacks it, then that finding answers the same
    # request, not one with a budget it lacks; --force always sweeps.
    for again, kept in ((["--rerun-floor"], False), (["--rerun-floor"], True),
                        (["--rerun-floor", "--iterations", "1", "2", "3"], False), (["--force"], False)):
        assert main(sweep + again) == 0
        assert ("kept (current finding" in capsys.readouterr().out) == kept, again


def test_sweeps_side_by_side_keep_every_finding(tmp_path):
    """Two processes merging findings into one file at once (started together, 40 writes each):
    the lock keeps every finding; without it a later writer drops what the other merged in."""
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")
    names = [f"m{i}" for i in range(80)]
    barrier = ctx.Barrier(2)
    workers = [ctx.Process(target=_write_some, args=(str(tmp_path), names[i::2], barrier)) for i in range(2)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(120)
    assert [w.exitcode for w in workers] == [0, 0]
    assert sorted(read_budget_sweep(tmp_path, "v2")) == sorted(names)


def _write_some(root: str, names: list[str], barrier) -> None:
    from pathlib import Path

    from reidbench.protocol import load_protocol

    protocol = load_protocol("v2")
    barrier.wait(60)  # both imported: the writes overlap
    for name in names:
        budget.write_findings(Path(root), protocol, {name: {"weights_sha256": "w"}}, "test")


def test_every_committed_finding_is_current_for_its_stores_cells():
    """benchmarks/results holds sweeps with the cells they started from: a finding of weights or a
    protocol that no cell of its model has would be rendered stale; none may be committed so."""
    from reidbench.results import iter_cells, sweep_is_current_for

    files = sorted((REPO / "benchmarks" / "results").rglob("budget-sweep/v*.json"))
    assert files
    for path in files:
        root, version = path.parent.parent, path.stem
        for model_id, finding in read_budget_sweep(root, version).items():
            records = [r for _, r in iter_cells(root / version / finding["dataset"] / model_id)]
            assert sweep_is_current_for(finding, records), (path, model_id)


def test_an_unreadable_findings_file_is_kept_aside_and_the_new_finding_written(tmp_path, capsys, monkeypatch):
    """Bad input: a damaged budget-sweep file neither crashes the writer (after minutes of
    attack) nor is silently overwritten: it moves aside with one warning line."""
    from reidbench.protocol import load_protocol

    monkeypatch.setenv("REIDBENCH_QUIET", "0")
    path = budget_sweep_path(tmp_path, "v2")
    path.parent.mkdir(parents=True)
    path.write_text('{"models": {"a": ')
    budget.write_findings(tmp_path, load_protocol("v2"), {"b": {"weights_sha256": "w"}}, "test")
    assert list(read_budget_sweep(tmp_path, "v2")) == ["b"]
    assert path.with_name("v2.json.unreadable").read_text() == '{"models": {"a": '
    err = capsys.readouterr().err
    assert "malformed budget sweep" in err and "moved to" in err and "Traceback" not in err
