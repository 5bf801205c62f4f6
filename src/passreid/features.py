"""Feature extraction over image records and the ``.npz`` feature file (DESIGN §8)."""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from passreid.data.datasets import ImageRecord, ReIDDataset
from passreid.data.images import ImageDataset
from passreid.data.transforms import HALF, build_test_transform
from passreid.errors import DatasetError
from passreid.fileio import atomic_write
from passreid.runtime import autocast, resolve_precision

logger = logging.getLogger(__name__)

NPZ_KEYS = ("features", "pids", "camids", "paths")
REQUIRED_NPZ_KEYS = ("features", "pids", "camids")
"""What evaluation needs; ``paths`` is optional (feature files of other tools have none)."""

BadImagePolicy = Literal["raise", "drop", "replace"]
BAD_IMAGE_POLICIES: tuple[str, ...] = ("raise", "drop", "replace")


@dataclass
class FeatureSet:
    """Features ``(N, D)`` float32 with their identities, cameras and, where known, image paths.

    ``paths`` is None for a file written without them: evaluation does not need
    them, pictures and search results do (:meth:`require_paths`). ``source`` is
    the file it was read from, for messages.
    """

    features: np.ndarray
    pids: np.ndarray
    camids: np.ndarray
    paths: np.ndarray | None = None
    source: str | None = None

    def __len__(self) -> int:
        return len(self.features)

    def require_paths(self, purpose: str) -> np.ndarray:
        """The image paths, or a ``DatasetError`` saying that ``purpose`` needs them and the file has none."""
        if self.paths is None:
            where = f"feature file {self.source}" if self.source else "this feature set"
            raise DatasetError(f"{where} has no 'paths' key: {purpose} needs the image paths "
                               "(evaluation alone does not; `passreid extract` writes them)")
        return self.paths

    def save(self, path: str | os.PathLike) -> None:
        path = Path(path)
        arrays = dict(features=self.features.astype(np.float32), pids=self.pids.astype(np.int64),
                      camids=self.camids.astype(np.int64))
        if self.paths is not None:
            arrays["paths"] = self.paths.astype(str)
        with atomic_write(path) as f:
            np.savez(f, **arrays)

    @classmethod
    def load(cls, path: str | os.PathLike) -> FeatureSet:
        """Read a feature file; a missing file or required key is a ``DatasetError`` naming it."""
        path = Path(path)
        if not path.is_file():
            raise DatasetError(f"feature file not found: {path}")
        try:
            with np.load(path, allow_pickle=False) as data:
                missing = [k for k in REQUIRED_NPZ_KEYS if k not in data.files]
                if missing:
                    raise DatasetError(f"feature file {path} lacks key(s) {', '.join(missing)} "
                                       f"(needs {', '.join(REQUIRED_NPZ_KEYS)}; 'paths' is optional)")
                arrays = {k: data[k] for k in NPZ_KEYS if k in data.files}
        except (OSError, ValueError) as exc:
            raise DatasetError(f"feature file {path} cannot be read as .npz: {exc}") from exc
        n = len(arrays["features"])
        if arrays["features"].ndim != 2 or any(len(v) != n for v in arrays.values()):
            raise DatasetError(f"feature file {path}: features must be (N, D) with N pids, camids (and paths)")
        return cls(arrays["features"].astype(np.float32), arrays["pids"].astype(np.int64),
                   arrays["camids"].astype(np.int64), arrays.get("paths"), source=str(path))


def eval_interpolation(model: nn.Module) -> str:
    """The test resize a model was published with: ``bilinear`` for a fine-tuned ReID model
    (TransReID's test transform), ``bicubic`` for cluster-contrast models and bare backbones."""
    from passreid.runtime import unwrap
    from passreid.models import ReIDModel

    inner = unwrap(model)
    return "bilinear" if isinstance(inner, ReIDModel) and inner.neck_names == "finetune" else "bicubic"


@torch.no_grad()
def forward_features(model: nn.Module, images: torch.Tensor, *, device: torch.device, precision: str = "fp32",
                     flip: bool = False) -> torch.Tensor:
    """(B, 3, H, W) on ``device`` -> (B, F) float32 test features, not normalised; with ``flip``, the
    mean of the image's and its mirror's (the one flip-averaging of the evaluation and the API)."""
    with autocast(device, precision):
        feats = model(images).float()
        if flip:
            feats = (feats + model(images.flip(-1)).float()) / 2
    return feats


