"""PASS multi-crop with part bands (DESIGN §3): a CPU and a batched (GPU) implementation.

Each image gives 2 global views (RandomResizedCrop of the whole image, scale
0.4-1) and 9 local views: the image is cut into three horizontal bands (rows
0-0.5H, 0.25-0.75H, 0.5-1H, full width) and 3 RandomResizedCrops (scale 0.1-0.8
*of the band*) are taken inside each band; the band index is the part index k
the student uses for that crop. Then flip, colour jitter, grayscale, Gaussian
blur and solarisation as DINO, and ImageNet normalisation.

Two implementations with the same views and the same crop-box sampler:

- :class:`CPUMultiCrop`: PIL + torchvision v2 per image in the DataLoader
  workers (the original recipe; CPU-bound at a few hundred images/s per core).
- :class:`BatchedMultiCrop`: the workers only decode and resize to a fixed size
  (uint8), and all views of a batch are made on the training device: crop and
  resize by one bicubic ``grid_sample`` per view size, photometric ops with
  per-sample random parameters. Random parameters are drawn on the CPU from the
  torch RNG, so a run is reproducible whatever the device.

Both return a :class:`MultiCropBatch` with the crop boxes, which tests use to
check the band geometry. ``banded=False`` gives plain DINO local crops (from
the whole image) for the ablation.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.nn.functional as F
from PIL import Image, ImageFilter
from torch import Tensor
from torchvision.transforms import InterpolationMode
from torchvision.transforms import v2

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
        return replace(self, jitter_p=0.0, gray_p=0.0, global_blur_p=(0.0, 0.0), local_blur_p=0.0,
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
    height: int,
    width: int,
    scale: Sequence[float],
    ratio: Sequence[float],
    generator: torch.Generator | None = None,
    attempts: int = 10,
) -> Tensor:
    """``n`` RandomResizedCrop boxes in a ``height x width`` region, vectorised.

    The distribution of torchvision's ``RandomResizedCrop.get_params``: area
    uniform in ``scale`` times the region area, log aspect ratio uniform, up to
    ``attempts`` tries for a box that fits, else a centred crop clamped to
    ``ratio``; the position is uniform among the positions that fit.

    Returns:
        (n, 4) int64 ``(top, left, h, w)`` in region pixels.
    """
    area = height * width
    target = area * torch.empty(n, attempts).uniform_(scale[0], scale[1], generator=generator)
    log_ratio = torch.empty(n, attempts).uniform_(math.log(ratio[0]), math.log(ratio[1]), generator=generator)
    aspect = torch.exp(log_ratio)
    w = torch.round(torch.sqrt(target * aspect))
    h = torch.round(torch.sqrt(target / aspect))
    fits = (w > 0) & (w <= width) & (h > 0) & (h <= height)
    first = torch.argmax(fits.int(), dim=1)  # index of the first attempt that fits (0 if none)
    w = w.gather(1, first[:, None]).squeeze(1)
    h = h.gather(1, first[:, None]).squeeze(1)
    found = fits.any(dim=1)

    # Fallback: the whole region, clamped to the ratio range (torchvision's rule).
    in_ratio = width / height
    if in_ratio < min(ratio):
        fb_w, fb_h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        fb_h, fb_w = height, int(round(height * max(ratio)))
    else:
        fb_w, fb_h = width, height
    w = torch.where(found, w, torch.full_like(w, fb_w))
    h = torch.where(found, h, torch.full_like(h, fb_h))

    u = torch.rand(n, 2, generator=generator)
    top = torch.floor(u[:, 0] * (height - h + 1))
    left = torch.floor(u[:, 1] * (width - w + 1))
    top = torch.where(found, top, torch.div(height - h, 2, rounding_mode="floor"))
    left = torch.where(found, left, torch.div(width - w, 2, rounding_mode="floor"))
    return torch.stack((top, left, h, w), dim=1).long()


def sample_view_boxes(
    spec: MultiCropSpec, batch: int, height: int, width: int, generator: torch.Generator | None = None
) -> Tensor:
    """Boxes of all views for ``batch`` images of ``height x width``: (2 + L, B, 4) int64 image pixels.

    Local boxes are sampled inside their band and shifted to image rows.
    """
    glob = sample_crop_boxes(NUM_GLOBAL * batch, height, width, spec.global_scale, spec.ratio, generator)
    boxes = [glob.view(NUM_GLOBAL, batch, 4)]
    if spec.banded:
        for band in BANDS:
            top, rows = band_rows(height, band)
            local = sample_crop_boxes(spec.local_per_band * batch, rows, width, spec.local_scale, spec.ratio,
                                      generator).view(spec.local_per_band, batch, 4)
            local[..., 0] += top
            boxes.append(local)
    else:
        boxes.append(sample_crop_boxes(spec.num_local * batch, height, width, spec.local_scale, spec.ratio,
                                       generator).view(spec.num_local, batch, 4))
    return torch.cat(boxes)


@dataclass
class PhotometricParams:
    """Per-view random photometric parameters, (N,) or (N, 4) tensors on the CPU.

    ``order`` is a permutation of the four jitter ops (0 brightness, 1 contrast,
    2 saturation, 3 hue) per view: torchvision applies them in random order.
    """

    jitter: Tensor
    factors: Tensor
    order: Tensor
    gray: Tensor
    blur: Tensor
    sigma: Tensor
    solarize: Tensor


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
    return PhotometricParams(jitter=u[:, 0] < spec.jitter_p, factors=factors, order=order, gray=u[:, 1] < spec.gray_p,
                             blur=u[:, 2] < blur_p, sigma=sigma, solarize=u[:, 3] < solarize_p)


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


def resized_crops(images: Tensor, boxes: Tensor, flips: Tensor, size: tuple[int, int]) -> Tensor:
    """Crop and resize every image to several views at once with one bicubic ``grid_sample``.

    Args:
        images: (B, C, H, W) float.
        boxes: (V, B, 4) ``(top, left, h, w)`` in pixels of ``images``, on their device.
        flips: (V, B) bool, mirror the view, on their device.
        size: (Ho, Wo) output size.

    Returns:
        (V, B, C, Ho, Wo), clamped to [0, 1]. Output pixel centres map to the
        box exactly as a crop followed by a resize (``align_corners=False``);
        pixels beyond the image border are replicated. No antialiasing: a
        downscaling crop (at most 1.6x with the published scales) is sampled, not averaged.
    """
    batch, channels, height, width = images.shape
    views = boxes.shape[0]
    out_h, out_w = size
    boxes = boxes.to(device=images.device, dtype=images.dtype)
    top, left, box_h, box_w = boxes.unbind(-1)  # (V, B)
    # Normalised input coordinate = a * normalised output coordinate + b, per axis.
    sign = 1.0 - 2.0 * flips.to(device=images.device, dtype=images.dtype)
    ax, bx = sign * box_w / width, (2 * left + box_w) / width - 1
    ay, by = box_h / height, (2 * top + box_h) / height - 1
    xs = (torch.arange(out_w, device=images.device, dtype=images.dtype) + 0.5) / out_w * 2 - 1
    ys = (torch.arange(out_h, device=images.device, dtype=images.dtype) + 0.5) / out_h * 2 - 1
    gx = ax[..., None, None] * xs[None, None, None, :] + bx[..., None, None]  # (V, B, 1, Wo)
    gy = ay[..., None, None] * ys[None, None, :, None] + by[..., None, None]  # (V, B, Ho, 1)
    grid = torch.stack(torch.broadcast_tensors(gx, gy), dim=-1)  # (V, B, Ho, Wo, 2)
    # Stack the views of one image along the grid height: one call, no copies of the sources.
    grid = grid.permute(1, 0, 2, 3, 4).reshape(batch, views * out_h, out_w, 2)
    out = F.grid_sample(images, grid, mode="bicubic", padding_mode="border", align_corners=False)
    out = out.view(batch, channels, views, out_h, out_w).permute(2, 0, 1, 3, 4)
    return out.clamp(0, 1)


def to_device(t: Tensor, device: torch.device) -> Tensor:
    """A CPU tensor on ``device`` without a synchronisation (pinned, non-blocking copy on CUDA).

    A plain copy from pageable memory makes the host wait for the GPU queue, which
    would stall every step at the augmentation.
    """
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def photometric(x: Tensor, params: PhotometricParams) -> Tensor:
    """Colour jitter (random op order), grayscale, blur and solarise (N, 3, H, W) in [0, 1] per image.

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
        boxes = sample_view_boxes(self.spec, 1, height, width)[:, 0]  # (V, 4)
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


