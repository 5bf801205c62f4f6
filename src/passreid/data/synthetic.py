"""A synthetic person ReID set in the exact Market-1501 layout (DESIGN §7).

The real sets cannot be downloaded here, so every stage must also run on data
drawn by this module. It is built so that the ReID problem keeps its shape:

- **identity lives in the parts**: hair and skin (head), upper-body colour and
  texture (stripes, checks, a chest logo, two tones, sleeve length), lower-body
  garment, colour and texture, shoes, a bag. Colours come from a shared palette,
  so many people share their shirt colour and differ elsewhere: no single global
  colour separates the identities; the combination of the parts does.
- **cameras change the global look**: each camera has its own background (wall
  and floor colours, bricks, windows, trees, tiles), illumination, colour cast,
  blur, noise, person scale and position, a preferred facing direction (the
  logo shows only from the front, a backpack mostly from the back) and lean.
- a ``domain`` picks a camera style family (``market``: bright and warm,
  ``duke``: dim, cool, winter clothes, ``msmt``: mixed indoor/outdoor light),
  giving two or more domains for unsupervised domain adaptation.

Everything is drawn with numpy from seeded generators keyed by (seed, domain,
identity, camera, image), so the same arguments write the same bytes.
"""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import numpy as np
from PIL import Image

from passreid.data.datasets import ReIDDataset, SyntheticMarket
from passreid.errors import ConfigError, DatasetError

logger = logging.getLogger(__name__)

RGB = tuple[int, int, int]
T = TypeVar("T")

CLOTHES: tuple[RGB, ...] = (
    (22, 22, 24), (236, 236, 230), (128, 128, 128), (68, 68, 74), (205, 32, 36), (118, 22, 32),
    (236, 122, 162), (242, 132, 32), (236, 208, 44), (212, 190, 150), (122, 80, 44), (40, 152, 62),
    (30, 80, 42), (120, 122, 40), (120, 182, 232), (30, 72, 192), (26, 32, 82), (122, 52, 152),
    (30, 142, 142), (172, 212, 92),
)
DARK_CLOTHES = (0, 2, 3, 5, 10, 12, 16)  # black, grey, dark grey, maroon, brown, dark green, navy
HAIR: tuple[RGB, ...] = ((24, 20, 18), (60, 40, 26), (112, 72, 40), (204, 172, 100), (164, 162, 160), (142, 62, 32))
SKIN: tuple[RGB, ...] = ((242, 204, 172), (226, 182, 142), (200, 150, 110), (160, 110, 76), (110, 76, 52))
UPPER_TEXTURES = ("plain", "hstripes", "vstripes", "checks", "logo", "two-tone")
LOWER_TEXTURES = ("plain", "plain", "checks", "side-stripe", "hstripes")
LOWER_KINDS = ("trousers", "trousers", "shorts", "skirt")
BAGS = ("none", "none", "backpack", "handbag")


@dataclass(frozen=True)
class DomainStyle:
    """The look shared by the cameras of one synthetic domain."""

    walls: tuple[RGB, ...]
    floors: tuple[RGB, ...]
    backgrounds: tuple[str, ...]  # texture kinds the walls draw from
    gain: tuple[float, float]  # illumination multiplier range over cameras
    cast_bias: tuple[float, float, float]  # mean per-channel colour cast (warm: +R -B)
    cast_spread: float  # per-camera random cast on top of the bias
    noise: tuple[float, float]  # pixel noise sigma range (0-255 scale)
    blur_p: float  # probability that a camera is slightly blurred
    dark_clothes: float  # probability that a garment colour is drawn from DARK_CLOTHES


