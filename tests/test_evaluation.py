"""passreid.evaluation and passreid.distance: hand-computed protocol cases, the protocol's
reference (stable argsort of every row, the implementation evaluation replaced), distances."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from passreid import distance
from passreid.evaluation import protocol
from passreid.errors import DatasetError
from passreid.evaluation import compute_distance, distance_chunks, evaluate, evaluate_distmat, format_metrics


@pytest.fixture(params=["rows", "keys"])
def ranker(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Both rankings: row by row (the CPU's) and through keys of every candidate (other devices')."""
    if request.param == "keys":
        monkeypatch.setattr(protocol, "_scans_rows", lambda device: False)
    return request.param


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
def test_hand_computed_example(chunk_size: int | None, ranker: str) -> None:
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


def test_ties_keep_gallery_order(ranker: str) -> None:
    """All three at the same distance: the match's rank is its gallery position."""
    dist = np.zeros((1, 3), dtype=np.float32)
    first = evaluate_distmat(dist, [5], [5, 1, 2], [0], [1, 1, 1])
    last = evaluate_distmat(dist, [5], [1, 2, 5], [0], [1, 1, 1])
    assert first["mAP"] == 1.0 and first["cmc"] == [1.0, 1.0, 1.0]
    assert last["mAP"] == pytest.approx(1 / 3) and last["cmc"] == pytest.approx([0.0, 0.0, 1.0])


def test_negative_distances_and_signed_zero(ranker: str) -> None:
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
    """The protocol query by query: stable argsort of the whole row, drop junk, ranks of the
    matches - what the published code and passreid's former implementation compute."""
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
    """Identities 0 .. ids - 1: identity 0 plays the distractors (and a query of it has matches)."""
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
def test_matches_reference_on_random_data(seed: int, ranker: str) -> None:
    qf, gf, q_pids, g_pids, q_cams, g_cams = random_split(seed)
    want = reference_metrics(compute_distance(qf, gf).numpy(), q_pids, g_pids, q_cams, g_cams)
    assert 0.05 < want["mAP"] < 0.95  # neither trivial nor hopeless
    got = evaluate(qf, gf, q_pids, g_pids, q_cams, g_cams, chunk_size=5)
    assert_same_metrics(got, want)
    assert got["num_queries"] == len(qf)


@pytest.mark.parametrize("seed", range(3))
def test_matches_reference_with_many_ties(seed: int, ranker: str) -> None:
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


def test_junk_tied_with_the_last_match_and_items_after_it(ranker: str) -> None:
    """Every distance equal: rank = gallery position among the non-junk items.

    Gallery pids 7 9 9 7 9 7 with cameras 0 0 1 1 1 0; query pid 9, camera 1: g2 and g4 are
    junk, g1 the only match -> rank 2 (g0, g1); items after it at the same distance
    (g3, g5) do not count.
    """
    dist = np.full((1, 6), 0.5, dtype=np.float32)
    m = evaluate_distmat(dist, [9], [7, 9, 9, 7, 9, 7], [1], [0, 0, 1, 1, 1, 0])
    assert m["mAP"] == 0.5 and m["mINP"] == 0.5 and m["cmc"] == [0.0, 1.0, 1.0, 1.0, 1.0, 1.0]


def _hard_split(seed: int, num_q: int = 60, num_g: int = 300):
    """Distractors (pid 0), queries without any match, queries whose matches are all junk,
    and distances rounded to a few values (ties everywhere, negatives and -0.0 too)."""
    rng = np.random.default_rng(seed)
    q_pids = rng.integers(0, 30, num_q)
    q_pids[:5] = 1000 + np.arange(5)  # identities absent from the gallery
    g_pids = rng.integers(0, 30, num_g)
    g_pids[rng.random(num_g) < 0.3] = 0  # distractors
    q_cams, g_cams = rng.integers(0, 3, num_q), rng.integers(0, 3, num_g)
    q_pids[5], q_cams[5] = 29, 2
    g_cams[g_pids == 29] = 2  # query 5's matches are all junk
    dist = np.round(rng.standard_normal((num_q, num_g)) * 2).astype(np.float32) / 4
    dist[dist == 0] = np.where(rng.random(int((dist == 0).sum())) < 0.5, -0.0, 0.0)
    return dist, q_pids, g_pids, q_cams, g_cams


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("chunk_size", [1, 7, 60, None])
def test_matches_reference_with_junk_distractors_ties_and_no_match(
    seed: int, chunk_size: int | None, ranker: str
) -> None:
    dist, q_pids, g_pids, q_cams, g_cams = _hard_split(seed)
    want = reference_metrics(dist, q_pids, g_pids, q_cams, g_cams)
    assert want["num_valid_queries"] < len(q_pids) - 5  # some skipped
    got = evaluate_distmat(dist, q_pids, g_pids, q_cams, g_cams, chunk_size=chunk_size)
    assert_same_metrics(got, want)
    assert got["num_queries"] == len(q_pids)


