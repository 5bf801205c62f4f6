"""PASS multi-crop with part bands (DESIGN §3): a CPU and a batched (GPU) implementation.

Each image gives 2 global views (RandomResizedCrop of the whole image, scale
0.4-1) and 9 local views: the image is cut into three horizontal bands (rows
0-0.5H, 0.25-0.75H, 0.5-1H, full width) and 3 RandomResizedCrops (scale 0.1-0.8
*of the band*) are taken inside each band; the band index is the part index k
the student uses for that crop. Then flip, colour jitter, grayscale, Gaussian
blur and solarisation as DINO, and ImageNet normalisation.

Two implementations with the same views and the same crop-box sampler (boxes drawn in each image's
own pixels):

- :class:`CPUMultiCrop`: PIL + torchvision v2 per image in the DataLoader
  workers (the original recipe; CPU-bound at a few hundred images/s per core).
- :class:`BatchedMultiCrop`: the workers only decode each image at its own size
  (uint8, shrunk to fit a cap if larger), and all views of a batch are made on
  the training device: each view is cut from its own image in that image's
  pixels and resized with PIL's antialiased bicubic rule by two batched matrix
  products per view size; photometric ops with per-sample random parameters.
  Random parameters are drawn on the CPU from the torch RNG, so a run is
  reproducible whatever the device.

Both return a :class:`MultiCropBatch` with the crop boxes, which tests use to
check the band geometry. ``banded=False`` gives plain DINO local crops (from
the whole image) for the ablation.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageFilter
from torch import Tensor
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

from passreid.data.transforms import IMAGENET_MEAN, IMAGENET_STD

BANDS: tuple[tuple[float, float], ...] = ((0.0, 0.5), (0.25, 0.75), (0.5, 1.0))
"""Rows (fractions of the height) of the top, middle and bottom band; band k-1 feeds part token k."""

NUM_GLOBAL = 2
SOLARIZE_THRESHOLD = 128 / 255
_GRAY_WEIGHTS = (0.2989, 0.587, 0.114)  # ITU-R 601-2 luma, as PIL and torchvision


@dataclass(frozen=True)
class MultiCropSpec:
    """What views to make; defaults are the published PASS recipe.

    Attributes:
        global_size, local_size: (H, W) of the global and local views.
        global_scale: RandomResizedCrop area range of the global views (of the image).
        local_scale: area range of the local views, of the band (or of the image if not banded).
        ratio: aspect-ratio range (w / h) of the crops.
        local_per_band: local crops per band (3); the total is ``3 * local_per_band``.
        banded: PASS bands; False gives DINO local crops from the whole image.
        flip_p: horizontal flip probability.
        jitter: colour jitter strengths (brightness, contrast, saturation, hue).
        jitter_p, gray_p: probabilities of colour jitter and of grayscale.
        cast: colour-cast jitter: after the colour jitter, every view's R, G and B are multiplied by
            their own factor drawn from [1 - cast, 1 + cast] (0: off, as published). It makes the crops
            of one image disagree on the camera's colour cast, which is otherwise a shortcut for
            matching them, without rotating hues the way the hue jitter does.
        global_blur_p: blur probability of global view 1 and 2; local_blur_p of the locals.
        global_solarize_p: solarisation probability of global view 1 and 2.
        blur_sigma: range of the Gaussian blur standard deviation, in output pixels.
        mean, std: normalisation.
    """

    global_size: tuple[int, int] = (256, 128)
    local_size: tuple[int, int] = (128, 64)
    global_scale: tuple[float, float] = (0.4, 1.0)
    local_scale: tuple[float, float] = (0.1, 0.8)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    local_per_band: int = 3
    banded: bool = True
    flip_p: float = 0.5
    jitter: tuple[float, float, float, float] = (0.4, 0.4, 0.2, 0.1)
    jitter_p: float = 0.8
    gray_p: float = 0.2
    cast: float = 0.0
    global_blur_p: tuple[float, float] = (1.0, 0.1)
    local_blur_p: float = 0.5
    global_solarize_p: tuple[float, float] = (0.0, 0.2)
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD

    @property
    def num_local(self) -> int:
        return len(BANDS) * self.local_per_band

    @property
    def num_views(self) -> int:
        return NUM_GLOBAL + self.num_local

    def geometric_only(self) -> MultiCropSpec:
        """The same crops with every photometric step switched off (for tests and pictures)."""
        return replace(self, jitter_p=0.0, gray_p=0.0, cast=0.0, global_blur_p=(0.0, 0.0), local_blur_p=0.0,
                       global_solarize_p=(0.0, 0.0))


@dataclass
class MultiCropBatch:
    """All views of a batch, view-major.

    Attributes:
        global_views: (2, B, 3, Hg, Wg) float, normalised.
        local_views: (L, B, 3, Hl, Wl) float, normalised; band-major when banded
            (views ``k*n .. k*n+n-1`` come from band k, ``n = local_per_band``).
        boxes: (2 + L, B, 4) crop boxes ``(top, left, height, width)`` as
            fractions of the source image, before any flip.
        flips: (2 + L, B) bool, True where the view was mirrored.
    """

    global_views: Tensor
    local_views: Tensor
    boxes: Tensor
    flips: Tensor

    @property
    def batch_size(self) -> int:
        return self.global_views.shape[1]

    def to(self, device: torch.device | str, non_blocking: bool = False) -> MultiCropBatch:
        return MultiCropBatch(*(t.to(device, non_blocking=non_blocking) for t in self._tensors()))

    def pin_memory(self) -> MultiCropBatch:
        """Called by the DataLoader when ``pin_memory=True``."""
        return MultiCropBatch(*(t.pin_memory() for t in self._tensors()))

    def _tensors(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        return self.global_views, self.local_views, self.boxes, self.flips


# ----------------------------------------------------------------------------- crop geometry (shared)


def band_rows(height: int, band: tuple[float, float]) -> tuple[int, int]:
    """(top, rows) of a band in an image of ``height`` rows, rounded down as the published code."""
    return int(band[0] * height), int((band[1] - band[0]) * height)


def sample_crop_boxes(
    n: int,
    height: int | Tensor,
    width: int | Tensor,
    scale: Sequence[float],
    ratio: Sequence[float],
    generator: torch.Generator | None = None,
    attempts: int = 10,
) -> Tensor:
    """``n`` RandomResizedCrop boxes, each in its own ``height x width`` region, vectorised.

    The distribution of torchvision's ``RandomResizedCrop.get_params``: area
    uniform in ``scale`` times the region area, log aspect ratio uniform, up to
    ``attempts`` tries for a box that fits, else a centred crop clamped to
    ``ratio``; the position is uniform among the positions that fit. All of it
    happens in the region's own pixels, so the aspect-ratio range and the
    fallback hold in the real image whatever its shape.

    Args:
        height, width: the region size, one int for all boxes or (n,) integer tensors.

    Returns:
        (n, 4) int64 ``(top, left, h, w)`` in region pixels.
    """
    height = torch.as_tensor(height, dtype=torch.float64).expand(n)
    width = torch.as_tensor(width, dtype=torch.float64).expand(n)
    region_h, region_w = height[:, None].float(), width[:, None].float()
    target = region_h * region_w * torch.empty(n, attempts).uniform_(scale[0], scale[1], generator=generator)
    log_ratio = torch.empty(n, attempts).uniform_(math.log(ratio[0]), math.log(ratio[1]), generator=generator)
    aspect = torch.exp(log_ratio)
    w = torch.round(torch.sqrt(target * aspect))
    h = torch.round(torch.sqrt(target / aspect))
    fits = (w > 0) & (w <= region_w) & (h > 0) & (h <= region_h)
    first = torch.argmax(fits.int(), dim=1)  # index of the first attempt that fits (0 if none)
    w = w.gather(1, first[:, None]).squeeze(1).double()
    h = h.gather(1, first[:, None]).squeeze(1).double()
    found = fits.any(dim=1)

    # Fallback: the whole region, clamped to the ratio range (torchvision's rule, in float64 as its Python).
    in_ratio = width / height
    too_tall, too_wide = in_ratio < min(ratio), in_ratio > max(ratio)
    fb_w = torch.where(too_wide, torch.round(height * max(ratio)), width)
    fb_h = torch.where(too_tall, torch.round(width / min(ratio)), height)
    w = torch.where(found, w, fb_w)
    h = torch.where(found, h, fb_h)

    u = torch.rand(n, 2, generator=generator, dtype=torch.float64)
    top = torch.where(found, torch.floor(u[:, 0] * (height - h + 1)), torch.floor((height - h) / 2))
    left = torch.where(found, torch.floor(u[:, 1] * (width - w + 1)), torch.floor((width - w) / 2))
    return torch.stack((top, left, h, w), dim=1).long()


def sample_view_boxes(spec: MultiCropSpec, sizes: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """Boxes of all views of B images, each in its own pixels.

    Args:
        sizes: (B, 2) integer ``(H, W)`` of each image.

    Returns:
        (2 + L, B, 4) int64 ``(top, left, h, w)`` in pixels of each image; local
        boxes are sampled inside their band and shifted to image rows.
    """
    batch = sizes.shape[0]
    heights, widths = sizes[:, 0].double(), sizes[:, 1].double()
    glob = sample_crop_boxes(NUM_GLOBAL * batch, heights.repeat(NUM_GLOBAL), widths.repeat(NUM_GLOBAL),
                             spec.global_scale, spec.ratio, generator)
    boxes = [glob.view(NUM_GLOBAL, batch, 4)]
    if spec.banded:
        for low, high in BANDS:
            top, rows = torch.floor(heights * low).long(), torch.floor(heights * (high - low))  # as band_rows
            local = sample_crop_boxes(spec.local_per_band * batch, rows.repeat(spec.local_per_band),
                                      widths.repeat(spec.local_per_band), spec.local_scale, spec.ratio,
                                      generator).view(spec.local_per_band, batch, 4)
            local[..., 0] += top
            boxes.append(local)
    else:
        boxes.append(sample_crop_boxes(spec.num_local * batch, heights.repeat(spec.num_local),
                                       widths.repeat(spec.num_local), spec.local_scale, spec.ratio,
                                       generator).view(spec.num_local, batch, 4))
    return torch.cat(boxes)


@dataclass
class PhotometricParams:
    """Per-view random photometric parameters, (N,) or (N, 4) tensors on the CPU.

    ``order`` is a permutation of the four jitter ops (0 brightness, 1 contrast,
    2 saturation, 3 hue) per view: torchvision applies them in random order.
    ``cast`` (N, 3) per-channel gains, or None when the spec has no colour-cast jitter.
    """

    jitter: Tensor
    factors: Tensor
    order: Tensor
    gray: Tensor
    blur: Tensor
    sigma: Tensor
    solarize: Tensor
    cast: Tensor | None = None


def sample_photometric(
    spec: MultiCropSpec, n: int, blur_p: Tensor, solarize_p: Tensor, generator: torch.Generator | None = None
) -> PhotometricParams:
    """Parameters for ``n`` views; ``blur_p`` and ``solarize_p`` are (n,) per-view probabilities."""
    b, c, s, h = spec.jitter
    low = torch.tensor([1 - b, 1 - c, 1 - s, -h])
    high = torch.tensor([1 + b, 1 + c, 1 + s, h])
    factors = low + (high - low) * torch.rand(n, 4, generator=generator)
    order = torch.argsort(torch.rand(n, 4, generator=generator), dim=1)
    u = torch.rand(n, 4, generator=generator)
    sigma = torch.empty(n).uniform_(spec.blur_sigma[0], spec.blur_sigma[1], generator=generator)
    # Drawn last and only when asked for, so that recipes without it keep their random stream.
    cast = 1 - spec.cast + 2 * spec.cast * torch.rand(n, 3, generator=generator) if spec.cast > 0 else None
    return PhotometricParams(jitter=u[:, 0] < spec.jitter_p, factors=factors, order=order, gray=u[:, 1] < spec.gray_p,
                             blur=u[:, 2] < blur_p, sigma=sigma, solarize=u[:, 3] < solarize_p, cast=cast)


# ----------------------------------------------------------------------------- batched tensor ops


def rgb_to_gray(x: Tensor) -> Tensor:
    """(N, 3, H, W) -> (N, 1, H, W) luma."""
    r, g, b = x.unbind(1)
    return (_GRAY_WEIGHTS[0] * r + _GRAY_WEIGHTS[1] * g + _GRAY_WEIGHTS[2] * b).unsqueeze(1)


def _blend(x: Tensor, other: Tensor, factor: Tensor) -> Tensor:
    f = factor.view(-1, 1, 1, 1)
    return (f * x + (1 - f) * other).clamp_(0, 1)


def adjust_brightness(x: Tensor, factor: Tensor) -> Tensor:
    """Scale (N, 3, H, W) in [0, 1] by per-image ``factor`` (N,)."""
    return _blend(x, torch.zeros_like(x), factor)


def adjust_contrast(x: Tensor, factor: Tensor) -> Tensor:
    """Blend with the per-image mean luma, as torchvision."""
    return _blend(x, rgb_to_gray(x).mean(dim=(1, 2, 3), keepdim=True), factor)


def adjust_saturation(x: Tensor, factor: Tensor) -> Tensor:
    """Blend with the grayscale image."""
    return _blend(x, rgb_to_gray(x), factor)


def adjust_hue(x: Tensor, factor: Tensor) -> Tensor:
    """Rotate the hue of (N, 3, H, W) in [0, 1] by per-image ``factor`` (N,) in [-0.5, 0.5] turns."""
    r, g, b = x.unbind(1)
    maxc, _ = x.max(dim=1)
    minc, _ = x.min(dim=1)
    chroma = maxc - minc
    sat = chroma / torch.where(maxc == 0, torch.ones_like(maxc), maxc)
    safe = torch.where(chroma == 0, torch.ones_like(chroma), chroma)
    rc, gc, bc = (maxc - r) / safe, (maxc - g) / safe, (maxc - b) / safe
    is_r = maxc == r
    is_g = (maxc == g) & ~is_r
    hue = torch.where(is_r, bc - gc, torch.where(is_g, 2.0 + rc - bc, 4.0 + gc - rc))
    hue = torch.remainder(hue / 6.0 + factor.view(-1, 1, 1), 1.0)

    # HSV -> RGB in closed form: channel n in (5, 3, 1) is v - v*s*clamp(min(k, 4 - k), 0, 1),
    # k = (n + 6h) mod 6.
    h6 = (hue * 6.0).unsqueeze(1)
    n_offsets = torch.arange(5, 0, -2, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)  # 5, 3, 1
    k = torch.remainder(n_offsets + h6, 6.0)
    weight = torch.minimum(k, 4.0 - k).clamp_(0.0, 1.0)
    v = maxc.unsqueeze(1)
    return v - v * sat.unsqueeze(1) * weight


_JITTER_OPS: tuple[Callable[[Tensor, Tensor], Tensor], ...] = (
    adjust_brightness, adjust_contrast, adjust_saturation, adjust_hue,
)


def gaussian_blur(x: Tensor, sigma: Tensor, max_sigma: float) -> Tensor:
    """Separable Gaussian blur of (N, C, H, W) with per-image ``sigma`` (N,) on the same device;
    sigma <= 0 leaves the image.

    Kernels are 2 * ceil(3 * max_sigma) + 1 taps; edges are replicated (as PIL).
    """
    n, c, height, width = x.shape
    radius = max(1, math.ceil(3 * max_sigma))
    taps = torch.arange(-radius, radius + 1, device=x.device, dtype=x.dtype)
    sig = sigma.to(dtype=x.dtype).clamp_min(1e-6)[:, None]
    kernel = torch.exp(-0.5 * (taps[None, :] / sig) ** 2)
    kernel = kernel / kernel.sum(dim=1, keepdim=True)
    delta = (taps == 0).to(x.dtype).expand(n, -1)
    kernel = torch.where((sigma > 0)[:, None], kernel, delta)
    kernel = kernel.repeat_interleave(c, dim=0)  # (N*C, taps)
    # One grouped convolution per direction over all N*C channels.
    y = F.pad(x.reshape(1, n * c, height, width), (radius, radius, radius, radius), mode="replicate")
    y = F.conv2d(y, kernel[:, None, :, None], groups=n * c)
    y = F.conv2d(y, kernel[:, None, None, :], groups=n * c)
    return y.reshape(n, c, height, width)


def bicubic_kernel(x: Tensor) -> Tensor:
    """Keys' cubic convolution kernel with a = -0.5 (PIL's and torch's antialiased bicubic), support [-2, 2]."""
    x = x.abs()
    near = (1.5 * x - 2.5) * x * x + 1
    far = -0.5 * (((x - 5) * x + 8) * x - 4)
    return torch.where(x < 1, near, torch.where(x < 2, far, torch.zeros_like(x)))


