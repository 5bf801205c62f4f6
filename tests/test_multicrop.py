"""Multi-crop with part bands: geometry, counts and sizes, batched ops vs torchvision, CPU vs batched statistics."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torchvision.transforms.v2 import functional as TF

from passreid.data.view_ops import (
    adjust_brightness,
    adjust_contrast,
    adjust_hue,
    adjust_saturation,
    gaussian_blur,
    photometric,
    resized_crops,
)
from passreid.data.multicrop import (
    BANDS,
    BatchedMultiCrop,
    CPUMultiCrop,
    DecodeImage,
    MultiCropSpec,
    band_rows,
    build_multicrop,
    crop_resize_pil,
    pad_images,
    sample_crop_boxes,
    sample_photometric,
    sample_view_boxes,
)

SPEC = MultiCropSpec(global_size=(64, 32), local_size=(32, 16))
H, W = 128, 64
SHAPES = ((300, 100), (128, 128), (90, 60), (512, 200), (60, 150), (400, 20))
"""(H, W) of images of several sizes and aspects: tall, square, small, large, wide, too thin for the ratio range."""


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
    multicrop = build_multicrop(backend, SPEC, None)
    images = [_smooth_image(i, SHAPES[i % 4]) for i in range(12)]
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
    multicrop = build_multicrop(backend, SPEC, (H, W))
    samples = [(multicrop.image_transform()(_smooth_image(i, SHAPES[i])), -1, -1, i) for i in range(3)]
    views = multicrop.views(multicrop.collate(samples), torch.device("cpu"))
    assert views.global_views.shape == (2, 3, 3, 64, 32)
    assert views.local_views.shape == (9, 3, 3, 32, 16)
    assert views.flips.shape == (11, 3) and views.flips.dtype == torch.bool
    assert views.batch_size == 3


def test_plain_dino_local_crops_come_from_the_whole_image() -> None:
    torch.manual_seed(3)
    spec = MultiCropSpec(global_size=(64, 32), local_size=(32, 16), local_scale=(0.05, 0.4), banded=False)
    boxes = sample_view_boxes(spec, torch.tensor([[H, W]]).expand(400, 2)).float()
    local = boxes[2:]
    assert local.shape == (9, 400, 4)
    # Unbanded crops reach rows of every band, including crops spanning the middle of the image.
    assert local[..., 0].min() < 5 and (local[..., 0] + local[..., 2]).max() > H - 5
    assert ((local[..., 0] < H / 2 - 10) & (local[..., 0] + local[..., 2] > H / 2 + 10)).any()


def test_boxes_are_drawn_in_each_images_own_pixels() -> None:
    """Aspect-ratio range, fit and fallback hold in every image's own pixels, not in a resized copy."""
    torch.manual_seed(2)
    sizes = torch.tensor(SHAPES).repeat(200, 1)  # (B, 2), every shape 200 times
    boxes = sample_view_boxes(SPEC, sizes)  # (11, B, 4) pixels
    top, left, h, w = boxes.unbind(-1)
    height, width = sizes[:, 0], sizes[:, 1]
    assert (top >= 0).all() and (left >= 0).all() and (top + h <= height).all() and (left + w <= width).all()
    # w / h in [3/4, 4/3] in pixels, up to the rounding of h and w to whole pixels
    assert ((w + 0.5) / (h - 0.5) >= 3 / 4).all() and ((w - 0.5) / (h + 0.5) <= 4 / 3).all()
    fits = width > 20  # every image but the 20-pixel-wide one has global boxes that fit
    glob_area = ((h + 0.5) * (w + 0.5))[:2, fits] / (height * width)[fits]
    assert glob_area.min() >= 0.4
    # 400x20 is too thin for any 3/4..4/3 box of 40% of its area: torchvision's fallback, the centred crop
    # clamped to ratio 3/4 in its own pixels: 20 wide, round(20 / 0.75) = 27 high, top (400 - 27) // 2.
    thin = sizes[:, 1] == 20
    assert (boxes[:2, thin] == torch.tensor([186, 0, 27, 20])).all()


