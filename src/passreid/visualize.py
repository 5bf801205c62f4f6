"""Pictures of what a ReID model does: ranked lists, CMC curves and part-token attention.

- :func:`ranked_list_grid`: a query and its top-k gallery images, each framed
  green (correct match), red (wrong) or grey (unknown), the distance under each.
- :func:`rank_queries` / :func:`worst_queries`: the per-query rankings of the
  evaluation protocol (DESIGN §6: same identity *and* camera removed) and the
  queries with the lowest AP, which are the ones worth looking at.
- :func:`plot_cmc`: the CMC curve as a PNG (``passreid eval --plot``).
- :func:`attention_maps` / :func:`attention_figure`: where the class token and
  each part token look in the last block. The part tokens are what PASS adds:
  trained on horizontal bands, they should attend to the head, the upper and
  the lower body.

PIL draws everything except the CMC curve (matplotlib).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont
from torch import nn

from passreid.data.images import read_image
from passreid.data.transforms import HALF, build_test_transform
from passreid.evaluation import average_precision, compute_distance, query_matches
from passreid.models import PassViT

logger = logging.getLogger(__name__)

RGB = tuple[int, int, int]

CELL_SIZE: tuple[int, int] = (128, 64)
"""(H, W) each image is resized to in a ranked list."""
BORDER = 4
"""Frame width in pixels; the frame colour says correct / wrong."""
GAP = 4
"""Space between neighbouring cells and around the picture."""
QUERY_GAP = 12
"""Extra space that separates the query from its ranked list."""
TEXT_HEIGHT = 14
"""Height of the text line under each cell."""

QUERY_COLOR: RGB = (30, 90, 220)
CORRECT_COLOR: RGB = (0, 170, 0)
WRONG_COLOR: RGB = (220, 0, 0)
UNKNOWN_COLOR: RGB = (160, 160, 160)
BACKGROUND: RGB = (255, 255, 255)
TEXT_COLOR: RGB = (0, 0, 0)

TOKEN_NAMES = ("cls", "part 1", "part 2", "part 3")


# ----------------------------------------------------------------------------- ranked lists


def cell_origin(i: int, cell_size: tuple[int, int] = CELL_SIZE) -> tuple[int, int]:
    """Top-left (x, y) of the framed cell ``i`` of a ranked list (0 = query, 1.. = rank 1..)."""
    framed_w = cell_size[1] + 2 * BORDER
    x = GAP + i * (framed_w + GAP) + (QUERY_GAP if i > 0 else 0)
    return x, GAP


def grid_size(num_ranked: int, cell_size: tuple[int, int] = CELL_SIZE) -> tuple[int, int]:
    """(width, height) of a ranked-list picture with ``num_ranked`` gallery cells."""
    x, _ = cell_origin(num_ranked + 1, cell_size)
    return x, GAP + cell_size[0] + 2 * BORDER + TEXT_HEIGHT + GAP


def _load_cell(image: str | os.PathLike | Image.Image, cell_size: tuple[int, int]) -> Image.Image:
    img = image.convert("RGB") if isinstance(image, Image.Image) else read_image(image)
    return img.resize((cell_size[1], cell_size[0]), Image.Resampling.BILINEAR)


def _draw_cell(canvas: Image.Image, i: int, image: Image.Image, color: RGB, text: str,
               cell_size: tuple[int, int]) -> None:
    """Frame ``image`` in ``color`` at cell ``i`` and centre ``text`` under it."""
    draw = ImageDraw.Draw(canvas)
    x, y = cell_origin(i, cell_size)
    h, w = cell_size
    draw.rectangle((x, y, x + w + 2 * BORDER - 1, y + h + 2 * BORDER - 1), fill=color)
    canvas.paste(image, (x + BORDER, y + BORDER))
    font = ImageFont.load_default()
    text_w = draw.textlength(text, font=font)
    draw.text((x + (w + 2 * BORDER - text_w) / 2, y + h + 2 * BORDER + 1), text, fill=TEXT_COLOR, font=font)


def ranked_list_grid(
    query_path: str | os.PathLike | Image.Image,
    gallery_paths: Sequence[str | os.PathLike | Image.Image],
    distances: Sequence[float],
    correct: Sequence[bool | None] | None = None,
    out: str | os.PathLike | None = None,
    k: int = 10,
    *,
    cell_size: tuple[int, int] = CELL_SIZE,
    label: str = "",
) -> Image.Image:
    """A query and its first ``k`` ranked gallery images in one row.

    Every image is resized to ``cell_size`` (H, W) and framed (:data:`BORDER` px):
    blue for the query, green for a correct match, red for a wrong one, grey
    where ``correct`` is None (no labels, e.g. ``passreid search``). The text
    under a gallery cell is ``label`` + its distance (or score). Layout:
    :func:`cell_origin`, :func:`grid_size`.

    Args:
        query_path: the query image (path or PIL image).
        gallery_paths: ranked gallery images, best first.
        distances: one number per gallery image, printed with 3 significant digits.
        correct: per gallery image True / False / None; None for all when omitted.
        out: also save the picture here (PNG).
        k: cells drawn (fewer if fewer images are given).

    Returns:
        The RGB picture, :func:`grid_size` of ``min(k, len(gallery_paths))``.
    """
    n = min(k, len(gallery_paths))
    if len(distances) < n or (correct is not None and len(correct) < n):
        raise ValueError(f"need a distance and a correct flag for each of the {n} gallery images")
    flags = list(correct[:n]) if correct is not None else [None] * n
    canvas = Image.new("RGB", grid_size(n, cell_size), BACKGROUND)
    _draw_cell(canvas, 0, _load_cell(query_path, cell_size), QUERY_COLOR, "query", cell_size)
    for rank in range(n):
        flag = flags[rank]
        color = UNKNOWN_COLOR if flag is None else CORRECT_COLOR if flag else WRONG_COLOR
        _draw_cell(canvas, rank + 1, _load_cell(gallery_paths[rank], cell_size), color,
                   f"{label}{float(distances[rank]):.3g}", cell_size)
    if out is not None:
        _save(canvas, out)
    return canvas


def _save(image: Image.Image, out: str | os.PathLike) -> Path:
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    image.save(out, optimize=True)
    return out


@dataclass
class Rankings:
    """The protocol's per-query rankings, kept only to rank ``k``.

    Attributes:
        ap: (Q,) average precision per query; NaN where no correct match is left
            after removing same-identity-same-camera items (invalid query).
        top: (Q, k) gallery indices of the first k non-junk items, -1 padded.
        top_dist: (Q, k) their distances (inf padded).
        top_correct: (Q, k) whether each is the query's identity.
    """

    ap: np.ndarray
    top: np.ndarray
    top_dist: np.ndarray
    top_correct: np.ndarray


def rank_queries(
    qf: np.ndarray | torch.Tensor,
    gf: np.ndarray | torch.Tensor,
    q_pids: np.ndarray,
    g_pids: np.ndarray,
    q_camids: np.ndarray,
    g_camids: np.ndarray,
    k: int = 10,
    chunk_size: int = 256,
) -> Rankings:
    """Rank the gallery for every query as the evaluation protocol does (DESIGN §6).

    Squared Euclidean distance, stable ascending sort (ties keep gallery order,
    as :mod:`passreid.evaluation`), same identity and same camera removed. The
    mean of the finite ``ap`` equals the protocol's mAP. Queries are processed
    ``chunk_size`` at a time so only a (chunk, G) block is in memory.
    """

    qf_t, gf_t = torch.as_tensor(qf).float(), torch.as_tensor(gf).float()
    q_pids, g_pids = np.asarray(q_pids), np.asarray(g_pids)
    q_camids, g_camids = np.asarray(q_camids), np.asarray(g_camids)
    num_q = len(qf_t)
    k = min(k, len(gf_t))
    ap = np.full(num_q, np.nan)
    top = np.full((num_q, k), -1, np.int64)
    top_dist = np.full((num_q, k), np.inf, np.float32)
    top_correct = np.zeros((num_q, k), bool)
    for start in range(0, num_q, chunk_size):
        dist = compute_distance(qf_t[start : start + chunk_size], gf_t).numpy()
        order = np.argsort(dist, axis=1, kind="stable")
        for row, ranked in enumerate(order):
            i = start + row
            ranked, matches = query_matches(ranked, q_pids[i], q_camids[i], g_pids, g_camids)
            ap[i] = average_precision(matches)
            m = min(k, len(ranked))
            top[i, :m] = ranked[:m]
            top_dist[i, :m] = dist[row, ranked[:m]]
            top_correct[i, :m] = matches[:m]
    return Rankings(ap=ap, top=top, top_dist=top_dist, top_correct=top_correct)


def worst_queries(ap: np.ndarray, n: int) -> list[int]:
    """Indices of the ``n`` valid queries with the lowest AP, worst first (ties: lower index first)."""
    valid = np.flatnonzero(np.isfinite(ap))
    return valid[np.argsort(ap[valid], kind="stable")][:n].tolist()


# ----------------------------------------------------------------------------- CMC curve


def plot_cmc(cmc: Sequence[float], out_png: str | os.PathLike, *, title: str | None = None,
             label: str | None = None) -> Path:
    """Write the CMC curve (rates in [0, 1], rank 1 first) as a PNG; R1, R5 and R10 are marked.

    Returns:
        The path written.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if len(cmc) == 0:
        raise ValueError("the CMC curve is empty")
    ranks = np.arange(1, len(cmc) + 1)
    values = 100 * np.asarray(cmc, dtype=float)
    fig, ax = plt.subplots(figsize=(5, 3.5), dpi=100)
    ax.plot(ranks, values, marker=".", label=label)
    for r in (1, 5, 10):
        if r <= len(cmc):
            ax.annotate(f"R{r} {values[r - 1]:.1f}", (r, values[r - 1]), textcoords="offset points",
                        xytext=(6, -12), fontsize=8)
    ax.set_xlabel("rank")
    ax.set_ylabel("matching rate (%)")
    ax.set_xlim(1, len(cmc))
    ax.set_ylim(min(values[0], 100) - 5, 100.5)
    ax.grid(alpha=0.3)
    ax.set_title(title or "CMC")
    if label:
        ax.legend(loc="lower right")
    fig.tight_layout()
    out = Path(out_png)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    plt.close(fig)
    return out


