"""The Python API: benchmark a model you already have, without writing a zoo entry.

:func:`benchmark` takes an ``nn.Module``, an ONNX file or a zoo id, runs the protocol's
cells through the same :class:`~reidbench.runner.Runner` as ``reidbench run`` (so its records
are ordinary result records, reused when their inputs did not change, and shown by
``reidbench render``) and returns the numbers as a pandas DataFrame.

A module is wrapped, not changed: it receives RGB images in [0, 1] at ``input_size``, or
``(x - mean) / std`` of them when ``mean`` and ``std`` are given, and must return (B, D)
embeddings (a tuple's first element is taken, as for zoo models). Attack budgets are in
pixel units of the [0, 1] image, whatever the normalisation. It is identified by ``name``, or
by its class name and a hash of its weights and preprocessing; the hash is recorded as the
cells' ``weights_sha256``, so changed weights never reuse old cells.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Optional, Sequence, Union

import torch
import torch.nn as nn

from .errors import ReIDBenchError
from .record import Metrics

DatasetSpec = Union[str, dict]


class ExternalModel(nn.Module):
    """A user's embedding network behind the benchmark's model interface ([0, 1] RGB in)."""

    def __init__(self, module: nn.Module, input_size: Sequence[int], mean: Optional[Sequence[float]] = None,
                 std: Optional[Sequence[float]] = None):
        super().__init__()
        self.module = module
        self.input_size = tuple(int(s) for s in input_size)
        self.normalized = mean is not None
        if self.normalized:
            self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
            self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.normalized:
            x = (x - self.mean) / self.std
        out = self.module(x)
        return out[0] if isinstance(out, (tuple, list)) else out


def _triple(value, name: str) -> Optional[list[float]]:
    if value is None:
        return None
    try:
        values = [float(v) for v in value]
    except (TypeError, ValueError):
        values = []
    if len(values) != 3:
        raise ReIDBenchError(f"benchmark(): {name} must be three numbers (one per RGB channel), got {value!r}")
    return values


def _input_size(value) -> list[int]:
    if value is None:
        raise ReIDBenchError("benchmark(): say what the model takes: input_size=(H, W)")
    try:
        size = [int(v) for v in value]
    except (TypeError, ValueError):
        size = []
    if len(size) != 2 or min(size) < 1 or any(float(v) != s for v, s in zip(value, size)):
        raise ReIDBenchError(f"benchmark(): input_size must be two positive integers (H, W), got {value!r}")
    return size


def module_fingerprint(module: nn.Module, spec: dict) -> str:
    """sha256 of the module's class, parameters and buffers (names, dtypes, shapes, bytes) and
    of its preprocessing ``spec``: what the model computes, as far as it can be hashed."""
    from .cache import weights_fingerprint

    blob = {"class": f"{type(module).__module__}.{type(module).__qualname__}", "spec": spec,
            "weights": weights_fingerprint(module)}
    return hashlib.sha256(json.dumps(blob, sort_keys=True).encode()).hexdigest()


def check_output(model: nn.Module, input_size: Sequence[int], what: str) -> None:
    """One line unless ``model`` maps a batch of two [0, 1] images to (2, D) finite embeddings."""
    probe = torch.rand(2, 3, *input_size, generator=torch.Generator().manual_seed(0))
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = model(probe.to(device))
    except Exception as exc:  # noqa: BLE001 -- whatever the user's forward raises, say it in one line
        raise ReIDBenchError(f"{what} fails on a batch of 2 images of 3x{input_size[0]}x{input_size[1]}: "
                             f"{exc.__class__.__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"
                             ) from None
    finally:
        model.train(was_training)
    if not isinstance(out, torch.Tensor):
        raise ReIDBenchError(f"{what} returned a {type(out).__name__}; it must return a (batch, D) tensor of embeddings")
    if out.dim() != 2 or out.shape[0] != 2 or out.shape[1] < 1:
        raise ReIDBenchError(f"{what} returned shape {tuple(out.shape)} for a batch of 2 images of "
                             f"3x{input_size[0]}x{input_size[1]}; it must return (batch, D) embeddings")
    if not bool(torch.isfinite(out).all()):
        raise ReIDBenchError(f"{what} returned non-finite embeddings for a batch of 2 images")


def _dataset(dataset: Optional[DatasetSpec]) -> Optional[dict]:
    from .data import dataset_spec

    return None if dataset is None else dataset_spec(dataset, "benchmark(): dataset")


def onnx_entry(path: Union[str, Path], dataset: dict, input_size, mean=None, std=None, name: Optional[str] = None,
               **graph_options):
    """A zoo entry for an ONNX file (what ``weights: {onnx: ...}`` in a zoo file gives); mean and
    std are in the graph's channel order and value range, as in the zoo."""
    from .cache import sha256_file
    from .zoo.schema import ZooEntry

    path = Path(path).expanduser().resolve()
    if not path.is_file():
        raise ReIDBenchError(f"ONNX model not found: {path}")
    spec = {"input_size": _input_size(input_size)}
    for key, value in (("mean", _triple(mean, "mean")), ("std", _triple(std, "std"))):
        if value is not None:
            spec[key] = value
    spec.update({k: v for k, v in graph_options.items() if v is not None})
    from .models.onnx_import import input_spec_problem

    problem = input_spec_problem(spec)
    if problem is not None:
        raise ReIDBenchError(f"ONNX model {path.name}: {problem}")
    digest = sha256_file(path)
    return ZooEntry(id=name or f"{path.stem}-{digest[:8]}", backbone=f"{path.name} (ONNX)", dataset=dataset,
                    defense={"name": "none"}, model=spec, weights={"onnx": str(path), "sha256": digest}, suite=[],
                    description="an ONNX model benchmarked with reidbench.benchmark / run --onnx")


