"""Cluster contrast for unsupervised (USL) and domain-adaptive (UDA) ReID (DESIGN §5).

Every epoch the model's after-neck features of the whole (unlabelled) target
train split are clustered: sparse k-reciprocal Jaccard distances
(:func:`passreid.kreciprocal.jaccard_distance`) and DBSCAN turn them into
pseudo identities, outliers are dropped, and the normalised cluster means
initialise a :class:`ClusterMemory`. The model is then trained for a fixed
number of iterations to pull each image towards its cluster's memory entry
and away from all others (cross-entropy at temperature 0.05), while the
memory follows the model by a momentum update after every step.

USL starts from a pretrained backbone; UDA from a model fine-tuned on a
labelled source set, of which only the backbone is carried over (its necks
and classifier belong to the source identities).

>>> cfg = load_config(ClusterConfig, "configs/usl/market_vit_small.yaml")
>>> result = run_cluster(cfg, mode="usl")
"""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Generator, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader

from passreid.config import (
    DataConfig,
    ModelConfig,
    RunConfig,
    check_choice,
    check_positive,
    config_to_dict,
    config_to_yaml,
)
from passreid.data.datasets import ImageRecord
from passreid.demo import DEMO_IMG_SIZE, DEMO_MODEL, DemoContext, StageResult, register_demo_stage, result_from_metrics
from passreid.demo import raise_if_stopped
from passreid.engine import (
    DistInfo,
    GracefulStop,
    RunDir,
    autocast,
    check_resume_fingerprint,
    cleanup_distributed,
    cores_beside_workers,
    explain_oom,
    load_training_checkpoint,
    loss_is_finite,
    make_grad_scaler,
    open_resume_checkpoint,
    resolve_precision,
    restore_training_state,
    save_training_checkpoint,
    seed_everything,
    setup_distributed,
    unwrap,
)
from passreid.errors import ConfigError, DatasetError, TrainingError
from passreid.models import ReIDModel

logger = logging.getLogger(__name__)

MODES = ("usl", "uda")
MEMORY_MODES = ("hard", "mean", "instance")
SAMPLERS = ("camera", "identity")


# ----------------------------------------------------------------------------- config


@dataclass
class ClusterSettings:
    """Pseudo-labelling and memory (DESIGN §5).

    ``eps`` is the DBSCAN radius on Jaccard distances: 0.6 for Market-1501,
    0.7 for MSMT17. ``memory_mode`` picks the memory update, see
    :class:`ClusterMemory`. ``search`` is the kNN back end of the Jaccard
    distance (``auto``: faiss on CPU, torch on GPU). ``calibrate_necks`` sets
    the new necks' BatchNorm statistics from the target train split before the
    first epoch (see :func:`calibrate_necks`); the published recipe does not.
    ``renormalize_features: true`` L2-normalises the multi-neck after-neck
    feature once more before clustering and evaluation (passreid's earlier
    behaviour); published, the fused vector of the normalised tokens is used as
    it is (DESIGN §5).
    """

    eps: float = 0.6
    min_samples: int = 4
    k1: int = 30
    k2: int = 6
    search: str = "auto"
    temp: float = 0.05
    momentum: float = 0.2
    memory_mode: str = "hard"
    calibrate_necks: bool = False
    renormalize_features: bool = False

    def __post_init__(self) -> None:
        check_positive("cluster.eps", self.eps)
        check_positive("cluster.min_samples", self.min_samples)
        check_positive("cluster.k1", self.k1)
        check_positive("cluster.k2", self.k2)
        check_positive("cluster.temp", self.temp)
        check_choice("cluster.memory_mode", self.memory_mode, MEMORY_MODES)
        check_choice("cluster.search", self.search, ("auto", "faiss", "torch"))
        if not 0.0 <= self.momentum < 1.0:
            raise ConfigError(f"config key 'cluster.momentum': {self.momentum} must be in [0, 1)")