def extract_features(
    model: nn.Module,
    records: Sequence[ImageRecord],
    *,
    img_size: Sequence[int],
    batch_size: int = 128,
    num_workers: int = 2,
    device: torch.device | str = "cpu",
    flip: bool = False,
    precision: str = "fp32",
    mean: Sequence[float] = HALF,
    std: Sequence[float] = HALF,
    progress: bool = False,
    on_bad_image: BadImagePolicy = "raise",
    interpolation: str | None = None,
) -> FeatureSet:
    """Run ``model`` in eval mode over ``records``: (N, F) features.

    A ReID model's eval output is its test feature, L2-normalised unless its
    ``normalize_output`` is False (the published cluster-contrast feature, kept
    as it is so that distances are those the published evaluation computes).
    With ``flip`` the features of the image and its mirror are averaged (and
    normalised again when the model's are). ``precision`` defaults to fp32, the
    published evaluation; ``interpolation`` (``bilinear``/``bicubic``) defaults to
    :func:`eval_interpolation` of the model.
    ``on_bad_image`` says what an unreadable image does: ``raise`` a
    :class:`~passreid.errors.DatasetError` naming it, ``drop`` its row (evaluation
    with ``data.skip_corrupt``: the result then has fewer rows than ``records``), or
    ``replace`` it by the next readable image (rows stay aligned with ``records``).
    """
    from passreid.runtime import unwrap

    if on_bad_image not in BAD_IMAGE_POLICIES:
        raise ValueError(f"on_bad_image must be one of {', '.join(BAD_IMAGE_POLICIES)}, got {on_bad_image!r}")
    device = torch.device(device)
    precision = resolve_precision(precision, device)
    normalize = bool(getattr(unwrap(model), "normalize_output", True))
    interpolation = interpolation or eval_interpolation(model)
    images_of = ImageDataset(list(records), transform=build_test_transform(img_size, mean, std,
                                                                           interpolation=interpolation),
                             skip_corrupt=on_bad_image != "raise")
    loader = DataLoader(
        images_of,
        batch_size=batch_size,
        shuffle=False,
        num_workers=num_workers,
        pin_memory=device.type == "cuda",
        persistent_workers=False,
        generator=torch.Generator(),  # iterating draws its worker seed from here, not from the training's RNG
    )
    was_training = model.training
    model.eval()
    chunks = []
    batches: Any = loader
    if progress:
        from tqdm import tqdm

        batches = tqdm(loader, desc="extract", unit="batch", leave=False)
    for images, *_ in batches:
        feats = forward_features(model, images.to(device, non_blocking=True), device=device, precision=precision,
                                 flip=flip)
        chunks.append((nn.functional.normalize(feats, dim=1) if normalize else feats).cpu())
    model.train(was_training)
    features = torch.cat(chunks).numpy() if chunks else np.zeros((0, 0), np.float32)
    keep = np.ones(len(records), dtype=bool)
    bad = images_of.skipped_paths()
    if bad:
        logger.warning("%d unreadable image(s) %s (data.skip_corrupt), first: %s", len(bad),
                       "left out" if on_bad_image == "drop" else "replaced by the next readable one", bad[0])
        if on_bad_image == "drop":
            keep = ~images_of.bad_mask()
    return FeatureSet(
        features=features.astype(np.float32)[keep] if len(features) else features.astype(np.float32),
        pids=np.array([r.pid for r in records], dtype=np.int64)[keep],
        camids=np.array([r.camid for r in records], dtype=np.int64)[keep],
        paths=np.array([r.path for r in records], dtype=str)[keep],
    )


def evaluate_features(query: FeatureSet, gallery: FeatureSet, *, rerank: bool = False,
                      device: torch.device | str | None = None, precision: str = "fp32") -> dict[str, Any]:
    """DESIGN §6 metrics of a query and a gallery feature set (``precision``: of the distance product)."""
    from passreid.evaluation import evaluate

    return evaluate(query.features, gallery.features, query.pids, gallery.pids, query.camids, gallery.camids,
                    rerank=rerank, device=device, precision=precision)  # type: ignore[arg-type]


def evaluate_model(
    model: nn.Module,
    dataset: ReIDDataset,
    *,
    img_size: Sequence[int],
    device: torch.device | str = "cpu",
    batch_size: int = 128,
    num_workers: int = 2,
    flip: bool = False,
    rerank: bool = False,
    precision: str = "fp32",
    interpolation: str | None = None,
    skip_corrupt: bool = False,
) -> dict[str, Any]:
    """Extract query and gallery features of ``dataset`` with ``model`` (see :func:`extract_features`) and
    compute the metrics.

    With ``skip_corrupt`` (a run's ``data.skip_corrupt``) unreadable images are left out of
    the evaluation instead of stopping it.
    """
    kwargs = dict(img_size=img_size, batch_size=batch_size, num_workers=num_workers, device=device, flip=flip,
                  precision=precision, interpolation=interpolation, on_bad_image="drop" if skip_corrupt else "raise")
    query = extract_features(model, dataset.query, **kwargs)
    gallery = extract_features(model, dataset.gallery, **kwargs)
    return evaluate_features(query, gallery, rerank=rerank, device=device)


def metrics_record(metrics: dict[str, Any]) -> dict[str, float]:
    """The scalars of a metrics dict that a run logs per evaluation: mAP, mINP, rank1/5/10."""
    record = {"mAP": float(metrics["mAP"]), "mINP": float(metrics["mINP"])}
    for k in (1, 5, 10):
        if len(metrics["cmc"]) >= k:
            record[f"rank{k}"] = float(metrics["cmc"][k - 1])
    return record
