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
from PIL import Image, ImageFilter
from torch import Tensor
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

from passreid.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from passreid.data.view_ops import PhotometricParams, photometric, resized_crops, to_device

BANDS: tuple[tuple[float, float], ...] = ((0.0, 0.5), (0.25, 0.75), (0.5, 1.0))
"""Rows (fractions of the height) of the top, middle and bottom band; band k-1 feeds part token k."""

NUM_GLOBAL = 2


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