@dataclass
class ClusterOptimConfig:
    """Optimiser, step schedule and pseudo-identity batches (DESIGN §5).

    ``name`` is ``sgd`` (the published recipe, with ``momentum``) or ``adamw``
    (the published code's other option; it suits short CPU runs of a small
    model). ``batch_size`` is the total over all processes; each pseudo identity
    in a batch brings ``num_instances`` images. The learning rate is multiplied
    by ``gamma`` every ``step_size`` epochs. ``sampler: camera`` (published) visits
    every pseudo identity once per pass with positives from other cameras
    (:class:`~passreid.data.samplers.CameraAwareIdentitySampler`); ``identity`` is
    passreid's earlier P x K sampler (clusters in proportion to their size,
    cameras ignored).
    """

    name: str = "sgd"
    lr: float = 3.5e-4
    momentum: float = 0.9
    weight_decay: float = 5e-4
    step_size: int = 20
    gamma: float = 0.1
    batch_size: int = 256
    num_instances: int = 8
    iters: int = 200
    sampler: str = "camera"

    def __post_init__(self) -> None:
        check_choice("optim.name", self.name, ("sgd", "adamw"))
        check_choice("optim.sampler", self.sampler, SAMPLERS)
        check_positive("optim.lr", self.lr)
        check_positive("optim.weight_decay", self.weight_decay, allow_zero=True)
        check_positive("optim.step_size", self.step_size)
        check_positive("optim.gamma", self.gamma)
        check_positive("optim.batch_size", self.batch_size)
        check_positive("optim.num_instances", self.num_instances)
        check_positive("optim.iters", self.iters)
        if self.batch_size % self.num_instances:
            raise ConfigError(f"config key 'optim.batch_size': {self.batch_size} must be a multiple of "
                              f"optim.num_instances ({self.num_instances})")


@dataclass
class ClusterConfig:
    """Schema of ``passreid usl`` / ``passreid uda`` recipes.

    ``data`` is the target set (only its train split's images are used for
    training, without labels; query/gallery for evaluation). ``model.pretrained``
    is the starting point: a pretrained backbone (USL) or a model fine-tuned on
    the source set (UDA); only backbone weights are taken from it. Published
    defaults that differ from fine-tuning: constant-fill random erasing
    (``data.erasing``), fp32 training (``run.precision``), bicubic test resize.
    """

    data: DataConfig = field(default_factory=lambda: DataConfig(erasing="constant"))
    model: ModelConfig = field(default_factory=lambda: ModelConfig(drop_path_rate=0.3, test_feature="after"))
    run: RunConfig = field(default_factory=lambda: RunConfig(output_dir="runs/cluster", epochs=50, eval_every=10,
                                                             precision="fp32"))
    cluster: ClusterSettings = field(default_factory=ClusterSettings)
    optim: ClusterOptimConfig = field(default_factory=ClusterOptimConfig)

    def __post_init__(self) -> None:
        if self.model.test_feature != "after":
            raise ConfigError("config key 'model.test_feature': cluster contrast clusters, trains and evaluates the "
                              f"after-neck feature (DESIGN §5); set it to 'after', not {self.model.test_feature!r}")


# ----------------------------------------------------------------------------- pseudo labels


def pseudo_labels(
    features: np.ndarray | Tensor,
    eps: float,
    min_samples: int = 4,
    k1: int = 30,
    k2: int = 6,
    *,
    search: str = "auto",
    device: torch.device | str | None = None,
) -> np.ndarray:
    """DBSCAN on sparse k-reciprocal Jaccard distances: one pseudo identity per cluster.

    Args:
        features: (N, D) L2-normalised features of the images to cluster.
        eps: DBSCAN radius on the Jaccard distance (0.6 Market, 0.7 MSMT17).
        min_samples: images within ``eps`` (itself included) that make a core point.
        k1, k2: k-reciprocal neighbourhood size and query-expansion size.
        search, device: kNN back end of :func:`passreid.kreciprocal.jaccard_distance`.

    Returns:
        (N,) int64 labels ``0..C-1``, ``-1`` for outliers.

    The distance matrix stays sparse: pairs that share no k-reciprocal
    neighbour are at distance 1 and pairs farther than ``eps`` can never be
    DBSCAN neighbours, so neither is stored; DBSCAN's precomputed sparse mode
    reads a missing pair as "not a neighbour" (eps < 1).
    """
    from sklearn.cluster import DBSCAN

    from passreid.kreciprocal import jaccard_distance

    t0 = time.perf_counter()
    dist_matrix = jaccard_distance(features, k1=k1, k2=k2, search=search, device=device, max_distance=eps)
    t1 = time.perf_counter()
    labels = DBSCAN(eps=eps, min_samples=min_samples, metric="precomputed", n_jobs=-1).fit_predict(dist_matrix)
    labels = labels.astype(np.int64)
    stats = cluster_stats(labels)
    logger.info("pseudo labels: %d clusters, %.1f%% outliers of %d images (eps %.3g; Jaccard %.1f s, DBSCAN %.1f s)",
                stats["num_clusters"], 100 * stats["outlier_fraction"], len(labels), eps, t1 - t0,
                time.perf_counter() - t1)
    return labels


