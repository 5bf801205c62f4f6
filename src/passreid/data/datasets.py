"""ReID data sets as lists of image records (:mod:`passreid.data.records`): the published layouts, CSV files
and plain image folders.

Every loader turns a folder (or file) into a :class:`ReIDDataset` of
:class:`ImageRecord` lists (DESIGN §7). Conventions shared by all of them:

- camera ids are 0-based;
- train identities are relabelled ``0..n-1`` in the order of the sorted original
  ids (classifier targets), query and gallery keep the original ids so that
  results can be traced back to the files;
- Market-style junk (identity -1) is dropped everywhere; distractors (identity 0)
  stay in the gallery only, because as a query or a training class they would be
  one "person" made of many strangers.

Anything a user can fix (missing folder, a file name or list line that does not
parse, an empty split) raises :class:`~passreid.errors.DatasetError` naming the path.
"""

from __future__ import annotations

import csv
import inspect
import logging
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from passreid.data.records import (
    IMAGE_EXTENSIONS,
    SPLITS,
    ImageRecord,
    ReIDDataset,
    _num_ids,
    dataset_fingerprint,
    relabel,
)
from passreid.errors import DatasetError
from passreid.fileio import atomic_write

logger = logging.getLogger(__name__)

__all__ = [
    "CUHK03NP", "CSVDataset", "DukeMTMC", "IMAGE_EXTENSIONS", "ImageFolderDataset", "ImageRecord", "MSMT17",
    "Market1501", "ReIDDataset", "SPLITS", "SyntheticMarket", "build_dataset", "dataset_fingerprint",
    "list_datasets", "relabel",
]

# Published (images, identities) of each split; a set that differs is loaded as custom.
Counts = dict[str, tuple[int, int]]
PUBLISHED_COUNTS: dict[str, Counts] = {
    "Market-1501": {"train": (12936, 751), "query": (3368, 750), "gallery": (15913, 751)},
    "DukeMTMC-reID": {"train": (16522, 702), "query": (2228, 702), "gallery": (17661, 1110)},
    "CUHK03-NP-labeled": {"train": (7368, 767), "query": (1400, 700), "gallery": (5328, 700)},
    "CUHK03-NP-detected": {"train": (7365, 767), "query": (1400, 700), "gallery": (5332, 700)},
    "MSMT17": {"train": (32621, 1041), "query": (11659, 3060), "gallery": (82161, 3060)},
}


def _check_published(label: str, splits: dict[str, list[ImageRecord]], root: Path) -> str:
    """``label`` if the split sizes are the published ones of ``label``, else ``"custom"`` with a warning."""
    expected = dict(PUBLISHED_COUNTS[label])
    if not splits["train"]:  # an evaluation-only copy: compare what is there
        expected["train"] = (0, 0)
    found = {s: (len(splits[s]), _num_ids(splits[s])) for s in SPLITS}
    if found == expected:
        return label
    diff = ", ".join(
        f"{s} {found[s][0]} images/{found[s][1]} ids (published {expected[s][0]}/{expected[s][1]})"
        for s in SPLITS if found[s] != expected[s]
    )
    logger.warning("%s at %s differs from the published %s: %s; loaded as a custom set", label, root, label, diff)
    return "custom"


def _require_dir(path: Path, what: str) -> Path:
    if not path.is_dir():
        raise DatasetError(f"{what} not found: {path}")
    return path


def _is_image_name(name: str) -> bool:
    # Hidden files (macOS "._x.jpg" forks) and Thumbs.db ship inside some archives of the real sets.
    return not name.startswith(".") and name.lower().endswith(IMAGE_EXTENSIONS)


# --------------------------------------------------------------------------- Market-1501 layout


