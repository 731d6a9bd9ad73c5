"""Submissions: `reidbench validate` accepts honest results and rejects tampered ones;
`reidbench zoo changed` finds what a branch submits; CI runs both on pull requests."""

import hashlib
import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import yaml
from safetensors.torch import save_file

from reidbench.cache import sha256_file
from reidbench.cli import main
from reidbench.protocol import CURRENT_VERSION, Protocol, load_protocol
from reidbench.results import npz_bytes
from reidbench.runner import Runner
from reidbench.validate import choose_subset, committed_subset, subset_file, submitted_entries, validate_entry
from reidbench.zoo import load_zoo

REPO = Path(__file__).resolve().parents[1]
CELL = "v2/synthetic/{}/m-ifgsm-eps5.json"


def pinned_zoo(path: Path, base: dict, weights: Path, sha256: str) -> Path:
    """The tiny model ``base`` under pinned weights, and an inference-only stochastic defense on it."""
    entries = [{**base, "id": "tiny-pinned", "weights": {"path": str(weights), "sha256": sha256}},
               {**{k: v for k, v in base.items() if k != "recipe"}, "id": "tiny-pinned-rrp", "defense": "rrp",
                "weights": {"from": "tiny-pinned"}},
               {**base, "id": "tiny-unpinned"}]
    path.write_text(yaml.safe_dump(entries, sort_keys=False))
    return path


def protocol_with_eot(samples: int) -> Protocol:
    """Protocol v2 with fewer EOT draws, to keep the stochastic cases fast."""
    raw = json.loads(json.dumps(load_protocol().raw))
    raw["adaptive"]["eot_samples"] = samples
    return Protocol("v2", raw)


@pytest.fixture(scope="module")
def submission(tiny_model, tiny_zoo_file, tmp_path_factory):
    """Honest results of the pinned tiny model (protocol v2) and of its rrp variant (under
    ``protocol_with_eot(2)``), as `reidbench run` writes them."""
    root = tmp_path_factory.mktemp("submission")
    weights = root / "model.safetensors"
    save_file({k: v.detach().contiguous() for k, v in tiny_model.model.state_dict().items()}, str(weights))
    zoo_file = pinned_zoo(root / "model_zoo.yaml", yaml.safe_load(tiny_zoo_file.read_text())[0], weights,
                          sha256_file(weights))
    zoo = load_zoo(zoo_file)
    for entry_id, protocol in (("tiny-pinned", None), ("tiny-pinned-rrp", protocol_with_eot(2))):
        runner = Runner(zoo, results_root=root / "results", protocol=protocol, device="cpu", rerank=False,
                        progress=False)
        runner.run([zoo[entry_id]], ["m-ifgsm"])
    # A defense's submission carries its budget sweep, as CONTRIBUTING asks (read from the cell just run).
    from reidbench import sweep

    sweep.write_findings(root / "results", runner.protocol,
                         {"tiny-pinned-rrp": sweep.sweep_model(runner, "tiny-pinned-rrp", [1, 2], None)}, "sweep")
    return zoo_file, root / "results"


@pytest.fixture
def results(submission, tmp_path):
    """A private copy of the submitted results, to tamper with."""
    return Path(shutil.copytree(submission[1], tmp_path / "results"))


def validate(capsys, zoo_file, results, entry="tiny-pinned"):
    code = main(["validate", entry, "--zoo", str(zoo_file), "--results", str(results), "--device", "cpu"])
    out = capsys.readouterr()
    assert "Traceback" not in out.err
    reasons = [line for line in out.err.splitlines() if line.startswith("reidbench: rejected: ")]
    assert (code == 0) == (not reasons), out.err
    return code, reasons, out


def test_honest_results_reproduce_exactly(submission, capsys):
    zoo_file, results = submission
    code, reasons, out = validate(capsys, zoo_file, results)
    assert code == 0, reasons
    assert "recomputed" in out.err and "m-ifgsm Rank-1" in out.err
    verdict = validate_entry("tiny-pinned", load_zoo(zoo_file), results, device="cpu")
    assert verdict.accepted and len(verdict.comparisons) == 4
    assert all(row.difference < 1e-6 for row in verdict.comparisons), verdict.comparisons
    attacked = next(row for row in verdict.comparisons if row.metric == "m-ifgsm mAP")
    clean = next(row for row in verdict.comparisons if row.metric == "clean mAP")
    assert attacked.submitted < clean.submitted  # a real attack was recomputed, not an empty one


