"""RandomIdentitySampler: P x K batches, coverage, determinism, DDP shares."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, Dataset

from passreid.data.samplers import RandomIdentitySampler
from passreid.errors import DatasetError


def make_pids(seed: int = 0) -> list[int]:
    """30 identities with 1..11 images each, interleaved, plus a few outliers (-1)."""
    rng = np.random.default_rng(seed)
    pids = [p for p in range(30) for _ in range(int(rng.integers(1, 12)))] + [-1] * 7
    return [pids[i] for i in rng.permutation(len(pids))]


def test_every_batch_is_p_identities_times_k_images():
    pids = make_pids()
    sampler = RandomIdentitySampler(pids, batch_size=32, num_instances=4, seed=3)
    sampler.set_epoch(1)
    batches = sampler.global_batches()
    assert batches
    for batch in batches:
        assert len(batch) == 32
        blocks = batch.reshape(8, 4)
        block_pids = [{pids[i] for i in block} for block in blocks]
        assert all(len(s) == 1 for s in block_pids)  # each K-block is one identity
        assert len({next(iter(s)) for s in block_pids}) == 8  # P distinct identities


def test_epoch_covers_every_labelled_image_and_never_outliers():
    pids = make_pids(1)
    sampler = RandomIdentitySampler(pids, batch_size=16, num_instances=4, seed=0)
    for epoch in (1, 2):
        sampler.set_epoch(epoch)
        seen = Counter(sampler)
        assert {i for i, p in enumerate(pids) if p >= 0} == set(seen)
        assert len(list(sampler)) == len(sampler)


def test_small_identities_repeat_and_large_ones_do_not_within_a_block():
    pids = [0] * 2 + [1] * 6 + [2] * 4 + [3] * 5
    sampler = RandomIdentitySampler(pids, batch_size=8, num_instances=4, seed=0)
    sampler.set_epoch(0)
    for batch in sampler.global_batches():
        for block in batch.reshape(2, 4):
            pid = pids[block[0]]
            if pid == 0:
                assert sorted(set(block.tolist())) == [0, 1]  # both images, repeated to K
            else:
                assert len(set(block.tolist())) == 4


def test_batches_depend_only_on_seed_and_epoch():
    pids = make_pids()

    def batches(seed: int, epoch: int) -> list[list[int]]:
        sampler = RandomIdentitySampler(pids, batch_size=16, num_instances=4, seed=seed)
        sampler.set_epoch(epoch)
        return [b.tolist() for b in sampler.global_batches()]

    assert batches(0, 5) == batches(0, 5)
    assert batches(0, 5) != batches(0, 6)
    assert batches(0, 5) != batches(1, 5)


def test_ranks_take_disjoint_whole_identity_shares_of_the_same_batches():
    pids = make_pids()
    full = RandomIdentitySampler(pids, batch_size=32, num_instances=4, seed=2)
    full.set_epoch(4)
    shares = []
    for rank in range(2):
        sampler = RandomIdentitySampler(pids, batch_size=32, num_instances=4, seed=2, rank=rank, world_size=2)
        sampler.set_epoch(4)
        assert sampler.batch_size_per_rank == 16
        shares.append(np.array(list(sampler)).reshape(-1, 16))
    merged = np.concatenate(shares, axis=1)  # rank 0's half, then rank 1's half of each batch
    assert merged.tolist() == [b.tolist() for b in full.global_batches()]
    for share in shares:
        for batch in share:
            assert set(Counter(pids[i] for i in batch).values()) == {4}


def test_start_batch_skips_the_batches_already_trained():
    pids = make_pids()
    sampler = RandomIdentitySampler(pids, batch_size=16, num_instances=4, seed=0)
    sampler.set_epoch(2)
    everything = list(sampler)
    sampler.set_epoch(2, start_batch=3)
    assert list(sampler) == everything[3 * 16 :]
    assert len(sampler) == len(everything) - 3 * 16


class Indices(Dataset):
    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> int:
        return i


def test_data_loader_batches_are_aligned_with_the_blocks():
    pids = make_pids()
    sampler = RandomIdentitySampler(pids, batch_size=16, num_instances=4, seed=0)
    sampler.set_epoch(1)
    loader = DataLoader(Indices(len(pids)), batch_size=16, sampler=sampler)
    for batch, expected in zip(loader, sampler.global_batches(), strict=True):
        assert torch.equal(batch, torch.from_numpy(expected))


def test_bad_settings_are_refused():
    pids = make_pids()
    with pytest.raises(ValueError, match="multiple of num_instances"):
        RandomIdentitySampler(pids, batch_size=18, num_instances=4)
    with pytest.raises(ValueError, match="multiple of num_instances x world_size"):
        RandomIdentitySampler(pids, batch_size=12, num_instances=4, world_size=2)
    with pytest.raises(DatasetError, match="identities"):
        RandomIdentitySampler([0, 0, 1, 1], batch_size=12, num_instances=2)