def _read_market_split(
    folder: Path, pattern: re.Pattern[str], split: str, *, keep_distractors: bool
) -> list[ImageRecord]:
    """Parse the images of one Market-layout folder; identity -1 (and 0 unless kept) is dropped."""
    _require_dir(folder, f"{split} folder")
    names = sorted(e.name for e in os.scandir(folder) if e.is_file() and _is_image_name(e.name))
    if not names:
        raise DatasetError(f"{split} folder {folder} holds no images ({', '.join(IMAGE_EXTENSIONS)})")
    records = []
    for name in names:
        match = pattern.match(name)
        if match is None:
            raise DatasetError(f"cannot parse identity and camera from {folder / name} (expected {pattern.pattern})")
        pid, cam = int(match.group(1)), int(match.group(2))
        if cam < 1:
            raise DatasetError(f"camera numbers start at 1: {folder / name}")
        if pid == -1 or (pid == 0 and not keep_distractors):
            continue
        records.append(ImageRecord(str(folder / name), pid, cam - 1))
    if not records:
        raise DatasetError(f"{split} folder {folder} holds only junk/distractor images (identity -1 or 0)")
    return records


def _load_market_layout(root: Path, pattern: re.Pattern[str], need_train: bool = True) -> dict[str, list[ImageRecord]]:
    """``bounding_box_train``, ``query``, ``bounding_box_test`` → relabelled train, query, gallery.

    Without ``need_train`` (evaluation, which never reads it) a missing ``bounding_box_train``
    gives an empty train split.
    """
    _require_dir(root, "data set root")
    if need_train or (root / "bounding_box_train").is_dir():
        train = _read_market_split(root / "bounding_box_train", pattern, "train", keep_distractors=False)
    else:
        logger.info("%s has no bounding_box_train: loaded for evaluation only (query and gallery)", root)
        train = []
    query = _read_market_split(root / "query", pattern, "query", keep_distractors=False)
    gallery = _read_market_split(root / "bounding_box_test", pattern, "gallery", keep_distractors=True)
    return {"train": relabel(train), "query": query, "gallery": gallery}


class Market1501(ReIDDataset):
    """Market-1501: ``PPPP_cCsS_FFFFFF_II.jpg`` in ``bounding_box_train`` / ``query`` / ``bounding_box_test``."""

    PATTERN = re.compile(r"^(-1|\d+)_c(\d+)s\d+_\d+_\d+\.(?:jpe?g|png)$", re.IGNORECASE)

    def __init__(self, root: str | os.PathLike, need_train: bool = True) -> None:
        root = Path(root)
        splits = _load_market_layout(root, self.PATTERN, need_train)
        super().__init__("market1501", **splits, version=_check_published("Market-1501", splits, root), root=root)


class SyntheticMarket(ReIDDataset):
    """A synthetic set in the Market-1501 layout (:mod:`passreid.data.synthetic`); no published counts."""

    def __init__(self, root: str | os.PathLike, need_train: bool = True) -> None:
        root = Path(root)
        super().__init__("synthetic", **_load_market_layout(root, Market1501.PATTERN, need_train), version="synthetic",
                         root=root)


class DukeMTMC(ReIDDataset):
    """DukeMTMC-reID: Market layout, file names ``PPPP_cC_fFFFFFFF.jpg``."""

    PATTERN = re.compile(r"^(-1|\d+)_c(\d+)_f\d+\.(?:jpe?g|png)$", re.IGNORECASE)

    def __init__(self, root: str | os.PathLike, need_train: bool = True) -> None:
        root = Path(root)
        splits = _load_market_layout(root, self.PATTERN, need_train)
        super().__init__("dukemtmc", **splits, version=_check_published("DukeMTMC-reID", splits, root), root=root)


