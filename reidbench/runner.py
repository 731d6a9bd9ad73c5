"""The protocol runner: every (model × attack) cell, each written as one result record.

A cell: clean gallery features (computed once per model and reused by every attack),
the attack on the queries in batches, features -> distances -> metrics, plain and
re-ranked. A cell whose inputs (protocol, weights, split, attack parameters) are unchanged
is skipped, so an interrupted or repeated ``run --all`` only does what is missing.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from . import __version__
from .attack import Attack, AttackContext, build_attack
from .data import build_dataset
from .data.split import ReIDSplit
from .defense import DefendedModel, build_defense
from .errors import ReIDBenchError
from .features import embed, extract_features
from .metrics import evaluate_rank, k_reciprocal_rerank, pairwise_distance
from .models import build_model
from .progress import log, progress_bar
from .protocol import Protocol, load_protocol
from .hardware import environment, resolve_device
from .results import cell_path, read_cell, write_cell
from .zoo import ZooEntry, load_weights, obtain_weights, sha256_file


def attack_id(name: str, eps: float) -> str:
    return f"{name}-eps{round(eps * 255, 3):g}"


@dataclass
class ModelBundle:
    entry: ZooEntry
    model: DefendedModel
    split: ReIDSplit
    weights_sha256: str
    features: dict = field(default_factory=dict)


def rank_metrics(distmat: torch.Tensor, split: ReIDSplit, protocol: Protocol):
    result = evaluate_rank(
        distmat, split.query.pids, split.gallery.pids, split.query.camids, split.gallery.camids,
        max_rank=protocol.max_rank, ap=protocol.ap,
    )
    cmc = result.cmc
    summary = {"rank1": float(cmc[0]), "rank5": float(cmc[min(4, len(cmc) - 1)]),
               "rank10": float(cmc[min(9, len(cmc) - 1)]), "mAP": float(result.mAP), "mINP": float(result.mINP),
               "num_valid_queries": int(result.num_valid)}
    return summary, result


class Runner:
    def __init__(
        self,
        zoo: dict[str, ZooEntry],
        results_root: Path = Path("results"),
        protocol: Optional[Protocol] = None,
        device: str = "auto",
        train_missing: bool = True,
        batch_size: int = 128,
        rerank: bool = True,
        progress: bool = True,
        force: bool = False,
    ):
        self.zoo = zoo
        self.results_root = Path(results_root)
        self.protocol = protocol or load_protocol()
        self.device = resolve_device(device)
        self.train_missing = train_missing
        self.batch_size = batch_size
        self.rerank = rerank
        self.progress = progress
        self.force = force
        self._splits: dict[str, ReIDSplit] = {}
        self._bundles: dict[str, ModelBundle] = {}

    # --- inputs ------------------------------------------------------------------------
    def split_for(self, dataset: dict, image_size: Optional[tuple] = None) -> ReIDSplit:
        key = json.dumps({"dataset": dataset, "size": image_size}, sort_keys=True)
        if key not in self._splits:
            options = {k: v for k, v in dataset.items() if k != "name"}
            split = build_dataset(dataset["name"], **options)
            if image_size is not None and tuple(split.image_size) != tuple(image_size):
                split = ReIDSplit(split.name, split.train.materialize(image_size), split.query.materialize(image_size),
                                  split.gallery.materialize(image_size), tuple(image_size), split.split_hash, split.info)
            self._splits[key] = split
        return self._splits[key]

    def bundle(self, entry: ZooEntry, dataset: Optional[dict] = None) -> ModelBundle:
        """The defended model of ``entry``, evaluated on ``dataset`` (its own by default)."""
        key = json.dumps({"entry": entry.id, "dataset": dataset}, sort_keys=True)
        if key in self._bundles:
            return self._bundles[key]
        train_split = self.split_for(entry.dataset)
        weights = obtain_weights(entry, train_split, self.train_missing, self.device, self.progress)
        model = build_model(entry.model_spec(), num_classes=0)
        load_weights(model, weights, entry.id)
        defended = DefendedModel(model, build_defense(entry.defense)).to(self.device).eval()
        split = self.split_for(dataset or entry.dataset, tuple(model.input_size))
        bundle = ModelBundle(entry, defended, split, sha256_file(weights))
        self._bundles[key] = bundle
        return bundle

    def clean_features(self, bundle: ModelBundle) -> dict:
        if not bundle.features:
            size = tuple(bundle.model.input_size)
            for part in ("query", "gallery"):
                bundle.features[part] = extract_features(
                    bundle.model, getattr(bundle.split, part), size, self.batch_size, self.protocol.normalize,
                    description=f"{bundle.entry.id}: {part} features", progress=self.progress)
            if self.rerank:
                g = bundle.features["gallery"]
                bundle.features["g_g"] = pairwise_distance(g, g)
        return bundle.features

    # --- one cell ------------------------------------------------------------------------
    def make_attack(self, name: str, eps: float) -> Attack:
        p = self.protocol
        return build_attack(name, eps=eps, step=p.step, iterations=p.iterations, seed=p.seed)

    def input_key(self, bundle: ModelBundle, attack: Attack) -> str:
        blob = {"protocol": self.protocol.fingerprint(), "model": bundle.entry.id, "weights": bundle.weights_sha256,
                "defense": bundle.entry.defense, "split": bundle.split.split_hash, "attack": attack.describe(),
                "rerank": self.rerank, "engine": __version__}
        return hashlib.sha256(json.dumps(blob, sort_keys=True, default=str).encode()).hexdigest()[:20]

    def run_cell(self, entry: ZooEntry, attack_name: str, eps: Optional[float] = None, dataset: Optional[dict] = None) -> Path:
        eps = self.protocol.eps if eps is None else eps
        attack = self.make_attack(attack_name, eps)
        bundle = self.bundle(entry, dataset)
        split = bundle.split
        path = cell_path(self.results_root, self.protocol.version, split.name, entry.id, attack_id(attack_name, eps))
        key = self.input_key(bundle, attack)
        if not self.force and path.exists():
            previous = read_cell(path)
            if previous is not None and previous.get("input_key") == key:
                return path
        started = time.time()
        feats = self.clean_features(bundle)
        adv_feats, linf, l2 = self.attack_queries(bundle, attack)
        record, per_query = self.score(bundle, feats, adv_feats)
        record.update({
            "schema": 1, "input_key": key, "attack_id": attack_id(attack_name, eps),
            "protocol": {"version": self.protocol.version, "fingerprint": self.protocol.fingerprint()},
            "model": {"id": entry.id, "backbone": entry.backbone, "defense": entry.defense,
                      "weights_sha256": bundle.weights_sha256, "recipe": entry.recipe, "model": entry.model,
                      "train_dataset": entry.dataset},
            "dataset": {"name": split.name, "split_hash": split.split_hash, "num_query": len(split.query),
                        "num_gallery": len(split.gallery), "image_size": list(split.image_size)},
            "attack": attack.describe(), "threat_model": attack.threat_model,
            "perturbation": {"linf_max": linf, "l2_mean": l2},
            "seed": self.protocol.seed, "device": self.device, "environment": environment(),
            "wall_time_s": round(time.time() - started, 3),
        })
        record["sanity_flags"] = self.sanity_flags(bundle, record)
        write_cell(path, record, per_query)
        return path

    def attack_queries(self, bundle: ModelBundle, attack: Attack) -> tuple[torch.Tensor, float, float]:
        split, feats, model = bundle.split, bundle.features, bundle.model
        size = tuple(model.input_size)
        ctx = AttackContext(
            query_pids=split.query.pids, query_camids=split.query.camids, query_feats=feats["query"],
            gallery_feats=feats["gallery"], gallery_pids=split.gallery.pids, gallery_camids=split.gallery.camids,
        )
        out, linf, l2sum = [], 0.0, 0.0
        n = len(split.query)
        with progress_bar(enabled=self.progress) as bar:
            task = bar.add_task(f"{bundle.entry.id}: {attack.registry_name}", total=n)
            for start in range(0, n, self.batch_size):
                index = torch.arange(start, min(start + self.batch_size, n))
                queries = split.query.load(index, size).to(self.device)
                batch_ctx = ctx.batch(index)
                # One generator per batch, seeded from its position: results do not depend on batch order.
                batch_ctx.generator = torch.Generator().manual_seed(attack.seed * 1_000_003 + start)
                adv = attack(model, queries, batch_ctx)
                delta = (adv - queries).flatten(1)
                linf = max(linf, float(delta.abs().max()))
                l2sum += float(delta.norm(dim=1).sum())
                with torch.no_grad():
                    out.append(embed(model, adv, self.protocol.normalize).cpu())
                bar.update(task, advance=len(index))
        return torch.cat(out), linf, l2sum / max(n, 1)

    def score(self, bundle: ModelBundle, feats: dict, adv_feats: torch.Tensor) -> tuple[dict, dict]:
        split = bundle.split
        record, per_query = {}, {}
        for label, q in (("clean", feats["query"]), ("attacked", adv_feats)):
            q_g = pairwise_distance(q, feats["gallery"])
            record[label], result = rank_metrics(q_g, split, self.protocol)
            per_query[f"{label}_ap"] = np.asarray(result.per_query_ap, dtype=np.float32)
            per_query[f"{label}_first_hit"] = np.asarray(result.per_query_first_hit, dtype=np.int32)
            if self.rerank:
                reranked = k_reciprocal_rerank(q_g, pairwise_distance(q, q), feats["g_g"], **self.protocol.rerank)
                record[f"{label}_reranked"], _ = rank_metrics(reranked, split, self.protocol)
        per_query["query_pids"] = split.query.pids.numpy().astype(np.int64)
        record["conventions"] = {"ap": self.protocol.ap, "distance": "euclidean", "normalized": self.protocol.normalize,
                                 "rerank": self.protocol.rerank if self.rerank else None}
        return record, per_query

    def sanity_flags(self, bundle: ModelBundle, record: dict) -> list[str]:
        """Signs that a number should not be trusted (in the spirit of AutoAttack's checks)."""
        flags = []
        if record["attacked"]["mAP"] > record["clean"]["mAP"] + 1e-6:
            flags.append("attack-improved-metric")
        probe = bundle.split.query.load(torch.arange(min(8, len(bundle.split.query))), tuple(bundle.model.input_size))
        with torch.no_grad():
            a = embed(bundle.model, probe.to(self.device))
            b = embed(bundle.model, probe.to(self.device))
        if not torch.allclose(a, b, atol=1e-5) and not bundle.model.stochastic:
            flags.append("nondeterministic-embeddings")
        return flags

    # --- the grid ------------------------------------------------------------------------
    def run(self, entries: list[ZooEntry], attacks: list[str], eps_values: Optional[list[float]] = None) -> list[Path]:
        eps_values = eps_values or [self.protocol.eps]
        for name in attacks:  # fail on a bad name before any work is done
            self.make_attack(name, eps_values[0])
        paths = []
        for entry in entries:
            for name in attacks:
                for eps in eps_values:
                    paths.append(self.run_cell(entry, name, eps))
                    log(f"[green]✓[/] {entry.id} × {attack_id(name, eps)}")
        return paths
