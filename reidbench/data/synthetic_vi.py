"""Visible-infrared video pedestrians (``synthetic-vi``): the people of :mod:`.synthetic`,
filmed as short tracklets by dual-mode cameras that record colour by day and a
thermal-like infrared image by night, as the cameras of HITSZ-VCM (Lin et al., CVPR 2022)
and SYSU-MM01 (Wu et al., ICCV 2017) do.

It reuses the image generator's identities, cameras, nuisances and renderer unchanged; the
``synthetic`` dataset, its cache files and split hashes are untouched by this module.

**Infrared look.** An identity's thermal signature comes from its own random stream: skin
is the warmest (bright), hair and clothes are warm through the fabric, bags and shoes are
near ambient. A fabric's intensity falls with its visible luminance (dark fabric, having
absorbed more light, is warmer) and with its insulation (an identity trait), so a thermal
image keeps the silhouette, the body build, sleeve length, hair length and patterns whose
two fabrics differ in lightness, but loses every hue: a red and a green shirt of the same
lightness look alike. The background is cool and low in contrast. The scene is rendered through the same camera model with a grey
palette, no colour cast, softer optics and more sensor noise, and the first channel of the
result is replicated to 3 channels (infrared frames are stored like colour ones).

**Tracklets.** Each (identity, camera) is seen once in each modality, i.e. every camera an
identity walks past films one visible and one infrared tracklet (separate occurrences: each
has its own viewpoint, placement and background draw). A tracklet is ``frames`` frames of one
occurrence: the background, viewpoint and occluder stay, while the person walks (a constant
horizontal drift of up to ``walk`` of the width per frame, in the facing direction for side
views), approaches or recedes (scale change of up to ``zoom`` per frame), moves the legs and
arms in a gait cycle of ``gait`` frames per step (leg spread ``|sin|``, arm swing ``sin``),
bobs slightly, and the detector box jitters (``jitter``, std of a per-frame translation).
Light flicker and sensor noise are redrawn per frame.

**Split.** Identities ``0 .. num_train_ids-1`` train, the others test. The test split is
infrared-to-visible: every infrared test tracklet is a query, every visible test tracklet a
gallery entry; ``direction: visible-to-infrared`` (any dataset option, see
:func:`reidbench.data.build_dataset`) swaps them. Camera ids are passed to the evaluator as
is, so a query's same-identity tracklet of the other modality *from the same camera* is
removed (the Market-1501 rule, which the HITSZ-VCM reference evaluation applies too); with
at least two cameras per identity every query keeps a match.

Determinism: as :mod:`.synthetic` (seeded (seed, stream, index) generators, elementwise
float64 rendering); the cache file name carries both generator versions and a digest of the
configuration.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from ..cache import cache_dir
from ..errors import ReIDBenchError
from ..registry import DATASETS
from . import synthetic
from .split import INFRARED, VISIBLE, ReIDSplit, ReIDSubset, TrackletSubset
from .synthetic import SyntheticConfig
from .synthetic_render import SIDE, Camera, Identity, Nuisance, render

__all__ = ["VI_GENERATOR_VERSION", "VI_PRESETS", "SyntheticVIConfig", "ThermalSignature", "build_synthetic_vi",
           "generate_vi", "sample_thermal", "thermal_identity", "infrared_camera", "tracklet_nuisances",
           "render_frame"]

# Bump whenever a change here changes any generated pixel or split (see synthetic.GENERATOR_VERSION).
VI_GENERATOR_VERSION = 1

_THERMAL_STREAM, _IR_CAMERA_STREAM, _TRACK_LAYOUT_STREAM, _TRACKLET_STREAM = 10, 11, 12, 13


@dataclass(frozen=True)
class SyntheticVIConfig(SyntheticConfig):
    """:class:`SyntheticConfig` plus video and infrared knobs (``images_per_id`` is unused:
    an identity has one visible and one infrared tracklet per camera)."""

    frames: int = 4
    walk: float = 0.015
    zoom: float = 0.01
    gait: tuple[float, float] = (4.0, 8.0)
    jitter: float = 0.006
    ir_blur: tuple[float, float] = (0.004, 0.014)
    ir_noise: tuple[float, float] = (0.01, 0.025)
    ir_contrast: tuple[float, float] = (0.9, 1.15)

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("gait", "ir_blur", "ir_noise", "ir_contrast"):
            value = tuple(getattr(self, name))
            object.__setattr__(self, name, value)
            if len(value) != 2 or value[0] > value[1]:
                raise ReIDBenchError(f"synthetic-vi option '{name}' must be a (low, high) pair, got {value!r}")
        if self.frames < 1:
            raise ReIDBenchError(f"synthetic-vi tracklets need frames >= 1, got {self.frames}")
        if self.gait[0] <= 0:
            raise ReIDBenchError(f"synthetic-vi gait (frames per step) must be positive, got {self.gait!r}")


VI_PRESETS: dict[str, SyntheticVIConfig] = {
    # Unit tests: about 250 frames, well under a second.
    "tiny": SyntheticVIConfig(num_train_ids=8, num_test_ids=6, num_cameras=3, cameras_per_id=(2, 3),
                              images_per_id=(6, 8), frames=4),
    # The CPU default: about 3,000 frames at 64x32.
    "small": SyntheticVIConfig(num_train_ids=100, num_test_ids=60, num_cameras=6, cameras_per_id=(2, 4), frames=4),
    # For a GPU: about 29,000 frames at 128x64.
    "medium": SyntheticVIConfig(num_train_ids=400, num_test_ids=200, height=128, width=64, frames=8),
}


@dataclass(frozen=True)
class ThermalSignature:
    """Infrared intensities (in [0, 1]) of an identity's parts."""

    skin: float
    hair: float
    upper: float
    upper2: float
    lower: float
    shoes: float
    bag: float
    logo: float


