"""ReID image transforms (torchvision v2): the published training recipes, resize + normalise for test.

Fine-tuning (TransReID) and cluster contrast differ in two published details
(DESIGN §4, §5): the test resize (bilinear for fine-tuned models, bicubic for
cluster contrast; training always bicubic) and the random erasing (random
pixel values for fine-tuning, a constant fill for cluster contrast).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn
from torchvision.transforms import InterpolationMode
from torchvision.transforms import v2

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
HALF = (0.5, 0.5, 0.5)

INTERPOLATIONS = {"bilinear": InterpolationMode.BILINEAR, "bicubic": InterpolationMode.BICUBIC}
ERASING = ("noise", "constant")


def build_test_transform(
    img_size: Sequence[int], mean: Sequence[float] = HALF, std: Sequence[float] = HALF, *,
    interpolation: str = "bicubic",
) -> v2.Compose:
    """PIL image → normalised float tensor ``(3, H, W)``; ``interpolation`` is ``bilinear`` or ``bicubic``."""
    if interpolation not in INTERPOLATIONS:
        raise ValueError(f"interpolation must be one of {', '.join(INTERPOLATIONS)}; got {interpolation!r}")
    return v2.Compose([
        v2.ToImage(),
        v2.Resize(tuple(img_size), interpolation=INTERPOLATIONS[interpolation], antialias=True),
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(list(mean), list(std)),
    ])


class ConstantErasing(nn.Module):
    """The random erasing of the published cluster contrast: one rectangle set to a constant per channel.

    With probability ``p``, up to ``tries`` times: draw an area fraction uniform
    in ``area`` and an aspect ratio h/w uniform in ``[min_aspect, 1 / min_aspect]``
    (uniform, not log-uniform), ``h = round(sqrt(A r))``, ``w = round(sqrt(A / r))``;
    the first box with ``h < H`` and ``w < W`` is placed uniformly and filled with
    ``fill`` (written into the already-normalised tensor, as published: the
    ImageNet mean, whatever the pixel normalisation). No box fits: unchanged.

    Input and output: a (C, H, W) float tensor (the input is not modified).
    Random numbers come from torch's generator, which each loader worker seeds.
    """

    def __init__(self, p: float = 0.5, area: tuple[float, float] = (0.02, 0.4), min_aspect: float = 0.3,
                 fill: Sequence[float] = IMAGENET_MEAN, tries: int = 100) -> None:
        super().__init__()
        self.p = p
        self.area = area
        self.min_aspect = min_aspect
        self.fill = tuple(float(v) for v in fill)
        self.tries = tries

    @staticmethod
    def _uniform(lo: float, hi: float) -> float:
        return lo + (hi - lo) * float(torch.rand(()))

    def forward(self, img: Tensor) -> Tensor:
        if float(torch.rand(())) >= self.p:
            return img
        _, height, width = img.shape
        for _ in range(self.tries):
            target = self._uniform(*self.area) * height * width
            aspect = self._uniform(self.min_aspect, 1.0 / self.min_aspect)
            h = int(round(math.sqrt(target * aspect)))
            w = int(round(math.sqrt(target / aspect)))
            if h < height and w < width:
                top = int(torch.randint(0, height - h + 1, ()))
                left = int(torch.randint(0, width - w + 1, ()))
                out = img.clone()
                fill = torch.tensor(self.fill[: img.shape[0]], dtype=img.dtype).view(-1, 1, 1)
                out[:, top : top + h, left : left + w] = fill
                return out
        return img


def build_train_transform(
    img_size: Sequence[int],
    mean: Sequence[float] = HALF,
    std: Sequence[float] = HALF,
    *,
    flip_p: float = 0.5,
    padding: int = 10,
    erasing_p: float = 0.5,
    color_jitter: float = 0.0,
    erasing: str = "noise",
) -> v2.Compose:
    """DESIGN §4/§5 augmentation: bicubic resize, flip, pad + random crop, random erasing.

    ``erasing``: ``noise`` (fine-tuning: random pixel values, area 0.02-0.33,
    log-uniform aspect) or ``constant`` (cluster contrast: :class:`ConstantErasing`).

    ``color_jitter`` > 0 adds a colour jitter after the flip: brightness, contrast and
    saturation factors in ``[1 - s, 1 + s]``, hue shift in ``[-s / 6, s / 6]``.
    """
    steps: list[torch.nn.Module] = [
        v2.ToImage(),
        v2.Resize(tuple(img_size), interpolation=InterpolationMode.BICUBIC, antialias=True),
        v2.RandomHorizontalFlip(flip_p),
    ]
    if color_jitter > 0:
        steps.append(v2.ColorJitter(brightness=color_jitter, contrast=color_jitter, saturation=color_jitter,
                                    hue=color_jitter / 6))
    if padding > 0:
        steps += [v2.Pad(padding), v2.RandomCrop(tuple(img_size))]
    steps += [v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(mean), list(std))]
    if erasing not in ERASING:
        raise ValueError(f"erasing must be one of {', '.join(ERASING)}; got {erasing!r}")
    if erasing_p > 0:
        steps.append(v2.RandomErasing(p=erasing_p, value="random") if erasing == "noise"
                     else ConstantErasing(p=erasing_p))
    return v2.Compose(steps)