def test_a_stochastic_defense_attacked_with_eot_reproduces(submission):
    """The subset is attacked in the batches, with the seeds, of the whole run: even a random
    transform's draws are the submitted ones."""
    verdict = validate_entry("tiny-pinned-rrp", load_zoo(submission[0]), submission[1], device="cpu",
                             protocol=protocol_with_eot(2))
    assert verdict.accepted, verdict.reasons
    assert all(row.difference < 1e-6 for row in verdict.comparisons), verdict.comparisons


def test_a_defense_without_its_budget_sweep_is_rejected(submission, results):
    """The sweep on the pinned weights under the protocol is required (not recomputed): none,
    one of other weights, or one under another protocol fingerprint is one reason each."""
    zoo, protocol = load_zoo(submission[0]), protocol_with_eot(2)
    path = results / "budget-sweep" / "v2.json"
    payload = json.loads(path.read_text())
    for key, value in (("weights_sha256", "e" * 64), ("protocol_fingerprint", load_protocol().fingerprint())):
        path.write_text(json.dumps({**payload, "models": {"tiny-pinned-rrp": {**payload["models"]["tiny-pinned-rrp"],
                                                                               key: value}}}))
        verdict = validate_entry("tiny-pinned-rrp", zoo, results, device="cpu", protocol=protocol)
        assert [r for r in verdict.reasons if "budget sweep" in r] == [
            f"{path}: the budget sweep of 'tiny-pinned-rrp' was measured on weights "
            f"{('e' * 12) if key == 'weights_sha256' else payload['models']['tiny-pinned-rrp']['weights_sha256'][:12]}… "
            f"under protocol fingerprint {value if key == 'protocol_fingerprint' else protocol.fingerprint()}, not on "
            f"the pinned {payload['models']['tiny-pinned-rrp']['weights_sha256'][:12]}… under {protocol.fingerprint()} "
            f"(run again: reidbench sweep tiny-pinned-rrp --results {results})"], verdict.reasons
    path.unlink()
    verdict = validate_entry("tiny-pinned-rrp", zoo, results, device="cpu", protocol=protocol)
    assert verdict.reasons == [f"no budget sweep of the defended entry 'tiny-pinned-rrp' in {path} "
                               f"(run: reidbench sweep tiny-pinned-rrp --results {results})"]
    assert validate_entry("tiny-pinned", zoo, results, device="cpu").accepted  # an undefended entry needs none


def test_a_stochastic_defense_without_eot_is_rejected(submission, results):
    zoo = load_zoo(submission[0])
    Runner(zoo, results_root=results, protocol=protocol_with_eot(1), device="cpu", rerank=False,
           progress=False).run([zoo["tiny-pinned-rrp"]], ["m-fgsm"])
    verdict = validate_entry("tiny-pinned-rrp", zoo, results, device="cpu", protocol=protocol_with_eot(2))
    assert not verdict.accepted
    assert any("m-fgsm-eps5.json: stochastic defense attacked without EOT (eot_samples 1, protocol v2 needs 2)" in r
               for r in verdict.reasons), verdict.reasons


def test_tampered_numbers_are_rejected(submission, results, capsys):
    cell = results / CELL.format("tiny-pinned")
    with np.load(cell.with_suffix(".npz")) as data:
        per_query = {k: data[k] for k in data.files}
    # A consistent forgery: per-query file and summary both claim the attack failed.
    valid = per_query["attacked_first_hit"] >= 0
    per_query["attacked_first_hit"][valid] = 0
    per_query["attacked_ap"][valid] = 1.0
    blob = npz_bytes(per_query)
    cell.with_suffix(".npz").write_bytes(blob)
    record = json.loads(cell.read_text())
    record["attacked"].update(rank1=1.0, mAP=1.0)
    record.update(per_query_bytes=len(blob), per_query_sha256=hashlib.sha256(blob).hexdigest())
    cell.write_text(json.dumps(record))
    code, reasons, _ = validate(capsys, submission[0], results)
    assert code == 1
    assert any(r.startswith("reidbench: rejected: m-ifgsm Rank-1 on the 30 validation queries does not reproduce: "
                            "submitted 100.00") for r in reasons), reasons
    assert any("m-ifgsm mAP" in r for r in reasons) and not any("clean" in r for r in reasons), reasons

    # Editing only the summary is caught by the record's own per-query file.
    record["attacked"].update(rank1=0.5)
    cell.write_text(json.dumps(record))
    code, reasons, _ = validate(capsys, submission[0], results)
    assert any("m-ifgsm-eps5.json: attacked rank1 0.5 is not what m-ifgsm-eps5.npz gives (1.000000)" in r
               for r in reasons), reasons