DOMAINS: dict[str, DomainStyle] = {
    # Summer in front of a supermarket: bright pavement, trees, warm sunlight.
    "market": DomainStyle(
        walls=((200, 190, 170), (170, 180, 160), (215, 205, 190), (150, 165, 140), (190, 170, 150)),
        floors=((165, 160, 150), (185, 175, 160), (140, 140, 135)),
        backgrounds=("trees", "windows", "plain", "bricks"),
        gain=(1.0, 1.25), cast_bias=(0.08, 0.02, -0.08), cast_spread=0.05, noise=(2.0, 5.0), blur_p=0.2,
        dark_clothes=0.25,
    ),
    # Winter campus: dim overcast light, snow and dark brick, blue cast, noisier cameras, dark coats.
    "duke": DomainStyle(
        walls=((85, 90, 105), (110, 70, 60), (60, 75, 70), (120, 125, 135), (75, 65, 80)),
        floors=((205, 210, 220), (95, 100, 110), (70, 72, 80)),
        backgrounds=("bricks", "windows", "plain", "trees"),
        gain=(0.65, 0.9), cast_bias=(-0.08, 0.0, 0.1), cast_spread=0.05, noise=(4.0, 9.0), blur_p=0.5,
        dark_clothes=0.6,
    ),
    # A mix of indoor (fluorescent, yellowish) and outdoor cameras at different times of day.
    "msmt": DomainStyle(
        walls=((225, 215, 170), (190, 195, 200), (120, 130, 110), (160, 140, 110), (90, 95, 120)),
        floors=((200, 190, 150), (120, 120, 125), (160, 150, 140)),
        backgrounds=("windows", "plain", "tiles", "trees", "bricks"),
        gain=(0.6, 1.3), cast_bias=(0.04, 0.03, -0.04), cast_spread=0.12, noise=(3.0, 8.0), blur_p=0.35,
        dark_clothes=0.4,
    ),
}


@dataclass(frozen=True)
class Person:
    """The part-level appearance that makes an identity (colours as float RGB 0-255)."""

    skin: np.ndarray
    hair: np.ndarray
    hair_style: str  # short, long, cap
    cap: np.ndarray
    upper: np.ndarray
    upper2: np.ndarray
    upper_texture: str
    upper_freq: float
    long_sleeves: bool
    lower: np.ndarray
    lower2: np.ndarray
    lower_kind: str
    lower_texture: str
    shoes: np.ndarray
    bag: str
    bag_color: np.ndarray
    bag_side: int  # +1 right, -1 left (seen from the front)
    height: float
    width: float

    def signature(self) -> tuple:
        """The discrete choices that must differ between two identities of one set."""
        return (_nearest(self.upper, CLOTHES), self.upper_texture, _nearest(self.lower, CLOTHES),
                self.lower_kind, _nearest(self.hair, HAIR), self.bag)


@dataclass(frozen=True)
class Camera:
    """What one camera does to every image it takes."""

    wall: np.ndarray
    floor: np.ndarray
    background: str
    horizon: float  # fraction of the height where the floor starts
    period: float  # background texture period in pixels
    blobs: np.ndarray  # (K, 4) tree/object ellipses: x, y, rx, ry as fractions
    blob_color: np.ndarray
    gain: float
    cast: np.ndarray  # (3,) per-channel multipliers
    light: float  # horizontal shading slope (light from the left or right)
    noise: float
    blur: bool
    scale: float  # person height / image height
    x_offset: float  # mean horizontal offset, fraction of the width
    front_p: float  # probability of seeing the person from the front
    lean: float


def _nearest(color: np.ndarray, palette: tuple[RGB, ...]) -> int:
    return int(np.argmin(((np.asarray(palette, np.float32) - color) ** 2).sum(1)))


def _jitter(rng: np.random.Generator, color: RGB, sigma: float) -> np.ndarray:
    return np.clip(np.asarray(color, np.float32) + rng.normal(0, sigma, 3), 0, 255).astype(np.float32)


def _pick(rng: np.random.Generator, options: Sequence[T]) -> T:
    return options[int(rng.integers(len(options)))]


def _clothes_color(rng: np.random.Generator, style: DomainStyle, avoid: int | None = None) -> np.ndarray:
    while True:
        index = _pick(rng, DARK_CLOTHES) if rng.random() < style.dark_clothes else int(rng.integers(len(CLOTHES)))
        if index != avoid:
            return _jitter(rng, CLOTHES[index], 10.0)


