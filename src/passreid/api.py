"""Python API for a trained model: ``passreid.load(...)`` -> features -> :class:`Gallery` search.

Example:
    >>> import passreid
    >>> model = passreid.load("finetuned.pth")                 # any supported checkpoint format
    >>> feats = model.extract(["a.jpg", "b.jpg"], flip=True)   # (2, F) unit rows
    >>> gallery = passreid.Gallery()
    >>> gallery.add(model.extract(gallery_paths), paths=gallery_paths)
    >>> scores, indices, paths = gallery.search(feats, k=5)

Preprocessing is that of the evaluation path (:func:`passreid.features.extract_features`):
RGB, resize to the model's input size (bilinear for a fine-tuned model, bicubic
for a cluster-contrast one, as published), pixel mean/std 0.5, so features
from :meth:`ReIDPipeline.extract` and from ``passreid extract`` agree. Rows are
always of unit length here (cosine search); a cluster-contrast model's
evaluation feature is the same direction with its published norm.

:meth:`ReIDPipeline.fingerprint` names the weights that make the features; a
gallery built by :meth:`ReIDPipeline.build_gallery` records it, and
:meth:`Gallery.require_model` refuses features of any other model.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Sequence
from typing import Any, Union

import numpy as np
import torch
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader, Dataset

from passreid.data.images import read_image
from passreid.data.transforms import HALF, build_test_transform
from passreid.errors import DatasetError
from passreid.features import eval_interpolation, forward_features
from passreid.runtime import resolve_device, resolve_precision
from passreid.models import PassViT, ReIDModel
from passreid.search import Gallery, SearchResult

logger = logging.getLogger(__name__)

__all__ = ["Gallery", "ImageInput", "ReIDPipeline", "SearchResult", "load", "model_fingerprint"]

ImageInput = Union[str, os.PathLike, Image.Image, np.ndarray, torch.Tensor]
"""One image: a file path, a PIL image, an (H, W, 3) uint8 array or a (3, H, W) tensor."""


def _to_pil_or_tensor(item: Any, position: int) -> Image.Image | torch.Tensor:
    """One input image -> an RGB PIL image or a checked (3, H, W) tensor; anything else is a ``DatasetError``."""
    if isinstance(item, (str, os.PathLike)):
        if os.path.isdir(item):
            raise DatasetError(f"input {position} is a folder, not an image: {os.fspath(item)}")
        return read_image(item)
    if isinstance(item, Image.Image):
        return item.convert("RGB")
    if isinstance(item, np.ndarray):
        if item.ndim != 3 or item.shape[2] != 3 or item.dtype != np.uint8:
            raise DatasetError(
                f"input {position}: an array image must be (H, W, 3) uint8 RGB, got {item.shape} {item.dtype}"
            )
        return Image.fromarray(item)
    if isinstance(item, torch.Tensor):
        _check_tensor_images(item[None] if item.ndim == 3 else item, f"input {position}")
        return item
    raise DatasetError(
        f"input {position} is a {type(item).__name__}: give image paths, PIL images, "
        "(H, W, 3) uint8 arrays or (3, H, W) tensors"
    )


def _check_tensor_images(images: torch.Tensor, what: str) -> None:
    """A (B, 3, H, W) uint8 tensor, or float with RGB values in [0, 1] (raw, not yet normalised)."""
    if images.ndim != 4 or images.shape[1] != 3:
        raise DatasetError(f"{what}: an image tensor must be (3, H, W) or (B, 3, H, W), got {tuple(images.shape)}")
    if images.dtype == torch.uint8:
        return
    if not images.is_floating_point():
        raise DatasetError(f"{what}: image tensors must be uint8 or float, got {images.dtype}")
    low, high = float(images.min()), float(images.max())
    if low < -1e-3 or high > 1 + 1e-3:
        raise DatasetError(
            f"{what}: float image tensors must hold RGB values in [0, 1], got [{low:.3g}, {high:.3g}]; "
            "pass raw images: the pipeline resizes and normalises them itself"
        )


def model_fingerprint(model: nn.Module) -> str:
    """``sha256:<16 hex>`` of a model's tensors (names, dtypes, shapes, values), the ID classifier left out.

    Two models have the same fingerprint exactly when they compute the same
    features: the classifier is not on the feature path, and it is the one part
    a checkpoint without it would get at random.
    """
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        if name.startswith("classifier."):
            continue
        t = tensor.detach().cpu().contiguous().reshape(-1)
        digest.update(f"{name}:{t.dtype}:{tuple(tensor.shape)};".encode())
        digest.update(t.view(torch.uint8).numpy())
    return f"sha256:{digest.hexdigest()[:16]}"


class _Images(Dataset):
    """A list of mixed inputs as a torch ``Dataset`` of preprocessed (3, H, W) tensors."""

    def __init__(self, items: Sequence[Any], transform: nn.Module) -> None:
        self.items = items
        self.transform = transform

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> torch.Tensor:
        return self.transform(_to_pil_or_tensor(self.items[index], index)).as_subclass(torch.Tensor)


class ReIDPipeline:
    """A ReID model with its preprocessing: images in, L2-normalised features out.

    Args:
        model: the ReID model (in eval mode it returns unit features (B, F)).
        device: where the model runs.
        img_size: (H, W) images are resized to (default: the backbone's).
        precision: ``"auto"`` (bf16 on GPU, fp32 on CPU), ``"bf16"``, ``"fp16"`` or ``"fp32"``.
    """

    def __init__(
        self,
        model: ReIDModel,
        *,
        device: torch.device,
        img_size: Sequence[int] | None = None,
        precision: str = "auto",
        mean: Sequence[float] = HALF,
        std: Sequence[float] = HALF,
    ) -> None:
        self.model = model.eval().to(device)
        self.device = device
        self.img_size: tuple[int, int] = tuple(img_size or model.base.img_size)  # type: ignore[assignment]
        self.precision = resolve_precision(precision, device, auto="bf16")
        self.transform = build_test_transform(self.img_size, mean, std, interpolation=eval_interpolation(model))

    @property
    def feat_dim(self) -> int:
        return int(self.model.feat_dim)

    def __repr__(self) -> str:
        return (f"ReIDPipeline({type(self.model.base).__name__} D={self.model.base.embed_dim} "
                f"depth={self.model.base.depth}, img_size={self.img_size}, feat_dim={self.feat_dim}, "
                f"device={self.device}, precision={self.precision})")

    def fingerprint(self) -> str:
        """The model's :func:`model_fingerprint`: galleries record it to refuse another model's features."""
        return model_fingerprint(self.model)

    def __call__(self, images: ImageInput | Sequence[ImageInput], **kwargs: Any) -> torch.Tensor:
        return self.extract(images, **kwargs)

    @torch.no_grad()
    def extract(
        self,
        images: ImageInput | Sequence[ImageInput],
        batch_size: int = 64,
        flip: bool = False,
        num_workers: int = 0,
    ) -> torch.Tensor:
        """Features of images, (N, F) float32 on the CPU, each row of unit length.

        Args:
            images: one image or a sequence of them (paths, PIL images, (H, W, 3)
                uint8 arrays, (3, H, W) tensors), or a (B, 3, H, W) tensor batch;
                tensors are uint8 or float RGB in [0, 1].
            batch_size: images per forward pass.
            flip: average each image's feature with its mirror's, then renormalise.
            num_workers: DataLoader processes decoding files (0: in this process).

        Raises:
            DatasetError: a missing/unreadable file, a folder, or an input that is not an image.
        """
        if isinstance(images, torch.Tensor) and images.ndim == 4:
            _check_tensor_images(images, "image batch")
            batches: Any = (self.transform(chunk.to(self.device)).as_subclass(torch.Tensor)
                            for chunk in images.split(batch_size))
        else:
            if isinstance(images, (str, os.PathLike, Image.Image, np.ndarray, torch.Tensor)):
                images = [images]
            batches = DataLoader(_Images(list(images), self.transform), batch_size=batch_size,
                                 num_workers=num_workers, pin_memory=self.device.type == "cuda")
        chunks = [self._forward(batch.to(self.device, non_blocking=True), flip) for batch in batches]
        if not chunks:
            return torch.zeros(0, self.feat_dim)
        return torch.cat(chunks)

    def _forward(self, batch: torch.Tensor, flip: bool) -> torch.Tensor:
        """Preprocessed (B, 3, H, W) -> unit features (B, F) on the CPU (flip as in the evaluation path)."""
        feats = forward_features(self.model, batch, device=self.device, precision=self.precision, flip=flip)
        return nn.functional.normalize(feats, dim=1).cpu()

    def build_gallery(
        self,
        paths: Sequence[str | os.PathLike],
        *,
        pids: Sequence[int] | None = None,
        camids: Sequence[int] | None = None,
        batch_size: int = 64,
        flip: bool = False,
        **gallery_kwargs: Any,
    ) -> Gallery:
        """A :class:`Gallery` of the images at ``paths`` (``gallery_kwargs`` go to ``Gallery``).

        Its ``meta`` records the model's :meth:`fingerprint`, ``flip`` and ``img_size``.
        """
        gallery = Gallery(**gallery_kwargs)
        gallery.meta.update(model=self.fingerprint(), flip=flip, img_size=list(self.img_size))
        gallery.add(self.extract(paths, batch_size=batch_size, flip=flip), paths, pids, camids)
        return gallery


def load(
    checkpoint: str | os.PathLike | dict[str, Any] | nn.Module,
    device: str | torch.device = "auto",
    *,
    img_size: Sequence[int] | None = None,
    precision: str = "auto",
) -> ReIDPipeline:
    """A ready-to-use model from any supported checkpoint.

    Args:
        checkpoint: a file or a loaded dict in any format
            :func:`passreid.checkpoint.build_model_from_checkpoint` reads (fine-tuned
            ReID model, PASS pretraining, bare backbone, timm/DINO ViT), or a
            :class:`ReIDModel` / :class:`PassViT` already in memory.
        device: ``"auto"`` (CUDA when present), ``"cpu"``, ``"cuda"``, ...
        img_size: input (H, W); default the size the checkpoint was trained at.
        precision: see :class:`ReIDPipeline`.

    Raises:
        CheckpointError: the file is missing, unreadable or not a known layout.
    """
    from passreid.checkpoint import build_model_from_checkpoint

    dev = resolve_device(str(device))
    if isinstance(checkpoint, PassViT):
        model = ReIDModel(checkpoint)
    elif isinstance(checkpoint, ReIDModel):
        model = checkpoint
    else:
        model, report = build_model_from_checkpoint(checkpoint, device=dev)
        logger.info("loaded %s: %s", checkpoint if not isinstance(checkpoint, dict) else "checkpoint dict",
                    report.summary())
    return ReIDPipeline(model, device=dev, img_size=img_size, precision=precision)
