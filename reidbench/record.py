"""The cell record: what one (model × dataset × attack) cell measured and how it was measured.

This module is the only one that knows how a record is laid out in its JSON file; the runner
builds a :class:`CellRecord`, :mod:`reidbench.results` stores it, and the leaderboard, the
submission checks and the benchmark scripts read its fields.

Layout (``schema`` 1; a record that predates the field is version 1 too)::

    schema, input_key, attack_id, threat_model, perturbed, zero_gradient_share, seed,
    batch_size, device, wall_time_s, sanity_flags, conventions, environment, example
    protocol      {version, fingerprint}
    model         {id, backbone, defense, weights_sha256, recipe, model, train_dataset,
                   stochastic, differentiable}
    dataset       {name, split_hash, num_query, num_gallery, image_size[, query_subset]}
    attack        the attack's own description (its parameters; ``name``)
    perturbation  {linf_max, l2_mean, eps}
    clean, attacked[, clean_reranked, attacked_reranked]
                  {rank1, rank5, rank10, mAP, mINP, num_valid_queries, ci95, interval,
                   per_identity[, adaptive]}
    surrogate     {id, weights_sha256}          (transfer attacks)
    per_query_file, per_query_bytes, per_query_sha256   (the ``.npz`` beside the record)
    reported      {source, url, clean, attacked, footnote}   (a submitter's own numbers)

A record may hold only ``reported`` numbers (no ``clean`` / ``attacked``). Field values are
kept as the file holds them (no float or int coercion), so that rewriting a record gives the
same bytes; whether a number is a usable fraction is for the reader that shows it to decide.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Optional, Union

from .errors import ReIDBenchError

#: the version this package writes; records of another version are refused, never guessed at
SCHEMA = 1

METRIC_LABELS = ("clean", "attacked", "clean_reranked", "attacked_reranked")


class MalformedRecord(ReIDBenchError):
    """A file that is not a cell record of a schema this package reads."""


def _require(condition: bool, reason: str) -> None:
    if not condition:
        raise MalformedRecord(reason)


def _block(data: dict, key: str, optional: bool = True) -> Optional[dict]:
    """``data[key]`` as an object; None when absent (or empty, for ``optional`` blocks)."""
    value = data.get(key)
    if optional and not value:
        return None
    _require(isinstance(value, dict), f"'{key}' must be an object")
    return value


def _emit(obj, always: tuple[str, ...] = ()) -> dict:
    """The JSON object of a block: every field in ``always``, the others when not None."""
    return {f.name: getattr(obj, f.name) for f in fields(obj)
            if f.name in always or getattr(obj, f.name) is not None}


@dataclass(frozen=True)
class ProtocolRef:
    version: Any = None
    fingerprint: Any = None

    @classmethod
    def from_json(cls, data: dict) -> "ProtocolRef":
        return cls(data.get("version"), data.get("fingerprint"))


@dataclass(frozen=True)
class ModelInfo:
    id: str
    backbone: Any = None
    #: the defense's description (``name`` and parameters); a bare name in hand-made records
    defense: Union[dict, str, None] = None
    weights_sha256: Any = None
    recipe: Any = None
    model: Any = None
    #: the dataset the weights were trained on (a cross-dataset cell is filed under another)
    train_dataset: Any = None
    stochastic: Any = None
    differentiable: Any = None

    @classmethod
    def from_json(cls, data: dict) -> "ModelInfo":
        _require(isinstance(data.get("id"), str), "model.id must be a string")
        return cls(**{f.name: data.get(f.name) for f in fields(cls)})

    @property
    def defense_name(self) -> str:
        if isinstance(self.defense, dict):
            return self.defense.get("name", "none")
        return "none" if self.defense is None else str(self.defense)


@dataclass(frozen=True)
class DatasetInfo:
    name: str
    split_hash: Any = None
    num_query: Any = None
    num_gallery: Any = None
    image_size: Any = None
    #: present only for a ``--queries`` cell: {queries, of, seed, ...}
    query_subset: Optional[dict] = None

    @classmethod
    def from_json(cls, data: dict) -> "DatasetInfo":
        _require(isinstance(data.get("name"), str), "dataset.name must be a string")
        subset = data.get("query_subset")
        _require(subset is None or isinstance(subset, dict), "dataset.query_subset must be an object")
        return cls(**{f.name: data.get(f.name) for f in fields(cls)})


@dataclass(frozen=True)
class Perturbation:
    linf_max: Any = None
    l2_mean: Any = None
    eps: Any = None

    @classmethod
    def from_json(cls, data: dict) -> "Perturbation":
        return cls(data.get("linf_max"), data.get("l2_mean"), data.get("eps"))


@dataclass(frozen=True)
class Metrics:
    """One block of ranking metrics (fractions), with the 95% intervals and the per-identity
    spread the protocol asks for; older records lack the latter two."""
    rank1: Any = None
    rank5: Any = None
    rank10: Any = None
    mAP: Any = None
    mINP: Any = None
    num_valid_queries: Any = None
    #: metric -> [lo, hi]
    ci95: Optional[dict] = None
    interval: Optional[dict] = None
    #: rank1_var, rank1_var_ci95, ...
    per_identity: Optional[dict] = None
    #: False on re-ranked numbers under an attack that optimised plain distances
    adaptive: Optional[bool] = None

    @classmethod
    def from_json(cls, data: dict) -> "Metrics":
        for key in ("ci95", "interval", "per_identity"):
            _require(data.get(key) is None or isinstance(data[key], dict), f"metric block '{key}' must be an object")
        return cls(**{f.name: data.get(f.name) for f in fields(cls)})

    def stored_interval(self, metric: str):
        """The stored [lo, hi] of ``metric`` (``rank1_var``: of the per-identity variance), or None."""
        if metric == "rank1_var":
            return (self.per_identity or {}).get("rank1_var_ci95")
        return (self.ci95 or {}).get(metric)


@dataclass(frozen=True)
class Reported:
    """A submitter's own numbers beside the measured ones (see reidbench.leaderboard.records)."""
    source: str
    url: Any = None
    clean: Optional[dict] = None
    attacked: Optional[dict] = None
    footnote: Any = None

    @classmethod
    def from_json(cls, data: dict) -> "Reported":
        _require(isinstance(data.get("source"), str) and bool(data["source"].strip()), "'reported' needs a non-empty 'source'")
        for part in ("clean", "attacked"):
            _require(not data.get(part) or isinstance(data[part], dict), f"'reported.{part}' must be an object")
        return cls(**{f.name: data.get(f.name) for f in fields(cls)})


