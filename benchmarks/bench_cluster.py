"""Pseudo-label cost: sparse k-reciprocal Jaccard + DBSCAN against a dense reference.

For each size N (default: Market-1501 train, 12,936, and MSMT17 train, 32,621)
it draws random-but-clustered unit features (D 768, about N/16 clusters of
varying size plus 10% scattered points) and times, each in its own process so
that peak memories do not mix:

- ``sparse``: the passreid path of :func:`passreid.clustering.pseudo_labels` (kNN
  graph, sparse Jaccard keeping only distances within eps, DBSCAN on the sparse
  matrix);
- ``dense``: the classic formulation written out with N x N arrays (squared
  distances, full k-reciprocal encoding V, query expansion, Jaccard through an
  inverted index, DBSCAN on the dense matrix), as the original research code
  computes it. Where N x N arrays would not fit (``--dense-max``), it runs on
  the first ``--dense-max`` points and the sparse path is timed on the same
  subset as well, so that the ratio always compares equal work.

Prints one JSON line per size: times, the speed-up, peak resident memory of
each process above its baseline (after the features exist), and the adjusted
Rand index between the two labelings (1.0 = the same clusters).

    python benchmarks/bench_cluster.py                     # both sizes, CPU
    python benchmarks/bench_cluster.py --sizes 4000 --device cuda
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

K1, K2, EPS, MIN_SAMPLES = 30, 6, 0.6, 4


def clustered_features(n: int, dim: int, seed: int = 0) -> np.ndarray:
    """(n, dim) float32 unit vectors: ~n/16 Gaussian clusters of varying size plus 10% scattered points."""
    rng = np.random.default_rng(seed)
    num_clusters = max(1, n // 16)
    centers = rng.standard_normal((num_clusters, dim)).astype(np.float32)
    centers /= np.linalg.norm(centers, axis=1, keepdims=True)
    weights = rng.gamma(2.0, size=num_clusters)
    assignment = rng.choice(num_clusters, size=n, p=weights / weights.sum())
    # Per-dimension noise 0.03 -> noise norm ~0.83 in 768-d: neighbours within a
    # cluster have cosine ~0.6, across clusters ~0, so DBSCAN has real work.
    feats = centers[assignment] + 0.03 * rng.standard_normal((n, dim)).astype(np.float32)
    scattered = rng.random(n) < 0.1
    feats[scattered] = rng.standard_normal((int(scattered.sum()), dim)).astype(np.float32)
    return feats / np.linalg.norm(feats, axis=1, keepdims=True)


def rss_mb() -> float:
    """Peak resident memory of this process so far, MiB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# ----------------------------------------------------------------------------- dense reference


def dense_jaccard(features: np.ndarray, k1: int = K1, k2: int = K2) -> np.ndarray:
    """k-reciprocal Jaccard distance (DESIGN §5) with N x N arrays: (N, D) -> (N, N) float32."""
    n = len(features)
    sq = (features.astype(np.float32) ** 2).sum(1)
    dist = sq[:, None] + sq[None, :] - 2 * features @ features.T
    np.maximum(dist, 0, out=dist)
    rank = np.argsort(dist, axis=1)[:, :k1]  # k1 nearest, self included: N(i, k1) has min(k1 + 1, k1) members
    half = int(round(k1 / 2))

    def reciprocal(i: int, k: int) -> np.ndarray:
        forward = rank[i, : k + 1]
        backward = rank[forward, : k + 1]
        return forward[(backward == i).any(axis=1)]

    v = np.zeros((n, n), dtype=np.float32)
    for i in range(n):
        r = reciprocal(i, k1)
        expansion = [r]
        for c in r:
            rc = reciprocal(int(c), half)
            if len(np.intersect1d(rc, r)) > 2 / 3 * len(rc):
                expansion.append(rc)
        members = np.unique(np.concatenate(expansion))
        weights = np.exp(-(dist[i, members] - dist[i, members].min()))
        v[i, members] = weights / weights.sum()
    if k2 > 1:
        v = np.stack([v[rank[i, :k2]].mean(axis=0) for i in range(n)])
    inverted = [np.flatnonzero(v[:, j]) for j in range(n)]
    jaccard = np.ones((n, n), dtype=np.float32)
    for i in range(n):
        shared = np.zeros(n, dtype=np.float32)
        for j in np.flatnonzero(v[i]):
            rows = inverted[j]
            shared[rows] += np.minimum(v[i, j], v[rows, j])
        jaccard[i] = 1 - shared / (2 - shared)
    np.maximum(jaccard, 0, out=jaccard)
    return jaccard


