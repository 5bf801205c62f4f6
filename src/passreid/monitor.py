"""Watching self-supervised pretraining: frozen-feature retrieval and collapse checks.

In DINO-style training the loss does not say whether the features improve: it
can fall while the teacher collapses, and rise while retrieval gets better. What
a ReID team wants to see during a run is the thing it pretrains for, the
retrieval quality of the frozen backbone on a labelled set, and a warning when
the teacher's outputs collapse.

:class:`RetrievalMonitor` evaluates a backbone *as it is* (no training, no
neck): the final-normed tokens fused as ``[cls, mean(part1..3)]`` (PASS) or the
class token alone (the plain-DINO ablation, which trains no part tokens),
L2-normalised. It reports the DESIGN §6 metrics on the query/gallery split and a
weighted k-NN identity accuracy on the train split (leave-one-out, the
DINO k-NN monitor's rule: the k most similar other images vote with weight
``exp(cos / T)``).

>>> monitor = RetrievalMonitor(build_dataset("market1501", "data/market1501"), img_size=(256, 128))
>>> monitor(teacher_backbone, mode="pass")
{'mAP': 0.12, 'mINP': 0.01, 'rank1': 0.31, 'rank5': ..., 'rank10': ..., 'knn_top1': 0.42}
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from passreid.data.datasets import ReIDDataset
from passreid.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from passreid.models.pretrain_net import class_token_only
from passreid.models.vit import PassViT

logger = logging.getLogger(__name__)

KNN_TEMPERATURE = 0.07
"""Vote temperature of the weighted k-NN (DINO's k-NN monitor)."""


def frozen_feature(backbone: PassViT, x: Tensor, mode: str = "pass") -> Tensor:
    """(B, 3, H, W) -> (B, F) L2-normalised features of a backbone with no neck.

    ``pass``: ``[cls, (part1 + part2 + part3) / 3]`` (F = 2D, the fine-tuning ``cat``
    fusion before the neck); ``dino``: the class token of ``[cls, patches]`` (F = D).
    """
    if mode == "dino":
        return F.normalize(class_token_only(backbone, x), dim=-1)
    tokens = backbone(x)  # (B, 4, D)
    return F.normalize(torch.cat((tokens[:, 0], tokens[:, 1:].mean(dim=1)), dim=-1), dim=-1)


def knn_accuracy(features: Tensor, labels: Tensor, k: int = 20, temperature: float = KNN_TEMPERATURE) -> float:
    """Leave-one-out weighted k-NN accuracy of L2-normalised ``features`` (N, F) with ``labels`` (N,).

    Each item is classified by its ``k`` most similar *other* items, each voting for
    its label with weight ``exp(cos / temperature)``; ties go to the smallest label.
    """
    n = features.shape[0]
    if n < 2:
        return math.nan
    k = min(k, n - 1)
    classes, labels = torch.unique(labels, return_inverse=True)
    correct = 0
    for start in range(0, n, 1024):
        sim = features[start:start + 1024] @ features.T  # (b, N)
        rows = torch.arange(sim.shape[0])
        sim[rows, rows + start] = -math.inf  # not itself
        top, index = sim.topk(k, dim=1)
        votes = torch.zeros(sim.shape[0], len(classes), dtype=features.dtype)
        votes.scatter_add_(1, labels[index], (top / temperature).exp())
        correct += int((votes.argmax(dim=1) == labels[start:start + sim.shape[0]]).sum())
    return correct / n


class RetrievalMonitor:
    """Frozen-feature retrieval of a backbone on a labelled ReID set (query/gallery metrics + train k-NN).

    Args:
        dataset: any ReID set (its ``query``, ``gallery`` and ``train`` splits; an
            empty train split skips the k-NN accuracy).
        img_size: (H, W) the backbone sees (the pretraining's global view size).
        device: where the backbone runs.
        batch_size, num_workers: the extraction loader.
        knn_k: neighbours of the k-NN vote.
        max_train: use at most this many train images for the k-NN (evenly spaced), 0 for all.
        mean, std: pixel normalisation; the pretraining's (ImageNet) by default.
    """

    def __init__(self, dataset: ReIDDataset, img_size: Sequence[int], *, device: torch.device | str = "cpu",
                 batch_size: int = 128, num_workers: int = 0, knn_k: int = 20, max_train: int = 4000,
                 mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD) -> None:
        self.dataset = dataset
        self.img_size = (int(img_size[0]), int(img_size[1]))
        self.device = torch.device(device)
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.knn_k = knn_k
        train = list(dataset.train)
        if max_train and len(train) > max_train:
            step = len(train) / max_train
            train = [train[int(i * step)] for i in range(max_train)]
        self.train = train
        self.mean, self.std = tuple(mean), tuple(std)

    @torch.no_grad()
    def __call__(self, backbone: nn.Module, mode: str = "pass") -> dict[str, float]:
        """Metrics of ``backbone`` (a :class:`PassViT`, evaluated in eval mode and put back as it was):
        ``mAP``, ``mINP``, ``rank1/5/10``, ``knn_top1`` (all fractions)."""
        from passreid.features import evaluate_features, extract_features, metrics_record

        model = FrozenFeature(backbone, mode).train(backbone.training)
        kwargs: dict[str, Any] = dict(img_size=self.img_size, batch_size=self.batch_size,
                                      num_workers=self.num_workers, device=self.device, mean=self.mean,
                                      std=self.std, interpolation="bicubic")
        query = extract_features(model, self.dataset.query, **kwargs)
        gallery = extract_features(model, self.dataset.gallery, **kwargs)
        record = metrics_record(evaluate_features(query, gallery))
        if self.train:
            train = extract_features(model, self.train, **kwargs)
            record["knn_top1"] = knn_accuracy(torch.from_numpy(train.features), torch.from_numpy(train.pids),
                                              k=self.knn_k)
        return record


class FrozenFeature(nn.Module):
    """A backbone seen through :func:`frozen_feature`: what :func:`passreid.features.extract_features` runs."""

    def __init__(self, backbone: nn.Module, mode: str = "pass") -> None:
        super().__init__()
        self.backbone = backbone
        self.mode = mode

    def forward(self, x: Tensor) -> Tensor:
        return frozen_feature(self.backbone, x, self.mode)


def collapse_warning(entropy: float, usage_entropy: float, out_dim: int) -> str | None:
    """A message if an epoch's mean teacher outputs look collapsed, else None.

    Args:
        entropy: mean entropy (nats) of the teacher's per-image distributions.
        usage_entropy: mean entropy of the teacher's batch-averaged distribution
            (how many prototypes the batch uses: ``exp`` of it).
        out_dim: number of prototypes K (uniform: ``log K``).

    Two collapses are possible (DINO): every image gets the uniform distribution
    (entropy near ``log K``: the centering won over the sharpening), or every
    image gets the same prototype (the batch uses about one prototype).
    """
    uniform = math.log(out_dim)
    if entropy > 0.97 * uniform:
        return (f"teacher outputs are near uniform (entropy {entropy:.2f} of log K = {uniform:.2f} nats) for a "
                f"whole epoch: the features are not learning. Lower optim.lr, lower loss.teacher_temp, raise "
                f"optim.momentum_teacher, or lengthen optim.warmup_epochs")
    if usage_entropy < math.log(2.0):
        return (f"the teacher sends every image to the same prototype (batch usage entropy {usage_entropy:.2f} "
                f"nats) for a whole epoch: the outputs collapsed. Raise loss.center_momentum's effect (lower "
                f"it), raise loss.teacher_temp, or lower optim.lr")
    return None


def describe_monitor(record: dict[str, Any]) -> str:
    """``mAP 12.3% R1 30.1% kNN 41.0%`` for the log line."""
    text = f"mAP {100 * record['mAP']:.1f}% R1 {100 * record.get('rank1', math.nan):.1f}%"
    if "knn_top1" in record:
        text += f" kNN {100 * record['knn_top1']:.1f}%"
    return text
