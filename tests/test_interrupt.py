"""Nothing is lost when a run is killed: during training, during a cell, or while the site is
written. Each case kills the real command (SIGKILL, no chance to clean up), runs it again and
checks that it picks up where it stopped and ends where an uninterrupted run ends."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from reidbench.results import cell_intact, read_cell

from conftest import TINY_ZOO

ZOO = TINY_ZOO.replace("epochs: 30", "epochs: 8")  # a few checkpoints to kill between
assert ZOO != TINY_ZOO, "conftest.TINY_ZOO no longer says epochs: 30; update the replacement"
ATTACKS = ["m-fgsm", "m-ifgsm", "fna", "odfa"]


def command(tmp_path: Path, cache: Path, name: str) -> tuple[list[str], dict]:
    zoo = tmp_path / "zoo.yaml"
    zoo.write_text(ZOO)
    args = [sys.executable, "-m", "reidbench.cli", "run", "--zoo", str(zoo), "--model", "tiny-none",
            "--attack", *ATTACKS, "--results", str(tmp_path / name / "results"), "--site", str(tmp_path / name / "site"),
            "--no-rerank"]
    env = {**os.environ, "REIDBENCH_CACHE": str(cache), "REIDBENCH_QUIET": "1", "OMP_NUM_THREADS": "1"}
    return args, env


def kill_when(args, env, ready, timeout: float = 240) -> None:
    """Start the command and SIGKILL it as soon as ``ready()`` holds (it must not finish first)."""
    process = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    started = time.time()
    while not ready():
        assert process.poll() is None, f"the run ended before the kill point: {process.stderr.read().decode()[-2000:]}"
        assert time.time() - started < timeout, "the kill point never came"
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()


def run(args, env) -> None:
    done = subprocess.run(args, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]


def cells(results: Path) -> dict:
    out = {}
    for path in sorted(results.rglob("*.json")):
        record = read_cell(path)
        assert record is not None and cell_intact(path, record), path
        data = json.loads(path.read_text())
        out[path.name] = {label: {m: data[label][m] for m in ("rank1", "mAP")} for label in ("clean", "attacked")}
    return out


def leftovers(*folders: Path) -> list[Path]:
    return [p for folder in folders if folder.exists() for p in folder.rglob("*") if ".tmp" in p.name]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted run, in its own cache."""
    tmp = tmp_path_factory.mktemp("uninterrupted")
    args, env = command(tmp, tmp / "cache", "run")
    run(args, env)
    return cells(tmp / "run" / "results")


def test_killed_during_training_then_during_a_cell_it_resumes_and_ends_as_an_uninterrupted_run(tmp_path, reference):
    cache = tmp_path / "cache"
    args, env = command(tmp_path, cache, "run")
    results = tmp_path / "run" / "results"

    # 1. Killed after an epoch's checkpoint, before the last epoch.
    kill_when(args, env, lambda: any(cache.glob("weights/*/last_state.pt")))  # the state is saved after the weights
    assert not any(cache.glob("weights/*/model.safetensors")) and not results.exists()

    # 2. Run again: training resumes from the checkpoint; killed once the first cell is written.
    def first_cell():
        return results.exists() and any(results.rglob("*.json"))

    kill_when(args, env, first_cell)
    record = json.loads(next(cache.glob("weights/*/training.json")).read_text())
    assert 0 < record["epochs_this_run"] < 8, record  # the interrupted run's epochs were kept
    kept = {p: p.stat().st_mtime_ns for p in results.rglob("*.json")}
    assert kept and len(kept) < len(ATTACKS)

    # 3. Run again to the end: the cells already written are reused, not recomputed.
    run(args, env)
    assert all(p.stat().st_mtime_ns == mtime for p, mtime in kept.items())
    assert set(cells(results)) == set(reference)
    assert not leftovers(cache, tmp_path / "run")
    # Resumed training reaches the same weights up to float rounding, hence the same numbers.
    for name, metrics in cells(results).items():
        for label, values in metrics.items():
            for metric, value in values.items():
                assert value == pytest.approx(reference[name][label][metric], abs=0.02), (name, label, metric)
    assert (tmp_path / "run" / "site" / "index.html").exists()


def test_killed_while_the_site_is_written_the_next_render_is_complete(tmp_path, reference, monkeypatch):
    """The site's files are written one by one, each atomically: a render killed in the middle
    leaves whole files of two renders, and the next render is the one an uninterrupted run gives."""
    import reidbench.leaderboard.site as site

    args, env = command(tmp_path, tmp_path / "cache", "run")
    run(args, env)
    results = tmp_path / "run" / "results"
    clean = tmp_path / "clean-site"
    site.render_site(results, clean)

    target = tmp_path / "site"
    real_write, written = site._write, []

    def write_then_die(path, text):
        if len(written) == 3:
            raise KeyboardInterrupt
        real_write(path, text)
        written.append(path)

    monkeypatch.setattr(site, "_write", write_then_die)
    with pytest.raises(KeyboardInterrupt):
        site.render_site(results, target)
    monkeypatch.setattr(site, "_write", real_write)
    assert not leftovers(target)
    site.render_site(results, target)
    produced = {p.relative_to(target): p.read_bytes() for p in target.rglob("*") if p.is_file()}
    expected = {p.relative_to(clean): p.read_bytes() for p in clean.rglob("*") if p.is_file()}
    assert produced == expected
