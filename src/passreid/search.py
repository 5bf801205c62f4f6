"""A searchable gallery of ReID features: faiss inner-product index with a torch fallback.

Features are L2-normalised, so the inner product is the cosine similarity and
ranking by it equals ranking by the (squared) Euclidean distance of DESIGN §6.
The gallery keeps, per row, the image path, identity and camera, so a search
answers with files, and an index built once can grow: :meth:`Gallery.add`
appends to the existing index (IVF reuses its trained coarse quantizer) instead
of rebuilding it.

Back ends:

- ``faiss`` (CPU): ``IndexFlatIP`` (exact), or ``IndexIVFFlat`` for galleries
  past about a million images (approximate, ``nprobe`` of ``nlist`` lists are scanned);
- ``torch``: exact k-NN by chunked matrix products, used when faiss is not
  installed and for features kept on a GPU (``device="cuda"``).

A gallery is saved to one ``.npz`` that is also a valid feature file (DESIGN §8
keys ``features``, ``pids``, ``camids``, ``paths``), so ``passreid eval
--gallery-features`` reads it too.

Scores to read: cosines of ReID features crowd near 1 (the features share a
large common component; on the demo's synthetic set a demo model's cosines had
medians 0.99978 for the same person and 0.99951 for another), so
:meth:`Gallery.relative_scores` also gives each result's *standard score*
within its query's scores against the whole gallery, ``z = (cos - mean_q) /
std_q``. ``mean_q`` and ``std_q`` are exact (the mean and standard deviation of
``q . g`` over every gallery row ``g``), computed from the gallery's first and
second moments, which the gallery keeps and saves: no pass over the gallery per
query. For each query ``z`` is an increasing affine map of the cosine, so it
ranks exactly as the cosine does, and so as the evaluation protocol's distance
``2 - 2 cos``: only the numbers shown change. A typical gallery image scores
about 0; the same person stands above it by as much as the model tells people
apart (medians 1.04 against 0.20 for that demo model).

Example:
    >>> gallery = Gallery()
    >>> gallery.add(feats, paths=paths)              # feats (N, D)
    >>> scores, indices, found = gallery.search(query_feats, k=5)
    >>> z = gallery.relative_scores(query_feats, scores)   # (Q, k) standard scores, same order
    >>> gallery.save("gallery.npz"); Gallery.load("gallery.npz")
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal, NamedTuple

import numpy as np
import torch

from passreid.errors import CheckpointError, ConfigError, DatasetError
from passreid.fileio import atomic_write
from passreid.knn import FaissIndex, IndexType, TorchIndex, faiss_available, import_faiss

logger = logging.getLogger(__name__)

Backend = Literal["auto", "faiss", "torch"]

IVF_THRESHOLD = 1_000_000
"""Galleries larger than this are better served by an IVF index (``index="ivf"``)."""

_MOMENT_ROWS = 8192
"""Gallery rows turned into float64 at once when summing the second moment (50 MB at D=768)."""

MIN_SCORE_STD = 1e-6
"""Below this spread of a query's cosines (float32 resolution near 1 is 6e-8) a standard score means nothing: NaN."""


class ModelMismatchError(CheckpointError):
    """A gallery is queried or extended with another model than the one whose features it holds."""


class SearchResult(NamedTuple):
    """Top-k answers of ``Q`` queries.

    Attributes:
        scores: (Q, k) cosine similarities, best first.
        indices: (Q, k) gallery rows; -1 (score -inf) where an IVF probe found fewer than k.
        paths: per query, the image paths of the valid rows.
    """

    scores: torch.Tensor
    indices: torch.Tensor
    paths: list[list[str]]


