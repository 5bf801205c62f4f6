"""Benchmark passreid.evaluation.evaluate against the published evaluation recipe.

Sizes default to MSMT17's test split (11,659 queries, 82,161 gallery images, 3,060
identities, 15 cameras) with random 768-d L2-normalised features.

* passreid: ``evaluate(qf, gf, ...)`` on all queries, distance computation included.
* baseline: what the published evaluation code does - a dense numpy float32 distance
  matrix, a full ``argsort`` of every row, the ``int32`` match matrix, then a per-query
  Python loop (junk removal, CMC, AP, INP). It needs ~20 bytes per query x gallery pair
  (float32 distance, int64 argsort, int64 gathered ids, int32 matches), about 19 GB at
  MSMT17 size, so it runs on the first ``--baseline-queries`` queries; its time and memory
  are scaled linearly to all queries (every stage is linear in the number of queries).
  The published loop builds each query's precision curve with a Python list
  comprehension over the gallery (0.17 s per query measured here at this gallery size,
  over half an hour for all MSMT17 queries); the baseline here uses numpy's vectorised
  cumulative sum instead, a stronger baseline.

Re-ranking (unless ``--no-rerank``), in the same run:

* passreid: ``evaluate(..., rerank=True)`` at the full size - the sparse k-reciprocal
  encoding of all Q + G points, then re-ranked query blocks ranked as they come.
* baseline: the published re-ranking (``dense_re_ranking``: (Q+G) x (Q+G) distance,
  argsort and V arrays, Python loops) followed by the published ranking, on the first
  ``--dense-queries`` x ``--dense-gallery`` (about 24 bytes per (Q+G)^2 pair: ~5 GB at
  the default 2,000 x 14,000); passreid runs that same subset too, for the ratio and
  the metric check. The dense method is not scaled: its cost grows with (Q+G)^2.

Each measurement runs in a fresh process. Peak memory is the growth of that process's
resident set (Linux ``VmHWM`` after resetting it through ``/proc/self/clear_refs``, minus
``VmRSS`` before the call) once the features are loaded, so it counts numpy, torch and
BLAS buffers alike; for the baseline ``tracemalloc``'s peak (numpy allocations only) is
reported as well.

Both sides multiply matrices with numpy's BLAS. ``--threads`` sets torch's CPU threads
for passreid's ranking ops: on a machine shared with other busy processes, two OpenMP
threads wait on each other at every op, and ``--threads 1`` shows the algorithms'
cost without that penalty (the published loop is single-threaded numpy).

Prints one JSON line (``rerank`` holds the re-ranking figures). Example::

    python benchmarks/bench_eval.py --check
    python benchmarks/bench_eval.py --quick --check
    python benchmarks/bench_eval.py --device cuda
    python benchmarks/bench_eval.py --no-rerank --unclustered   # the ranking's worst case
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
import tracemalloc
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from typing import Any

import numpy as np
import torch


def make_data(
    queries: int, gallery: int, dim: int, ids: int, cams: int, seed: int, unclustered: bool = False
) -> dict[str, np.ndarray]:
    """Random L2-normalised features with MSMT17-like identity and camera labels.

    Query features are noisy copies of their identity's centre so the metrics are not
    trivial; labels are uniform over ``ids`` identities and ``cams`` cameras. With
    ``unclustered`` the features ignore the identities (an untrained model): every
    query's last match lies deep in the gallery, the ranking's worst case.
    """
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((ids, dim), dtype=np.float32) * (0.0 if unclustered else 1.0)

    def features(pids: np.ndarray) -> np.ndarray:
        f = centres[pids] + 2.5 * rng.standard_normal((pids.size, dim), dtype=np.float32)
        f /= np.linalg.norm(f, axis=1, keepdims=True)
        return f

    q_pids = rng.integers(0, ids, queries)
    g_pids = rng.integers(0, ids, gallery)
    return {
        "qf": features(q_pids),
        "gf": features(g_pids),
        "q_pids": q_pids,
        "g_pids": g_pids,
        "q_camids": rng.integers(0, cams, queries),
        "g_camids": rng.integers(0, cams, gallery),
    }


def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def baseline_metrics(
    qf: np.ndarray,
    gf: np.ndarray,
    q_pids: np.ndarray,
    g_pids: np.ndarray,
    q_camids: np.ndarray,
    g_camids: np.ndarray,
    max_rank: int = 50,
) -> tuple[dict[str, Any], dict[str, float]]:
    """The published evaluation recipe; returns (metrics, seconds per stage)."""
    t0 = time.perf_counter()
    distmat = (qf**2).sum(1, keepdims=True) + (gf**2).sum(1)[None, :] - 2.0 * (qf @ gf.T)
    seconds = time.perf_counter() - t0
    metrics, times = baseline_ranking(distmat, q_pids, g_pids, q_camids, g_camids, max_rank)
    return metrics, {"distance": seconds, **times}


def baseline_ranking(
    distmat: np.ndarray,
    q_pids: np.ndarray,
    g_pids: np.ndarray,
    q_camids: np.ndarray,
    g_camids: np.ndarray,
    max_rank: int = 50,
) -> tuple[dict[str, Any], dict[str, float]]:
    """The published ranking of a dense ``(Q, G)`` distance matrix; (metrics, seconds per stage)."""
    times: dict[str, float] = {}
    t0 = time.perf_counter()
    indices = np.argsort(distmat, axis=1)
    times["argsort"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    matches = (g_pids[indices] == q_pids[:, None]).astype(np.int32)
    times["matches"] = time.perf_counter() - t0
    max_rank = min(max_rank, distmat.shape[1])

    def loop() -> dict[str, Any]:
        cmcs, aps, inps = [], [], []
        for i in range(distmat.shape[0]):
            order = indices[i]
            keep = ~((g_pids[order] == q_pids[i]) & (g_camids[order] == q_camids[i]))
            hits = matches[i][keep]
            if not hits.any():
                continue
            cum = hits.cumsum()
            last = np.flatnonzero(hits).max()
            inps.append(cum[last] / (last + 1.0))
            cmc = cum.copy()
            cmc[cmc > 1] = 1
            cmcs.append(cmc[:max_rank])
            aps.append((cum / np.arange(1.0, cum.size + 1.0) * hits).sum() / hits.sum())
        return {
            "mAP": float(np.mean(aps)),
            "mINP": float(np.mean(inps)),
            "cmc": (np.asarray(cmcs, dtype=np.float64).sum(0) / len(cmcs)).tolist(),
            "num_queries": int(distmat.shape[0]),
            "num_valid_queries": len(cmcs),
        }

    t0 = time.perf_counter()
    metrics = loop()
    times["loop"] = time.perf_counter() - t0
    return metrics, times


def dense_re_ranking(qf: np.ndarray, gf: np.ndarray, k1: int = 20, k2: int = 6, lambda_value: float = 0.3) -> np.ndarray:
    """The published k-reciprocal re-ranking (Zhong et al.'s code as TransReID/PASS ship it):
    (Q+G) x (Q+G) distance, argsort and V matrices, Python loops over points. V is float32
    here (float16 in the original: slower in numpy and off by ~1e-3). Returns ``(Q, G)``."""
    num_q = qf.shape[0]
    feat = np.concatenate([qf, gf])
    num = feat.shape[0]
    sq = (feat**2).sum(1)
    original = np.maximum(sq[:, None] + sq[None, :] - 2.0 * feat @ feat.T, 0)
    original = np.transpose(original / np.max(original, axis=0))
    v = np.zeros_like(original)
    initial_rank = np.argsort(original).astype(np.int32)
    half = int(np.around(k1 / 2))
    for i in range(num):
        forward = initial_rank[i, : k1 + 1]
        backward = initial_rank[forward, : k1 + 1]
        reciprocal = forward[np.where(backward == i)[0]]
        expansion = reciprocal
        for candidate in reciprocal:
            c_forward = initial_rank[candidate, : half + 1]
            c_backward = initial_rank[c_forward, : half + 1]
            c_reciprocal = c_forward[np.where(c_backward == candidate)[0]]
            if len(np.intersect1d(c_reciprocal, reciprocal)) > 2 / 3 * len(c_reciprocal):
                expansion = np.append(expansion, c_reciprocal)
        expansion = np.unique(expansion)
        weight = np.exp(-original[i, expansion])
        v[i, expansion] = weight / np.sum(weight)
    original = original[:num_q]
    if k2 != 1:
        v = np.stack([np.mean(v[initial_rank[i, :k2], :], axis=0) for i in range(num)])
    del initial_rank
    inverted = [np.where(v[:, i] != 0)[0] for i in range(num)]
    jaccard = np.zeros_like(original)
    for i in range(num_q):
        temp_min = np.zeros(num, dtype=np.float32)
        nonzero = np.where(v[i, :] != 0)[0]
        for j in nonzero:
            temp_min[inverted[j]] += np.minimum(v[i, j], v[inverted[j], j])
        jaccard[i] = 1 - temp_min / (2 - temp_min)
    final = jaccard * (1 - lambda_value) + original * lambda_value
    return final[:, num_q:]


def _child(kind: str, args: dict[str, Any], queries: int, gallery: int) -> dict[str, Any]:
    """Runs in a fresh process: build the data, time one evaluation, measure memory.

    ``kind``: ``baseline`` / ``passreid`` (evaluation), ``rerank_dense`` / ``rerank``
    (re-ranking and evaluation of the re-ranked distances), on the first ``queries`` queries
    and ``gallery`` gallery items.
    """
    torch.set_num_threads(args["threads"])
    data = make_data(args["queries"], args["gallery"], args["dim"], args["ids"], args["cams"], args["seed"],
                     args["unclustered"])
    data = {k: v[:queries] if k.startswith("q") else v[:gallery] for k, v in data.items()}
    warm_up = {k: v[:20] if k.startswith("q") else v[:500] for k, v in data.items()}  # one-off library set-up
    from passreid.evaluation import evaluate

    def dense(d: dict[str, np.ndarray]) -> tuple[dict[str, Any], dict[str, float]]:
        t0 = time.perf_counter()
        distmat = dense_re_ranking(d["qf"], d["gf"])
        seconds = time.perf_counter() - t0
        labels = {k: v for k, v in d.items() if not k.endswith("f")}
        metrics, times = baseline_ranking(distmat, **labels)
        return metrics, {"re_ranking": seconds, **times}

    run = {
        "baseline": lambda d: baseline_metrics(**d),
        "passreid": lambda d: (evaluate(**d, device=args["device"]), {}),
        "rerank_dense": dense,
        "rerank": lambda d: (evaluate(**d, device=args["device"], rerank=True), {}),
    }[kind]
    run(warm_up)
    _reset_peak()
    rss_before = _rss_kib("VmRSS")
    out: dict[str, Any] = {}
    if kind == "baseline":
        tracemalloc.start()
    t0 = time.perf_counter()
    metrics, stages = run(data)
    if args["device"].startswith("cuda"):
        torch.cuda.synchronize()
    out["seconds"] = time.perf_counter() - t0
    out["stages"] = stages
    if kind == "baseline":
        out["tracemalloc_peak_mb"] = tracemalloc.get_traced_memory()[1] / 2**20
        tracemalloc.stop()
    if args["device"].startswith("cuda"):
        out["cuda_peak_mb"] = torch.cuda.max_memory_allocated() / 2**20
    out["rss_peak_delta_mb"] = (_rss_kib("VmHWM") - rss_before) / 1024
    out["rss_peak_mb"] = _rss_kib("VmHWM") / 1024
    out["metrics"] = metrics
    return out


def _in_fresh_process(kind: str, args: dict[str, Any], queries: int, gallery: int) -> dict[str, Any]:
    with ProcessPoolExecutor(max_workers=1, mp_context=get_context("spawn")) as pool:
        return pool.submit(_child, kind, args, queries, gallery).result()


def _metric_diff(a: dict[str, Any], b: dict[str, Any]) -> float:
    diffs = [abs(a["mAP"] - b["mAP"]), abs(a["mINP"] - b["mINP"])]
    diffs += [abs(x - y) for x, y in zip(a["cmc"], b["cmc"], strict=True)]
    if a["num_valid_queries"] != b["num_valid_queries"]:
        return float("inf")
    return max(diffs)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", help="device for passreid (cpu, cuda)")
    parser.add_argument("--queries", type=int, default=11659)
    parser.add_argument("--gallery", type=int, default=82161)
    parser.add_argument("--dim", type=int, default=768)
    parser.add_argument("--ids", type=int, default=3060)
    parser.add_argument("--cams", type=int, default=15)
    parser.add_argument("--baseline-queries", type=int, default=1000, help="query subset the baseline runs on")
    parser.add_argument("--dense-queries", type=int, default=2000,
                        help="queries of the largest re-ranking both methods run (the dense one needs ~24 B per (Q+G)^2)")
    parser.add_argument("--dense-gallery", type=int, default=14000, help="gallery of that re-ranking")
    parser.add_argument("--no-rerank", action="store_true", help="evaluation only")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--unclustered", action="store_true",
                        help="features independent of the identities: the ranking's worst case")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch (and BLAS) CPU threads")
    parser.add_argument("--quick", action="store_true", help="small sizes for a smoke run")
    parser.add_argument("--check", action="store_true", help="verify both give the same metrics on the subset")
    ns = parser.parse_args()
    if ns.quick:
        ns.queries, ns.gallery, ns.ids, ns.baseline_queries = 300, 3000, 200, 100
        ns.dense_queries, ns.dense_gallery = 100, 900
    ns.baseline_queries = min(ns.baseline_queries, ns.queries)
    ns.dense_queries, ns.dense_gallery = min(ns.dense_queries, ns.queries), min(ns.dense_gallery, ns.gallery)
    args = vars(ns)
    q, g = ns.queries, ns.gallery

    base = _in_fresh_process("baseline", args, ns.baseline_queries, g)
    ours = _in_fresh_process("passreid", args, q, g)
    scale = q / ns.baseline_queries
    stages = base["stages"]
    baseline_s = sum(stages.values()) * scale
    result: dict[str, Any] = {
        "queries": q,
        "gallery": g,
        "dim": ns.dim,
        "unclustered": ns.unclustered,
        "passreid_s": round(ours["seconds"], 2),
        "baseline_s": round(baseline_s, 2),
        "speedup": round(baseline_s / ours["seconds"], 2),
        "passreid_peak_rss_delta_mb": round(ours["rss_peak_delta_mb"], 1),
        "passreid_peak_rss_mb": round(ours["rss_peak_mb"], 1),
        "baseline_subset_queries": ns.baseline_queries,
        "baseline_subset_s": round(base["seconds"], 2),
        "baseline_subset_stages_s": {k: round(v, 2) for k, v in stages.items()},
        "baseline_subset_peak_rss_delta_mb": round(base["rss_peak_delta_mb"], 1),
        "baseline_subset_tracemalloc_peak_mb": round(base["tracemalloc_peak_mb"], 1),
        "baseline_peak_rss_delta_mb_scaled": round(base["rss_peak_delta_mb"] * scale, 1),
        "passreid_mAP": round(ours["metrics"]["mAP"], 6),
    }
    if "cuda_peak_mb" in ours:
        result["passreid_cuda_peak_mb"] = round(ours["cuda_peak_mb"], 1)
    checks = []
    if ns.check:
        sub = _in_fresh_process("passreid", args, ns.baseline_queries, g)
        result["check_max_abs_diff"] = _metric_diff(sub["metrics"], base["metrics"])
        checks.append(result["check_max_abs_diff"] < 1e-4)
    if not ns.no_rerank:
        # the largest size both run: dense (published) against streamed, same process kind
        dq, dg = ns.dense_queries, ns.dense_gallery
        dense = _in_fresh_process("rerank_dense", args, dq, dg)
        small = _in_fresh_process("rerank", args, dq, dg)
        full = _in_fresh_process("rerank", args, q, g)
        diff = _metric_diff(small["metrics"], dense["metrics"])
        result["rerank"] = {
            "passreid_s": round(full["seconds"], 2),
            "passreid_peak_rss_delta_mb": round(full["rss_peak_delta_mb"], 1),
            "passreid_mAP": round(full["metrics"]["mAP"], 6),
            "both_queries": dq,
            "both_gallery": dg,
            "both_passreid_s": round(small["seconds"], 2),
            "both_passreid_peak_rss_delta_mb": round(small["rss_peak_delta_mb"], 1),
            "both_dense_s": round(dense["seconds"], 2),
            "both_dense_stages_s": {k: round(v, 2) for k, v in dense["stages"].items()},
            "both_dense_peak_rss_delta_mb": round(dense["rss_peak_delta_mb"], 1),
            "both_speedup": round(dense["seconds"] / small["seconds"], 2),
            "both_max_abs_metric_diff": diff,
        }
        if ns.check:
            checks.append(diff < 1e-4)
    result["machine"] = {
        "cpu_count": os.cpu_count(),
        "torch_threads": ns.threads,
        "torch": torch.__version__,
        "numpy": np.__version__,
        "device": ns.device if not ns.device.startswith("cuda") else torch.cuda.get_device_name(),
        "processor": platform.processor() or platform.machine(),
        "python": platform.python_version(),
        "load_average_at_end": [round(x, 2) for x in os.getloadavg()],
    }
    if checks:
        result["check_passed"] = all(checks)
    print(json.dumps(result))
    return 0 if result.get("check_passed", True) else 1


if __name__ == "__main__":
    sys.exit(main())
