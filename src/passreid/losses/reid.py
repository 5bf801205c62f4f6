"""Supervised ReID losses (DESIGN §4): identity cross-entropy and batch-hard triplet.

The fine-tuning objective is ``id_weight * CE(logits, y) + triplet_weight * triplet(feat, y)``:
the classifier sees the after-neck feature, the triplet loss the fused tokens
before the neck (see :class:`passreid.models.ReIDModel`). Both are computed in
float32 even under autocast: the published recipe computes its distance matrix
in fp16, where ``|x|^2 + |y|^2 - 2 x.y`` of features with norms in the tens
loses most of its digits.

Example:
    >>> criterion = ReIDLoss()                      # CE without smoothing + soft-margin triplet
    >>> loss, parts = criterion(logits, feat, pids)  # parts: {"id": ..., "triplet": ...}
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

DIST_EPS = 1e-12
"""Squared distances are clamped here before the square root (the published ``sqrt(clamp(d^2, 1e-12))``)."""


def id_loss(logits: Tensor, labels: Tensor, *, epsilon: float = 0.0) -> Tensor:
    """Identity cross-entropy with optional label smoothing.

    With smoothing the target is ``(1 - epsilon) * one_hot + epsilon / C`` (Szegedy
    et al.), the published ``CrossEntropyLabelSmooth``; ``epsilon=0`` is plain
    cross-entropy, the published default for PASS fine-tuning.

    Args:
        logits: (B, C) classifier scores.
        labels: (B,) int64 identities in ``0..C-1``.
        epsilon: smoothing in ``[0, 1)``.

    Returns:
        Scalar mean over the batch.
    """
    return F.cross_entropy(logits.float(), labels, label_smoothing=epsilon)


def pairwise_euclidean(x: Tensor, y: Tensor | None = None) -> Tensor:
    """Euclidean distances ``sqrt(clamp(|x_i|^2 + |y_j|^2 - 2 x_i.y_j, 1e-12))``, (N, D) x (M, D) -> (N, M).

    The clamp keeps the gradient finite where a distance is zero (an anchor
    against itself), which a plain ``torch.cdist`` would turn into NaN.
    """
    x = x.float()
    y = x if y is None else y.float()
    sq = x.pow(2).sum(1, keepdim=True) + y.pow(2).sum(1).unsqueeze(0) - 2.0 * (x @ y.t())
    return sq.clamp(min=DIST_EPS).sqrt()


def hard_example_mining(dist: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """For every anchor the farthest positive and the nearest negative (batch-hard, Hermans et al. 2017).

    Args:
        dist: (N, N) distances within the batch.
        labels: (N,) identities.

    Returns:
        ``d_ap`` (N,): largest distance to a sample of the same identity (the
        anchor itself counts, so it is always defined); ``d_an`` (N,): smallest
        distance to another identity, ``+inf`` where the batch has none.
    """
    same = labels.unsqueeze(0) == labels.unsqueeze(1)
    d_ap = dist.masked_fill(~same, float("-inf")).amax(dim=1)
    d_an = dist.masked_fill(same, float("inf")).amin(dim=1)
    return d_ap, d_an


def triplet_loss(features: Tensor, labels: Tensor, *, margin: float | None = None) -> Tensor:
    """Batch-hard triplet loss on Euclidean distances.

    Args:
        features: (B, F) embeddings (not normalised, as published).
        labels: (B,) identities.
        margin: ``None`` for the soft margin ``log(1 + exp(d_ap - d_an))`` (the
            published PASS recipe), or a hinge ``max(0, d_ap - d_an + margin)``.

    Returns:
        Scalar mean over anchors. Anchors without a negative in the batch
        contribute 0.
    """
    d_ap, d_an = hard_example_mining(pairwise_euclidean(features), labels)
    gap = d_ap - d_an
    if margin is None:
        return F.softplus(gap).mean()
    return F.relu(gap + margin).mean()


class ReIDLoss(nn.Module):
    """Weighted sum of :func:`id_loss` and :func:`triplet_loss`.

    Args:
        id_weight: weight of the identity loss (0 disables it).
        triplet_weight: weight of the triplet loss (0 disables it).
        label_smoothing: ``epsilon`` of :func:`id_loss`.
        triplet_margin: ``None`` for the soft margin, else the hinge margin.
    """

    def __init__(
        self,
        *,
        id_weight: float = 1.0,
        triplet_weight: float = 1.0,
        label_smoothing: float = 0.0,
        triplet_margin: float | None = None,
    ) -> None:
        super().__init__()
        if id_weight < 0 or triplet_weight < 0 or id_weight + triplet_weight == 0:
            raise ValueError(f"loss weights must be >= 0 and not both 0; got id {id_weight}, triplet {triplet_weight}")
        if not 0.0 <= label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1); got {label_smoothing}")
        if triplet_margin is not None and triplet_margin < 0:
            raise ValueError(f"triplet_margin must be >= 0 or None (soft margin); got {triplet_margin}")
        self.id_weight = id_weight
        self.triplet_weight = triplet_weight
        self.label_smoothing = label_smoothing
        self.triplet_margin = triplet_margin

    def forward(self, logits: Tensor | None, features: Tensor, labels: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """(B, C) logits, (B, F) features, (B,) labels -> (total loss, detached parts ``id``/``triplet``)."""
        with torch.autocast(device_type=features.device.type, enabled=False):
            total = features.new_zeros((), dtype=torch.float32)
            parts: dict[str, Tensor] = {}
            if self.id_weight > 0:
                if logits is None:
                    raise ValueError("the identity loss needs logits: build the model with num_classes > 0")
                loss_id = id_loss(logits, labels, epsilon=self.label_smoothing)
                total = total + self.id_weight * loss_id
                parts["id"] = loss_id.detach()
            if self.triplet_weight > 0:
                loss_tri = triplet_loss(features, labels, margin=self.triplet_margin)
                total = total + self.triplet_weight * loss_tri
                parts["triplet"] = loss_tri.detach()
        return total, parts
