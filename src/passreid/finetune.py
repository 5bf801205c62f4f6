"""Supervised fine-tuning: the TransReID recipe with PASS tokens (DESIGN §4).

A PASS backbone (pretrained or not) is wrapped in a :class:`~passreid.models.ReIDModel`
(four tokens fused, BatchNorm necks, bias-free classifier) and trained with
identity cross-entropy on the after-neck feature plus a soft-margin batch-hard
triplet loss on the fused tokens, on P x K identity-balanced batches, by SGD
with a warm-up + cosine learning rate per epoch. :func:`run_finetune` owns a
run directory (DESIGN §8): ``config.yaml``, ``metrics.jsonl``, ``tb/``,
``last.pth`` every epoch, ``best.pth`` on the highest *test* mAP (an extra,
marked as selected on the test set), and at the end ``model.pth`` (published
fine-tuned layout) of the final epoch, as published, with ``model.json`` beside it.

>>> cfg = load_config(FinetuneConfig, "configs/finetune/market_vit_small.yaml", ["data.root=data/market1501"])
>>> result = run_finetune(cfg)            # or: torchrun --nproc-per-node 4 -m passreid train ...
>>> result["best_mAP"], result["model"]
"""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader

from passreid.config import (
    DataConfig,
    ModelConfig,
    RunConfig,
    check_choice,
    check_positive,
)
from passreid.data.datasets import ImageRecord, ReIDDataset
from passreid.data.samplers import RandomIdentitySampler
from passreid.data.loaders import identity_loader
from passreid.runtime import (
    DistInfo,
    agree_across_ranks,
    autocast,
    explain_oom,
    make_grad_scaler,
    resolve_precision,
    unwrap,
)
from passreid.training import optim as training_optim
from passreid.training.run import GracefulStop, MeanStats, RunDir, TrainingRun, describe, loss_is_finite
from passreid.training.schedules import WarmupCosineLR
from passreid.errors import ConfigError
from passreid.losses.reid import ReIDLoss
from passreid.models import ReIDModel

logger = logging.getLogger(__name__)

OPTIMIZERS = ("sgd", "adamw")
EXPORTS = ("final", "best")
SELECTED_ON_TEST = "test set (highest test mAP among the evaluations; optimistic, not a held-out selection)"


# ----------------------------------------------------------------------------- config


@dataclass
class OptimConfig:
    """SGD, P x K batches and the warm-up + cosine schedule of the published recipe.

    ``batch_size`` counts images per step over all processes; ``num_instances``
    is K. The bias group gets ``lr * bias_lr_factor`` and
    ``weight_decay_bias``. The schedule starts at ``warmup_factor * lr`` and
    ends at ``eta_min_factor * lr`` (see :class:`WarmupCosineLR`).
    ``name: adamw`` swaps SGD for AdamW (``momentum`` unused), as the published
    code allows; a randomly initialised ViT trains far faster with it.
    ``cover_all_images: true`` keeps passreid's earlier P x K epoch (every image
    at least once, 10-20% more steps) instead of the published one that drops
    each identity's ``n mod K`` leftover images (see :class:`RandomIdentitySampler`).
    """

    name: str = "sgd"
    lr: float = 4e-4
    bias_lr_factor: float = 2.0
    weight_decay: float = 1e-4
    weight_decay_bias: float = 1e-4
    momentum: float = 0.9
    warmup_epochs: int = 20
    warmup_factor: float = 0.01
    eta_min_factor: float = 0.002
    batch_size: int = 64
    num_instances: int = 4
    cover_all_images: bool = False

    def __post_init__(self) -> None:
        check_choice("optim.name", self.name, OPTIMIZERS)
        for key in ("lr", "bias_lr_factor", "batch_size", "num_instances"):
            check_positive(f"optim.{key}", getattr(self, key))
        for key in ("weight_decay", "weight_decay_bias", "momentum", "warmup_epochs"):
            check_positive(f"optim.{key}", getattr(self, key), allow_zero=True)
        for key in ("warmup_factor", "eta_min_factor"):
            if not 0.0 <= getattr(self, key) <= 1.0:
                raise ConfigError(f"config key 'optim.{key}': {getattr(self, key)} must be in [0, 1]")
        if self.batch_size % self.num_instances:
            raise ConfigError(
                f"config key 'optim.batch_size': {self.batch_size} is not a multiple of "
                f"optim.num_instances = {self.num_instances} (batches are P identities x K images)"
            )