def cluster_stats(labels: np.ndarray) -> dict[str, float]:
    """Number of clusters and the fraction of outliers (label -1) in ``labels`` (N,)."""
    n = max(len(labels), 1)
    return {"num_clusters": int(labels.max()) + 1 if len(labels) else 0,
            "outlier_fraction": float((labels < 0).sum()) / n}


def cluster_centroids(features: Tensor, labels: Tensor) -> Tensor:
    """L2-normalised mean feature of each cluster: (N, F), (N,) in ``-1..C-1`` -> (C, F); outliers ignored."""
    keep = labels >= 0
    feats, labels = features[keep].float(), labels[keep]
    num_clusters = int(labels.max()) + 1
    sums = torch.zeros(num_clusters, feats.shape[1], dtype=feats.dtype, device=feats.device)
    sums.index_add_(0, labels, feats)
    counts = torch.bincount(labels, minlength=num_clusters).clamp_min(1).unsqueeze(1)
    return F.normalize(sums / counts, dim=1)


# ----------------------------------------------------------------------------- memory


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


# ----------------------------------------------------------------------------- model


def build_cluster_model(model_cfg: ModelConfig, img_size: Sequence[int], *, mode: str,
                        renormalize: bool = False) -> ReIDModel:
    """The ReID model of a cluster-contrast run, its backbone loaded from ``model.pretrained``.

    Only backbone weights are read (``load_checkpoint`` on ``model.base``): of a
    source fine-tuned model (UDA) the necks and classifier are dropped on
    purpose. The necks are new and named in the published cluster layout
    (``bottleneck``, ``bottleneck_pt1..3``). Its eval output is the published
    cluster feature (multi-neck: not normalised again unless ``renormalize``).
    """
    from passreid.checkpoint import load_checkpoint
    from passreid.models import create_model

    backbone = create_model(model_cfg.name, img_size=tuple(img_size), depth=model_cfg.depth,
                            drop_path_rate=model_cfg.drop_path_rate)
    if model_cfg.pretrained:
        report = load_checkpoint(backbone, model_cfg.pretrained)
        if mode == "uda" and not any(k.startswith(("bottleneck", "classifier")) for k in report.ignored):
            logger.warning("%s holds no ReID necks or classifier: UDA expects a model fine-tuned on the source "
                           "set (`passreid train`), not a bare backbone", model_cfg.pretrained)
    elif mode == "uda":
        raise ConfigError("config key 'model.pretrained' is empty: UDA starts from a model fine-tuned on the "
                          "source set (the output of `passreid train`)")
    else:
        logger.warning("model.pretrained is empty: USL starts from a randomly initialised backbone")
    return ReIDModel(backbone, num_classes=0, fusion=model_cfg.fusion, neck=model_cfg.neck,  # type: ignore[arg-type]
                     test_feature="after", neck_names="cluster", normalize_output=renormalize,
                     ghost_batch=model_cfg.ghost_batch)


def build_optimizer(model: nn.Module, optim_cfg: ClusterOptimConfig) -> torch.optim.Optimizer:
    """SGD (momentum) or AdamW over every trainable parameter, one learning rate and weight decay for all."""
    params = [p for p in model.parameters() if p.requires_grad]
    if optim_cfg.name == "adamw":
        return torch.optim.AdamW(params, lr=optim_cfg.lr, weight_decay=optim_cfg.weight_decay)
    return torch.optim.SGD(params, lr=optim_cfg.lr, momentum=optim_cfg.momentum, weight_decay=optim_cfg.weight_decay)


@torch.no_grad()
def calibrate_necks(model: ReIDModel, loader: Iterable[Any], device: torch.device, precision: str = "fp32",
                    world_size: int = 1) -> None:
    """Set the neck BatchNorm running mean and variance to their averages over ``loader``'s images.

    New necks start at mean 0 and variance 1, so the eval-mode after-neck feature
    keeps the large component that all backbone tokens share (their pairwise
    cosine can be above 0.99), while the training feature is normalised with
    batch statistics. Until many steps have moved the running statistics, the
    pseudo labels and memory (eval features) then do not match what is trained;
    the published 200 iterations per epoch absorb this within the first epoch,
    short runs do not. The backbone stays in eval mode (no drop path); under DDP
    the statistics of all ranks are averaged.
    """
    necks = [m for m in model.modules() if isinstance(m, nn.BatchNorm1d)]
    momenta = [bn.momentum for bn in necks]
    model.eval()
    for bn in necks:
        bn.reset_running_stats()
        bn.momentum = None  # cumulative average over the batches
        bn.train()
    for images, *_ in loader:
        with autocast(device, precision):
            model.neck_feature(model.tokens(images.to(device, non_blocking=True)))
    for bn, momentum in zip(necks, momenta):
        bn.momentum = momentum
        bn.eval()
        if world_size > 1:
            for stat in (bn.running_mean, bn.running_var):
                dist.all_reduce(stat)
                stat /= world_size


