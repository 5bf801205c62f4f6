"""Reading the images of a record list, with errors that name the bad file.

A corrupt file in a set of millions must not end a run with an anonymous
worker crash: :func:`read_image` turns every way of failing into a
:class:`~passreid.errors.DatasetError` with the path, and
:class:`ImageDataset` can optionally replace bad files and keep count of them.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset

from passreid.data.datasets import ImageRecord
from passreid.data.seeding import seeded_rng
from passreid.errors import BadImageError, DatasetError

logger = logging.getLogger(__name__)


def read_image(path: str | os.PathLike) -> Image.Image:
    """Open ``path`` fully decoded as an RGB PIL image.

    Raises:
        BadImageError: the file is missing, empty, not an image or truncated.
    """
    path = os.fspath(path)
    try:
        size = os.path.getsize(path)
    except OSError as exc:
        raise BadImageError(f"image not found or not accessible: {path} ({exc.strerror})") from exc
    if size == 0:
        raise BadImageError(f"image file is empty (0 bytes): {path}")
    try:
        with Image.open(path) as img:
            img.load()  # decode now: a truncated file fails here, not later inside a transform
            return img.convert("RGB")
    except UnidentifiedImageError as exc:
        raise BadImageError(f"not an image (or an unsupported format): {path}") from exc
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise BadImageError(f"unreadable or truncated image {path}: {exc}") from exc


class ImageDataset(Dataset):
    """A torch ``Dataset`` over image records: item ``i`` is ``(image, pid, camid, index)``.

    ``image`` is ``transform(pil_rgb_image)`` (for the ReID transforms a float
    tensor ``(3, H, W)``) or the PIL image itself without a transform. ``index``
    is the position of the record actually returned, which differs from ``i``
    only when a bad file was replaced.

    ``i`` may also be ``(i, seed)`` (what :class:`~passreid.data.seeding.PositionSeeds`
    yields): the image is then read and transformed under
    :func:`~passreid.data.seeding.seeded_rng`, so its augmentation depends on the
    seed only, not on the process or worker that reads it.

    Args:
        records: the images to read.
        transform: callable applied to the RGB PIL image.
        skip_corrupt: if False (default) a bad file raises ``DatasetError``; if
            True it is logged, remembered and replaced by the next readable
            record. The bad-file flags live in shared memory, so files skipped
            inside DataLoader worker processes are reported by
            :meth:`skipped_paths` in the main process too.
    """

    def __init__(
        self,
        records: Sequence[ImageRecord],
        transform: Callable[[Image.Image], Any] | None = None,
        skip_corrupt: bool = False,
    ) -> None:
        self.records = records
        self.transform = transform
        self.skip_corrupt = skip_corrupt
        self._bad = torch.zeros(len(records), dtype=torch.bool).share_memory_() if skip_corrupt else None

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int | tuple[int, int]) -> tuple[Any, int, int, int]:
        if isinstance(index, tuple):
            index, seed = index
            with seeded_rng(seed):
                return self[index]
        if self._bad is None:
            return self._load(index)
        n = len(self.records)
        for step in range(n):
            j = (index + step) % n
            if self._bad[j]:
                continue
            try:
                return self._load(j)
            except DatasetError as exc:
                self._bad[j] = True
                logger.warning("skipping a bad image (%d skipped so far): %s", int(self._bad.sum()), exc)
        raise DatasetError(f"none of the {n} images is readable (first: {self.records[0].path})")

    def _load(self, index: int) -> tuple[Any, int, int, int]:
        record = self.records[index]
        image = read_image(record.path)
        if self.transform is not None:
            image = self.transform(image)
        return image, record.pid, record.camid, index

    def bad_mask(self) -> np.ndarray:
        """(N,) bool: which records were found unreadable and replaced (all False without ``skip_corrupt``)."""
        if self._bad is None:
            return np.zeros(len(self.records), dtype=bool)
        return self._bad.numpy().copy()

    def skipped_paths(self) -> list[str]:
        """Paths of the bad files replaced so far (always empty without ``skip_corrupt``)."""
        if self._bad is None:
            return []
        return [self.records[int(i)].path for i in torch.nonzero(self._bad).flatten()]
