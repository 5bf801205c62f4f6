"""Standard ReID retrieval metrics (mAP, CMC, mINP), chunked so that MSMT17 fits in memory.

The protocol (DESIGN §6) ranks the whole gallery for every query by ascending distance,
drops gallery items that share both identity and camera with the query ("junk"), skips
queries that are left without a correct match, and averages AP, the CMC curve and INP over
the remaining ("valid") queries.

The published code argsorts every gallery row (an ``int64`` index per query x gallery
pair) and then loops over queries in Python. Here each chunk of queries needs no sort of
the gallery: every distance gets a unique ``int64`` key (the float's order-preserving bit
pattern in the high bits, the gallery index in the low bits), the keys of each query's
correct matches are sorted, and one ``searchsorted`` of all gallery keys against them
followed by a histogram gives, for the m-th correct match, the number of non-junk gallery
items ranked at or before it - its 1-based rank. AP, INP and the CMC follow from those
ranks alone.

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
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F

from passreid.errors import DatasetError

logger = logging.getLogger(__name__)

Metric = Literal["euclidean", "cosine"]
ArrayLike = np.ndarray | torch.Tensor

#: Working memory allowed per query chunk when ``chunk_size`` is not given.
DEFAULT_CHUNK_BYTES = 256 * 2**20
# Bytes of working memory per (query, gallery) element of a chunk at its peak: the float32
# distance, its int64 key and the int32 bucket, plus slack for temporaries (measured: ~19).
_BYTES_PER_ELEMENT = 24
_INT64_MAX = torch.iinfo(torch.int64).max


def _as_float_tensor(x: ArrayLike, name: str) -> torch.Tensor:
    t = torch.as_tensor(x)
    if not t.is_floating_point():
        raise ValueError(f"{name} must be a floating point array, got dtype {t.dtype}")
    # Metrics never need gradients; detaching also lets CPU blocks go through numpy.
    return t.detach().float()


def _as_long_vector(x: ArrayLike, name: str, length: int) -> torch.Tensor:
    t = torch.as_tensor(x).long().reshape(-1)
    if t.numel() != length:
        raise ValueError(f"{name} has {t.numel()} entries, expected {length}")
    return t


def _check_features(q: torch.Tensor, g: torch.Tensor) -> None:
    if q.dim() != 2 or g.dim() != 2 or q.shape[1] != g.shape[1]:
        raise ValueError(f"expected (Q, D) and (G, D) features, got {tuple(q.shape)} and {tuple(g.shape)}")


def _check_metric(metric: str) -> None:
    if metric not in ("euclidean", "cosine"):
        raise ValueError(f"metric must be 'euclidean' or 'cosine', got {metric!r}")


def _augment(x: torch.Tensor, metric: Metric, side: Literal["query", "gallery"]) -> torch.Tensor:
    """Append columns so that one matrix product yields the distance.

    Euclidean: ``[-2q, |q|^2, 1] . [g, 1, |g|^2] = |q|^2 + |g|^2 - 2 q.g``; cosine (after
    L2-normalising): ``[-q, 1] . [g, 1] = 1 - q.g``. The norms are added inside the
    product instead of in separate passes over the ``(C, G)`` block.

    Args:
        x: ``(N, D)`` float32 features.

    Returns:
        ``(N, D + 2)`` (euclidean) or ``(N, D + 1)`` (cosine).
    """
    ones = torch.ones(x.shape[0], 1, dtype=x.dtype, device=x.device)
    if metric == "cosine":
        x = F.normalize(x, dim=1)
        return torch.cat([-x if side == "query" else x, ones], dim=1)
    sq = torch.einsum("nd,nd->n", x, x).unsqueeze(1)
    if side == "query":
        return torch.cat([-2.0 * x, sq, ones], dim=1)
    return torch.cat([x, ones, sq], dim=1)


def _matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b.T`` for ``a`` ``(C, K)`` and ``b`` ``(G, K)`` -> ``(C, G)``.

    On CPU the product goes through numpy's BLAS (OpenBLAS): torch's MKL ``sgemm`` ran
    this shape 1.5-2x slower on the AMD EPYC machines passreid is tested on, and the
    product is most of the evaluation time. Elsewhere (CUDA) torch does it.
    """
    if a.device.type == "cpu":
        return torch.from_numpy(np.matmul(a.numpy(), b.numpy().T))
    return a @ b.T