# ----------------------------------------------------------------------------- one measurement (child process)


def worker(method: str, n: int, dim: int, device: str, labels_out: str) -> None:
    from sklearn.cluster import DBSCAN

    feats = clustered_features(n, dim)
    import torch  # noqa: F401  (imported before the baseline so both methods pay it alike)

    base = rss_mb()
    t0 = time.perf_counter()
    if method == "sparse":
        from passreid.kreciprocal import jaccard_distance

        matrix = jaccard_distance(feats, k1=K1, k2=K2, device=device, max_distance=EPS)  # as pseudo_labels
        stored = int(matrix.nnz)
    else:
        matrix = dense_jaccard(feats)
        stored = int(matrix.size)
    t1 = time.perf_counter()
    labels = DBSCAN(eps=EPS, min_samples=MIN_SAMPLES, metric="precomputed", n_jobs=-1).fit_predict(matrix)
    t2 = time.perf_counter()
    np.save(labels_out, labels)
    print(json.dumps({
        "n": n, "seconds": round(t2 - t0, 3), "jaccard_s": round(t1 - t0, 3), "dbscan_s": round(t2 - t1, 3),
        "peak_mb": round(rss_mb() - base, 1), "stored_distances": stored,
        "num_clusters": int(labels.max()) + 1, "outlier_fraction": round(float((labels < 0).mean()), 4),
    }))


def measure(method: str, n: int, dim: int, device: str, tmp: Path) -> tuple[dict, np.ndarray]:
    labels_out = tmp / f"{method}_{n}.npy"
    cmd = [sys.executable, __file__, "--worker", method, "--sizes", str(n), "--dim", str(dim), "--device", device,
           "--labels-out", str(labels_out)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1]), np.load(labels_out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[12936, 32621])
    parser.add_argument("--dim", type=int, default=768)
    parser.add_argument("--device", default="cpu", help="device of the sparse kNN search (cpu or cuda)")
    parser.add_argument("--dense-max", type=int, default=16000,
                        help="largest N the dense reference runs on (4 N x N float32 arrays: 4 GB at 16,000)")
    parser.add_argument("--worker", choices=("sparse", "dense"), help=argparse.SUPPRESS)
    parser.add_argument("--labels-out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.worker, args.sizes[0], args.dim, args.device, args.labels_out)
        return

    from sklearn.metrics import adjusted_rand_score

    with tempfile.TemporaryDirectory() as tmp_dir:
        tmp = Path(tmp_dir)
        for n in args.sizes:
            sparse, sparse_labels = measure("sparse", n, args.dim, args.device, tmp)
            m = min(n, args.dense_max)
            dense, dense_labels = measure("dense", m, args.dim, "cpu", tmp)
            same = sparse if m == n else measure("sparse", m, args.dim, args.device, tmp)[0]
            if m != n:
                sparse_labels = np.load(tmp / f"sparse_{m}.npy")
            print(json.dumps({
                "n": n, "dim": args.dim, "device": args.device, "sparse": sparse,
                "dense": {**dense, "subset": m < n},
                "speedup_same_n": round(dense["seconds"] / same["seconds"], 2),
                "memory_ratio_same_n": round(dense["peak_mb"] / max(same["peak_mb"], 1.0), 1),
                "ari_sparse_vs_dense": round(float(adjusted_rand_score(dense_labels, sparse_labels)), 4),
            }), flush=True)


if __name__ == "__main__":
    main()
