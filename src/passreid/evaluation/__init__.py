"""Standard ReID retrieval metrics (mAP, CMC, mINP) of features or of a distance matrix (DESIGN §6).

:func:`evaluate` ranks the gallery for every query by ascending distance, drops gallery
items that share both identity and camera with the query ("junk"), skips queries left
without a correct match, and averages AP, the CMC curve and INP over the remaining
("valid") queries, chunk by chunk so that MSMT17 fits in memory (the chunked protocol:
:mod:`passreid.evaluation.protocol`). :func:`query_matches` and :func:`average_precision`
are the same rule for one query, which the pictures of :mod:`passreid.visualize` use.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from passreid.distance import (
    ArrayLike,
    Metric,
    Precision,
    as_float_tensor,
    check_features,
    check_metric,
    compute_distance,
    distance_chunks,
    map_distance_chunks,
    torch_ops_on_one_thread,
)
from passreid.evaluation.protocol import (
    _CPU_BYTES_PER_ELEMENT,
    DEFAULT_CHUNK_BYTES,
    _chunk_rows,
    _labels,
    _protocol,
    _run_protocol,
    _Stats,
)

__all__ = ["DEFAULT_CHUNK_BYTES", "average_precision", "compute_distance", "distance_chunks", "evaluate",
           "evaluate_distmat", "format_metrics", "query_matches"]

logger = logging.getLogger(__name__)


def query_matches(ranked: np.ndarray, q_pid: int, q_camid: int, g_pids: np.ndarray,
                  g_camids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """One query's ranked gallery ``ranked`` (G,) without its junk (same identity and camera), and
    which of the kept items are correct matches: ``(kept (G',) indices, matches (G',) bool)``."""
    same_id = g_pids[ranked] == q_pid
    keep = ~(same_id & (g_camids[ranked] == q_camid))
    return ranked[keep], same_id[keep]


def average_precision(matches: np.ndarray) -> float:
    """AP of one ranked list of correct (True) / wrong flags: mean precision at the correct ones; NaN if none.

    The mean over the valid queries is :func:`evaluate`'s mAP.
    """
    hits = np.flatnonzero(matches)
    if hits.size == 0:
        return float("nan")
    return float(np.mean(np.arange(1, hits.size + 1) / (hits + 1)))


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

    with torch.inference_mode(), torch_ops_on_one_thread(dev):
        return _run_protocol(chunks(), qp, qc, gp, gc, max_rank=max_rank, device=dev)


def _features_are_safe(q: torch.Tensor, g: torch.Tensor) -> bool:
    """True if no distance of these features can be NaN or overflow (then chunks skip the check).

    Args:
        q: ``(Q, D)``, g: ``(G, D)`` float32.
    """
    if q.numel() == 0 or g.numel() == 0:
        return True
    bound = q.norm(dim=1).max() + g.norm(dim=1).max()  # every |q - g| and |q|, |g| below it
    return bool(torch.isfinite(bound * bound * 4))


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
    precision: Precision = "fp32",
) -> dict[str, Any]:
    """mAP / CMC / mINP of query features against gallery features (DESIGN §6).

    Distances (:func:`compute_distance`) are computed chunk by chunk, ``chunk_size``
    queries against the whole gallery, and each chunk is ranked as soon as it exists, so
    peak memory is the features plus one chunk, never the full ``(Q, G)`` matrix. With
    ``rerank=True`` the k-reciprocal re-ranked distance of Zhong et al. is ranked instead
    (Euclidean only), streamed the same way (:func:`passreid.kreciprocal.re_ranked_chunks`):
    its metrics are those of :func:`passreid.kreciprocal.re_ranking`'s dense matrix.

    Args:
        qf: query features ``(Q, D)`` (L2-normalised by the caller for the standard protocol).
        gf: gallery features ``(G, D)``.
        q_pids, q_camids: ``(Q,)``; g_pids, g_camids: ``(G,)``.
        metric: ``"euclidean"`` (squared) or ``"cosine"``.
        max_rank: CMC length (capped at the gallery size).
        chunk_size: queries per chunk (default: from a ~256 MiB working-memory budget, shared on
            the CPU by the threads' chunks, which run in parallel).
        device: where distances and ranking run (e.g. ``"cuda"``); default the features' device.
        rerank, k1, k2, lambda_value: k-reciprocal re-ranking and its parameters.
        precision: ``"fp32"`` (the protocol) or ``"bf16"`` (faster product on GPUs,
            approximate ranks; not with ``rerank``).

    Returns:
        See :func:`evaluate_distmat`.
    """
    check_metric(metric)
    q = as_float_tensor(qf, "qf")
    g = as_float_tensor(gf, "gf")
    check_features(q, g)
    dev = torch.device(device) if device is not None else g.device
    num_query, num_gallery = q.shape[0], g.shape[0]
    qp, qc, gp, gc = _labels(q_pids, g_pids, q_camids, g_camids, num_query, num_gallery)
    threads = torch.get_num_threads()  # for the products; the bookkeeping runs on one
    if dev.type == "cpu" and not rerank:
        # Each of the threads holds one float32 block; its rows are ranked one at a time.
        step = _chunk_rows(num_gallery, chunk_size, bytes_per_element=_CPU_BYTES_PER_ELEMENT, workers=threads,
                           num_query=num_query)
    else:
        step = _chunk_rows(num_gallery, chunk_size)
    logger.debug("evaluating %d queries x %d gallery in chunks of %d on %s%s", num_query, num_gallery, step, dev,
                 " with re-ranking" if rerank else "")
    with torch.inference_mode(), torch_ops_on_one_thread(dev):
        if rerank:
            if metric != "euclidean" or precision != "fp32":
                raise ValueError("re-ranking is defined on the float32 squared Euclidean distance: "
                                 "use metric='euclidean', precision='fp32'")
            from passreid.kreciprocal import re_ranked_chunks

            chunks = re_ranked_chunks(q, g, k1=k1, k2=k2, lambda_value=lambda_value, chunk_size=step, device=dev,
                                      threads=threads)
            return _run_protocol(chunks, qp, qc, gp, gc, max_rank=max_rank, device=dev)
        protocol = _protocol(gp, gc, max_rank, dev)
        check_nan = not _features_are_safe(q, g)
        qp, qc = qp.to(dev), qc.to(dev)

        def rank(start: int, dist: torch.Tensor) -> _Stats:
            stop = start + dist.shape[0]
            return protocol.chunk_stats(dist, qp[start:stop], qc[start:stop], check_nan=check_nan)

        for stats in map_distance_chunks(rank, q, g, metric=metric, chunk_size=step, device=dev,
                                         precision=precision, threads=threads):
            protocol.total.add(stats)
        return protocol.result()


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
