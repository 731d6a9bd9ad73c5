"""The renderer of the synthetic pedestrians (:mod:`.synthetic`): an identity, a camera and one
image's nuisance in, one uint8 image out. ``draw_scene`` paints what stands in front of the
camera; ``apply_camera`` photographs it (colour cast and light, optics, sensor noise).

Deterministic as :mod:`.synthetic` promises: every random draw is made by the caller and handed
in (the nuisance carries its noise seed), and the pixels are elementwise float64 arithmetic.
A change here that changes any pixel needs a bump of ``synthetic.GENERATOR_VERSION``.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Optional

import numpy as np

__all__ = ["Identity", "Camera", "Nuisance", "draw_scene", "apply_camera", "render"]

SOLID, HSTRIPES, VSTRIPES, CHECKS = range(4)
TROUSERS, SHORTS, SKIRT = range(3)
NO_BAG, BACKPACK, SHOULDER_BAG = range(3)
FRONT, BACK, SIDE = range(3)


@dataclass(frozen=True)
class Identity:
    """What a person wears and how they are built; colours are RGB in [0, 1]."""

    upper: np.ndarray
    upper2: np.ndarray
    pattern: int
    period: float  # of the upper pattern, as a fraction of body height
    short_sleeves: bool
    lower: np.ndarray
    lower_style: int
    shoes: np.ndarray
    skin: np.ndarray
    hair: np.ndarray
    long_hair: bool
    logo: Optional[np.ndarray]  # colour of a chest logo, if any
    logo_square: bool
    bag: int
    bag_colour: np.ndarray
    bag_side: int  # +1 / -1: the shoulder bag hangs on the person's right / left
    height: float  # relative to the average person
    build: float  # width relative to the average person


@dataclass(frozen=True)
class Camera:
    gain: np.ndarray  # per-channel colour cast
    brightness: float
    contrast: float
    blur: float  # Gaussian sigma, fraction of image height
    resolution: float  # effective resolution, fraction of the stored one
    view_probs: np.ndarray  # (front, back, side)
    palette: np.ndarray  # (4, 3) background colours: wall, floor, two clutter colours
    occlusion: float
    noise: float


@dataclass(frozen=True)
class Nuisance:
    """Everything that changes from one image of the same person and camera to the next."""

    view: int
    facing: int  # +1 / -1: in a side view the person walks right / left
    scale: float  # person height, fraction of image height (before the identity's own height)
    shift: float  # horizontal offset of the person, fraction of image width
    drop: float  # vertical offset of the feet, fraction of image height
    stance: float  # leg spread, fraction of body height
    swing: float  # arm swing, fraction of body height
    flicker: float
    horizon: float  # wall / floor boundary, fraction of image height
    clutter: np.ndarray  # (n, 6): ellipse?, cx, cy, half-width, half-height (fractions of image), colour index
    occluder: Optional[tuple[int, float, float, int]]  # kind, position, extent, colour index
    noise_seed: int


# ---------------------------------------------------------------------------------------------
# Rendering: signed distance functions (in pixels, negative inside) composited back to front
# with a one-pixel soft edge, which antialiases without supersampling.
# ---------------------------------------------------------------------------------------------


class _Canvas:
    def __init__(self, height: int, width: int):
        self.y, self.x = np.mgrid[0:height, 0:width].astype(np.float64) + 0.5
        self.rgb = np.zeros((height, width, 3))

    def paint(self, sdf: np.ndarray, colour: np.ndarray) -> None:
        alpha = np.clip(0.5 - sdf, 0.0, 1.0)[..., None]
        self.rgb += alpha * (colour - self.rgb)

    def box(self, cx: float, cy: float, hw: float, hh: float, radius: float = 0.0) -> np.ndarray:
        qx = np.abs(self.x - cx) - hw + radius
        qy = np.abs(self.y - cy) - hh + radius
        outside = np.sqrt(np.maximum(qx, 0.0) ** 2 + np.maximum(qy, 0.0) ** 2)
        return outside + np.minimum(np.maximum(qx, qy), 0.0) - radius

    def ellipse(self, cx: float, cy: float, rx: float, ry: float) -> np.ndarray:
        # Not an exact distance, but its gradient is close to one near the edge, which is all the
        # soft edge needs.
        r = np.sqrt(((self.x - cx) / rx) ** 2 + ((self.y - cy) / ry) ** 2)
        return (r - 1.0) * min(rx, ry)

    def capsule(self, x0: float, y0: float, x1: float, y1: float, radius: float) -> np.ndarray:
        dx, dy = x1 - x0, y1 - y0
        t = np.clip(((self.x - x0) * dx + (self.y - y0) * dy) / (dx * dx + dy * dy + 1e-9), 0.0, 1.0)
        return np.sqrt((self.x - x0 - t * dx) ** 2 + (self.y - y0 - t * dy) ** 2) - radius

    def trapezoid(self, cx: float, y0: float, y1: float, hw0: float, hw1: float) -> np.ndarray:
        t = np.clip((self.y - y0) / (y1 - y0), 0.0, 1.0)
        return np.maximum(np.abs(self.x - cx) - (hw0 + t * (hw1 - hw0)), np.abs(self.y - (y0 + y1) / 2) - (y1 - y0) / 2)


def _square_wave(coord: np.ndarray, period: float) -> np.ndarray:
    """1 on the first half of each period, 0 on the second, with one-pixel soft edges."""
    phase = np.mod(coord / period, 1.0)
    to_edge = np.minimum(np.mod(phase, 0.5), 0.5 - np.mod(phase, 0.5)) * period
    inside = np.where(phase < 0.5, 1.0, -1.0)
    return np.clip(0.5 + inside * to_edge, 0.0, 1.0)


def _draw_background(canvas: _Canvas, camera: Camera, nuisance: Nuisance) -> None:
    height, width = canvas.rgb.shape[:2]
    wall, floor = camera.palette[0], camera.palette[1]
    horizon = nuisance.horizon * height
    # The wall darkens towards the top and the floor brightens towards the camera.
    up = np.clip(canvas.y / horizon, 0.0, 1.0)[..., None]
    down = np.clip((canvas.y - horizon) / max(height - horizon, 1.0), 0.0, 1.0)[..., None]
    canvas.rgb[:] = np.where(canvas.y[..., None] < horizon, wall * (0.75 + 0.25 * up), floor * (0.85 + 0.25 * down))
    for is_ellipse, cx, cy, hw, hh, colour in nuisance.clutter:
        cx, cy, hw, hh = cx * width, cy * height, hw * width, hh * height
        sdf = canvas.ellipse(cx, cy, hw, hh) if is_ellipse else canvas.box(cx, cy, hw, hh)
        canvas.paint(sdf, camera.palette[int(colour)])


def _draw_person(canvas: _Canvas, person: Identity, height: int, width: int, nuisance: Nuisance) -> None:
    view, facing = nuisance.view, nuisance.facing
    u = min(nuisance.scale * person.height, 0.98) * height  # body height in pixels
    feet = height * (0.985 + nuisance.drop)
    top = feet - u
    cx = width * (0.5 + nuisance.shift)
    b = person.build
    side = view == SIDE

    torso_top, hip = top + 0.15 * u, top + 0.52 * u
    torso_hw = (0.1 if side else 0.13) * u * b
    head_y, head_ry = top + 0.075 * u, 0.07 * u
    head_rx = 0.052 * u
    # In a side view the head and legs lean into the walking direction.
    head_x = cx + (0.012 * u * facing if side else 0.0)

    # Behind the body: a backpack seen from the side, long hair seen from the front.
    if person.bag == BACKPACK and side:
        canvas.paint(canvas.box(cx - facing * (torso_hw + 0.035 * u), top + 0.29 * u, 0.045 * u, 0.09 * u,
                                0.02 * u), person.bag_colour)
    if person.long_hair and view == FRONT:
        canvas.paint(canvas.box(head_x, top + 0.13 * u, head_rx * 1.2, 0.09 * u, 0.03 * u), person.hair)

    # Legs, from hip to ankle, spread by the stance.
    leg_r = 0.05 * u * b
    knee = top + 0.72 * u
    ankle = top + 0.95 * u
    if side:
        hips = [(cx, cx + facing * nuisance.stance * u), (cx, cx - facing * nuisance.stance * u)]
    else:
        off = 0.055 * u * b
        hips = [(cx - off, cx - off - nuisance.stance * u / 2), (cx + off, cx + off + nuisance.stance * u / 2)]
    for hip_x, ankle_x in hips:
        leg = canvas.capsule(hip_x, hip, ankle_x, ankle, leg_r)
        if person.lower_style == TROUSERS:
            canvas.paint(leg, person.lower)
        else:
            canvas.paint(leg, person.skin)
            if person.lower_style == SHORTS:
                canvas.paint(np.maximum(leg, canvas.y - knee), person.lower)
        toe = facing * 0.025 * u if side else 0.0
        canvas.paint(canvas.ellipse(ankle_x + toe, ankle + 0.015 * u, 0.05 * u, 0.028 * u), person.shoes)
    if person.lower_style == SKIRT:
        canvas.paint(canvas.trapezoid(cx, hip - 0.02 * u, knee, torso_hw * 0.95, torso_hw * 1.35), person.lower)

    # Upper body, with the identity's pattern in torso coordinates so it moves with the person.
    rel_x, rel_y = canvas.x - cx, canvas.y - torso_top
    period = person.period * u
    if person.pattern == SOLID:
        weight = np.zeros_like(rel_x)
    elif person.pattern == HSTRIPES:
        weight = _square_wave(rel_y, period)
    elif person.pattern == VSTRIPES:
        weight = _square_wave(rel_x + 0.25 * period, period)
    else:
        wx, wy = _square_wave(rel_x + 0.25 * period, period), _square_wave(rel_y, period)
        weight = wx + wy - 2 * wx * wy
    shirt = person.upper + weight[..., None] * (person.upper2 - person.upper)

    def arm(shoulder_x: float, hand_dx: float) -> None:
        shoulder_y, elbow_y, hand_y = torso_top + 0.03 * u, torso_top + 0.17 * u, hip - 0.03 * u
        hand_x = shoulder_x + hand_dx
        sleeve = canvas.capsule(shoulder_x, shoulder_y, hand_x, hand_y, 0.035 * u * b)
        if person.short_sleeves:
            canvas.paint(sleeve, person.skin)
            sleeve = np.maximum(sleeve, canvas.y - elbow_y)
        canvas.paint(sleeve, shirt)
        canvas.paint(canvas.ellipse(hand_x, hand_y + 0.025 * u, 0.03 * u, 0.035 * u), person.skin)

    torso = canvas.box(cx, (torso_top + hip) / 2, torso_hw, (hip - torso_top) / 2, 0.04 * u)
    canvas.paint(torso, shirt)
    if view == FRONT and person.logo is not None:
        logo_x, logo_y, size = cx + 0.04 * u * b, torso_top + 0.09 * u, 0.035 * u
        logo = canvas.box(logo_x, logo_y, size, size) if person.logo_square else canvas.ellipse(logo_x, logo_y, size, size)
        canvas.paint(logo, person.logo)
    if view == BACK and person.bag == BACKPACK:
        # Smaller than the back, so the shirt still shows around it.
        canvas.paint(canvas.box(cx, top + 0.29 * u, 0.07 * u, 0.09 * u, 0.02 * u), person.bag_colour)
    if person.bag == SHOULDER_BAG:
        # The bag hangs on the person's right, which is the viewer's left from the front.
        bag_x = cx if side else cx + person.bag_side * (1 if view == BACK else -1) * (torso_hw + 0.04 * u)
        strap_x = cx - (bag_x - cx) * 0.6
        canvas.paint(canvas.capsule(strap_x, torso_top + 0.01 * u, bag_x, hip - 0.04 * u, 0.012 * u),
                     person.bag_colour * 0.8)
        canvas.paint(canvas.box(bag_x, hip - 0.01 * u, 0.055 * u, 0.05 * u, 0.01 * u), person.bag_colour)
    if side:
        arm(cx, facing * nuisance.swing * u)
    else:
        for s in (-1, 1):
            arm(cx + s * (torso_hw + 0.01 * u * b), s * 0.015 * u + nuisance.swing * u * 0.3)

    # Head: a face from the front, hair all over from the back, hair on the back half from the side.
    head = canvas.ellipse(head_x, head_y, head_rx, head_ry)
    canvas.paint(canvas.box(cx, top + 0.14 * u, 0.025 * u, 0.03 * u), person.skin)
    if view == BACK:
        canvas.paint(head, person.hair)
        if person.long_hair:
            canvas.paint(canvas.box(head_x, top + 0.14 * u, head_rx * 1.1, 0.09 * u, 0.03 * u), person.hair)
        return
    canvas.paint(head, person.skin)
    cap = np.maximum(head - 0.01 * u, canvas.y - (head_y - 0.02 * u))
    canvas.paint(cap, person.hair)
    if side:
        canvas.paint(np.maximum(head, facing * (canvas.x - head_x) + 0.01 * u), person.hair)
        if person.long_hair:
            canvas.paint(canvas.box(head_x - facing * head_rx * 0.6, top + 0.13 * u, head_rx * 0.5, 0.08 * u,
                                    0.02 * u), person.hair)
    else:
        for s in (-1, 1):
            canvas.paint(canvas.ellipse(head_x + s * head_rx * 0.4, head_y + 0.005 * u, 0.01 * u, 0.01 * u),
                         person.skin * 0.35)


def _draw_occluder(canvas: _Canvas, camera: Camera, nuisance: Nuisance) -> None:
    height, width = canvas.rgb.shape[:2]
    kind, position, extent, colour = nuisance.occluder
    colour = camera.palette[colour] * 0.8
    if kind == 0:
        sdf = canvas.box(width * (0.2 + 0.6 * position), height / 2, width * (0.05 + 0.05 * extent), height)
    elif kind == 1:
        hh = height * (0.1 + 0.12 * extent)
        sdf = canvas.box(width * position, height - hh, width * 0.6, hh, 0.02 * height)
    else:
        hw = width * (0.15 + 0.15 * extent)
        sdf = canvas.box(-0.5 * hw if position < 0.5 else width + 0.5 * hw, height / 2, 1.5 * hw, height)
    canvas.paint(sdf, colour)


def draw_scene(person: Identity, camera: Camera, nuisance: Nuisance, size: tuple[int, int]) -> np.ndarray:
    """The scene in front of the camera as float64 (H, W, 3) RGB in [0, 1], before any optics."""
    canvas = _Canvas(*size)
    _draw_background(canvas, camera, nuisance)
    _draw_person(canvas, person, size[0], size[1], nuisance)
    if nuisance.occluder is not None:
        _draw_occluder(canvas, camera, nuisance)
    return canvas.rgb


@functools.lru_cache(maxsize=256)
def _optics(n: int, sigma: float, resolution: float) -> tuple[tuple[int, ...], np.ndarray]:
    """The linear map along one image axis of blur, area-downsampling to the effective resolution
    and bilinear upsampling back, as the (offsets, weights) of its band: output pixel ``i`` is
    ``sum_k weights[k, i] * input[i + offsets[k]]``.

    Applying the band with elementwise operations instead of a matrix product keeps BLAS (and its
    thread pool, which thrashes on a busy machine) out of the per-image path."""
    idx = np.arange(n, dtype=np.float64)
    # Below a twentieth of a pixel a Gaussian is an identity anyway (and would divide by ~0).
    if sigma > 0.05:
        gap = idx[:, None] - idx[None, :]
        # Cut at three sigma so that the band, and the per-image cost, stays narrow.
        matrix = np.where(np.abs(gap) <= max(1.0, 3.0 * sigma), np.exp(-0.5 * (gap / sigma) ** 2), 0.0)
    else:
        matrix = np.eye(n)
    matrix /= matrix.sum(axis=1, keepdims=True)
    m = max(2, int(round(n * resolution)))
    if m < n:
        # Area averaging: each low-resolution pixel covers n/m pixels, partially at the ends.
        edges = np.arange(m + 1) * (n / m)
        down = np.clip(np.minimum(edges[1:, None], idx[None, :] + 1) - np.maximum(edges[:-1, None], idx[None, :]),
                       0.0, None)
        down /= down.sum(axis=1, keepdims=True)
        # Bilinear upsampling with half-pixel centres (like align_corners=False).
        src = np.clip((idx + 0.5) * (m / n) - 0.5, 0.0, m - 1)
        lo = np.floor(src).astype(int)
        hi = np.minimum(lo + 1, m - 1)
        up = np.zeros((n, m))
        up[np.arange(n), lo] += 1.0 - (src - lo)
        up[np.arange(n), hi] += src - lo
        matrix = up @ down @ matrix
    offsets, weights = [], []
    for offset in range(1 - n, n):
        diagonal = np.diagonal(matrix, offset)
        if diagonal.any():
            band = np.zeros(n)
            band[max(0, -offset): n - max(0, offset)] = diagonal
            offsets.append(offset)
            weights.append(band)
    return tuple(offsets), np.stack(weights)


def _apply_band(img: np.ndarray, band: tuple[tuple[int, ...], np.ndarray]) -> np.ndarray:
    """Apply an ``_optics`` band along the first axis of ``img``."""
    offsets, weights = band
    n, reach = len(img), max(abs(o) for o in offsets)
    padded = np.pad(img, [(reach, reach)] + [(0, 0)] * (img.ndim - 1))
    out = np.zeros_like(img)
    shape = (n,) + (1,) * (img.ndim - 1)
    for offset, weight in zip(offsets, weights):
        out += weight.reshape(shape) * padded[reach + offset: reach + offset + n]
    return out


def apply_camera(scene: np.ndarray, camera: Camera, nuisance: Nuisance) -> np.ndarray:
    """Photograph a scene: colour cast and light, optics, sensor noise; uint8 (H, W, 3)."""
    height, width = scene.shape[:2]
    img = scene * (camera.gain * camera.brightness * nuisance.flicker)
    img = (img - 0.5) * camera.contrast + 0.5
    sigma = camera.blur * height
    img = _apply_band(img, _optics(height, sigma, camera.resolution))
    img = _apply_band(img.transpose(1, 0, 2), _optics(width, sigma, camera.resolution)).transpose(1, 0, 2)
    img = img + np.random.default_rng(nuisance.noise_seed).normal(0.0, camera.noise, img.shape)
    return np.round(np.clip(img, 0.0, 1.0) * 255.0).astype(np.uint8)


def render(person: Identity, camera: Camera, nuisance: Nuisance, size: tuple[int, int]) -> np.ndarray:
    """One image, uint8 (H, W, 3)."""
    return apply_camera(draw_scene(person, camera, nuisance, size), camera, nuisance)