def resample_weights(start: Tensor, length: Tensor, extent: Tensor, out_size: int, padded: int) -> Tensor:
    """Antialiased bicubic resampling of a span of one image axis, as dense matrices (PIL's rule).

    Output pixel ``j`` is centred at ``start + (j + 0.5) * length / out_size``;
    when shrinking, the kernel is stretched by the scale, so every input pixel
    is averaged in (antialiasing). As PIL's ``resize(box=...)``, pixels just
    outside the span but inside the image contribute at the span's edges;
    pixels at or beyond ``extent`` (padding) never do. Weights are normalised.

    Args:
        start, length: (N,) float, the span in pixels.
        extent: (N,) float, the image's size on this axis.
        out_size: output pixels.
        padded: the axis length of the padded source.

    Returns:
        (N, out_size, padded) float: output = weights @ source along the axis.
    """
    n, device, dtype = start.shape[0], start.device, start.dtype
    scale = length / out_size
    stretch = scale.clamp_min(1.0)[:, None, None]  # > 1 only when shrinking
    centre = start[:, None] + (torch.arange(out_size, device=device, dtype=dtype) + 0.5) * scale[:, None]
    # Enough taps for the widest kernel any span of the padded axis needs (a bound from shapes: no sync).
    taps = 2 * math.ceil(2.0 * max(padded / out_size, 1.0)) + 1
    first = torch.floor(centre - 2.0 * stretch[..., 0] + 0.5).clamp_min_(0)
    index = first[..., None] + torch.arange(taps, device=device, dtype=dtype)  # (N, out, taps)
    weights = bicubic_kernel((index + 0.5 - centre[..., None]) / stretch)
    weights = weights * (index < extent[:, None, None])
    weights = weights / weights.sum(dim=-1, keepdim=True).clamp_min(1e-12)
    dense = torch.zeros(n, out_size, padded, device=device, dtype=dtype)
    return dense.scatter_add_(2, index.long().clamp_max_(padded - 1), weights)


