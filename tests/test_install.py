"""A regular install works without the checkout: the wheel carries the default zoo, the
protocol and the site templates; zoo, results and site of a user live in their directory."""

import importlib.util
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from reidbench.protocol import CURRENT_VERSION

REPO = Path(__file__).resolve().parents[1]

# Two epochs of the tiny preset: the test is about the install, not the model.
USER_ZOO = """
- id: my-tiny
  backbone: resnet10t
  dataset: {name: synthetic, preset: tiny}
  defense: none
  model: {input_size: [64, 32], last_stride: 1}
  recipe: {epochs: 2, batch: {p: 8, k: 4}, lr: 1.0e-3, warmup_epochs: 0, random_erasing: 0.0}
"""


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """The wheel of a clean copy of the sources, installed into a folder of its own."""
    tmp = tmp_path_factory.mktemp("wheel")
    source = tmp / "source"
    source.mkdir()
    ignore = shutil.ignore_patterns("__pycache__", "*.egg-info", "site", "build")
    for name in ("pyproject.toml", "README.md", "model_zoo.yaml"):
        shutil.copy2(REPO / name, source / name)
    for name in ("reidbench", "attacks", "defenses"):
        shutil.copytree(REPO / name, source / name, symlinks=True, ignore=ignore)
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    # Offline and fast with the interpreter's setuptools; an environment without one (Python
    # 3.12+ venvs) lets pip fetch it, as `pip install .` would.
    isolation = ["--no-build-isolation"] if importlib.util.find_spec("setuptools") else []
    subprocess.run(pip + ["wheel", "--no-deps", *isolation, str(source), "-w", str(tmp / "dist")],
                   check=True, cwd=tmp, capture_output=True)
    (wheel,) = (tmp / "dist").glob("reidbench-*.whl")
    subprocess.run(pip + ["install", "--no-deps", "--no-index", "--target", str(tmp / "site"), str(wheel)],
                   check=True, cwd=tmp, capture_output=True)
    return wheel, tmp / "site"


def run(site: Path, cwd: Path, *argv: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(site), REIDBENCH_QUIET="1")
    return subprocess.run([str(site / "bin" / "reidbench"), *argv], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=600)


def test_the_wheel_carries_zoo_protocol_and_templates(installed):
    wheel, _ = installed
    names = set(zipfile.ZipFile(wheel).namelist())
    for name in ("reidbench/bundled/model_zoo.yaml", "reidbench/protocols/v1.yaml", "reidbench/protocols/v2.yaml",
                 "reidbench/leaderboard/templates/index.html.j2", "reidbench/leaderboard/templates/_table.html.j2",
                 "reidbench/leaderboard/static/site.css", "reidbench/leaderboard/static/site.js",
                 "attacks/dmr.py", "defenses/apd/__init__.py", "defenses/apd/mpg.py",
                 "reidbench/zoo/__init__.py"):
        assert name in names, name
    assert (REPO / "model_zoo.yaml").read_bytes() == zipfile.ZipFile(wheel).read("reidbench/bundled/model_zoo.yaml")


def test_installed_reidbench_lists_runs_and_renders_from_another_folder(installed, tmp_path):
    _, site = installed
    probe = subprocess.run([sys.executable, "-c", "import reidbench; print(reidbench.__file__)"], cwd=tmp_path,
                           env=dict(os.environ, PYTHONPATH=str(site)), capture_output=True, text=True, check=True)
    assert Path(probe.stdout.strip()).is_relative_to(site), "the checkout, not the wheel, was imported"

    listed = run(site, tmp_path, "list", "models")
    assert listed.returncode == 0, listed.stderr
    assert "resnet18-synthetic-none" in listed.stdout  # the packaged default zoo

    (tmp_path / "model_zoo.yaml").write_text(USER_ZOO)  # the user's own zoo, found in the working directory
    listed = run(site, tmp_path, "list", "models")
    assert listed.stdout.split("\t")[0] == "my-tiny", listed.stdout

    cell = run(site, tmp_path, "run", "--model", "my-tiny", "--attack", "m-fgsm", "--device", "cpu", "--no-rerank")
    assert cell.returncode == 0, cell.stderr
    assert (tmp_path / "results" / CURRENT_VERSION / "synthetic" / "my-tiny" / "m-fgsm-eps5.json").is_file()
    assert (tmp_path / "leaderboard" / "site" / "assets" / "site.css").is_file()
    assert "my-tiny" in (tmp_path / "leaderboard" / "site" / "index.html").read_text()

    rendered = run(site, tmp_path, "render", "--site", "elsewhere")
    assert rendered.returncode == 0, rendered.stderr
    assert "my-tiny" in (tmp_path / "elsewhere" / "models" / "my-tiny.html").read_text()
