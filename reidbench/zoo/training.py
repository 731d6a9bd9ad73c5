"""Obtaining an entry's weights, training its recipe when they are not there yet. The two call
each other: a fine-tuned entry obtains (or trains) its base before it trains."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch

from ..errors import ReIDBenchError
from .schema import ZooEntry, training_entry
from .weights import HubUnreachable, existing_weights, intact_trained_weights, load_weights, trained_weights_dir


def train_entry(entry: ZooEntry, split=None, device: str = "cpu", progress: bool = True,
                zoo: Optional[dict[str, ZooEntry]] = None) -> Path:
    """Train an entry's recipe on its dataset (built here when ``split`` is None) with the
    shared loop; returns the weights file. An entry with ``init.from`` first obtains (or
    trains) its base and starts from its weights, classifier included: same dataset, same
    identities."""
    from ..data import build_dataset
    from ..defense import build_defense
    from ..models import build_model, check_model_fits
    from ..train.loop import Recipe, train_model

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
        from ..progress import log

        log(f"{exc}; using weights trained locally from its recipe instead")
        path = intact_trained_weights(entry)
        train_missing = True
    if path is not None:
        return path
    if not train_missing:
        raise ReIDBenchError(f"no weights for '{entry.id}' yet; run `reidbench train --model {entry.id}` or pass --train-missing")
    return train_entry(entry, split, device=device, progress=progress, zoo=zoo)
