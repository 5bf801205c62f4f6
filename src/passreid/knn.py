"""k nearest neighbours, with faiss on the CPU when it is installed (one import, one availability check)
and torch otherwise: exact L2 k-NN of a point set among itself (:func:`knn_faiss`, :func:`knn_torch`;
re-ranking and clustering in :mod:`passreid.kreciprocal`) and the inner-product indexes a searchable
gallery keeps (:class:`TorchIndex`, :class:`FaissIndex`; :mod:`passreid.search`).
"""

from __future__ import annotations

import logging
import math
from typing import Any, Literal

import numpy as np
import torch

from passreid.distance import block_max, entries_at_most, self_distance_blocks, torch_ops_on_one_thread
from passreid.errors import ConfigError

logger = logging.getLogger(__name__)

Search = Literal["auto", "faiss", "torch"]
IndexType = Literal["flat", "ivf"]

_SCORE_BLOCK = 1 << 26
"""Query x gallery scores computed at once by the torch back end (256 MB of float32)."""

#: Points per block of the all-pairs neighbour search (a 16 MB float32 block at 2,048).
KNN_BLOCK = 2048


def import_faiss() -> Any:
    """``import faiss`` without its loader's INFO lines about CPU-specific builds it could not find."""
    loader = logging.getLogger("faiss.loader")
    level = loader.level
    loader.setLevel(max(loader.getEffectiveLevel(), logging.WARNING))
    try:
        import faiss
    finally:
        loader.setLevel(level)
    return faiss


def faiss_available() -> bool:
    """Whether ``import faiss`` works."""
    try:
        import_faiss()
    except ImportError:
        return False
    return True


def knn_faiss(features: torch.Tensor, k: int) -> np.ndarray:
    """``(N, k)`` int64 indices of the k nearest of the (N, D) float32 CPU ``features`` among themselves
    (squared L2, self included), by an exact flat faiss index."""
    faiss = import_faiss()
    feats = features.numpy()
    index = faiss.IndexFlatL2(feats.shape[1])
    index.add(feats)
    _, nn = index.search(feats, k)
    return nn.astype(np.int64, copy=False)