def random_person(rng: np.random.Generator, style: DomainStyle) -> Person:
    """Draw one identity's appearance."""
    upper = _clothes_color(rng, style)
    lower = _clothes_color(rng, style)
    return Person(
        skin=_jitter(rng, _pick(rng, SKIN), 6.0),
        hair=_jitter(rng, _pick(rng, HAIR), 6.0),
        hair_style=_pick(rng, ("short", "short", "long", "cap")),
        cap=_clothes_color(rng, style),
        upper=upper,
        upper2=_clothes_color(rng, style, avoid=_nearest(upper, CLOTHES)),
        upper_texture=_pick(rng, UPPER_TEXTURES),
        upper_freq=float(rng.uniform(9.0, 16.0)),
        long_sleeves=bool(rng.random() < 0.6),
        lower=lower,
        lower2=_clothes_color(rng, style, avoid=_nearest(lower, CLOTHES)),
        lower_kind=_pick(rng, LOWER_KINDS),
        lower_texture=_pick(rng, LOWER_TEXTURES),
        shoes=_jitter(rng, _pick(rng, ((25, 25, 25), (235, 235, 235), (120, 80, 50), (200, 40, 40), (40, 60, 150))),
                      8.0),
        bag=_pick(rng, BAGS),
        bag_color=_clothes_color(rng, style),
        bag_side=1 if rng.random() < 0.5 else -1,
        height=float(rng.uniform(0.93, 1.03)),
        width=float(rng.uniform(0.88, 1.12)),
    )


def random_camera(rng: np.random.Generator, style: DomainStyle, background: str | None = None) -> Camera:
    """Draw one camera of a domain (its background kind drawn too unless given)."""
    cast = 1.0 + np.asarray(style.cast_bias, np.float32) + rng.uniform(-style.cast_spread, style.cast_spread, 3)
    num_blobs = 5
    return Camera(
        wall=_jitter(rng, _pick(rng, style.walls), 12.0),
        floor=_jitter(rng, _pick(rng, style.floors), 10.0),
        background=_pick(rng, style.backgrounds) if background is None else background,
        horizon=float(rng.uniform(0.55, 0.85)),
        period=float(rng.uniform(6.0, 16.0)),
        blobs=np.stack([rng.uniform(0, 1, num_blobs), rng.uniform(0.05, 0.5, num_blobs),
                        rng.uniform(0.12, 0.3, num_blobs), rng.uniform(0.08, 0.2, num_blobs)], axis=1),
        blob_color=_jitter(rng, _pick(rng, ((60, 110, 50), (40, 80, 40), (90, 90, 80), (140, 120, 90))), 12.0),
        gain=float(rng.uniform(*style.gain)),
        cast=cast.astype(np.float32),
        light=float(rng.uniform(-0.25, 0.25)),
        noise=float(rng.uniform(*style.noise)),
        blur=bool(rng.random() < style.blur_p),
        scale=float(rng.uniform(0.74, 0.92)),
        x_offset=float(rng.uniform(-0.08, 0.08)),
        front_p=float(rng.uniform(0.15, 0.85)),
        lean=float(rng.uniform(-0.05, 0.05)),
    )


def domain_cameras(key: Sequence[int], style: DomainStyle, num_cams: int) -> list[Camera]:
    """The cameras of one generated set (``key``: its seed and domain index).

    They go through the domain's background kinds in a shuffled cycle, so that a
    domain with enough cameras shows all of them: independent draws once gave six
    brick walls, and a model trained there never learnt to ignore the background.
    """
    kinds = np.random.default_rng([*key, 5]).permutation(len(style.backgrounds))
    return [random_camera(np.random.default_rng([*key, 1, c]), style, style.backgrounds[kinds[c % len(kinds)]])
            for c in range(num_cams)]


# --------------------------------------------------------------------------- drawing


