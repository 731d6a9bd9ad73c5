"""Where a zoo entry's weights come from, short of training them: a local file, a pinned hub
file (checked by sha256), or the cache of trained weights; and loading them into a model."""

from __future__ import annotations

import json
import pickle
from pathlib import Path
from typing import Optional

import torch
from safetensors.torch import load_file

from ..cache import sha256_file
from ..errors import ReIDBenchError, first_line
from .schema import ZooEntry


class HubUnreachable(ReIDBenchError):
    """The hub cannot be reached and the pinned file is not in the local hub cache: the one
    hub failure that may fall back to training the entry locally (when asked)."""


def trained_weights_dir(entry: ZooEntry) -> Path:
    from ..data import cache_dir

    return cache_dir() / "weights" / f"{entry.id}-{entry.recipe_key()}"


def download_hub_weights(entry: ZooEntry) -> Path:
    """Fetch pinned weights through huggingface_hub (its cache first); verify the sha256
    before anything is loaded. A cached copy that does not match is fetched once more (a
    pinned revision cannot change, so only the copy can be damaged). Each failure is one
    line saying which one it is."""
    path = _hub_download(entry)
    expected = entry.weights["sha256"].lower()
    if sha256_file(path) != expected:
        from ..cache import report_corrupt

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
    from ..cache import load_verified

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
