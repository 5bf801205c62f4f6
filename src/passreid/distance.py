"""Query-gallery distances: the one distance module under evaluation, re-ranking and clustering.

Everything that ranks features (``evaluation``, ``kreciprocal``, ``visualize``) takes its
distances from here, so they all see the same float32 values.

Squared Euclidean distances come from one matrix product of augmented features (the norms
ride along as two extra columns), computed in chunks of queries against the whole gallery:

- on the CPU through numpy's BLAS (OpenBLAS), limited to torch's thread count
  (``torch.set_num_threads``), because torch's own ``sgemm`` ran this shape 1.5-2.6x slower
  on the AMD EPYC machines passreid is measured on;
- on CUDA through torch in true float32 (TF32 switched off for the product, whatever the
  process set: ranks must not depend on it). ``precision="bf16"`` multiplies in bfloat16
  with float32 accumulation and adds the norms in float32: faster on GPUs, but its ranks are
  approximate (tested against the float32 ranks), so it is never the default.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Literal, TypeVar

import numpy as np
import torch
import torch.nn.functional as F

logger = logging.getLogger(__name__)

Metric = Literal["euclidean", "cosine"]
Precision = Literal["fp32", "bf16"]
ArrayLike = np.ndarray | torch.Tensor
T = TypeVar("T")


def as_float_tensor(x: ArrayLike, name: str) -> torch.Tensor:
    """``x`` as a detached float32 tensor (numpy or torch in; the device is kept)."""
    t = torch.as_tensor(x)
    if not t.is_floating_point():
        raise ValueError(f"{name} must be a floating point array, got dtype {t.dtype}")
    # Distances never need gradients; detaching also lets CPU blocks go through numpy.
    return t.detach().float()


def check_features(q: torch.Tensor, g: torch.Tensor) -> None:
    if q.dim() != 2 or g.dim() != 2 or q.shape[1] != g.shape[1]:
        raise ValueError(f"expected (Q, D) and (G, D) features, got {tuple(q.shape)} and {tuple(g.shape)}")


def check_metric(metric: str) -> None:
    if metric not in ("euclidean", "cosine"):
        raise ValueError(f"metric must be 'euclidean' or 'cosine', got {metric!r}")


def _check_precision(precision: str) -> None:
    if precision not in ("fp32", "bf16"):
        raise ValueError(f"precision must be 'fp32' or 'bf16', got {precision!r}")


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
    n, dim = x.shape
    # filled in place: no concatenated copies of a gallery-sized array
    out = torch.empty(n, dim + (1 if metric == "cosine" else 2), dtype=x.dtype, device=x.device)
    if metric == "cosine":
        x = F.normalize(x, dim=1)
        torch.neg(x, out=out[:, :dim]) if side == "query" else out[:, :dim].copy_(x)
        out[:, dim] = 1.0
        return out
    sq = torch.einsum("nd,nd->n", x, x)
    if side == "query":
        torch.mul(x, -2.0, out=out[:, :dim])
        out[:, dim], out[:, dim + 1] = sq, 1.0
    else:
        out[:, :dim] = x
        out[:, dim], out[:, dim + 1] = 1.0, sq
    return out


_BLAS_CONTROLLER: list = []  # the threadpoolctl controller, made on first use (it scans the loaded libraries)


def _blas_threads(threads: int) -> contextlib.AbstractContextManager:
    """A context that limits numpy's BLAS to ``threads`` threads while inside."""
    if not _BLAS_CONTROLLER:
        try:
            from threadpoolctl import ThreadpoolController
        except ImportError:  # scikit-learn brings it; without it BLAS keeps its own setting
            _BLAS_CONTROLLER.append(None)
        else:
            _BLAS_CONTROLLER.append(ThreadpoolController())
    controller = _BLAS_CONTROLLER[0]
    if controller is None:
        return contextlib.nullcontext()
    return controller.limit(limits=threads, user_api="blas")


