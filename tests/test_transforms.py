"""The training augmentation of fine-tuning and cluster contrast (DESIGN §4), colour jitter included."""

from __future__ import annotations

import torch
from torchvision.transforms import v2

from passreid.data.transforms import build_train_transform


def _grey(value: int = 128) -> torch.Tensor:
    return torch.full((3, 32, 16), value, dtype=torch.uint8)


def test_without_random_steps_the_transform_only_normalises() -> None:
    transform = build_train_transform((32, 16), flip_p=0.0, padding=0, erasing_p=0.0)
    image = torch.randint(0, 256, (3, 32, 16), dtype=torch.uint8)
    assert torch.allclose(transform(image), (image.float() / 255 - 0.5) / 0.5, atol=1e-6)
    assert not any(isinstance(t, v2.ColorJitter) for t in transform.transforms)


def test_color_jitter_scales_brightness_within_its_range() -> None:
    """On a grey image contrast, saturation and hue change nothing, so each output is
    grey at 128 * b with b uniform in [1 - s, 1 + s]."""
    torch.manual_seed(0)
    s = 0.3
    transform = build_train_transform((32, 16), flip_p=0.0, padding=0, erasing_p=0.0, color_jitter=s)
    jitter = next(t for t in transform.transforms if isinstance(t, v2.ColorJitter))
    assert jitter.brightness == (1 - s, 1 + s) and jitter.hue == (-s / 6, s / 6)
    levels = []
    for _ in range(300):
        out = transform(_grey())
        pixel = (out * 0.5 + 0.5) * 255
        assert torch.allclose(pixel, pixel[0, 0, 0].expand_as(pixel), atol=1.0)  # still flat grey
        levels.append(float(pixel.mean()) / 128)
    levels_t = torch.tensor(levels)
    assert levels_t.min() >= 1 - s - 0.01 and levels_t.max() <= 1 + s + 0.01
    assert levels_t.min() < 1 - 0.8 * s and levels_t.max() > 1 + 0.8 * s  # the whole range is used
    assert abs(float(levels_t.mean()) - 1.0) < 0.04


def test_color_jitter_changes_colours_of_a_coloured_image() -> None:
    torch.manual_seed(1)
    image = torch.zeros(3, 32, 16, dtype=torch.uint8)
    image[0], image[1], image[2] = 200, 60, 30  # a red-orange shirt
    transform = build_train_transform((32, 16), flip_p=0.0, padding=0, erasing_p=0.0, color_jitter=0.3)
    outs = torch.stack([transform(image)[:, 0, 0] for _ in range(50)])
    assert outs.std(dim=0).min() > 0.02  # every channel varies from draw to draw
