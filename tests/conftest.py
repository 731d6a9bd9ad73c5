import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED_MARKET = REPO.parent / "shared" / "data" / "market1501-trainsplit"

TINY_ZOO = """
- id: tiny-none
  backbone: resnet10t
  dataset: {name: synthetic, preset: tiny}
  defense: none
  model: {input_size: [64, 32], last_stride: 1}
  recipe: {epochs: 30, batch: {p: 8, k: 4}, lr: 1.0e-3, warmup_epochs: 2, random_erasing: 0.0}
"""


@pytest.fixture(scope="session", autouse=True)
def _isolated_cache(tmp_path_factory):
    """Every test shares one throw-away cache, never the user's ~/.cache/reidbench."""
    cache = tmp_path_factory.mktemp("reidbench-cache")
    old = {k: os.environ.get(k) for k in ("REIDBENCH_CACHE", "REIDBENCH_QUIET")}
    os.environ["REIDBENCH_CACHE"] = str(cache)
    os.environ["REIDBENCH_QUIET"] = "1"
    # OMP_NUM_THREADS wins: on a loaded machine two spinning threads per test process are far slower than one.
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS") or min(2, os.cpu_count() or 1)))
    yield cache
    for key, value in old.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.fixture(scope="session")
def tiny_split():
    from reidbench.data import build_dataset

    return build_dataset("synthetic", preset="tiny")


@pytest.fixture(scope="session")
def tiny_zoo_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("zoo") / "model_zoo.yaml"
    path.write_text(TINY_ZOO)
    return path


@pytest.fixture(scope="session")
def tiny_model(tiny_zoo_file, tiny_split):
    """The tiny baseline, trained once per session through the zoo (a few seconds)."""
    from reidbench.defense import DefendedModel, build_defense
    from reidbench.models import build_model
    from reidbench.zoo import load_weights, load_zoo, obtain_weights

    entry = load_zoo(tiny_zoo_file)["tiny-none"]
    weights = obtain_weights(entry, tiny_split, progress=False)
    model = build_model(entry.model_spec())
    load_weights(model, weights, entry.id)
    return DefendedModel(model, build_defense(entry.defense)).eval()


@pytest.fixture(scope="session")
def tiny_vi_split():
    """Visible-infrared tracklets: 8 train / 6 test identities, 4 frames of 64x32."""
    from reidbench.data import build_dataset

    return build_dataset("synthetic-vi", preset="tiny")


def zoo_with_borrower(tiny_zoo_file, path, entry_id: str, defense: str = "none"):
    """The tiny zoo plus ``entry_id``: ``defense`` on tiny-none's trained weights (weights.from)."""
    path.write_text(tiny_zoo_file.read_text() + f"""
- id: {entry_id}
  backbone: resnet10t
  dataset: {{name: synthetic, preset: tiny}}
  defense: {defense}
  model: {{input_size: [64, 32], last_stride: 1}}
  weights: {{from: tiny-none}}
""")
    return path


def random_mobilenet_trunk(path: Path) -> str:
    """A MobileNetV2 trunk in torchvision's key layout with random values, written to ``path``:
    the shared ImageNet file's layout, without needing it. Returns the file's sha256."""
    import hashlib

    import torchvision
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v for k, v in torchvision.models.mobilenet_v2().state_dict().items() if k.startswith("features.")},
              str(path))
    return hashlib.sha256(path.read_bytes()).hexdigest()


def benchmark_script(name: str):
    """benchmarks/<name>.py loaded as a module, so that a test calls its functions and main()
    in-process (the scripts are not a package)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def cell_record(**fields):
    """A complete cell record of a made-up white-box cell, for tests that need records without
    running one; ``fields`` (top-level keys of the record's JSON) replace its own, and a field
    given as None is left out."""
    from reidbench.record import CellRecord

    data = {
        "schema": 1, "input_key": "k", "attack_id": "m-ifgsm-eps5", "threat_model": "white-box", "perturbed": "query",
        "protocol": {"version": "v2", "fingerprint": "f"},
        "model": {"id": "m-none", "backbone": "resnet18", "defense": {"name": "none"}, "weights_sha256": "ab" * 32,
                  "recipe": {"epochs": 30}, "model": {"input_size": [64, 32]}, "train_dataset": {"name": "synthetic"}},
        "dataset": {"name": "synthetic", "split_hash": "s1", "num_query": 12},
        "attack": {"name": "m-ifgsm", "eps": 5 / 255},
        "clean": {"rank1": 0.9, "rank5": 0.95, "rank10": 1.0, "mAP": 0.8, "mINP": 0.5},
        "attacked": {"rank1": 0.15, "rank5": 0.5, "rank10": 0.6, "mAP": 0.3, "mINP": 0.1},
        "clean_reranked": {"rank1": 0.92, "mAP": 0.85}, "attacked_reranked": {"rank1": 0.2, "mAP": 0.25},
        "perturbation": {"eps": 5 / 255, "linf_max": 5 / 255, "l2_mean": 1.0},
        "sanity_flags": [], "seed": 0, "device": "cpu", "wall_time_s": 1.5,
        "environment": {"versions": {"torch": "2.x", "reidbench": "0.1.0"}, "git_commit": "abc1234", "python": "3.11",
                        "platform": "linux", "cpu_count": 2, "cuda": None},
        **fields,
    }
    return CellRecord.from_json({key: value for key, value in data.items() if value is not None})


@pytest.fixture
def no_attack_built(monkeypatch):
    """Building any attack fails: what runs under it must read the attacks' traits from their
    registered classes."""
    from reidbench.attack import Attack

    def refuse(self, *args, **kwargs):
        raise AssertionError(f"attack '{self.registry_name}' was built")

    monkeypatch.setattr(Attack, "__init__", refuse)
