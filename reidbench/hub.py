"""The model zoo on the Hugging Face Hub: where each entry's weights are, and publishing them.

``reidbench zoo pull`` is :func:`reidbench.zoo.training.obtain_weights` (hub download into the hub's
own cache, sha256 checked before anything is loaded). This module adds what a listing and an
upload need: a one-word account of each entry's weights, whether they are on this machine
now (without touching the network), and :func:`push`, which uploads an entry's weights as
safetensors (ONNX graphs as they are) with a generated model card and returns the revision
and sha256 to pin in ``model_zoo.yaml``.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import yaml

from .version import __version__
from .errors import ReIDBenchError, first_line
from .cache import save_safetensors, sha256_file
from .zoo.schema import ZooEntry, training_entry
from .zoo.weights import existing_weights, local_weights_path, read_state_dict, trained_weights_file

WEIGHTS_FILE = "model.safetensors"
ONNX_FILE = "model.onnx"


def weights_source(entry: ZooEntry) -> str:
    """Where an entry's weights come from, in a few words."""
    w = entry.weights
    if "repo" in w:
        return f"hub {w['repo']}@{w['revision'][:12]}"
    if "onnx" in w:
        return f"onnx {w['onnx']}"
    if "path" in w:
        return f"path {w['path']}"
    if "from" in w:
        return f"from {w['from']}"
    return "local-train"


def available_locally(entry: ZooEntry, zoo: dict[str, ZooEntry]) -> bool:
    """Whether the weights are on this machine now (hub cache, file, trained cache); no
    network, no hashing: a listing must stay instant."""
    from huggingface_hub import try_to_load_from_cache

    entry = training_entry(entry, zoo)
    w = entry.weights
    if "repo" in w:
        return isinstance(try_to_load_from_cache(w["repo"], w["file"], revision=w["revision"]), str)
    local = local_weights_path(entry)
    return (local if local is not None else trained_weights_file(entry)).is_file()


def zoo_rows(zoo: dict[str, ZooEntry]) -> list[tuple[str, ...]]:
    """One row per entry: id, backbone, dataset, defense, weights source, available now."""
    return [(e.id, e.backbone, e.dataset_name, e.defense["name"], weights_source(e),
             "yes" if available_locally(e, zoo) else "no") for e in zoo.values()]


@dataclass
class PushResult:
    repo: str
    revision: str
    file: str
    sha256: str

    def zoo_weights(self) -> str:
        """The ``weights:`` line to paste into the entry."""
        return f"weights: {{repo: {self.repo}, file: {self.file}, revision: {self.revision}, sha256: {self.sha256}}}"


def _deployed_safetensors(source: Path, target: Path) -> dict[str, str]:
    """Write the embedding weights of ``source`` (any checkpoint reidbench reads) as
    safetensors, without the training-time classifier; keeps the training provenance."""
    import torch

    state, metadata = read_state_dict(source)
    # clone: safetensors refuses tensors that share storage, which torch checkpoints may hold
    state = {k: v.detach().cpu().contiguous().clone() for k, v in state.items()
             if isinstance(v, torch.Tensor) and not k.startswith("classifier.")}
    # the cache's writer: atomic, and the same bytes for the same weights (sorted metadata), so
    # the sha256 pasted into the zoo entry does not depend on the export; no sidecar beside it
    save_safetensors(state, target, metadata=metadata or None, check=False)
    return metadata


def _flow_yaml(value) -> str:
    """One value as one line of YAML (the style of model_zoo.yaml)."""
    return yaml.safe_dump(value, default_flow_style=True, sort_keys=False, width=float("inf")).strip().removesuffix("...").strip()


def _entry_yaml(entry: ZooEntry) -> str:
    fields = {"description": entry.description, "backbone": entry.backbone, "dataset": entry.dataset,
              "defense": entry.defense, "model": entry.model, "recipe": entry.recipe}
    return "\n".join([f"- id: {_flow_yaml(entry.id)}"] + [f"  {k}: {_flow_yaml(v)}" for k, v in fields.items() if v])


def _provenance(entry: ZooEntry, sha256: str, metadata: dict[str, str]) -> list[str]:
    lines = [f"- weights sha256: `{sha256}`", f"- zoo recipe key: `{entry.recipe_key()}`",
             f"- pushed with reidbench {__version__}"]
    if entry.is_onnx:
        lines.append("- an imported ONNX graph; reidbench did not train it")
    elif "recipe_key" in metadata:
        history = json.loads(metadata.get("history", "[]"))
        lines.append(f"- trained by reidbench's shared loop from recipe key `{json.loads(metadata['recipe_key'])}`")
        if "split_hash" in metadata:
            lines.append(f"- training split hash: `{json.loads(metadata['split_hash'])}`")
        if history:
            last = history[-1]
            lines.append(f"- {len(history)} epochs, final training loss {last.get('loss', float('nan')):.4f}")
    else:
        lines.append("- not written by reidbench's training loop (converted or external weights)")
    return lines