def resized_crops(images: Tensor, sizes: Tensor, boxes: Tensor, flips: Tensor, size: tuple[int, int]) -> Tensor:
    """Crop and resize each image of a padded batch to several views, antialiased, in two batched products.

    Every view is PIL's ``resize(size, BICUBIC, box)`` of its own image:
    separable antialiased bicubic weights (:func:`resample_weights`), columns
    first, in float (PIL rounds an 8-bit intermediate: views differ from PIL's
    by under 1/255 on average, a few 1/255 at sharp edges where bicubic rings).
    The horizontal pass of all views of an image is one matrix product, the
    vertical pass of all views one batched product: a few kernels per call
    whatever the batch size. Work and scratch memory grow with the padded
    size (about ``B * 3 * Hp * V * Wo`` floats of scratch).

    Args:
        images: (B, C, Hp, Wp) float in [0, 1]; image b fills ``[:, :H_b, :W_b]``.
        sizes: (B, 2) ``(H_b, W_b)``, on the images' device.
        boxes: (V, B, 4) ``(top, left, h, w)`` in pixels of each image, on the images' device.
        flips: (V, B) bool, mirror the view, on the images' device.
        size: (Ho, Wo) output size.

    Returns:
        (V, B, C, Ho, Wo) in [0, 1].
    """
    batch, channels, pad_h, pad_w = images.shape
    views = boxes.shape[0]
    out_h, out_w = size
    top, left, box_h, box_w = boxes.to(images.dtype).flatten(0, 1).unbind(-1)  # (V*B,), view-major
    heights, widths = sizes.to(images.dtype).repeat(views, 1).unbind(-1)
    cols = resample_weights(left, box_w, widths, out_w, pad_w)  # (V*B, Wo, Wp)
    cols = torch.where(flips.reshape(-1, 1, 1), cols.flip(1), cols)
    rows = resample_weights(top, box_h, heights, out_h, pad_h)  # (V*B, Ho, Hp)
    cols = cols.view(views, batch, out_w, pad_w).permute(1, 3, 0, 2).reshape(batch, pad_w, views * out_w)
    across = torch.bmm(images.reshape(batch, channels * pad_h, pad_w), cols)  # (B, C*Hp, V*Wo)
    across = across.view(batch, channels, pad_h, views, out_w).permute(3, 0, 2, 1, 4)
    out = torch.bmm(rows, across.reshape(views * batch, pad_h, channels * out_w))  # (V*B, Ho, C*Wo)
    return out.view(views, batch, out_h, channels, out_w).permute(0, 1, 3, 2, 4).clamp(0, 1).contiguous()


