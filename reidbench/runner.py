"""The protocol runner: every (model × attack) cell, each written as one result record.

A cell: clean gallery features (computed once per model and reused by every attack),
the attack on the queries in batches, features -> distances -> metrics, plain and
re-ranked. A cell whose inputs (protocol, weights, split, attack parameters) are unchanged
is skipped, so an interrupted or repeated ``run --all`` only does what is missing.
"""

from __future__ import annotations

import copy
import hashlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from .version import __version__
from .attack import Attack, AttackContext, RankOracle, SurrogateView, TrainView, build_attack
from .data import build_dataset
from .data.split import ReIDSplit, query_subset
from .defense import DefendedModel, build_defense
from .errors import ReIDBenchError
from .example import ExampleCapture, example_query_index, ranking_example
from .features import embed, extract_features
from .metrics import evaluate_rank, identity_spread, k_reciprocal_rerank, metric_intervals, pairwise_distance
from .models import build_model, check_model_fits
from .progress import log, progress_bar, run_progress
from .protocol import Protocol, load_protocol
from .record import METRIC_LABELS, CellRecord, DatasetInfo, Metrics, ModelInfo, Perturbation, ProtocolRef
from .hardware import environment, resolve_device
from .results import cell_intact, cell_path, read_cell, write_cell
from .cache import sha256_file
from .zoo import ZooEntry, load_weights, obtain_weights, training_entry
from .grid import check_attack_names, protocol_grid

