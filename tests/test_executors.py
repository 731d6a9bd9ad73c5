"""Executors: the Ray executor plans one training per model and writes what the local one writes."""

import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from reidbench.cli import main
from reidbench.errors import ReIDBenchError
from reidbench.executors import LocalExecutor, ProcessExecutor, RayExecutor, RunSpec, models_needed, training_dependencies
from reidbench.protocol import load_protocol
from reidbench.zoo import load_zoo

REPO = Path(__file__).resolve().parents[1]
# Provenance that differs between any two runs; everything else must be equal.
RUN_SPECIFIC = ("wall_time_s", "environment")


def grid_zoo(tiny_zoo_file, path: Path) -> Path:
    """A tiny model no other test trains (so the first executor trains it) and an
    inference-only stochastic defense borrowing its weights."""
    base = yaml.safe_load(tiny_zoo_file.read_text())[0]
    model = {**base, "id": "tiny-grid", "recipe": {**base["recipe"], "epochs": 3}}
    rrp = {**{k: v for k, v in base.items() if k != "recipe"}, "id": "tiny-grid-rrp", "defense": "rrp",
           "weights": {"from": "tiny-grid"}}
    path.write_text(yaml.safe_dump([model, rrp], sort_keys=False))
    return path


def test_every_model_is_trained_once_before_the_cells_that_need_it(tiny_zoo_file, tmp_path, no_attack_built):
    zoo = load_zoo(grid_zoo(tiny_zoo_file, tmp_path / "zoo.yaml"))
    protocol = load_protocol()
    assert models_needed(zoo, ["tiny-grid", "tiny-grid-rrp"], ["m-fgsm", "sma"], protocol) == {
        "tiny-grid": ["tiny-grid"], "tiny-grid-rrp": ["tiny-grid"]}
    # A transfer attack also needs the protocol's surrogate, whichever zoo entry trains it.
    surrogate = protocol.surrogate("synthetic")
    zoo_text = (tmp_path / "zoo.yaml").read_text() + yaml.safe_dump(
        [{**yaml.safe_load(tiny_zoo_file.read_text())[0], "id": surrogate}], sort_keys=False)
    (tmp_path / "zoo.yaml").write_text(zoo_text)
    zoo = load_zoo(tmp_path / "zoo.yaml")
    assert models_needed(zoo, ["tiny-grid-rrp"], ["m-fgsm", "transfer"], protocol) == {
        "tiny-grid-rrp": ["tiny-grid", surrogate]}


class FakeRay:
    """Records what the Ray driver submits, with which resources and dependencies."""

    def __init__(self, gpus: int = 0):
        self.gpus, self.calls, self.initialized = gpus, [], False

    def is_initialized(self):
        return self.initialized

    def init(self, **kwargs):
        self.initialized = True

    def shutdown(self):
        self.initialized = False

    def cluster_resources(self):
        return {"CPU": 2.0, "GPU": float(self.gpus)}

    def remote(self, function):
        fake = self

        class Task:
            def __init__(self, options=None):
                self.opts = options or {}

            def options(self, **options):
                return Task(options)

            def remote(self, *args):
                ref = ("ref", len(fake.calls))
                fake.calls.append((function.__name__, self.opts, args, ref))
                return ref

        return Task()

    def wait(self, pending, num_returns=1):
        return pending[:num_returns], pending[num_returns:]

    def get(self, ref):
        name, _, args, _ = self.calls[ref[1]]
        return ("ok", "sha") if name == "prepare_model" else ("ok", f"/results/{args[1]}-{args[2]}.json")

    def cancel(self, ref):
        pass


@pytest.mark.parametrize("device, gpus", [("cpu", 0), ("cuda", 1), ("auto", 1)])
def test_the_ray_driver_trains_each_model_once_and_cells_wait_for_it(tiny_zoo_file, tmp_path, monkeypatch, device, gpus):
    fake = FakeRay(gpus=1)
    monkeypatch.setitem(sys.modules, "ray", fake)
    zoo_file = grid_zoo(tiny_zoo_file, tmp_path / "zoo.yaml")
    spec = RunSpec(zoo=str(zoo_file), results=str(tmp_path), device=device)
    paths = RayExecutor().run(spec, ["tiny-grid", "tiny-grid-rrp"], ["m-fgsm", "sma"])
    assert [p.name for p in paths] == ["tiny-grid-m-fgsm.json", "tiny-grid-sma.json", "tiny-grid-rrp-m-fgsm.json",
                                       "tiny-grid-rrp-sma.json"]
    prepares = [call for call in fake.calls if call[0] == "prepare_model"]
    cells = [call for call in fake.calls if call[0] == "run_cell"]
    assert [args[1] for _, _, args, _ in prepares] == ["tiny-grid"]  # once, though two entries share it
    assert all(args[-1] == prepares[0][3] for _, _, args, _ in cells)  # every cell waits for it
    for _, options, args, _ in fake.calls:
        assert options == {"num_gpus": gpus, "num_cpus": 1}
        assert args[0].device == ("cuda" if gpus else "cpu") and not args[0].progress
    assert not fake.initialized  # the driver shuts down the instance it started