def to_device(t: Tensor, device: torch.device) -> Tensor:
    """A CPU tensor on ``device`` without a synchronisation (pinned, non-blocking copy on CUDA).

    A plain copy from pageable memory makes the host wait for the GPU queue, which
    would stall every step at the augmentation.
    """
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def photometric(x: Tensor, params: PhotometricParams) -> Tensor:
    """Colour jitter (random op order), colour cast, grayscale, blur and solarise (N, 3, H, W) in [0, 1] per image.

    ``params`` live on the CPU; the groups of images each op applies to are
    computed there and sent in three copies, so nothing waits for the device.
    """
    device, n = x.device, x.shape[0]
    num_ops = len(_JITTER_OPS)
    # Per slot, image indices sorted by the op they get there (num_ops = no jitter): contiguous groups.
    op_ids = torch.where(params.jitter[:, None], params.order, num_ops)  # (N, 4)
    sorted_idx = torch.argsort(op_ids, dim=0, stable=True).T.contiguous()  # (4, N)
    counts = torch.stack([torch.bincount(op_ids[:, slot], minlength=num_ops + 1) for slot in range(4)]).tolist()
    sorted_dev = to_device(sorted_idx, device)
    factors = to_device(params.factors.to(x.dtype), device)
    sigma = torch.where(params.blur, params.sigma, torch.zeros_like(params.sigma))
    masks = to_device(torch.stack((params.gray.to(x.dtype), params.solarize.to(x.dtype), sigma.to(x.dtype)), 1),
                      device)
    x = x.clone()
    for slot in range(4):
        start = 0
        for op, fn in enumerate(_JITTER_OPS):
            count = counts[slot][op]
            if count:
                idx = sorted_dev[slot, start:start + count]
                x[idx] = fn(x[idx], factors[idx, op])
            start += count
    if params.cast is not None:
        x = (x * to_device(params.cast.to(x.dtype), device).view(n, 3, 1, 1)).clamp_(0.0, 1.0)
    gray = masks[:, 0].view(n, 1, 1, 1) > 0
    x = torch.where(gray, rgb_to_gray(x).expand_as(x), x)
    if bool(params.blur.any()):
        x = gaussian_blur(x, masks[:, 2], max_sigma=float(params.sigma.max()))
    solar = masks[:, 1].view(n, 1, 1, 1) > 0
    return torch.where(solar & (x >= SOLARIZE_THRESHOLD), 1.0 - x, x)


