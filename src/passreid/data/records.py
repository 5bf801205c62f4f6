"""Image records and data sets as lists of them (DESIGN §7), the fingerprint of a list of images, and
:class:`CompactRecords` (millions of unlabelled records in one array)."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from passreid.errors import DatasetError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
SPLITS = ("train", "query", "gallery")


@dataclass(frozen=True, slots=True)
class ImageRecord:
    """One image: its file, identity and 0-based camera (``-1`` where unknown)."""

    path: str
    pid: int
    camid: int


class ReIDDataset:
    """Train / query / gallery record lists of one data set.

    Args:
        name: registry name (``market1501``, ``msmt17``, ...).
        train: training records, identities already relabelled ``0..n-1``.
        query, gallery: evaluation records with their original identities.
        version: which release was found (``"MSMT17_V2"``, ``"custom"``, ...).
        root: the folder (or file) the records were read from.
    """

    def __init__(
        self,
        name: str,
        train: list[ImageRecord],
        query: list[ImageRecord],
        gallery: list[ImageRecord],
        version: str | None = None,
        root: str | os.PathLike | None = None,
    ) -> None:
        self.name = name
        self.train = train
        self.query = query
        self.gallery = gallery
        self.version = version
        self.root = None if root is None else str(root)

    @property
    def num_train_pids(self) -> int:
        """Number of training identities (the classifier's output size)."""
        return _num_ids(self.train)

    @property
    def num_train_cams(self) -> int:
        return _num_cams(self.train)

    def split(self, name: str) -> list[ImageRecord]:
        """The records of ``train``, ``query`` or ``gallery``."""
        if name not in SPLITS:
            raise DatasetError(f"unknown split {name!r}; choose one of {', '.join(SPLITS)}")
        return getattr(self, name)

    def summary(self) -> str:
        """A small table of identities, images and cameras per split."""
        title = self.name + (f" ({self.version})" if self.version else "") + (f" at {self.root}" if self.root else "")
        lines = [title, f"  {'split':<8} {'ids':>7} {'images':>9} {'cameras':>8}"]
        for split in SPLITS:
            records = getattr(self, split)
            lines.append(f"  {split:<8} {_num_ids(records):>7} {len(records):>9} {_num_cams(records):>8}")
        return "\n".join(lines)

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(name={self.name!r}, version={self.version!r}, train={len(self.train)}, "
                f"query={len(self.query)}, gallery={len(self.gallery)})")


def _num_ids(records: Iterable[ImageRecord]) -> int:
    return len({r.pid for r in records if r.pid >= 0})


def _num_cams(records: Iterable[ImageRecord]) -> int:
    return len({r.camid for r in records if r.camid >= 0})


def relabel(records: Sequence[ImageRecord]) -> list[ImageRecord]:
    """Map identities to ``0..n-1`` in the order of the sorted original ids."""
    mapping = {pid: i for i, pid in enumerate(sorted({r.pid for r in records}))}
    return [ImageRecord(r.path, mapping[r.pid], r.camid) for r in records]


def dataset_fingerprint(records: Sequence[ImageRecord], root: str | os.PathLike | None = None) -> dict[str, Any]:
    """Image count and SHA-1 of the sorted file list, stored in checkpoint ``meta`` (DESIGN §8).

    Paths are taken relative to ``root`` (default: the deepest folder holding all
    images) so the same data set gives the same fingerprint on every machine.
    """
    paths = [os.path.abspath(r.path) for r in records]
    if root is None and paths:
        root = os.path.commonpath([os.path.dirname(p) for p in paths])
    rel = sorted(Path(os.path.relpath(p, root)).as_posix() for p in paths) if paths else []
    return {"num_images": len(rel), "list_sha1": hashlib.sha1("\n".join(rel).encode("utf-8")).hexdigest()}


class CompactRecords(Sequence[ImageRecord]):
    """Unlabeled image records kept as one numpy byte-string array.

    A Python list of millions of records is copied page by page into every
    loader worker as reference counts change (copy-on-write); one array is not.
    """

    def __init__(self, records: Sequence[ImageRecord]) -> None:
        self._paths = np.array([os.fsencode(r.path) for r in records])

    def __len__(self) -> int:
        return len(self._paths)

    def __getitem__(self, index: int) -> ImageRecord:  # type: ignore[override]
        return ImageRecord(os.fsdecode(self._paths[index]), -1, -1)
