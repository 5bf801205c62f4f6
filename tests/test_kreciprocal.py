"""passreid.kreciprocal against dense reference implementations; DBSCAN on its output."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from passreid import knn
from passreid.errors import ConfigError
from passreid.evaluation import compute_distance, evaluate
from passreid.kreciprocal import jaccard_distance, re_ranked_chunks, re_ranking

# ----------------------------------------------------------------------------- dense references


def _sq_dist(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = a.astype(np.float64), b.astype(np.float64)
    return ((a[:, None, :] - b[None, :, :]) ** 2).sum(-1)


def _dense_encoding(feats: np.ndarray, n_full: int, n_half: int, k2: int, scale: np.ndarray) -> np.ndarray:
    """V after query expansion, (N, N), written out point by point from the definitions."""
    num = len(feats)
    dist = _sq_dist(feats, feats)
    rank = np.argsort(dist, axis=1, kind="stable")

    def reciprocal(i: int, n: int) -> set[int]:
        return {int(j) for j in rank[i, :n] if i in rank[j, :n]}

    v = np.zeros((num, num))
    for i in range(num):
        r_i = reciprocal(i, n_full)
        expanded = set(r_i)
        for c in r_i:
            r_c = reciprocal(c, n_half)
            if len(r_c & r_i) > 2 / 3 * len(r_c):
                expanded |= r_c
        members = sorted(expanded)
        w = np.exp(-dist[i, members] * scale[i])
        v[i, members] = w / w.sum()
    if k2 > 1:
        v = np.stack([v[rank[i, :k2]].mean(axis=0) for i in range(num)])
    return v


def _dense_jaccard(v: np.ndarray, rows: range, cols: range) -> np.ndarray:
    m = np.array([[np.minimum(v[i], v[j]).sum() for j in cols] for i in rows])
    return np.maximum(1 - m / (2 - m), 0)


def reference_jaccard(feats: np.ndarray, k1: int, k2: int) -> np.ndarray:
    """DESIGN §5: N(i, k) = min(k + 1, k1) nearest, softmax of -d, Jaccard all x all."""
    v = _dense_encoding(feats, min(k1 + 1, k1), min(round(k1 / 2) + 1, k1), k2, np.ones(len(feats)))
    return _dense_jaccard(v, range(len(feats)), range(len(feats)))


def reference_re_ranking(qf: np.ndarray, gf: np.ndarray, k1: int, k2: int, lam: float) -> np.ndarray:
    """Zhong et al.: d / row max, N(i, k) = k + 1 nearest, Jaccard queries x gallery, blend."""
    feats = np.concatenate([qf, gf])
    nq = len(qf)
    dist = _sq_dist(feats, feats)
    scale = 1 / dist.max(axis=1)
    v = _dense_encoding(feats, k1 + 1, round(k1 / 2) + 1, k2, scale)
    jac = _dense_jaccard(v, range(nq), range(nq, len(feats)))
    return (1 - lam) * jac + lam * (dist * scale[:, None])[:nq, nq:]


def _features(seed: int, n: int = 70, dim: int = 8) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, dim)).astype(np.float32)


def _dense(matrix: sp.csr_matrix) -> np.ndarray:
    """Missing entries mean distance 1."""
    out = np.ones(matrix.shape)
    coo = matrix.tocoo()
    out[coo.row, coo.col] = coo.data
    return out


# ----------------------------------------------------------------------------- jaccard_distance


@pytest.mark.parametrize("search", ["faiss", "torch"])
@pytest.mark.parametrize(("k1", "k2", "seed"), [(30, 6, 0), (10, 3, 1), (7, 1, 2), (20, 6, 3)])
def test_jaccard_matches_dense_reference(search: str, k1: int, k2: int, seed: int) -> None:
    feats = _features(seed)
    want = reference_jaccard(feats, k1, k2)
    got = jaccard_distance(feats, k1=k1, k2=k2, search=search)
    assert isinstance(got, sp.csr_matrix) and got.dtype == np.float32 and got.shape == (70, 70)
    assert np.abs(_dense(got) - want).max() < 1e-5
    # stored exactly where the reference shares a neighbour (m > 0, i.e. distance < 1)
    stored = np.zeros(want.shape, dtype=bool)
    coo = got.tocoo()  # (not .nonzero(): it skips the explicitly stored zero distances)
    stored[coo.row, coo.col] = True
    assert np.array_equal(stored, want < 1)


def test_jaccard_layout_for_dbscan() -> None:
    """Explicit zero diagonal, rows sorted by distance, torch input accepted."""
    got = jaccard_distance(torch.from_numpy(_features(4)), k1=12, k2=4)
    for i in range(got.shape[0]):
        row = slice(got.indptr[i], got.indptr[i + 1])
        assert i in got.indices[row]
        assert np.all(np.diff(got.data[row]) >= 0)
    assert np.all(got.diagonal() == 0)
    assert 0 < got.nnz < 70 * 70


@pytest.mark.parametrize("max_distance", [0.0, 0.45, 0.6, 0.9])
def test_max_distance_keeps_exactly_the_pairs_within_it(max_distance: float) -> None:
    """The pruned matrix is the full one without its entries above the bound, so DBSCAN
    with eps = max_distance sees the same neighbourhoods and finds the same clusters."""
    from sklearn.cluster import DBSCAN

    feats = _features(5, n=120)
    full = jaccard_distance(feats, k1=20, k2=6)
    pruned = jaccard_distance(feats, k1=20, k2=6, max_distance=max_distance)
    coo = full.tocoo()
    keep = coo.data <= max_distance
    want = {(int(r), int(c)): float(d) for r, c, d in zip(coo.row[keep], coo.col[keep], coo.data[keep])}
    got_coo = pruned.tocoo()
    got = {(int(r), int(c)): float(d) for r, c, d in zip(got_coo.row, got_coo.col, got_coo.data)}
    assert got == want
    assert len(want) >= 120  # the diagonal at least
    for i in range(pruned.shape[0]):  # still sorted by distance within each row
        assert np.all(np.diff(pruned.data[pruned.indptr[i]:pruned.indptr[i + 1]]) >= 0)
    if max_distance > 0:
        dbscan = DBSCAN(eps=max_distance, min_samples=3, metric="precomputed")
        assert np.array_equal(dbscan.fit_predict(full), dbscan.fit_predict(pruned))


def test_dbscan_recovers_separated_clusters() -> None:
    from sklearn.cluster import DBSCAN
    from sklearn.exceptions import EfficiencyWarning

    rng = np.random.default_rng(0)
    centres = rng.standard_normal((5, 32))
    truth = np.repeat(np.arange(5), 40)
    feats = centres[truth] + 0.15 * rng.standard_normal((200, 32))
    feats /= np.linalg.norm(feats, axis=1, keepdims=True)
    dist = jaccard_distance(feats.astype(np.float32), k1=30, k2=6)
    with warnings.catch_warnings():
        warnings.simplefilter("error", EfficiencyWarning)  # rows come sorted: no copy
        labels = DBSCAN(eps=0.6, min_samples=4, metric="precomputed").fit_predict(dist)
    assert (labels >= 0).all()
    # the same partition as the truth (cluster ids may be permuted)
    assert len(set(zip(labels.tolist(), truth.tolist()))) == 5 == len(set(labels.tolist()))


def test_search_backend_choice(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ConfigError, match="'auto', 'faiss' or 'torch'"):
        jaccard_distance(_features(0), search="annoy")  # type: ignore[arg-type]
    monkeypatch.setattr(knn, "faiss_available", lambda: False)
    with pytest.raises(ConfigError, match="faiss"):
        jaccard_distance(_features(0), search="faiss")
    assert knn.resolve_search("auto", None) == "torch"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_jaccard_cuda_search_matches_cpu() -> None:
    feats = _features(5)
    cpu = jaccard_distance(feats, k1=10, k2=3, search="faiss")
    gpu = jaccard_distance(feats, k1=10, k2=3, search="torch", device="cuda")
    assert np.abs(_dense(cpu) - _dense(gpu)).max() < 1e-5


# ----------------------------------------------------------------------------- re_ranking


@pytest.mark.parametrize(("k1", "k2", "lam", "seed", "block"),
                         [(20, 6, 0.3, 0, 2048), (20, 6, 0.3, 0, 13), (6, 2, 0.5, 1, 8), (5, 1, 0.0, 2, 60)])
def test_re_ranking_matches_dense_reference(
    monkeypatch: pytest.MonkeyPatch, k1: int, k2: int, lam: float, seed: int, block: int
) -> None:
    """Also with the neighbour search split into blocks (off-diagonal merges)."""
    monkeypatch.setattr(knn, "KNN_BLOCK", block)
    feats = _features(seed, n=60, dim=6)
    qf, gf = feats[:14], feats[14:]
    want = reference_re_ranking(qf, gf, k1, k2, lam)
    got = re_ranking(qf, gf, k1=k1, k2=k2, lambda_value=lam)
    assert got.dtype == torch.float32 and got.shape == (14, 46)
    assert np.abs(got.numpy() - want).max() < 1e-5
    # re-ranking really changes the order (vs the plain distance)
    assert not np.array_equal(np.argsort(want, axis=1), np.argsort(_sq_dist(qf, gf), axis=1))


@pytest.mark.parametrize("block", [5, 16, 40, 2048])
def test_blocked_neighbour_search_equals_stable_argsort(block: int) -> None:
    """Neighbours by (distance, index) like a stable sort of each row, exact duplicates
    (ties at every distance) included; farthest distance of each row."""
    x = _features(7, n=97, dim=4)
    x[40] = x[3]
    x[90] = x[3]
    x[41] = x[12]
    d = compute_distance(x, x).numpy()
    nn, row_max = knn.knn_torch(torch.from_numpy(x), 11, None, block=block)
    assert np.array_equal(nn, np.argsort(d, axis=1, kind="stable")[:, :11])
    # a pair's value is that of the block holding it, d(i, j) or d(j, i): equal to rounding
    assert np.allclose(row_max, d.max(axis=1), rtol=1e-6, atol=0)


def test_re_ranked_chunks_are_the_rows_of_re_ranking() -> None:
    feats = _features(3, n=50, dim=6)
    qf, gf = feats[:11], feats[11:]
    whole = re_ranking(qf, gf, k1=7, k2=3, lambda_value=0.3)
    chunks = list(re_ranked_chunks(qf, gf, 7, 3, 0.3, chunk_size=4))
    assert [start for start, _ in chunks] == [0, 4, 8]
    assert torch.equal(torch.cat([block for _, block in chunks]), whole)


def test_streamed_rerank_metrics_equal_the_dense_references() -> None:
    """evaluate(rerank=True) never builds the Q x G matrix; its metrics are those of the
    float64 dense re-ranking ranked by the protocol (stable argsort of every row)."""
    rng = np.random.default_rng(2)
    centres = rng.standard_normal((12, 8))
    q_pids, g_pids = rng.integers(0, 12, 20), rng.integers(0, 12, 70)
    qf = (centres[q_pids] + 1.2 * rng.standard_normal((20, 8))).astype(np.float32)
    gf = (centres[g_pids] + 1.2 * rng.standard_normal((70, 8))).astype(np.float32)
    q_cams, g_cams = rng.integers(0, 3, 20), rng.integers(0, 3, 70)
    dense = reference_re_ranking(qf, gf, 20, 6, 0.3)
    aps, first = [], []
    for i in range(20):
        order = np.argsort(dense[i], kind="stable")
        keep = ~((g_pids[order] == q_pids[i]) & (g_cams[order] == q_cams[i]))
        hits = (g_pids[order] == q_pids[i])[keep]
        if hits.any():
            ranks = np.flatnonzero(hits) + 1
            aps.append(np.mean(np.arange(1, ranks.size + 1) / ranks))
            first.append(ranks[0])
    got = evaluate(qf, gf, q_pids, g_pids, q_cams, g_cams, rerank=True, chunk_size=6)
    assert got["num_valid_queries"] == len(aps)
    assert abs(got["mAP"] - np.mean(aps)) < 1e-5
    assert got["cmc"][0] == pytest.approx(np.mean(np.array(first) == 1), abs=1e-5)