#: offset of the seed under which the budget sweep embeds every budget's images (one per
#: batch, the same for all budgets; apart from the attack's own seed for that batch)
_BUDGET_SCORING_DRAWS = 7919


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
        max_rank=protocol.max_rank, ap=protocol.ap, ties=protocol.ties,
    )
    cmc = result.cmc
    interval = {**protocol.interval, "seed": protocol.seed}
    summary = {"rank1": float(cmc[0]), "rank5": float(cmc[min(4, len(cmc) - 1)]),
               "rank10": float(cmc[min(9, len(cmc) - 1)]), "mAP": float(result.mAP), "mINP": float(result.mINP),
               "num_valid_queries": int(result.num_valid),
               "ci95": metric_intervals(result.per_query_first_hit.numpy(), np.asarray(split.query.pids),
                                        result.per_query_ap.numpy(), result.per_query_inp.numpy(), **interval),
               "interval": {"method": "identity-bootstrap", **interval},
               "per_identity": identity_spread(result.per_query_first_hit, split.query.pids, **interval)}
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
        train_if_unreachable: bool = False,
        queries: Optional[int] = None,
    ):
        self.zoo = zoo
        self.results_root = Path(results_root)
        self.protocol = protocol or load_protocol()
        self.device = resolve_device(device)
        self.train_missing = train_missing
        self.train_if_unreachable = train_if_unreachable
        self.batch_size = batch_size
        self.rerank = rerank
        self.progress = progress
        self.force = force
        # Evaluate a fixed, seeded subset of this many queries (big models on small machines);
        # such cells are filed and ranked apart from full ones.
        self.queries = queries
        #: entry id -> (model, fingerprint of what it computes): models given as Python objects
        #: (:func:`reidbench.benchmark`), used instead of the entry's weights
        self.provided: dict[str, tuple[torch.nn.Module, str]] = {}
        self._splits: dict[str, ReIDSplit] = {}
        self._bundles: dict[str, ModelBundle] = {}
        # Transfer attacks never see the target: what they craft on the surrogate serves every
        # target of the run (SurrogateView.crafted).
        self._transfer_images: dict[str, torch.Tensor] = {}

    # --- inputs ------------------------------------------------------------------------
    def split_for(self, dataset: dict, image_size: Optional[tuple] = None) -> ReIDSplit:
        key = json.dumps({"dataset": dataset, "size": image_size}, sort_keys=True)
        if key not in self._splits:
            options = {k: v for k, v in dataset.items() if k != "name"}
            split = build_dataset(dataset["name"], **options)
            if image_size is not None and tuple(split.image_size) != tuple(image_size):
                split = ReIDSplit(split.name, split.train.materialize(image_size), split.query.materialize(image_size),
                                  split.gallery.materialize(image_size), tuple(image_size), split.split_hash, split.info)
            if self.queries is not None:
                split = query_subset(split, self.queries, self.protocol.seed)
            self._splits[key] = split
        return self._splits[key]

    def bundle(self, entry: ZooEntry, dataset: Optional[dict] = None) -> ModelBundle:
        """The defended model of ``entry``, evaluated on ``dataset`` (its own by default)."""
        key = json.dumps({"entry": entry.id, "dataset": dataset}, sort_keys=True)
        if key in self._bundles:
            return self._bundles[key]
        if entry.id in self.provided:  # a model object handed to reidbench.benchmark: nothing to load
            model, weights_sha256 = self.provided[entry.id]
        else:
            model, weights_sha256 = self.load_model(entry)
        defended = DefendedModel(model, build_defense(entry.defense)).to(self.device).eval()
        split = self.split_for(dataset or entry.dataset, tuple(model.input_size))
        check_model_fits(model, split, f"model '{entry.id}'")
        bundle = ModelBundle(entry, defended, split, weights_sha256)
        self._bundles[key] = bundle
        return bundle

    def load_model(self, entry: ZooEntry) -> tuple[torch.nn.Module, str]:
        """The entry's model with its weights (obtained, trained or imported) and their sha256."""
        # Borrowed weights are trained on the lending entry's own split (the same training
        # data; a cross-modality direction may differ).
        train_split = self.split_for(training_entry(entry, self.zoo).dataset)
        weights = obtain_weights(entry, train_split, self.train_missing, self.device, self.progress, zoo=self.zoo,
                                 train_if_unreachable=self.train_if_unreachable)
        if weights.suffix == ".onnx":
            from .models.onnx_import import load_onnx_model

            model = load_onnx_model(weights, entry.model)
        else:
            model = build_model(entry.model_spec(), num_classes=0)
            load_weights(model, weights, entry.id, recipe_key=training_entry(entry, self.zoo).recipe_key())
        return model, sha256_file(weights)

    def clean_features(self, bundle: ModelBundle) -> dict:
        if not bundle.features:
            size = tuple(bundle.model.input_size)
            # A stochastic defense transform draws from the global RNG: seed it so that clean
            # features, hence every cell's clean metrics, are the same on every run.
            torch.manual_seed(self.protocol.seed)
            for part in ("query", "gallery"):
                bundle.features[part] = extract_features(
                    bundle.model, getattr(bundle.split, part), size, self.batch_size, self.protocol.normalize,
                    description=f"{bundle.entry.id}: {part} features", progress=self.progress)
            if self.rerank:
                g = bundle.features["gallery"]
                bundle.features["g_g"] = pairwise_distance(g, g)
        return bundle.features

    def bare_features(self, bundle: ModelBundle) -> dict:
        """Clean features of the network without the defense's input transform (what an
        oblivious attacker aims with), computed once per model."""
        if "bare_query" not in bundle.features:
            size = tuple(bundle.model.input_size)
            for part in ("query", "gallery"):
                bundle.features[f"bare_{part}"] = extract_features(
                    bundle.model.model, getattr(bundle.split, part), size, self.batch_size, self.protocol.normalize,
                    description=f"{bundle.entry.id}: {part} features without the transform", progress=self.progress)
        return {part: bundle.features[f"bare_{part}"] for part in ("query", "gallery")}

    # --- one cell ------------------------------------------------------------------------
    def make_attack(self, name: str, eps: float, bundle: Optional[ModelBundle] = None) -> Attack:
        """An attack with the protocol's budget; against a stochastic defense, iterative
        white-box attacks average their gradients over the protocol's EOT draws."""
        p = self.protocol
        attack = build_attack(name, eps=eps, step=p.step, iterations=p.iterations, seed=p.seed, **p.attack_params(name))
        attack.strengthen(restarts=p.restarts, best_iterate=p.best_iterate)
        if bundle is not None and bundle.model.stochastic and attack.threat_model == "white-box":
            attack.adapt(eot_samples=p.eot_samples)
        return attack

    def attacked_model(self, bundle: ModelBundle, attack: Attack) -> torch.nn.Module:
        """What a white-box attacker differentiates: the defended model itself, or its BPDA
        version when the defense's input transform has no useful gradient."""
        if attack.threat_model == "white-box" and bundle.model.transform is not None \
                and not bundle.model.defense.differentiable and self.protocol.bpda:
            return bundle.model.with_bpda()
        return bundle.model

    def input_key(self, bundle: ModelBundle, attack: Attack) -> str:
        blob = {"protocol": self.protocol.fingerprint(), "model": bundle.entry.id, "weights": bundle.weights_sha256,
                "defense": bundle.model.defense.describe(), "split": bundle.split.split_hash, "attack": attack.describe(),
                "rerank": self.rerank, "engine": __version__}
        if "surrogate" in attack.needs:
            blob["surrogate"] = self.surrogate_bundle(bundle).weights_sha256
        if bundle.entry.is_onnx:  # its preprocessing is part of the entry, not of the weights file
            blob["input_spec"] = bundle.entry.model
        if "query_subset" in bundle.split.info:  # absent for full cells, whose keys stay as they were
            blob["query_subset"] = bundle.split.info["query_subset"]
        return hashlib.sha256(json.dumps(blob, sort_keys=True, default=str).encode()).hexdigest()[:20]

    def surrogate_entry(self, dataset_name: str) -> ZooEntry:
        """The zoo entry of the protocol's fixed surrogate for the dataset."""
        surrogate_id = self.protocol.surrogate(dataset_name)
        if surrogate_id not in self.zoo:
            raise ReIDBenchError(
                f"protocol {self.protocol.version} names surrogate '{surrogate_id}' for dataset "
                f"'{dataset_name}', but the zoo has no such model")
        return self.zoo[surrogate_id]

    def surrogate_bundle(self, bundle: ModelBundle) -> ModelBundle:
        """The surrogate for the dataset, evaluated on the same split."""
        return self.bundle(self.surrogate_entry(bundle.split.name),
                           bundle.entry.dataset if bundle.split.name == bundle.entry.dataset_name
                           else {"name": bundle.split.name})

    def run_cell(self, entry: ZooEntry, attack_name: str, eps: Optional[float] = None, dataset: Optional[dict] = None) -> Optional[Path]:
        """Run (or reuse) one cell. Returns None for a transfer cell whose target is the surrogate itself."""
        eps = self.protocol.eps if eps is None else eps
        bundle = self.bundle(entry, dataset)
        attack = self.make_attack(attack_name, eps, bundle)
        split = bundle.split
        if "surrogate" in attack.needs and self.protocol.surrogate(split.name) == entry.id:
            return None  # a transfer attack from a model onto itself is the white-box attack
        path = cell_path(self.results_root, self.protocol.version, split.name, entry.id, self.cell_id(split, attack_name, eps))
        key = self.input_key(bundle, attack)
        if not self.force and path.exists():
            previous = read_cell(path)
            if previous is not None and previous.input_key == key and cell_intact(path, previous):
                return path
        started = time.time()
        feats = self.clean_features(bundle)
        example = ExampleCapture(example_query_index(split, self.protocol.seed))
        if attack.perturbs == "gallery":
            adv_feats, linf, l2, zero_share = self.attack_images(bundle, attack, side="gallery")
            scores, per_query = self.score(bundle, feats, feats["query"], adv_feats, example)
        else:
            adv_feats, linf, l2, zero_share = self.attack_images(bundle, attack, side="query", capture=example)
            scores, per_query = self.score(bundle, feats, adv_feats, feats["gallery"], example)
        wall_time_s = round(time.time() - started, 3)
        measured = {label: Metrics.from_json(scores[label]) if label in scores else None for label in METRIC_LABELS}
        record = CellRecord(
            input_key=key, attack_id=attack_id(attack_name, eps),
            protocol=ProtocolRef(self.protocol.version, self.protocol.fingerprint()),
            model=ModelInfo(id=entry.id, backbone=entry.backbone, defense=bundle.model.defense.describe(),
                            weights_sha256=bundle.weights_sha256, recipe=training_entry(entry, self.zoo).recipe,
                            model=entry.model, train_dataset=entry.dataset, stochastic=bundle.model.stochastic,
                            differentiable=bundle.model.defense.differentiable),
            dataset=DatasetInfo(name=split.name, split_hash=split.split_hash, num_query=len(split.query),
                                num_gallery=len(split.gallery), image_size=list(split.image_size),
                                query_subset=split.info.get("query_subset")),
            attack=attack.describe(), threat_model=attack.threat_model, perturbed=attack.perturbs,
            perturbation=Perturbation(linf_max=linf, l2_mean=l2, eps=eps), zero_gradient_share=zero_share,
            **measured, example=scores.get("example"), conventions=scores["conventions"],
            seed=self.protocol.seed, batch_size=self.batch_size, device=self.device, environment=environment(),
            wall_time_s=wall_time_s,
            surrogate={"id": self.protocol.surrogate(split.name), "weights_sha256": self.surrogate_bundle(bundle).weights_sha256}
            if "surrogate" in attack.needs else None,
            sanity_flags=tuple(self.sanity_flags(bundle, measured["clean"], measured["attacked"], zero_share)),
        )
        write_cell(path, record, per_query)
        return path

    @staticmethod
    def cell_id(split: ReIDSplit, attack_name: str, eps: float) -> str:
        """The cell's file name: a query-subset cell never overwrites (or is mistaken for) a full one."""
        subset = split.info.get("query_subset")
        return attack_id(attack_name, eps) + (f"-q{subset['queries']}" if subset else "")

    def attack_context(self, bundle: ModelBundle, attack: Attack, side: str) -> AttackContext:
        split, feats = bundle.split, bundle.features
        # Perturbing the gallery swaps the roles: the attacked images are gallery images and
        # their guides are the clean queries (Bai et al.'s original setting).
        own, other = ("query", "gallery") if side == "query" else ("gallery", "query")
        ctx = AttackContext(
            query_pids=getattr(split, own).pids, query_camids=getattr(split, own).camids, query_feats=feats[own],
            gallery_feats=feats[other], gallery_pids=getattr(split, other).pids,
            gallery_camids=getattr(split, other).camids,
        )
        if "surrogate" in attack.needs:
            sur = self.surrogate_bundle(bundle)
            sur_feats = self.clean_features(sur)
            ctx.surrogate = SurrogateView(sur.entry.id, sur.model, sur_feats[own], sur_feats[other],
                                          crafted=self._transfer_images)
        if "bare" in attack.needs and bundle.model.transform is not None:
            bare = self.bare_features(bundle)
            ctx.bare = SurrogateView(bundle.entry.id, bundle.model.model, bare[own], bare[other])
        if "train" in attack.needs:
            # A learned attack studies the training split of the model it has access to.
            source = self.surrogate_bundle(bundle) if "surrogate" in attack.needs else bundle
            ctx.train = TrainView(self.split_for(source.entry.dataset, tuple(source.model.input_size)).train,
                                  tuple(source.model.input_size))
        return ctx

    def attack_images(self, bundle: ModelBundle, attack: Attack, side: str = "query",
                      capture: Optional[ExampleCapture] = None, only: Optional[list[int]] = None):
        """Adversarial features of one side (query or gallery), its perturbation sizes and
        the share of exactly-zero input gradients on the first batch (a masking smell);
        the adversarial image of ``capture.index`` is kept in ``capture.image``.

        ``only``: attack just these images (sorted positions), each in the batch and with the
        seeds it has in the whole run, so that their outcomes are the whole run's (validation)."""
        feats, linf, l2, zero_share = self._attack_side(bundle, attack, side, capture, only)
        return feats[None], linf, l2, zero_share

    def attack_images_by_budget(self, bundle: ModelBundle, attack: Attack, budgets: list[int]):
        """The queries' adversarial features at each iteration budget, {budget: features}, from
        one run of the largest (:meth:`Attack.perturb_by_budget`; the budget sweep's), with the
        batches, seeds and model of :meth:`attack_images`; and the L∞ size at the largest."""
        if not attack.sweepable:
            raise ReIDBenchError(f"attack '{attack.registry_name}' has no iteration count to sweep")
        self.clean_features(bundle)
        feats, linf, _, _ = self._attack_side(bundle, attack, "query", None, None, budgets=budgets)
        return feats, linf

    def _attack_side(self, bundle: ModelBundle, attack: Attack, side: str, capture: Optional[ExampleCapture],
                     only: Optional[list[int]], budgets: Optional[list[int]] = None):
        split, model = bundle.split, bundle.model
        subset = getattr(split, side)
        size = tuple(model.input_size)
        ctx = self.attack_context(bundle, attack, side)
        target = self.attacked_model(bundle, attack)
        q = self.protocol.raw.get("query_based", {})
        out, linf, l2sum, zero_share = {}, 0.0, 0.0, None
        positions = torch.arange(len(subset)) if only is None else torch.as_tensor(only, dtype=torch.long)
        n = len(positions)
        batch_size = len(subset) if attack.whole_query_set else self.batch_size
        with progress_bar(enabled=self.progress) as bar:
            task = bar.add_task(f"{bundle.entry.id}: {attack.registry_name}", total=n)
            for start in range(0, len(subset), batch_size):
                index = positions[(positions >= start) & (positions < start + batch_size)]
                if not len(index):
                    continue
                images = subset.load(index, size).to(self.device)
                batch_ctx = ctx.batch(index)
                done = n - len(positions[positions >= start])
                batch_ctx.report = lambda share, done=done, count=len(index): bar.update(task, completed=done + share * count)
                # One generator per batch, seeded from its position: results do not depend on batch order.
                batch_seed = attack.seed * 1_000_003 + start
                batch_ctx.generator = torch.Generator().manual_seed(batch_seed)
                torch.manual_seed(batch_seed)  # the defense transform's draws, likewise
                if "oracle" in attack.needs:
                    batch_ctx.oracle = RankOracle(model, ctx.gallery_feats, q.get("top_k", 10), q.get("budget", 500),
                                                  len(index), self.protocol.normalize, chunk=4 * self.batch_size)
                if start == 0 and attack.threat_model == "white-box":
                    zero_share = input_gradient_zero_share(target, images, batch_ctx, self.protocol.normalize)
                advs = {None: attack(target, images, batch_ctx)} if budgets is None else \
                    attack.by_budget(target, images, batch_ctx, budgets)
                adv = advs[None] if budgets is None else advs[max(advs)]
                if capture is not None and capture.index is not None and bool((index == capture.index).any()):
                    capture.image = adv[int((index == capture.index).nonzero()[0])].detach().cpu()
                delta = (adv - images).flatten(1)
                linf = max(linf, float(delta.abs().max()))
                l2sum += float(delta.norm(dim=1).sum())
                with torch.no_grad():
                    for key, images_at in advs.items():
                        if budgets is not None:
                            # Common random numbers: a stochastic defense embeds every budget's
                            # images under the same transform draws, so two budgets differ by
                            # the attack alone, not by which draw their scoring happened to get.
                            torch.manual_seed(batch_seed + _BUDGET_SCORING_DRAWS)
                        out.setdefault(key, []).append(embed(model, images_at, self.protocol.normalize).cpu())
                bar.update(task, completed=done + len(index))
        return {key: torch.cat(parts) for key, parts in out.items()}, linf, l2sum / max(n, 1), zero_share

    def score(self, bundle: ModelBundle, feats: dict, q: torch.Tensor, g: torch.Tensor,
              example: Optional[ExampleCapture] = None) -> tuple[dict, dict]:
        split = bundle.split
        record, per_query, example_rows = {}, {}, {}
        for label, (qf, gf) in (("clean", (feats["query"], feats["gallery"])), ("attacked", (q, g))):
            if label == "clean":
                # Every cell of a model scores the same clean features: score them once.
                if "clean_score" not in feats:
                    feats["clean_score"] = self._score_side(split, qf, gf, feats, "clean", example)
                scored = copy.deepcopy(feats["clean_score"])
            else:
                scored = self._score_side(split, qf, gf, feats, label, example)
            metrics, arrays, example_row = scored
            record.update(metrics)
            per_query.update(arrays)
            if example_row is not None:
                example_rows[label] = example_row
        per_query["query_pids"] = split.query.pids.numpy().astype(np.int64)
        if example_rows:
            record["example"] = ranking_example(split, example, example_rows["clean"], example_rows["attacked"])
        record["conventions"] = {"ap": self.protocol.ap, "distance": self.protocol.distance, "normalized": self.protocol.normalize,
                                 "rerank": self.protocol.rerank if self.rerank else None}
        return record, per_query

    def _score_side(self, split: ReIDSplit, qf: torch.Tensor, gf: torch.Tensor, feats: dict, label: str,
                    example: Optional[ExampleCapture]) -> tuple[dict, dict, Optional[torch.Tensor]]:
        """Metrics (plain and re-ranked), per-query arrays and the example query's distance row
        of one side of a cell (``label``: clean or attacked)."""
        q_g = pairwise_distance(qf, gf)
        metrics, arrays = {}, {}
        metrics[label], result = rank_metrics(q_g, split, self.protocol)
        arrays[f"{label}_ap"] = np.asarray(result.per_query_ap, dtype=np.float32)
        arrays[f"{label}_first_hit"] = np.asarray(result.per_query_first_hit, dtype=np.int32)
        arrays[f"{label}_inp"] = np.asarray(result.per_query_inp, dtype=np.float32)
        if self.rerank:
            g_g = feats["g_g"] if gf is feats["gallery"] else pairwise_distance(gf, gf)
            reranked = k_reciprocal_rerank(q_g, pairwise_distance(qf, qf), g_g, **self.protocol.rerank)
            metrics[f"{label}_reranked"], _ = rank_metrics(reranked, split, self.protocol)
            if label == "attacked" and not self.protocol.rerank_attacked_adaptive:
                # The attack optimised plain distances, not the re-ranked ones.
                metrics[f"{label}_reranked"]["adaptive"] = False
        row = q_g[example.index].clone() if example is not None and example.index is not None else None
        return metrics, arrays, row

    def sanity_flags(self, bundle: ModelBundle, clean: Metrics, attacked: Metrics,
                     zero_share: Optional[float]) -> list[str]:
        """Per-cell signs that a number should not be trusted (in the spirit of AutoAttack's
        checks); the cross-cell ones (transfer beating white-box) are raised by the leaderboard."""
        flags = []
        if any(getattr(attacked, m) > getattr(clean, m) + 1e-6 for m in ("mAP", "rank1")):
            flags.append("attack-improved-metric")
        if (zero_share or 0.0) > self.protocol.zero_gradient_flag:
            flags.append("zero-input-gradients")
        probe = bundle.split.query.load(torch.arange(min(8, len(bundle.split.query))), tuple(bundle.model.input_size))
        with torch.no_grad():
            a = embed(bundle.model, probe.to(self.device))
            b = embed(bundle.model, probe.to(self.device))
        if not torch.allclose(a, b, atol=1e-5):
            # Expected for a declared-stochastic defense (EOT is then applied), a red flag otherwise.
            flags.append("stochastic-embeddings" if bundle.model.stochastic else "nondeterministic-embeddings")
        return flags

    # --- the grid ------------------------------------------------------------------------
    def run(self, entries: list[ZooEntry], attacks: Optional[list[str]] = None, eps_values: Optional[list[float]] = None,
            dataset: Optional[dict] = None) -> list[Path]:
        """Every (entry × attack × ε) cell, on each entry's own dataset or on ``dataset``
        (cross-dataset: train on A, test on B; the cells are filed under B); ``attacks`` None:
        the protocol's whole suite (:func:`reidbench.grid.protocol_grid`). A cell the protocol does not
        define (:func:`reidbench.grid.undefined_cell`) is skipped with its reason."""
        check_attack_names(attacks or self.protocol.attacks(), self.protocol)
        paths = []
        cells = list(protocol_grid(self.protocol, entries, attacks, eps_values, dataset["name"] if dataset else None))
        with run_progress(len(cells), "all cells", enabled=self.progress) as advance:
            for entry, name, eps in cells:
                path = self.run_cell(entry, name, eps, dataset)
                if path is not None:
                    paths.append(path)
                    log(f"[green]✓[/] {entry.id} × {path.stem}")
                advance()
        return paths


def input_gradient_zero_share(model: torch.nn.Module, images: torch.Tensor, ctx: AttackContext, normalize: bool) -> float:
    """Share of input-gradient entries that are exactly zero for a generic feature-space loss
    (distance to the clean features): near 1 means gradients are masked, not absent."""
    x = images.detach().clone().requires_grad_(True)
    feats = embed(model, x, normalize)
    loss = (feats - ctx.query_feats.to(feats.device)).pow(2).sum() + feats.sum() * 1e-3
    (grad,) = torch.autograd.grad(loss, x)
    return float((grad == 0).float().mean())