def compute_distance(qf: ArrayLike, gf: ArrayLike, metric: Metric = "euclidean") -> torch.Tensor:
    """Dense query-gallery distance matrix.

    Args:
        qf: query features ``(Q, D)``.
        gf: gallery features ``(G, D)``.
        metric: ``"euclidean"`` - the true squared Euclidean distance
            ``|q|^2 + |g|^2 - 2 q.g`` (for L2-normalised features ``2 - 2 q.g``, the
            protocol's distance); ``"cosine"`` - ``1 - cos(q, g)`` (features are
            normalised here, so unnormalised input is fine). Rounding can make either
            slightly negative for (near-)identical vectors: the result is clamped at 0.

    Returns:
        ``(Q, G)`` float32 tensor on the features' device, exactly the values
        :func:`evaluate` ranks. Materialises the whole matrix: use :func:`evaluate` for
        large sets, which works chunk by chunk.
    """
    _check_metric(metric)
    q = _as_float_tensor(qf, "qf")
    g = _as_float_tensor(gf, "gf")
    _check_features(q, g)
    return _matmul(_augment(q, metric, "query"), _augment(g, metric, "gallery")).clamp_(min=0.0)


def distance_chunks(
    qf: ArrayLike,
    gf: ArrayLike,
    *,
    metric: Metric = "euclidean",
    chunk_size: int,
    device: str | torch.device | None = None,
) -> Iterator[tuple[int, torch.Tensor]]:
    """Yield ``(start, block)`` for consecutive query chunks, ``block`` = distances of
    queries ``start .. start + C - 1`` to the whole gallery, ``(C, G)`` float32 on ``device``.

    The values are exactly those of :func:`compute_distance`; the gallery is prepared once,
    so only one ``(C, G)`` block exists at a time (plus whatever the caller keeps).
    """
    _check_metric(metric)
    q = _as_float_tensor(qf, "qf")
    g = _as_float_tensor(gf, "gf")
    _check_features(q, g)
    dev = torch.device(device) if device is not None else g.device
    g_aug = _augment(g.to(dev), metric, "gallery")
    for start in range(0, q.shape[0], chunk_size):
        q_aug = _augment(q[start : start + chunk_size].to(dev), metric, "query")
        yield start, _matmul(q_aug, g_aug).clamp_(min=0.0)


def _index_bits(num_gallery: int) -> int:
    """Bits that hold any gallery index."""
    return max(1, math.ceil(math.log2(max(num_gallery, 2))))