class CUHK03NP(ReIDDataset):
    """CUHK03 new protocol (Zhong et al. 2017): ``root/labeled`` or ``root/detected``, each in Market layout.

    ``root`` may also be the ``labeled`` / ``detected`` folder itself (its name
    then decides the variant). File names are ``PPPP_cC_N.png``.
    """

    PATTERN = re.compile(r"^(-1|\d+)_c(\d+)_\d+\.(?:png|jpe?g)$", re.IGNORECASE)
    VARIANTS = ("labeled", "detected")

    def __init__(self, root: str | os.PathLike, variant: str = "labeled", need_train: bool = True) -> None:
        if variant not in self.VARIANTS:
            raise DatasetError(f"CUHK03-NP variant {variant!r} is not one of {', '.join(self.VARIANTS)}")
        root = _require_dir(Path(root), "data set root")
        if (root / "bounding_box_train").is_dir() or (root / "query").is_dir():
            folder = root
            variant = root.name if root.name in self.VARIANTS else variant
        else:
            folder = _require_dir(root / variant, f"CUHK03-NP {variant} folder")
        splits = _load_market_layout(folder, self.PATTERN, need_train)
        version = _check_published(f"CUHK03-NP-{variant}", splits, folder)
        super().__init__("cuhk03np", **splits, version=version, root=folder)
        self.variant = variant


# --------------------------------------------------------------------------- MSMT17


class MSMT17(ReIDDataset):
    """MSMT17 V1 (``train``/``test``) or V2 (``mask_train_v2``/``mask_test_v2``) with its list files.

    Each line of ``list_{train,val,query,gallery}.txt`` is ``relative/path.jpg pid``
    (relative to the train or test folder); the camera is the third ``_`` field of
    the file name, 1-based. Training uses train + val, as published. Identity 0 is
    an ordinary person here, not a distractor.
    """

    FOLDERS = {"MSMT17_V1": ("train", "test"), "MSMT17_V2": ("mask_train_v2", "mask_test_v2")}
    LISTS = {"train": ("list_train.txt", "list_val.txt"), "query": ("list_query.txt",),
             "gallery": ("list_gallery.txt",)}

    def __init__(self, root: str | os.PathLike) -> None:
        root = _require_dir(Path(root), "data set root")
        if not (root / "list_train.txt").is_file():
            # Accept the folder above the unpacked archive too (data/msmt17/MSMT17_V1/...).
            inner = [root / v for v in self.FOLDERS if (root / v / "list_train.txt").is_file()]
            if len(inner) == 1:
                root = inner[0]
        layout = next((v for v, dirs in self.FOLDERS.items() if all((root / d).is_dir() for d in dirs)), None)
        if layout is None:
            raise DatasetError(
                f"MSMT17 image folders not found in {root}: expected train/ and test/ (MSMT17_V1) "
                "or mask_train_v2/ and mask_test_v2/ (MSMT17_V2)"
            )
        logger.info("MSMT17 at %s: %s layout (%s/, %s/)", root, layout, *self.FOLDERS[layout])
        train_dir, test_dir = (root / d for d in self.FOLDERS[layout])
        splits = {}
        for split, lists in self.LISTS.items():
            image_dir = train_dir if split == "train" else test_dir
            records = [r for name in lists for r in _read_msmt_list(root / name, image_dir, root)]
            if not records:
                raise DatasetError(f"{' and '.join(str(root / n) for n in lists)} list no images")
            splits[split] = records
        splits["train"] = relabel(splits["train"])
        version = _check_published("MSMT17", splits, root)
        super().__init__("msmt17", **splits, version=layout if version != "custom" else version, root=root)
        self.layout = layout


def _read_msmt_list(list_file: Path, image_dir: Path, root: Path) -> list[ImageRecord]:
    if not list_file.is_file():
        raise DatasetError(f"MSMT17 list file not found: {list_file}")
    records = []
    with open(list_file, encoding="utf-8") as f:
        for line_no, line in enumerate(f, start=1):
            fields = line.split()
            if not fields:
                continue
            if len(fields) != 2 or not _is_int(fields[1]) or int(fields[1]) < 0:
                raise DatasetError(f"{list_file}:{line_no}: expected 'relative/path.jpg pid', got {line.strip()!r}")
            rel, pid = fields[0], int(fields[1])
            path = image_dir / rel
            if not path.is_file() and (root / rel).is_file():  # lines that already start with train/ or test/
                path = root / rel
            if not path.is_file():
                raise DatasetError(f"{list_file}:{line_no}: image not found: {path}")
            parts = Path(rel).name.split("_")
            if len(parts) < 3 or not parts[2].isdigit() or int(parts[2]) < 1:
                raise DatasetError(f"{list_file}:{line_no}: no 1-based camera in the third '_' field of {rel!r}")
            records.append(ImageRecord(str(path), pid, int(parts[2]) - 1))
    return records