# ----------------------------------------------------------------------------- attention


def _backbone(model: nn.Module) -> PassViT:
    backbone = getattr(model, "base", model)
    if not isinstance(backbone, PassViT):
        raise TypeError(f"attention maps need a PassViT or a ReIDModel around one, got {type(model).__name__}")
    return backbone


@torch.no_grad()
def attention_maps(model: nn.Module, image: torch.Tensor) -> torch.Tensor:
    """Where the class token and the three part tokens look, (4, h, w) over the patch grid.

    From the softmax attention of the last block, rows of the special tokens
    ``[cls, part1, part2, part3]``, columns of the patches only, averaged over
    heads; each map is renormalised to sum to 1, because the attention a token
    pays to the other special tokens is not a place in the image.

    Args:
        model: a :class:`PassViT` or a ReID model with one as ``.base``.
        image: a preprocessed (normalised) image (3, H, W) or (1, 3, H, W).

    Returns:
        (4, H / patch, W / patch) float32 on the CPU.
    """
    backbone = _backbone(model)
    x = image[None] if image.ndim == 3 else image
    if x.ndim != 4 or x.shape[0] != 1:
        raise ValueError(f"attention_maps takes one image (3, H, W), got shape {tuple(image.shape)}")
    was_training = backbone.training
    backbone.eval()
    device = next(backbone.parameters()).device
    attn = backbone.forward_attention(x.to(device))  # (1, heads, T, T)
    backbone.train(was_training)
    num_special = len(TOKEN_NAMES)
    grid = (x.shape[-2] // backbone.patch_size, x.shape[-1] // backbone.patch_size)
    maps = attn[0, :, :num_special, num_special:].float().mean(dim=0)  # (4, N)
    maps = maps / maps.sum(dim=1, keepdim=True)
    return maps.reshape(num_special, *grid).cpu()


def _jet(values: np.ndarray) -> np.ndarray:
    """Values in [0, 1] (h, w) -> (h, w, 3) uint8 in the piecewise-linear jet colour map (blue -> red)."""
    channels = [np.clip(1.5 - np.abs(4 * values - centre), 0, 1) for centre in (3, 2, 1)]
    return (np.stack(channels, axis=-1) * 255).astype(np.uint8)


def _heat_overlay(image: Image.Image, heat: torch.Tensor, alpha: float = 0.5) -> Image.Image:
    """``image`` blended with ``heat`` (h, w) upsampled to its size, min-max scaled (as ``imshow`` would)."""
    size = (image.height, image.width)
    up = F.interpolate(heat[None, None], size=size, mode="bilinear", align_corners=False)[0, 0]
    up = ((up - up.min()) / (up.max() - up.min()).clamp(min=1e-12)).numpy()
    return Image.blend(image, Image.fromarray(_jet(up)), alpha)


def attention_figure(
    model: nn.Module,
    images: Sequence[str | os.PathLike | Image.Image],
    out: str | os.PathLike | None = None,
    *,
    scale: int = 2,
    mean: Sequence[float] = HALF,
    std: Sequence[float] = HALF,
) -> Image.Image:
    """One row per image: the image, then the cls and part 1-3 attention maps over it.

    Images are preprocessed as for evaluation at the backbone's input size and
    shown at ``scale`` times that size. Each map's colours span its own min..max,
    so the text under it gives its peak as a multiple of uniform attention
    (1.0x: the token looks everywhere alike). Returns the picture (and saves it to ``out``).
    """
    if not images:
        raise ValueError("attention_figure needs at least one image")
    backbone = _backbone(model)
    h, w = backbone.img_size
    transform = build_test_transform((h, w), mean, std)
    cell_h, cell_w = h * scale, w * scale
    columns = ("image", *TOKEN_NAMES)
    header = TEXT_HEIGHT + GAP
    row_h = cell_h + TEXT_HEIGHT + GAP
    canvas = Image.new("RGB", (GAP + len(columns) * (cell_w + GAP), header + len(images) * row_h), BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default()
    for col, name in enumerate(columns):
        x = GAP + col * (cell_w + GAP)
        draw.text((x + (cell_w - draw.textlength(name, font=font)) / 2, 2), name, fill=TEXT_COLOR, font=font)
    for row, source in enumerate(images):
        pil = source.convert("RGB") if isinstance(source, Image.Image) else read_image(source)
        maps = attention_maps(backbone, transform(pil).as_subclass(torch.Tensor))
        shown = pil.resize((cell_w, cell_h), Image.Resampling.BILINEAR)
        y = header + row * row_h
        canvas.paste(shown, (GAP, y))
        for t in range(len(TOKEN_NAMES)):
            x = GAP + (t + 1) * (cell_w + GAP)
            canvas.paste(_heat_overlay(shown, maps[t]), (x, y))
            peak = f"peak {float(maps[t].max()) * maps[t].numel():.2f}x"
            draw.text((x + (cell_w - draw.textlength(peak, font=font)) / 2, y + cell_h + 1), peak,
                      fill=TEXT_COLOR, font=font)
    if out is not None:
        _save(canvas, out)
    return canvas