@dataclass
class LossConfig:
    """``id_weight * CE + triplet_weight * triplet``; ``triplet_margin: null`` is the soft margin."""

    id_weight: float = 1.0
    triplet_weight: float = 1.0
    label_smoothing: float = 0.0
    triplet_margin: Optional[float] = None  # noqa: UP045 (OmegaConf reads Optional, not "X | None")

    def __post_init__(self) -> None:
        check_positive("loss.id_weight", self.id_weight, allow_zero=True)
        check_positive("loss.triplet_weight", self.triplet_weight, allow_zero=True)
        if self.id_weight + self.triplet_weight == 0:
            raise ConfigError("config keys 'loss.id_weight' and 'loss.triplet_weight' are both 0: nothing to train")
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ConfigError(f"config key 'loss.label_smoothing': {self.label_smoothing} must be in [0, 1)")
        if self.triplet_margin is not None:
            check_positive("loss.triplet_margin", self.triplet_margin, allow_zero=True)


@dataclass
class TestConfig:
    """Evaluation during training: feature batch size, flipped-image averaging, resize and precision.

    Published: bilinear test resize (training resizes bicubic) and fp32;
    ``interpolation: bicubic`` is passreid's earlier test resize.
    """

    batch_size: int = 256
    flip: bool = False
    interpolation: str = "bilinear"
    precision: str = "fp32"

    def __post_init__(self) -> None:
        from passreid.config import PRECISIONS
        from passreid.data.transforms import INTERPOLATIONS

        check_positive("test.batch_size", self.batch_size)
        check_choice("test.interpolation", self.interpolation, INTERPOLATIONS)
        check_choice("test.precision", self.precision, PRECISIONS)