def _is_int(text: str) -> bool:
    try:
        int(text)
    except ValueError:
        return False
    return True


# --------------------------------------------------------------------------- CSV


class CSVDataset(ReIDDataset):
    """A custom labelled set: a CSV with columns ``path,pid,split`` and optionally ``camid``.

    ``split`` is ``train``, ``query`` or ``gallery`` (``train`` rows may be absent with
    ``need_train=False``, for evaluation); ``camid`` is 0-based;
    relative paths are resolved against the CSV's folder. Without ``camid`` every
    distinct image gets its own camera, so the standard "same identity and same
    camera" removal of evaluation (DESIGN §6) removes exactly the query image
    itself from its ranking and nothing else.
    """

    REQUIRED = ("path", "pid", "split")

    def __init__(self, csv_path: str | os.PathLike, need_train: bool = True) -> None:
        csv_path = Path(csv_path)
        if not csv_path.is_file():
            raise DatasetError(f"CSV file not found: {csv_path}")
        base = csv_path.parent
        rows: list[tuple[str, int, int | None, str]] = []
        with open(csv_path, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            columns = [c.strip() for c in reader.fieldnames or []]
            missing = [c for c in self.REQUIRED if c not in columns]
            if missing:
                raise DatasetError(
                    f"CSV file {csv_path} lacks column(s) {', '.join(missing)} (has: {', '.join(columns) or 'none'}); "
                    "needed: path,pid,split and optionally camid"
                )
            has_camid = "camid" in columns
            for row in reader:
                line = reader.line_num
                row = {k.strip(): (v or "").strip() for k, v in row.items() if isinstance(k, str)}
                if not any(row.values()):
                    continue
                split = row["split"]
                if split not in SPLITS:
                    raise DatasetError(f"{csv_path}:{line}: split {split!r} is not one of {', '.join(SPLITS)}")
                if not _is_int(row["pid"]) or int(row["pid"]) < 0:
                    raise DatasetError(f"{csv_path}:{line}: pid {row['pid']!r} is not a non-negative integer")
                camid = None
                if has_camid:
                    if not _is_int(row["camid"]) or int(row["camid"]) < 0:
                        raise DatasetError(f"{csv_path}:{line}: camid {row['camid']!r} is not a non-negative integer")
                    camid = int(row["camid"])
                if not row["path"]:
                    raise DatasetError(f"{csv_path}:{line}: empty path")
                path = Path(row["path"]) if os.path.isabs(row["path"]) else base / row["path"]
                if not path.is_file():
                    raise DatasetError(f"{csv_path}:{line}: image not found: {path}")
                rows.append((str(path), int(row["pid"]), camid, split))
        if not has_camid:
            cams = {p: i for i, p in enumerate(sorted({r[0] for r in rows}))}
            rows = [(p, pid, cams[p], split) for p, pid, _, split in rows]
        splits: dict[str, list[ImageRecord]] = {s: [] for s in SPLITS}
        for path, pid, camid, split in rows:
            splits[split].append(ImageRecord(path, pid, int(camid)))
        empty = [s for s in SPLITS if not splits[s] and (need_train or s != "train")]
        if empty:
            raise DatasetError(f"CSV file {csv_path} has no rows for split(s) {', '.join(empty)}")
        splits["train"] = relabel(splits["train"])
        super().__init__("csv", **splits, version=None, root=csv_path)


# --------------------------------------------------------------------------- unlabeled image folder


class ImageFolderDataset(ReIDDataset):
    """Every image under ``root`` (recursively, sorted), unlabeled: the LUPerson-style pretraining set.

    Records have ``pid = camid = -1`` and sit in ``train`` (also ``records``).

    Args:
        root: folder to list (``.jpg .jpeg .png .bmp .webp``, hidden entries skipped).
        index_file: a text file of paths relative to ``root``, one a line. Read if
            it exists; otherwise written after listing once, so a 4M-image folder
            is walked a single time. Delete it after adding images.
        limit: keep only the first ``limit`` images (after filtering).
        filter_list: a text file of relative paths; only those images are kept.
    """

    def __init__(
        self,
        root: str | os.PathLike,
        index_file: str | os.PathLike | None = None,
        limit: int | None = None,
        filter_list: str | os.PathLike | None = None,
    ) -> None:
        root = _require_dir(Path(root), "image folder")
        if limit is not None and limit < 1:
            raise DatasetError(f"limit must be a positive number of images, got {limit}")
        if index_file is not None and Path(index_file).is_file():
            rel_paths = _read_path_list(Path(index_file))
            logger.info("read %d image paths from the index %s (delete it to list %s again)",
                        len(rel_paths), index_file, root)
        else:
            rel_paths = _list_images(root)
            if index_file is not None:
                _write_path_list(Path(index_file), rel_paths)
                logger.info("listed %d images under %s; index written to %s", len(rel_paths), root, index_file)
        if not rel_paths:
            raise DatasetError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) under {root}")
        if filter_list is not None:
            wanted = set(_read_path_list(Path(filter_list)))
            kept = [p for p in rel_paths if p in wanted]
            if len(kept) < len(wanted):
                logger.warning("%d of the %d paths in %s are not images under %s",
                               len(wanted) - len(kept), len(wanted), filter_list, root)
            if not kept:
                raise DatasetError(f"none of the paths in {filter_list} is an image under {root}")
            rel_paths = kept
        if limit is not None:
            rel_paths = rel_paths[:limit]
        records = [ImageRecord(str(root / p), -1, -1) for p in rel_paths]
        super().__init__("imagefolder", records, [], [], version=None, root=root)

    @property
    def records(self) -> list[ImageRecord]:
        return self.train


