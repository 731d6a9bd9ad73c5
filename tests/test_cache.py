"""The cache survives corruption: every damaged artefact is one warning line and a rebuild."""

import json
import os

import numpy as np
import pytest
import torch

from conftest import cell_record
from reidbench import cache
from reidbench.cache import CorruptArtefact, atomic_write, check_file, load_or_build, load_verified, sidecar
from reidbench.cli import main
from reidbench.results import cell_intact, npz_bytes, read_cell, read_per_query, write_cell


@pytest.fixture
def loud(monkeypatch):
    """Let warning lines through (the test session runs with REIDBENCH_QUIET=1)."""
    monkeypatch.setenv("REIDBENCH_QUIET", "0")


def warning_lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("warning:")]


def test_atomic_write_records_size_and_hash_and_check_finds_damage(tmp_path):
    path = tmp_path / "a" / "blob.bin"
    stamp = atomic_write(path, b"x" * 1000)
    assert stamp["bytes"] == 1000 and json.loads(sidecar(path).read_text()) == stamp
    assert check_file(path) is None
    assert not [p for p in path.parent.iterdir() if p.name.endswith(".tmp")]
    path.write_bytes(b"x" * 999)
    assert "999 bytes, 1000 were written" in check_file(path)
    path.write_bytes(b"y" * 1000)  # same size, other content
    assert "sha256" in check_file(path)


