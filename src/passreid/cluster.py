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

import logging
from collections.abc import Generator, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.utils.data import DataLoader

from passreid.config import DataConfig, ModelConfig, RunConfig, check_choice, check_positive
from passreid.data.datasets import ImageRecord
from passreid.data.loaders import endless_batches, identity_loader, test_loader
from passreid.runtime import (
    DistInfo,
    agree_across_ranks,
    broadcast_from_main,
    gather_rows,
    autocast,
    explain_oom,
    make_grad_scaler,
    resolve_precision,
    unwrap,
)
from passreid.errors import ConfigError, DatasetError, TrainingError
from passreid.clustering import cluster_stats, pseudo_label_quality, pseudo_labels
from passreid.losses.cluster_memory import MEMORY_MODES, ClusterMemory
from passreid.models import ReIDModel
from passreid.training import optim as training_optim
from passreid.training.run import GracefulStop, MeanStats, TrainingRun, describe, loss_is_finite

logger = logging.getLogger(__name__)

MODES = ("usl", "uda")
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
    from passreid.checkpoint import build_reid_model

    if mode == "uda" and not model_cfg.pretrained:
        raise ConfigError("config key 'model.pretrained' is empty: UDA starts from a model fine-tuned on the "
                          "source set (the output of `passreid train`)")
    if not model_cfg.pretrained:
        logger.warning("model.pretrained is empty: USL starts from a randomly initialised backbone")
    model, report = build_reid_model(
        model_cfg.name, img_size=(int(img_size[0]), int(img_size[1])), depth=model_cfg.depth,
        drop_path_rate=model_cfg.drop_path_rate, pretrained=model_cfg.pretrained, fusion=model_cfg.fusion,
        neck=model_cfg.neck, test_feature="after", neck_names="cluster", normalize_output=renormalize,
        ghost_batch=model_cfg.ghost_batch)
    if mode == "uda" and report is not None and not any(k.startswith(("bottleneck", "classifier"))
                                                        for k in report.ignored):
        logger.warning("%s holds no ReID necks or classifier: UDA expects a model fine-tuned on the source "
                       "set (`passreid train`), not a bare backbone", model_cfg.pretrained)
    return model


