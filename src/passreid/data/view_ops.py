"""Batched tensor ops that make multi-crop views on the device: colour jitter, grey, blur, solarize and
colour cast per view (:func:`photometric`), and crop + resize with PIL's antialiased bicubic weights
(:func:`resized_crops`). Images are (N, 3, H, W) floats in [0, 1]; every op is per view, vectorised.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

SOLARIZE_THRESHOLD = 128 / 255
_GRAY_WEIGHTS = (0.2989, 0.587, 0.114)  # ITU-R 601-2 luma, as PIL and torchvision


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
