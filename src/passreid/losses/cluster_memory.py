"""The cluster memory of cluster contrast: one centroid per pseudo identity and the loss against them (DESIGN §5)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from passreid.errors import ConfigError

MEMORY_MODES = ("hard", "mean", "instance")


def cluster_centroids(features: Tensor, labels: Tensor) -> Tensor:
    """L2-normalised mean feature of each cluster: (N, F), (N,) in ``-1..C-1`` -> (C, F); outliers ignored."""
    keep = labels >= 0
    feats, labels = features[keep].float(), labels[keep]
    num_clusters = int(labels.max()) + 1
    sums = torch.zeros(num_clusters, feats.shape[1], dtype=feats.dtype, device=feats.device)
    sums.index_add_(0, labels, feats)
    counts = torch.bincount(labels, minlength=num_clusters).clamp_min(1).unsqueeze(1)
    return F.normalize(sums / counts, dim=1)


class ClusterMemory(nn.Module):
    """One L2-normalised centroid per pseudo identity, and the contrastive loss against them.

    Loss of a batch ``x`` (B, F) with pseudo labels ``y`` (B,):
    ``CE(normalize(x) @ M.T / temp, y)`` with M (C, F) the memory (no gradient).

    After each optimiser step :meth:`update` moves the entries of the clusters
    present in the batch towards the batch (``m`` = momentum, 0.2), each
    ``x`` below being a normalised batch feature:

    - ``hard`` (default): per cluster c in the batch, its hardest instance
      ``x_h`` (lowest cosine similarity to M[c]; the first one on ties):
      ``M[c] <- normalize(m * M[c] + (1 - m) * x_h)``.
    - ``mean``: per cluster c in the batch, the mean ``x̄_c`` of its instances:
      ``M[c] <- normalize(m * M[c] + (1 - m) * x̄_c)``.
    - ``instance`` (the published plain update): every instance i in batch
      order, ``M[y_i] <- normalize(m * M[y_i] + (1 - m) * x_i)``, so later
      instances of a cluster weigh more.

    Args:
        num_features: F, the feature size.
        num_clusters: C, the number of pseudo identities.
        temp: softmax temperature of the similarities.
        momentum: weight kept by the old entry in an update.
        mode: ``hard``, ``mean`` or ``instance``.
    """

    def __init__(self, num_features: int, num_clusters: int, temp: float = 0.05, momentum: float = 0.2,
                 mode: str = "hard") -> None:
        super().__init__()
        if mode not in MEMORY_MODES:
            raise ConfigError(f"memory mode must be one of {', '.join(MEMORY_MODES)}; got {mode!r}")
        self.temp = temp
        self.momentum = momentum
        self.mode = mode
        self.register_buffer("centroids", torch.zeros(num_clusters, num_features))

    @classmethod
    def from_features(cls, features: Tensor, labels: Tensor, *, temp: float = 0.05, momentum: float = 0.2,
                      mode: str = "hard") -> ClusterMemory:
        """A memory initialised with the normalised cluster means of ``features`` (N, F), ``labels`` (N,)."""
        centroids = cluster_centroids(features, labels)
        memory = cls(centroids.shape[1], centroids.shape[0], temp=temp, momentum=momentum, mode=mode)
        memory.centroids.copy_(centroids)
        return memory.to(features.device)

    @property
    def num_clusters(self) -> int:
        return self.centroids.shape[0]

    def forward(self, features: Tensor, labels: Tensor) -> Tensor:
        """Cross-entropy of (B, F) features against all (C, F) centroids at ``temp``; returns a scalar."""
        logits = F.normalize(features.float(), dim=1) @ self.centroids.t()
        return F.cross_entropy(logits / self.temp, labels)

    @torch.no_grad()
    def update(self, features: Tensor, labels: Tensor) -> None:
        """Momentum update of the entries of the clusters in the batch: (B, F) features, (B,) labels."""
        x = F.normalize(features.detach().float(), dim=1)
        m = self.momentum
        if self.mode == "instance":
            for xi, yi in zip(x, labels.tolist()):
                self.centroids[yi] = F.normalize(m * self.centroids[yi] + (1 - m) * xi, dim=0)
            return
        clusters, inverse = torch.unique(labels, return_inverse=True)
        if self.mode == "hard":
            sims = (x * self.centroids[labels]).sum(dim=1)
            lowest = torch.full((len(clusters),), float("inf"), device=x.device)
            lowest = lowest.scatter_reduce(0, inverse, sims, reduce="amin")
            position = torch.arange(len(x), device=x.device)
            candidates = torch.where(sims == lowest[inverse], position, len(x))
            first = torch.full((len(clusters),), len(x), device=x.device)
            chosen = x[first.scatter_reduce(0, inverse, candidates, reduce="amin")]
        else:
            sums = torch.zeros(len(clusters), x.shape[1], device=x.device).index_add_(0, inverse, x)
            chosen = sums / torch.bincount(inverse, minlength=len(clusters)).unsqueeze(1)
        self.centroids[clusters] = F.normalize(m * self.centroids[clusters] + (1 - m) * chosen, dim=1)