def _luminance(rgb: np.ndarray) -> float:
    return float(np.dot(rgb, (0.299, 0.587, 0.114)))


def sample_thermal(rng: np.random.Generator, person: Identity) -> ThermalSignature:
    """The identity's thermal signature: fabric warmth ``0.3 + 0.35 (1 - luminance) +
    0.15 (1 - insulation)`` (dark fabric, having absorbed more light, is warmer; the
    insulation is the identity's own draw), skin warmest."""

    def fabric(colour: np.ndarray, insulation: float) -> float:
        return 0.3 + 0.35 * (1.0 - _luminance(colour)) + 0.15 * (1.0 - insulation)

    upper_insulation = float(rng.uniform(0.0, 1.0))
    upper = fabric(person.upper, upper_insulation)
    # The second fabric of a pattern differs a little in weave, too.
    upper2 = fabric(person.upper2, float(np.clip(upper_insulation + rng.uniform(-0.2, 0.2), 0.0, 1.0)))
    lower = fabric(person.lower, float(rng.uniform(0.0, 1.0)))
    logo = upper + float(rng.uniform(-0.03, 0.03))
    return ThermalSignature(skin=float(rng.uniform(0.86, 0.95)), hair=float(rng.uniform(0.5, 0.62)), upper=upper,
                            upper2=upper2, lower=lower, shoes=float(rng.uniform(0.32, 0.42)),
                            bag=float(rng.uniform(0.24, 0.34)), logo=logo)


def _grey(value: float) -> np.ndarray:
    return np.full(3, float(np.clip(value, 0.0, 1.0)))


def thermal_identity(person: Identity, thermal: ThermalSignature) -> Identity:
    """The identity with every colour replaced by its infrared intensity (shape kept)."""
    return dataclasses.replace(
        person, upper=_grey(thermal.upper), upper2=_grey(thermal.upper2), lower=_grey(thermal.lower),
        shoes=_grey(thermal.shoes), skin=_grey(thermal.skin), hair=_grey(thermal.hair),
        logo=None if person.logo is None else _grey(thermal.logo), bag_colour=_grey(thermal.bag))


def infrared_camera(rng: np.random.Generator, cfg: SyntheticVIConfig, camera: Camera) -> Camera:
    """The night mode of ``camera``: same viewpoints, resolution and occlusion rate; no colour
    cast, a cool grey background, softer optics, more noise."""
    palette = np.repeat(np.concatenate([rng.uniform(0.1, 0.3, 2), rng.uniform(0.05, 0.45, 2)])[:, None], 3, axis=1)
    return dataclasses.replace(
        camera, gain=np.ones(3), brightness=float(rng.uniform(0.9, 1.1)), contrast=float(rng.uniform(*cfg.ir_contrast)),
        blur=float(rng.uniform(*cfg.ir_blur)), palette=palette, noise=float(rng.uniform(*cfg.ir_noise)))


