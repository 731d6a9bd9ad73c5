"""`reidbench run --all --suite market-cpu` needs no hand steps: the shipped zoo's ImageNet-initialised
Market suite (a pinned trunk, a baseline fine-tuned by the defenses, borrowed weights, APD's
frozen feature net, DDID's DDPM) trains and evaluates from an empty cache with one command.

Run here at toy size: the zoo's own market-cpu entries with a fake Market folder, a random trunk
pinned by its sha256 in place of the ImageNet one, one epoch and tiny DDPM / MPG-Net budgets.
The full-size run's cost is in benchmarks/results/market-imagenet.md."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import random_mobilenet_trunk

ROOT = Path(__file__).resolve().parents[1]


def _fake_market(root: Path, ids: int = 12, cams: int = 3, per_cam: int = 2) -> None:
    import numpy as np
    from PIL import Image

    folder = root / "market1501-trainsplit" / "bounding_box_train"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for pid in range(1, ids + 1):
        colour = rng.integers(0, 256, 3)  # one colour per identity, noise per image: learnable, not trivial
        for cam in range(1, cams + 1):
            for n in range(per_cam):
                pixels = np.clip(colour + rng.normal(0, 40, (64, 32, 3)), 0, 255).astype("uint8")
                Image.fromarray(pixels).save(folder / f"{pid:04d}_c{cam}s1_{pid * 100 + cam * 10 + n:06d}_01.jpg")


def _toy_zoo(path: Path, weights: Path) -> tuple[list[str], str]:
    """The shipped zoo's market-cpu entries at toy size, their pinned trunk replaced by a random one
    written under ``weights``; returns their ids and the random trunk's sha256."""
    text = (ROOT / "model_zoo.yaml").read_text()
    market = [e for e in yaml.safe_load(text) if "market-cpu" in e.get("suite", [])]
    trunk = market[0]["model"]["pretrained"]  # every entry pins this one, directly or in APD's feature net
    fake_sha = random_mobilenet_trunk(weights / trunk["file"])
    entries = [e for e in yaml.safe_load(text.replace(trunk["sha256"], fake_sha)) if "market-cpu" in e.get("suite", [])]
    for entry in entries:
        entry["dataset"] = {**entry["dataset"], "num_train_ids": 6}
        entry["model"] = {**entry["model"], "input_size": [64, 32]}
        if "recipe" in entry:
            entry["recipe"] = {**entry["recipe"], "epochs": 1, "warmup_epochs": 0, "batch": {"p": 4, "k": 2},
                               **({"milestones": [1]} if "milestones" in entry["recipe"] else {})}
        name = entry["defense"]["name"]
        if name == "ddid":
            entry["defense"].update(ddpm_size=[16, 8], ddpm_channels=8, ddpm_levels=[1, 2], ddpm_steps=5,
                                    ddpm_batch=8, sample_steps=2)
        if name == "apd":
            entry["defense"].update(mpg_steps=2, mpg_batch=4)
    path.write_text(yaml.safe_dump(entries, sort_keys=False))
    return [e["id"] for e in entries], fake_sha


@pytest.mark.slow
def test_the_market_suite_runs_from_an_empty_cache_with_one_command(tmp_path):
    from reidbench.leaderboard import render_site

    _fake_market(tmp_path / "data")
    ids, fake_sha = _toy_zoo(tmp_path / "zoo.yaml", tmp_path / "weights")
    assert len(ids) >= 10 and any(i.endswith("-ddid") for i in ids) and any(i.endswith("-apd") for i in ids)

    env = dict(os.environ, REIDBENCH_CACHE=str(tmp_path / "cache"), REIDBENCH_DATA=str(tmp_path / "data"),
               REIDBENCH_WEIGHTS=str(tmp_path / "weights"))
    command = [sys.executable, "-m", "reidbench.cli", "run", "--all", "--suite", "market-cpu", "--zoo",
               str(tmp_path / "zoo.yaml"), "--attack", "m-ifgsm", "--no-rerank", "--results", str(tmp_path / "results"),
               "--site", str(tmp_path / "site")]
    done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=1500)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    records = {p: json.loads(p.read_text()) for p in (tmp_path / "results").rglob("*.json")}
    assert sorted({r["model"]["id"] for r in records.values()}) == sorted(ids)
    for record in records.values():  # every model starts from the pinned trunk, directly or through its base
        assert fake_sha in json.dumps(record["model"]), record["model"]["id"]
    index = (tmp_path / "site" / "index.html").read_text()
    assert all(i in index for i in ids)

    # the same command on the finished cache recomputes nothing
    mtimes = {p: p.stat().st_mtime_ns for p in records}
    again = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert {p: p.stat().st_mtime_ns for p in records} == mtimes
    render_site(tmp_path / "results", tmp_path / "site2")  # the records render on their own too