def _sort_keys(dist: torch.Tensor, gallery_index: torch.Tensor, index_bits: int) -> torch.Tensor:
    """Unique int64 keys whose order is the (distance, gallery index) order.

    Args:
        dist: ``(C, G)`` float32 distances (not modified).
        gallery_index: ``(G,)`` int64 ``arange(G)``.
        index_bits: bits reserved for the gallery index (``2**index_bits >= G``).

    Returns:
        ``(C, G)`` int64 ``order_bits(dist) * 2**index_bits + index``; ``-0.0`` and ``0.0``
        get the same order bits.

    Raises:
        ValueError: if a distance is NaN.
    """
    bits = dist.view(torch.int32)
    low, high = torch.aminmax(bits)
    if int(low) < 0 or int(high) > 0x7F800000:  # a sign bit (negative or -0.0), or NaN
        if bool(torch.isnan(dist).any()):
            raise ValueError("NaN distance (features with huge or non-finite values?)")
        # IEEE floats order like sign-magnitude integers: flipping the 31 low bits of the
        # negative ones makes the int32 order the float order; subtracting the sign then
        # merges -0.0 with +0.0 (both become 0) and keeps every other negative below 0.
        sign = bits >> 31
        bits = (bits ^ (sign & 0x7FFFFFFF)) - sign
    # Non-negative floats already order like their bit patterns.
    key = bits.to(torch.int64)
    key.bitwise_left_shift_(index_bits)
    return key.add_(gallery_index)


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
        self.gallery_index = torch.arange(g_pids.numel(), device=g_pids.device)
        # Gallery indices grouped by identity: a query's same-identity items are one slice.
        self.by_pid = torch.argsort(g_pids, stable=True)
        self.sorted_pids = g_pids[self.by_pid]
        self.ap_sum = 0.0
        self.inp_sum = 0.0
        self.num_valid = 0
        self.num_queries = 0
        # first_match[r]: valid queries whose first correct match has rank r + 1
        # (r = max_rank collects everything beyond).
        self.first_match = torch.zeros(max_rank + 1, dtype=torch.int64)

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

    def add_chunk(self, dist: torch.Tensor, q_pids: torch.Tensor, q_camids: torch.Tensor) -> None:
        """Add the metrics of one query chunk.

        Args:
            dist: ``(C, G)`` float32 distances of the chunk's queries.
            q_pids, q_camids: ``(C,)`` int64 on ``dist``'s device.
        """
        num_rows = dist.shape[0]
        self.num_queries += num_rows
        device = dist.device
        rows, cols, junk = self._same_identity(q_pids, q_camids)
        pos_rows, pos_cols = rows[~junk], cols[~junk]
        num_pos = torch.bincount(pos_rows, minlength=num_rows)
        max_pos = int(num_pos.max()) if num_rows else 0
        if max_pos == 0:
            return
        key = _sort_keys(dist, self.gallery_index, self.index_bits)
        # Sorted keys of each query's correct matches, padded with INT64_MAX (above every key).
        slot = torch.arange(pos_rows.numel(), device=device) - (torch.cumsum(num_pos, 0) - num_pos)[pos_rows]
        bounds = torch.full((num_rows, max_pos), _INT64_MAX, dtype=torch.int64, device=device)
        bounds[pos_rows, slot] = key[pos_rows, pos_cols]
        bounds = bounds.sort(dim=1).values
        # bucket[i, j] = number of correct matches of query i ranked before item j, so the
        # items with bucket <= m are exactly those ranked at or before the m-th match.
        bucket = torch.searchsorted(bounds, key, out_int32=True)
        del key
        num_buckets = max_pos + 2
        bucket[rows[junk], cols[junk]] = max_pos + 1  # junk goes to a bucket nobody counts
        bucket += (torch.arange(num_rows, device=device, dtype=torch.int32) * num_buckets).unsqueeze(1)
        hist = torch.bincount(bucket.view(-1), minlength=num_rows * num_buckets)
        del bucket
        # rank[i, m]: 1-based rank of query i's (m+1)-th correct match among non-junk items.
        rank = hist.view(num_rows, num_buckets)[:, :max_pos].cumsum(1).to(torch.float64)
        valid = num_pos > 0
        order = torch.arange(1, max_pos + 1, device=device, dtype=torch.float64).unsqueeze(0)
        precision = torch.where(order <= num_pos.unsqueeze(1), order / rank, 0.0)
        num_pos_f = num_pos[valid].to(torch.float64)
        last_rank = rank.gather(1, (num_pos - 1).clamp(min=0).unsqueeze(1)).squeeze(1)[valid]
        self.ap_sum += float((precision.sum(1)[valid] / num_pos_f).sum())
        self.inp_sum += float((num_pos_f / last_rank).sum())
        self.num_valid += int(valid.sum())
        first = rank[valid, 0].long().clamp(max=self.max_rank + 1) - 1
        self.first_match += torch.bincount(first, minlength=self.max_rank + 1).cpu()

    def result(self) -> dict[str, Any]:
        if self.num_valid == 0:
            raise DatasetError(
                f"none of the {self.num_queries} queries has a correct match in the gallery "
                "(same identity, other camera): check the query/gallery split"
            )
        cmc = torch.cumsum(self.first_match[: self.max_rank], 0).double() / self.num_valid
        return {
            "mAP": self.ap_sum / self.num_valid,
            "mINP": self.inp_sum / self.num_valid,
            "cmc": cmc.tolist(),
            "num_queries": self.num_queries,
            "num_valid_queries": self.num_valid,
        }