class BatchedMultiCrop(MultiCrop):
    """All views of a batch of decoded uint8 images, on the device the images are on.

    The workers decode and resize every image to ``decode_size`` (uint8);
    :meth:`__call__` turns (B, 3, H, W) uint8 into a :class:`MultiCropBatch`.
    """

    def __init__(self, spec: MultiCropSpec, decode_size: tuple[int, int] = (256, 128)) -> None:
        super().__init__(spec)
        self.decode_size = tuple(decode_size)

    def __call__(self, images: Tensor, generator: torch.Generator | None = None) -> MultiCropBatch:
        """(B, 3, H, W) uint8 (any device) -> views on the same device."""
        if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"expected uint8 images (B, 3, H, W), got {images.dtype} {tuple(images.shape)}")
        spec = self.spec
        batch, _, height, width = images.shape
        device = images.device
        boxes = sample_view_boxes(spec, batch, height, width, generator)  # (V, B, 4) on the CPU
        flips = torch.rand(boxes.shape[:2], generator=generator) < spec.flip_p
        blur_p = torch.tensor([*spec.global_blur_p, *([spec.local_blur_p] * spec.num_local)])
        solarize_p = torch.tensor([*spec.global_solarize_p, *([0.0] * spec.num_local)])
        params = sample_photometric(spec, boxes.shape[0] * batch, blur_p.repeat_interleave(batch),
                                    solarize_p.repeat_interleave(batch), generator)

        source = images.float().div_(255)
        mean_std = to_device(torch.tensor([spec.mean, spec.std]), device).view(2, 1, 3, 1, 1)
        scale = torch.tensor([height, width, height, width], dtype=torch.float32)
        boxes_dev = to_device(boxes.float(), device)
        flips_dev = to_device(flips, device)
        out = []
        for views, size in ((slice(0, NUM_GLOBAL), spec.global_size), (slice(NUM_GLOBAL, None), spec.local_size)):
            crops = resized_crops(source, boxes_dev[views], flips_dev[views], size)  # (V', B, 3, h, w)
            flat = crops.flatten(0, 1)
            first = views.start * batch
            sub = _slice_params(params, first, first + flat.shape[0])
            flat = (photometric(flat, sub) - mean_std[0]) / mean_std[1]
            out.append(flat.view_as(crops))
        return MultiCropBatch(global_views=out[0], local_views=out[1], boxes=to_device(boxes.float() / scale, device),
                              flips=flips_dev)

    def image_transform(self) -> Callable[[Image.Image], Any]:
        return v2.Compose([
            v2.Resize(self.decode_size, interpolation=InterpolationMode.BICUBIC, antialias=True),
            v2.PILToTensor(),
        ])

    def collate(self, samples: list[tuple[Any, int, int, int]]) -> Tensor:
        return torch.stack([s[0] for s in samples])

    def views(self, batch: Tensor, device: torch.device, generator: torch.Generator | None = None) -> MultiCropBatch:
        return self(batch.to(device, non_blocking=True), generator)


def _slice_params(params: PhotometricParams, start: int, stop: int) -> PhotometricParams:
    return PhotometricParams(**{k: getattr(params, k)[start:stop] for k in params.__dataclass_fields__})


def build_multicrop(backend: str, spec: MultiCropSpec, decode_size: tuple[int, int] = (256, 128)) -> MultiCrop:
    """``"cpu"`` -> :class:`CPUMultiCrop`; ``"gpu"`` -> :class:`BatchedMultiCrop` (runs on the training device)."""
    if backend == "cpu":
        return CPUMultiCrop(spec)
    if backend == "gpu":
        return BatchedMultiCrop(spec, decode_size)
    raise ValueError(f"multi-crop backend must be 'cpu' or 'gpu', got {backend!r}")
