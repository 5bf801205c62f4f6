"""Per-sample augmentation seeds: the same images whatever the worker count, and from a resumed position."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import DataLoader

from passreid.data.datasets import ImageRecord
from passreid.data.images import ImageDataset
from passreid.data.samplers import RandomIdentitySampler
from passreid.data.seeding import PositionSeeds, seeded_rng
from passreid.data.transforms import build_train_transform

pytestmark = pytest.mark.usefixtures("one_thread")

BATCH = 4  # 2 identities x 2 images


@pytest.fixture(scope="module")
def records(tmp_path_factory: pytest.TempPathFactory) -> list[ImageRecord]:
    """4 identities x 4 small random images."""
    root = tmp_path_factory.mktemp("seeding")
    rng = np.random.default_rng(0)
    out = []
    for i in range(16):
        path = root / f"{i:02d}.png"
        Image.fromarray(rng.integers(0, 255, size=(24, 12, 3), dtype=np.uint8)).save(path)
        out.append(ImageRecord(str(path), i // 4, i % 2))
    return out


def sampler_of(records: list[ImageRecord], seed: int = 5, rank: int = 0) -> RandomIdentitySampler:
    return RandomIdentitySampler([r.pid for r in records], BATCH, 2, seed=seed, rank=rank)


def epoch_batches(records: list[ImageRecord], workers: int, epoch: int = 1, start_batch: int = 0) -> list[Tensor]:
    sampler = sampler_of(records)
    sampler.set_epoch(epoch, start_batch=start_batch)
    dataset = ImageDataset(records, transform=build_train_transform((16, 8), padding=2, erasing_p=0.5))
    loader = DataLoader(dataset, batch_size=BATCH, sampler=PositionSeeds(sampler, BATCH), num_workers=workers,
                        drop_last=True, generator=torch.Generator())
    return [images for images, *_ in loader]


def test_seeds_depend_on_seed_rank_epoch_and_position_only(records: list[ImageRecord]) -> None:
    def pairs(epoch: int, start_batch: int = 0, seed: int = 5, rank: int = 0) -> list[tuple[int, int]]:
        sampler = sampler_of(records, seed=seed, rank=rank)
        sampler.set_epoch(epoch, start_batch=start_batch)
        return list(PositionSeeds(sampler, BATCH))

    full = pairs(1)
    assert len(full) == len(sampler_of(records).global_batches()) * BATCH
    assert len({s for _, s in full}) == len(full)  # an image drawn twice in an epoch is augmented twice
    assert pairs(1, start_batch=2) == full[2 * BATCH:]  # a resumed epoch hands out the same seeds
    assert pairs(1) == full
    assert {s for _, s in pairs(2)}.isdisjoint(s for _, s in full)
    assert {s for _, s in pairs(1, seed=6)}.isdisjoint(s for _, s in full)


def test_batches_are_the_same_with_0_and_2_workers_and_after_a_resume(records: list[ImageRecord]) -> None:
    alone = epoch_batches(records, workers=0)
    assert len(alone) >= 3
    for got in (epoch_batches(records, workers=2), epoch_batches(records, workers=1)):
        assert len(got) == len(alone) and all(torch.equal(a, b) for a, b in zip(got, alone))
    resumed = epoch_batches(records, workers=2, start_batch=2)
    assert len(resumed) == len(alone) - 2 and all(torch.equal(a, b) for a, b in zip(resumed, alone[2:]))
    other_epoch = epoch_batches(records, workers=0, epoch=2)
    assert not torch.equal(other_epoch[0], alone[0])  # the augmentation is random, only reproducibly so


def test_a_sample_read_in_the_main_process_leaves_the_training_streams_alone(records: list[ImageRecord]) -> None:
    torch.manual_seed(1)
    random.seed(1)
    np.random.seed(1)
    expected = (torch.rand(3), random.random(), np.random.rand())
    torch.manual_seed(1)
    random.seed(1)
    np.random.seed(1)
    epoch_batches(records, workers=0)
    assert (torch.equal(torch.rand(3), expected[0]), random.random(), np.random.rand()) == (True, *expected[1:])


def test_seeded_rng_seeds_every_generator_and_restores_them() -> None:
    before = torch.get_rng_state()
    with seeded_rng(2**64 - 1):
        drawn = (torch.rand(2), random.random(), np.random.rand())
    assert torch.equal(torch.get_rng_state(), before)
    with seeded_rng(2**64 - 1):
        again = (torch.rand(2), random.random(), np.random.rand())
    assert torch.equal(drawn[0], again[0]) and drawn[1:] == again[1:]

