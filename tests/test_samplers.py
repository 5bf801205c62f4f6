"""Samplers: P x K batches (published rule and cover-all), camera-aware pseudo-identity batches, DDP shares."""

from __future__ import annotations

from collections import Counter
from functools import lru_cache
from itertools import combinations

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, Dataset

from passreid.data.samplers import CameraAwareIdentitySampler, RandomIdentitySampler
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


def test_cover_all_epoch_covers_every_labelled_image_and_never_outliers():
    pids = make_pids(1)
    sampler = RandomIdentitySampler(pids, batch_size=16, num_instances=4, seed=0, cover_all=True)
    for epoch in (1, 2):
        sampler.set_epoch(epoch)
        seen = Counter(sampler)
        assert {i for i, p in enumerate(pids) if p >= 0} == set(seen)
        assert len(list(sampler)) == len(sampler)


def test_published_epoch_drops_leftovers_and_ends_when_fewer_than_p_identities_have_groups():
    """8 identities of 6 images, K 4, P 4: one group each (2 leftover images dropped) -> exactly 2 steps.

    cover_all tops each identity up to 2 groups -> 16 groups, at least 4 steps.
    """
    pids = [p for p in range(8) for _ in range(6)]
    published = RandomIdentitySampler(pids, batch_size=16, num_instances=4, seed=0)
    covering = RandomIdentitySampler(pids, batch_size=16, num_instances=4, seed=0, cover_all=True)
    for epoch in range(5):
        published.set_epoch(epoch)
        covering.set_epoch(epoch)
        batches = published.global_batches()
        assert len(batches) == 2 and len(covering.global_batches()) >= 4
        used = np.concatenate(batches)
        assert len(set(used.tolist())) == 32  # no image twice: 4 of each identity's 6
        assert sorted(Counter(pids[i] for i in used).values()) == [4] * 8