# ----------------------------------------------------------------------------- the two implementations


class MultiCrop(ABC):
    """How the data pipeline makes the views: what the loader workers do, how a batch is collated, and
    what happens on the training device. The training loop only calls these three."""

    def __init__(self, spec: MultiCropSpec) -> None:
        self.spec = spec

    @abstractmethod
    def image_transform(self) -> Callable[[Image.Image], Any]:
        """Applied to each RGB PIL image in a loader worker."""

    @abstractmethod
    def collate(self, samples: list[tuple[Any, int, int, int]]) -> Any:
        """Collate ``ImageDataset`` items ``(image, pid, camid, index)`` into a loader batch."""

    @abstractmethod
    def views(self, batch: Any, device: torch.device, generator: torch.Generator | None = None) -> MultiCropBatch:
        """A loader batch -> all views on ``device``."""


class CPUMultiCrop(MultiCrop):
    """PIL / torchvision v2 views of one image at a time, in the DataLoader workers.

    Calling it on a PIL image returns ``(views, boxes, flips)``: a list of
    ``2 + L`` float tensors (3, H, W), (2 + L, 4) box fractions and (2 + L,) flips.
    """

    def __init__(self, spec: MultiCropSpec) -> None:
        super().__init__(spec)
        jitter = v2.RandomApply([v2.ColorJitter(*spec.jitter)], p=spec.jitter_p)
        if spec.cast > 0:
            jitter = v2.Compose([jitter, _PILChannelGain(spec.cast)])
        gray = v2.RandomGrayscale(p=spec.gray_p)
        to_tensor = v2.Compose([
            v2.PILToTensor(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(spec.mean), list(spec.std)),
        ])
        self._global = [
            v2.Compose([jitter, gray, _PILGaussianBlur(spec.global_blur_p[i], spec.blur_sigma),
                        v2.RandomSolarize(threshold=128, p=spec.global_solarize_p[i]), to_tensor])
            for i in range(NUM_GLOBAL)
        ]
        self._local = v2.Compose([jitter, gray, _PILGaussianBlur(spec.local_blur_p, spec.blur_sigma), to_tensor])

    def __call__(self, image: Image.Image) -> tuple[list[Tensor], Tensor, Tensor]:
        width, height = image.size
        boxes = sample_view_boxes(self.spec, torch.tensor([[height, width]]))[:, 0]  # (V, 4)
        flips = torch.rand(len(boxes)) < self.spec.flip_p
        views = []
        for v, (box, flip) in enumerate(zip(boxes.tolist(), flips.tolist())):
            size = self.spec.global_size if v < NUM_GLOBAL else self.spec.local_size
            crop = crop_resize_pil(image, box, flip, size)
            views.append((self._global[v] if v < NUM_GLOBAL else self._local)(crop))
        scale = torch.tensor([height, width, height, width], dtype=torch.float32)
        return views, boxes.float() / scale, flips

    def image_transform(self) -> Callable[[Image.Image], Any]:
        return self

    def collate(self, samples: list[tuple[Any, int, int, int]]) -> MultiCropBatch:
        per_view = list(zip(*(s[0][0] for s in samples)))  # V tuples of B tensors
        return MultiCropBatch(
            global_views=torch.stack([torch.stack(v) for v in per_view[:NUM_GLOBAL]]),
            local_views=torch.stack([torch.stack(v) for v in per_view[NUM_GLOBAL:]]),
            boxes=torch.stack([s[0][1] for s in samples], dim=1),
            flips=torch.stack([s[0][2] for s in samples], dim=1),
        )

    def views(self, batch: MultiCropBatch, device: torch.device,
              generator: torch.Generator | None = None) -> MultiCropBatch:
        return batch.to(device, non_blocking=True)