@pytest.mark.parametrize("shape", SHAPES)
def test_both_backends_cut_the_same_boxes_with_the_same_pixels(shape: tuple[int, int]) -> None:
    """Same seed, same image: the same boxes and flips on both backends, and views within PIL's 8-bit rounding.

    PIL rounds its intermediate and its output to 8 bits (0.5/255 each), the batched
    resampling stays in float: the mean difference is about 0.3/255 and a few pixels
    next to a sharp edge differ by a few 1/255 where bicubic rings. A box taken in a
    squashed copy, or a resize without antialiasing, moves the mean/std of a view by
    several 1/255 (the coloured waves and the bright corner shift).
    """
    spec = SPEC.geometric_only()
    image = _smooth_image(sum(shape), shape)
    cpu, gpu = CPUMultiCrop(spec), BatchedMultiCrop(spec, None)
    torch.manual_seed(30)
    cpu_views, cpu_boxes, cpu_flips = cpu(image)
    torch.manual_seed(30)
    gpu_views = gpu.views(gpu.collate([(gpu.image_transform()(image), -1, -1, 0)]), torch.device("cpu"))
    torch.testing.assert_close(gpu_views.boxes[:, 0], cpu_boxes, rtol=0, atol=0)
    assert torch.equal(gpu_views.flips[:, 0], cpu_flips)
    std = torch.tensor(spec.std).view(3, 1, 1)
    for v, cpu_view in enumerate(cpu_views):
        view = gpu_views.global_views[v, 0] if v < 2 else gpu_views.local_views[v - 2, 0]
        ours, pil = view * std, cpu_view * std  # back to [0, 1] units
        assert (ours - pil).abs().mean() < 0.6 / 255, v
        torch.testing.assert_close(ours.mean(dim=(1, 2)), pil.mean(dim=(1, 2)), rtol=0, atol=0.5 / 255)
        torch.testing.assert_close(ours.std(dim=(1, 2)), pil.std(dim=(1, 2)), rtol=0, atol=0.5 / 255)


def test_views_of_a_padded_batch_of_mixed_sizes_are_pil_crops_of_each_image() -> None:
    """One batch of all shapes: each view is PIL's crop + antialiased bicubic resize of its own image;
    the padding of the smaller images never leaks into their views."""
    spec = SPEC.geometric_only()
    images = [_smooth_image(i, shape) for i, shape in enumerate(SHAPES)]
    gpu = BatchedMultiCrop(spec, None)
    torch.manual_seed(31)
    batch = gpu.collate([(gpu.image_transform()(img), -1, -1, i) for i, img in enumerate(images)])
    assert batch.images.shape == (6, 3, 512, 200) and batch.sizes.tolist() == [list(s) for s in SHAPES]
    views = gpu.views(batch, torch.device("cpu"))
    std = torch.tensor(spec.std).view(3, 1, 1)
    mean = torch.tensor(spec.mean).view(3, 1, 1)
    for b, image in enumerate(images):
        pixels = torch.tensor([*SHAPES[b], *SHAPES[b]], dtype=torch.float32)
        for v in range(spec.num_views):
            box = (views.boxes[v, b] * pixels).round().long().tolist()
            size = spec.global_size if v < 2 else spec.local_size
            pil = TF.pil_to_tensor(crop_resize_pil(image, box, bool(views.flips[v, b]), size)).float() / 255
            view = views.global_views[v, b] if v < 2 else views.local_views[v - 2, b]
            diff = (view * std + mean - pil).abs()
            assert diff.mean() < 0.6 / 255 and diff.max() < 8 / 255, (b, v, float(diff.mean()), float(diff.max()))


def test_resized_crops_equal_pil_at_the_edges_of_a_padded_image() -> None:
    """Boxes touching the bottom-right corner of a small image padded into a larger batch, up and down scaled,
    flipped: PIL's resize of the image itself (which sees the pixels around the box, not the padding)."""
    small, large = _smooth_image(4, (90, 60)), _smooth_image(5, (300, 100))
    batch = pad_images([TF.pil_to_tensor(small), TF.pil_to_tensor(large)])
    source = batch.images.float() / 255
    boxes = torch.tensor([[[50, 30, 40, 30], [0, 0, 300, 100]], [[10, 4, 80, 56], [120, 37, 150, 63]]])  # (2, 2, 4)
    flips = torch.tensor([[False, True], [True, False]])
    out = resized_crops(source, batch.sizes, boxes, flips, (64, 32))
    for v in range(2):
        for b, image in enumerate((small, large)):
            pil = TF.pil_to_tensor(crop_resize_pil(image, boxes[v, b].tolist(), bool(flips[v, b]), (64, 32)))
            diff = (out[v, b] - pil.float() / 255).abs()
            # a few 1/255 where bicubic rings at the bright corner; leaking padding would give ~0.5 at the edges
            assert diff.mean() < 0.6 / 255 and diff.max() < 8 / 255, (v, b, float(diff.mean()), float(diff.max()))


def test_resampling_is_torchs_antialiased_bicubic_for_a_whole_image_box() -> None:
    """An independent reference: F.interpolate(bicubic, antialias=True) of the whole image, shrinking 3x and 2x."""
    images = torch.rand(2, 3, 150, 90, generator=torch.Generator().manual_seed(32))
    sizes = torch.tensor([[150, 90], [150, 90]])
    for size in ((50, 30), (75, 45), (64, 32)):
        boxes = torch.tensor([[0, 0, 150, 90]]).expand(1, 2, 4)
        ours = resized_crops(images, sizes, boxes, torch.zeros(1, 2, dtype=torch.bool), size)[0]
        theirs = F.interpolate(images, size=size, mode="bicubic", antialias=True, align_corners=False).clamp(0, 1)
        torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)