def _background(cam: Camera, h: int, w: int, rng: np.random.Generator) -> np.ndarray:
    """``(H, W, 3)`` float background; the texture pans a little from image to image."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    shift = rng.uniform(0, 4 * cam.period)
    xs = xx + shift
    horizon = int(round(h * (cam.horizon + rng.normal(0, 0.02))))
    img = np.empty((h, w, 3), np.float32)
    gradient = 1.0 - 0.25 * (yy / h)[..., None]
    img[:] = cam.wall * gradient
    if cam.background == "bricks":
        row = np.floor(yy / (cam.period * 0.6))
        mortar = ((yy % (cam.period * 0.6)) < 1.2) | (((xs + (row % 2) * cam.period / 2) % cam.period) < 1.2)
        img[mortar] *= 0.7
    elif cam.background == "windows":
        window = ((xs % (2.2 * cam.period)) < cam.period) & ((yy % (3 * cam.period)) < 2 * cam.period)
        img[window] = img[window] * 0.45 + np.float32([40, 60, 90]) * 0.55
    elif cam.background == "tiles":
        grout = ((yy % cam.period) < 1.0) | ((xs % cam.period) < 1.0)
        img[grout] *= 0.8
    elif cam.background == "trees":
        for bx, by, rx, ry in cam.blobs:
            cx = ((bx * w + shift) % (w * 1.4)) - 0.2 * w
            blob = ((xx - cx) / (rx * w)) ** 2 + ((yy - by * h) / (ry * h)) ** 2 < 1.0
            img[blob] = cam.blob_color * (0.85 + 0.3 * ((xx[blob] + yy[blob]) % 3 == 0))[:, None]
    floor = yy >= horizon
    img[floor] = cam.floor * (0.9 + 0.1 * (yy[floor] - horizon) / max(h - horizon, 1))[:, None]
    return img


def _texture(kind: str, u: np.ndarray, v: np.ndarray, freq: float, front: bool) -> np.ndarray:
    """Boolean ``(H, W)``: where the secondary colour of a garment shows (person coordinates ``u, v``)."""
    if kind == "hstripes":
        return (v * freq) % 1.0 < 0.5
    if kind == "vstripes":
        return (u * freq * 1.6) % 1.0 < 0.5
    if kind == "checks":
        return ((v * freq) % 1.0 < 0.5) ^ ((u * freq * 1.6) % 1.0 < 0.5)
    if kind == "logo":  # a chest print: only the front shows it
        return (np.abs(u) < 0.05) & (np.abs(v - 0.27) < 0.045) if front else np.zeros(u.shape, bool)
    if kind == "two-tone":
        return v > 0.36
    if kind == "side-stripe":
        return np.abs(np.abs(u) - 0.075) < 0.012
    return np.zeros(u.shape, bool)


def _paint(img: np.ndarray, mask: np.ndarray, color: np.ndarray,
           second: np.ndarray | None = None, where: np.ndarray | None = None) -> None:
    img[mask] = color
    if second is not None and where is not None:
        img[mask & where] = second


def draw_person(img: np.ndarray, person: Person, cam: Camera, rng: np.random.Generator,
                scale: float | None = None, center: tuple[float, float] | None = None) -> np.ndarray:
    """Paint ``person`` into ``img`` ``(H, W, 3)`` in place; returns the person mask ``(H, W)``.

    Shapes live in person coordinates: ``v`` runs from the top of the head (0)
    to the soles (1), ``u`` is the horizontal offset in units of the body
    height, so textures scale with the person.
    """
    h, w = img.shape[:2]
    ph = h * (scale if scale is not None else cam.scale * person.height * rng.normal(1.0, 0.04))
    if center is None:
        cx = w * (0.5 + cam.x_offset + rng.normal(0, 0.04))
        bottom = h * (0.98 - rng.uniform(0, 0.04))
    else:
        cx, bottom = center[0] * w, center[1] * h
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    v = (yy - (bottom - ph)) / ph
    lean = cam.lean + rng.normal(0, 0.02)
    u = (xx - cx) / ph - lean * (v - 0.5)
    front = bool(rng.random() < cam.front_p)
    stride = rng.uniform(-1, 1) * 0.05
    swing = rng.uniform(-1, 1) * 0.04
    bw = person.width
    mask = np.zeros((h, w), bool)

    # Lower body: legs (skin under shorts and skirts), then the garment, then shoes.
    t = np.clip((v - 0.52) / 0.40, 0, 1)
    leg_l = (np.abs(u + bw * 0.045 + stride * t) < bw * 0.043) & (v >= 0.5) & (v < 0.95)
    leg_r = (np.abs(u - bw * 0.045 - stride * t) < bw * 0.043) & (v >= 0.5) & (v < 0.95)
    legs = leg_l | leg_r
    hips = (np.abs(u) < bw * 0.095) & (v >= 0.5) & (v < 0.58)
    _paint(img, legs, person.skin)
    lower_tex = _texture(person.lower_texture, u, v, person.upper_freq * 0.8, front)
    if person.lower_kind == "trousers":
        garment = legs | hips
    elif person.lower_kind == "shorts":
        garment = (legs | hips) & (v < 0.7)
    else:
        half = bw * (0.095 + 0.06 * np.clip((v - 0.5) / 0.22, 0, 1))
        garment = (np.abs(u) < half) & (v >= 0.5) & (v < 0.72)
    _paint(img, garment, person.lower, person.lower2, lower_tex)
    feet = (np.abs(np.abs(u) - bw * 0.045 - np.abs(stride)) < bw * 0.05) & (v >= 0.93) & (v < 0.99)
    _paint(img, feet, person.shoes)
    mask |= legs | garment | feet

    # Upper body: torso and arms in the shirt colour/texture, bare forearms with short sleeves.
    torso_half = bw * (0.125 - 0.025 * np.clip((v - 0.16) / 0.36, 0, 1))
    torso = (np.abs(u) < torso_half) & (v >= 0.155) & (v < 0.53)
    upper_tex = _texture(person.upper_texture, u, v, person.upper_freq, front)
    arm_x = bw * 0.155 + swing * np.clip((v - 0.17) / 0.33, 0, 1)
    arms = ((np.abs(u - arm_x) < bw * 0.032) | (np.abs(u + arm_x) < bw * 0.032)) & (v >= 0.17) & (v < 0.5)
    sleeves = arms if person.long_sleeves else arms & (v < 0.28)
    _paint(img, arms & ~sleeves, person.skin)
    _paint(img, torso | sleeves, person.upper, person.upper2, upper_tex)
    hands = ((np.abs(u - arm_x) < bw * 0.03) | (np.abs(u + arm_x) < bw * 0.03)) & (v >= 0.5) & (v < 0.545)
    _paint(img, hands, person.skin)
    mask |= torso | arms | hands

    # Bags: a backpack covers the back (straps from the front), a handbag hangs at one side.
    side = person.bag_side if front else -person.bag_side
    if person.bag == "backpack":
        if front:
            pack = (np.abs(np.abs(u) - bw * 0.07) < 0.012) & (v >= 0.16) & (v < 0.36)
        else:
            pack = (np.abs(u) < bw * 0.1) & (v >= 0.19) & (v < 0.45)
        _paint(img, pack, person.bag_color)
        mask |= pack
    elif person.bag == "handbag":
        bag = (np.abs(u - side * bw * 0.2) < bw * 0.045) & (v >= 0.42) & (v < 0.56)
        _paint(img, bag, person.bag_color)
        mask |= bag

    # Head: neck, face, hair (all of the head from the back), long hair, cap.
    neck = (np.abs(u) < 0.025) & (v >= 0.13) & (v < 0.17)
    head = (u / 0.058) ** 2 + ((v - 0.075) / 0.068) ** 2 < 1.0
    _paint(img, neck | head, person.skin)
    hair = head & ((v < 0.06) | (np.abs(u) > 0.045) | (not front))
    if person.hair_style == "long":
        hair |= (np.abs(u) < 0.07) & (v >= 0.06) & (v < 0.21) & ((np.abs(u) > 0.045) | (not front))
    _paint(img, hair, person.hair)
    if person.hair_style == "cap":
        brim = (np.abs(u - (0.03 if front else -0.03)) < 0.06) & (np.abs(v - 0.045) < 0.008)
        cap = (head & (v < 0.05)) | brim
        _paint(img, cap, person.cap)
        hair |= cap
    mask |= neck | head | hair

    # Round bodies: darker towards the silhouette edge, lit from one side.
    shade = np.clip(1.0 - 9.0 * u**2 + cam.light * u * 4.0, 0.6, 1.15)
    img[mask] *= shade[mask][:, None]
    return mask


def _finish(img: np.ndarray, cam: Camera, rng: np.random.Generator) -> np.ndarray:
    """Camera response: illumination, colour cast, blur and noise; returns uint8 ``(H, W, 3)``."""
    img = img * (cam.gain * rng.normal(1.0, 0.05)) * cam.cast
    if cam.blur:
        img = (img + np.roll(img, 1, 0) + np.roll(img, 1, 1) + np.roll(img, (1, 1), (0, 1))) / 4.0
    img = img + rng.normal(0, cam.noise, img.shape).astype(np.float32)
    return np.clip(img, 0, 255).astype(np.uint8)


def _occluder(img: np.ndarray, rng: np.random.Generator, style: DomainStyle) -> None:
    """A passer-by cut by the image border: part of another person's clothes at one edge."""
    h, w = img.shape[:2]
    width = int(w * rng.uniform(0.12, 0.25))
    top = int(h * rng.uniform(0.1, 0.5))
    cols = slice(0, width) if rng.random() < 0.5 else slice(w - width, w)
    img[top:, cols] = _clothes_color(rng, style)