def crop_resize_pil(image: Image.Image, box: Sequence[int], flip: bool, size: tuple[int, int]) -> Image.Image:
    """Crop ``box`` = (top, left, h, w) and resize to ``size`` (H, W) bicubically (antialiased), maybe mirrored."""
    top, left, h, w = box
    out = image.resize((size[1], size[0]), Image.Resampling.BICUBIC, box=(left, top, left + w, top + h))
    return out.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if flip else out


class _PILGaussianBlur:
    """DINO's blur: with probability ``p``, PIL Gaussian blur of radius (std) uniform in ``sigma``."""

    def __init__(self, p: float, sigma: tuple[float, float]) -> None:
        self.p = p
        self.sigma = sigma

    def __call__(self, image: Image.Image) -> Image.Image:
        if self.p <= 0 or torch.rand(()) >= self.p:
            return image
        radius = float(torch.empty(()).uniform_(*self.sigma))
        return image.filter(ImageFilter.GaussianBlur(radius=radius))


class _PILChannelGain:
    """Colour-cast jitter: R, G and B each multiplied by a factor uniform in [1 - amount, 1 + amount]."""

    def __init__(self, amount: float) -> None:
        self.amount = amount

    def __call__(self, image: Image.Image) -> Image.Image:
        gains = (1 - self.amount + 2 * self.amount * torch.rand(3)).numpy()
        pixels = np.asarray(image, dtype=np.float32) * gains
        return Image.fromarray(np.clip(np.rint(pixels), 0, 255).astype(np.uint8))