def test_a_shrinking_crop_is_antialiased() -> None:
    """A one-pixel checkerboard shrunk 4x is uniform grey, as PIL gives; point sampling would keep black and white."""
    yy, xx = torch.meshgrid(torch.arange(256), torch.arange(128), indexing="ij")
    board = ((yy + xx) % 2).float().expand(1, 3, 256, 128)
    out = resized_crops(board, torch.tensor([[256, 128]]), torch.tensor([[[0, 0, 256, 128]]]),
                        torch.tensor([[False]]), (64, 32))
    assert abs(float(out.mean()) - 0.5) < 0.01 and float(out.std()) < 0.01
    pil = TF.pil_to_tensor(crop_resize_pil(TF.to_pil_image(board[0]), [0, 0, 256, 128], False, (64, 32)))
    assert float((pil.float() / 255).std()) < 0.01


def test_decode_keeps_the_image_size_and_shrinks_only_beyond_the_cap() -> None:
    tall = Image.new("RGB", (50, 200))  # PIL sizes are (W, H)
    assert DecodeImage((64, 32))(tall).shape == (3, 64, 16)  # shrunk by min(64/200, 32/50), aspect kept
    assert DecodeImage((64, 32))(Image.new("RGB", (20, 40))).shape == (3, 40, 20)  # smaller: as it is
    assert DecodeImage(None)(tall).shape == (3, 200, 50)
    decoded = DecodeImage(None)(Image.new("RGB", (3, 2), (10, 20, 30)))
    assert decoded.dtype == torch.uint8 and decoded[:, 1, 2].tolist() == [10, 20, 30]


def test_pad_images_keeps_each_image_in_the_top_left_corner() -> None:
    a = torch.full((3, 5, 7), 1, dtype=torch.uint8)
    b = torch.full((3, 9, 2), 2, dtype=torch.uint8)
    batch = pad_images([a, b])
    assert batch.images.shape == (2, 3, 16, 8) and batch.sizes.tolist() == [[5, 7], [9, 2]]  # rounded up to 8
    assert (batch.images[0, :, :5, :7] == 1).all() and batch.images[0].sum() == 3 * 5 * 7
    assert (batch.images[1, :, :9, :2] == 2).all() and batch.images[1].sum() == 2 * 3 * 9 * 2


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
    multicrop = build_multicrop(backend, SPEC, (H, W))
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


# ----------------------------------------------------------------------------- colour-cast jitter


def test_cast_off_keeps_the_published_random_stream() -> None:
    """Recipes without the cast jitter draw exactly what they drew before it existed."""
    blur_p, solar_p = torch.full((6,), 0.5), torch.full((6,), 0.2)
    plain = sample_photometric(SPEC, 6, blur_p, solar_p, torch.Generator().manual_seed(3))
    cast = sample_photometric(replace(SPEC, cast=0.3), 6, blur_p, solar_p,
                              torch.Generator().manual_seed(3))
    assert plain.cast is None
    for key in ("factors", "order", "jitter", "gray", "blur", "sigma", "solarize"):
        assert torch.equal(getattr(plain, key), getattr(cast, key)), key
    assert cast.cast.shape == (6, 3) and 0.7 <= float(cast.cast.min()) and float(cast.cast.max()) <= 1.3


def test_batched_cast_multiplies_each_channel_by_its_gain() -> None:
    x = torch.rand(2, 3, 8, 4, generator=torch.Generator().manual_seed(4)) * 0.6
    off = torch.zeros(2, dtype=torch.bool)
    params = sample_photometric(SPEC, 2, torch.zeros(2), torch.zeros(2))
    params.jitter, params.gray, params.blur, params.solarize = off, off, off, off
    params.cast = torch.tensor([[1.2, 1.0, 0.8], [0.9, 1.1, 1.3]])
    torch.testing.assert_close(photometric(x, params), (x * params.cast[:, :, None, None]).clamp(0, 1))


@pytest.mark.parametrize("backend", ["cpu", "gpu"])
def test_cast_gives_each_view_its_own_channel_gains(backend: str) -> None:
    """A grey image comes out tinted, differently per view, within [1 - cast, 1 + cast] per channel."""
    torch.manual_seed(12)
    spec = replace(MultiCropSpec(global_size=(32, 16), local_size=(16, 8)).geometric_only(), cast=0.25)
    multicrop = build_multicrop(backend, spec, (H, W))
    grey = Image.fromarray(np.full((H, W, 3), 128, np.uint8))
    samples = [(multicrop.image_transform()(grey), -1, -1, i) for i in range(4)]
    views = multicrop.views(multicrop.collate(samples), torch.device("cpu"))
    mean, std = torch.tensor(spec.mean).view(1, 1, 3), torch.tensor(spec.std).view(1, 1, 3)
    pixels = views.global_views.mean(dim=(3, 4)) * std + mean  # (2, B, 3) in [0, 1]
    gains = pixels / (128 / 255)
    assert float(gains.min()) >= 0.75 - 0.01 and float(gains.max()) <= 1.25 + 0.01
    assert float(gains.std(dim=2).mean()) > 0.03  # tinted, not only brighter or darker
    assert float((gains[0] - gains[1]).abs().mean()) > 0.03  # the two views of one image disagree