def render_image(person: Person, cam: Camera, style: DomainStyle, size: tuple[int, int],
                 rng: np.random.Generator, background: np.ndarray | None = None) -> np.ndarray:
    """One detection crop of ``person`` seen by ``cam``: uint8 ``(H, W, 3)``.

    ``background``: a float ``(H, W, 3)`` scene to paint over (modified) instead of ``cam``'s own.
    """
    img = _background(cam, size[0], size[1], rng) if background is None else background
    draw_person(img, person, cam, rng)
    if rng.random() < 0.15:
        _occluder(img, rng, style)
    return _finish(img, cam, rng)


def render_junk(person: Person, cam: Camera, size: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    """A bad detection (Market identity -1): background only, or a body part blown up and cut off."""
    img = _background(cam, size[0], size[1], rng)
    if rng.random() < 0.7:
        draw_person(img, person, cam, rng, scale=float(rng.uniform(1.8, 3.0)),
                    center=(float(rng.uniform(0.2, 0.8)), float(rng.uniform(1.0, 2.4))))
    return _finish(img, cam, rng)


# --------------------------------------------------------------------------- data set


def _file_name(pid: int, cam: int, frame: int) -> str:
    """Market-1501 name ``PPPP_cCsS_FFFFFF_II.jpg`` (junk keeps the literal ``-1``)."""
    prefix = "-1" if pid < 0 else f"{pid:04d}"
    return f"{prefix}_c{cam + 1}s1_{frame:06d}_01.jpg"


def generate_synthetic(
    out: str | os.PathLike,
    num_ids: int = 100,
    num_cams: int = 6,
    seed: int = 0,
    domain: str = "market",
    img_size: tuple[int, int] = (128, 64),
    images_per_cam: int = 2,
    num_train_ids: int | None = None,
    min_cams_per_id: int = 2,
    num_distractors: int = 20,
    num_junk: int = 10,
    jpeg_quality: int = 92,
    overwrite: bool = False,
) -> ReIDDataset:
    """Write a synthetic set in the Market-1501 layout under ``out`` and load it.

    Identities ``0001..num_ids``: the first ``num_train_ids`` (default half)
    go to ``bounding_box_train``, the rest are test identities with one query per
    camera they appear in and their other images in ``bounding_box_test``. Each
    identity appears in ``min_cams_per_id..num_cams`` cameras with
    ``images_per_cam`` images in each. The gallery also gets ``num_distractors``
    strangers (identity ``0000``) and ``num_junk`` bad detections (``-1_...``).

    Args:
        out: folder to create (``bounding_box_train``, ``bounding_box_test``, ``query``).
        domain: camera style family, one of :data:`DOMAINS`.
        img_size: ``(H, W)`` of the crops.
        overwrite: replace the three split folders if ``out`` already holds a set.

    Returns:
        The written set, loaded by :class:`~passreid.data.datasets.SyntheticMarket`.

    >>> ds = generate_synthetic("data/synth_a", num_ids=100, num_cams=6, seed=0)
    >>> ds.num_train_pids
    50
    """
    if domain not in DOMAINS:
        raise ConfigError(f"unknown synthetic domain {domain!r}; choose one of {', '.join(DOMAINS)}")
    num_train_ids = num_ids // 2 if num_train_ids is None else num_train_ids
    checks = [
        (seed >= 0, f"seed must be >= 0, got {seed}"),
        (num_cams >= 2, f"num_cams must be >= 2 (a query needs a match in another camera), got {num_cams}"),
        (2 <= min_cams_per_id <= num_cams,
         f"min_cams_per_id must be in [2, num_cams={num_cams}], got {min_cams_per_id}"),
        (images_per_cam >= 2, f"images_per_cam must be >= 2 (one query plus gallery images), got {images_per_cam}"),
        (0 < num_train_ids < num_ids,
         f"need train and test identities: num_train_ids={num_train_ids}, num_ids={num_ids}"),
        (num_ids <= 9999, f"num_ids must fit 4 digits, got {num_ids}"),
        (len(img_size) == 2 and min(img_size) >= 16, f"img_size must be (H, W) of at least 16 pixels, got {img_size}"),
        (num_distractors >= 0 and num_junk >= 0, "num_distractors and num_junk must be >= 0"),
    ]
    for ok, message in checks:
        if not ok:
            raise ConfigError(message)
    out = Path(out)
    folders = {s: out / s for s in ("bounding_box_train", "bounding_box_test", "query")}
    existing = [f for f in folders.values() if f.is_dir() and any(f.iterdir())]
    if existing and not overwrite:
        raise DatasetError(
            f"{out} already holds a data set ({existing[0]} is not empty); pass overwrite=True (--overwrite)"
        )
    for folder in folders.values():
        if folder.is_dir():
            shutil.rmtree(folder)
        folder.mkdir(parents=True)

    style = DOMAINS[domain]
    key = [seed, list(DOMAINS).index(domain)]
    size = (int(img_size[0]), int(img_size[1]))
    cameras = domain_cameras(key, style, num_cams)
    people = _unique_people(np.random.default_rng([*key, 0]), style, num_ids)
    frames = [0] * num_cams

    def save(image: np.ndarray, folder: str, pid: int, cam: int) -> None:
        frames[cam] += 1 + (pid * 7 + cam) % 13  # frame numbers increase along each camera's video
        Image.fromarray(image).save(folders[folder] / _file_name(pid, cam, frames[cam]), quality=jpeg_quality)

    for index, person in enumerate(people):
        pid = index + 1
        rng = np.random.default_rng([*key, 2, pid])
        num_seen = int(rng.integers(min_cams_per_id, num_cams + 1))
        for cam in sorted(rng.choice(num_cams, size=num_seen, replace=False).tolist()):
            for k in range(images_per_cam):
                image = render_image(person, cameras[cam], style, size, np.random.default_rng([*key, 3, pid, cam, k]))
                if pid <= num_train_ids:
                    save(image, "bounding_box_train", pid, cam)
                else:
                    save(image, "query" if k == 0 else "bounding_box_test", pid, cam)
    for j in range(num_distractors + num_junk):
        rng = np.random.default_rng([*key, 4, j])
        cam = int(rng.integers(num_cams))
        stranger = random_person(rng, style)
        if j < num_distractors:
            save(render_image(stranger, cameras[cam], style, size, rng), "bounding_box_test", 0, cam)
        else:
            save(render_junk(stranger, cameras[cam], size, rng), "bounding_box_test", -1, cam)
    dataset = SyntheticMarket(out)
    logger.info("wrote a synthetic %s-style set to %s: %d train, %d query, %d gallery images", domain, out,
                len(dataset.train), len(dataset.query), len(dataset.gallery))
    return dataset


def _unique_people(rng: np.random.Generator, style: DomainStyle, count: int) -> list[Person]:
    """``count`` identities whose discrete part choices all differ (see :meth:`Person.signature`)."""
    people: list[Person] = []
    seen: set[tuple] = set()
    while len(people) < count:
        person = random_person(rng, style)
        if person.signature() not in seen:
            seen.add(person.signature())
            people.append(person)
    return people


def cluttered_background(size: tuple[int, int], rng: np.random.Generator,
                         styles: Sequence[DomainStyle]) -> np.ndarray:
    """``(H, W, 3)`` float background made of 2-3 x 2-3 rectangles, each cut from another random scene."""
    h, w = size
    rows = np.sort(rng.uniform(0.15, 0.85, int(rng.integers(1, 3))))
    cols = np.sort(rng.uniform(0.2, 0.8, int(rng.integers(1, 3))))
    row_edges = [0, *(int(r * h) for r in rows), h]
    col_edges = [0, *(int(c * w) for c in cols), w]
    img = np.empty((h, w, 3), np.float32)
    for top, bottom in zip(row_edges[:-1], row_edges[1:]):
        for left, right in zip(col_edges[:-1], col_edges[1:]):
            scene = random_camera(rng, styles[int(rng.integers(len(styles)))])
            img[top:bottom, left:right] = _background(scene, h, w, rng)[top:bottom, left:right]
    return img


def generate_pool(
    out: str | os.PathLike,
    num_images: int = 4000,
    seed: int = 0,
    domains: Sequence[str] = tuple(DOMAINS),
    img_size: tuple[int, int] = (128, 64),
    images_per_person: int = 4,
    clutter: bool = True,
    jpeg_quality: int = 92,
    overwrite: bool = False,
    num_scenes: int = 0,
) -> list[Path]:
    """Write an unlabeled pretraining pool like LUPerson: a flat folder of person crops, each in its own scene.

    A labelled set (:func:`generate_synthetic`) films everyone with the same
    few cameras, so one background sits behind every image of a camera; self-
    distillation on such a set learns the six scenes rather than the people.
    LUPerson's crops come from thousands of videos, so here every image draws a
    new camera (background, light, colour cast, scale, facing) from a random
    domain style. Each person appears in ``images_per_person`` images, in
    different scenes, as a person walks past several street cameras.

    With ``clutter`` (default) the scene behind a person is a patchwork of
    several scenes (:func:`cluttered_background`), as street scenes are: a crop
    of one part of the image then shows another background than a crop of
    another part, and only the person is common to all crops of an image. With
    one scene per image, self-distillation can match any two crops of an image
    by their common background without looking at the person.

    Args:
        out: folder to create; images are ``PPPPPP_K.jpg`` (person, image), which
            no ReID loader parses as a label.
        domains: the style families the scenes are drawn from.
        num_scenes: with N > 0, N cameras are drawn once and every image is taken by one of them at
            random, as LUPerson's crops come from videos that each show many people: the camera (its
            background, light and cast) is then shared by about ``num_images / N`` images of different
            people and no longer tells one image from the others. 0: a new camera per image.

    Returns:
        The written paths, in order.
    """
    unknown = [d for d in domains if d not in DOMAINS]
    if unknown or not domains:
        raise ConfigError(f"unknown synthetic domain(s) {unknown or domains!r}; choose from {', '.join(DOMAINS)}")
    if num_images < 1 or images_per_person < 1 or seed < 0 or num_scenes < 0:
        raise ConfigError(f"generate_pool needs num_images >= 1, images_per_person >= 1, seed >= 0, num_scenes >= 0; "
                          f"got {num_images}, {images_per_person}, {seed}, {num_scenes}")
    out = Path(out)
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise DatasetError(f"{out} is not empty; pass overwrite=True (--overwrite)")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    size = (int(img_size[0]), int(img_size[1]))
    styles = [DOMAINS[d] for d in domains]
    paths: list[Path] = []
    scenes = []
    for s in range(num_scenes):
        scene_rng = np.random.default_rng([seed, 7, s])
        style = styles[int(scene_rng.integers(len(styles)))]
        scenes.append((style, random_camera(scene_rng, style)))
    num_people = -(-num_images // images_per_person)
    for person_index in range(num_people):
        rng = np.random.default_rng([seed, 6, person_index])
        person = random_person(rng, styles[int(rng.integers(len(styles)))])
        for k in range(min(images_per_person, num_images - len(paths))):
            if scenes:
                style, cam = scenes[int(rng.integers(len(scenes)))]
            else:
                style = styles[int(rng.integers(len(styles)))]
                cam = random_camera(rng, style)
            background = cluttered_background(size, rng, styles) if clutter else None
            path = out / f"{person_index:06d}_{k}.jpg"
            Image.fromarray(render_image(person, cam, style, size, rng, background)).save(path, quality=jpeg_quality)
            paths.append(path)
    logger.info("wrote an unlabeled pool of %d images (%d people, %s) to %s", len(paths), num_people,
                f"{num_scenes} scenes" if num_scenes else "a scene per image", out)
    return paths
