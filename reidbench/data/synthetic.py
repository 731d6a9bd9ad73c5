"""The embedded default dataset: procedurally drawn pedestrians seen by a few cameras.

It needs no download, builds in seconds on a CPU and is hard enough that a small CNN trained
on it is neither useless nor perfect, so attacks and defenses have room to show an effect.

An **identity** is what a person wears and how they are built: the colour and pattern of the
upper body (solid, horizontal or vertical stripes, checks -- the pattern's period and second
colour belong to the identity), sleeve length, trousers / shorts / skirt and their colour,
shoes, skin tone, hair tone and length, a chest logo (seen only from the front), a backpack
(seen only from the back and the side) or a shoulder bag or nothing, and the body's height and
build. Clothing colours come from a short palette, so many identities share their dominant
colours and differ only by pattern, shape or accessories: colour matters, but a grayscale model
still has something to go on.

A **camera** is how a view is taken: a colour cast (per-channel gain), illumination
(brightness, contrast), optical blur, an effective resolution (downsample, then upsample back),
the distribution of viewpoints it sees people from (front, back, side), a background palette
for its clutter, how often something stands between it and the person, and its sensor noise.

Each **image** adds its own nuisance: the viewpoint, where the person stands and how large
they appear, the leg stance and arm swing, a light flicker, the background layout, an optional
occluder and the noise draw. ``draw_scene(identity, camera, nuisance)`` followed by
``apply_camera`` is the whole renderer (:mod:`.synthetic_render`), so further modalities (an
infrared rendering) or motion (a tracklet is a sequence of nuisances) only add new inputs to it.

Every random choice comes from a ``numpy.random.Generator`` seeded with (seed, stream, index),
never from global state, and each image is rendered with elementwise float64 arithmetic (no
threaded reductions) before the final rounding to uint8: the same seed and preset give
bit-identical images regardless of generation order, thread count or machine load.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Optional

import numpy as np
import torch

from ..cache import cache_dir
from ..errors import ReIDBenchError, unknown_name
from ..registry import DATASETS
from .split import ReIDSplit, ReIDSubset
from .synthetic_render import SIDE, Camera, Identity, Nuisance, render

__all__ = [
    "GENERATOR_VERSION",
    "PRESETS",
    "SyntheticConfig",
    "build_synthetic",
    "generate",
    "sample_identity",
    "sample_camera",
    "sample_nuisance",
]

# Bump whenever a change to this file or to :mod:`.synthetic_render` changes any generated pixel
# or split: it is part of the cache file name and of the split hash, so stale caches and results
# are never mixed up.
GENERATOR_VERSION = 1


# Clothing colours (RGB in [0, 1]) with their frequency: dark and neutral clothes dominate, as
# in the street, which is what makes colour alone insufficient.
_CLOTHING = np.array([
    (0.10, 0.10, 0.11),  # black
    (0.86, 0.86, 0.84),  # white
    (0.47, 0.48, 0.50),  # grey
    (0.12, 0.17, 0.38),  # navy
    (0.20, 0.42, 0.78),  # blue
    (0.72, 0.14, 0.14),  # red
    (0.18, 0.46, 0.24),  # green
    (0.74, 0.66, 0.48),  # beige
    (0.42, 0.27, 0.16),  # brown
    (0.88, 0.76, 0.18),  # yellow
    (0.88, 0.52, 0.62),  # pink
    (0.42, 0.23, 0.52),  # purple
])
_CLOTHING_FREQ = np.array([3, 2.5, 2.5, 2.5, 2, 2, 1.5, 1.5, 1.5, 1.5, 1.5, 1.5])
_SHOES = np.array([(0.08, 0.08, 0.08), (0.85, 0.85, 0.85), (0.35, 0.22, 0.12), (0.45, 0.45, 0.47)])
_SKIN = np.array([(0.96, 0.80, 0.69), (0.89, 0.69, 0.55), (0.76, 0.57, 0.42), (0.55, 0.38, 0.26),
                  (0.36, 0.24, 0.16)])
_HAIR = np.array([(0.06, 0.05, 0.05), (0.24, 0.15, 0.09), (0.45, 0.30, 0.16), (0.80, 0.68, 0.42),
                  (0.62, 0.62, 0.62)])


@dataclass(frozen=True)
class SyntheticConfig:
    """Every knob of the generator. Ranges are inclusive (low, high) pairs."""

    num_train_ids: int = 120
    num_test_ids: int = 80
    height: int = 64
    width: int = 32
    num_cameras: int = 6
    cameras_per_id: tuple[int, int] = (2, 4)
    images_per_id: tuple[int, int] = (10, 14)
    # How many of the clothing palette's colours are in use (fewer: more look-alikes).
    palette_size: int = 12
    # Std of the per-identity shift of each palette colour, so look-alikes are not exact twins.
    colour_jitter: float = 0.03
    # Std of the log per-channel gain of a camera.
    colour_cast: float = 0.04
    brightness: tuple[float, float] = (0.85, 1.1)
    contrast: tuple[float, float] = (0.9, 1.05)
    # Gaussian blur sigma as a fraction of the image height.
    blur: tuple[float, float] = (0.0, 0.01)
    # Effective resolution as a fraction of the stored one.
    resolution: tuple[float, float] = (0.85, 1.0)
    # Average share of (front, back, side) views over the cameras, and the Dirichlet
    # concentration around it of each camera's own viewpoint distribution (lower: cameras
    # specialise in one viewpoint, so cross-camera matching becomes cross-view matching).
    views: tuple[float, float, float] = (0.4, 0.4, 0.2)
    view_concentration: float = 4.0
    # Mean probability that an occluder hides part of the person (varies by camera).
    occlusion: float = 0.08
    # Sensor noise std range (in [0, 1] intensity units) across cameras.
    noise: tuple[float, float] = (0.005, 0.015)
    # Per-image multiplicative light flicker std.
    flicker: float = 0.05
    # Background shapes per image.
    clutter: tuple[int, int] = (2, 5)
    # Person height as a fraction of the image height, and horizontal offset as a fraction of the width.
    person_scale: tuple[float, float] = (0.78, 0.93)
    shift: float = 0.08
    # Long tail of images per identity: 0 draws an identity's count uniformly in
    # ``images_per_id``; a > 0 draws it with probability ∝ n^-a over that range, so most
    # identities have a few images and some have dozens, as in Market-1501's train set. The
    # number of cameras is then capped at what the count allows.
    images_per_id_tail: float = 0.0
    # Share of an identity's images beyond two per camera that go to one camera of its own,
    # drawn per identity (0: spread evenly), so that identities are dominated by one camera as
    # in Market-1501 and DukeMTMC-reID -- what DDID's camera-balancing rule responds to.
    dominant_camera: float = 0.0

    def __post_init__(self) -> None:
        for name in ("cameras_per_id", "images_per_id", "brightness", "contrast", "blur", "resolution", "noise",
                     "clutter", "person_scale"):
            value = getattr(self, name)
            # Overrides may arrive as lists (YAML, JSON); a frozen dataclass must stay hashable.
            object.__setattr__(self, name, tuple(value))
            if len(value) != 2 or value[0] > value[1]:
                raise ReIDBenchError(f"synthetic option '{name}' must be a (low, high) pair, got {value!r}")
        object.__setattr__(self, "views", tuple(self.views))
        if len(self.views) != 3 or min(self.views) <= 0 or self.view_concentration <= 0:
            raise ReIDBenchError(f"synthetic 'views' must be three positive (front, back, side) shares and "
                                 f"'view_concentration' positive, got {self.views!r}, {self.view_concentration!r}")
        if self.num_train_ids < 1 or self.num_test_ids < 1:
            raise ReIDBenchError("synthetic dataset needs at least one train and one test identity")
        if not (2 <= self.cameras_per_id[0] and self.cameras_per_id[1] <= self.num_cameras):
            raise ReIDBenchError(
                f"cameras_per_id {self.cameras_per_id} must lie within [2, num_cameras={self.num_cameras}]: "
                "every query needs a positive seen by another camera")
        if self.images_per_id_tail < 0 or not 0 <= self.dominant_camera < 1:
            raise ReIDBenchError(f"synthetic 'images_per_id_tail' must be >= 0 and 'dominant_camera' in [0, 1), got "
                                 f"{self.images_per_id_tail!r}, {self.dominant_camera!r}")
        # The uneven layout caps an identity's cameras at what its count allows; the even one draws them first.
        cameras_needed = self.cameras_per_id[0] if self.uneven else self.cameras_per_id[1]
        if self.images_per_id[0] < 2 * cameras_needed:
            raise ReIDBenchError(
                f"images_per_id {self.images_per_id} must allow two images in each of up to "
                f"{cameras_needed} cameras (a query and a gallery image per camera)")
        if not 1 <= self.palette_size <= len(_CLOTHING):
            raise ReIDBenchError(f"palette_size must be in [1, {len(_CLOTHING)}], got {self.palette_size}")
        if self.height < 16 or self.width < 8:
            raise ReIDBenchError(f"synthetic images must be at least 16x8, got {self.height}x{self.width}")

    @property
    def uneven(self) -> bool:
        """Whether the long-tail or dominant-camera layout is on (else the original, balanced one)."""
        return self.images_per_id_tail > 0 or self.dominant_camera > 0


#: Fields added after generator version 1, with the value that reproduces the version-1 data:
#: left out of the cache digest (and so of the split hash) at that value.
_LATER_FIELDS = {"images_per_id_tail": 0.0, "dominant_camera": 0.0}


PRESETS: dict[str, SyntheticConfig] = {
    # For unit tests: a few hundred images, generated in well under two seconds.
    "tiny": SyntheticConfig(num_train_ids=16, num_test_ids=12, num_cameras=4, cameras_per_id=(2, 3),
                            images_per_id=(6, 8)),
    # The CPU default.
    "small": SyntheticConfig(),
    "medium": SyntheticConfig(num_train_ids=500, num_test_ids=250, height=128, width=64),
    # Long-tailed and camera-dominated, the imbalance DDID's data balancing answers: 4 to 40
    # images per identity, ∝ n^-1.5, and 80% of the images beyond two per camera in one camera.
    # ``small`` is its balanced counterpart (same identities and cameras, about as many images).
    # Market-1501's train set has a real tail but weaker camera dominance: the preset
    # exaggerates the latter so that DDID's camera rule has identities to act on (statistics of
    # both: benchmarks/results/dataset-balance.md). ``tiny-longtail`` is the test-sized version.
    "longtail": SyntheticConfig(images_per_id=(4, 40), images_per_id_tail=1.5, dominant_camera=0.8),
    # The default suite's data (``reidbench run --all``): 320 test identities, so that a Rank-1
    # near 50% has a 95% identity-bootstrap interval of about ±4 points, and colours jittered
    # enough per identity that a narrow network at 32x16 tells them apart (the measured effect
    # of each choice: benchmarks/results/default-scale.md).
    "bench": SyntheticConfig(num_train_ids=240, num_test_ids=320, colour_jitter=0.2),
    "tiny-longtail": SyntheticConfig(num_train_ids=16, num_test_ids=12, num_cameras=4, cameras_per_id=(2, 3),
                                     images_per_id=(4, 24), images_per_id_tail=1.5, dominant_camera=0.8),
    # For a GPU; about 1.8 GB of uint8 pixels.
    "large": SyntheticConfig(num_train_ids=750, num_test_ids=750, height=256, width=128, num_cameras=8,
                             cameras_per_id=(2, 5)),
}


# Independent random streams, so that e.g. adding an image draw never shifts identity draws.
_IDENTITY_STREAM, _CAMERA_STREAM, _LAYOUT_STREAM, _IMAGE_STREAM = range(4)


def _rng(seed: int, stream: int, *index: int) -> np.random.Generator:
    return np.random.default_rng([seed, stream, *index])


def _pick_colour(rng: np.random.Generator, cfg: SyntheticConfig, exclude: int = -1) -> tuple[int, np.ndarray]:
    freq = _CLOTHING_FREQ[: cfg.palette_size].copy()
    if 0 <= exclude < cfg.palette_size and cfg.palette_size > 1:
        freq[exclude] = 0.0
    index = int(rng.choice(cfg.palette_size, p=freq / freq.sum()))
    colour = np.clip(_CLOTHING[index] + rng.normal(0.0, cfg.colour_jitter, 3), 0.0, 1.0)
    return index, colour


def sample_identity(rng: np.random.Generator, cfg: SyntheticConfig) -> Identity:
    upper_index, upper = _pick_colour(rng, cfg)
    _, upper2 = _pick_colour(rng, cfg, exclude=upper_index)
    pattern = int(rng.choice(4, p=[0.4, 0.2, 0.2, 0.2]))
    period = float(rng.uniform(0.08, 0.14))
    short_sleeves = bool(rng.random() < 0.35)
    _, lower = _pick_colour(rng, cfg)
    lower_style = int(rng.choice(3, p=[0.65, 0.2, 0.15]))
    shoes = _SHOES[rng.integers(len(_SHOES))]
    skin = np.clip(_SKIN[rng.integers(len(_SKIN))] + rng.normal(0.0, 0.02, 3), 0.0, 1.0)
    hair = np.clip(_HAIR[rng.integers(len(_HAIR))] + rng.normal(0.0, 0.02, 3), 0.0, 1.0)
    long_hair = bool(rng.random() < 0.35)
    has_logo = rng.random() < 0.45
    _, logo = _pick_colour(rng, cfg, exclude=upper_index)
    logo_square = bool(rng.random() < 0.5)
    bag = int(rng.choice(3, p=[0.4, 0.35, 0.25]))
    _, bag_colour = _pick_colour(rng, cfg)
    bag_side = 1 if rng.random() < 0.5 else -1
    height = float(rng.uniform(0.92, 1.05))
    build = float(rng.uniform(0.8, 1.25))
    return Identity(upper, upper2, pattern, period, short_sleeves, lower, lower_style, shoes, skin, hair, long_hair,
                    logo if has_logo else None, logo_square, bag, bag_colour, bag_side, height, build)


def sample_camera(rng: np.random.Generator, cfg: SyntheticConfig) -> Camera:
    gain = np.exp(rng.normal(0.0, cfg.colour_cast, 3))
    brightness = float(rng.uniform(*cfg.brightness))
    contrast = float(rng.uniform(*cfg.contrast))
    blur = float(rng.uniform(*cfg.blur))
    resolution = float(rng.uniform(*cfg.resolution))
    views = np.asarray(cfg.views, dtype=np.float64)
    view_probs = rng.dirichlet(3 * cfg.view_concentration * views / views.sum())
    # Muted colours: walls and pavements are rarely saturated.
    palette = 0.6 * rng.uniform(0.1, 0.9, (4, 3)) + 0.4 * rng.uniform(0.3, 0.7, (4, 1))
    occlusion = float(np.clip(cfg.occlusion * rng.uniform(0.4, 1.6), 0.0, 1.0))
    noise = float(rng.uniform(*cfg.noise))
    return Camera(gain, brightness, contrast, blur, resolution, view_probs, palette, occlusion, noise)


def sample_nuisance(rng: np.random.Generator, cfg: SyntheticConfig, camera: Camera) -> Nuisance:
    view = int(rng.choice(3, p=camera.view_probs))
    facing = 1 if rng.random() < 0.5 else -1
    scale = float(rng.uniform(*cfg.person_scale))
    shift = float(rng.uniform(-cfg.shift, cfg.shift))
    drop = float(rng.uniform(-0.04, 0.01))
    stance = float(rng.uniform(0.0, 0.12 if view == SIDE else 0.06))
    swing = float(rng.uniform(-0.06, 0.06))
    flicker = float(np.exp(rng.normal(0.0, cfg.flicker)))
    horizon = float(rng.uniform(0.45, 0.8))
    n = int(rng.integers(cfg.clutter[0], cfg.clutter[1] + 1))
    clutter = np.column_stack([
        rng.random(n) < 0.5,
        rng.uniform(0.0, 1.0, n),
        rng.uniform(0.0, 1.0, n),
        rng.uniform(0.05, 0.4, n),
        rng.uniform(0.03, 0.25, n),
        rng.integers(0, 4, n),
    ]).astype(np.float64)
    occluder = None
    if rng.random() < camera.occlusion:
        # 0: a pole, 1: something low in front of the legs, 2: a block entering from one side.
        occluder = (int(rng.integers(3)), float(rng.uniform(0.0, 1.0)), float(rng.uniform(0.0, 1.0)),
                    int(rng.integers(4)))
    noise_seed = int(rng.integers(2**31))
    return Nuisance(view, facing, scale, shift, drop, stance, swing, flicker, horizon, clutter, occluder, noise_seed)

# ---------------------------------------------------------------------------------------------
# The dataset
# ---------------------------------------------------------------------------------------------


def _layout(rng: np.random.Generator, cfg: SyntheticConfig) -> list[tuple[int, int]]:
    """(camera, number of images) for each camera an identity walks past, at least two each."""
    if cfg.uneven:
        return _uneven_layout(rng, cfg)
    k = int(rng.integers(cfg.cameras_per_id[0], cfg.cameras_per_id[1] + 1))
    cams = np.sort(rng.choice(cfg.num_cameras, size=k, replace=False))
    total = int(rng.integers(cfg.images_per_id[0], cfg.images_per_id[1] + 1))
    counts = 2 + rng.multinomial(total - 2 * k, np.full(k, 1.0 / k))
    return [(int(c), int(n)) for c, n in zip(cams, counts)]


def _uneven_layout(rng: np.random.Generator, cfg: SyntheticConfig) -> list[tuple[int, int]]:
    """:func:`_layout` with a long-tailed count and a dominant camera: the count first (∝ n^-a
    over ``images_per_id``), then as many cameras as it allows (two images each), then the
    rest of the images, ``dominant_camera`` of them expected in one camera drawn at random."""
    low, high = cfg.images_per_id
    counts = np.arange(low, high + 1)
    weights = counts.astype(np.float64) ** -cfg.images_per_id_tail
    total = int(rng.choice(counts, p=weights / weights.sum()))
    k = int(rng.integers(cfg.cameras_per_id[0], min(cfg.cameras_per_id[1], total // 2) + 1))
    cams = np.sort(rng.choice(cfg.num_cameras, size=k, replace=False))
    share = np.full(k, (1.0 - cfg.dominant_camera) / k)
    share[int(rng.integers(k))] += cfg.dominant_camera
    extra = 2 + rng.multinomial(total - 2 * k, share)
    return [(int(c), int(n)) for c, n in zip(cams, extra)]


def generate(cfg: SyntheticConfig, seed: int = 0) -> dict[str, torch.Tensor]:
    """All images and labels: ``{train,query,gallery}_{images,pids,camids}`` tensors."""
    size = (cfg.height, cfg.width)
    cameras = [sample_camera(_rng(seed, _CAMERA_STREAM, c), cfg) for c in range(cfg.num_cameras)]
    people = [sample_identity(_rng(seed, _IDENTITY_STREAM, pid), cfg)
              for pid in range(cfg.num_train_ids + cfg.num_test_ids)]
    # Plan every (pid, camera, shot) first so that images go straight into preallocated tensors:
    # the large preset would otherwise hold its 1.8 GB of pixels two or three times over.
    plan: dict[str, list[tuple[int, int, int]]] = {"train": [], "query": [], "gallery": []}
    for pid in range(len(people)):
        layout_rng = _rng(seed, _LAYOUT_STREAM, pid)
        is_test = pid >= cfg.num_train_ids
        for cam, count in _layout(layout_rng, cfg):
            query_shot = int(layout_rng.integers(count)) if is_test else -1
            for shot in range(count):
                part = "train" if not is_test else ("query" if shot == query_shot else "gallery")
                plan[part].append((pid, cam, shot))
    out = {}
    for part, entries in plan.items():
        images = torch.empty((len(entries), 3, *size), dtype=torch.uint8)
        for i, (pid, cam, shot) in enumerate(entries):
            nuisance = sample_nuisance(_rng(seed, _IMAGE_STREAM, pid, cam, shot), cfg, cameras[cam])
            images[i] = torch.from_numpy(render(people[pid], cameras[cam], nuisance, size)).permute(2, 0, 1)
        out[f"{part}_images"] = images
        out[f"{part}_pids"] = torch.tensor([e[0] for e in entries], dtype=torch.long)
        out[f"{part}_camids"] = torch.tensor([e[1] for e in entries], dtype=torch.long)
    return out


def _config_digest(cfg: SyntheticConfig, seed: int) -> str:
    config = dataclasses.asdict(cfg)
    for name, original in _LATER_FIELDS.items():
        if config[name] == original:  # data made before the field existed keeps its hash
            del config[name]
    payload = json.dumps({"generator": GENERATOR_VERSION, "config": config, "seed": seed}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


SPLIT_KEYS = tuple(f"{part}_{what}" for part in ("train", "query", "gallery") for what in ("images", "pids", "camids"))


def preset_config(dataset: str, presets: dict, preset: str, overrides: dict):
    """``presets[preset]`` with ``overrides`` applied; an unknown preset or field is one line."""
    if preset not in presets:
        raise unknown_name(f"{dataset} preset", preset, presets)
    fields = {f.name for f in dataclasses.fields(presets[preset])}
    for key in overrides:
        if key not in fields:
            raise unknown_name(f"{dataset} option", key, fields)
    return dataclasses.replace(presets[preset], **overrides)


def load_or_generate(path: Path, cache: bool, generate_data, required: Iterable[str] = SPLIT_KEYS) -> dict:
    """The generated tensors cached at ``path`` when they hold every ``required`` key, else
    ``generate_data()``, written to ``path`` when ``cache`` is on."""
    from ..cache import load_or_build, save_torch

    if not cache:
        return generate_data()
    return load_or_build(path, lambda p: _load_cached(p, required), generate_data, save_torch, "synthetic dataset")


def _load_cached(path: Path, required: Iterable[str] = SPLIT_KEYS) -> dict[str, torch.Tensor]:
    data = torch.load(path, map_location="cpu", weights_only=True)
    if not (isinstance(data, dict) and set(required) <= data.keys()):
        raise ValueError(f"it lacks {sorted(set(required) - set(data) if isinstance(data, dict) else required)[:3]}")
    return data


@DATASETS.register("synthetic")
def build_synthetic(root: Optional[str | Path] = None, preset: str = "small", seed: int = 0, cache: bool = True,
                    **overrides) -> ReIDSplit:
    """The procedural pedestrian dataset. ``root`` replaces the cache folder; ``overrides`` set
    any :class:`SyntheticConfig` field on top of the preset."""
    cfg = preset_config("synthetic", PRESETS, preset, overrides)
    seed = int(seed)
    digest = _config_digest(cfg, seed)
    path = (Path(root) if root is not None else cache_dir() / "synthetic") / (
        f"{preset}-seed{seed}-v{GENERATOR_VERSION}-{digest}.pt")
    data = load_or_generate(path, cache, lambda: generate(cfg, seed))

    subsets = {name: ReIDSubset(data[f"{name}_pids"], data[f"{name}_camids"], images=data[f"{name}_images"])
               for name in ("train", "query", "gallery")}
    info = {
        "preset": preset,
        "seed": seed,
        "generator_version": GENERATOR_VERSION,
        "cameras": cfg.num_cameras,
        "train_ids": cfg.num_train_ids,
        "test_ids": cfg.num_test_ids,
        "train_images": len(subsets["train"]),
        "query_images": len(subsets["query"]),
        "gallery_images": len(subsets["gallery"]),
        "description": (f"procedural pedestrians, preset '{preset}' (seed {seed}): {cfg.num_train_ids} train / "
                        f"{cfg.num_test_ids} test identities, {cfg.num_cameras} cameras, {cfg.height}x{cfg.width}"),
    }
    return ReIDSplit("synthetic", subsets["train"], subsets["query"], subsets["gallery"],
                     image_size=(cfg.height, cfg.width), split_hash=digest, info=info)