def published_step_counts(sizes: list[int], k: int, p: int) -> set[int]:
    """Every possible number of steps of the published rule, by exhaustive search over the draws."""
    groups = tuple(max(n // k, 1) for n in sizes)  # fewer than K images: one group drawn with replacement

    @lru_cache(maxsize=None)
    def counts(left: tuple[int, ...]) -> frozenset[int]:
        live = [i for i, g in enumerate(left) if g]
        if len(live) < p:
            return frozenset({0})
        out: set[int] = set()
        for chosen in combinations(live, p):
            nxt = tuple(g - (i in chosen) for i, g in enumerate(left))
            out |= {c + 1 for c in counts(nxt)}
        return frozenset(out)

    return set(counts(groups))


def test_published_step_count_matches_an_exhaustive_reference():
    sizes = [4, 4, 9, 2, 5, 13, 3]  # groups 1, 1, 2, 1, 1, 3, 1 (K 4): 10 groups
    pids = [p for p, n in enumerate(sizes) for _ in range(n)]
    possible = published_step_counts(sizes, k=4, p=3)
    assert possible == {2, 3}  # 10 groups, P 3: 3 steps, or 2 when identity 5 is left holding 2 groups
    sampler = RandomIdentitySampler(pids, batch_size=12, num_instances=4, seed=1)
    covering = RandomIdentitySampler(pids, batch_size=12, num_instances=4, seed=1, cover_all=True)
    for epoch in range(20):
        sampler.set_epoch(epoch)
        covering.set_epoch(epoch)
        steps = len(sampler.global_batches())
        assert steps in possible
        assert len(sampler) == steps * 12
        assert len(covering.global_batches()) >= 4


def test_small_identities_draw_k_with_replacement_and_large_ones_do_not_repeat_within_a_block():
    pids = [0] * 2 + [1] * 6 + [2] * 4 + [3] * 5
    for cover_all in (False, True):
        sampler = RandomIdentitySampler(pids, batch_size=8, num_instances=4, seed=0, cover_all=cover_all)
        for epoch in range(6):
            sampler.set_epoch(epoch)
            for batch in sampler.global_batches():
                for block in batch.reshape(2, 4):
                    pid = pids[block[0]]
                    assert all(pids[i] == pid for i in block)
                    if pid == 0:
                        assert set(block.tolist()) <= {0, 1}  # its two images, repeated to K
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


# ----------------------------------------------------------------------------- camera-aware (cluster contrast)


def test_camera_aware_blocks_take_positives_from_other_cameras_and_every_cluster_once_per_pass():
    """Hand-made clusters, K 4:

    - 0: anchor's camera differs from 5 others -> 3 distinct other-camera images (no replacement, pool >= K);
    - 1: 1 image in camera 0, 2 in camera 1 -> other-camera pool of 1 or 2 (< K): drawn with replacement;
    - 2: one camera, 5 images -> the 3 positives are other images of that camera, no replacement;
    - 3: one camera, 2 images -> the other image, 3 times;
    - 4: one image -> itself 4 times.
    """
    layout = {0: [0, 0, 1, 2, 3, 1, 2], 1: [0, 1, 1], 2: [4] * 5, 3: [5, 5], 4: [2]}
    pids, cams = [], []
    for pid, pid_cams in layout.items():
        pids += [pid] * len(pid_cams)
        cams += pid_cams
    pids += [-1, -1]  # outliers
    cams += [0, 1]
    sampler = CameraAwareIdentitySampler(pids, cams, batch_size=4, num_instances=4, seed=0)
    for epoch in range(30):
        sampler.set_epoch(epoch)
        batches = sampler.global_batches()
        assert len(batches) == 5 and sorted(pids[b[0]] for b in batches) == [0, 1, 2, 3, 4]  # each once
        for block in batches:
            anchor, rest = int(block[0]), [int(i) for i in block[1:]]
            pid = pids[anchor]
            assert all(pids[i] == pid for i in rest)
            if pid in (0, 1):
                assert all(cams[i] != cams[anchor] for i in rest)  # cross-camera positives only
            if pid == 0:
                assert len(set(rest)) == 3
            if pid in (2, 3):
                assert anchor not in rest  # same camera: the other images
            if pid == 2:
                assert len(set(rest)) == 3
            if pid == 4:
                assert rest == [anchor] * 3


def test_camera_aware_pass_is_uniform_over_clusters_not_sizes():
    """A 40-image cluster and nine 4-image clusters, P 2: one pass is 10 blocks = 5 batches, each cluster once.

    A size-weighted sampler would put the big cluster in most batches.
    """
    pids = [0] * 40 + [p for p in range(1, 10) for _ in range(4)]
    cams = [i % 6 for i in range(len(pids))]
    sampler = CameraAwareIdentitySampler(pids, cams, batch_size=8, num_instances=4, seed=3)
    counts = Counter()
    for epoch in range(20):
        sampler.set_epoch(epoch)
        batches = sampler.global_batches()
        assert len(batches) == 5
        for batch in batches:
            counts.update({pids[int(i)] for i in batch})
    assert counts == Counter({p: 20 for p in range(10)})


def test_camera_aware_pass_drops_an_incomplete_last_batch_and_splits_ranks_by_blocks():
    pids = [p for p in range(7) for _ in range(3)]
    cams = [i % 2 for i in range(len(pids))]
    sampler = CameraAwareIdentitySampler(pids, cams, batch_size=8, num_instances=2, seed=0)  # P 4
    sampler.set_epoch(1)
    assert len(sampler.global_batches()) == 1  # 7 clusters: one batch of 4, the other 3 wait
    ranks = []
    for rank in range(2):
        share = CameraAwareIdentitySampler(pids, cams, batch_size=8, num_instances=2, seed=0, rank=rank,
                                           world_size=2)
        share.set_epoch(1)
        ranks.append(list(share))
    assert ranks[0] + ranks[1] == sampler.global_batches()[0].tolist()
