"""The chunked evaluation protocol behind :func:`passreid.evaluation.evaluate`: rank, count, average.

The protocol (DESIGN §6) ranks the whole gallery for every query by ascending distance,
drops gallery items that share both identity and camera with the query ("junk"), skips
queries that are left without a correct match, and averages AP, the CMC curve and INP over
the remaining ("valid") queries.

The published code argsorts every gallery row (an ``int64`` index per query x gallery
pair) and then loops over queries in Python. Here no gallery row is sorted: a metric needs
only the rank of each correct match among the valid (non-junk) gallery items, and an item
farther than a query's last correct match changes none of them. So each query takes the
distance of its farthest correct match as a threshold and ranks only the items at or
below it. On the CPU each row's such items are sorted (a few percent of the gallery for a
trained model) and each match's distance looked up among them; query chunks run in
parallel threads, each product followed at once by its ranking. On other devices
(one batched pass per chunk) every kept item and each correct match get a unique ``int64``
key (row, the float's order-preserving bit pattern, gallery index), and one
``searchsorted`` of the kept items' keys among the sorted keys of the matches, then a
histogram, gives every match's 1-based rank. AP, INP and the CMC follow from those ranks
alone. The work beyond the comparison is proportional to the items ranked before the last
match, not to the gallery.

Tie rule: items at equal distance keep gallery order (the order of a stable sort, e.g.
``numpy.argsort(kind="stable")``). The published code uses numpy's default quicksort,
whose order among exact ties is unspecified; with real-valued features exact ties are
rare and the two agree everywhere else. Distances are compared in ``float32`` (as the
published code computes them); ``-0.0`` counts as ``0.0``.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from passreid.distance import ArrayLike, entries_at_most
from passreid.errors import DatasetError

logger = logging.getLogger(__name__)

#: Working memory allowed per query chunk when ``chunk_size`` is not given.
DEFAULT_CHUNK_BYTES = 256 * 2**20
# Bytes of working memory per (query, gallery) element of a chunk: the float32 distance and
# the bool candidate mask, plus the candidates' index, key and bucket when most items rank
# before the last match (a hard query); typical queries keep a few percent of the items.
_BYTES_PER_ELEMENT = 16
# On the CPU, with rows ranked one at a time, a chunk's working memory is its float32 block.
_CPU_BYTES_PER_ELEMENT = 4
# Key layout, high to low: chunk row, 32 order bits of the float32 distance, gallery index.
_ORDER_BITS = 32


def _as_long_vector(x: ArrayLike, name: str, length: int) -> torch.Tensor:
    t = torch.as_tensor(x).long().reshape(-1)
    if t.numel() != length:
        raise ValueError(f"{name} has {t.numel()} entries, expected {length}")
    return t


def _index_bits(num_gallery: int) -> int:
    """Bits that hold any gallery index."""
    return max(1, math.ceil(math.log2(max(num_gallery, 2))))


def _check_finite_order(dist: torch.Tensor) -> None:
    """Raise ``ValueError`` if a distance is NaN (one pass over the float bits).

    Args:
        dist: ``(C, G)`` float32.
    """
    if dist.numel() == 0:
        return
    low, high = torch.aminmax(dist.view(torch.int32))
    # A NaN's pattern is above +inf's, or has the sign bit set (negative as int32): look at
    # the values only when one could be there.
    if (int(high) > 0x7F800000 or int(low) < 0) and bool(torch.isnan(dist).any()):
        raise ValueError("NaN distance (features with huge or non-finite values?)")


def _keys(dist: torch.Tensor, index: torch.Tensor, row: torch.Tensor, index_bits: int) -> torch.Tensor:
    """Unique int64 keys whose order is the (row, distance, gallery index) order.

    Args:
        dist: ``(S,)`` float32 distances (no NaN).
        index: ``(S,)`` int64 gallery indices, ``< 2**index_bits``.
        row: ``(S,)`` int64 rows within the chunk, ``< 2**(63 - 32 - index_bits)``.
        index_bits: bits reserved for the gallery index.

    Returns:
        ``(S,)`` int64 ``row * 2**(32 + b) + order(dist) * 2**b + index`` (``b`` =
        ``index_bits``); ``-0.0`` and ``0.0`` get the same order.
    """
    bits = dist.contiguous().view(torch.int32)
    # IEEE floats order like sign-magnitude integers: flipping the 31 low bits of the
    # negative ones makes the int32 order the float order; subtracting the sign then
    # merges -0.0 with +0.0 (both become 0) and keeps every other negative below 0.
    sign = bits >> 31
    order = ((bits ^ (sign & 0x7FFFFFFF)) - sign).to(torch.int64) + 2**31  # in [0, 2**32)
    return ((row << _ORDER_BITS) + order).bitwise_left_shift_(index_bits).add_(index)


def _scans_rows(device: torch.device) -> bool:
    """Whether chunks on ``device`` are ranked row by row (:func:`_items_up_to`) rather than
    through keys of every candidate (one batched search, for GPUs)."""
    return device.type == "cpu"


# Above this many items a row's candidates are radix-sorted by torch (3x faster than numpy's
# comparison sort at 80,000 on 2 cores; slower on a few thousand).
_RADIX_SORT_FROM = 16384


def _sorted(x: np.ndarray) -> np.ndarray:
    """``x`` ``(N,)`` float32 sorted ascending (``x`` itself may be sorted in place and returned)."""
    if x.size >= _RADIX_SORT_FROM:
        bits = x.view(np.int32)
        # Without the sign bit (no negative numbers, no -0.0) the int32 patterns order like the floats.
        if bits.min() >= 0:
            # stable=True: torch radix-sorts integers
            return torch.sort(torch.from_numpy(bits), stable=True).values.numpy().view(np.float32)
    x.sort()
    return x


def _items_up_to(
    dist: np.ndarray, match_dist: np.ndarray, match_cols: np.ndarray, first: list[int], count: list[int]
) -> np.ndarray:
    """For every correct match, the gallery items of its row that rank at or before it.

    Row by row: the items no farther than the row's last match are sorted (a few percent
    of the gallery for a trained model, all of it at worst) and each match's distance
    is looked up among them. An item tied with a match ranks before it when earlier in
    gallery order (stable sort); such ties are counted directly. A row fits in the
    core's cache, so the chunk is read once from memory, and nothing gallery-sized is
    ``int64``.

    Args:
        dist: ``(C, G)`` float32 distances (no NaN).
        match_dist, match_cols: ``(P,)`` distance and gallery index of each match, row by
            row, each row's in ascending (distance, index) order.
        first, count: per row, the position of its first match and how many it has.

    Returns:
        ``(P,)`` int64 counts, the match itself included (junk too: the caller removes it).
    """
    upto = np.empty(match_dist.shape[0], dtype=np.int64)
    for r, (s, n) in enumerate(zip(first, count, strict=True)):
        if n == 0:
            continue
        row, p = dist[r], match_dist[s : s + n]
        near = _sorted(np.compress(row <= p[-1], row))  # 1.5x faster than row[mask]
        below = near.searchsorted(p, "left")
        upto[s : s + n] = below + 1
        tied = near.searchsorted(p, "right") - below
        if tied.max() > 1:
            for j in np.flatnonzero(tied > 1).tolist():
                # items at exactly this distance (besides the match): earlier gallery items first
                upto[s + j] += np.count_nonzero(row[: match_cols[s + j]] == p[j])
    return upto


class _Stats:
    """Sums over queries: AP, INP, valid queries, queries, and first-match rank counts."""

    def __init__(self, max_rank: int) -> None:
        self.ap_sum = 0.0
        self.inp_sum = 0.0
        self.num_valid = 0
        self.num_queries = 0
        # first_match[r]: valid queries whose first correct match has rank r + 1
        # (r = max_rank collects everything beyond).
        self.first_match = torch.zeros(max_rank + 1, dtype=torch.int64)

    def add(self, other: _Stats) -> None:
        self.ap_sum += other.ap_sum
        self.inp_sum += other.inp_sum
        self.num_valid += other.num_valid
        self.num_queries += other.num_queries
        self.first_match += other.first_match


class _Protocol:
    """Accumulates AP, INP and first-match ranks of query chunks against one gallery.

    Args:
        g_pids, g_camids: ``(G,)`` int64 gallery labels on the working device.
        max_rank: CMC length.
    """

    def __init__(self, g_pids: torch.Tensor, g_camids: torch.Tensor, max_rank: int) -> None:
        self.g_pids = g_pids
        self.g_camids = g_camids
        self.max_rank = max_rank
        self.index_bits = _index_bits(g_pids.numel())
        # Rows of one key block: the row number must fit above the order and index bits.
        self.key_rows = max(1, 2 ** max(0, 63 - _ORDER_BITS - self.index_bits) - 1)
        # Gallery indices grouped by identity: a query's same-identity items are one slice.
        self.by_pid = torch.argsort(g_pids, stable=True)
        self.sorted_pids = g_pids[self.by_pid]
        self.total = _Stats(max_rank)

    def _same_identity(
        self, q_pids: torch.Tensor, q_camids: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(row, gallery index, is junk) of every same-identity pair of a chunk, row-major.

        Found through the identity-sorted gallery, so the cost is the number of pairs,
        not ``C x G``. Junk pairs share the camera; the others are the correct matches.
        """
        lo = torch.searchsorted(self.sorted_pids, q_pids)
        counts = torch.searchsorted(self.sorted_pids, q_pids, right=True) - lo
        rows = torch.repeat_interleave(torch.arange(q_pids.numel(), device=q_pids.device), counts)
        within = torch.arange(rows.numel(), device=rows.device) - (torch.cumsum(counts, 0) - counts)[rows]
        cols = self.by_pid[lo[rows] + within]
        return rows, cols, self.g_camids[cols] == q_camids[rows]

    def add_chunk(
        self, dist: torch.Tensor, q_pids: torch.Tensor, q_camids: torch.Tensor, *, check_nan: bool = True
    ) -> None:
        """Add the metrics of one query chunk (see :meth:`chunk_stats`)."""
        self.total.add(self.chunk_stats(dist, q_pids, q_camids, check_nan=check_nan))

    def chunk_stats(
        self, dist: torch.Tensor, q_pids: torch.Tensor, q_camids: torch.Tensor, *, check_nan: bool = True
    ) -> _Stats:
        """The metric sums of one query chunk; reads only the protocol, so chunks can run in threads.

        Args:
            dist: ``(C, G)`` float32 distances of the chunk's queries (not modified).
            q_pids, q_camids: ``(C,)`` int64 on ``dist``'s device.
            check_nan: look for NaN distances (skipped when the features were checked).
        """
        if check_nan:
            _check_finite_order(dist)
        stats = _Stats(self.max_rank)
        for start in range(0, dist.shape[0], self.key_rows):
            stop = start + self.key_rows
            stats.add(self._rows_stats(dist[start:stop], q_pids[start:stop], q_camids[start:stop]))
        return stats

    def _rows_stats(self, dist: torch.Tensor, q_pids: torch.Tensor, q_camids: torch.Tensor) -> _Stats:
        """:meth:`chunk_stats` for at most ``key_rows`` rows."""
        num_rows = dist.shape[0]
        stats = _Stats(self.max_rank)
        stats.num_queries = num_rows
        device = dist.device
        rows, cols, junk = self._same_identity(q_pids, q_camids)
        pos_rows, pos_cols = rows[~junk], cols[~junk]
        num_pos = torch.bincount(pos_rows, minlength=num_rows)
        if pos_rows.numel() == 0:
            return stats
        # The correct matches, sorted by key: row by row, each row's in rank order.
        pos_dist = dist[pos_rows, pos_cols]
        pos_key, by_key = _keys(pos_dist, pos_cols, pos_rows, self.index_bits).sort()
        end = torch.cumsum(num_pos, 0)  # matches of row i: pos_key[end[i] - num_pos[i] : end[i]]
        first_slot = end - num_pos
        key_rows = torch.repeat_interleave(torch.arange(num_rows, device=device), num_pos)

        def within_rows(per_slot: torch.Tensor) -> torch.Tensor:
            """Cumulative sum of a per-match count, restarted at each row's first match."""
            total = per_slot.cumsum(0)
            return total - torch.where(first_slot > 0, total[(first_slot - 1).clamp(min=0)], 0)[key_rows]

        # junk items before a match (or tied with it, earlier in gallery order) do not count
        junk_slot = self._slots(dist, rows[junk], cols[junk], pos_key, end)
        junk_before = within_rows(torch.bincount(junk_slot, minlength=pos_key.numel()))
        if _scans_rows(device):
            # items (junk included) up to and including each match, counted row by row
            upto = _items_up_to(dist.numpy(), pos_dist[by_key].numpy(), pos_cols[by_key].numpy(),
                                first_slot.tolist(), num_pos.tolist())
            rank = (torch.from_numpy(upto) - junk_before).to(torch.float64)
        else:
            # Candidates: items no farther than the row's last match (-inf: rows without one),
            # each counted at the first match at or after it.
            threshold = torch.full((num_rows,), -math.inf, device=device)
            threshold.scatter_reduce_(0, pos_rows, pos_dist, reduce="amax")
            cand_rows, cand_cols = entries_at_most(dist, threshold, dim=1)
            cand_slot = self._slots(dist, cand_rows, cand_cols, pos_key, end)
            rank = (within_rows(torch.bincount(cand_slot, minlength=pos_key.numel())) - junk_before).to(torch.float64)
        order = (torch.arange(pos_key.numel(), device=device) - first_slot[key_rows] + 1).to(torch.float64)
        valid = num_pos > 0
        num_pos_f = num_pos[valid].to(torch.float64)
        ap = torch.zeros(num_rows, dtype=torch.float64, device=device).index_add_(0, key_rows, order / rank)
        stats.ap_sum = float((ap[valid] / num_pos_f).sum())
        stats.inp_sum = float((num_pos_f / rank[end[valid] - 1]).sum())
        stats.num_valid = int(valid.sum())
        first = rank[first_slot[valid]].long().clamp(max=self.max_rank + 1) - 1
        stats.first_match = torch.bincount(first, minlength=self.max_rank + 1).cpu()
        return stats

    def _slots(
        self, dist: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, pos_key: torch.Tensor, end: torch.Tensor
    ) -> torch.Tensor:
        """For items ``(rows, cols)`` ranked at or before their row's last match: the index in
        ``pos_key`` of the first match at or after each (the others are dropped).

        Args:
            dist: ``(C, G)`` float32; rows, cols: ``(S,)`` int64.
            pos_key: ``(P,)`` sorted keys of the chunk's matches; end: ``(C,)`` the end of
                each row's matches in ``pos_key``.
        """
        slot = torch.searchsorted(pos_key, _keys(dist[rows, cols], cols, rows, self.index_bits))
        # an item tied with the row's last match but after it in gallery order gets the
        # next row's first slot (or P): not ranked before any match of its row
        return slot[slot < end[rows]]

    def result(self) -> dict[str, Any]:
        t = self.total
        if t.num_valid == 0:
            raise DatasetError(
                f"none of the {t.num_queries} queries has a correct match in the gallery "
                "(same identity, other camera): check the query/gallery split"
            )
        cmc = torch.cumsum(t.first_match[: self.max_rank], 0).double() / t.num_valid
        return {
            "mAP": t.ap_sum / t.num_valid,
            "mINP": t.inp_sum / t.num_valid,
            "cmc": cmc.tolist(),
            "num_queries": t.num_queries,
            "num_valid_queries": t.num_valid,
        }