def tracklet_nuisances(rng: np.random.Generator, cfg: SyntheticVIConfig, camera: Camera) -> list[Nuisance]:
    """One occurrence filmed for ``cfg.frames`` frames (see the module docstring)."""
    base = synthetic.sample_nuisance(rng, cfg, camera)
    side = base.view == SIDE
    speed = float(rng.uniform(0.3, 1.0)) * cfg.walk * (base.facing if side else float(rng.choice([-1, 1])) * 0.3)
    zoom = float(rng.uniform(-cfg.zoom, cfg.zoom))
    step = float(rng.uniform(*cfg.gait))
    phase = float(rng.uniform(0.0, np.pi))
    stride = 0.12 if side else 0.06
    frames = []
    for f in range(cfg.frames):
        angle = np.pi * f / step + phase
        jitter = rng.normal(0.0, cfg.jitter, 2)
        frames.append(dataclasses.replace(
            base,
            shift=float(np.clip(base.shift + speed * f + jitter[0], -2 * cfg.shift - cfg.walk, 2 * cfg.shift + cfg.walk)),
            scale=float(base.scale * (1.0 + zoom * f)),
            drop=float(base.drop - 0.006 * abs(np.cos(angle)) + 0.5 * jitter[1]),
            stance=float(stride * abs(np.sin(angle))),
            swing=float(0.06 * np.sin(angle)),
            flicker=float(base.flicker * np.exp(rng.normal(0.0, cfg.flicker / 3))),
            noise_seed=int(rng.integers(2**31)),
        ))
    return frames


def render_frame(person: Identity, camera: Camera, nuisance: Nuisance, size: tuple[int, int], infrared: bool) -> np.ndarray:
    """uint8 (H, W, 3); an infrared frame has its one intensity channel replicated."""
    image = render(person, camera, nuisance, size)
    return np.repeat(image[..., :1], 3, axis=2) if infrared else image


def _cameras_of(rng: np.random.Generator, cfg: SyntheticVIConfig) -> list[int]:
    k = int(rng.integers(cfg.cameras_per_id[0], cfg.cameras_per_id[1] + 1))
    return [int(c) for c in np.sort(rng.choice(cfg.num_cameras, size=k, replace=False))]


def generate_vi(cfg: SyntheticVIConfig, seed: int = 0) -> dict[str, torch.Tensor]:
    """Every frame and its labels: ``{train,query,gallery}_{images,pids,camids,modality,tracklet}``
    (per frame; tracklet ids are unique over the whole dataset)."""
    size = (cfg.height, cfg.width)
    visible = [synthetic.sample_camera(synthetic._rng(seed, synthetic._CAMERA_STREAM, c), cfg)
               for c in range(cfg.num_cameras)]
    cameras = {(c, VISIBLE): cam for c, cam in enumerate(visible)}
    cameras.update({(c, INFRARED): infrared_camera(synthetic._rng(seed, _IR_CAMERA_STREAM, c), cfg, cam)
                    for c, cam in enumerate(visible)})
    people = {}
    for pid in range(cfg.num_train_ids + cfg.num_test_ids):
        person = synthetic.sample_identity(synthetic._rng(seed, synthetic._IDENTITY_STREAM, pid), cfg)
        thermal = sample_thermal(synthetic._rng(seed, _THERMAL_STREAM, pid), person)
        people[pid, VISIBLE], people[pid, INFRARED] = person, thermal_identity(person, thermal)
    plan: dict[str, list[tuple[int, int, int]]] = {"train": [], "query": [], "gallery": []}
    for pid in range(cfg.num_train_ids + cfg.num_test_ids):
        for cam in _cameras_of(synthetic._rng(seed, _TRACK_LAYOUT_STREAM, pid), cfg):
            for modality in (VISIBLE, INFRARED):
                part = "train" if pid < cfg.num_train_ids else ("query" if modality == INFRARED else "gallery")
                plan[part].append((pid, cam, modality))
    out, tracklet_id = {}, 0
    for part, entries in plan.items():
        images = torch.empty((len(entries) * cfg.frames, 3, *size), dtype=torch.uint8)
        labels = {name: [] for name in ("pids", "camids", "modality", "tracklet")}
        for pid, cam, modality in entries:
            rng = synthetic._rng(seed, _TRACKLET_STREAM, pid, cam, modality)
            for nuisance in tracklet_nuisances(rng, cfg, cameras[cam, modality]):
                row = len(labels["pids"])
                frame = render_frame(people[pid, modality], cameras[cam, modality], nuisance, size, modality == INFRARED)
                images[row] = torch.from_numpy(frame).permute(2, 0, 1)
                for name, value in zip(labels, (pid, cam, modality, tracklet_id)):
                    labels[name].append(value)
            tracklet_id += 1
        out[f"{part}_images"] = images
        out.update({f"{part}_{name}": torch.tensor(values, dtype=torch.long) for name, values in labels.items()})
    return out