def test_key_blocks_inside_a_chunk(monkeypatch: pytest.MonkeyPatch, ranker: str) -> None:
    """A chunk with more rows than the keys can number is ranked in sub-blocks (here 7 rows)."""
    dist, q_pids, g_pids, q_cams, g_cams = _hard_split(3)
    monkeypatch.setattr(protocol, "_ORDER_BITS", 63 - 3 - protocol._index_bits(dist.shape[1]))
    got = evaluate_distmat(dist, q_pids, g_pids, q_cams, g_cams, chunk_size=25)
    assert_same_metrics(got, reference_metrics(dist, q_pids, g_pids, q_cams, g_cams))


def test_radix_sorted_rows_keep_ties_and_signed_zero(monkeypatch: pytest.MonkeyPatch) -> None:
    """Rows sorted through the int32 patterns (long rows) where no value has the sign bit,
    numpy's sort where one has (-0.0 included): the same metrics either way."""
    monkeypatch.setattr(protocol, "_RADIX_SORT_FROM", 1)
    for seed in range(3):
        dist, q_pids, g_pids, q_cams, g_cams = _hard_split(seed)
        dist = np.abs(dist)  # ties everywhere, no sign bit (-0.0 -> 0.0)
        dist[1::4, ::3] = -0.0  # these rows take numpy's sort
        got = evaluate_distmat(dist, q_pids, g_pids, q_cams, g_cams, chunk_size=9)
        assert_same_metrics(got, reference_metrics(dist, q_pids, g_pids, q_cams, g_cams))


@pytest.mark.parametrize("chunk_size", [1, 6, None])
def test_chunks_in_parallel_threads_equal_one_thread(chunk_size: int | None) -> None:
    """With several torch threads, CPU chunks run in parallel (a one-thread product each):
    the same ranks, and the sums are merged in chunk order."""
    qf, gf, q_pids, g_pids, q_cams, g_cams = random_split(2, num_q=53)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = evaluate(qf, gf, q_pids, g_pids, q_cams, g_cams, chunk_size=chunk_size)
        torch.set_num_threads(3)
        three = evaluate(qf, gf, q_pids, g_pids, q_cams, g_cams, chunk_size=chunk_size)
        assert torch.get_num_threads() == 3
        gf[100, 0] = np.nan  # an error in a worker reaches the caller
        with pytest.raises(ValueError, match="NaN"):
            evaluate(qf, gf, q_pids, g_pids, q_cams, g_cams, chunk_size=chunk_size)
    finally:
        torch.set_num_threads(before)
    if chunk_size is not None:  # same chunks: the same sums in the same order
        assert three == one
    # by default each thread gets its share of the queries: other chunks, sums in another order
    assert three["cmc"] == one["cmc"] and three["mAP"] == pytest.approx(one["mAP"], abs=1e-12)


def test_map_distance_chunks_is_the_chunks_in_order() -> None:
    qf, gf, *_ = random_split(3, num_q=23)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        got = distance.map_distance_chunks(lambda start, block: (start, block.clone()), qf, gf, chunk_size=5)
    finally:
        torch.set_num_threads(before)
    assert [start for start, _ in got] == [0, 5, 10, 15, 20]
    with distance._blas_threads(1):
        assert torch.equal(torch.cat([block for _, block in got]), compute_distance(qf, gf))


def test_nan_anywhere_is_rejected() -> None:
    """Also where no match could see it (far beyond every query's last match)."""
    dist = DISTMAT.copy()
    dist[0, 4] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        evaluate_distmat(dist, Q_PIDS, G_PIDS, Q_CAMS, G_CAMS)
    qf, gf, q_pids, g_pids, q_cams, g_cams = random_split(0)
    gf[3, 2] = np.inf
    with pytest.raises(ValueError, match="NaN"):
        evaluate(qf, gf, q_pids, g_pids, q_cams, g_cams)


def test_bf16_product_ranks_close_to_fp32() -> None:
    """bf16 (behind precision=) rounds the products: distances within a few 1e-3 of the
    float32 ones here, and the metrics move by little."""
    qf, gf, q_pids, g_pids, q_cams, g_cams = random_split(4, dim=64)
    qf /= np.linalg.norm(qf, axis=1, keepdims=True)
    gf /= np.linalg.norm(gf, axis=1, keepdims=True)
    for metric in ("euclidean", "cosine"):
        exact = compute_distance(qf, gf, metric=metric)
        approx = compute_distance(qf, gf, metric=metric, precision="bf16")
        assert approx.dtype == torch.float32 and 0 < (approx - exact).abs().max() < 2e-2
        fp32 = evaluate(qf, gf, q_pids, g_pids, q_cams, g_cams, metric=metric)
        bf16 = evaluate(qf, gf, q_pids, g_pids, q_cams, g_cams, metric=metric, precision="bf16", chunk_size=9)
        assert bf16["num_valid_queries"] == fp32["num_valid_queries"]
        assert abs(bf16["mAP"] - fp32["mAP"]) < 0.02
    with pytest.raises(ValueError, match="precision"):
        compute_distance(qf, gf, precision="fp16")  # type: ignore[arg-type]