@dataclass
class FinetuneConfig:
    """Everything ``passreid train`` reads; a recipe YAML sets a few keys over ``configs/finetune/base.yaml``.

    ``compile: true`` runs the training forward pass through ``torch.compile``
    (fewer, fused kernels; the first steps of a run compile). Evaluation stays eager.
    ``export`` picks the exported ``model.pth``: ``final`` (published: the last
    epoch's model) or ``best`` (passreid's earlier choice: the best *test* mAP,
    which makes the reported figure optimistic, as no validation split exists).
    """

    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    run: RunConfig = field(default_factory=lambda: RunConfig(output_dir="runs/finetune"))
    optim: OptimConfig = field(default_factory=OptimConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    test: TestConfig = field(default_factory=TestConfig)
    compile: bool = False
    export: str = "final"

    def __post_init__(self) -> None:
        check_choice("export", self.export, EXPORTS)


# ----------------------------------------------------------------------------- building blocks


def build_model(model_cfg: ModelConfig, *, num_classes: int, img_size: Sequence[int]) -> ReIDModel:
    """The ReID model of ``model_cfg``; ``model.pretrained`` (any supported checkpoint) initialises the backbone.

    Only the backbone is taken from the checkpoint (patch positions resized
    bilinearly to ``img_size`` when it was trained at another size): the necks
    and the classifier belong to this data set's identities and start fresh.
    """
    from passreid.checkpoint import build_reid_model

    model, _ = build_reid_model(
        model_cfg.name, img_size=(int(img_size[0]), int(img_size[1])), depth=model_cfg.depth,
        drop_path_rate=model_cfg.drop_path_rate, pretrained=model_cfg.pretrained, num_classes=num_classes,
        fusion=model_cfg.fusion, neck=model_cfg.neck, test_feature=model_cfg.test_feature, neck_names="finetune",
        ghost_batch=model_cfg.ghost_batch)
    return model


def build_optimizer(model: nn.Module, optim_cfg: OptimConfig, *, device: torch.device) -> torch.optim.Optimizer:
    """SGD (or AdamW) with two groups: weights (``lr``, ``weight_decay``) and
    biases (x ``bias_lr_factor``, ``weight_decay_bias``).

    Group 0 is always the weight group, so ``param_groups[0]["lr"]`` is the
    base learning rate. On CUDA the fused kernel updates all tensors at once.
    """
    return training_optim.build_optimizer(
        model, name=optim_cfg.name, lr=optim_cfg.lr, weight_decay=optim_cfg.weight_decay,
        momentum=optim_cfg.momentum, bias_lr_factor=optim_cfg.bias_lr_factor,
        weight_decay_bias=optim_cfg.weight_decay_bias, fused=device.type == "cuda")


def build_train_loader(
    records: Sequence[ImageRecord], cfg: FinetuneConfig, info: DistInfo
) -> tuple[DataLoader, RandomIdentitySampler]:
    """P x K loader of this rank with the recipe's augmentation (resize, flip, pad + crop, random erasing).

    Each image is augmented from the seed of its position in the epoch
    (:class:`~passreid.data.seeding.PositionSeeds`), and the loader has its own
    generator, so creating an epoch's iterator takes nothing from the global torch
    RNG: a run stopped inside an epoch resumes to the same weights, with any
    ``num_workers`` (the augmentation does not depend on it).
    """
    unit = cfg.optim.num_instances * info.world_size
    if cfg.optim.batch_size % unit:
        raise ConfigError(
            f"config key 'optim.batch_size': {cfg.optim.batch_size} must split into {info.world_size} processes "
            f"of whole identities (a multiple of num_instances x processes = {unit})"
        )
    return identity_loader(  # type: ignore[return-value]
        records, img_size=cfg.data.img_size, mean=cfg.data.pixel_mean, std=cfg.data.pixel_std,
        color_jitter=cfg.data.color_jitter, erasing=cfg.data.erasing, batch_size=cfg.optim.batch_size,
        num_instances=cfg.optim.num_instances, seed=cfg.run.seed, rank=info.rank, world_size=info.world_size,
        cover_all=cfg.optim.cover_all_images, num_workers=cfg.data.num_workers, skip_corrupt=cfg.data.skip_corrupt,
        pin_memory=info.device.type == "cuda")


# ----------------------------------------------------------------------------- one epoch


def train_one_epoch(
    model: nn.Module,
    loader: DataLoader,
    criterion: ReIDLoss,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    *,
    epoch: int,
    device: torch.device,
    precision: str = "fp32",
    max_steps: int = 0,
    stop: GracefulStop | None = None,
    skip_nonfinite: bool = False,
    last_checkpoint: Path | None = None,
    run_dir: RunDir | None = None,
    global_step: int = 0,
    log_every: int = 50,
    progress: bool = False,
) -> dict[str, float]:
    """One pass over ``loader`` (at most ``max_steps`` steps when > 0).

    Returns averages over the steps taken of ``loss`` (rank-averaged), of every term the
    criterion reports as ``NAME_loss`` (``id_loss``, ``triplet_loss``; a new term needs
    no change here) and of ``acc`` (classifier accuracy on the batch), plus ``lr`` (weight group),
    ``steps``, ``skipped`` (non-finite steps skipped), ``images_per_s`` (all
    ranks) and ``stopped`` (1.0 if a stop request, agreed by all ranks, ended
    the pass). Loss averages are absent when no step was taken.
    """
    model.train()
    world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    total = len(loader) if max_steps <= 0 else min(len(loader), max_steps)
    sums = MeanStats()
    steps = skipped = 0
    stopped = False
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=total, desc=f"epoch {epoch}", unit="step", leave=False, dynamic_ncols=True)
    start = time.perf_counter()
    try:
        for images, pids, _, _ in itertools.islice(loader, total):
            images = images.to(device, non_blocking=True)
            pids = pids.to(device, non_blocking=True)
            with autocast(device, precision):
                out = model(images)
                loss, parts = criterion(out.logits, out.feat, pids)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            # One host sync per step, after the backward pass is queued: the rank-averaged
            # loss, the loss terms, the accuracy and the stop flag come back together.
            loss_value, stop_now = agree_across_ranks(loss, stop)
            terms = {"loss": loss_value, **{f"{name}_loss": value for name, value in parts.items()}}
            if out.logits is not None:
                terms["acc"] = (out.logits.argmax(dim=1) == pids).float().mean()
            values = dict(zip(terms, torch.stack([t.detach().float() for t in terms.values()]).double().cpu()))
            if loss_is_finite(values["loss"], step=steps + skipped + 1, epoch=epoch,
                              last_checkpoint=last_checkpoint, skip=skip_nonfinite):
                scaler.step(optimizer)
                scaler.update()
                sums.add(values)
                steps += 1
                if run_dir is not None and run_dir.is_main and (global_step + steps) % log_every == 0:
                    scalars = {k: float(v) for k, v in values.items()}
                    run_dir.add_scalars({**scalars, "lr": optimizer.param_groups[0]["lr"]}, global_step + steps,
                                        prefix="train/")
                    if bar is None:
                        logger.info("epoch %d step %d/%d %s", epoch, steps + skipped, total, describe(scalars))
                if bar is not None:
                    bar.set_postfix({k: f"{float(v):.3f}" for k, v in values.items() if k in ("loss", "acc")})
            else:
                optimizer.zero_grad(set_to_none=True)  # drop the non-finite gradients of the skipped step
                skipped += 1
            if bar is not None:
                bar.update(1)
            if stop_now:
                stopped = steps + skipped < total
                break
    finally:
        if bar is not None:
            bar.close()  # also when a step raises: the error is not printed over it
    seconds = time.perf_counter() - start
    stats: dict[str, float] = {
        "lr": float(optimizer.param_groups[0]["lr"]),
        "steps": float(steps),
        "skipped": float(skipped),
        "stopped": float(stopped),
        "images_per_s": (steps + skipped) * loader.batch_size * world / seconds if seconds > 0 else 0.0,
    }
    stats.update(sums.means())
    return stats


