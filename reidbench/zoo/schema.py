"""Zoo entries: the ``model_zoo.yaml`` schema, its checks, and how entries refer to each other.

An entry declares a model completely (backbone, dataset, defense and its parameters,
training recipe) and where its weights are: a local file, a Hugging Face Hub repo pinned to
a revision and a sha256, an ONNX graph (``weights: {onnx: path}``, or a hub file ending in
``.onnx``; see :mod:`reidbench.models.onnx_import`), or -- when none is given -- the local
cache, filled by training the entry's recipe with the shared training loop. Relative paths
are read from the zoo file's folder.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml

from ..errors import ReIDBenchError, unknown_name

#: the zoo shipped with the package (in a checkout, a symlink to the top-level model_zoo.yaml)
DEFAULT_ZOO = Path(__file__).resolve().parent.parent / "bundled" / "model_zoo.yaml"

# field -> (accepted types, required)
_ENTRY_FIELDS: dict[str, tuple[tuple[type, ...], bool]] = {
    "id": ((str,), True),
    "backbone": ((str,), True),
    "dataset": ((str, dict), True),
    "defense": ((str, dict), False),
    "model": ((dict,), False),
    "recipe": ((dict,), False),
    "weights": ((dict,), False),
    "init": ((dict,), False),
    "suite": ((list,), False),
    "description": ((str,), False),
}
# ``from``: the weights of another entry, for a defense that only adds an inference-time
# transform to the same trained model (cs, rrp, jpeg on top of the baseline).
_WEIGHTS_FIELDS = {"path": (str,), "repo": (str,), "file": (str,), "revision": (str,), "sha256": (str,), "from": (str,),
                   "onnx": (str,)}


@dataclass
class ZooEntry:
    id: str
    backbone: str
    dataset: dict
    defense: dict
    model: dict = field(default_factory=dict)
    recipe: dict = field(default_factory=dict)
    weights: dict = field(default_factory=dict)
    #: ``{from: ID}``: training starts from that entry's trained weights (fine-tuning); the
    #: zoo loader adds ``recipe_key``, the base's, so retraining the base retrains this one.
    init: dict = field(default_factory=dict)
    #: recipe keys of the entries the defense's parameters name (``Defense.zoo_references``),
    #: added by the zoo loader, so retraining such an entry retrains this one
    references: dict = field(default_factory=dict)
    suite: list = field(default_factory=lambda: ["default"])
    description: str = ""
    # relative weight paths are read from here; where the file lies is not part of the entry
    zoo_dir: Path = field(default=DEFAULT_ZOO.resolve().parent, compare=False)

    @property
    def is_onnx(self) -> bool:
        return "onnx" in self.weights or self.weights.get("file", "").endswith(".onnx")

    @property
    def defended(self) -> bool:
        """Whether the entry puts a defense between the attack and the network (the budget
        sweep and a submission's sweep check are for these)."""
        return self.defense.get("name", "none") not in ("none", None)

    @property
    def dataset_name(self) -> str:
        return self.dataset["name"]

    @property
    def dataset_options(self) -> dict:
        return {k: v for k, v in self.dataset.items() if k != "name"}

    def model_spec(self) -> dict:
        return {"backbone": self.backbone, **self.model}

    def recipe_key(self) -> str:
        """Fingerprint of everything that decides the trained weights."""
        version = _training_version(self.defense.get("name"))
        blob = json.dumps(
            {"backbone": self.backbone, "dataset": self.dataset, "defense": self.defense,
             "model": self.model, "recipe": self.recipe, **({"init": self.init} if self.init else {}),
             **({"references": self.references} if self.references else {}),
             **({"defense_version": version} if version != 1 else {})},
            sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:12]


def _training_version(name: Optional[str]) -> int:
    """The registered defense's ``training_version`` (1 for an unknown name: the entry's own
    check reports it)."""
    from ..registry import DEFENSES

    return getattr(DEFENSES.get(name), "training_version", 1) if name in DEFENSES else 1


def _type_names(types: tuple[type, ...]) -> str:
    return " or ".join({str: "a string", dict: "a mapping", list: "a list"}.get(t, t.__name__) for t in types)


def _check_entry(raw: Any, position: int, source: Path) -> ZooEntry:
    where = f"{source.name}: entry {position + 1}"
    if not isinstance(raw, dict):
        raise ReIDBenchError(f"{where} must be a mapping, got {type(raw).__name__}")
    if isinstance(raw.get("id"), str):
        where = f"{source.name}: entry '{raw['id']}'"
    for key in raw:
        if key not in _ENTRY_FIELDS:
            raise ReIDBenchError(f"{where}: unknown field '{key}' (known: {', '.join(_ENTRY_FIELDS)})")
    for key, (types, required) in _ENTRY_FIELDS.items():
        if key not in raw:
            if required:
                raise ReIDBenchError(f"{where}: missing required field '{key}'")
            continue
        if not isinstance(raw[key], types):
            raise ReIDBenchError(f"{where}: field '{key}' must be {_type_names(types)}, got {type(raw[key]).__name__}")
    dataset = raw["dataset"] if isinstance(raw["dataset"], dict) else {"name": raw["dataset"]}
    defense = raw.get("defense", "none")
    defense = defense if isinstance(defense, dict) else {"name": defense}
    for key, spec in (("dataset", dataset), ("defense", defense)):
        if not isinstance(spec.get("name"), str):
            raise ReIDBenchError(f"{where}: field '{key}' needs a string 'name'")
    weights = raw.get("weights", {})
    for key, value in weights.items():
        if key not in _WEIGHTS_FIELDS:
            raise ReIDBenchError(f"{where}: unknown field 'weights.{key}' (known: {', '.join(_WEIGHTS_FIELDS)})")
        if not isinstance(value, _WEIGHTS_FIELDS[key]):
            raise ReIDBenchError(
                f"{where}: field 'weights.{key}' must be a string, got {type(value).__name__} (quote it in the YAML)")
    if "repo" in weights and not {"file", "revision", "sha256"} <= set(weights):
        missing = sorted({"file", "revision", "sha256"} - set(weights))
        raise ReIDBenchError(f"{where}: hub weights need a pinned {', '.join(missing)}")
    init = raw.get("init", {})
    if init and (set(init) != {"from"} or not isinstance(init["from"], str)):
        raise ReIDBenchError(f"{where}: field 'init' takes exactly one string field, 'from' (a zoo entry id)")
    if "onnx" in weights and {"path", "repo", "from"} & set(weights):
        raise ReIDBenchError(f"{where}: 'weights.onnx' names the model file itself; drop weights.path/repo/from")
    if isinstance(raw.get("model", {}).get("pretrained"), dict):
        from ..models.pretrained import check_spec

        check_spec(raw["model"]["pretrained"], where)
    suite = raw.get("suite", ["default"])
    if not all(isinstance(s, str) for s in suite):
        raise ReIDBenchError(f"{where}: field 'suite' must be a list of strings")
    entry = ZooEntry(
        id=raw["id"], backbone=raw["backbone"], dataset=dataset, defense=defense, model=dict(raw.get("model", {})),
        recipe=dict(raw.get("recipe", {})), weights=dict(weights), init=dict(init), suite=list(suite),
        description=raw.get("description", ""), zoo_dir=source.resolve().parent,
    )
    if entry.is_onnx:
        from ..models.onnx_import import input_spec_problem

        problem = input_spec_problem(entry.model)
        if problem is not None:
            raise ReIDBenchError(f"{where}: {problem}")
    return entry


def default_zoo_path() -> Path:
    """The zoo used without ``--zoo``: ``./model_zoo.yaml`` when the working directory has one
    (a user's own zoo, or the checkout's), else the one shipped with the package."""
    local = Path("model_zoo.yaml")
    return local if local.is_file() else DEFAULT_ZOO


def load_zoo(path: Optional[str | Path] = None) -> dict[str, ZooEntry]:
    """Parse and check a zoo file; any problem is one ReIDBenchError naming entry and field."""
    path = Path(path) if path else default_zoo_path()
    if not path.is_file():
        raise ReIDBenchError(f"model zoo file not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f" at line {mark.line + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ReIDBenchError(f"{path.name} is not valid YAML{at}: {problem}") from None
    if isinstance(raw, dict) and "models" in raw:
        raw = raw["models"]
    if not isinstance(raw, list):
        raise ReIDBenchError(f"{path.name} must be a list of model entries (or a mapping with 'models:')")
    entries: dict[str, ZooEntry] = {}
    for position, item in enumerate(raw):
        entry = _check_entry(item, position, path)
        if entry.id in entries:
            raise ReIDBenchError(f"{path.name}: model id '{entry.id}' appears twice")
        entries[entry.id] = entry
    for entry in entries.values():
        base = entry.weights.get("from")
        if base is not None:
            if base not in entries:
                raise ReIDBenchError(f"{path.name}: entry '{entry.id}': weights.from names no zoo entry ('{base}')")
            _check_shared_weights(entry, entries[base])
    for entry in entries.values():
        _resolve_init(entry, entries, path.name, ())
    for entry in entries.values():
        _pin_references(entry, entries)
    return entries


def _pin_references(entry: ZooEntry, entries: dict[str, ZooEntry]) -> None:
    """Pin the recipe key of every zoo entry the defense's parameters name (APD's frozen
    feature network), as ``init.from`` pins its base's. Other values are the defense's to check."""
    from ..registry import DEFENSES

    name = entry.defense.get("name")
    if name not in DEFENSES:
        return
    for param in getattr(DEFENSES.get(name), "zoo_references", ()):
        value = entry.defense.get(param)
        other = entries.get(value) if isinstance(value, str) else None  # a mapping (a pinned file) names no entry
        if other is not None and other.id != entry.id:
            entry.references[param] = {"from": other.id, "recipe_key": training_entry(other, entries).recipe_key()}


def _resolve_init(entry: ZooEntry, entries: dict[str, ZooEntry], source: str, chain: tuple[str, ...]) -> None:
    """Check ``init.from`` (same backbone, model and dataset, so the weights fit; no cycle) and
    pin the base's recipe key into the entry, following chains of fine-tuned entries."""
    if not entry.init or "recipe_key" in entry.init:
        return
    where = f"{source}: entry '{entry.id}': init.from"
    if entry.id in chain:
        raise ReIDBenchError(f"{where} makes a cycle ({' -> '.join(chain + (entry.id,))})")
    if "from" in entry.weights:
        raise ReIDBenchError(f"{where}: an entry that borrows its weights trains nothing, so it cannot start from others")
    base = entries.get(entry.init["from"])
    if base is None:
        raise ReIDBenchError(f"{where} names no zoo entry ('{entry.init['from']}')")
    base = training_entry(base, entries)
    for name in ("backbone", "model", "dataset"):
        if getattr(entry, name) != getattr(base, name):
            raise ReIDBenchError(f"{where} '{base.id}' has another {name}; its weights would not fit")
    _resolve_init(base, entries, source, chain + (entry.id,))
    entry.init = {"from": base.id, "recipe_key": base.recipe_key()}


def _check_shared_weights(entry: ZooEntry, base: ZooEntry) -> None:
    """An entry may reuse another's trained weights only if it is that very model, behind an
    inference-time transform or evaluated another way: same backbone, model and training data
    (dataset options that only change the evaluation, such as a cross-modality ``direction``,
    may differ), and the same defense or one that trains as is."""
    from ..data import training_options
    from ..defense import build_defense

    where = f"entry '{entry.id}': weights.from '{base.id}'"
    if "from" in base.weights:
        raise ReIDBenchError(f"{where} itself borrows its weights; name the entry that trains them")
    if entry.recipe or entry.init:
        raise ReIDBenchError(f"{where}: a borrowing entry trains nothing; remove its own 'recipe' and 'init'")
    for name in ("backbone", "model"):
        if getattr(entry, name) != getattr(base, name):
            raise ReIDBenchError(f"{where} has another {name}; only the defense may differ")
    if training_options(entry.dataset) != training_options(base.dataset):
        raise ReIDBenchError(f"{where} has another dataset; only the defense may differ")
    if entry.defense != base.defense and build_defense(entry.defense).changes_training:
        raise ReIDBenchError(f"{where}: defense '{entry.defense['name']}' changes training, so it needs its own weights")


def get_entry(zoo: dict[str, ZooEntry], model_id: str) -> ZooEntry:
    if model_id not in zoo:
        raise unknown_name("model", model_id, zoo)
    return zoo[model_id]


def training_entry(entry: ZooEntry, zoo: Optional[dict[str, ZooEntry]] = None) -> ZooEntry:
    """The entry whose recipe trains ``entry``'s weights: itself, or the one it borrows from."""
    base = entry.weights.get("from")
    if base is None:
        return entry
    if zoo is None or base not in zoo:
        raise ReIDBenchError(f"entry '{entry.id}' borrows the weights of '{base}', which is not in the zoo")
    return zoo[base]