def test_a_failed_best_effort_write_is_one_line_and_no_file(tmp_path, loud, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("")
    assert atomic_write(blocker / "sub" / "x.bin", b"data", best_effort=True) is None
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "could not write cache file" in err[0]
    with pytest.raises(OSError):
        atomic_write(blocker / "sub" / "x.bin", b"data")


def test_load_or_build_rebuilds_a_damaged_file_once(tmp_path, loud, capsys):
    path = tmp_path / "t.pt"
    builds = []

    def build():
        builds.append(1)
        return {"x": torch.arange(100)}

    def run():
        return load_or_build(path, lambda p: torch.load(p, weights_only=True), build, cache.save_torch, "tensor")

    assert torch.equal(run()["x"], torch.arange(100)) and len(builds) == 1
    assert torch.equal(run()["x"], torch.arange(100)) and len(builds) == 1  # loaded, not rebuilt
    path.write_bytes(path.read_bytes()[:50])  # truncated after it was written
    assert torch.equal(run()["x"], torch.arange(100)) and len(builds) == 2
    (line,) = warning_lines(capsys.readouterr().err)
    assert f"corrupt cached tensor {path}" in line and "were written" in line and "rebuilding" in line


def test_a_file_without_sidecar_that_does_not_load_is_rebuilt(tmp_path, loud, capsys):
    path = tmp_path / "old.pt"
    path.write_bytes(b"not a torch file")  # written before sidecars existed
    assert load_verified(path, lambda p: torch.load(p, weights_only=True), "old file") is None
    assert not path.exists()
    assert len(warning_lines(capsys.readouterr().err)) == 1


def test_truncated_cached_weights_are_one_line_and_retrained(tiny_zoo_file, tiny_model, tmp_path, loud, capsys):
    from reidbench.zoo import load_zoo, trained_weights_file

    weights = trained_weights_file(load_zoo(tiny_zoo_file)["tiny-none"])
    intact = weights.read_bytes()
    weights.write_bytes(intact[: len(intact) // 2])  # a killed copy
    argv = ["eval", "--model", "tiny-none", "--zoo", str(tiny_zoo_file), "--results", str(tmp_path), "--device", "cpu",
            "--no-rerank"]
    assert main(argv) == 0
    err = capsys.readouterr().err
    assert "Traceback" not in err and "SafetensorError" not in err
    (line,) = warning_lines(err)
    assert f"corrupt cached weights {weights}" in line
    assert check_file(weights) is None and weights.stat().st_size == len(intact)  # retrained, same recipe


def test_truncated_weights_without_retraining_are_one_line(tiny_zoo_file, tiny_model, tmp_path, loud, capsys):
    from reidbench.zoo import load_zoo, trained_weights_file

    weights = trained_weights_file(load_zoo(tiny_zoo_file)["tiny-none"])
    intact = weights.read_bytes()
    try:
        weights.write_bytes(intact[:1000])
        sidecar(weights).unlink()  # an old cache: nothing to compare with, the file itself is checked
        argv = ["eval", "--model", "tiny-none", "--zoo", str(tiny_zoo_file), "--results", str(tmp_path),
                "--device", "cpu", "--no-train"]
        assert main(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 2 and "corrupt cached weights" in err[0], err
        assert err[1].startswith("reidbench: error: no weights for 'tiny-none' yet")
    finally:
        atomic_write(weights, intact)


def test_a_user_weights_file_that_is_truncated_is_one_error(tmp_path):
    from safetensors.torch import save_file

    from reidbench.errors import ReIDBenchError
    from reidbench.zoo import read_state_dict

    path = tmp_path / "mine.safetensors"
    save_file({"w": torch.zeros(100)}, str(path))
    path.write_bytes(path.read_bytes()[:60])
    with pytest.raises(ReIDBenchError, match="cannot read weights .*mine.safetensors"):
        read_state_dict(path)


def test_npz_is_byte_reproducible_and_checked_against_its_record(tmp_path):
    arrays = {"clean_ap": np.arange(5, dtype=np.float32), "query_pids": np.arange(5)}
    assert npz_bytes(arrays) == npz_bytes(dict(reversed(list(arrays.items()))))
    path = tmp_path / "cell.json"
    write_cell(path, cell_record(), arrays)
    record = read_cell(path)
    assert record.per_query.bytes == path.with_suffix(".npz").stat().st_size
    assert np.array_equal(read_per_query(path)["clean_ap"], arrays["clean_ap"])
    damaged = bytearray(path.with_suffix(".npz").read_bytes())
    damaged[-30] ^= 0xFF
    path.with_suffix(".npz").write_bytes(bytes(damaged))
    with pytest.raises(CorruptArtefact, match="per-query outcomes .*cell.npz are damaged"):
        read_per_query(path)
    assert not cell_intact(path, record)


def test_a_corrupt_npz_beside_a_valid_json_is_recomputed(tiny_zoo_file, tiny_model, tmp_path, loud, capsys):
    results = tmp_path / "results"
    argv = ["run", "--model", "tiny-none", "--attack", "m-fgsm", "--zoo", str(tiny_zoo_file), "--results", str(results),
            "--site", str(tmp_path / "site"), "--device", "cpu", "--no-rerank"]
    assert main(argv) == 0
    (cell,) = results.rglob("*.json")
    npz = cell.with_suffix(".npz")
    intact = npz.read_bytes()
    npz.write_bytes(intact[:-100])
    capsys.readouterr()
    assert main(argv) == 0
    err = capsys.readouterr().err
    assert "Traceback" not in err
    (line,) = warning_lines(err)
    assert f"per-query outcomes {npz} are damaged" in line and "computing the cell again" in line
    assert npz.read_bytes() == intact  # the same outcomes, written again


def test_cache_verify_and_clean_commands(tiny_zoo_file, tiny_model, tmp_path, monkeypatch, capsys):
    from reidbench.zoo import load_zoo, trained_weights_dir

    root = tmp_path / "cache"
    monkeypatch.setenv("REIDBENCH_CACHE", str(root))
    atomic_write(root / "synthetic" / "good.pt", b"good")
    atomic_write(root / "decoded" / "bad.pt", b"bad data")
    (root / "decoded" / "bad.pt").write_bytes(b"bad dat")
    assert main(["cache", "verify"]) == 1
    out = capsys.readouterr()
    assert "decoded/bad.pt" in out.out and "good.pt" not in out.out and "1 damaged" in out.out
    assert main(["cache", "verify", "--delete"]) == 1
    assert not (root / "decoded" / "bad.pt").exists()
    assert main(["cache", "verify"]) == 0

    entry = load_zoo(tiny_zoo_file)["tiny-none"]
    folder = root / "weights" / trained_weights_dir(entry).name
    atomic_write(folder / "model.safetensors", b"weights")
    capsys.readouterr()
    assert main(["cache", "clean", "--model", "tiny-none", "--zoo", str(tiny_zoo_file)]) == 0
    assert not folder.exists() and (root / "synthetic" / "good.pt").exists()
    assert main(["cache", "clean", "--model", "nope", "--zoo", str(tiny_zoo_file)]) == 2
    assert main(["cache", "clean"]) == 0
    assert not root.exists() or not any(root.iterdir())


def test_damaged_hub_weights_are_fetched_again(tmp_path, loud, monkeypatch, capsys):
    import huggingface_hub

    from reidbench.zoo import ZooEntry, download_hub_weights

    good, bad = tmp_path / "good.safetensors", tmp_path / "bad.safetensors"
    good.write_bytes(b"the pinned weights")
    bad.write_bytes(b"the pinned weigh")
    calls = []

    def fake_download(repo_id, filename, revision, force_download=False):
        calls.append(force_download)
        return str(good if force_download else bad)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    entry = ZooEntry(id="m", backbone="resnet10t", dataset={"name": "synthetic"}, defense={"name": "none"},
                     weights={"repo": "o/m", "file": "model.safetensors", "revision": "a" * 40,
                              "sha256": cache.sha256_file(good)})
    assert download_hub_weights(entry) == good and calls == [False, True]
    (line,) = warning_lines(capsys.readouterr().err)
    assert f"corrupt cached hub weights {bad}" in line and "fetching them again" in line


def test_a_killed_writers_temporary_file_is_removed_by_the_next_write(tmp_path):
    import subprocess
    import sys

    from reidbench.cache import atomic_write, sidecar

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    target = tmp_path / "model.safetensors"
    orphan = tmp_path / f".model.safetensors.{int(dead.stdout)}.tmp"
    orphan.write_bytes(b"half a checkpoint")
    sidecar(orphan).write_text("{}")
    other = tmp_path / f".other.safetensors.{int(dead.stdout)}.tmp"  # another file's: not this write's business
    other.write_bytes(b"x")
    alive = tmp_path / f".model.safetensors.{os.getppid()}.tmp"  # a running writer's: kept
    alive.write_bytes(b"in progress")
    atomic_write(target, b"whole")
    assert target.read_bytes() == b"whole" and alive.exists()
    assert not orphan.exists() and not sidecar(orphan).exists() and other.exists()


def test_save_safetensors_bytes_do_not_depend_on_the_metadata_order(tmp_path):
    """The weights' sha256 goes into every record: the same tensors and metadata assembled in
    another order must give the same file (they did not, when two code paths built the dict)."""
    import torch

    from reidbench.cache import save_safetensors, sha256_file

    from safetensors import safe_open

    state = {"w": torch.arange(6.0).view(2, 3), "b": torch.ones(2)}
    metadata = {"entry": "x", "key": "k", "history": '[{"loss": 1.5}]', "recipe": "é", "dataset": "d"}
    digests = set()
    for i, order in enumerate([list(metadata), list(reversed(metadata))] * 3):  # the library's order varies per call
        path = tmp_path / f"{i}.safetensors"
        save_safetensors(state, path, metadata={k: metadata[k] for k in order})
        digests.add(sha256_file(path))
        with safe_open(str(path), "pt") as f:
            assert f.metadata() == metadata and torch.equal(f.get_tensor("w"), state["w"])
    assert len(digests) == 1
