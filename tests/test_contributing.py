"""CONTRIBUTING.md's worked example, step by step, in a copy of the repository at tiny scale."""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]


def worked_example():
    text = (REPO / "CONTRIBUTING.md").read_text()
    section = text.split("## Worked example", 1)[1].split("\n## ", 1)[0]
    blocks = dict(re.findall(r"```(python|yaml|bash)\n(.*?)```", section, flags=re.S))
    return blocks["python"], blocks["yaml"], [line for line in blocks["bash"].splitlines() if line.strip()]


def test_the_toy_defense_example_works_without_touching_the_engine(tiny_zoo_file, tiny_model, tmp_path):
    module, entry_yaml, commands = worked_example()
    copy = tmp_path / "repo"
    ignore = shutil.ignore_patterns("__pycache__", "site")
    for name in ("reidbench", "attacks", "defenses", "leaderboard"):
        shutil.copytree(REPO / name, copy / name, ignore=ignore)

    # Step 1: the module, at the path its first line names.
    target = module.splitlines()[0].removeprefix("# ").strip()
    assert target.startswith("defenses/") and not (copy / target).exists()
    (copy / target).write_text(module)

    # Step 2: the entry, at tiny scale: the conftest's tiny baseline (trained by the tiny_model
    # fixture) stands in for the one it borrows from; everything else is the document's.
    base = yaml.safe_load(tiny_zoo_file.read_text())[0]
    [entry] = yaml.safe_load(entry_yaml)
    entry.update({k: base[k] for k in ("backbone", "dataset", "model")}, weights={"from": base["id"]})
    (copy / "model_zoo.yaml").write_text(tiny_zoo_file.read_text() + yaml.safe_dump([entry], sort_keys=False))

    # Step 3: the commands, as written, with this copy's code.
    outputs = []
    for command in commands:
        argv = command.split()
        assert argv[0] == "reidbench", command
        out = subprocess.run([sys.executable, "-m", "reidbench.cli", *argv[1:]], cwd=copy, capture_output=True,
                             text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(copy)})
        assert out.returncode == 0, (command, out.stderr[-2000:])
        outputs.append(out.stdout)

    name = entry["defense"]["name"]
    assert any(line.startswith(f"{name}\t") for line in outputs[0].splitlines()), outputs[0]
    [cell] = (copy / "results").rglob("*.json")
    record = json.loads(cell.read_text())
    assert record["model"]["id"] == entry["id"] and record["model"]["defense"] == entry["defense"]
    assert record["attacked"]["mAP"] < record["clean"]["mAP"]
    assert entry["id"] in (copy / "leaderboard" / "site" / "index.html").read_text()
    # Nothing but the new module changed in the catalog or the engine.
    for package in ("reidbench", "defenses", "attacks"):
        for path in (REPO / package).rglob("*.py"):
            assert (copy / package / path.relative_to(REPO / package)).read_text() == path.read_text()