class DecodedBatch(NamedTuple):
    """A loader batch for :class:`BatchedMultiCrop`: uint8 images at their own sizes, padded into one tensor.

    Attributes:
        images: (B, 3, Hp, Wp) uint8; image b fills ``[:, :H_b, :W_b]``, zeros elsewhere.
        sizes: (B, 2) int64 ``(H_b, W_b)``, on the CPU (the crop boxes are drawn there).
    """

    images: Tensor
    sizes: Tensor


class DecodeImage:
    """Loader-worker transform of the batched backend: RGB PIL -> (3, H, W) uint8 at the image's own size.

    An image larger than ``max_size`` (H, W) on either side is first shrunk, keeping
    its aspect ratio, to fit inside it (PIL bicubic, antialiased): it bounds the
    padded batch and the resampling work. ``None`` keeps every image as it is.
    """

    def __init__(self, max_size: tuple[int, int] | None) -> None:
        self.max_size = max_size

    def __call__(self, image: Image.Image) -> Tensor:
        width, height = image.size
        if self.max_size is not None:
            shrink = min(self.max_size[0] / height, self.max_size[1] / width)
            if shrink < 1:
                size = (max(1, round(width * shrink)), max(1, round(height * shrink)))
                image = image.resize(size, Image.Resampling.BICUBIC)
        return TF.pil_to_tensor(image)