# ----------------------------------------------------------------------------- the run


def run_finetune(cfg: FinetuneConfig, resume: str | None = None, force_resume: bool = False,
                 progress: bool = False) -> dict[str, Any]:
    """Fine-tune a ReID model on ``cfg.data`` and evaluate it; one process or one per GPU under ``torchrun``.

    Args:
        cfg: the recipe.
        resume: None for a fresh run; ``""`` for the run directory's ``last.pth``; or a
            checkpoint path. Model, optimizer, scaler, schedule, every rank's RNG, the
            sampler position and the best mAP so far are restored, so a resumed run
            computes exactly what the uninterrupted run would have, from an epoch
            boundary or inside an epoch, with any ``data.num_workers`` (on the same
            hardware and process count).
        force_resume: resume even if the config or the data set fingerprint changed.
        progress: show a progress bar on rank 0 (the CLI does).

    Returns:
        ``{"best_mAP", "best_epoch", "metrics" (last evaluation: the final epoch's), "epoch" (last
        completed), "step" (steps done in the next epoch when stopped inside it), "model" (exported
        ``model.pth``, the final epoch's unless ``export: best``; None on other ranks and when
        stopped early), "run_dir", "stopped"}``. ``best_*`` are selected on the test set.

    A SIGTERM/SIGINT makes every rank stop after the current step: ``last.pth`` then
    records the position inside the epoch and ``--resume`` continues from the next
    batch. A non-finite loss raises :class:`~passreid.errors.TrainingError` naming the
    step and the last good checkpoint (or skips the step with ``run.skip_nonfinite``).
    """
    from passreid.data.datasets import build_dataset, dataset_fingerprint

    with TrainingRun(cfg, resume=resume, force=force_resume) as run:
        info = run.info
        dataset: ReIDDataset = build_dataset(cfg.data.dataset, cfg.data.root)
        run.check_data(dataset_fingerprint(dataset.train))
        precision = resolve_precision(cfg.run.precision, info.device)
        model = build_model(cfg.model, num_classes=dataset.num_train_pids, img_size=cfg.data.img_size).to(info.device)
        optimizer = build_optimizer(model, cfg.optim, device=info.device)
        scheduler = WarmupCosineLR(optimizer, base_lr=cfg.optim.lr, epochs=cfg.run.epochs,
                                   warmup_epochs=cfg.optim.warmup_epochs, warmup_factor=cfg.optim.warmup_factor,
                                   eta_min_factor=cfg.optim.eta_min_factor)
        scaler = make_grad_scaler(precision, info.device)
        criterion = ReIDLoss(id_weight=cfg.loss.id_weight, triplet_weight=cfg.loss.triplet_weight,
                             label_smoothing=cfg.loss.label_smoothing, triplet_margin=cfg.loss.triplet_margin)
        loader, sampler = build_train_loader(dataset.train, cfg, info)
        state = run.restore(model=model, optimizer=optimizer, scheduler=scheduler, scaler=scaler)
        train_model = run.wrap(model)
        if cfg.compile:
            train_model = torch.compile(train_model)  # type: ignore[assignment]
        if info.is_main:
            logger.info("fine-tuning %s (%s, %d identities) for %d epochs on %d x %s, %s, batch %d = %d x %d",
                        cfg.model.name, cfg.model.pretrained or "random init",
                        dataset.num_train_pids, cfg.run.epochs, info.world_size, info.device, precision,
                        cfg.optim.batch_size, cfg.optim.batch_size // cfg.optim.num_instances,
                        cfg.optim.num_instances)

        for epoch in run.epochs():
            sampler.set_epoch(epoch, start_batch=state.step)
            scheduler.set_epoch(epoch)
            budget = cfg.run.max_iters_per_epoch - state.step if cfg.run.max_iters_per_epoch else 0
            with explain_oom(cfg.optim.batch_size // info.world_size):
                stats = train_one_epoch(
                    train_model, loader, criterion, optimizer, scaler, epoch=epoch, device=info.device,
                    precision=precision, max_steps=budget, stop=run.stop, skip_nonfinite=cfg.run.skip_nonfinite,
                    last_checkpoint=run.last, run_dir=run.dir, global_step=state.global_step,
                    log_every=cfg.run.log_every, progress=progress and info.is_main,
                )
            done = int(stats["steps"] + stats["skipped"])
            state.global_step += done
            if stats["stopped"]:
                run.interrupt(epoch, state.step + done)
                continue
            record: dict[str, Any] = {"epoch": epoch, **{k: v for k, v in stats.items() if k != "stopped"}}
            if info.is_main and "loss" in stats:
                logger.info("epoch %d/%d: %s, %.0f images/s", epoch, cfg.run.epochs,
                            describe({k: v for k, v in stats.items() if k != "images_per_s"}),
                            stats["images_per_s"])
            if run.eval_due(epoch):
                if info.is_main:
                    record.update(_evaluate(run, unwrap(model), dataset, cfg, epoch))
                run.barrier()
            run.end_epoch(epoch, record)

        if cfg.export == "final":
            model_path = run.export_final(unwrap(model).state_dict(), selection=f"final epoch ({state.epoch})")
            if model_path is not None:
                logger.info("exported the final epoch's model %s (best test mAP %.2f%% at epoch %d, in %s)",
                            model_path, 100 * state.best_mAP, state.best_epoch, run.dir.best)
        else:
            model_path = run.export_best(selection=f"epoch {state.best_epoch}, selected on the {SELECTED_ON_TEST}")
            if model_path is not None:
                logger.info("best test mAP %.2f%% at epoch %d; exported %s (selected on the test set)",
                            100 * state.best_mAP, state.best_epoch, model_path)
        return {"best_mAP": state.best_mAP, "best_epoch": state.best_epoch, "metrics": state.last_metrics,
                "epoch": state.epoch, "step": state.step, "model": model_path, "run_dir": run.dir.path,
                "stopped": run.stopped}


def _evaluate(run: TrainingRun, model: nn.Module, dataset: ReIDDataset, cfg: FinetuneConfig,
              epoch: int) -> dict[str, float]:
    """Evaluate on query/gallery, keep ``best.pth`` on a new best test mAP (marked ``selected_on`` the
    test set); returns the metrics record."""
    from passreid.features import evaluate_model, metrics_record

    metrics = evaluate_model(model, dataset, img_size=cfg.data.img_size, device=run.info.device,
                             batch_size=cfg.test.batch_size, num_workers=cfg.data.num_workers, flip=cfg.test.flip,
                             precision=cfg.test.precision, interpolation=cfg.test.interpolation,
                             skip_corrupt=cfg.data.skip_corrupt)
    record = run.keep_best(epoch, metrics_record(metrics), model, selected_on=SELECTED_ON_TEST)
    logger.info("epoch %d: mAP %.2f%% R1 %.2f%% (best %.2f%% at epoch %d)", epoch, 100 * record["mAP"],
                100 * record.get("rank1", 0.0), 100 * run.state.best_mAP, run.state.best_epoch)
    return record
