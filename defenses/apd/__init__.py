"""APD, "Adversarial Perturbation and Defense for generalizable person re-identification"
(Tan, Xu, Tao, Liu; Neural Networks 186, 107287, 2025; no code published).

APD is a domain-generalization method: train on a source dataset A, test on unseen ones
(``reidbench eval --model ID --dataset OTHER``). Every item below says where it comes from:
**[paper]** the method section (the results tables were not available to us), **[ours]** our
choice where the text leaves it open. Every choice is a parameter of ``defense: {name: apd,
...}`` or, for the network itself, of the ``apd-split`` model head.

**Two stages** [paper], not alternating: stage 1 trains MPG-Net on the source training set
and makes with it a "New Source Domain" of hard matching samples; stage 2 trains SP-Net on
them. [ours] "On them" is read as the real training images plus one generated image per real
one, labelled with its source's identity and camera (``include_real: false`` trains on the
generated images alone). Stage 1 is ``Defense.prepare_train`` (run once per training run;
the trained MPG-Net and the generated set are cached under ``cache_dir()/apd``, keyed by the
split hash, the feature network's weights and every parameter that decides them); stage 2 is
:meth:`APD.training_loss` in the one shared training loop.

**Stage 1, MPG-Net** (:mod:`.mpg`), a GAN.

* [paper] For each sample x_i, M negatives x_ij of other identities drawn at random.
  [ours] M = ``negatives``, drawn uniformly from the whole training set.
* [paper] L_G = −½·E[log D(G(x_i))];  L_D = −½·E[log(1 − D(G(x_i)))] − ½·E[log D(x_ij)]:
  the negatives are the discriminator's "real" class, so G is pushed to look like other
  identities (:func:`generator_adversarial_loss`, :func:`discriminator_loss`).
* [paper] L_MP = softplus(d(ψ(G(x_i)), ψ(x_ij)) − d(ψ(G(x_i)), ψ(x_i))), d Euclidean, ψ the
  stage-4 features of a frozen ImageNet ResNet-50 (:func:`metric_perturbation_loss`).
  [ours] ψ is globally average-pooled (a metric embedding) and the loss is averaged over
  the M negatives.
* [paper] L_C = ‖φ(G(x_i)) − φ(x_i)‖₁, φ its stage-2 features (:func:`content_loss`);
  L_S = ‖G(G(x_i)) − G(x_i)‖₁, idempotence (:func:`idempotence_loss`). [ours] ‖·‖₁ is the
  mean absolute difference (weights independent of image size); L_S back-propagates through
  both G(G(x)) and G(x).
* [paper] L_MPG = L_G + 2.0·L_MP + 1.0·L_S + 1.0·L_C (``mp_weight``, ``idem_weight``,
  ``content_weight``); ``metric_stage`` 4 and ``content_stage`` 2 (timm feature indices:
  0 the stem, i the i-th ResNet stage).
* ``feature_net`` (ψ and φ): ``imagenet`` [paper] is timm's ``resnet50`` with ImageNet
  weights, which must be in the local Hugging Face cache when there is no network (else a
  one-line error). [ours] Or the id of a zoo entry whose trained weights are loaded frozen
  (trained first if missing, like ``init.from``); the CPU entries name their dataset's
  undefended baseline, since nothing can be downloaded there. Its images are resized to the
  entry's input size. [ours] Or ``{backbone, pretrained}``: an ImageNet network read from a
  local file pinned by sha256 (:mod:`reidbench.models.pretrained`), the paper's ψ and φ where
  only another architecture's ImageNet weights are at hand (the Market entries: MobileNetV2,
  whose five timm stages take ``metric_stage`` 4 and ``content_stage`` 2 as ResNet's do).
* [ours] G, the paper's layers not being available: a CycleGAN-style image-to-image
  network (Zhu et al., ICCV 2017) at ``gen_width`` channels, two stride-2 convolutions to a
  latent map at 1/4 resolution, ``gen_blocks`` residual blocks there (where the metric
  relation is perturbed), two ×2 upsamplings. It outputs a residual added to the image,
  its last convolution zero-initialised, so training starts from G = identity (content
  kept, idempotent) and the losses move it away. The paper has no ε bound; ``eps_255`` (off
  by default) bounds the residual softly, ε·tanh(r/ε). D: a PatchGAN (Isola et al., CVPR
  2017) of ``disc_width`` channels, its patch logits averaged by the BCE.
* [ours] Optimisation: ``mpg_steps`` alternating D / G Adam steps (lr ``mpg_lr`` 2e-4,
  betas (0.5, 0.999): the pix2pix / CycleGAN convention), ``mpg_batch`` anchors drawn
  uniformly, at the dataset's image size, seeded by ``seed``.
* [ours] The defaults are the CPU preset (M = 2, G of width 16 with 2 residual blocks, D of
  width 16, 500 steps of 16 anchors; its cost is in benchmarks/results/seed-defenses.md);
  the GPU zoo entry is larger.

**Stage 2, SP-Net** (:mod:`.spnet`, ``model: {head: apd-split}``).

* [paper] A ViT / TransReID baseline trained with cross-entropy and a soft-margin triplet
  softplus(d_ap − d_an). [ours] The zoo's timm ResNet backbone at CPU scale, with the
  recipe's label-smoothed CE and batch-hard triplet (the APD entries set ``triplet_margin:
  null``: the paper's soft margin).
* [paper] The split acts on the patch embedding E(x). [ours] On a ResNet, E(x) is the map
  after ``split_stage`` (head option; 0, the default, is the stem: convolution, BN, ReLU,
  max-pool, like a patch embedding a projection before any residual block; 1-3 after that
  ResNet stage). The rest of the backbone is the network the branches share.
* [paper] MSP: sigmoid attention maps from dilated convolutions, DC1 and DC3 3×3 with
  dilation 2, DC2 and DC4 2×2 with dilation 2; K(x) = ⅓(MSP₁ + MSP₂ + MSP₃) ⊙ E(x),
  NK(x) = E(x) − K(x). [ours] The composition, which the recovered text leaves partly open:
  MSP₁ = σ(DC1(E)), MSP₃ = σ(DC3(E)), MSP₂ = σ(DC2(MSP₃) + DC4(MSP₁)): DC2 stacked on
  σ(DC3) as the text reads, DC4 on the other branch so that all four convolutions are used;
  MSP₁ and MSP₃ see 5×5 and MSP₂ 7×7 (multi-scale). ``msp_maps`` (head option): ``element``
  (default; one attention value per channel and position) or ``spatial`` (one per position,
  broadcast over channels).
* [paper] SSD, three branches through the rest of the network with shared parameters:
  f = branch(K), trained with CE + triplet (L_K); f* = branch(K + NK̂), NK̂ the irrelevant
  parts shuffled across identities, CE + triplet with K's own label (L_K*); fⁿ = branch(NK),
  a reversed triplet softplus(d(a, n) − d(a, p)) and CE towards the negative's identity
  (L_NK). L_SP = 1.0·L_K + 0.5·L_NK + 0.1·L_K* (``k_weight``, ``nk_weight``,
  ``k_star_weight``). At test time only f: to every attack the deployed model is a plain
  embedding model on images in [0, 1].
* [ours] Shuffle: each sample gets the NK of a sample of another identity drawn uniformly
  from the batch (:func:`shuffle_partners`, drawn from the loop's generator). Reversed
  triplet (:func:`reversed_triplet`): batch-hard for the reversed order, the closest positive
  (the anchor itself excluded) and, with ``nk_negative: hardest`` (default), the farthest
  negative; ``partner`` takes the shuffle partner instead. "The negative's identity" is that
  negative's label, the CE target of fⁿ. L_NK weighs its terms by the recipe's
  ``triplet_weight`` and ``ce_weight`` as L_K does.
* [ours] Batch-norm running statistics follow branch 1 only (the deployed one); branches 2
  and 3 normalise with their own batch statistics but do not update the running ones.
"""