def test_missing_ray_is_one_line_naming_the_extra(tiny_zoo_file, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray -> ImportError
    code = main(["run", "--all", "--executor", "ray", "--zoo", str(tiny_zoo_file), "--results", str(tmp_path)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err == "reidbench: error: the ray executor needs Ray: pip install 'reidbench[ray]'"


def comparable(results: Path) -> dict:
    cells = {}
    for path in sorted(results.rglob("*.json")):
        record = json.loads(path.read_text())
        for key in RUN_SPECIFIC:
            record.pop(key)
        with np.load(path.with_suffix(".npz")) as data:
            record["per_query"] = {k: data[k].tolist() for k in data.files}
        cells[path.relative_to(results).as_posix()] = record
    return cells


@pytest.fixture(scope="module")
def local_ray():
    ray = pytest.importorskip("ray")
    old = os.environ.get("PYTHONPATH")
    # Workers inherit the environment: this checkout's code, and the tests' cache (conftest).
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), old]))
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()
    if old is None:
        os.environ.pop("PYTHONPATH")
    else:
        os.environ["PYTHONPATH"] = old


@pytest.mark.slow
def test_ray_and_local_runs_write_identical_results(local_ray, tiny_zoo_file, tmp_path):
    zoo_file = grid_zoo(tiny_zoo_file, tmp_path / "zoo.yaml")
    grid = (["tiny-grid", "tiny-grid-rrp"], ["m-fgsm", "sma"])  # sma starts at a seeded random point
    spec = RunSpec(zoo=str(zoo_file), results=str(tmp_path / "ray"), device="cpu", progress=False)
    ray_paths = RayExecutor().run(spec, *grid)  # trains tiny-grid first, in one task
    local_spec = RunSpec(zoo=str(zoo_file), results=str(tmp_path / "local"), device="cpu", progress=False)
    local_paths = LocalExecutor().run(local_spec, *grid)
    assert [p.relative_to(tmp_path / "ray") for p in ray_paths] == [p.relative_to(tmp_path / "local") for p in local_paths]
    assert len(ray_paths) == 4
    ray_cells, local_cells = comparable(tmp_path / "ray"), comparable(tmp_path / "local")
    assert ray_cells == local_cells
    rrp = ray_cells["v2/synthetic/tiny-grid-rrp/sma-eps5.json"]
    assert rrp["model"]["stochastic"] and rrp["attack"]["eot_samples"] == 10

    # The store is shared: a second Ray run finds every cell done and rewrites nothing.
    before = {p: p.stat().st_mtime_ns for p in ray_paths}
    assert RayExecutor().run(spec, *grid) == ray_paths
    assert {p: p.stat().st_mtime_ns for p in ray_paths} == before


def test_cells_the_protocol_does_not_define_are_neither_planned_nor_submitted(tiny_zoo_file, tmp_path, monkeypatch):
    """Protocol v2 fixes no transfer surrogate for video data: a video entry needs no surrogate
    and its transfer cells are skipped, while its other cells run."""
    video = {**yaml.safe_load(tiny_zoo_file.read_text())[0], "id": "tiny-video",
             "dataset": {"name": "synthetic-vi", "preset": "tiny"}, "model": {"input_size": [32, 16], "video": {}}}
    zoo_file = tmp_path / "zoo.yaml"
    zoo_file.write_text(yaml.safe_dump([video], sort_keys=False))
    protocol = load_protocol()
    assert not protocol.has_surrogate("synthetic-vi")
    assert models_needed(load_zoo(zoo_file), ["tiny-video"], ["m-fgsm", "transfer"], protocol) == {
        "tiny-video": ["tiny-video"]}
    fake = FakeRay()
    monkeypatch.setitem(sys.modules, "ray", fake)
    spec = RunSpec(zoo=str(zoo_file), results=str(tmp_path), device="cpu")
    paths = RayExecutor().run(spec, ["tiny-video"], ["m-fgsm", "transfer", "dmr"])
    assert [p.name for p in paths] == ["tiny-video-m-fgsm.json"]