@contextlib.contextmanager
def torch_ops_on_one_thread(device: torch.device | None = None) -> Iterator[None]:
    """Run torch's own CPU ops on one thread while inside (restored on exit).

    The ranking and neighbour bookkeeping are many small or memory-bound ops: on 2 cores
    that other processes share, torch's OpenMP threads spend more time waiting for each
    other at every op than they gain (2x slower evaluation, 2.3x slower re-ranking,
    measured), and their spinning takes cores from the BLAS threads. The products keep
    the thread count the caller asked for (passed to them as ``threads``).
    """
    if device is not None and device.type != "cpu":
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@contextlib.contextmanager
def _ieee_fp32_on_cuda() -> Iterator[None]:
    """Switch TF32 off for CUDA products while inside (restored on exit)."""
    matmul = torch.backends.cuda.matmul
    if hasattr(matmul, "fp32_precision"):  # torch >= 2.9
        saved = matmul.fp32_precision
        matmul.fp32_precision = "ieee"
        try:
            yield
        finally:
            matmul.fp32_precision = saved
        return
    saved_tf32 = matmul.allow_tf32
    matmul.allow_tf32 = False
    try:
        yield
    finally:
        matmul.allow_tf32 = saved_tf32


def _matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b.T`` for ``a`` ``(C, K)`` and ``b`` ``(G, K)`` float32 -> ``(C, G)`` float32.

    CPU: numpy's BLAS (see the module docstring); elsewhere torch in IEEE float32.
    """
    if a.device.type == "cpu":
        with np.errstate(invalid="ignore", over="ignore"):  # callers report non-finite results
            return torch.from_numpy(np.matmul(a.numpy(), b.numpy().T))
    return a @ b.T


def _guard(device: torch.device, threads: int) -> contextlib.AbstractContextManager:
    """The settings a product on ``device`` runs under: BLAS threads (CPU), IEEE float32 (CUDA)."""
    if device.type == "cpu":
        return _blas_threads(threads)
    if device.type == "cuda":
        return _ieee_fp32_on_cuda()
    return contextlib.nullcontext()


class _Gallery:
    """The gallery side of the product, prepared once for every query chunk.

    Args:
        g: ``(G, D)`` float32 features on the working device.
        metric, precision: see :func:`distance_chunks`.
    """

    def __init__(self, g: torch.Tensor, metric: Metric, precision: Precision) -> None:
        self.metric = metric
        self.precision = precision
        if precision == "fp32":
            self.aug = _augment(g, metric, "gallery")
            return
        # bf16: only the dot product is rounded; the norms are added in float32.
        g = F.normalize(g, dim=1) if metric == "cosine" else g
        self.low = g.to(torch.bfloat16)
        self.sq = torch.einsum("nd,nd->n", g, g) if metric == "euclidean" else None

    def distances(self, q: torch.Tensor) -> torch.Tensor:
        """``(C, G)`` float32 distances of query features ``q`` ``(C, D)``, clamped at 0."""
        if self.precision == "fp32":
            return _matmul(_augment(q, self.metric, "query"), self.aug).clamp_(min=0.0)
        if self.metric == "cosine":
            q = F.normalize(q, dim=1)
        dot = (q.to(torch.bfloat16) @ self.low.T).float()
        if self.sq is None:
            return dot.neg_().add_(1.0).clamp_(min=0.0)
        sq_q = torch.einsum("nd,nd->n", q, q).unsqueeze(1)
        return dot.mul_(-2.0).add_(sq_q).add_(self.sq).clamp_(min=0.0)


def compute_distance(
    qf: ArrayLike, gf: ArrayLike, metric: Metric = "euclidean", *, precision: Precision = "fp32"
) -> torch.Tensor:
    """Dense query-gallery distance matrix.

    Args:
        qf: query features ``(Q, D)``.
        gf: gallery features ``(G, D)``.
        metric: ``"euclidean"`` - the true squared Euclidean distance
            ``|q|^2 + |g|^2 - 2 q.g`` (for L2-normalised features ``2 - 2 q.g``, the
            protocol's distance); ``"cosine"`` - ``1 - cos(q, g)`` (features are
            normalised here, so unnormalised input is fine). Rounding can make either
            slightly negative for (near-)identical vectors: the result is clamped at 0.
        precision: ``"fp32"`` (exact protocol) or ``"bf16"`` (approximate, see the module).

    Returns:
        ``(Q, G)`` float32 tensor on the features' device, exactly the values
        ``evaluation.evaluate`` ranks. Materialises the whole matrix: use
        :func:`distance_chunks` (or ``evaluate``) for large sets.
    """
    q = as_float_tensor(qf, "qf")
    blocks = [block for _, block in distance_chunks(q, gf, metric=metric, chunk_size=max(q.shape[0], 1),
                                                     precision=precision)]
    return blocks[0] if blocks else torch.empty(0, torch.as_tensor(gf).shape[0], device=q.device)


def distance_chunks(
    qf: ArrayLike,
    gf: ArrayLike,
    *,
    metric: Metric = "euclidean",
    chunk_size: int,
    device: str | torch.device | None = None,
    precision: Precision = "fp32",
    threads: int | None = None,
) -> Iterator[tuple[int, torch.Tensor]]:
    """Yield ``(start, block)`` for consecutive query chunks, ``block`` = distances of
    queries ``start .. start + C - 1`` to the whole gallery, ``(C, G)`` float32 on ``device``.

    The gallery is prepared once, so only one ``(C, G)`` block exists at a time (plus
    whatever the caller keeps). CPU products use ``threads`` BLAS threads (default
    ``torch.get_num_threads()`` when called); CUDA products are IEEE float32 unless
    ``precision="bf16"``. Arguments are checked when called, not at the first chunk.
    """
    check_metric(metric)
    _check_precision(precision)
    q = as_float_tensor(qf, "qf")
    g = as_float_tensor(gf, "gf")
    check_features(q, g)
    dev = torch.device(device) if device is not None else g.device
    threads = threads if threads is not None else torch.get_num_threads()

    def chunks() -> Iterator[tuple[int, torch.Tensor]]:
        with _guard(dev, threads):
            gallery = _Gallery(g.to(dev), metric, precision)
        for start in range(0, q.shape[0], chunk_size):
            # The guard is held only while computing, never across a yield: the caller's
            # own work between chunks runs with its own settings.
            with _guard(dev, threads):
                block = gallery.distances(q[start : start + chunk_size].to(dev))
            yield start, block

    return chunks()


def map_distance_chunks(
    fn: Callable[[int, torch.Tensor], T],
    qf: ArrayLike,
    gf: ArrayLike,
    *,
    metric: Metric = "euclidean",
    chunk_size: int,
    device: str | torch.device | None = None,
    precision: Precision = "fp32",
    threads: int | None = None,
) -> list[T]:
    """``[fn(start, block) for start, block in distance_chunks(...)]``, CPU chunks in parallel.

    On the CPU, ``threads`` threads each take a query chunk, compute its block with a
    one-thread product and hand it to ``fn`` at once: the products never wait for each
    other (a multi-threaded product synchronises its threads at every panel), and work
    that ``fn`` does on one core (ranking) runs beside the other threads' products instead
    of leaving cores idle between them. ``fn`` must be safe to call from several threads;
    up to ``threads`` blocks exist at a time. Elsewhere (or with one thread) the chunks
    run one after another, as :func:`distance_chunks` yields them.

    Returns:
        ``fn``'s results in chunk order.
    """
    threads = threads if threads is not None else torch.get_num_threads()
    chunks = distance_chunks(qf, gf, metric=metric, chunk_size=chunk_size, device=device, precision=precision,
                             threads=threads)
    q = as_float_tensor(qf, "qf")
    dev = torch.device(device) if device is not None else torch.as_tensor(gf).device
    starts = range(0, q.shape[0], chunk_size)
    if dev.type != "cpu" or threads <= 1 or len(starts) <= 1:
        return [fn(start, block) for start, block in chunks]
    with _guard(dev, threads):
        gallery = _Gallery(as_float_tensor(gf, "gf").to(dev), metric, precision)

    def work(start: int) -> T:
        return fn(start, gallery.distances(q[start : start + chunk_size].to(dev)))

    with _blas_threads(1), ThreadPoolExecutor(max_workers=threads) as pool:
        futures = [pool.submit(work, start) for start in starts]
        try:
            return [future.result() for future in futures]
        except BaseException:
            for future in futures:  # an error ends the run: chunks not started are dropped
                future.cancel()
            raise


def self_distance_blocks(
    features: ArrayLike, *, block: int, device: str | torch.device | None = None, threads: int | None = None
) -> Iterator[tuple[int, int, torch.Tensor]]:
    """The blocks on and above the diagonal of the squared Euclidean distance matrix of a set.

    Yields ``(s, t, dist)`` with ``dist`` the ``(b, b')`` float32 distances of points
    ``s .. s + b - 1`` (rows) to points ``t .. t + b' - 1`` (columns), ``s <= t``: first
    every diagonal block, then the blocks above it, row of blocks by row of blocks. The
    matrix is symmetric, so these hold every pair once (half the products of a
    row-by-row pass); the value of a pair is that of the block that holds it.

    Args:
        features: ``(N, D)``.
        block: points per block.
        device: where the products run; default the features' device.
        threads: BLAS threads of CPU products (default ``torch.get_num_threads()`` at the first block).
    """
    x = as_float_tensor(features, "features")
    dev = torch.device(device) if device is not None else x.device
    x = x.to(dev)
    n = x.shape[0]
    threads = threads if threads is not None else torch.get_num_threads()
    with _guard(dev, threads):
        columns = _Gallery(x, "euclidean", "fp32").aug  # (N, D + 2), prepared once
    starts = range(0, n, block)
    pairs = [(s, s) for s in starts] + [(s, t) for s in starts for t in starts if t > s]
    row_start, rows = -1, columns
    for s, t in pairs:
        with _guard(dev, threads):
            if s != row_start:
                row_start, rows = s, _augment(x[s : s + block], "euclidean", "query")
            dist = _matmul(rows, columns[t : t + block]).clamp_(min=0.0)
        yield s, t, dist


def entries_at_most(dist: torch.Tensor, bound: torch.Tensor, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(rows, cols)`` int64, row-major, of the entries of a block no larger than a bound.

    Args:
        dist: ``(R, C)`` float32.
        bound: ``(R,)`` one bound per row (``dim=1``) or ``(C,)`` one per column (``dim=0``).

    On the CPU numpy does the comparison and ``flatnonzero``: 2x faster than torch's
    broadcast comparison and ``nonzero`` on 2 cores (and torch's OpenMP threads wait on
    each other when other processes share the machine).
    """
    if dist.device.type != "cpu":
        return (dist <= (bound.unsqueeze(1) if dim == 1 else bound.unsqueeze(0))).nonzero(as_tuple=True)
    b = bound.numpy()
    flat = torch.from_numpy(np.flatnonzero(dist.numpy() <= (b[:, None] if dim == 1 else b[None, :])))
    rows = flat // dist.shape[1]
    return rows, flat - rows * dist.shape[1]


def block_max(dist: torch.Tensor, dim: int) -> torch.Tensor:
    """``dist.amax(dim)`` of a ``(R, C)`` float32 block (numpy on the CPU: see :func:`entries_at_most`)."""
    if dist.device.type != "cpu":
        return dist.amax(dim)
    return torch.from_numpy(dist.numpy().max(axis=dim))