def test_a_damaged_per_query_file_is_one_rejection(submission, results, capsys):
    cell = results / CELL.format("tiny-pinned")
    npz = cell.with_suffix(".npz")
    npz.write_bytes(npz.read_bytes()[:-40])
    code, reasons, _ = validate(capsys, submission[0], results)
    assert code == 1 and len(reasons) == 1, reasons
    assert "m-ifgsm-eps5.json: per-query outcomes" in reasons[0] and "are damaged" in reasons[0], reasons


def test_a_query_subset_run_is_not_a_submission(submission, results, capsys):
    zoo = load_zoo(submission[0])
    Runner(zoo, results_root=results, device="cpu", rerank=False, progress=False, queries=8).run(
        [zoo["tiny-pinned"]], ["m-fgsm"])
    code, reasons, _ = validate(capsys, submission[0], results)
    assert code == 1 and reasons == [f"reidbench: rejected: {CURRENT_VERSION}/synthetic/tiny-pinned/m-fgsm-eps5-q8.json: computed on a "
                                     "subset of 8 queries (--queries); submit full runs"], reasons


def test_wrong_weights_hash_is_rejected(submission, tmp_path, capsys):
    zoo_file, results = submission
    entry = yaml.safe_load(zoo_file.read_text())[0]
    wrong = pinned_zoo(tmp_path / "zoo.yaml", {k: v for k, v in entry.items() if k != "weights"},
                       Path(entry["weights"]["path"]), "0" * 64)
    code, reasons, _ = validate(capsys, wrong, results)
    assert code == 1 and len(reasons) == 1
    assert "weights of 'tiny-pinned'" in reasons[0] and "do not match their sha256" in reasons[0]


def test_records_of_other_weights_are_rejected(submission, results, capsys):
    cell = results / CELL.format("tiny-pinned")
    record = json.loads(cell.read_text())
    record["model"]["weights_sha256"] = "f" * 64
    cell.write_text(json.dumps(record))
    code, reasons, _ = validate(capsys, submission[0], results)
    assert code == 1 and any("computed with weights ffffffffffff…, but the zoo pins" in r for r in reasons), reasons


def test_missing_files_and_unpinned_weights_are_rejected(submission, results, capsys):
    cell = results / CELL.format("tiny-pinned")
    cell.with_suffix(".npz").unlink()
    code, reasons, _ = validate(capsys, submission[0], results)
    assert code == 1 and any("missing file m-ifgsm-eps5.npz" in r for r in reasons), reasons
    cell.unlink()
    code, reasons, _ = validate(capsys, submission[0], results)
    assert code == 1 and any(f"missing file {cell}" in r for r in reasons), reasons
    code, reasons, _ = validate(capsys, submission[0], results, "tiny-unpinned")
    assert code == 1 and reasons == [
        "reidbench: rejected: weights of 'tiny-unpinned' are not pinned: a submission needs "
        "weights: {path: ..., sha256: ...} or {repo, file, revision, sha256}"]


def test_unknown_entry_is_a_one_line_error(submission, capsys):
    code = main(["validate", "tiny-pinnd", "--zoo", str(submission[0]), "--results", str(submission[1])])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("reidbench: error: ") and "did you mean 'tiny-pinned'" in err


def test_committed_subsets_follow_their_rule(tiny_split):
    content = json.loads(subset_file("v2").read_text())
    assert committed_subset(tiny_split, "v2") == choose_subset(tiny_split, content["n"], content["seed"])
    for split_hash, item in content["splits"].items():
        queries = item["queries"]
        assert queries == sorted(set(queries)) and len(queries) <= content["n"] and queries[-1] < item["num_query"]
    few = choose_subset(tiny_split, 8, seed=3)
    assert len(few) == 8 and few == sorted(few) and few == choose_subset(tiny_split, 8, seed=3)
    assert few != choose_subset(tiny_split, 8, seed=4)