@dataclass(frozen=True)
class PerQueryRef:
    """The per-query ``.npz`` beside the record; size and sha256 are absent in old records."""
    file: str
    bytes: Optional[int] = None
    sha256: Optional[str] = None


@dataclass(frozen=True)
class CellRecord:
    attack_id: str
    model: ModelInfo
    dataset: DatasetInfo
    #: the attack's description; ``name`` is its registry name
    attack: dict
    schema: int = SCHEMA
    input_key: Optional[str] = None
    protocol: Optional[ProtocolRef] = None
    threat_model: Optional[str] = None
    #: which side the attack perturbs: "query" or "gallery"
    perturbed: Optional[str] = None
    perturbation: Optional[Perturbation] = None
    #: share of exactly-zero input gradients on the first batch (white-box attacks only)
    zero_gradient_share: Optional[float] = None
    clean: Optional[Metrics] = None
    attacked: Optional[Metrics] = None
    clean_reranked: Optional[Metrics] = None
    attacked_reranked: Optional[Metrics] = None
    example: Optional[dict] = None
    conventions: Optional[dict] = None
    seed: Any = None
    batch_size: Any = None
    device: Any = None
    environment: Optional[dict] = None
    wall_time_s: Any = None
    surrogate: Optional[dict] = None
    sanity_flags: tuple = ()
    per_query: Optional[PerQueryRef] = None
    reported: Optional[Reported] = None

    # --- reading -----------------------------------------------------------------------
    @classmethod
    def from_json(cls, data, source: Union[str, Path] = "record") -> "CellRecord":
        """The record of a parsed JSON file; a malformed one or one of another schema raises
        :class:`MalformedRecord`, one line naming ``source``."""
        try:
            return cls._parse(data)
        except MalformedRecord as exc:
            raise MalformedRecord(f"{source}: not a usable cell record ({exc})") from None

    @classmethod
    def _parse(cls, data) -> "CellRecord":
        _require(isinstance(data, dict), "not a JSON object")
        _require(data.get("schema", SCHEMA) == SCHEMA,
                 f"schema {data.get('schema')!r}; this reidbench reads schema {SCHEMA}")
        for key in ("model", "dataset", "attack", "attack_id"):
            _require(key in data, f"no '{key}'")
        _require(isinstance(data["attack_id"], str), "attack_id must be a string")
        measured = {label: _block(data, label, optional=label.endswith("_reranked")) if label in data else None
                    for label in METRIC_LABELS}
        _require(("clean" in data) == ("attacked" in data), "needs both 'clean' and 'attacked' numbers, or neither")
        _require("clean" in data or data.get("reported") is not None, "needs measured 'clean' and 'attacked' numbers, "
                 "or 'reported' ones")
        flags = data.get("sanity_flags", [])
        _require(isinstance(flags, list), "sanity_flags must be a list")
        protocol, perturbation = _block(data, "protocol"), _block(data, "perturbation")
        reported = data.get("reported")
        _require(reported is None or isinstance(reported, dict), "'reported' must be an object")
        per_query = None
        if "per_query_file" in data:
            per_query = PerQueryRef(data["per_query_file"], data.get("per_query_bytes"), data.get("per_query_sha256"))
        return cls(
            attack_id=data["attack_id"], model=ModelInfo.from_json(_block(data, "model", optional=False)),
            dataset=DatasetInfo.from_json(_block(data, "dataset", optional=False)),
            attack=_block(data, "attack", optional=False), schema=data.get("schema", SCHEMA),
            input_key=data.get("input_key"), protocol=None if protocol is None else ProtocolRef.from_json(protocol),
            threat_model=data.get("threat_model"), perturbed=data.get("perturbed"),
            perturbation=None if perturbation is None else Perturbation.from_json(perturbation),
            zero_gradient_share=data.get("zero_gradient_share"),
            **{label: None if block is None else Metrics.from_json(block) for label, block in measured.items()},
            example=data.get("example"), conventions=data.get("conventions"), seed=data.get("seed"),
            batch_size=data.get("batch_size"), device=data.get("device"), environment=data.get("environment"),
            wall_time_s=data.get("wall_time_s"), surrogate=data.get("surrogate"), sanity_flags=tuple(flags),
            per_query=per_query, reported=None if reported is None else Reported.from_json(reported),
        )

    # --- writing -----------------------------------------------------------------------
    def to_json(self) -> dict:
        """The record as the JSON object its file holds (written with sorted keys)."""
        out = {"schema": self.schema, "input_key": self.input_key, "attack_id": self.attack_id,
               "protocol": _emit(self.protocol, ("version", "fingerprint")) if self.protocol else None,
               "model": _emit(self.model, tuple(f.name for f in fields(ModelInfo))),
               "dataset": _emit(self.dataset, tuple(f.name for f in fields(DatasetInfo) if f.name != "query_subset")),
               "attack": self.attack, "threat_model": self.threat_model, "perturbed": self.perturbed,
               "perturbation": _emit(self.perturbation, ("linf_max", "l2_mean", "eps")) if self.perturbation else None,
               "zero_gradient_share": self.zero_gradient_share, "seed": self.seed, "batch_size": self.batch_size,
               "device": self.device, "environment": self.environment, "wall_time_s": self.wall_time_s,
               "sanity_flags": list(self.sanity_flags), "conventions": self.conventions}
        optional = {"example": self.example, "surrogate": self.surrogate,
                    "reported": _emit(self.reported, ("source",)) if self.reported else None,
                    **{label: _emit(getattr(self, label)) for label in METRIC_LABELS if getattr(self, label) is not None}}
        if self.per_query is not None:
            optional.update({"per_query_file": self.per_query.file, "per_query_bytes": self.per_query.bytes,
                             "per_query_sha256": self.per_query.sha256})
        return {**out, **{key: value for key, value in optional.items() if value is not None}}

    # --- what readers ask of it -------------------------------------------------------------
    @property
    def measured(self) -> bool:
        """Whether the record holds numbers our runner measured (not only reported ones)."""
        return self.clean is not None and self.attacked is not None

    @property
    def attack_name(self) -> str:
        name = self.attack.get("name")
        return name if isinstance(name, str) else self.attack_id.rsplit("-eps", 1)[0]

    @property
    def protocol_version(self) -> Optional[str]:
        return None if self.protocol is None else self.protocol.version

    def metrics(self, label: str) -> Optional[Metrics]:
        """The metric block ``label`` (one of :data:`METRIC_LABELS`), None when absent."""
        if label not in METRIC_LABELS:
            raise KeyError(label)
        return getattr(self, label)
