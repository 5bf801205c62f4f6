"""passreid.evaluation: hand-computed protocol cases, a per-query numpy reference, distances."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from passreid.errors import DatasetError
from passreid.evaluation import compute_distance, distance_chunks, evaluate, evaluate_distmat, format_metrics

# ----------------------------------------------------------------------------- hand-computed case
# Gallery   g0      g1      g2      g3      g4      g5
# pid        1       1       2       1       3       2
# cam        0       1       1       1       0       0
G_PIDS = [1, 1, 2, 1, 3, 2]
G_CAMS = [0, 1, 1, 1, 0, 0]
# q0 (pid 1, cam 0): g0 is junk (same pid and cam). Ascending: g0 .1, g2 .2, g1 .25, g4 .3,
#   g5 .4, g3 .9 -> without g0: g2 g1 g4 g5 g3, matches g1, g3 at ranks 2 and 5:
#   AP = (1/2 + 2/5) / 2 = 0.45, INP = 2/5, first match at rank 2.
# q1 (pid 2, cam 1): g2 is junk. g0 g1 g4 g5 tie at .3 and keep gallery order, so without
#   g2: g0 g1 g4 g5 g3 -> the match g5 is 4th: AP = 1/4, INP = 1/4, first match at rank 4.
# q2 (pid 4): no such identity in the gallery -> skipped, counted.
# q3 (pid 3, cam 0): its only gallery image g4 is junk -> skipped, counted.
DISTMAT = np.array(
    [
        [0.1, 0.25, 0.2, 0.9, 0.3, 0.4],
        [0.3, 0.3, 0.1, 0.6, 0.3, 0.3],
        [0.5, 0.4, 0.3, 0.2, 0.1, 0.0],
        [0.5, 0.4, 0.3, 0.2, 0.1, 0.0],
    ],
    dtype=np.float32,
)
Q_PIDS = [1, 2, 4, 3]
Q_CAMS = [0, 1, 0, 0]


@pytest.mark.parametrize("chunk_size", [None, 1, 3])
def test_hand_computed_example(chunk_size: int | None) -> None:
    m = evaluate_distmat(DISTMAT, Q_PIDS, G_PIDS, Q_CAMS, G_CAMS, chunk_size=chunk_size)
    assert set(m) == {"mAP", "mINP", "cmc", "num_queries", "num_valid_queries"}
    assert m["num_queries"] == 4 and m["num_valid_queries"] == 2
    assert m["mAP"] == pytest.approx((0.45 + 0.25) / 2, abs=1e-12)
    assert m["mINP"] == pytest.approx((0.4 + 0.25) / 2, abs=1e-12)
    # cmc length = min(50, gallery size); first matches at ranks 2 and 4
    assert m["cmc"] == pytest.approx([0.0, 0.5, 0.5, 1.0, 1.0, 1.0], abs=1e-12)


def test_max_rank_truncates_cmc() -> None:
    m = evaluate_distmat(DISTMAT, Q_PIDS, G_PIDS, Q_CAMS, G_CAMS, max_rank=3)
    assert m["cmc"] == pytest.approx([0.0, 0.5, 0.5])


def test_ties_keep_gallery_order() -> None:
    """All three at the same distance: the match's rank is its gallery position."""
    dist = np.zeros((1, 3), dtype=np.float32)
    first = evaluate_distmat(dist, [5], [5, 1, 2], [0], [1, 1, 1])
    last = evaluate_distmat(dist, [5], [1, 2, 5], [0], [1, 1, 1])
    assert first["mAP"] == 1.0 and first["cmc"] == [1.0, 1.0, 1.0]
    assert last["mAP"] == pytest.approx(1 / 3) and last["cmc"] == pytest.approx([0.0, 0.0, 1.0])


def test_negative_distances_and_signed_zero() -> None:
    """-0.0 ties with 0.0 (gallery order decides), negatives rank first."""
    dist = DISTMAT.copy()
    dist[1, 2] = -1.0  # junk g2 first
    dist[1, 4] = 0.0  # g4 and the match g5 tie at zero: g4 keeps the lead
    dist[1, 5] = -0.0
    m = evaluate_distmat(dist, Q_PIDS, G_PIDS, Q_CAMS, G_CAMS)
    # q1 now: g4, g5 -> match at rank 2: AP 1/2, INP 1/2
    assert m["mAP"] == pytest.approx((0.45 + 0.5) / 2)
    assert m["mINP"] == pytest.approx((0.4 + 0.5) / 2)
    assert m["cmc"][:2] == pytest.approx([0.0, 1.0])


