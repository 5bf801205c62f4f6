"""Pseudo identities for unlabelled images: DBSCAN on sparse k-reciprocal Jaccard distances (DESIGN §5)."""

from __future__ import annotations

import logging
import time

import numpy as np
import torch
from torch import Tensor

logger = logging.getLogger(__name__)


def pseudo_labels(
    features: np.ndarray | Tensor,
    eps: float,
    min_samples: int = 4,
    k1: int = 30,
    k2: int = 6,
    *,
    search: str = "auto",
    device: torch.device | str | None = None,
) -> np.ndarray:
    """DBSCAN on sparse k-reciprocal Jaccard distances: one pseudo identity per cluster.

    Args:
        features: (N, D) L2-normalised features of the images to cluster.
        eps: DBSCAN radius on the Jaccard distance (0.6 Market, 0.7 MSMT17).
        min_samples: images within ``eps`` (itself included) that make a core point.
        k1, k2: k-reciprocal neighbourhood size and query-expansion size.
        search, device: kNN back end of :func:`passreid.kreciprocal.jaccard_distance`.

    Returns:
        (N,) int64 labels ``0..C-1``, ``-1`` for outliers.

    The distance matrix stays sparse: pairs that share no k-reciprocal
    neighbour are at distance 1 and pairs farther than ``eps`` can never be
    DBSCAN neighbours, so neither is stored; DBSCAN's precomputed sparse mode
    reads a missing pair as "not a neighbour" (eps < 1).
    """
    from sklearn.cluster import DBSCAN

    from passreid.kreciprocal import jaccard_distance

    t0 = time.perf_counter()
    dist_matrix = jaccard_distance(features, k1=k1, k2=k2, search=search, device=device, max_distance=eps)
    t1 = time.perf_counter()
    labels = DBSCAN(eps=eps, min_samples=min_samples, metric="precomputed", n_jobs=-1).fit_predict(dist_matrix)
    labels = labels.astype(np.int64)
    stats = cluster_stats(labels)
    logger.info("pseudo labels: %d clusters, %.1f%% outliers of %d images (eps %.3g; Jaccard %.1f s, DBSCAN %.1f s)",
                stats["num_clusters"], 100 * stats["outlier_fraction"], len(labels), eps, t1 - t0,
                time.perf_counter() - t1)
    return labels


def cluster_stats(labels: np.ndarray) -> dict[str, float]:
    """Number of clusters and the fraction of outliers (label -1) in ``labels`` (N,)."""
    n = max(len(labels), 1)
    return {"num_clusters": int(labels.max()) + 1 if len(labels) else 0,
            "outlier_fraction": float((labels < 0).sum()) / n}


def pseudo_label_quality(labels: np.ndarray, pids: np.ndarray) -> dict[str, float]:
    """How the pseudo identities ``labels`` (N,) agree with known identities ``pids`` (N,) on the clustered images.

    A diagnostic for tuning ``eps``/``k1``/``k2`` on a set whose train split is labelled
    (Market, MSMT17, synthetic): the labels are read only here, never trained on.

    Returns:
        ``pseudo_purity``: the fraction of clustered images whose identity is the most
        frequent one of their cluster; ``pseudo_ari`` and ``pseudo_nmi``: adjusted Rand
        index and normalised mutual information between clusters and identities. Empty
        when nothing is clustered or ``pids`` holds no identities (fewer than two
        distinct values, or negative ones: an unlabelled folder).
    """
    from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score
    from sklearn.metrics.cluster import contingency_matrix

    labels, pids = np.asarray(labels), np.asarray(pids)
    if labels.shape != pids.shape:
        raise ValueError(f"labels {labels.shape} and pids {pids.shape} differ in shape")
    clustered = labels >= 0
    if not clustered.any() or (pids < 0).any() or len(np.unique(pids)) < 2:
        return {}
    labels, pids = labels[clustered], pids[clustered]
    counts = contingency_matrix(labels, pids)  # (clusters, identities)
    return {"pseudo_purity": float(counts.max(axis=1).sum()) / len(labels),
            "pseudo_ari": float(adjusted_rand_score(pids, labels)),
            "pseudo_nmi": float(normalized_mutual_info_score(pids, labels))}