def test_worker_processes_write_what_one_process_writes(tiny_zoo_file, tmp_path, monkeypatch):
    """Two single-threaded workers, models trained first: the same cells, bit for bit, as the
    local executor with one thread (the thread count may move floating-point sums)."""
    import torch

    zoo_file = grid_zoo(tiny_zoo_file, tmp_path / "zoo.yaml")
    # With the protocol's surrogate: its cells run on one model first, then on the others.
    surrogate = {**yaml.safe_load(tiny_zoo_file.read_text())[0], "id": load_protocol().surrogate("synthetic")}
    surrogate["recipe"] = {**surrogate["recipe"], "epochs": 2}
    zoo_file.write_text(zoo_file.read_text() + yaml.safe_dump([surrogate], sort_keys=False))
    grid = (["tiny-grid", "tiny-grid-rrp"], ["m-fgsm", "transfer", "sma"])
    monkeypatch.setattr(os, "cpu_count", lambda: 2)  # one thread per worker, whatever runs the test
    spec = RunSpec(zoo=str(zoo_file), results=str(tmp_path / "processes"), device="cpu", progress=False)
    paths = ProcessExecutor(jobs=2).run(spec, *grid)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        local_spec = RunSpec(zoo=str(zoo_file), results=str(tmp_path / "local"), device="cpu", progress=False)
        local_paths = LocalExecutor().run(local_spec, *grid)
    finally:
        torch.set_num_threads(threads)
    assert [p.relative_to(tmp_path / "processes") for p in paths] == [p.relative_to(tmp_path / "local") for p in local_paths]
    assert len(paths) == 6
    assert comparable(tmp_path / "processes") == comparable(tmp_path / "local")


def test_trainings_wait_for_the_models_they_start_from(tiny_zoo_file, tmp_path):
    base = yaml.safe_load(tiny_zoo_file.read_text())[0]
    tuned = {**base, "id": "tiny-tuned", "defense": "jad-proactive", "init": {"from": "tiny-none"}}
    zoo_file = tmp_path / "zoo.yaml"
    zoo_file.write_text(yaml.safe_dump([base, tuned], sort_keys=False))
    zoo = load_zoo(zoo_file)
    assert training_dependencies(zoo, "tiny-tuned") == ["tiny-none"]
    assert training_dependencies(zoo, "tiny-none") == []
    with pytest.raises(ReIDBenchError, match="--jobs"):
        ProcessExecutor(jobs=0)


def test_the_whole_suite_adds_the_secondary_budget_and_the_oblivious_reference(tiny_zoo_file, tmp_path):
    """`run --all` without --attack: the grid at the primary ε, M-I-FGSM at the secondary ε,
    and the oblivious attack against a model whose defense transforms its input only."""
    from reidbench.grid import protocol_grid
    from reidbench.runner import attack_id

    zoo = load_zoo(grid_zoo(tiny_zoo_file, tmp_path / "zoo.yaml"))
    protocol = load_protocol()
    cells = {(entry.id, attack_id(name, eps)) for entry, name, eps in protocol_grid(protocol, list(zoo.values()))}
    primary = {attack_id(name, protocol.eps) for name in protocol.attacks()}
    for model in ("tiny-grid", "tiny-grid-rrp"):
        assert primary <= {cell for entry, cell in cells if entry == model}
        assert (model, attack_id("m-ifgsm", protocol.eps_secondary)) in cells
    assert ("tiny-grid-rrp", attack_id("oblivious", protocol.eps)) in cells
    assert ("tiny-grid", attack_id("oblivious", protocol.eps)) not in cells
    # Naming attacks runs exactly those.
    named = {attack_id(name, eps) for _, name, eps in protocol_grid(protocol, list(zoo.values()), ["m-fgsm"])}
    assert named == {attack_id("m-fgsm", protocol.eps)}
    # Named, the oblivious attack too runs only where there is a transform (the Python API's path).
    named = {(entry.id, name) for entry, name, _ in protocol_grid(protocol, list(zoo.values()), ["oblivious"])}
    assert ("tiny-grid-rrp", "oblivious") in named and ("tiny-grid", "oblivious") not in named