# ----------------------------------------------------------------------------- one epoch


def _gather(tensor: Tensor, world_size: int) -> Tensor:
    """Concatenate equally shaped (B, ...) tensors of all ranks in rank order (no gradient)."""
    if world_size == 1:
        return tensor
    parts = [torch.empty_like(tensor) for _ in range(world_size)]
    dist.all_gather(parts, tensor.contiguous())
    return torch.cat(parts)


def _any_rank(flag: bool, device: torch.device, world_size: int) -> bool:
    """True when ``flag`` is set on at least one rank, so that all ranks take the same branch."""
    if world_size == 1:
        return flag
    t = torch.tensor([float(flag)], device=device)
    dist.all_reduce(t)
    return bool(t.item() > 0)


def train_one_epoch(
    model: nn.Module,
    memory: ClusterMemory,
    batches: Iterator[tuple[Tensor, Tensor]],
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    *,
    iters: int,
    epoch: int,
    device: torch.device,
    precision: str = "fp32",
    world_size: int = 1,
    log_every: int = 50,
    last_checkpoint: Path | None = None,
    skip_nonfinite: bool = False,
    stop: GracefulStop | None = None,
) -> dict[str, Any]:
    """``iters`` steps of cluster contrast: forward, memory loss, SGD step, memory update.

    Args:
        model: the (possibly DDP-wrapped) :class:`ReIDModel`; its training-mode
            ``neck_feat`` (B, F) is the feature compared with the memory.
        memory: this epoch's cluster memory (identical on every rank).
        batches: endless ``(images (B, 3, H, W), pseudo labels (B,))`` of this rank.
        stop: a graceful-stop flag; a request ends the epoch after the current step.

    Returns:
        ``{"loss", "lr", "iters", "batches", "stopped"}``: mean loss over the steps
        taken, the learning rate used, the number of steps taken, the number of
        batches drawn (non-finite steps skipped included: where a resume continues)
        and whether a stop request cut the epoch short.

    Under DDP each rank computes the loss on its own share of the batch, and
    the memory is updated with the features of all ranks so that it stays the
    same everywhere.
    """
    model.train()
    total, done, stopped, step = 0.0, 0, False, 0
    for step in range(1, iters + 1):
        images, labels = next(batches)
        images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
        batch_size = len(images) * world_size
        with explain_oom(batch_size):
            with autocast(device, precision):
                feats = model(images).neck_feat
            feats = feats.float()
            loss = memory(feats, labels)
            # Every rank must agree on skipping, or DDP would wait forever for the skipped backward.
            check = loss.detach().clone()
            if world_size > 1:
                dist.all_reduce(check)
            finite = loss_is_finite(check, step=step, epoch=epoch, last_checkpoint=last_checkpoint,
                                    skip=skip_nonfinite)
            optimizer.zero_grad(set_to_none=True)
            if finite:
                scaler.scale(loss).backward()
                scaler.step(optimizer)
                scaler.update()
        if finite:
            memory.update(_gather(feats.detach(), world_size), _gather(labels, world_size))
            total += loss.item()
            done += 1
        if step % log_every == 0 and done:
            logger.info("epoch %d step %d/%d: loss %.4f", epoch, step, iters, total / done)
        if stop is not None and _any_rank(stop.requested, device, world_size):
            stopped = True
            break
    return {"loss": total / max(done, 1), "lr": optimizer.param_groups[0]["lr"], "iters": done, "batches": step,
            "stopped": stopped}


# ----------------------------------------------------------------------------- the run


def _extract_all(model: nn.Module, records: Sequence[ImageRecord], cfg: ClusterConfig, info: DistInfo,
                 precision: str) -> np.ndarray:
    """After-neck features (N, F) of ``records``; under DDP each rank extracts a share and all get the whole."""
    from passreid.features import extract_features

    kwargs: dict[str, Any] = dict(img_size=cfg.data.img_size, batch_size=cfg.optim.batch_size,
                                  num_workers=cfg.data.num_workers, device=info.device, precision=precision,
                                  mean=cfg.data.pixel_mean, std=cfg.data.pixel_std,
                                  on_bad_image="replace" if cfg.data.skip_corrupt else "raise")
    if not info.distributed:
        return extract_features(unwrap(model), records, **kwargs).features
    share = extract_features(unwrap(model), records[info.rank::info.world_size], **kwargs).features
    shares: list[Any] = [None] * info.world_size
    dist.all_gather_object(shares, share)
    features = np.empty((len(records), share.shape[1]), dtype=np.float32)
    for rank, part in enumerate(shares):
        features[rank::info.world_size] = part
    return features