from __future__ import annotations

import json
import time
from typing import Optional

import torch
from safetensors.torch import load_file

from reidbench.data import cache_dir, concat_subsets
from reidbench.data.split import ReIDSubset
from reidbench.defense import Defense
from reidbench.errors import ReIDBenchError
from reidbench.models.reid_model import ReIDModel
from reidbench.progress import log
from reidbench.registry import DEFENSES
from reidbench.train.losses import cross_entropy_label_smoothing, reid_terms
from reidbench.cache import fingerprint as _fingerprint, load_verified
from reidbench.cache import save_safetensors as _atomic_safetensors, save_torch as _atomic_torch_save

from .mpg import FrozenFeatures, MetricPerturbationGenerator, PatchDiscriminator, train_mpg
from .spnet import SemanticPurificationModel, reversed_triplet, running_stats_frozen, shuffle_partners

#: bump when stage 1 changes what a cached MPG-Net or generated set would hold
MPG_VERSION = 1
IMAGENET = "imagenet"
_MPG_KEYS = ("metric_stage", "content_stage", "negatives", "gen_width", "gen_blocks", "disc_width", "eps_255",
             "mpg_steps", "mpg_batch", "mpg_lr", "mp_weight", "idem_weight", "content_weight", "seed")
NK_NEGATIVES = ("hardest", "partner")