def test_all_queries_without_match_is_an_error() -> None:
    with pytest.raises(DatasetError, match="none of the 2 queries"):
        evaluate_distmat(DISTMAT[2:], Q_PIDS[2:], G_PIDS, Q_CAMS[2:], G_CAMS)


def test_nan_distance_is_rejected() -> None:
    dist = DISTMAT.copy()
    dist[0, 3] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        evaluate_distmat(dist, Q_PIDS, G_PIDS, Q_CAMS, G_CAMS)


def test_label_length_mismatch_is_rejected() -> None:
    with pytest.raises(ValueError, match="g_pids has 5 entries, expected 6"):
        evaluate_distmat(DISTMAT, Q_PIDS, G_PIDS[:5], Q_CAMS, G_CAMS)


def test_format_metrics() -> None:
    table = format_metrics(evaluate_distmat(DISTMAT, Q_PIDS, G_PIDS, Q_CAMS, G_CAMS))
    header, values = table.splitlines()
    assert header.split() == ["mAP", "R1", "R5", "R10", "mINP"]
    assert values.split() == ["35.00", "0.00", "100.00", "-", "32.50"]  # no R10: gallery of 6


# ----------------------------------------------------------------------------- reference implementation


def reference_metrics(distmat, q_pids, g_pids, q_camids, g_camids, max_rank=50):
    """The protocol query by query: stable argsort, drop junk, ranks of the matches."""
    distmat = np.asarray(distmat, dtype=np.float32)
    q_pids, g_pids = np.asarray(q_pids), np.asarray(g_pids)
    q_camids, g_camids = np.asarray(q_camids), np.asarray(g_camids)
    aps, inps, first_ranks = [], [], []
    for i in range(len(distmat)):
        order = np.argsort(distmat[i], kind="stable")
        junk = (g_pids[order] == q_pids[i]) & (g_camids[order] == q_camids[i])
        hits = (g_pids[order] == q_pids[i])[~junk]
        if not hits.any():
            continue
        ranks = np.flatnonzero(hits) + 1
        aps.append(np.mean(np.arange(1, len(ranks) + 1) / ranks))
        inps.append(len(ranks) / ranks[-1])
        first_ranks.append(ranks[0])
    first = np.array(first_ranks)
    cmc = [float((first <= k).mean()) for k in range(1, min(max_rank, distmat.shape[1]) + 1)]
    return {"mAP": float(np.mean(aps)), "mINP": float(np.mean(inps)), "cmc": cmc, "num_valid_queries": len(aps)}


def random_split(seed: int, num_q: int = 41, num_g: int = 230, dim: int = 16, ids: int = 25, cams: int = 3):
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((ids, dim))
    q_pids, g_pids = rng.integers(0, ids, num_q), rng.integers(0, ids, num_g)
    qf = (centres[q_pids] + 1.5 * rng.standard_normal((num_q, dim))).astype(np.float32)
    gf = (centres[g_pids] + 1.5 * rng.standard_normal((num_g, dim))).astype(np.float32)
    return qf, gf, q_pids, g_pids, rng.integers(0, cams, num_q), rng.integers(0, cams, num_g)


def assert_same_metrics(got: dict, want: dict) -> None:
    assert got["num_valid_queries"] == want["num_valid_queries"]
    assert got["mAP"] == pytest.approx(want["mAP"], abs=1e-6)
    assert got["mINP"] == pytest.approx(want["mINP"], abs=1e-6)
    assert len(got["cmc"]) == len(want["cmc"])
    assert np.allclose(got["cmc"], want["cmc"], atol=1e-6)


@pytest.mark.parametrize("seed", range(4))
def test_matches_reference_on_random_data(seed: int) -> None:
    qf, gf, q_pids, g_pids, q_cams, g_cams = random_split(seed)
    want = reference_metrics(compute_distance(qf, gf).numpy(), q_pids, g_pids, q_cams, g_cams)
    assert 0.05 < want["mAP"] < 0.95  # neither trivial nor hopeless
    got = evaluate(qf, gf, q_pids, g_pids, q_cams, g_cams, chunk_size=5)
    assert_same_metrics(got, want)
    assert got["num_queries"] == len(qf)