def _plain_loader(records: Sequence[ImageRecord], cfg: ClusterConfig) -> DataLoader:
    """Test-transform batches of ``records`` in order (feature statistics, not training)."""
    from passreid.data.images import ImageDataset
    from passreid.data.transforms import build_test_transform

    dataset = ImageDataset(records, transform=build_test_transform(cfg.data.img_size, cfg.data.pixel_mean,
                                                                   cfg.data.pixel_std),
                           skip_corrupt=cfg.data.skip_corrupt)
    return DataLoader(dataset, batch_size=cfg.optim.batch_size, num_workers=cfg.data.num_workers)


def _broadcast_labels(labels: np.ndarray | None, info: DistInfo) -> np.ndarray:
    """Rank 0's pseudo labels on every rank (DBSCAN is run once; other ranks pass None)."""
    box: list[Any] = [labels]
    if info.distributed:
        dist.broadcast_object_list(box, src=0)
    return box[0]


def _endless_batches(records: list[ImageRecord], cfg: ClusterConfig, info: DistInfo,
                     epoch: int, start_step: int = 0) -> Generator[tuple[Tensor, Tensor], None, None]:
    """Pseudo-identity batches (``num_instances`` images per cluster) of this rank, reshuffled on every pass.

    A pass of the camera-aware sampler holds each pseudo identity once; passes
    follow each other until the epoch's ``iters`` steps are done. The batches, and
    the augmentation of every image in them, are a function of (seed, epoch, step):
    ``start_step`` skips the epoch's first batches to continue a stopped epoch.
    """
    from passreid.data.images import ImageDataset
    from passreid.data.samplers import CameraAwareIdentitySampler, RandomIdentitySampler
    from passreid.data.seeding import PositionSeeds
    from passreid.data.transforms import build_train_transform

    if cfg.optim.batch_size % (cfg.optim.num_instances * info.world_size):
        raise ConfigError(f"config key 'optim.batch_size': {cfg.optim.batch_size} must split into "
                          f"{info.world_size} processes of whole pseudo identities (a multiple of "
                          f"num_instances x processes = {cfg.optim.num_instances * info.world_size})")
    dataset = ImageDataset(records, transform=build_train_transform(cfg.data.img_size, cfg.data.pixel_mean,
                                                                    cfg.data.pixel_std,
                                                                    color_jitter=cfg.data.color_jitter,
                                                                    erasing=cfg.data.erasing),
                           skip_corrupt=cfg.data.skip_corrupt)
    # Fewer clusters than a batch holds (a strict eps, an early epoch): this epoch's batches
    # hold all of them (whole clusters per process) rather than the run stopping.
    full = cfg.optim.batch_size // cfg.optim.num_instances
    num_clusters = len({r.pid for r in records})
    per_batch = min(full, num_clusters // info.world_size * info.world_size)
    if per_batch < full:
        logger.warning("epoch %d: only %d clusters; batches of %d clusters x %d images this epoch instead of %d x %d",
                       epoch, num_clusters, per_batch, cfg.optim.num_instances, full, cfg.optim.num_instances)
    shape: dict[str, Any] = dict(batch_size=per_batch * cfg.optim.num_instances,
                                 num_instances=cfg.optim.num_instances, seed=cfg.run.seed, rank=info.rank,
                                 world_size=info.world_size)
    pids = [r.pid for r in records]
    sampler = (CameraAwareIdentitySampler(pids, [r.camid for r in records], **shape) if cfg.optim.sampler == "camera"
               else RandomIdentitySampler(pids, cover_all=True, **shape))
    loader = DataLoader(dataset, batch_size=sampler.batch_size_per_rank,
                        sampler=PositionSeeds(sampler, sampler.batch_size_per_rank),
                        num_workers=cfg.data.num_workers, pin_memory=info.device.type == "cuda", drop_last=True,
                        generator=torch.Generator())  # its own: a pass's iterator takes nothing from the global RNG
    # A pass over the sampler rarely covers exactly `iters` batches: keep drawing
    # fresh passes, each with its own shuffle, like the published IterLoader.
    for sub_epoch in itertools.count():
        sampler.set_epoch(epoch * 1000 + sub_epoch)
        if start_step and start_step >= len(sampler.global_batches()):  # a pass the stopped epoch had finished
            start_step -= len(sampler.global_batches())
            continue
        sampler.set_epoch(epoch * 1000 + sub_epoch, start_batch=start_step)
        start_step = 0
        for images, pids, _, _ in loader:
            yield images, pids


def run_cluster(cfg: ClusterConfig, mode: str = "usl", resume: str | None = None,
                force_resume: bool = False) -> dict[str, Any]:
    """Train a ReID model by cluster contrast on the unlabelled target train split.

    Args:
        cfg: the recipe.
        mode: ``usl`` (start from a pretrained backbone) or ``uda`` (start from
            the backbone of a source fine-tuned model; ``model.pretrained`` required).
        resume: None for a fresh run, ``""`` for the run directory's ``last.pth``,
            or a checkpoint path. At an epoch boundary the pseudo labels are recomputed
            from the restored model; inside an epoch (a stop request) the epoch's pseudo
            labels, memory and step are restored, so the resumed run ends with the
            uninterrupted run's weights, with any ``data.num_workers``.
        force_resume: resume even if the config changed.

    Returns:
        ``{"best_mAP", "best_epoch", "metrics" (of the last evaluation), "model",
        "run_dir", "stopped"}``; ``model`` is the exported best model (None on
        other ranks or when a stop request ended the run early).
    """
    from passreid.data.datasets import build_dataset, dataset_fingerprint
    from passreid.features import evaluate_model, metrics_record
    from passreid.engine import export_model

    check_choice("mode", mode, MODES)
    info = setup_distributed(cfg.run.device)
    try:
        seed_everything(cfg.run.seed, info.rank)
        run_dir = RunDir(cfg.run.output_dir, is_main=info.is_main)
        config = config_to_dict(cfg)
        dataset = build_dataset(cfg.data.dataset, cfg.data.root)
        if not dataset.train:
            raise DatasetError(f"{cfg.data.root}: the train split of {cfg.data.dataset} is empty")
        fingerprint = dataset_fingerprint(dataset.train)
        precision = resolve_precision(cfg.run.precision, info.device)

        model = build_cluster_model(cfg.model, cfg.data.img_size, mode=mode,
                                    renormalize=cfg.cluster.renormalize_features).to(info.device)
        optimizer = build_optimizer(model, cfg.optim)
        scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=cfg.optim.step_size, gamma=cfg.optim.gamma)
        scaler = make_grad_scaler(precision, info.device)

        start_epoch, best = 1, {"mAP": -1.0, "epoch": 0}
        ckpt, resume_path = open_resume_checkpoint(resume, run_dir, config, force_resume)
        if ckpt is not None:
            check_resume_fingerprint(ckpt, fingerprint, resume_path, force_resume)
            start_epoch = restore_training_state(ckpt, model=model, optimizer=optimizer, scheduler=scheduler,
                                                 scaler=scaler)
            best = dict(ckpt.get("best", best))
            run_dir.truncate_metrics(start_epoch - 1)
            logger.info("resumed from %s at epoch %d%s", resume_path, start_epoch,
                        f", step {ckpt['resume_step']} (its pseudo labels and memory restored)"
                        if ckpt.get("resume_step") else " (pseudo labels are recomputed)")
        else:
            if run_dir.last.exists():
                logger.warning("%s holds an earlier run: starting afresh over it (pass --resume to continue it)",
                               run_dir.path)
            run_dir.truncate_metrics(0)
        run_dir.write_config(config_to_yaml(cfg))

        train_model: nn.Module = model
        if info.distributed:
            train_model = nn.parallel.DistributedDataParallel(
                model, device_ids=[info.device.index] if info.device.type == "cuda" else None)

        iters = cfg.optim.iters
        if cfg.run.max_iters_per_epoch:
            iters = min(iters, cfg.run.max_iters_per_epoch)
        if cfg.cluster.calibrate_necks and ckpt is None:
            calibrate_necks(model, _plain_loader(dataset.train[info.rank::info.world_size], cfg), info.device,
                            precision, info.world_size)
        metrics: dict[str, Any] = {}
        stopped = False
        with GracefulStop() as stop:
            for epoch in range(start_epoch, cfg.run.epochs + 1):
                t0 = time.perf_counter()
                start_step = int(ckpt.get("resume_step", 0)) if ckpt is not None and epoch == start_epoch else 0
                if start_step:  # stopped inside this epoch: its pseudo labels and memory as they were
                    labels = ckpt["pseudo_labels"].numpy()
                    memory = ClusterMemory(ckpt["memory"]["centroids"].shape[1], int(labels.max()) + 1,
                                           temp=cfg.cluster.temp, momentum=cfg.cluster.momentum,
                                           mode=cfg.cluster.memory_mode).to(info.device)
                    memory.load_state_dict(ckpt["memory"])
                    features = None
                else:
                    features = _extract_all(train_model, dataset.train, cfg, info, precision)
                    labels = None
                    if info.is_main:
                        labels = pseudo_labels(features, cfg.cluster.eps, cfg.cluster.min_samples, cfg.cluster.k1,
                                               cfg.cluster.k2, search=cfg.cluster.search, device=info.device)
                    labels = _broadcast_labels(labels, info)
                stats = cluster_stats(labels)
                if stats["num_clusters"] < max(2, info.world_size):  # a contrast needs two clusters per batch
                    raise TrainingError(
                        f"epoch {epoch}: DBSCAN (eps {cfg.cluster.eps}, min_samples {cfg.cluster.min_samples}) "
                        f"found {stats['num_clusters']} cluster(s) among {len(labels)} images, too few for cluster "
                        f"contrast on {info.world_size} process(es); raise cluster.eps or start from a better "
                        "model.pretrained")
                if features is not None:
                    memory = ClusterMemory.from_features(
                        torch.from_numpy(features).to(info.device), torch.from_numpy(labels).to(info.device),
                        temp=cfg.cluster.temp, momentum=cfg.cluster.momentum, mode=cfg.cluster.memory_mode)
                labelled = [ImageRecord(r.path, int(y), r.camid) for r, y in zip(dataset.train, labels) if y >= 0]
                batches = _endless_batches(labelled, cfg, info, epoch, start_step)
                train_stats = train_one_epoch(
                    train_model, memory, batches, optimizer, scaler, iters=iters - start_step, epoch=epoch,
                    device=info.device,
                    precision=precision, world_size=info.world_size, log_every=cfg.run.log_every,
                    last_checkpoint=run_dir.last, skip_nonfinite=cfg.run.skip_nonfinite, stop=stop)
                batches.close()
                if train_stats["stopped"]:
                    # The epoch is cut short: the checkpoint is of the previous epoch plus the steps
                    # taken, with this epoch's pseudo labels and memory, so a resume continues the epoch.
                    step = start_step + train_stats["batches"]
                    if info.is_main:
                        save_training_checkpoint(
                            run_dir.last, model=model, optimizer=optimizer, scheduler=scheduler, scaler=scaler,
                            epoch=epoch - 1, config=config, fingerprint=fingerprint,
                            extra={"best": best, "resume_step": step, "pseudo_labels": torch.from_numpy(labels),
                                   "memory": {k: v.cpu() for k, v in memory.state_dict().items()}})
                    logger.warning("stopped in epoch %d after step %d; %s holds the run, `--resume` continues "
                                   "from the next step", epoch, step, run_dir.last)
                    stopped = True
                    break
                scheduler.step()
                record: dict[str, Any] = {"epoch": epoch, **stats, "loss": train_stats["loss"],
                                          "lr": train_stats["lr"], "iters": train_stats["iters"]}
                if epoch % cfg.run.eval_every == 0 or epoch == cfg.run.epochs:
                    if info.is_main:
                        metrics = evaluate_model(model, dataset, img_size=cfg.data.img_size, device=info.device,
                                                 batch_size=cfg.optim.batch_size, num_workers=cfg.data.num_workers,
                                                 precision="fp32", skip_corrupt=cfg.data.skip_corrupt)
                        record.update(metrics_record(metrics))
                        logger.info("epoch %d: mAP %.2f%%, rank-1 %.2f%%", epoch, 100 * metrics["mAP"],
                                    100 * metrics["cmc"][0])
                        if metrics["mAP"] > best["mAP"]:
                            best = {"mAP": float(metrics["mAP"]), "epoch": epoch}
                            save_training_checkpoint(run_dir.best, model=model, optimizer=None, scheduler=None,
                                                     scaler=None, epoch=epoch, config=config,
                                                     fingerprint=fingerprint,
                                                     extra={"best": best, "selected_on": "test set (published)"})
                    if info.distributed:
                        dist.barrier()
                record["seconds"] = round(time.perf_counter() - t0, 2)
                if info.is_main:
                    save_training_checkpoint(run_dir.last, model=model, optimizer=optimizer, scheduler=scheduler,
                                             scaler=scaler, epoch=epoch, config=config, fingerprint=fingerprint,
                                             extra={"best": best})
                run_dir.log_metrics(record)

        exported = None
        if info.is_main and not stopped and run_dir.best.exists():
            exported = export_model(run_dir, load_training_checkpoint(run_dir.best)["model"], config, fingerprint,
                                    epoch=best["epoch"], metrics={"mAP": best["mAP"]},
                                    selection=f"epoch {best['epoch']}, the best test mAP among the evaluations "
                                              "(published cluster-contrast model selection)")
            logger.info("best epoch %d (mAP %.2f%%) exported to %s", best["epoch"], 100 * best["mAP"], exported)
        run_dir.close()
        return {"best_mAP": best["mAP"], "best_epoch": best["epoch"], "metrics": metrics, "model": exported,
                "run_dir": run_dir.path, "stopped": stopped}
    finally:
        cleanup_distributed()