def benchmark(model: Union[nn.Module, str, Path], dataset: Optional[DatasetSpec] = None,
              attacks: Optional[Sequence[str]] = None, eps: Union[None, float, Sequence[float]] = None,
              input_size: Optional[Sequence[int]] = None, mean: Optional[Sequence[float]] = None,
              std: Optional[Sequence[float]] = None, device: str = "auto", queries: Optional[int] = None,
              name: Optional[str] = None, results: Union[str, Path] = "results", zoo: Union[None, str, Path] = None,
              batch_size: int = 128, rerank: bool = True, progress: bool = True, force: bool = False,
              **onnx_options):
    """Run the protocol's cells on ``model`` and return one row per outcome: ``clean``, each
    attack (by attack id), and the per-query worst case over the attacks that perturb the
    query at each ε.

    ``model``: an ``nn.Module`` (needs ``dataset`` and ``input_size``), a path to an ONNX file
    (needs the same; ``channel_order``, ``value_range``, ``layout``, ``output`` as in a zoo
    entry may be passed as keywords) or the id of a zoo entry (evaluated on its own dataset, or
    on ``dataset``). ``attacks``: names (default: the protocol's grid); ``eps``: budget(s) in
    1/255 (default: the protocol's); ``queries``: evaluate a fixed seeded subset of that many
    queries. Records go to ``results`` (default ``./results``), under the model's id.
    """
    from .protocol import load_protocol
    from .grid import check_attack_names
    from .runner import Runner
    from .zoo.schema import ZooEntry, get_entry, load_zoo

    protocol = load_protocol()
    zoo_entries = dict(load_zoo(zoo))
    dataset_spec = _dataset(dataset)
    if onnx_options and not (isinstance(model, (str, Path)) and str(model).endswith(".onnx")):
        raise ReIDBenchError(f"benchmark(): {', '.join(sorted(onnx_options))} only apply to an ONNX model")
    if queries is not None and (isinstance(queries, bool) or not isinstance(queries, int) or queries < 1):
        raise ReIDBenchError(f"benchmark(): queries must be a positive number of queries, got {queries!r}")
    eps_values = None if eps is None else [float(e) for e in ([eps] if isinstance(eps, (int, float)) else eps)]
    if eps_values is not None and (not eps_values or any(not (0 < e <= 255) for e in eps_values)):
        raise ReIDBenchError(f"benchmark(): eps is in 1/255 units and must lie in (0, 255], got {eps!r}")
    eps_values = None if eps_values is None else [e / 255.0 for e in eps_values]
    attack_names = list(attacks) if attacks is not None else protocol.attacks()
    check_attack_names(attack_names, protocol)

    runner_dataset = None
    provided = None
    if isinstance(model, nn.Module):
        if dataset_spec is None:
            raise ReIDBenchError("benchmark(): say which dataset to evaluate the model on: dataset='synthetic', ...")
        size = _input_size(input_size)
        mean, std = _triple(mean, "mean"), _triple(std, "std")
        if (mean is None) != (std is None):
            raise ReIDBenchError("benchmark(): give both mean and std (the model's input normalisation), or neither")
        if std is not None and min(std) <= 0:
            raise ReIDBenchError(f"benchmark(): std must be positive, got {std}")
        spec = {"input_size": size, **({"mean": mean, "std": std} if mean is not None else {})}
        wrapped = ExternalModel(model, size, mean, std)
        label = name or type(model).__name__
        check_output(wrapped, size, f"model '{label}'")
        digest = module_fingerprint(model, spec)
        entry = ZooEntry(id=name or f"{type(model).__name__.lower()}-{digest[:8]}",
                         backbone=f"{type(model).__name__} (Python)", dataset=dataset_spec, defense={"name": "none"},
                         model=spec, suite=[], description="a model benchmarked with reidbench.benchmark")
        provided = (wrapped, digest)
    elif isinstance(model, (str, Path)) and (str(model).endswith(".onnx") or Path(str(model)).is_file()):
        if dataset_spec is None:
            raise ReIDBenchError("benchmark(): say which dataset to evaluate the ONNX model on: dataset='synthetic', ...")
        entry = onnx_entry(model, dataset_spec, input_size, mean, std, name, **onnx_options)
    elif isinstance(model, str):
        if input_size is not None or mean is not None or std is not None or name is not None:
            raise ReIDBenchError(f"benchmark(): '{model}' is a zoo entry, which states its own input_size, "
                                 "normalisation and id; drop those arguments")
        entry = get_entry(zoo_entries, model)
        runner_dataset = dataset_spec if dataset_spec and dataset_spec != entry.dataset else None
    else:
        raise ReIDBenchError(
            f"benchmark(): model must be an nn.Module, an ONNX file or a zoo id, got {type(model).__name__}")

    if entry.id not in zoo_entries or zoo_entries[entry.id] is not entry:
        if entry.id in zoo_entries:
            raise ReIDBenchError(f"benchmark(): the zoo already has a model '{entry.id}'; pass another name=")
        zoo_entries[entry.id] = entry
    runner = Runner(zoo_entries, results_root=Path(results), protocol=protocol, device=device, batch_size=batch_size,
                    rerank=rerank, progress=progress, force=force, queries=queries)
    if provided is not None:
        runner.provided[entry.id] = provided
    paths = runner.run([entry], attack_names, eps_values, runner_dataset)
    if not paths:
        raise ReIDBenchError(f"benchmark(): the protocol defines none of the cells {attack_names} on this dataset")
    return results_frame(paths)