def _run_protocol(
    chunks: Iterator[tuple[int, torch.Tensor]],
    q_pids: torch.Tensor,
    q_camids: torch.Tensor,
    g_pids: torch.Tensor,
    g_camids: torch.Tensor,
    *,
    max_rank: int,
    device: torch.device,
) -> dict[str, Any]:
    """Feed ``(start row, (C, G) float32 distances on device)`` chunks through the metrics."""
    if max_rank < 1:
        raise ValueError(f"max_rank must be >= 1, got {max_rank}")
    protocol = _Protocol(g_pids.to(device), g_camids.to(device), min(max_rank, g_pids.numel()))
    for start, dist in chunks:
        stop = start + dist.shape[0]
        protocol.add_chunk(dist, q_pids[start:stop].to(device), q_camids[start:stop].to(device))
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


def _chunk_rows(num_gallery: int, chunk_size: int | None) -> int:
    """Queries per chunk: ``chunk_size`` or what fits :data:`DEFAULT_CHUNK_BYTES`."""
    if chunk_size is None:
        return max(1, DEFAULT_CHUNK_BYTES // (max(num_gallery, 1) * _BYTES_PER_ELEMENT))
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    return chunk_size


def evaluate_distmat(
    distmat: ArrayLike,
    q_pids: ArrayLike,
    g_pids: ArrayLike,
    q_camids: ArrayLike,
    g_camids: ArrayLike,
    *,
    max_rank: int = 50,
    chunk_size: int | None = None,
    device: str | torch.device | None = None,
) -> dict[str, Any]:
    """Metrics from a precomputed query-gallery distance matrix (e.g. after re-ranking).

    Args:
        distmat: ``(Q, G)`` distances (numpy or torch; compared in float32), smaller = closer.
        q_pids, q_camids: ``(Q,)`` query identities and cameras.
        g_pids, g_camids: ``(G,)`` gallery identities and cameras.
        max_rank: length of the CMC curve (capped at the gallery size).
        chunk_size: queries per chunk; by default chosen so a chunk needs at most about
            :data:`DEFAULT_CHUNK_BYTES` of working memory.
        device: where the ranking runs (e.g. ``"cuda"``); default the matrix's device.

    Returns:
        ``{"mAP", "mINP", "cmc", "num_queries", "num_valid_queries"}``; rates are fractions
        in [0, 1] and ``cmc[k]`` is the fraction of valid queries matched within rank k + 1.

    Raises:
        ValueError: on NaN distances or mismatched shapes.
        DatasetError: if no query has a correct match in the gallery.
    """
    dist_all = torch.as_tensor(distmat).detach()
    if dist_all.dim() != 2:
        raise ValueError(f"distmat must be (Q, G), got shape {tuple(dist_all.shape)}")
    num_query, num_gallery = dist_all.shape
    qp, qc, gp, gc = _labels(q_pids, g_pids, q_camids, g_camids, num_query, num_gallery)
    dev = torch.device(device) if device is not None else dist_all.device
    step = _chunk_rows(num_gallery, chunk_size)

    def chunks() -> Iterator[tuple[int, torch.Tensor]]:
        for start in range(0, num_query, step):
            yield start, dist_all[start : start + step].to(dev, torch.float32)

    with torch.inference_mode():
        return _run_protocol(chunks(), qp, qc, gp, gc, max_rank=max_rank, device=dev)


def evaluate(
    qf: ArrayLike,
    gf: ArrayLike,
    q_pids: ArrayLike,
    g_pids: ArrayLike,
    q_camids: ArrayLike,
    g_camids: ArrayLike,
    *,
    metric: Metric = "euclidean",
    max_rank: int = 50,
    chunk_size: int | None = None,
    device: str | torch.device | None = None,
    rerank: bool = False,
    k1: int = 20,
    k2: int = 6,
    lambda_value: float = 0.3,
) -> dict[str, Any]:
    """mAP / CMC / mINP of query features against gallery features (DESIGN §6).

    Distances (:func:`compute_distance`) are computed chunk by chunk, ``chunk_size``
    queries against the whole gallery, so peak memory is the features plus one chunk,
    never the full ``(Q, G)`` matrix. With ``rerank=True`` the k-reciprocal re-ranked
    distance of Zhong et al. is used instead (:func:`passreid.kreciprocal.re_ranking`,
    Euclidean only), which is a dense ``(Q, G)`` float32 matrix.

    Args:
        qf: query features ``(Q, D)`` (L2-normalised by the caller for the standard protocol).
        gf: gallery features ``(G, D)``.
        q_pids, q_camids: ``(Q,)``; g_pids, g_camids: ``(G,)``.
        metric: ``"euclidean"`` (squared) or ``"cosine"``.
        max_rank: CMC length (capped at the gallery size).
        chunk_size: queries per chunk (default: from a ~256 MiB working-memory budget).
        device: where distances and ranking run (e.g. ``"cuda"``); default the features' device.
        rerank, k1, k2, lambda_value: k-reciprocal re-ranking and its parameters.

    Returns:
        See :func:`evaluate_distmat`.
    """
    _check_metric(metric)
    q = _as_float_tensor(qf, "qf")
    g = _as_float_tensor(gf, "gf")
    _check_features(q, g)
    dev = torch.device(device) if device is not None else g.device
    if rerank:
        if metric != "euclidean":
            raise ValueError("re-ranking is defined on the squared Euclidean distance; use metric='euclidean'")
        from passreid.kreciprocal import re_ranking

        distmat = re_ranking(q, g, k1=k1, k2=k2, lambda_value=lambda_value, device=dev)
        return evaluate_distmat(
            distmat, q_pids, g_pids, q_camids, g_camids, max_rank=max_rank, chunk_size=chunk_size, device=dev
        )
    num_query, num_gallery = q.shape[0], g.shape[0]
    qp, qc, gp, gc = _labels(q_pids, g_pids, q_camids, g_camids, num_query, num_gallery)
    step = _chunk_rows(num_gallery, chunk_size)
    logger.debug("evaluating %d queries x %d gallery in chunks of %d on %s", num_query, num_gallery, step, dev)
    with torch.inference_mode():
        chunks = distance_chunks(q, g, metric=metric, chunk_size=step, device=dev)
        return _run_protocol(chunks, qp, qc, gp, gc, max_rank=max_rank, device=dev)


def format_metrics(metrics: dict[str, Any]) -> str:
    """Two-line table of mAP, R1, R5, R10 and mINP in percent (``-`` where the CMC is shorter)."""
    cmc = metrics["cmc"]
    cells = {"mAP": metrics["mAP"], "mINP": metrics["mINP"]}
    for k in (1, 5, 10):
        cells[f"R{k}"] = cmc[k - 1] if len(cmc) >= k else None
    names = ["mAP", "R1", "R5", "R10", "mINP"]
    header = "  ".join(f"{n:>6}" for n in names)
    values = "  ".join(f"{100 * cells[n]:6.2f}" if cells[n] is not None else f"{'-':>6}" for n in names)
    return f"{header}\n{values}"