# ----------------------------------------------------------------------------- demo


DEMO_EPOCHS = 5
"""Demo adaptation length: with the settings below about 45 s for the tiny model on 2 CPU cores."""


def demo_config(ctx: DemoContext, pretrained: str) -> ClusterConfig:
    """The short CPU recipe of the demo's UDA stage (MSMT17->Market row layout: cat fusion, multi-neck).

    It departs from the published recipe where a few dozen steps of a tiny model
    need it: training images get a colour jitter (without it the synthetic
    cameras' light and colour casts are the easiest thing to learn from noisy
    clusters, and the adapted model fell back to the direct-transfer mAP or
    below), the neck statistics are calibrated before the first epoch, the
    memory follows the batch mean of each cluster (the hardest instance of a
    tiny model's augmented images is mostly noise), AdamW at a small rate keeps
    the source features, and k1/k2 fit ~8 images per identity instead of
    Market's ~17. The small eps keeps only tight clusters (about a quarter of
    the images at first): the source model's looser clusters mix identities,
    and training on them drifted towards camera features.
    """
    return ClusterConfig(
        data=DataConfig(dataset="synthetic", root=str(ctx.target_root), img_size=list(DEMO_IMG_SIZE),
                        num_workers=1, color_jitter=0.3),
        model=ModelConfig(name=DEMO_MODEL["name"], depth=DEMO_MODEL["depth"], drop_path_rate=0.0,
                          pretrained=pretrained, fusion="cat", neck="multi", test_feature="after"),
        run=RunConfig(output_dir=str(ctx.workdir / "uda"), seed=ctx.seed, epochs=DEMO_EPOCHS,
                      eval_every=DEMO_EPOCHS, log_every=10, device=str(ctx.device)),
        cluster=ClusterSettings(eps=0.35, k1=6, k2=3, memory_mode="mean", calibrate_necks=True),
        optim=ClusterOptimConfig(name="adamw", lr=1e-4, weight_decay=0.05, batch_size=32, num_instances=4,
                                 iters=30, step_size=DEMO_EPOCHS),
    )