@pytest.mark.parametrize("seed", range(3))
def test_matches_reference_with_many_ties(seed: int) -> None:
    """Distances rounded to 0.5 steps: long runs of ties, decided by gallery order."""
    qf, gf, q_pids, g_pids, q_cams, g_cams = random_split(seed)
    dist = np.round(compute_distance(qf, gf).numpy() * 2) / 2 - 3.0  # negatives too
    want = reference_metrics(dist, q_pids, g_pids, q_cams, g_cams, max_rank=20)
    got = evaluate_distmat(torch.from_numpy(dist), q_pids, g_pids, q_cams, g_cams, chunk_size=4, max_rank=20)
    assert_same_metrics(got, want)


def test_evaluate_equals_evaluate_distmat_of_compute_distance() -> None:
    qf, gf, q_pids, g_pids, q_cams, g_cams = random_split(7)
    for metric in ("euclidean", "cosine"):
        dist = compute_distance(qf, gf, metric=metric)
        a = evaluate(torch.from_numpy(qf), gf, q_pids, g_pids, q_cams, g_cams, metric=metric, chunk_size=3)
        b = evaluate_distmat(dist, q_pids.tolist(), g_pids, q_cams, g_cams)
        assert a["cmc"] == b["cmc"] and a["num_valid_queries"] == b["num_valid_queries"]
        assert a["mAP"] == pytest.approx(b["mAP"], abs=1e-12)  # same ranks, sums in another order
        assert a["mINP"] == pytest.approx(b["mINP"], abs=1e-12)


def test_cosine_metric_matches_reference() -> None:
    qf, gf, q_pids, g_pids, q_cams, g_cams = random_split(3)
    qn = qf / np.linalg.norm(qf, axis=1, keepdims=True)
    gn = gf / np.linalg.norm(gf, axis=1, keepdims=True)
    want = reference_metrics(1.0 - qn @ gn.T, q_pids, g_pids, q_cams, g_cams)
    got = evaluate(qf, gf, q_pids, g_pids, q_cams, g_cams, metric="cosine", chunk_size=7)
    assert_same_metrics(got, want)
    # unnormalised features: cosine ranks differently from Euclidean
    assert got["mAP"] != evaluate(qf, gf, q_pids, g_pids, q_cams, g_cams)["mAP"]


def test_compute_distance_values() -> None:
    rng = np.random.default_rng(0)
    q, g = rng.standard_normal((5, 12)), rng.standard_normal((9, 12))
    sq = ((q[:, None, :] - g[None, :, :]) ** 2).sum(-1)
    got = compute_distance(q.astype(np.float32), g.astype(np.float32))
    assert got.dtype == torch.float32 and got.shape == (5, 9)
    assert np.allclose(got.numpy(), sq, atol=1e-4, rtol=1e-5)
    cos = 1.0 - (q / np.linalg.norm(q, axis=1, keepdims=True)) @ (g / np.linalg.norm(g, axis=1, keepdims=True)).T
    assert np.allclose(compute_distance(q, g, metric="cosine").numpy(), cos, atol=1e-6)
    # identical vectors: exactly 0, never negative
    assert compute_distance(q[:2], q[:2]).diagonal().tolist() == [0.0, 0.0]
    with pytest.raises(ValueError, match="metric"):
        compute_distance(q, g, metric="manhattan")  # type: ignore[arg-type]


def test_distance_chunks_are_the_dense_matrix_in_pieces() -> None:
    qf, gf, *_ = random_split(2, num_q=11)
    chunks = list(distance_chunks(qf, gf, metric="cosine", chunk_size=4))
    assert [start for start, _ in chunks] == [0, 4, 8] and chunks[-1][1].shape == (3, 230)
    assert torch.equal(torch.cat([block for _, block in chunks]), compute_distance(qf, gf, metric="cosine"))


def test_rerank_option_evaluates_the_re_ranked_distance() -> None:
    from passreid.kreciprocal import re_ranking

    qf, gf, q_pids, g_pids, q_cams, g_cams = random_split(1, num_q=12, num_g=60)
    want = reference_metrics(re_ranking(qf, gf, k1=8, k2=3, lambda_value=0.3).numpy(), q_pids, g_pids, q_cams, g_cams)
    got = evaluate(qf, gf, q_pids, g_pids, q_cams, g_cams, rerank=True, k1=8, k2=3)
    assert_same_metrics(got, want)
    assert got["mAP"] != evaluate(qf, gf, q_pids, g_pids, q_cams, g_cams)["mAP"]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu() -> None:
    qf, gf, q_pids, g_pids, q_cams, g_cams = random_split(5)
    cpu = evaluate(qf, gf, q_pids, g_pids, q_cams, g_cams)
    gpu = evaluate(qf, gf, q_pids, g_pids, q_cams, g_cams, device="cuda", chunk_size=8)
    assert_same_metrics(gpu, cpu)
