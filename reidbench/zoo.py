"""The model zoo: ``model_zoo.yaml`` entries, their schema, and where their weights come from.

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
import pickle
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch
import yaml
from safetensors.torch import load_file

from .cache import sha256_file
from .errors import ReIDBenchError, first_line, unknown_name

#: the zoo shipped with the package (in a checkout, a symlink to the top-level model_zoo.yaml)
DEFAULT_ZOO = Path(__file__).resolve().parent / "bundled" / "model_zoo.yaml"

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


class HubUnreachable(ReIDBenchError):
    """The hub cannot be reached and the pinned file is not in the local hub cache: the one
    hub failure that may fall back to training the entry locally (when asked)."""


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
    from .registry import DEFENSES

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
        from .models.pretrained import check_spec

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
        from .models.onnx_import import input_spec_problem

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
    from .registry import DEFENSES

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
    from .data import training_options
    from .defense import build_defense

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




def trained_weights_dir(entry: ZooEntry) -> Path:
    from .data import cache_dir

    return cache_dir() / "weights" / f"{entry.id}-{entry.recipe_key()}"


def download_hub_weights(entry: ZooEntry) -> Path:
    """Fetch pinned weights through huggingface_hub (its cache first); verify the sha256
    before anything is loaded. A cached copy that does not match is fetched once more (a
    pinned revision cannot change, so only the copy can be damaged). Each failure is one
    line saying which one it is."""
    path = _hub_download(entry)
    expected = entry.weights["sha256"].lower()
    if sha256_file(path) != expected:
        from .cache import report_corrupt

        report_corrupt(path, "hub weights", "sha256 differs from the pinned one", "fetching them again")
        try:
            path = _hub_download(entry, force=True)
        except ReIDBenchError:
            pass  # offline or refused: the mismatch below is the one thing to report
    actual = sha256_file(path)
    if actual != expected:
        raise ReIDBenchError(f"weights of '{entry.id}' do not match their sha256 (expected {expected[:12]}…, got {actual[:12]}…)")
    return path


def _hub_download(entry: ZooEntry, force: bool = False) -> Path:
    import logging

    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import (HfHubHTTPError, LocalEntryNotFoundError, RemoteEntryNotFoundError,
                                        RepositoryNotFoundError, RevisionNotFoundError)

    w = entry.weights
    where = f"cannot fetch weights of '{entry.id}' from the hub ({w['repo']}@{w['revision']})"
    hub_logger = logging.getLogger("huggingface_hub")
    level = hub_logger.level
    hub_logger.setLevel(logging.ERROR)  # its retry warnings would break the one-line report
    try:
        return Path(hf_hub_download(repo_id=w["repo"], filename=w["file"], revision=w["revision"],
                                    **({"force_download": True} if force else {})))
    except RevisionNotFoundError:
        raise ReIDBenchError(f"{where}: the repo has no revision '{w['revision']}'") from None
    except RepositoryNotFoundError:
        raise ReIDBenchError(f"{where}: no such repo, or it is private or gated (log in with `hf auth login`)") from None
    except RemoteEntryNotFoundError:
        raise ReIDBenchError(f"{where}: the revision has no file '{w['file']}'") from None
    except (LocalEntryNotFoundError, ConnectionError):
        raise HubUnreachable(f"{where}: the hub cannot be reached and the file is not in the local hub cache") from None
    except (HfHubHTTPError, OSError, ValueError) as exc:
        raise ReIDBenchError(f"{where}: {first_line(exc)}") from None
    finally:
        hub_logger.setLevel(level)


def local_weights_path(entry: ZooEntry) -> Optional[Path]:
    """Where ``weights.path`` or ``weights.onnx`` points (relative to the zoo file), or None."""
    local = entry.weights.get("path", entry.weights.get("onnx"))
    if local is None:
        return None
    path = Path(local).expanduser()
    return path if path.is_absolute() else entry.zoo_dir / path


def trained_weights_file(entry: ZooEntry) -> Path:
    return trained_weights_dir(entry) / "model.safetensors"


def existing_weights(entry: ZooEntry) -> Optional[Path]:
    """The weights file of an entry if it can be had without training, else None."""
    path = local_weights_path(entry)
    if path is not None:
        if not path.is_file():
            raise ReIDBenchError(f"weights of '{entry.id}' not found at {path}")
        if "sha256" in entry.weights and sha256_file(path) != entry.weights["sha256"].lower():
            raise ReIDBenchError(f"weights of '{entry.id}' at {path} do not match their sha256")
        return path
    if "repo" in entry.weights:
        return download_hub_weights(entry)
    return intact_trained_weights(entry)


def intact_trained_weights(entry: ZooEntry) -> Optional[Path]:
    """The entry's cached trained weights, or None when there are none or they are damaged
    (reported in one line and deleted, so that the entry is trained again)."""
    from .cache import load_verified

    trained = trained_weights_file(entry)
    return load_verified(trained, _readable_weights, "weights")


def _readable_weights(path: Path) -> Path:
    """``path`` when its safetensors header and data size are intact (raises otherwise)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        handle.metadata()
    return path


def read_state_dict(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """A checkpoint's tensors and (safetensors only) metadata. Torch pickles are read with
    ``weights_only=True``: a checkpoint from the internet must not be able to run code."""
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(str(path), framework="pt") as handle:
                metadata = handle.metadata() or {}
            return load_file(str(path)), metadata
        except (SafetensorError, OSError) as exc:  # truncated or not safetensors at all
            raise ReIDBenchError(f"cannot read weights {path}: {first_line(exc)}") from None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError) as exc:  # not a plain tensor checkpoint
        raise ReIDBenchError(f"cannot read {path.name} as a weights-only torch checkpoint: {first_line(exc)}") from None
    state = state.get("state_dict", state) if isinstance(state, dict) else state
    if not isinstance(state, dict):
        raise ReIDBenchError(f"{path.name} holds a {type(state).__name__}, not a state dict")
    return state, {}


