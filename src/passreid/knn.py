"""faiss, when it is installed: one import, one availability check and one exact k-NN search.

Re-ranking and clustering (:mod:`passreid.kreciprocal`) and the searchable
gallery (:mod:`passreid.search`) use faiss on the CPU when it is there and
fall back to torch otherwise; both ask here.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import torch


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