@register_demo_stage(order=30, name="uda")
def uda_stage(ctx: DemoContext) -> list[StageResult]:
    """Direct transfer of the source fine-tuned model to the target domain, then UDA by cluster contrast.

    Both are evaluated on the target domain's query/gallery: ``direct-transfer``
    with the source model's own test feature, ``uda`` after adapting on the
    target train split without its labels.
    """
    from passreid.checkpoint import build_model_from_checkpoint
    from passreid.data.datasets import build_dataset
    from passreid.features import evaluate_model

    start = time.perf_counter()
    if ctx.state.get("finetuned_checkpoint") is None:
        from passreid.finetune import finetune_for_demo

        finetune_for_demo(ctx, "finetune")
    source_model = str(ctx.state["finetuned_checkpoint"])
    model, _ = build_model_from_checkpoint(source_model, device=ctx.device)
    target = build_dataset("synthetic", ctx.target_root)
    direct = evaluate_model(model, target, img_size=DEMO_IMG_SIZE, device=ctx.device, num_workers=0)
    direct_result = result_from_metrics("direct-transfer", direct, time.perf_counter() - start)

    start = time.perf_counter()
    cfg = demo_config(ctx, source_model)
    with cores_beside_workers(cfg.data.num_workers, cfg.run.device):
        result = run_cluster(cfg, mode="uda")
    raise_if_stopped(result)
    metrics = {"mAP": result["metrics"]["mAP"], "mINP": result["metrics"].get("mINP"), "cmc": result["metrics"]["cmc"]}
    return [direct_result, result_from_metrics("uda", metrics, time.perf_counter() - start)]
