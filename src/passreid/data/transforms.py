"""ReID image transforms (torchvision v2): the TransReID recipe for training, resize + normalise for test."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torchvision.transforms import InterpolationMode
from torchvision.transforms import v2

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
HALF = (0.5, 0.5, 0.5)


def build_test_transform(
    img_size: Sequence[int], mean: Sequence[float] = HALF, std: Sequence[float] = HALF
) -> v2.Compose:
    """PIL image → normalised float tensor ``(3, H, W)``."""
    return v2.Compose([
        v2.ToImage(),
        v2.Resize(tuple(img_size), interpolation=InterpolationMode.BICUBIC, antialias=True),
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(list(mean), list(std)),
    ])


def build_train_transform(
    img_size: Sequence[int],
    mean: Sequence[float] = HALF,
    std: Sequence[float] = HALF,
    *,
    flip_p: float = 0.5,
    padding: int = 10,
    erasing_p: float = 0.5,
    color_jitter: float = 0.0,
) -> v2.Compose:
    """DESIGN §4 augmentation: resize, flip, pad + random crop, random erasing (random pixel values).

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
    if erasing_p > 0:
        steps.append(v2.RandomErasing(p=erasing_p, value="random"))
    return v2.Compose(steps)