def knn_torch(
    features: torch.Tensor, k: int, device: torch.device | None, *, block: int | None = None, threads: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """k nearest neighbours and farthest distance of every point, by exact blocked search.

    The distance matrix is symmetric, so only its blocks on and above the diagonal are
    computed (half the products of a row-by-row search); each off-diagonal block updates
    the neighbours of its rows and, read by columns, of its columns. Every point first
    takes the ``k`` nearest of its own diagonal block (``topk``); after that a block
    entry can only matter if it is no farther than the point's current k-th neighbour,
    so each block costs one comparison per entry and a merge of the few that pass.

    Args:
        features: ``(N, D)`` float32.
        k: neighbours per point (self included), ``<= N``.
        device: where the distances and the search run (e.g. ``"cuda"``).
        block: points per block (``block x block`` float32 distances at a time; default
            :data:`KNN_BLOCK`).
        threads: BLAS threads of the products (default ``torch.get_num_threads()``); the
            bookkeeping runs on one (:func:`passreid.distance.torch_ops_on_one_thread`).

    Returns:
        ``(N, k)`` int64 indices, by ascending distance and, among equal distances, by
        index (as a stable sort of the row orders them), and ``(N,)`` float32 largest
        squared distance of each row (numpy, CPU).
    """
    dev = device if device is not None else torch.device("cpu")
    threads = threads if threads is not None else torch.get_num_threads()
    with torch_ops_on_one_thread(dev):
        return _knn_blocks(features.to(dev), k, block if block is not None else KNN_BLOCK, threads)


def _knn_blocks(feats: torch.Tensor, k: int, block: int, threads: int) -> tuple[np.ndarray, np.ndarray]:
    """:func:`knn_torch` on ``feats``' device."""
    dev = feats.device
    n = feats.shape[0]
    index_bits = max(1, n.bit_length())  # index n is the sentinel "no neighbour yet"
    # best[i]: keys (distance bits, index) of point i's k nearest so far, ascending;
    # "none yet" is the sentinel key (inf, n)
    sentinel = _neighbour_keys(torch.tensor(math.inf), torch.tensor(n), index_bits)
    best = torch.full((n, k), int(sentinel), dtype=torch.int64, device=dev)
    row_max = torch.zeros(n, dtype=torch.float32, device=dev)
    for s, t, dist in self_distance_blocks(feats, block=block, device=dev, threads=threads):
        e, f = s + dist.shape[0], t + dist.shape[1]
        torch.maximum(row_max[s:e], block_max(dist, 1), out=row_max[s:e])
        if s == t:  # diagonal blocks come first: every entry up to the row's k-th smallest
            kth = torch.topk(dist, min(k, f - t), dim=1, largest=False).values[:, -1]
            _merge_neighbours(best, s, dist, t, index_bits, kth)
            continue
        torch.maximum(row_max[t:f], block_max(dist, 0), out=row_max[t:f])
        _merge_neighbours(best, s, dist, t, index_bits)
        _merge_neighbours(best, t, dist, s, index_bits, by_column=True)
    nn = best & ((1 << index_bits) - 1)
    return nn.cpu().numpy(), row_max.cpu().numpy()


def _neighbour_keys(dist: torch.Tensor, index: torch.Tensor, index_bits: int) -> torch.Tensor:
    """int64 keys ordered by (distance, index) for distances ``>= 0`` (or ``-0.0``, taken as 0)."""
    bits = (dist.contiguous().view(torch.int32) & 0x7FFFFFFF).to(torch.int64)
    return (bits << index_bits) | index


def _merge_neighbours(
    best: torch.Tensor,
    row_start: int,
    dist: torch.Tensor,
    col_start: int,
    index_bits: int,
    kth: torch.Tensor | None = None,
    *,
    by_column: bool = False,
) -> None:
    """Merge one block of distances into the neighbour lists of its rows.

    Args:
        best: ``(N, k)`` int64 neighbour keys, updated in place.
        row_start, col_start: the points of the block's first row and column.
        dist: ``(R, C)`` float32 block; with ``by_column`` its columns are the lists to
            update (the block read transposed, without a transposed copy).
        index_bits: bits of the index in a key.
        kth: ``(R,)`` (``(C,)`` by column) only entries no farther than this are merged; default each row's
            current k-th neighbour distance (nothing farther can enter; ties by index).
    """
    k = best.shape[1]
    num = dist.shape[1] if by_column else dist.shape[0]
    rows = best[row_start : row_start + num]
    if kth is None:
        kth = (rows[:, k - 1] >> index_bits).to(torch.int32).view(torch.float32)
    if by_column:
        c, r = entries_at_most(dist, kth, dim=0)
        order = torch.argsort(r, stable=True)
        r, c = r[order], c[order]
        values = dist[c, r]
    else:
        r, c = entries_at_most(dist, kth, dim=1)
        values = dist[r, c]
    if r.numel() == 0:
        return
    cand = _neighbour_keys(values, c + col_start, index_bits)
    touched, local, counts = torch.unique_consecutive(r, return_inverse=True, return_counts=True)
    slot = torch.arange(r.numel(), device=r.device) - (torch.cumsum(counts, 0) - counts)[local]
    merged = torch.full((touched.numel(), k + int(counts.max())), torch.iinfo(torch.int64).max, device=best.device)
    merged[:, :k] = rows[touched]
    merged[local, k + slot] = cand
    rows[touched] = merged.sort(1).values[:, :k]


def resolve_search(search: Search, device: torch.device | None) -> str:
    if search not in ("auto", "faiss", "torch"):
        raise ConfigError(f"search must be 'auto', 'faiss' or 'torch', got {search!r}")
    if search == "faiss" and not faiss_available():
        raise ConfigError("search='faiss' needs the faiss package (pip install faiss-cpu), or use search='torch'")
    if search == "auto":
        on_cpu = device is None or device.type == "cpu"
        return "faiss" if on_cpu and faiss_available() else "torch"
    return search


# ----------------------------------------------------------------------------- gallery indexes (inner product)


def default_nlist(num_vectors: int) -> int:
    """IVF list count: about 4 sqrt(N), with at least 39 training vectors per list (faiss's minimum)."""
    return max(1, min(int(4 * np.sqrt(num_vectors)), num_vectors // 39))


class TorchIndex:
    """Exact inner-product k-NN on a device; gallery (N, D) held as one tensor."""

    def __init__(self, dim: int, device: torch.device) -> None:
        self.device = device
        self.data = torch.empty(0, dim, device=device)

    @property
    def ntotal(self) -> int:
        return int(self.data.shape[0])

    def add(self, x: np.ndarray) -> None:
        self.data = torch.cat((self.data, torch.from_numpy(x).to(self.device)))

    def search(self, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(Q, D) -> scores (Q, k), indices (Q, k); queries in chunks so a score block stays small."""
        rows = max(1, _SCORE_BLOCK // max(1, self.ntotal))
        scores, indices = [], []
        queries = torch.from_numpy(q).to(self.device)
        for chunk in queries.split(rows):
            top = (chunk @ self.data.T).topk(k, dim=1)
            scores.append(top.values.cpu())
            indices.append(top.indices.cpu())
        return torch.cat(scores).numpy(), torch.cat(indices).numpy().astype(np.int64)

    def vectors(self) -> np.ndarray:
        return self.data.cpu().numpy()


class FaissIndex:
    """A faiss ``IndexFlatIP`` or ``IndexIVFFlat`` (trained on the first vectors added)."""

    def __init__(self, dim: int, index: IndexType, nlist: int | None, nprobe: int, raw: Any = None) -> None:
        faiss = import_faiss()

        self.kind = index
        self.nlist = nlist
        self.nprobe = nprobe
        if raw is not None:
            self.index = raw
        elif index == "flat":
            self.index = faiss.IndexFlatIP(dim)
        else:
            self.index = None  # built at the first add, when nlist can be chosen from the data

    @property
    def ntotal(self) -> int:
        return 0 if self.index is None else int(self.index.ntotal)

    def add(self, x: np.ndarray) -> None:
        if self.index is None:
            self._train_ivf(x)
        self.index.add(x)

    def _train_ivf(self, x: np.ndarray) -> None:
        faiss = import_faiss()

        nlist = self.nlist or default_nlist(len(x))
        if len(x) < nlist:
            raise ConfigError(
                f"an IVF index with nlist={nlist} must be trained on at least {nlist} vectors, "
                f"but the first batch added has {len(x)}; add more at once or use index='flat'"
            )
        quantizer = faiss.IndexFlatIP(x.shape[1])
        index = faiss.IndexIVFFlat(quantizer, x.shape[1], nlist, faiss.METRIC_INNER_PRODUCT)
        logger.info("training an IVF index: %d lists on %d vectors", nlist, len(x))
        index.train(x)
        index.nprobe = self.nprobe
        self.nlist = nlist
        self.index = index

    def search(self, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        scores, indices = self.index.search(q, k)
        return scores, indices.astype(np.int64)

    def vectors(self) -> np.ndarray:
        if self.ntotal == 0:
            return np.zeros((0, 0), np.float32)
        if self.kind == "ivf":
            self.index.make_direct_map()
        return self.index.reconstruct_n(0, self.ntotal)

    def serialize(self) -> np.ndarray | None:
        """The IVF index as bytes (its trained lists must survive a save); a flat index is rebuilt instead."""
        faiss = import_faiss()

        if self.kind != "ivf" or self.index is None:
            return None
        return faiss.serialize_index(self.index)