# --- what a pull request submits ------------------------------------------------------------------
def git(cwd, *args):
    subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True, text=True)


def test_zoo_changed_lists_new_changed_borrowing_and_resubmitted_entries(tiny_zoo_file, tmp_path, capsys):
    base = yaml.safe_load(tiny_zoo_file.read_text())[0]
    entries = [{**base, "id": "a"}, {**{k: v for k, v in base.items() if k != "recipe"}, "id": "b", "defense": "rrp",
                                     "weights": {"from": "a"}}, {**base, "id": "c"}, {**base, "id": "d"}]
    zoo = tmp_path / "model_zoo.yaml"
    zoo.write_text(yaml.safe_dump(entries, sort_keys=False))
    git(tmp_path, "init", "-q", "-b", "main")
    git(tmp_path, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "--allow-empty", "-m", "root")
    git(tmp_path, "add", ".")
    git(tmp_path, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "-m", "base")
    git(tmp_path, "checkout", "-q", "-b", "pr")
    entries[0]["recipe"] = {**entries[0]["recipe"], "epochs": 31}  # a's weights change, so b's numbers do
    entries.append({**base, "id": "e"})
    zoo.write_text(yaml.safe_dump(entries, sort_keys=False))
    cell = tmp_path / "submissions" / "v2" / "synthetic" / "d" / "m-ifgsm-eps5.json"
    cell.parent.mkdir(parents=True)
    cell.write_text("{}")
    git(tmp_path, "add", ".")
    git(tmp_path, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "-m", "pr")
    assert submitted_entries("main", zoo, "submissions") == ["a", "b", "e", "d"]
    assert main(["zoo", "changed", "--base", "main", "--zoo", str(zoo), "--results", str(tmp_path / "submissions")]) == 0
    assert capsys.readouterr().out.split() == ["a", "b", "e", "d"]
    assert main(["zoo", "changed", "--base", "no-such-branch", "--zoo", str(zoo)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("reidbench: error: git merge-base no-such-branch HEAD") and "\n" not in err


def test_ci_workflow_runs_the_tests_and_validates_what_a_pull_request_submits():
    workflow = yaml.safe_load((REPO / ".github" / "workflows" / "ci.yml").read_text())
    assert "pull_request" in workflow[True]  # YAML 1.1 reads the key `on` as True
    steps = [step.get("run", "") for job in workflow["jobs"].values() for step in job["steps"]]
    assert any(".ci/run" in run for run in steps)
    validate_step = next(run for run in steps if "reidbench validate" in run)
    assert "reidbench zoo changed --base" in validate_step and "--results submissions" in validate_step


def test_the_records_of_a_real_run_with_a_transfer_cell_are_accepted(submission, tmp_path, capsys):
    """What `run --all` writes validates as it is: a transfer cell records the surrogate the
    run handed it (the protocol's), which a freshly rebuilt attack does not know yet; a
    surrogate other than the protocol's is one rejection."""
    zoo_file, _ = submission
    entries = yaml.safe_load(zoo_file.read_text())
    surrogate = {**entries[-1], "id": load_protocol().surrogate("synthetic")}
    surrogate["recipe"] = {**surrogate["recipe"], "epochs": 2}
    zoo_file = tmp_path / "model_zoo.yaml"
    zoo_file.write_text(yaml.safe_dump(entries + [surrogate], sort_keys=False))
    zoo = load_zoo(zoo_file)
    results = tmp_path / "results"
    Runner(zoo, results_root=results, device="cpu", rerank=False, progress=False).run(
        [zoo["tiny-pinned"]], ["m-ifgsm", "transfer"])
    code, reasons, _ = validate(capsys, zoo_file, results)
    assert code == 0, reasons

    cell = results / "v2/synthetic/tiny-pinned/transfer-eps5.json"
    record = json.loads(cell.read_text())
    record["attack"]["surrogate"] = "some-other-model"
    cell.write_text(json.dumps(record))
    code, reasons, _ = validate(capsys, zoo_file, results)
    assert code != 0 and any("fixes 'resnet34-synthetic-surrogate'" in r for r in reasons), reasons
