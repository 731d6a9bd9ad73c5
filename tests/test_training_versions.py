"""A changed training default must retrain: every training defense's defaults are recorded in
training_defaults.json with its ``training_version``, which enters the zoo recipe key."""

import json
from pathlib import Path

import defenses  # noqa: F401  (registers every defense)
from reidbench.defense import build_defense
from reidbench.registry import DEFENSES
from reidbench.zoo import ZooEntry

RECORD = Path(__file__).with_name("training_defaults.json")


def current() -> dict:
    out = {}
    for name in DEFENSES.names():
        defense = build_defense(name)
        if defense.changes_training:
            params = {k: v for k, v in defense.describe().items() if k not in type(defense).inference_params}
            out[name] = {"training_version": type(defense).training_version, "params": json.loads(json.dumps(params))}
    return out


def test_a_changed_training_default_comes_with_a_new_training_version():
    recorded, now = json.loads(RECORD.read_text()), current()
    for name, state in now.items():
        before = recorded.get(name)
        hint = (f"defense '{name}': bump its training_version if a default that shapes training changed, "
                f"then record {json.dumps({name: state})} in {RECORD.name}")
        assert before is not None, hint
        if state["params"] != before["params"]:
            assert state["training_version"] > before["training_version"], hint
        assert state == before, hint


def test_the_training_version_enters_the_recipe_key_from_2_on(monkeypatch):
    entry = ZooEntry(id="x", backbone="resnet18", dataset={"name": "synthetic"}, defense={"name": "at"})
    key = entry.recipe_key()
    monkeypatch.setattr(DEFENSES.get("at"), "training_version", 2)
    assert entry.recipe_key() != key
    monkeypatch.setattr(DEFENSES.get("at"), "training_version", 1)
    assert entry.recipe_key() == key