@DEFENSES.register("apd")
class APD(Defense):
    """APD (Tan et al. 2025): MPG-Net's hard samples, then SP-Net trained with SSD."""

    zoo_references = ("feature_net",)

    def __init__(self, feature_net: str = IMAGENET, metric_stage: int = 4, content_stage: int = 2,
                 negatives: int = 2, gen_width: int = 16, gen_blocks: int = 2, disc_width: int = 16,
                 eps_255: Optional[float] = None, mpg_steps: int = 500, mpg_batch: int = 16, mpg_lr: float = 2e-4,
                 mp_weight: float = 2.0, idem_weight: float = 1.0, content_weight: float = 1.0,
                 include_real: bool = True, k_weight: float = 1.0, nk_weight: float = 0.5,
                 k_star_weight: float = 0.1, nk_negative: str = "hardest", seed: int = 0):
        if isinstance(feature_net, dict):
            from reidbench.models.pretrained import check_spec

            if set(feature_net) != {"backbone", "pretrained"} or not isinstance(feature_net["backbone"], str):
                raise ReIDBenchError("defense 'apd': a feature_net mapping needs exactly backbone and pretrained "
                                     f"(a pinned ImageNet file), got {sorted(feature_net)}")
            check_spec(feature_net["pretrained"], "defense 'apd': feature_net")
        elif not isinstance(feature_net, str) or not feature_net:
            raise ReIDBenchError(f"defense 'apd': feature_net must be '{IMAGENET}', a zoo entry id or "
                                 f"{{backbone, pretrained}}, got {feature_net!r}")
        counts = dict(negatives=negatives, gen_width=gen_width, gen_blocks=gen_blocks, disc_width=disc_width,
                      mpg_steps=mpg_steps, mpg_batch=mpg_batch)
        small = sorted(k for k, v in counts.items() if not (isinstance(v, int) and v >= (0 if k == "gen_blocks" else 1)))
        if small:
            raise ReIDBenchError(f"defense 'apd': {', '.join(f'{k}={counts[k]}' for k in small)} must be "
                                 "a positive integer (gen_blocks may be 0)")
        if eps_255 is not None and not 0 < eps_255 <= 255:
            raise ReIDBenchError(f"defense 'apd': eps_255 must be in (0, 255] or null (no bound), got {eps_255}")
        if mpg_lr <= 0:
            raise ReIDBenchError(f"defense 'apd': mpg_lr must be > 0, got {mpg_lr}")
        weights = dict(mp_weight=mp_weight, idem_weight=idem_weight, content_weight=content_weight,
                       k_weight=k_weight, nk_weight=nk_weight, k_star_weight=k_star_weight)
        negative = sorted(k for k, v in weights.items() if v < 0)
        if negative:
            listing = ", ".join(f"{k}={weights[k]}" for k in negative)
            raise ReIDBenchError(f"defense 'apd': loss weights must be >= 0, got {listing}")
        if nk_negative not in NK_NEGATIVES:
            raise ReIDBenchError(f"defense 'apd': nk_negative must be one of {NK_NEGATIVES}, got {nk_negative!r}")
        super().__init__(feature_net=feature_net, metric_stage=int(metric_stage), content_stage=int(content_stage),
                         **{k: int(v) for k, v in counts.items()}, eps_255=eps_255, mpg_lr=float(mpg_lr),
                         **{k: float(v) for k, v in weights.items()}, include_real=bool(include_real),
                         nk_negative=nk_negative, seed=int(seed))
        self._partners: Optional[torch.Tensor] = None

    # --- stage 1 ---------------------------------------------------------------------------
    def feature_source(self, device: str = "cpu", progress: bool = True,
                       zoo: Optional[dict] = None) -> tuple[dict, Optional[tuple]]:
        """What decides ψ and φ (for the cache key) and, for an entry of ``zoo`` (the default zoo
        when None), (entry, weights file, recipe key the weights were trained under)."""
        name = self.params["feature_net"]
        if name == IMAGENET:
            return {"feature_net": "timm resnet50, ImageNet weights"}, None
        if isinstance(name, dict):  # ImageNet weights from a pinned file: the sha256 decides ψ and φ
            return {"feature_net": name["backbone"], "sha256": name["pretrained"]["sha256"]}, ("pretrained", name)
        from reidbench.errors import unknown_name
        from reidbench.cache import sha256_file
        from reidbench.zoo import load_zoo, obtain_weights, training_entry

        zoo = load_zoo() if zoo is None else zoo
        if name not in zoo:
            raise unknown_name("feature_net zoo entry (defense 'apd')", name, [IMAGENET, *zoo])
        entry = zoo[name]
        trained_as = training_entry(entry, zoo)
        if trained_as.defense.get("name") == "apd":
            raise ReIDBenchError(f"defense 'apd': feature_net '{name}' is itself trained with APD; "
                                 "name a model that does not need this one")
        path = obtain_weights(entry, None, True, device, progress, zoo)
        return {"feature_net": name, "sha256": sha256_file(path)}, (entry, path, trained_as.recipe_key())

    def feature_network(self, source: Optional[tuple]) -> FrozenFeatures:
        """ψ and φ, frozen."""
        p = self.params
        if source is None:
            try:
                model = ReIDModel("resnet50", pretrained=True, last_stride=2)
            except ReIDBenchError as exc:
                reason = str(exc).rsplit("; train from scratch", 1)[0]  # that hint is for backbones, not for ψ
                raise ReIDBenchError(
                    f"defense 'apd': feature_net '{IMAGENET}' needs timm's ImageNet resnet50 weights, which cannot be "
                    f"loaded here ({reason}); name a trained zoo entry instead, e.g. feature_net: resnet18-synthetic-none"
                ) from None
            return FrozenFeatures(model, p["metric_stage"], p["content_stage"], resize=False)
        if source[0] == "pretrained":
            spec = source[1]
            model = ReIDModel(spec["backbone"], pretrained=spec["pretrained"], last_stride=2)
            model.load_pretrained()
            return FrozenFeatures(model, p["metric_stage"], p["content_stage"], resize=False)
        from reidbench.models import build_model
        from reidbench.zoo import load_weights

        entry, path, recipe_key = source
        if path.suffix == ".onnx":
            raise ReIDBenchError(f"defense 'apd': feature_net '{entry.id}' is an ONNX model; it needs a timm backbone")
        model = build_model(entry.model_spec(), num_classes=0)
        load_weights(model, path, entry.id, recipe_key=recipe_key)
        return FrozenFeatures(model, p["metric_stage"], p["content_stage"])

    def build_mpg(self) -> tuple[MetricPerturbationGenerator, PatchDiscriminator]:
        p = self.params
        with torch.random.fork_rng(devices=[]):  # the networks' initialisation is their own, seeded
            torch.manual_seed(p["seed"])
            eps = None if p["eps_255"] is None else p["eps_255"] / 255.0
            return (MetricPerturbationGenerator(p["gen_width"], p["gen_blocks"], eps),
                    PatchDiscriminator(p["disc_width"]))

    def prepare_train(self, split, device: str = "cpu", zoo: Optional[dict] = None) -> ReIDSubset:
        generated = self.generated_set(split, device, zoo=zoo)
        parts = [split.train, generated] if self.params["include_real"] else [generated]
        return concat_subsets(parts, tuple(split.image_size))

    def generated_set(self, split, device: str = "cpu", progress: bool = True, zoo: Optional[dict] = None) -> ReIDSubset:
        """The "New Source Domain": G(x) for every training image of ``split``, with its source's
        labels (cached, as is the trained MPG-Net; see the module docstring). ``zoo`` holds a
        ``feature_net`` named by entry id (the default zoo when None)."""
        p = self.params
        train = split.train
        if train.num_ids < 2:
            raise ReIDBenchError(f"defense 'apd': MPG-Net needs negatives of other identities; '{split.name}' "
                                 f"trains on {train.num_ids} identity")
        described, source = self.feature_source(device, progress, zoo)
        key = _fingerprint({"split": split.split_hash, "size": list(split.image_size), "version": MPG_VERSION,
                            **described, **{k: p[k] for k in _MPG_KEYS}})
        root = cache_dir() / "apd"
        generated_path, mpg_path = root / f"generated-{key}.pt", root / f"mpg-{key}.safetensors"
        data = load_verified(generated_path, lambda p: torch.load(p, weights_only=True), "APD generated set")
        if data is not None:
            return ReIDSubset(data["pids"], data["camids"], images=data["images"])
        root.mkdir(parents=True, exist_ok=True)
        images = train.load_uint8(None, tuple(split.image_size))
        generator, discriminator = self.build_mpg()
        state = load_verified(mpg_path, lambda p: load_file(str(p)), "APD MPG-Net")
        if state is not None:
            generator.load_state_dict(state)
        else:
            started = time.time()
            history = train_mpg(generator, discriminator, self.feature_network(source), images, train.pids,
                                p["mpg_steps"], p["mpg_batch"], p["negatives"], p["mpg_lr"], p,
                                torch.Generator().manual_seed(p["seed"]), device, progress)
            tenth = max(1, len(history) // 10)
            head, tail = (sum(h["mpg"] for h in part) / len(part) for part in (history[:tenth], history[-tenth:]))
            log(f"apd: MPG-Net trained in {time.time() - started:.0f}s, mean L_MPG {head:.4f} over the first "
                f"{tenth} steps, {tail:.4f} over the last {tenth}")
            _atomic_safetensors(generator.state_dict(), mpg_path, {"history": json.dumps(history)})
        generator.to(device).eval()
        with torch.no_grad():
            hard = torch.cat([generator(chunk.to(device).float().div_(255)).mul_(255).round_().to(torch.uint8).cpu()
                              for chunk in images.split(64)])
        _atomic_torch_save({"images": hard, "pids": train.pids, "camids": train.camids}, generated_path)
        return ReIDSubset(train.pids, train.camids, images=hard)

    # --- stage 2 ---------------------------------------------------------------------------
    def training_batch(self, model, batch, generator):
        # Drawn here, from the loop's generator, so that a resumed run shuffles as an uninterrupted one.
        self._partners = shuffle_partners(batch.pids, generator)
        return batch.images

    def training_loss(self, model, batch, recipe):
        images, pids = batch.images, batch.pids
        if not isinstance(model, SemanticPurificationModel):
            raise ReIDBenchError("defense 'apd' trains the SP-Net model: give its zoo entry `model: {head: apd-split}`")
        partners, self._partners = self._partners, None
        if partners is None or len(partners) != len(pids):
            raise ReIDBenchError("defense 'apd': training_loss needs the shuffle of training_batch; call it first")
        p = self.params
        partners = partners.to(pids.device)
        identity, irrelevant = model.split(model.embedding_map(images))
        logits, feats = model.branch(identity)
        loss_k, logs = reid_terms(logits, feats, pids, recipe)
        with running_stats_frozen(model):
            logits_star, feats_star = model.branch(identity + irrelevant[partners])
            loss_k_star, logs_star = reid_terms(logits_star, feats_star, pids, recipe)
            logits_nk, feats_nk = model.branch(irrelevant)
        reversed_loss, negatives = reversed_triplet(feats_nk, pids, partners if p["nk_negative"] == "partner" else None)
        loss_nk = recipe.triplet_weight * reversed_loss
        logs.update({f"{k}_star": v for k, v in logs_star.items()}, nk_triplet=float(reversed_loss.detach()))
        if logits_nk is not None and recipe.ce_weight > 0:
            ce_nk = cross_entropy_label_smoothing(logits_nk, pids[negatives], recipe.label_smoothing)
            loss_nk = loss_nk + recipe.ce_weight * ce_nk
            logs["nk_ce"] = float(ce_nk.detach())
        loss = p["k_weight"] * loss_k + p["nk_weight"] * loss_nk + p["k_star_weight"] * loss_k_star
        logs.update(l_k=float(loss_k.detach()), l_nk=float(loss_nk.detach()), l_k_star=float(loss_k_star.detach()))
        return loss, logs
