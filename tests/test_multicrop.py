"""Multi-crop with part bands: geometry, counts and sizes, batched ops vs torchvision, CPU vs batched statistics."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms.v2 import functional as TF

from passreid.data.multicrop import (
    BANDS,
    BatchedMultiCrop,
    CPUMultiCrop,
    MultiCropSpec,
    adjust_brightness,
    adjust_contrast,
    adjust_hue,
    adjust_saturation,
    band_rows,
    build_multicrop,
    crop_resize_pil,
    gaussian_blur,
    photometric,
    resized_crops,
    sample_crop_boxes,
    sample_photometric,
    sample_view_boxes,
)

SPEC = MultiCropSpec(global_size=(64, 32), local_size=(32, 16))
H, W = 128, 64


def _smooth_image(seed: int = 0, size: tuple[int, int] = (H, W)) -> Image.Image:
    """A smooth colour image (so interpolation methods agree) with a bright top-left corner to see flips."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size[0], 0:size[1]].astype(np.float32)
    channels = []
    for c in range(3):
        fy, fx, phase = rng.uniform(0.5, 2.0), rng.uniform(0.5, 2.0), rng.uniform(0, 6.28)
        channels.append(0.5 + 0.4 * np.sin(fy * yy / size[0] * 6.28 + fx * xx / size[1] * 6.28 + phase))
    img = np.stack(channels, axis=-1)
    img[: size[0] // 8, : size[1] // 8] = 1.0
    return Image.fromarray((img * 255).round().astype(np.uint8))


# ----------------------------------------------------------------------------- geometry


def test_crop_boxes_fit_and_respect_scale_and_ratio() -> None:
    torch.manual_seed(0)
    boxes = sample_crop_boxes(2000, 100, 50, (0.1, 0.8), (3 / 4, 4 / 3))
    top, left, h, w = boxes.T
    assert (top >= 0).all() and (left >= 0).all() and (top + h <= 100).all() and (left + w <= 50).all()
    area = (h * w).float() / (100 * 50)
    assert area.min() >= 0.1 - 0.02 and area.max() <= 0.8 + 0.03  # rounding of h and w
    ratio = w.float() / h.float()
    assert ratio.min() >= 3 / 4 - 0.1 and ratio.max() <= 4 / 3 + 0.1
    # A region too thin for the ratio range falls back to a centred crop clamped to the ratio.
    fallback = sample_crop_boxes(5, 100, 10, (0.9, 1.0), (3 / 4, 4 / 3))
    assert fallback.tolist() == [[43, 0, 13, 10]] * 5


@pytest.mark.parametrize(("height", "width", "scale"), [(128, 64, (0.4, 1.0)), (64, 64, (0.1, 0.8))])
def test_crop_sampler_has_torchvisions_distribution(height: int, width: int, scale: tuple[float, float]) -> None:
    """Same law as RandomResizedCrop.get_params (which rejects boxes that do not fit a 2:1 person crop)."""
    from torchvision.transforms import RandomResizedCrop

    torch.manual_seed(12)
    n = 3000
    ours = sample_crop_boxes(n, height, width, scale, (3 / 4, 4 / 3)).float()
    image = torch.zeros(1, height, width)
    theirs = torch.tensor([RandomResizedCrop.get_params(image, list(scale), [3 / 4, 4 / 3]) for _ in range(n)]).float()
    for stats in (lambda b: b[:, 2] * b[:, 3] / (height * width), lambda b: b[:, 3] / b[:, 2],
                  lambda b: b[:, 0] / height, lambda b: b[:, 1] / width):
        assert abs(float(stats(ours).mean() - stats(theirs).mean())) < 0.02
        assert abs(float(stats(ours).std() - stats(theirs).std())) < 0.02


def test_band_rows_are_half_the_image_at_0_quarter_half() -> None:
    assert [band_rows(128, b) for b in BANDS] == [(0, 64), (32, 64), (64, 64)]
    assert [band_rows(130, b) for b in BANDS] == [(0, 65), (32, 65), (65, 65)]  # rounded down like the original


@pytest.mark.parametrize("backend", ["cpu", "gpu"])
def test_every_local_crop_of_band_k_lies_inside_band_k(backend: str) -> None:
    torch.manual_seed(1)
    multicrop = build_multicrop(backend, SPEC, decode_size=(H, W))
    images = [_smooth_image(i) for i in range(12)]
    batch = multicrop.collate([(multicrop.image_transform()(img), -1, -1, i) for i, img in enumerate(images)])
    views = multicrop.views(batch, torch.device("cpu"))
    boxes = views.boxes  # (11, B, 4) fractions: top, left, height, width
    assert boxes.shape == (11, 12, 4)
    for k, (low, high) in enumerate(BANDS):
        band = boxes[2 + 3 * k: 5 + 3 * k]
        assert (band[..., 0] >= low).all() and (band[..., 0] + band[..., 2] <= high + 1e-6).all()
        # scale 0.1-0.8 of the band's area (half the image), up to rounding
        area = band[..., 2] * band[..., 3] / (high - low)
        assert area.min() >= 0.1 - 0.03 and area.max() <= 0.8 + 0.03
    glob = boxes[:2]
    assert (glob[..., 2] * glob[..., 3]).min() >= 0.4 - 0.03


@pytest.mark.parametrize("backend", ["cpu", "gpu"])
def test_view_counts_and_sizes(backend: str) -> None:
    torch.manual_seed(2)
    multicrop = build_multicrop(backend, SPEC, decode_size=(H, W))
    samples = [(multicrop.image_transform()(_smooth_image(i)), -1, -1, i) for i in range(3)]
    views = multicrop.views(multicrop.collate(samples), torch.device("cpu"))
    assert views.global_views.shape == (2, 3, 3, 64, 32)
    assert views.local_views.shape == (9, 3, 3, 32, 16)
    assert views.flips.shape == (11, 3) and views.flips.dtype == torch.bool
    assert views.batch_size == 3


def test_plain_dino_local_crops_come_from_the_whole_image() -> None:
    torch.manual_seed(3)
    spec = MultiCropSpec(global_size=(64, 32), local_size=(32, 16), local_scale=(0.05, 0.4), banded=False)
    boxes = sample_view_boxes(spec, 400, H, W).float()
    local = boxes[2:]
    assert local.shape == (9, 400, 4)
    # Unbanded crops reach rows of every band, including crops spanning the middle of the image.
    assert local[..., 0].min() < 5 and (local[..., 0] + local[..., 2]).max() > H - 5
    assert ((local[..., 0] < H / 2 - 10) & (local[..., 0] + local[..., 2] > H / 2 + 10)).any()


def test_batched_crop_matches_pil_crop_and_resize() -> None:
    """Same boxes and flips: the grid_sample views equal PIL crop + bicubic resize (upscaling crops)."""
    image = _smooth_image(4)
    source = TF.pil_to_tensor(image).float()[None] / 255
    boxes = torch.tensor([[[10, 4, 40, 20]], [[60, 30, 50, 30]], [[0, 0, 128, 64]]])  # (V=3, B=1, 4)
    flips = torch.tensor([[False], [True], [False]])
    batched = resized_crops(source, boxes, flips, (64, 32))
    for v in range(3):
        pil = TF.pil_to_tensor(crop_resize_pil(image, boxes[v, 0].tolist(), bool(flips[v, 0]), (64, 32))).float() / 255
        diff = (batched[v, 0] - pil).abs()
        # The mean error is resampling noise; a wrong box, axis or flip gives errors of ~0.2.
        assert diff.mean() < 0.02, (v, float(diff.mean()))
    # The flipped view is the mirror of the unflipped one.
    mirrored = resized_crops(source, boxes[1:2], torch.tensor([[False]]), (64, 32)).flip(-1)
    torch.testing.assert_close(batched[1], mirrored[0], rtol=0, atol=1e-5)


# ----------------------------------------------------------------------------- photometric ops


def test_batched_jitter_ops_equal_torchvision_per_image() -> None:
    x = torch.rand(4, 3, 16, 8, generator=torch.Generator().manual_seed(5))
    factors = torch.tensor([0.6, 0.9, 1.2, 1.4])
    hues = torch.tensor([-0.1, -0.03, 0.05, 0.1])
    for ours, theirs, f in ((adjust_brightness, TF.adjust_brightness, factors),
                            (adjust_contrast, TF.adjust_contrast, factors),
                            (adjust_saturation, TF.adjust_saturation, factors),
                            (adjust_hue, TF.adjust_hue, hues)):
        expected = torch.stack([theirs(x[i], float(f[i])) for i in range(4)])
        torch.testing.assert_close(ours(x, f), expected, rtol=0, atol=2e-6)


def test_batched_blur_equals_gaussian_convolution_and_zero_sigma_is_identity() -> None:
    x = torch.rand(3, 3, 20, 12, generator=torch.Generator().manual_seed(6))
    sigma = torch.tensor([0.5, 1.5, 0.0])
    out = gaussian_blur(x, sigma, max_sigma=2.0)
    for i in (0, 1):
        expected = TF.gaussian_blur(x[i], kernel_size=[13, 13], sigma=[float(sigma[i])] * 2)
        # Padding differs (replicate vs reflect): compare away from the border.
        torch.testing.assert_close(out[i, :, 6:-6, 6:-6], expected[:, 6:-6, 6:-6], rtol=0, atol=1e-5)
    torch.testing.assert_close(out[2], x[2], rtol=0, atol=1e-6)


def test_photometric_grayscale_and_solarize() -> None:
    x = torch.rand(2, 3, 8, 4, generator=torch.Generator().manual_seed(7))
    off = torch.zeros(2, dtype=torch.bool)
    params = sample_photometric(SPEC, 2, torch.zeros(2), torch.zeros(2))
    params.jitter, params.blur = off, off
    params.gray = torch.tensor([True, False])
    params.solarize = torch.tensor([False, True])
    out = photometric(x, params)
    torch.testing.assert_close(out[0], TF.rgb_to_grayscale(x[0], num_output_channels=3), rtol=0, atol=1e-6)
    torch.testing.assert_close(out[1], TF.solarize(x[1], threshold=128 / 255), rtol=0, atol=1e-6)


def test_photometric_probabilities() -> None:
    torch.manual_seed(8)
    n = 20000
    blur_p = torch.tensor([1.0, 0.1, 0.5]).repeat(n // 2)[: n]
    params = sample_photometric(SPEC, n, blur_p, torch.full((n,), 0.2))
    assert abs(params.jitter.float().mean() - 0.8) < 0.02
    assert abs(params.gray.float().mean() - 0.2) < 0.02
    assert abs(params.solarize.float().mean() - 0.2) < 0.02
    assert params.blur[blur_p == 1.0].all()
    assert abs(params.blur[blur_p == 0.1].float().mean() - 0.1) < 0.02
    assert params.factors[:, :3].min() >= 0.6 and params.factors[:, :3].max() <= 1.4
    assert params.factors[:, 2].min() >= 0.8 and params.factors[:, 3].abs().max() <= 0.1
    assert (params.order.sort(dim=1).values == torch.arange(4)).all()  # permutations


# ----------------------------------------------------------------------------- the two implementations agree


def _view_statistics(backend: str, seed: int) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    multicrop = build_multicrop(backend, SPEC, decode_size=(H, W))
    samples = [(multicrop.image_transform()(_smooth_image(i % 6)), -1, -1, i) for i in range(32)]
    views = multicrop.views(multicrop.collate(samples), torch.device("cpu"))
    area = views.boxes[..., 2] * views.boxes[..., 3]
    return {
        "global_area": area[:2].mean(),
        "local_area": area[2:].mean(),
        "global_mean": views.global_views.mean(dim=(0, 1, 3, 4)),
        "local_mean": views.local_views.mean(dim=(0, 1, 3, 4)),
        "global_std": views.global_views.std(),
        "local_std": views.local_views.std(),
        "min": torch.minimum(views.global_views.amin(), views.local_views.amin()),
        "max": torch.maximum(views.global_views.amax(), views.local_views.amax()),
        "flip_rate": views.flips.float().mean(),
    }


def test_cpu_and_batched_views_have_the_same_distribution() -> None:
    cpu, gpu = _view_statistics("cpu", 9), _view_statistics("gpu", 9)
    mean, std = torch.tensor(SPEC.mean), torch.tensor(SPEC.std)
    low, high = float(((0 - mean) / std).min()), float(((1 - mean) / std).max())
    for stats in (cpu, gpu):
        assert low - 1e-5 <= stats["min"] and stats["max"] <= high + 1e-5
        assert 0.35 < stats["flip_rate"] < 0.65
    for key in ("global_area", "local_area"):
        assert abs(float(cpu[key]) - float(gpu[key])) < 0.06
    for key in ("global_mean", "local_mean"):
        torch.testing.assert_close(cpu[key], gpu[key], rtol=0, atol=0.15)
    for key in ("global_std", "local_std"):
        assert abs(float(cpu[key]) - float(gpu[key])) < 0.15


def test_batched_multicrop_rejects_float_images() -> None:
    with pytest.raises(ValueError, match="uint8"):
        BatchedMultiCrop(SPEC)(torch.rand(2, 3, H, W))


def test_geometric_only_spec_leaves_pixels_untouched() -> None:
    torch.manual_seed(10)
    spec = SPEC.geometric_only()
    image = _smooth_image(11)
    views, boxes, flips = CPUMultiCrop(spec)(image)
    expected = TF.pil_to_tensor(crop_resize_pil(image, (boxes[0] * torch.tensor([H, W, H, W])).round().long().tolist(),
                                                bool(flips[0]), spec.global_size)).float() / 255
    normalised = (expected - torch.tensor(spec.mean)[:, None, None]) / torch.tensor(spec.std)[:, None, None]
    torch.testing.assert_close(views[0], normalised, rtol=0, atol=1e-5)