def load_weights(model: torch.nn.Module, path: Path, entry_id: str, recipe_key: Optional[str] = None,
                 keep_classifier: bool = False) -> None:
    """Load embedding weights (the training-time classifier is not part of the deployed model).
    With ``recipe_key``, a checkpoint written by our training loop must carry that key: weights
    trained from another recipe than the zoo entry's would be reported under the wrong name."""
    state, metadata = read_state_dict(path)
    if recipe_key is not None:
        _check_recipe_key(metadata, path, entry_id, recipe_key)
    if not (keep_classifier and getattr(model, "classifier", None) is not None):
        state = {k: v for k, v in state.items() if not k.startswith("classifier.")}
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.startswith("classifier.")]
    if missing or unexpected:
        raise ReIDBenchError(
            f"weights {path.name} do not fit model '{entry_id}' "
            f"({len(missing)} missing, {len(unexpected)} unexpected keys, e.g. {(missing + unexpected)[0]}): "
            "the checkpoint's recipe does not match its zoo entry"
        )


def _check_recipe_key(metadata: dict, path: Path, entry_id: str, expected: str) -> None:
    if "recipe_key" not in metadata:  # not written by reidbench's loop (e.g. converted weights)
        return
    actual = json.loads(metadata["recipe_key"])
    if actual != expected:
        raise ReIDBenchError(
            f"weights {path.name} were trained with recipe {actual}, but zoo entry '{entry_id}' is recipe {expected}: "
            "the checkpoint's recipe does not match its zoo entry (retrain it or restore the entry)")


def train_entry(entry: ZooEntry, split=None, device: str = "cpu", progress: bool = True,
                zoo: Optional[dict[str, ZooEntry]] = None) -> Path:
    """Train an entry's recipe on its dataset (built here when ``split`` is None) with the
    shared loop; returns the weights file. An entry with ``init.from`` first obtains (or
    trains) its base and starts from its weights, classifier included: same dataset, same
    identities."""
    from .data import build_dataset
    from .defense import build_defense
    from .models import build_model, check_model_fits
    from .train import Recipe, train_model

    if entry.is_onnx:
        raise ReIDBenchError(f"'{entry.id}' is an imported ONNX model; reidbench cannot train it")
    split = split if split is not None else build_dataset(entry.dataset_name, **entry.dataset_options)
    defense = build_defense(entry.defense)
    defense.check_dataset(split)
    recipe = Recipe.from_dict(entry.recipe)
    torch.manual_seed(recipe.seed)
    model = build_model(entry.model_spec(), num_classes=split.num_train_ids)
    check_model_fits(model, split, f"model '{entry.id}'")
    if not entry.init and hasattr(model, "load_pretrained"):
        model.load_pretrained()  # a pinned ImageNet file, checked by sha256; no-op without one
    if entry.init:
        if zoo is None or entry.init["from"] not in zoo:
            raise ReIDBenchError(f"entry '{entry.id}' starts from '{entry.init['from']}', which is not in the zoo")
        base_weights = obtain_weights(zoo[entry.init["from"]], split, True, device, progress, zoo)
        load_weights(model, base_weights, entry.init["from"], recipe_key=entry.init["recipe_key"], keep_classifier=True)
    result = train_model(
        model, defense.prepare_train(split, device, zoo), recipe, trained_weights_dir(entry), defense=defense, device=device, progress=progress,
        run_key={"entry": entry.id, "recipe_key": entry.recipe_key(), "split_hash": split.split_hash,
                 "defense": entry.defense, "dataset": entry.dataset},
    )
    return result.weights


def training_entry(entry: ZooEntry, zoo: Optional[dict[str, ZooEntry]] = None) -> ZooEntry:
    """The entry whose recipe trains ``entry``'s weights: itself, or the one it borrows from."""
    base = entry.weights.get("from")
    if base is None:
        return entry
    if zoo is None or base not in zoo:
        raise ReIDBenchError(f"entry '{entry.id}' borrows the weights of '{base}', which is not in the zoo")
    return zoo[base]


def obtain_weights(entry: ZooEntry, split=None, train_missing: bool = True, device: str = "cpu", progress: bool = True,
                   zoo: Optional[dict[str, ZooEntry]] = None, train_if_unreachable: bool = False) -> Path:
    """The entry's weights: pinned, cached, borrowed (``weights.from``) or trained now.
    A hub that cannot be reached falls back to training the recipe only with
    ``train_if_unreachable`` (results then carry the local weights' sha256, not the hub's)."""
    entry = training_entry(entry, zoo)
    try:
        path = existing_weights(entry)
    except HubUnreachable as exc:
        if not train_if_unreachable:
            hint = "" if entry.is_onnx else "; pass --train-missing to train it from its recipe instead"
            raise HubUnreachable(f"{exc}{hint}") from None
        from .progress import log

        log(f"{exc}; using weights trained locally from its recipe instead")
        path = intact_trained_weights(entry)
        train_missing = True
    if path is not None:
        return path
    if not train_missing:
        raise ReIDBenchError(f"no weights for '{entry.id}' yet; run `reidbench train --model {entry.id}` or pass --train-missing")
    return train_entry(entry, split, device=device, progress=progress, zoo=zoo)