def results_frame(paths: Sequence[Path]):
    """The DataFrame of :func:`benchmark` from the records at ``paths`` (one model, one dataset)."""
    import pandas as pd

    from .checks import worst_case
    from .results import read_cell

    records = [(Path(p), read_cell(p)) for p in paths]
    rows = []
    clean = records[0][1]
    rows.append({"row": "clean", "threat_model": None, "eps": None, **_metrics(clean.clean),
                 "queries": clean.dataset.num_query, "path": None})
    for path, record in records:
        rows.append({"row": record.attack_id, "threat_model": record.threat_model,
                     "eps": round(record.perturbation.eps * 255, 3), **_metrics(record.attacked),
                     "queries": record.dataset.num_query, "path": str(path)})
    attacked = [r for r in rows[1:]]
    for eps in sorted({r["eps"] for r in attacked}):
        cells = pd.DataFrame({"path": [r["path"] for r in attacked if r["eps"] == eps],
                              "perturbed": [rec.perturbed or "query" for (p, rec), r in zip(records, attacked)
                                            if r["eps"] == eps],
                              "standardized": True})
        worst = worst_case(cells)
        if worst["rank1"] is not None:
            rows.append({"row": f"worst case (eps {eps:g})", "threat_model": f"{worst['attacks']} attacks", "eps": eps,
                         "rank1": worst["rank1"], "mAP": worst["mAP"], "rank5": None, "mINP": None,
                         "queries": clean.dataset.num_query, "path": None})
    return pd.DataFrame(rows, columns=["row", "threat_model", "eps", "rank1", "rank5", "mAP", "mINP", "queries",
                                       "path"]).set_index("row")


def _metrics(block: Metrics) -> dict:
    return {key: getattr(block, key) for key in ("rank1", "rank5", "mAP", "mINP")}