def _digest(cfg: SyntheticVIConfig, seed: int) -> str:
    payload = json.dumps({"generator": synthetic.GENERATOR_VERSION, "vi_generator": VI_GENERATOR_VERSION,
                          "config": dataclasses.asdict(cfg), "seed": seed}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


_KEYS = tuple(f"{part}_{what}" for part in ("train", "query", "gallery")
              for what in ("images", "pids", "camids", "modality", "tracklet"))


@DATASETS.register("synthetic-vi")
def build_synthetic_vi(root: Optional[str | Path] = None, preset: str = "small", seed: int = 0, cache: bool = True,
                       seq_len: Optional[int] = None, **overrides) -> ReIDSplit:
    """Visible-infrared video pedestrians (procedural): infrared-to-visible tracklet queries.
    ``seq_len`` frames per tracklet (default: all ``frames``); ``overrides`` set any
    :class:`SyntheticVIConfig` field on top of the preset."""
    cfg = synthetic.preset_config("synthetic-vi", VI_PRESETS, preset, overrides)
    seed = int(seed)
    seq_len = cfg.frames if seq_len is None else int(seq_len)
    if seq_len < 1:
        raise ReIDBenchError(f"synthetic-vi seq_len must be >= 1, got {seq_len}")
    digest = _digest(cfg, seed)
    path = (Path(root) if root is not None else cache_dir() / "synthetic") / (
        f"vi-{preset}-seed{seed}-v{synthetic.GENERATOR_VERSION}.{VI_GENERATOR_VERSION}-{digest}.pt")
    data = synthetic.load_or_generate(path, cache, lambda: generate_vi(cfg, seed), required=_KEYS)
    subsets = {}
    for part in ("train", "query", "gallery"):
        frames = ReIDSubset(data[f"{part}_pids"], data[f"{part}_camids"], images=data[f"{part}_images"],
                            modality=data[f"{part}_modality"], tracklet=data[f"{part}_tracklet"])
        subsets[part] = TrackletSubset.from_frames(frames, seq_len)
    split_hash = hashlib.sha256(f"{digest}:seq_len={seq_len}".encode()).hexdigest()[:16]
    info = {
        "kind": "video",
        "modalities": ["visible", "infrared"],
        "direction": "infrared-to-visible",
        "preset": preset,
        "seed": seed,
        "generator_version": f"{synthetic.GENERATOR_VERSION}.{VI_GENERATOR_VERSION}",
        "cameras": cfg.num_cameras,
        "train_ids": cfg.num_train_ids,
        "test_ids": cfg.num_test_ids,
        "seq_len": seq_len,
        "train_tracklets": len(subsets["train"]),
        "query_tracklets": len(subsets["query"]),
        "gallery_tracklets": len(subsets["gallery"]),
        "description": (f"procedural visible-infrared tracklets, preset '{preset}' (seed {seed}): "
                        f"{cfg.num_train_ids} train / {cfg.num_test_ids} test identities, {cfg.num_cameras} dual-mode "
                        f"cameras, {seq_len} frames of {cfg.height}x{cfg.width}"),
    }
    return ReIDSplit("synthetic-vi", subsets["train"], subsets["query"], subsets["gallery"],
                     image_size=(cfg.height, cfg.width), split_hash=split_hash, info=info)