def pad_images(images: Sequence[Tensor], multiple: int = 8) -> DecodedBatch:
    """(3, H_b, W_b) uint8 tensors -> a :class:`DecodedBatch`, padded at the bottom and right to the largest
    height and width rounded up to ``multiple`` (fewer distinct shapes for the allocator and the kernels)."""
    sizes = torch.tensor([img.shape[1:] for img in images], dtype=torch.int64).view(-1, 2)
    pad_h, pad_w = (-(-int(v) // multiple) * multiple for v in sizes.max(dim=0).values)
    out = torch.zeros(len(images), 3, pad_h, pad_w, dtype=torch.uint8)
    for dst, img in zip(out, images):
        dst[:, : img.shape[1], : img.shape[2]] = img
    return DecodedBatch(out, sizes)


class BatchedMultiCrop(MultiCrop):
    """All views of a batch of decoded uint8 images, on the device the images are on.

    The workers only decode each image at its own size (shrunk to fit
    ``max_size`` if larger) and the collate pads them into a
    :class:`DecodedBatch`. Every view is then cut from its own image in that
    image's pixels and resized with antialiasing, as the CPU backend does with
    PIL (:func:`resized_crops`); photometric ops run batched with per-view
    random parameters. All random parameters are drawn on the CPU from the torch
    RNG in the order the CPU backend draws them (boxes, then flips), so a run is
    reproducible whatever the device, and one image with one seed gives the same
    boxes on both backends.
    """

    def __init__(self, spec: MultiCropSpec, max_size: tuple[int, int] | None = (512, 256)) -> None:
        super().__init__(spec)
        self.max_size = None if max_size is None else (int(max_size[0]), int(max_size[1]))

    def __call__(self, batch: DecodedBatch | Tensor, generator: torch.Generator | None = None) -> MultiCropBatch:
        """A :class:`DecodedBatch` (images on any device, sizes on the CPU), or (B, 3, H, W) uint8 images of one
        size, -> views on the images' device."""
        images = batch if isinstance(batch, Tensor) else batch.images
        if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"expected uint8 images (B, 3, H, W), got {images.dtype} {tuple(images.shape)}")
        same_size = torch.tensor([images.shape[2:]]).repeat(images.shape[0], 1)
        sizes = same_size if isinstance(batch, Tensor) else batch.sizes
        spec = self.spec
        batch_size, device = images.shape[0], images.device
        boxes = sample_view_boxes(spec, sizes, generator)  # (V, B, 4) on the CPU
        flips = torch.rand(boxes.shape[:2], generator=generator) < spec.flip_p
        blur_p = torch.tensor([*spec.global_blur_p, *([spec.local_blur_p] * spec.num_local)])
        solarize_p = torch.tensor([*spec.global_solarize_p, *([0.0] * spec.num_local)])
        params = sample_photometric(spec, boxes.shape[0] * batch_size, blur_p.repeat_interleave(batch_size),
                                    solarize_p.repeat_interleave(batch_size), generator)

        source = images.float().div_(255)
        mean_std = to_device(torch.tensor([spec.mean, spec.std]), device).view(2, 1, 3, 1, 1)
        boxes_dev = to_device(boxes.float(), device)
        flips_dev = to_device(flips, device)
        sizes_dev = to_device(sizes, device)
        out = []
        for views, size in ((slice(0, NUM_GLOBAL), spec.global_size), (slice(NUM_GLOBAL, None), spec.local_size)):
            crops = resized_crops(source, sizes_dev, boxes_dev[views], flips_dev[views], size)  # (V', B, 3, h, w)
            flat = crops.flatten(0, 1)
            first = views.start * batch_size
            sub = _slice_params(params, first, first + flat.shape[0])
            flat = (photometric(flat, sub) - mean_std[0]) / mean_std[1]
            out.append(flat.view_as(crops))
        scale = sizes.float().repeat(1, 2)  # (B, 4): H, W, H, W
        return MultiCropBatch(global_views=out[0], local_views=out[1], boxes=to_device(boxes.float() / scale, device),
                              flips=flips_dev)

    def image_transform(self) -> Callable[[Image.Image], Any]:
        return DecodeImage(self.max_size)

    def collate(self, samples: list[tuple[Any, int, int, int]]) -> DecodedBatch:
        return pad_images([s[0] for s in samples])

    def views(self, batch: DecodedBatch | Tensor, device: torch.device,
              generator: torch.Generator | None = None) -> MultiCropBatch:
        if isinstance(batch, Tensor):
            return self(batch.to(device, non_blocking=True), generator)
        return self(DecodedBatch(batch.images.to(device, non_blocking=True), batch.sizes), generator)


def _slice_params(params: PhotometricParams, start: int, stop: int) -> PhotometricParams:
    fields = {k: getattr(params, k) for k in params.__dataclass_fields__}
    return PhotometricParams(**{k: None if v is None else v[start:stop] for k, v in fields.items()})


def build_multicrop(backend: str, spec: MultiCropSpec, max_size: tuple[int, int] | None = (512, 256)) -> MultiCrop:
    """``"cpu"`` -> :class:`CPUMultiCrop`; ``"gpu"`` -> :class:`BatchedMultiCrop` (runs on the training device).

    ``max_size`` (H, W): the batched backend's workers shrink larger images to fit inside it (the CPU backend
    crops every image at its own size)."""
    if backend == "cpu":
        return CPUMultiCrop(spec)
    if backend == "gpu":
        return BatchedMultiCrop(spec, max_size)
    raise ValueError(f"multi-crop backend must be 'cpu' or 'gpu', got {backend!r}")