def _normalise(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length, float32 C-contiguous (what faiss wants)."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return np.ascontiguousarray(x / np.maximum(norms, 1e-12), dtype=np.float32)


def _as_matrix(features: torch.Tensor | np.ndarray, what: str) -> np.ndarray:
    """A (N, D) or (D,) tensor/array -> (N, D) float32 numpy, unit rows."""
    if isinstance(features, torch.Tensor):
        features = features.detach().float().cpu().numpy()
    features = np.asarray(features, dtype=np.float32)
    if features.ndim == 1:
        features = features[None]
    if features.ndim != 2:
        raise DatasetError(f"{what} must be (N, D) or (D,), got shape {tuple(features.shape)}")
    if not np.isfinite(features).all():
        raise DatasetError(f"{what} contain NaN or inf values")
    return _normalise(features)


class _Moments:
    """Running sums of the gallery rows and of their outer products (float64), for per-query score statistics.

    With ``m`` the mean row and ``C`` the covariance of the rows, a unit query
    ``q`` scores ``q . g`` with mean ``q . m`` and variance ``q^T C q`` over the
    gallery: exact, in O(D^2) per query whatever the gallery size.
    """

    def __init__(self, dim: int) -> None:
        self.count = 0
        self.total = np.zeros(dim, np.float64)
        self.outer = np.zeros((dim, dim), np.float64)

    def add(self, x: np.ndarray) -> None:
        """Add rows (N, D) in blocks (float64 squares of rows near the common component must not round away)."""
        for start in range(0, len(x), _MOMENT_ROWS):
            block = x[start : start + _MOMENT_ROWS].astype(np.float64)
            self.total += block.sum(axis=0)
            self.outer += block.T @ block
        self.count += len(x)

    def score_mean_std(self, q: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Mean and standard deviation (Q,) of each unit query's inner products with every gallery row."""
        q64 = q.astype(np.float64)
        mean = self.total / self.count
        cov = self.outer / self.count - np.outer(mean, mean)
        variance = np.einsum("qd,de,qe->q", q64, cov, q64)
        return q64 @ mean, np.sqrt(np.maximum(variance, 0.0))


class Gallery:
    """Normalised features (N, D) with their paths, identities and cameras, searchable by cosine similarity.

    Args:
        index: ``"flat"`` (exact) or ``"ivf"`` (approximate, for more than about
            1M images; needs faiss, trained on the first batch added).
        nlist: IVF lists (default :func:`default_nlist` of the first batch).
        nprobe: IVF lists scanned per query (more: slower and more exact).
        backend: ``"auto"`` (faiss if installed and ``device`` is the CPU, else
            torch), ``"faiss"`` or ``"torch"``.
        device: where the torch back end keeps the features (``"cuda"`` for GPU k-NN).
    """

    def __init__(
        self,
        *,
        index: IndexType = "flat",
        nlist: int | None = None,
        nprobe: int = 16,
        backend: Backend = "auto",
        device: str | torch.device = "cpu",
    ) -> None:
        if index not in ("flat", "ivf"):
            raise ConfigError(f"index must be 'flat' or 'ivf', got {index!r}")
        if backend not in ("auto", "faiss", "torch"):
            raise ConfigError(f"backend must be 'auto', 'faiss' or 'torch', got {backend!r}")
        self.device = torch.device(device)
        if backend == "auto":
            backend = "faiss" if self.device.type == "cpu" and faiss_available() else "torch"
        if backend == "faiss" and not faiss_available():
            raise ConfigError("backend 'faiss' needs faiss: pip install 'passreid[faiss]'")
        if backend == "torch" and index == "ivf":
            logger.warning("the IVF index needs faiss; the torch back end searches exactly instead")
        self.index_type: IndexType = index
        self.nlist = nlist
        self.nprobe = nprobe
        self.backend_name = backend
        self._backend: TorchIndex | FaissIndex | None = None
        self._dim = 0
        self._paths: list[str] = []
        self._path_set: set[str] = set()
        self._pids: list[np.ndarray] = []
        self._camids: list[np.ndarray] = []
        self._moments: _Moments | None = None  # computed at first need, then kept up to date by _append
        self.meta: dict[str, Any] = {}
        """JSON-safe notes saved with the gallery (e.g. the checkpoint and flip that made the features)."""

    # ------------------------------------------------------------------ contents

    def __len__(self) -> int:
        return len(self._paths)

    @property
    def dim(self) -> int | None:
        """Feature width, ``None`` while empty."""
        return None if self._backend is None else self._dim

    @property
    def paths(self) -> list[str]:
        return list(self._paths)

    @property
    def pids(self) -> np.ndarray:
        """(N,) int64 identities (-1 where unknown)."""
        return np.concatenate(self._pids) if self._pids else np.zeros(0, np.int64)

    @property
    def camids(self) -> np.ndarray:
        """(N,) int64 0-based cameras (-1 where unknown)."""
        return np.concatenate(self._camids) if self._camids else np.zeros(0, np.int64)

    @property
    def features(self) -> np.ndarray:
        """(N, D) float32 unit rows, in the order they were added."""
        return np.zeros((0, 0), np.float32) if self._backend is None else self._backend.vectors()

    def contains(self, path: str | os.PathLike) -> bool:
        return os.fspath(path) in self._path_set

    def missing(self, paths: Sequence[str | os.PathLike]) -> list[str]:
        """The ``paths`` not indexed yet, in order: what an update has to extract."""
        return [os.fspath(p) for p in paths if os.fspath(p) not in self._path_set]

    def require_model(self, model: str, checkpoint: str | os.PathLike | None = None, *,
                      where: str = "the gallery") -> None:
        """Refuse another model's features: mixed features in one index give meaningless scores.

        Args:
            model: the fingerprint of the model at hand (:meth:`passreid.ReIDPipeline.fingerprint`).
            checkpoint: its file, to name it; an index written before fingerprints
                were recorded is compared by this path instead.
            where: how the gallery is named in the message (e.g. its file).

        Raises:
            ModelMismatchError: ``meta["model"]`` differs from ``model`` (or, without
                it, ``meta["checkpoint"]`` from ``checkpoint``); the message names both models.
        """
        built_model, built_path = self.meta.get("model"), self.meta.get("checkpoint")
        path = None if checkpoint is None else os.path.abspath(checkpoint)
        if built_model:
            same = built_model == model
        else:
            same = built_path is None or path is None or built_path == path
        if not same:
            def named(file: str | None, fingerprint: str | None) -> str:
                return " ".join(part for part in (file, f"[{fingerprint}]" if fingerprint else None) if part)

            raise ModelMismatchError(
                f"{where} holds features of model {named(built_path, built_model) or '(unnamed)'}, "
                f"not of {named(path, model)}: features of different models cannot be compared or mixed "
                "(use the model that built it, or index into a new file)"
            )

    # ------------------------------------------------------------------ building

    def _make_backend(self, dim: int, raw: Any = None) -> TorchIndex | FaissIndex:
        self._dim = dim
        if self.backend_name == "faiss":
            return FaissIndex(dim, self.index_type, self.nlist, self.nprobe, raw=raw)
        return TorchIndex(dim, self.device)

    def add(
        self,
        features: torch.Tensor | np.ndarray,
        paths: Sequence[str | os.PathLike] | None = None,
        pids: Sequence[int] | np.ndarray | None = None,
        camids: Sequence[int] | np.ndarray | None = None,
    ) -> None:
        """Append features (N, D) (normalised here) and their metadata to the index.

        Rows added earlier keep their positions; nothing is rebuilt. ``paths``
        default to ``"#<row>"``, ``pids`` and ``camids`` to -1.
        """
        x = _as_matrix(features, "gallery features")
        n = len(x)
        start = len(self)
        names = [f"#{start + i}" for i in range(n)] if paths is None else [os.fspath(p) for p in paths]
        pid_arr = np.full(n, -1, np.int64) if pids is None else np.asarray(pids, dtype=np.int64).reshape(-1)
        cam_arr = np.full(n, -1, np.int64) if camids is None else np.asarray(camids, dtype=np.int64).reshape(-1)
        for what, size in (("paths", len(names)), ("pids", len(pid_arr)), ("camids", len(cam_arr))):
            if size != n:
                raise DatasetError(f"gallery add: {n} features but {size} {what}")
        self._append(x, names, pid_arr, cam_arr)

    def _append(self, x: np.ndarray, names: list[str], pids: np.ndarray, camids: np.ndarray) -> None:
        """Add unit rows (N, D) as they are (a reload must not renormalise: scores would move in the last bit)."""
        n, start = len(x), len(self)
        if n == 0:
            return
        if self._backend is None:
            self._backend = self._make_backend(x.shape[1])
        elif x.shape[1] != self._dim:
            raise DatasetError(
                f"gallery add: features have {x.shape[1]} dims, the gallery {self._dim}: "
                "were they made by the same model?"
            )
        self._backend.add(x)
        if self._moments is not None:
            self._moments.add(x)
        self._paths.extend(names)
        self._path_set.update(names)
        self._pids.append(pids)
        self._camids.append(camids)
        if self.index_type == "flat" and start < IVF_THRESHOLD <= len(self):
            logger.info("the gallery now holds %d images; index='ivf' searches such sizes faster", len(self))

    # ------------------------------------------------------------------ searching

    def _query_matrix(self, query: torch.Tensor | np.ndarray) -> np.ndarray:
        """Query features as unit rows (Q, D), checked against a non-empty gallery of the same width."""
        q = _as_matrix(query, "query features")
        if self._backend is None:
            raise DatasetError("the gallery is empty: add features before searching")
        if q.shape[1] != self._dim:
            raise DatasetError(
                f"query features have {q.shape[1]} dims, the gallery {self._dim}: were they made by the same model?"
            )
        return q

    def search(self, query: torch.Tensor | np.ndarray, k: int = 10) -> SearchResult:
        """Top-``k`` gallery rows by cosine similarity for each query feature (Q, D) or (D,)."""
        if k < 1:
            raise ConfigError(f"k must be at least 1, got {k}")
        q = self._query_matrix(query)
        k = min(k, len(self))
        scores, indices = self._backend.search(q, k)
        valid = indices >= 0
        scores = np.where(valid, scores, -np.inf).astype(np.float32)
        found = [[self._paths[j] for j in row[row >= 0]] for row in indices]
        return SearchResult(torch.from_numpy(scores), torch.from_numpy(indices), found)

    def _score_moments(self) -> _Moments:
        """The gallery's moments, summed over the stored rows the first time they are needed."""
        if self._moments is None or self._moments.count != len(self):
            moments = _Moments(self._dim)
            moments.add(self.features)
            self._moments = moments
        return self._moments

    def relative_scores(self, query: torch.Tensor | np.ndarray, scores: torch.Tensor | np.ndarray) -> torch.Tensor:
        """Standard scores of cosines within each query's scores against the whole gallery.

        ``z[i, j] = (scores[i, j] - mean_i) / std_i`` with ``mean_i`` and ``std_i`` the
        mean and standard deviation of query ``i``'s cosine with every gallery row.
        An increasing map of each row's scores, so the order (the ranking) is the
        cosine's; float64, so no two different cosines of a row become equal.

        Args:
            query: the (Q, D) or (D,) query features given to :meth:`search`.
            scores: (Q, k) cosines of those queries, e.g. ``search(query).scores``.

        Returns:
            (Q, k) float64: NaN for a query whose cosines spread less than
            :data:`MIN_SCORE_STD` (a gallery of one image, or of copies of one),
            -inf where ``scores`` is -inf (an IVF probe found fewer than k).
        """
        q = self._query_matrix(query)
        s = scores.detach().cpu().numpy() if isinstance(scores, torch.Tensor) else np.asarray(scores)
        s = s.astype(np.float64).reshape(len(q), -1)
        mean, std = self._score_moments().score_mean_std(q)
        std = np.where(std < MIN_SCORE_STD, np.nan, std)
        with np.errstate(invalid="ignore"):
            z = (s - mean[:, None]) / std[:, None]
        return torch.from_numpy(np.where(np.isneginf(s), -np.inf, z))

    # ------------------------------------------------------------------ files

    def save(self, path: str | os.PathLike) -> Path:
        """Write one ``.npz``: the feature-file keys plus the index settings (and a trained IVF index)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        arrays: dict[str, Any] = dict(
            features=self.features,
            pids=self.pids,
            camids=self.camids,
            paths=np.array(self._paths, dtype=str),
            index_type=np.array(self.index_type),
            nlist=np.array(-1 if self.nlist is None else self.nlist, np.int64),
            nprobe=np.array(self.nprobe, np.int64),
            meta=np.array(json.dumps(self.meta)),
        )
        if self._backend is not None:  # so a query needs no pass over a large gallery
            moments = self._score_moments()
            arrays.update(moment_count=np.array(moments.count, np.int64), moment_sum=moments.total,
                          moment_outer=moments.outer)
        if isinstance(self._backend, FaissIndex):
            raw = self._backend.serialize()
            if raw is not None:
                arrays["faiss_index"] = raw
                arrays["nlist"] = np.array(self._backend.nlist, np.int64)
        with atomic_write(path) as f:
            np.savez(f, **arrays)
        return path

    @classmethod
    def load(
        cls,
        path: str | os.PathLike,
        *,
        backend: Backend = "auto",
        device: str | torch.device = "cpu",
        nprobe: int | None = None,
    ) -> Gallery:
        """Read a gallery (or any feature ``.npz``); a trained IVF index is restored, not retrained."""
        from passreid.features import FeatureSet

        fs = FeatureSet.load(path)  # checks the feature keys and shapes, with clear errors
        with np.load(path, allow_pickle=False) as data:
            settings = {k: data[k] for k in ("index_type", "nlist", "nprobe", "faiss_index", "meta",
                                             "moment_count", "moment_sum", "moment_outer")
                        if k in data.files}
        index = str(settings["index_type"]) if "index_type" in settings else "flat"
        nlist = int(settings["nlist"]) if "nlist" in settings else -1
        gallery = cls(
            index=index,  # type: ignore[arg-type]
            nlist=None if nlist < 0 else nlist,
            nprobe=nprobe if nprobe is not None else int(settings.get("nprobe", 16)),
            backend=backend,
            device=device,
        )
        gallery.meta = json.loads(str(settings["meta"])) if "meta" in settings else {}
        if len(fs) == 0:
            return gallery
        if "faiss_index" in settings and gallery.backend_name == "faiss":
            faiss = import_faiss()

            raw = faiss.deserialize_index(settings["faiss_index"])
            raw.nprobe = gallery.nprobe
            gallery._backend = gallery._make_backend(fs.features.shape[1], raw=raw)
            gallery._paths = [str(p) for p in fs.require_paths("a search gallery")]
            gallery._path_set = set(gallery._paths)
            gallery._pids = [fs.pids]
            gallery._camids = [fs.camids]
        else:
            gallery._append(np.ascontiguousarray(fs.features), [str(p) for p in fs.require_paths("a search gallery")],
                            fs.pids, fs.camids)
        if "moment_count" in settings and int(settings["moment_count"]) == len(gallery):
            moments = _Moments(gallery._dim)
            moments.count = len(gallery)
            moments.total = settings["moment_sum"].astype(np.float64)
            moments.outer = settings["moment_outer"].astype(np.float64)
            gallery._moments = moments
        logger.info("loaded a gallery of %d images (%s, %s) from %s", len(gallery), gallery.index_type,
                    gallery.backend_name, path)
        return gallery