def test_cpu_products_use_torch_thread_count() -> None:
    from threadpoolctl import threadpool_info

    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        with distance._blas_threads(torch.get_num_threads()):
            numpy_blas = [info for info in threadpool_info() if "numpy" in info["filepath"] and info["user_api"] == "blas"]
            assert numpy_blas and all(info["num_threads"] == 1 for info in numpy_blas)
    finally:
        torch.set_num_threads(before)


def test_tf32_is_off_for_the_product_and_restored() -> None:
    matmul = torch.backends.cuda.matmul
    name = "fp32_precision" if hasattr(matmul, "fp32_precision") else "allow_tf32"
    before = getattr(matmul, name)
    try:
        setattr(matmul, name, "tf32" if name == "fp32_precision" else True)
        with distance._ieee_fp32_on_cuda():
            assert getattr(matmul, name) in ("ieee", False)
        assert getattr(matmul, name) in ("tf32", True)
    finally:
        setattr(matmul, name, before)


@pytest.mark.parametrize("block", [4, 7, 50])
def test_self_distance_blocks_cover_each_pair_once(block: int) -> None:
    """Diagonal blocks first, then the blocks above them: (i, j) is computed directly when
    i and j share a block or i's block comes first, and otherwise as (j, i)."""
    x = np.random.default_rng(0).standard_normal((23, 5)).astype(np.float32)
    want = compute_distance(x, x).numpy()
    seen = np.zeros((23, 23), dtype=int)
    order = []
    for s, t, dist in distance.self_distance_blocks(x, block=block):
        order.append((s, t))
        seen[s : s + dist.shape[0], t : t + dist.shape[1]] += 1
        assert np.allclose(dist.numpy(), want[s : s + dist.shape[0], t : t + dist.shape[1]], atol=1e-5)
    blocks = np.arange(23) // block
    assert np.array_equal(seen, (blocks[:, None] <= blocks[None, :]).astype(int))
    num_blocks = blocks[-1] + 1
    assert all(s == t for s, t in order[:num_blocks]) and all(s < t for s, t in order[num_blocks:])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu() -> None:
    qf, gf, q_pids, g_pids, q_cams, g_cams = random_split(5)
    cpu = evaluate(qf, gf, q_pids, g_pids, q_cams, g_cams)
    gpu = evaluate(qf, gf, q_pids, g_pids, q_cams, g_cams, device="cuda", chunk_size=8)
    assert_same_metrics(gpu, cpu)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_bf16_ranks_close_to_fp32_and_ties_exact() -> None:
    qf, gf, q_pids, g_pids, q_cams, g_cams = random_split(6, dim=64)
    fp32 = evaluate(qf, gf, q_pids, g_pids, q_cams, g_cams, device="cuda")
    bf16 = evaluate(qf, gf, q_pids, g_pids, q_cams, g_cams, device="cuda", precision="bf16")
    assert abs(bf16["mAP"] - fp32["mAP"]) < 0.02
    dist, q_pids, g_pids, q_cams, g_cams = _hard_split(1)
    got = evaluate_distmat(torch.from_numpy(dist).cuda(), q_pids, g_pids, q_cams, g_cams, chunk_size=7)
    assert_same_metrics(got, reference_metrics(dist, q_pids, g_pids, q_cams, g_cams))


def test_eval_command_reranks_feature_files(tmp_path) -> None:
    """`passreid eval --rerank` on feature files: the metrics of re_ranking's matrix."""
    import json

    from passreid.cli import main as cli_main
    from passreid.features import FeatureSet
    from passreid.kreciprocal import re_ranking

    qf, gf, q_pids, g_pids, q_cams, g_cams = random_split(8, num_q=15, num_g=80)
    for name, f, p, c in (("q", qf, q_pids, q_cams), ("g", gf, g_pids, g_cams)):
        FeatureSet(f, p, c, np.array([f"{name}{i}.jpg" for i in range(len(f))])).save(tmp_path / f"{name}.npz")
    out = tmp_path / "metrics.json"
    code = cli_main(["eval", "--query-features", str(tmp_path / "q.npz"), "--gallery-features", str(tmp_path / "g.npz"),
                     "--rerank", "--device", "cpu", "--json", str(out)])
    assert code == 0
    got = json.loads(out.read_text())
    assert_same_metrics(got, reference_metrics(re_ranking(qf, gf).numpy(), q_pids, g_pids, q_cams, g_cams))


def test_thread_settings_are_restored() -> None:
    """Bookkeeping runs on one torch thread inside evaluate; the caller's setting comes back."""
    qf, gf, q_pids, g_pids, q_cams, g_cams = random_split(2)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        evaluate(qf, gf, q_pids, g_pids, q_cams, g_cams, rerank=True, k1=6, k2=2)
        assert torch.get_num_threads() == 2
        with distance.torch_ops_on_one_thread(torch.device("cpu")):
            assert torch.get_num_threads() == 1
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
