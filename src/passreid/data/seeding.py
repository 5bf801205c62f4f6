"""Augmentation randomness as a pure function of (run seed, rank, epoch, position of the sample in the epoch).

A loader worker normally augments from its own random stream, seeded once per
epoch: what sample ``i`` gets then depends on which worker took it and what
that worker drew before. A run resumed inside an epoch starts its workers
afresh at the resumed batch, so the images after it were augmented
differently than in the uninterrupted run, and a run with another
``num_workers`` trains on other images altogether.

Here every sample carries its own seed instead: :class:`PositionSeeds` wraps a
sampler and yields ``(index, seed)``, the seed drawn from
``(run seed, rank, epoch)`` at the sample's position in the epoch, and
:class:`~passreid.data.images.ImageDataset` reads and transforms the image
inside :func:`seeded_rng`. The augmentation is then the same in the main
process or in any worker, and a resumed run needs only the sampler position.

Example:
    >>> sampler = RandomIdentitySampler(pids, batch_size=64, num_instances=4, seed=cfg.run.seed)
    >>> loader = DataLoader(ImageDataset(records, transform), batch_size=64,
    ...                     sampler=PositionSeeds(sampler, batch_size=64), num_workers=8)
    >>> sampler.set_epoch(epoch, start_batch=step)  # the batches, and their augmentation, from `step` on
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import Iterator
from typing import Any, Protocol

import numpy as np
import torch
from torch.utils.data import Sampler


class PositionedSampler(Protocol):
    """What :class:`PositionSeeds` reads from the sampler it wraps (both P x K samplers and the pretraining
    sampler have it): the batches of ``epoch`` for this ``rank`` from batch ``start_batch`` on."""

    seed: int
    rank: int
    epoch: int
    start_batch: int

    def __iter__(self) -> Iterator[int]: ...

    def __len__(self) -> int: ...


class PositionSeeds(Sampler[tuple[int, int]]):
    """Yields ``(index, seed)``: the wrapped sampler's indices, each with the seed of its position in the epoch.

    Position ``p`` (counted from the epoch's first batch, including the
    ``start_batch * batch_size`` skipped ones) gets raw draw ``p`` of a PCG64
    stream seeded with ``(seed, rank, epoch)``, so a resumed epoch hands the
    same seed to the same sample. Position the wrapped sampler as before
    (``sampler.set_epoch(epoch, start_batch=...)``).

    Args:
        sampler: the sampler to wrap (see :class:`PositionedSampler`).
        batch_size: indices per batch of this rank, to count the skipped ones.
    """

    def __init__(self, sampler: PositionedSampler, batch_size: int) -> None:
        self.sampler = sampler
        self.batch_size = batch_size

    def __iter__(self) -> Iterator[tuple[int, int]]:
        s = self.sampler
        stream = np.random.PCG64([s.seed % 2**64, s.rank, s.epoch])
        stream.advance(s.start_batch * self.batch_size)
        for index in s:
            yield int(index), int(stream.random_raw())

    def __len__(self) -> int:
        return len(self.sampler)


@contextlib.contextmanager
def seeded_rng(seed: int) -> Iterator[None]:
    """Seed torch's CPU generator, ``random`` and numpy's global generator with ``seed`` (0 to 2**64 - 1), and
    give back their previous states on exit, so a sample read in the main process (``num_workers=0``) takes
    nothing from the training's random streams. CUDA generators are not touched."""
    saved: tuple[Any, ...] = (torch.default_generator.get_state(), random.getstate(), np.random.get_state())
    torch.default_generator.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed % 2**32)
    try:
        yield
    finally:
        torch.default_generator.set_state(saved[0])
        random.setstate(saved[1])
        np.random.set_state(saved[2])
