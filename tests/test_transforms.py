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


def _erased_box(out: torch.Tensor, image: torch.Tensor) -> tuple[int, int, int, int] | None:
    """(top, left, h, w) of the changed pixels, checked to be one full rectangle."""
    changed = (out != image).any(dim=0)
    if not changed.any():
        return None
    rows = changed.any(dim=1).nonzero().flatten()
    cols = changed.any(dim=0).nonzero().flatten()
    top, left = int(rows[0]), int(cols[0])
    h, w = int(rows[-1]) - top + 1, int(cols[-1]) - left + 1
    assert bool(changed[top : top + h, left : left + w].all())  # a filled rectangle, nothing else
    assert int(changed.sum()) == h * w
    return top, left, h, w


def test_cluster_erasing_fills_one_box_with_the_imagenet_mean_area_and_uniform_aspect() -> None:
    """Published cluster-contrast erasing on a 256x128 normalised image: fill (0.485, 0.456, 0.406) as it is,
    area 0.02-0.4 of the image, h/w uniform in [0.3, 3.33] (its mean ~1.8; a log-uniform draw would give ~1.3)."""
    from passreid.data.transforms import ConstantErasing

    torch.manual_seed(0)
    erase = ConstantErasing(p=1.0)
    image = torch.full((3, 256, 128), -2.0)  # a value the fill never takes
    aspects = []
    for _ in range(600):
        out = erase(image)
        box = _erased_box(out, image)
        assert box is not None
        top, left, h, w = box
        for c, value in enumerate((0.485, 0.456, 0.406)):
            assert torch.all(out[c, top : top + h, left : left + w] == value)
        # h and w are rounded from sqrt(A r), sqrt(A / r): area within the range up to that rounding
        assert 0.02 * 256 * 128 - (h + w) <= h * w <= 0.4 * 256 * 128 + (h + w) + 1
        assert h < 256 and w < 128
        aspects.append(h / w)
    aspects_t = torch.tensor(aspects)
    assert aspects_t.min() >= 0.3 * 0.8 and aspects_t.max() <= 3.34 * 1.25
    assert aspects_t.max() > 3.0 and aspects_t.min() < 0.4  # the whole range is used
    assert float(aspects_t.mean()) > 1.6  # uniform in [0.3, 3.33], tall boxes fit a 2:1 image
    assert torch.equal(image, torch.full((3, 256, 128), -2.0))  # input untouched


def test_cluster_erasing_happens_with_probability_p_and_the_recipes_pick_their_variant() -> None:
    from passreid.data.transforms import ConstantErasing

    torch.manual_seed(1)
    erase = ConstantErasing(p=0.5)
    image = torch.zeros(3, 64, 32)
    hits = sum(_erased_box(erase(image), image) is not None for _ in range(400))
    assert 160 < hits < 240
    constant = build_train_transform((32, 16), erasing="constant")
    noise = build_train_transform((32, 16))
    assert isinstance(constant.transforms[-1], ConstantErasing)
    assert isinstance(noise.transforms[-1], v2.RandomErasing)


def test_test_resize_is_bilinear_or_bicubic_as_asked() -> None:
    """Downsizing a sharp pattern: the two kernels give different pixels; each equals torchvision's own."""
    from PIL import Image

    from passreid.data.transforms import build_test_transform

    torch.manual_seed(0)
    pattern = torch.randint(0, 256, (3, 96, 48), dtype=torch.uint8)
    pil = Image.fromarray(pattern.permute(1, 2, 0).numpy())
    outs = {}
    for name, mode in (("bilinear", v2.InterpolationMode.BILINEAR), ("bicubic", v2.InterpolationMode.BICUBIC)):
        outs[name] = build_test_transform((32, 16), interpolation=name)(pil)
        reference = v2.functional.resize(v2.functional.pil_to_tensor(pil), [32, 16], interpolation=mode,
                                         antialias=True).float() / 255
        assert torch.allclose(outs[name], (reference - 0.5) / 0.5, atol=1e-6)
    assert not torch.allclose(outs["bilinear"], outs["bicubic"], atol=1e-2)