def _protocol(g_pids: torch.Tensor, g_camids: torch.Tensor, max_rank: int, device: torch.device) -> _Protocol:
    if max_rank < 1:
        raise ValueError(f"max_rank must be >= 1, got {max_rank}")
    return _Protocol(g_pids.to(device), g_camids.to(device), min(max_rank, g_pids.numel()))


def _run_protocol(
    chunks: Iterator[tuple[int, torch.Tensor]],
    q_pids: torch.Tensor,
    q_camids: torch.Tensor,
    g_pids: torch.Tensor,
    g_camids: torch.Tensor,
    *,
    max_rank: int,
    device: torch.device,
    check_nan: bool = True,
) -> dict[str, Any]:
    """Feed ``(start row, (C, G) float32 distances)`` chunks through the metrics on ``device``."""
    protocol = _protocol(g_pids, g_camids, max_rank, device)
    for start, dist in chunks:
        stop = start + dist.shape[0]
        protocol.add_chunk(dist.to(device), q_pids[start:stop].to(device), q_camids[start:stop].to(device),
                           check_nan=check_nan)
    return protocol.result()


def _labels(
    q_pids: ArrayLike, g_pids: ArrayLike, q_camids: ArrayLike, g_camids: ArrayLike, num_query: int, num_gallery: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return (
        _as_long_vector(q_pids, "q_pids", num_query),
        _as_long_vector(q_camids, "q_camids", num_query),
        _as_long_vector(g_pids, "g_pids", num_gallery),
        _as_long_vector(g_camids, "g_camids", num_gallery),
    )


def _chunk_rows(
    num_gallery: int, chunk_size: int | None, *, bytes_per_element: int = _BYTES_PER_ELEMENT, workers: int = 1,
    num_query: int = 0,
) -> int:
    """Queries per chunk: ``chunk_size``, or what fits :data:`DEFAULT_CHUNK_BYTES` with
    ``workers`` chunks at a time (and no more than gives each worker one, out of ``num_query``)."""
    if chunk_size is None:
        rows = max(1, DEFAULT_CHUNK_BYTES // (max(num_gallery, 1) * bytes_per_element * workers))
        if workers > 1:
            # as many chunks as fit, rounded up to a multiple of the workers, made equal: no
            # worker is left with a last chunk while the others wait
            rounds = max(1, -(-num_query // (rows * workers)))
            rows = max(1, -(-num_query // (rounds * workers)))
        return rows
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    return chunk_size
