"""The training loaders of every stage, from keyword arguments (a stage translates its config).

One seeding rule for all (:func:`seeded_loader`): each index carries the seed of
its position in the epoch (:class:`~passreid.data.seeding.PositionSeeds`), and the
loader has its own generator, so creating an epoch's iterator takes nothing from
the global torch RNG and the augmentation does not depend on ``num_workers``: a
run stopped inside an epoch resumes to the weights of the uninterrupted one.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Callable, Generator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Sampler

from passreid.data.images import ImageDataset
from passreid.data.records import CompactRecords, ImageRecord, dataset_fingerprint
from passreid.data.samplers import CameraAwareIdentitySampler, EpochSampler, RandomIdentitySampler
from passreid.data.seeding import PositionSeeds
from passreid.data.transforms import build_test_transform, build_train_transform


def seeded_loader(dataset: Dataset, sampler: Sampler[int], batch_size: int, *, num_workers: int, pin_memory: bool,
                  collate_fn: Callable[[list[Any]], Any] | None = None) -> DataLoader:
    """Batches of ``batch_size`` (this rank's) in ``sampler``'s order, every image augmented from the seed
    of its position in the epoch; incomplete last batches are dropped."""
    return DataLoader(dataset, batch_size=batch_size, sampler=PositionSeeds(sampler, batch_size),
                      num_workers=num_workers, collate_fn=collate_fn, pin_memory=pin_memory, drop_last=True,
                      generator=torch.Generator())


def identity_loader(
    records: Sequence[ImageRecord],
    *,
    img_size: Sequence[int],
    mean: Sequence[float],
    std: Sequence[float],
    color_jitter: float = 0.0,
    erasing: str = "random",
    batch_size: int,
    num_instances: int,
    seed: int,
    rank: int = 0,
    world_size: int = 1,
    cover_all: bool = False,
    camera_aware: bool = False,
    num_workers: int = 0,
    skip_corrupt: bool = False,
    pin_memory: bool = False,
) -> tuple[DataLoader, RandomIdentitySampler | CameraAwareIdentitySampler]:
    """P x K batches of this rank with the ReID training augmentation (resize, flip, pad + crop, erasing).

    ``batch_size`` is the total over the ``world_size`` processes, ``num_instances`` is K.
    ``camera_aware`` takes every identity once per pass with positives from other cameras
    (:class:`CameraAwareIdentitySampler`, cluster contrast), else :class:`RandomIdentitySampler`.
    """
    transform = build_train_transform(img_size, mean, std, color_jitter=color_jitter, erasing=erasing)
    dataset = ImageDataset(records, transform=transform, skip_corrupt=skip_corrupt)
    pids = [r.pid for r in records]
    shape: dict[str, Any] = dict(num_instances=num_instances, seed=seed, rank=rank, world_size=world_size)
    sampler: RandomIdentitySampler | CameraAwareIdentitySampler
    if camera_aware:
        sampler = CameraAwareIdentitySampler(pids, [r.camid for r in records], batch_size=batch_size, **shape)
    else:
        sampler = RandomIdentitySampler(pids, batch_size, cover_all=cover_all, **shape)
    loader = seeded_loader(dataset, sampler, sampler.batch_size_per_rank, num_workers=num_workers,
                           pin_memory=pin_memory)
    return loader, sampler


def endless_batches(loader: DataLoader, sampler: RandomIdentitySampler | CameraAwareIdentitySampler, epoch: int,
                    start_step: int = 0) -> Generator[tuple[Tensor, Tensor], None, None]:
    """``(images, pids)`` of ``loader`` pass after pass, each pass with its own shuffle (the published
    IterLoader): a pass rarely covers exactly an epoch's steps. The batches are a function of
    (seed, epoch, step); ``start_step`` skips the epoch's first batches to continue a stopped epoch."""
    for sub_epoch in itertools.count():
        sampler.set_epoch(epoch * 1000 + sub_epoch)
        if start_step and start_step >= len(sampler.global_batches()):  # a pass the stopped epoch had finished
            start_step -= len(sampler.global_batches())
            continue
        sampler.set_epoch(epoch * 1000 + sub_epoch, start_batch=start_step)
        start_step = 0
        for images, pids, _, _ in loader:
            yield images, pids


def folder_loader(
    root: str | os.PathLike,
    *,
    transform: Callable[[Any], Any],
    collate_fn: Callable[[list[Any]], Any] | None = None,
    batch_size: int,
    seed: int,
    rank: int = 0,
    world_size: int = 1,
    index_file: str = "",
    limit: int = 0,
    filter_list: str = "",
    num_workers: int = 0,
    skip_corrupt: bool = False,
    pin_memory: bool = False,
) -> tuple[DataLoader, EpochSampler, dict[str, Any]]:
    """This rank's loader over an unlabelled image folder (``batch_size`` per rank), its sampler
    (a new permutation every epoch) and the folder's fingerprint.

    ``index_file`` (relative to ``root``) lists the images once; ``limit`` keeps the first
    N, ``filter_list`` only those it names (0 / "": off).
    """
    from passreid.data.datasets import ImageFolderDataset

    index = Path(root) / index_file if index_file else None
    folder = ImageFolderDataset(root, index_file=index, limit=limit or None, filter_list=filter_list or None)
    fingerprint = dataset_fingerprint(folder.records, root)
    records = CompactRecords(folder.records)
    del folder
    sampler = EpochSampler(len(records), batch_size, seed=seed, rank=rank, world_size=world_size)
    dataset = ImageDataset(records, transform=transform, skip_corrupt=skip_corrupt)
    loader = seeded_loader(dataset, sampler, batch_size, num_workers=num_workers, pin_memory=pin_memory,
                           collate_fn=collate_fn)
    return loader, sampler, fingerprint


def test_loader(records: Sequence[ImageRecord], *, img_size: Sequence[int], mean: Sequence[float],
                std: Sequence[float], batch_size: int, num_workers: int = 0, skip_corrupt: bool = False) -> DataLoader:
    """Test-transform batches of ``records`` in order (feature statistics, not training); iterating them takes
    nothing from the global torch RNG, so a run's training draws do not depend on how often it evaluates."""
    dataset = ImageDataset(records, transform=build_test_transform(img_size, mean, std), skip_corrupt=skip_corrupt)
    return DataLoader(dataset, batch_size=batch_size, num_workers=num_workers, generator=torch.Generator())
