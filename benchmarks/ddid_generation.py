"""Do DDID's generated images look like the identity they are labelled with?

DDID (Zhou et al., AAAI 2026) tops up under-represented identities with images of an
identity-conditional diffusion model; a generated image that does not look like its identity
is label noise in the metric training that follows. This script measures it: a trained ReID
model of the same dataset (``--judge``) embeds every real training image; an image *agrees*
when the nearest identity centroid is its own label. Rows:

* real training images degraded to the DDPM's resolution (leave-one-out centroids): the
  ceiling at that resolution;
* the generated set DDID trains on (cached; generated first when missing; `--no-set` skips it);
* fresh samples of ``--identities`` random identities × ``--per-identity`` at each
  ``--guidance`` scale (each with the camera of a real image of its identity).

    python benchmarks/ddid_generation.py --ddid resnet18-synthetic-ddid --judge resnet18-synthetic-none \
        --guidance 1.5 4 8
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from reidbench.data.split import resize_uint8
from reidbench.defense import build_defense
from reidbench.errors import ReIDBenchError
from reidbench.progress import log
from reidbench.runner import Runner
from reidbench.zoo import get_entry, load_zoo


def _embed(model: torch.nn.Module, images: torch.Tensor, batch: int = 256) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([F.normalize(model(images[i:i + batch].float() / 255.0), dim=1)
                          for i in range(0, len(images), batch)])


def agreement(feats: torch.Tensor, labels: torch.Tensor, centroids: torch.Tensor) -> float:
    """Share of ``feats`` whose nearest centroid (cosine) is their own ``labels`` row."""
    return (feats @ centroids.T).argmax(1).eq(labels).float().mean().item() if len(feats) else float("nan")


def main(ddid_id: str, judge_id: str, guidance: list[float], identities: int, per_identity: int, seed: int,
         zoo_file: str | None = None, with_set: bool = True) -> None:
    zoo = load_zoo(zoo_file)
    ddid_entry, judge_entry = get_entry(zoo, ddid_id), get_entry(zoo, judge_id)
    defense = build_defense(ddid_entry.defense)
    if not hasattr(defense, "ddpm_for"):
        raise ReIDBenchError(f"model '{ddid_id}' is not a DDID entry (its defense is '{ddid_entry.defense['name']}')")
    if ddid_entry.dataset_name != judge_entry.dataset_name:
        raise ReIDBenchError(f"the judge '{judge_id}' is trained on '{judge_entry.dataset_name}', "
                             f"not on '{ddid_entry.dataset_name}'")
    runner = Runner(zoo, progress=True, device="cpu", train_missing=False)
    log(f"{ddid_id}: DDPM of {defense.params['ddpm_steps']} steps (trained now if not cached)")
    judge = runner.bundle(judge_entry)
    model, split = judge.model.eval(), runner.split_for(ddid_entry.dataset)
    size, ddpm_size = tuple(judge.split.image_size), tuple(defense.params["ddpm_size"])
    train = split.train
    ids, labels = torch.unique(train.pids, return_inverse=True)
    real = train.load_uint8(None, size)
    feats = _embed(model, real)
    sums = torch.zeros(len(ids), feats.shape[1]).index_add_(0, labels, feats)
    counts = torch.bincount(labels, minlength=len(ids)).float()
    centroids = F.normalize(sums, dim=1)

    degraded = _embed(model, resize_uint8(resize_uint8(real, ddpm_size), size))
    scores = degraded @ centroids.T
    own = F.normalize(sums[labels] - feats, dim=1)  # leave the image itself out of its centroid
    scores[torch.arange(len(labels)), labels] = (degraded * own).sum(1)
    several = counts[labels] > 1
    rows = [(f"real training images at {ddpm_size[0]}x{ddpm_size[1]} (leave-one-out)", int(several.sum()),
             scores.argmax(1).eq(labels)[several].float().mean().item())]

    if with_set:
        generated = defense.generated_set(split)
        rows.append((f"DDID's generated set (guidance {defense.params['guidance']})", len(generated),
                     agreement(_embed(model, generated.load_uint8(None, size)),
                               torch.searchsorted(ids, generated.pids), centroids)))

    ddpm = defense.ddpm_for(split)
    generator = torch.Generator().manual_seed(seed)
    chosen = torch.randperm(len(ids), generator=generator)[:identities].repeat_interleave(per_identity)
    cameras = None
    if defense.uses_cameras(split):
        _, camera_labels = torch.unique(train.camids, return_inverse=True)
        cameras = torch.stack([camera_labels[labels == c][0] for c in chosen])
    for scale in guidance:
        images = ddpm.sample(chosen, cameras, ddpm_size, defense.params["sample_steps"], defense.params["sample_eta"],
                             scale, torch.Generator().manual_seed(seed + 1), progress=True)
        images = resize_uint8(images.mul(255).round().to(torch.uint8), size)
        rows.append((f"fresh samples, guidance {scale}", len(chosen), agreement(_embed(model, images), chosen, centroids)))

    print(f"\n{ddid_id}: identity agreement under {judge_id} ({len(ids)} training identities, "
          f"chance {100 / len(ids):.2f}%)\n")
    print("| images | count | agreement |\n| --- | --- | --- |")
    for name, count, share in rows:
        print(f"| {name} | {count} | {100 * share:.1f}% |")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ddid", required=True, help="a zoo entry with defense ddid")
    parser.add_argument("--judge", required=True, help="a trained zoo model of the same dataset")
    parser.add_argument("--guidance", type=float, nargs="*", default=[], help="classifier-free guidance scales to sample")
    parser.add_argument("--identities", type=int, default=120)
    parser.add_argument("--per-identity", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--zoo", help="model zoo file (default: the repository's model_zoo.yaml)")
    parser.add_argument("--no-set", action="store_true",
                        help="leave out DDID's generated set (generated first when not cached)")
    args = parser.parse_args()
    try:
        main(args.ddid, args.judge, args.guidance, args.identities, args.per_identity, args.seed, args.zoo, not args.no_set)
    except ReIDBenchError as error:
        raise SystemExit(f"ddid_generation: error: {error}")