def _list_images(root: Path) -> list[str]:
    """Relative POSIX paths of every image below ``root``, sorted."""
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        rel_dir = Path(dirpath).relative_to(root)
        found.extend((rel_dir / name).as_posix() for name in filenames if _is_image_name(name))
    return sorted(found)


def _read_path_list(path: Path) -> list[str]:
    if not path.is_file():
        raise DatasetError(f"path list not found: {path}")
    with open(path, encoding="utf-8") as f:
        return [line.strip() for line in f if line.strip()]


def _write_path_list(path: Path, rel_paths: list[str]) -> None:
    """Write atomically: an interrupted write must not leave a truncated index to be trusted later."""
    with atomic_write(path, "w", encoding="utf-8") as f:
        f.writelines(p + "\n" for p in rel_paths)


# --------------------------------------------------------------------------- registry


_REGISTRY: dict[str, Callable[..., ReIDDataset]] = {
    "market1501": Market1501,
    "dukemtmc": DukeMTMC,
    "cuhk03np": CUHK03NP,
    "msmt17": MSMT17,
    "csv": CSVDataset,
    "imagefolder": ImageFolderDataset,
    "synthetic": SyntheticMarket,
}


def list_datasets() -> list[str]:
    """The names :func:`build_dataset` accepts."""
    return sorted(_REGISTRY)


def build_dataset(name: str, root: str | os.PathLike, *, need_train: bool = True, **kwargs: Any) -> ReIDDataset:
    """Load data set ``name`` from ``root`` (the CSV file for ``csv``).

    ``need_train=False`` (evaluation) lets a Market-layout set come without
    ``bounding_box_train``; other layouts load as usual.

    >>> ds = build_dataset("market1501", "data/Market-1501-v15.09.15")
    >>> ds.num_train_pids, len(ds.query)
    (751, 3368)
    """
    loader = _REGISTRY.get(name.lower())
    if loader is None:
        raise DatasetError(f"unknown data set {name!r}; choose one of {', '.join(list_datasets())}")
    if not need_train and "need_train" in inspect.signature(loader).parameters:
        kwargs["need_train"] = False
    dataset = loader(root, **kwargs)
    logger.info("%s", dataset.summary())
    return dataset