def _results(entry: ZooEntry, results_root: Optional[Path]) -> list[str]:
    from .leaderboard import results_table, with_interval
    from .protocol import CURRENT_VERSION

    table = results_table(results_root, CURRENT_VERSION) if results_root and Path(results_root).is_dir() else None
    cells = None if table is None else table[table["model"] == entry.id]
    if cells is None or cells.empty:
        return [f"No results in the result store when this was pushed; `reidbench run --model {entry.id}` makes them."]
    lines = [f"Protocol {CURRENT_VERSION}, from reidbench's result store (percent; Rank-1 and mAP under attack; "
             "± half the 95% interval, a bootstrap over test identities).", "",
             "| dataset | attack | threat model | clean Rank-1 | clean mAP | Rank-1 | mAP | flags |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for row in cells.itertuples():
        shown = [with_interval(getattr(row, c), (getattr(row, f"{c}_lo"), getattr(row, f"{c}_hi")))
                 for c in ("clean_rank1", "clean_mAP", "rank1", "mAP")]
        lines.append(f"| {row.dataset} | {row.attack} | {row.threat_model} | {' | '.join(shown)} | {row.flags} |")
    return lines


def model_card(entry: ZooEntry, repo: str, file: str, sha256: str, metadata: dict[str, str],
               results_root: Optional[Path]) -> str:
    """The README.md of the hub repo: what the model is, how it was made, how it fared."""
    front = yaml.safe_dump({"library_name": "reidbench", "tags": ["person-reid", "adversarial-robustness", "reidbench"]},
                           sort_keys=False).strip()
    parts = [
        f"---\n{front}\n---", f"# {entry.id}", entry.description or f"{entry.backbone} on {entry.dataset_name}, "
        f"defense {entry.defense['name']}.",
        "## Zoo entry", "The recipe, as declared in reidbench's `model_zoo.yaml`; pin these weights with the "
        "`weights:` line (the revision is the commit that added this file):",
        f"```yaml\n{_entry_yaml(entry)}\n  weights: {{repo: {repo}, file: {file}, revision: <this commit>, "
        f"sha256: {sha256}}}\n```",
        "## Provenance", "\n".join(_provenance(entry, sha256, metadata)),
        "## Results", "\n".join(_results(entry, results_root)),
        "## Use", "With the entry above in `model_zoo.yaml`:", f"```\nreidbench zoo pull {entry.id}\nreidbench run --model {entry.id}\n```",
    ]
    return "\n\n".join(parts) + "\n"


def push(entry: ZooEntry, zoo: dict[str, ZooEntry], repo: str, results_root: Optional[Path] = None,
         private: bool = False) -> PushResult:
    """Upload ``entry``'s weights and a model card to ``repo`` (created if missing)."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError

    if training_entry(entry, zoo) is not entry:
        raise ReIDBenchError(f"'{entry.id}' borrows the weights of '{entry.weights['from']}'; push that entry instead")
    if "/" not in repo:
        raise ReIDBenchError(f"--repo must be OWNER/NAME, got '{repo}'")
    weights = existing_weights(entry)
    if weights is None:
        raise ReIDBenchError(f"no weights for '{entry.id}' on this machine; train them first: reidbench train --model {entry.id}")
    with tempfile.TemporaryDirectory(prefix="reidbench-push-") as folder:
        if weights.suffix == ".onnx":
            file, metadata = ONNX_FILE, {}
            shutil.copyfile(weights, Path(folder) / file)
        else:
            file = WEIGHTS_FILE
            metadata = _deployed_safetensors(weights, Path(folder) / file)
        digest = sha256_file(Path(folder) / file)
        (Path(folder) / "README.md").write_text(model_card(entry, repo, file, digest, metadata, results_root))
        api = HfApi()
        try:
            api.create_repo(repo, private=private, exist_ok=True)
            commit = api.upload_folder(repo_id=repo, folder_path=folder,
                                       commit_message=f"reidbench: {entry.id} (recipe {entry.recipe_key()})")
        except (HfHubHTTPError, OSError, ValueError) as exc:
            raise ReIDBenchError(f"cannot push '{entry.id}' to the hub repo {repo}: {first_line(exc)}") from None
    return PushResult(repo, commit.oid, file, digest)