def build_optimizer(model: nn.Module, optim_cfg: ClusterOptimConfig) -> torch.optim.Optimizer:
    """SGD (momentum) or AdamW over every trainable parameter, one learning rate and weight decay for all."""
    return training_optim.build_optimizer(model, name=optim_cfg.name, lr=optim_cfg.lr,
                                          weight_decay=optim_cfg.weight_decay, momentum=optim_cfg.momentum)


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
        ``{"loss", "lr", "iters", "batches", "stopped"}``: the mean of each loss term over
        the steps taken (none without a step), the learning rate used, the number of steps
        taken, the number of batches drawn (non-finite steps skipped included: where a
        resume continues) and whether a stop request cut the epoch short (a request during
        the last step does not: the epoch is complete).

    Under DDP each rank computes the loss on its own share of the batch, and
    the memory is updated with the features of all ranks so that it stays the
    same everywhere.
    """
    model.train()
    sums, stopped, step = MeanStats(), False, 0
    for step in range(1, iters + 1):
        images, labels = next(batches)
        images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
        batch_size = len(images) * world_size
        with explain_oom(batch_size):
            with autocast(device, precision):
                feats = model(images).neck_feat
            feats = feats.float()
            loss = memory(feats, labels)
            # Every rank must agree on skipping, or DDP would wait forever for the skipped backward;
            # the same all-reduce says whether any rank was asked to stop.
            mean_loss, stop_now = agree_across_ranks(loss, stop)
            finite = loss_is_finite(mean_loss, step=step, epoch=epoch, last_checkpoint=last_checkpoint,
                                    skip=skip_nonfinite)
            optimizer.zero_grad(set_to_none=True)
            if finite:
                scaler.scale(loss).backward()
                scaler.step(optimizer)
                scaler.update()
        if finite:
            memory.update(gather_rows(feats.detach(), world_size), gather_rows(labels, world_size))
            sums.add({"loss": loss.detach().double().cpu()})
        if step % log_every == 0 and sums.count:
            logger.info("epoch %d step %d/%d: %s", epoch, step, iters, describe(sums.means()))
        if stop_now:
            stopped = step < iters
            break
    return {**sums.means(), "lr": optimizer.param_groups[0]["lr"], "iters": sums.count, "batches": step,
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
    # Every rank extracts with rank 0's BatchNorm statistics, those of the model last.pth holds: each
    # rank's own last training forward pass moved its copy, and a resumed run starts from rank 0's.
    for buffer in unwrap(model).buffers():
        dist.broadcast(buffer, src=0)
    share = extract_features(unwrap(model), records[info.rank::info.world_size], **kwargs).features
    shares: list[Any] = [None] * info.world_size
    dist.all_gather_object(shares, share)
    features = np.empty((len(records), share.shape[1]), dtype=np.float32)
    for rank, part in enumerate(shares):
        features[rank::info.world_size] = part
    return features


def _plain_loader(records: Sequence[ImageRecord], cfg: ClusterConfig) -> DataLoader:
    """Test-transform batches of ``records`` in order (feature statistics, not training)."""
    return test_loader(records, img_size=cfg.data.img_size, mean=cfg.data.pixel_mean, std=cfg.data.pixel_std,
                       batch_size=cfg.optim.batch_size, num_workers=cfg.data.num_workers,
                       skip_corrupt=cfg.data.skip_corrupt)


def _endless_batches(records: list[ImageRecord], cfg: ClusterConfig, info: DistInfo,
                     epoch: int, start_step: int = 0) -> Generator[tuple[Tensor, Tensor], None, None]:
    """Pseudo-identity batches (``num_instances`` images per cluster) of this rank, reshuffled on every pass.

    A pass of the camera-aware sampler holds each pseudo identity once; passes
    follow each other until the epoch's ``iters`` steps are done. The batches, and
    the augmentation of every image in them, are a function of (seed, epoch, step):
    ``start_step`` skips the epoch's first batches to continue a stopped epoch.
    """
    if cfg.optim.batch_size % (cfg.optim.num_instances * info.world_size):
        raise ConfigError(f"config key 'optim.batch_size': {cfg.optim.batch_size} must split into "
                          f"{info.world_size} processes of whole pseudo identities (a multiple of "
                          f"num_instances x processes = {cfg.optim.num_instances * info.world_size})")
    # Fewer clusters than a batch holds (a strict eps, an early epoch): this epoch's batches
    # hold all of them (whole clusters per process) rather than the run stopping.
    full = cfg.optim.batch_size // cfg.optim.num_instances
    num_clusters = len({r.pid for r in records})
    per_batch = min(full, num_clusters // info.world_size * info.world_size)
    if per_batch < full:
        logger.warning("epoch %d: only %d clusters; batches of %d clusters x %d images this epoch instead of %d x %d",
                       epoch, num_clusters, per_batch, cfg.optim.num_instances, full, cfg.optim.num_instances)
    loader, sampler = identity_loader(
        records, img_size=cfg.data.img_size, mean=cfg.data.pixel_mean, std=cfg.data.pixel_std,
        color_jitter=cfg.data.color_jitter, erasing=cfg.data.erasing, batch_size=per_batch * cfg.optim.num_instances,
        num_instances=cfg.optim.num_instances, seed=cfg.run.seed, rank=info.rank, world_size=info.world_size,
        cover_all=True, camera_aware=cfg.optim.sampler == "camera", num_workers=cfg.data.num_workers,
        skip_corrupt=cfg.data.skip_corrupt, pin_memory=info.device.type == "cuda")
    yield from endless_batches(loader, sampler, epoch, start_step)


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

    check_choice("mode", mode, MODES)
    with TrainingRun(cfg, resume=resume, force=force_resume) as run:
        info = run.info
        dataset = build_dataset(cfg.data.dataset, cfg.data.root)
        if not dataset.train:
            raise DatasetError(f"{cfg.data.root}: the train split of {cfg.data.dataset} is empty")
        run.check_data(dataset_fingerprint(dataset.train))
        precision = resolve_precision(cfg.run.precision, info.device)

        model = build_cluster_model(cfg.model, cfg.data.img_size, mode=mode,
                                    renormalize=cfg.cluster.renormalize_features).to(info.device)
        optimizer = build_optimizer(model, cfg.optim)
        scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=cfg.optim.step_size, gamma=cfg.optim.gamma)
        scaler = make_grad_scaler(precision, info.device)
        state = run.restore(model=model, optimizer=optimizer, scheduler=scheduler, scaler=scaler)
        if run.resumed:
            logger.info("%s", f"epoch {state.epoch + 1} continues at step {state.step} with its pseudo labels and "
                              "memory" if state.step else "pseudo labels are recomputed from the restored model")
        train_model = run.wrap(model)

        iters = cfg.optim.iters
        if cfg.run.max_iters_per_epoch:
            iters = min(iters, cfg.run.max_iters_per_epoch)
        if cfg.cluster.calibrate_necks and not run.resumed:
            calibrate_necks(model, _plain_loader(dataset.train[info.rank::info.world_size], cfg), info.device,
                            precision, info.world_size)
        metrics: dict[str, Any] = {}
        train_pids = np.array([r.pid for r in dataset.train])  # only to grade the pseudo labels
        for epoch in run.epochs():
            start_step = state.step  # non-zero only in the epoch a stop request cut short
            if start_step:  # stopped inside this epoch: its pseudo labels and memory as they were
                labels = run.ckpt["pseudo_labels"].numpy()
                memory = ClusterMemory(run.ckpt["memory"]["centroids"].shape[1], int(labels.max()) + 1,
                                       temp=cfg.cluster.temp, momentum=cfg.cluster.momentum,
                                       mode=cfg.cluster.memory_mode).to(info.device)
                memory.load_state_dict(run.ckpt["memory"])
                features = None
            else:
                features = _extract_all(train_model, dataset.train, cfg, info, precision)
                labels = None
                if info.is_main:
                    labels = pseudo_labels(features, cfg.cluster.eps, cfg.cluster.min_samples, cfg.cluster.k1,
                                           cfg.cluster.k2, search=cfg.cluster.search, device=info.device)
                labels = broadcast_from_main(labels, info)  # DBSCAN runs once, on rank 0
            stats = cluster_stats(labels)
            if info.is_main:  # against the train split's own identities, when it has them (never trained on)
                stats.update(pseudo_label_quality(labels, train_pids))
                if "pseudo_purity" in stats:
                    logger.info("epoch %d pseudo labels against the train split's identities: purity %.2f, "
                                "ARI %.2f, NMI %.2f", epoch, stats["pseudo_purity"], stats["pseudo_ari"],
                                stats["pseudo_nmi"])
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
                device=info.device, precision=precision, world_size=info.world_size, log_every=cfg.run.log_every,
                last_checkpoint=run.last, skip_nonfinite=cfg.run.skip_nonfinite, stop=run.stop)
            batches.close()
            if train_stats["stopped"]:
                # The epoch is cut short: the checkpoint is of the previous epoch plus the steps
                # taken, with this epoch's pseudo labels and memory, so a resume continues the epoch.
                run.interrupt(epoch, start_step + int(train_stats["batches"]),
                              note=", `--resume` continues from the next step",
                              extra={"pseudo_labels": torch.from_numpy(labels),
                                     "memory": {k: v.cpu() for k, v in memory.state_dict().items()}})
                continue
            scheduler.step()
            record: dict[str, Any] = {"epoch": epoch, **stats, **{k: v for k, v in train_stats.items()
                                                                  if k not in ("stopped", "batches")}}
            if run.eval_due(epoch):
                if info.is_main:
                    metrics = evaluate_model(model, dataset, img_size=cfg.data.img_size, device=info.device,
                                             batch_size=cfg.optim.batch_size, num_workers=cfg.data.num_workers,
                                             precision="fp32", skip_corrupt=cfg.data.skip_corrupt)
                    record.update(run.keep_best(epoch, metrics_record(metrics), model,
                                                selected_on="test set (published)"))
                    logger.info("epoch %d: mAP %.2f%%, rank-1 %.2f%%", epoch, 100 * metrics["mAP"],
                                100 * metrics["cmc"][0])
                run.barrier()
            run.end_epoch(epoch, record)

        exported = run.export_best(selection=f"epoch {state.best_epoch}, the best test mAP among the evaluations "
                                             "(published cluster-contrast model selection)")
        if exported is not None:
            logger.info("best epoch %d (mAP %.2f%%) exported to %s", state.best_epoch, 100 * state.best_mAP,
                        exported)
        return {"best_mAP": state.best_mAP, "best_epoch": state.best_epoch, "metrics": metrics, "model": exported,
                "run_dir": run.dir.path, "stopped": run.stopped}
