"""PASS pretraining: part-aware DINO self-distillation on unlabeled person crops (DESIGN §3).

A student PASS ViT with four projection heads (cls, part1..3) learns to match
an EMA teacher: the teacher sees the two global views of each image, the
student sees them and nine local crops, three from each horizontal band, where
band k is encoded with part token k. :func:`run_pretrain` owns a run directory
(DESIGN §8): ``config.yaml``, ``metrics.jsonl``, ``tb/``, ``last.pth`` every
epoch (``model`` = ``{"student", "teacher", "centers"}``) and, at the end,
``backbone.pth`` (the teacher backbone under the PASS names) with ``backbone.json``.

>>> cfg = load_config(PretrainConfig, "configs/pretrain/pass_vit_small.yaml", ["data.root=data/LUPerson"])
>>> run_dir = run_pretrain(cfg)     # or: torchrun --nproc-per-node 8 -m passreid pretrain ...
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.utils.data import DataLoader

from passreid.config import RunConfig, check_choice, check_img_size, check_positive
from passreid.data.loaders import folder_loader
from passreid.data.multicrop import MultiCrop, MultiCropSpec, build_multicrop
from passreid.runtime import (
    DistInfo,
    agree_across_ranks,
    autocast,
    explain_oom,
    make_grad_scaler,
    resolve_precision,
    unwrap,
)
from passreid.checkpoint import load_checkpoint
from passreid.errors import ConfigError
from passreid.losses.pass_loss import PASSLoss
from passreid.data.samplers import EpochSampler
from passreid.export import export_backbone
from passreid.models.pretrain_net import PassPretrainNet, build_pretrain_networks, last_layer_params
from passreid.monitor import RetrievalMonitor, collapse_warning, describe_monitor
from passreid.training.optim import clip_gradients, ema_update, param_groups
from passreid.training.run import GracefulStop, MeanStats, RunDir, TrainingRun, loss_is_finite
from passreid.training.schedules import PretrainSchedule

logger = logging.getLogger(__name__)

MODES = ("pass", "dino")


# ----------------------------------------------------------------------------- config


@dataclass
class PretrainDataConfig:
    """The unlabeled image folder and how it is read.

    ``index_file`` (relative paths are taken from ``root``) lists the images once
    so that later runs need not walk millions of files; ``limit`` keeps the first N
    images, ``filter_list`` only those it names (0 / "" : off).
    ``img_size`` is the global-view size, i.e. the backbone's input size.
    ``batch_size`` is the total over all processes (the published 1024 for
    ViT-S is 8 GPUs x 128); the learning rate scales with it.
    """

    root: str = "data/LUPerson"
    index_file: str = ""
    limit: int = 0
    filter_list: str = ""
    img_size: list[int] = field(default_factory=lambda: [256, 128])
    batch_size: int = 1024
    num_workers: int = 8
    skip_corrupt: bool = False

    def __post_init__(self) -> None:
        check_img_size("data.img_size", self.img_size)
        check_positive("data.batch_size", self.batch_size)
        check_positive("data.num_workers", self.num_workers, allow_zero=True)
        check_positive("data.limit", self.limit, allow_zero=True)


@dataclass
class AugConfig:
    """Multi-crop (DESIGN §3). ``backend``: ``gpu`` makes the views on the training device from uint8
    images decoded at their own size in the workers (an image larger than ``decode_size`` [H, W] is first
    shrunk, keeping its aspect ratio, to fit inside it: this bounds the padded batch and the resampling
    memory); ``cpu`` makes them with PIL in the workers from the image as it is.

    ``jitter`` (brightness, contrast, saturation, hue), ``jitter_p`` and ``gray_p`` are the colour
    augmentation, the published DINO values by default; ``cast`` adds a per-channel gain jitter
    (each view's R, G, B times a factor in [1 - cast, 1 + cast]; 0 as published)."""

    backend: str = "gpu"
    decode_size: list[int] = field(default_factory=lambda: [512, 256])
    local_size: list[int] = field(default_factory=lambda: [128, 64])
    global_scale: list[float] = field(default_factory=lambda: [0.4, 1.0])
    local_scale: list[float] = field(default_factory=lambda: [0.1, 0.8])
    local_crops_per_band: int = 3
    jitter: list[float] = field(default_factory=lambda: [0.4, 0.4, 0.2, 0.1])
    jitter_p: float = 0.8
    gray_p: float = 0.2
    cast: float = 0.0

    def __post_init__(self) -> None:
        check_choice("aug.backend", self.backend, ("cpu", "gpu"))
        check_img_size("aug.local_size", self.local_size)
        if len(self.decode_size) != 2 or min(self.decode_size) < 1:
            raise ConfigError(f"config key 'aug.decode_size': {self.decode_size} must be [height, width]")
        for key, value in (("aug.global_scale", self.global_scale), ("aug.local_scale", self.local_scale)):
            if len(value) != 2 or not 0 < value[0] <= value[1] <= 1:
                raise ConfigError(f"config key {key!r}: {value} must be [low, high] with 0 < low <= high <= 1")
        check_positive("aug.local_crops_per_band", self.local_crops_per_band)
        if len(self.jitter) != 4 or min(self.jitter) < 0 or self.jitter[3] > 0.5:
            raise ConfigError(f"config key 'aug.jitter': {self.jitter} must be [brightness, contrast, saturation, "
                              f"hue] >= 0 with hue <= 0.5")
        for key in ("jitter_p", "gray_p"):
            if not 0.0 <= getattr(self, key) <= 1.0:
                raise ConfigError(f"config key 'aug.{key}': {getattr(self, key)} must be a probability in [0, 1]")
        if not 0.0 <= self.cast < 1.0:
            raise ConfigError(f"config key 'aug.cast': {self.cast} must be in [0, 1)")


@dataclass
class PretrainModelConfig:
    """Backbone and projection heads. ``mode``: ``pass`` (4 heads, banded local crops) or ``dino``
    (the ablation: class token only, local crops from the whole image). ``init``: a backbone checkpoint
    (a passreid export, a published PASS checkpoint, a pretraining ``last.pth``) that student and
    teacher start from, to continue pretraining on new data; the heads start fresh. A resumed run
    takes everything from its checkpoint instead."""

    name: str = "pass_vit_small"
    depth: int = 12
    drop_path_rate: float = 0.1
    mode: str = "pass"
    out_dim: int = 65536
    hidden_dim: int = 2048
    bottleneck_dim: int = 256
    norm_last_layer: bool = True
    init: str = ""

    def __post_init__(self) -> None:
        check_choice("model.mode", self.mode, MODES)
        for key in ("depth", "out_dim", "hidden_dim", "bottleneck_dim"):
            check_positive(f"model.{key}", getattr(self, key))
        if not 0.0 <= self.drop_path_rate < 1.0:
            raise ConfigError(f"config key 'model.drop_path_rate': {self.drop_path_rate} must be in [0, 1)")


@dataclass
class PretrainLossConfig:
    student_temp: float = 0.1
    teacher_temp: float = 0.04
    warmup_teacher_temp: float = 0.04
    warmup_teacher_temp_epochs: int = 0
    center_momentum: float = 0.9

    def __post_init__(self) -> None:
        for key in ("student_temp", "teacher_temp", "warmup_teacher_temp"):
            check_positive(f"loss.{key}", getattr(self, key))
        check_positive("loss.warmup_teacher_temp_epochs", self.warmup_teacher_temp_epochs, allow_zero=True)
        if not 0.0 <= self.center_momentum < 1.0:
            raise ConfigError(f"config key 'loss.center_momentum': {self.center_momentum} must be in [0, 1)")


@dataclass
class PretrainOptimConfig:
    """AdamW with the DINO schedules. ``lr`` is for a total batch of 256 (scaled linearly)."""

    lr: float = 5e-4
    min_lr: float = 1e-6
    warmup_epochs: int = 10
    weight_decay: float = 0.04
    weight_decay_end: float = 0.4
    clip_grad: float = 3.0
    freeze_last_layer_epochs: int = 1
    momentum_teacher: float = 0.996
    momentum_teacher_end: float = 1.0

    def __post_init__(self) -> None:
        check_positive("optim.lr", self.lr)
        for key in ("min_lr", "warmup_epochs", "weight_decay", "weight_decay_end", "clip_grad",
                    "freeze_last_layer_epochs"):
            check_positive(f"optim.{key}", getattr(self, key), allow_zero=True)
        for key in ("momentum_teacher", "momentum_teacher_end"):
            if not 0.0 <= getattr(self, key) <= 1.0:
                raise ConfigError(f"config key 'optim.{key}': {getattr(self, key)} must be in [0, 1]")


@dataclass
class PretrainEvalConfig:
    """The retrieval monitor (:mod:`passreid.monitor`): with ``dataset`` and ``root`` set (any labelled
    ReID layout), the teacher backbone's frozen features are evaluated before training and every
    ``every`` epochs and at the end: mAP / R1 on query/gallery, k-NN identity accuracy on the train split."""

    dataset: str = ""
    root: str = ""
    every: int = 1
    batch_size: int = 128
    knn_k: int = 20

    def __post_init__(self) -> None:
        if bool(self.dataset) != bool(self.root):
            raise ConfigError(f"config keys 'eval.dataset' and 'eval.root' go together; got dataset="
                              f"{self.dataset!r}, root={self.root!r}")
        for key in ("every", "batch_size", "knn_k"):
            check_positive(f"eval.{key}", getattr(self, key))


@dataclass
class PretrainConfig:
    data: PretrainDataConfig = field(default_factory=PretrainDataConfig)
    aug: AugConfig = field(default_factory=AugConfig)
    model: PretrainModelConfig = field(default_factory=PretrainModelConfig)
    loss: PretrainLossConfig = field(default_factory=PretrainLossConfig)
    optim: PretrainOptimConfig = field(default_factory=PretrainOptimConfig)
    eval: PretrainEvalConfig = field(default_factory=PretrainEvalConfig)
    run: RunConfig = field(default_factory=lambda: RunConfig(output_dir="runs/pretrain", epochs=100))

    def __post_init__(self) -> None:
        if self.optim.warmup_epochs > self.run.epochs:
            raise ConfigError(f"config key 'optim.warmup_epochs': {self.optim.warmup_epochs} is more than "
                              f"run.epochs = {self.run.epochs}")

    def multicrop_spec(self) -> MultiCropSpec:
        return MultiCropSpec(
            global_size=(self.data.img_size[0], self.data.img_size[1]),
            local_size=(self.aug.local_size[0], self.aug.local_size[1]),
            global_scale=(self.aug.global_scale[0], self.aug.global_scale[1]),
            local_scale=(self.aug.local_scale[0], self.aug.local_scale[1]),
            local_per_band=self.aug.local_crops_per_band,
            banded=self.model.mode == "pass",
            jitter=(self.aug.jitter[0], self.aug.jitter[1], self.aug.jitter[2], self.aug.jitter[3]),
            jitter_p=self.aug.jitter_p,
            gray_p=self.aug.gray_p,
            cast=self.aug.cast,
        )


# ----------------------------------------------------------------------------- networks


def build_networks(model_cfg: PretrainModelConfig, img_size: Sequence[int]) -> tuple[PassPretrainNet, PassPretrainNet]:
    """Student (drop path) and teacher (no drop path, no gradient, same initial weights) of ``model_cfg``,
    both backbones loaded from ``model_cfg.init`` when it is set."""
    student, teacher = build_pretrain_networks(
        model_cfg.name, img_size=(img_size[0], img_size[1]), depth=model_cfg.depth,
        drop_path_rate=model_cfg.drop_path_rate, part_aware=model_cfg.mode == "pass", out_dim=model_cfg.out_dim,
        hidden_dim=model_cfg.hidden_dim, bottleneck_dim=model_cfg.bottleneck_dim,
        norm_last_layer=model_cfg.norm_last_layer)
    if model_cfg.init:
        if not Path(model_cfg.init).is_file():
            raise ConfigError(f"config key 'model.init': {model_cfg.init} is not a file")
        report = load_checkpoint(student.backbone, model_cfg.init)
        teacher.backbone.load_state_dict(student.backbone.state_dict())
        logger.info("student and teacher backbones start from %s (%s)", model_cfg.init, report.summary())
    return student, teacher




# ----------------------------------------------------------------------------- data


def build_loader(cfg: PretrainConfig, info: DistInfo, multicrop: MultiCrop) -> tuple[DataLoader, EpochSampler,
                                                                                     dict[str, Any]]:
    """This rank's loader over the image folder, its sampler, and the folder's fingerprint."""
    data = cfg.data
    if data.batch_size % info.world_size:
        raise ConfigError(f"config key 'data.batch_size': {data.batch_size} (total) does not split into "
                          f"{info.world_size} processes")
    loader, sampler, fingerprint = folder_loader(
        data.root, transform=multicrop.image_transform(), collate_fn=multicrop.collate,
        batch_size=data.batch_size // info.world_size, seed=cfg.run.seed, rank=info.rank, world_size=info.world_size,
        index_file=data.index_file, limit=data.limit, filter_list=data.filter_list, num_workers=data.num_workers,
        skip_corrupt=data.skip_corrupt, pin_memory=info.device.type == "cuda")
    if sampler.batches_per_epoch == 0:
        raise ConfigError(f"config key 'data.batch_size': {data.batch_size} is more than the {sampler.num_samples} "
                          f"images under {data.root}")
    return loader, sampler, fingerprint


# ----------------------------------------------------------------------------- one epoch


@dataclass
class PretrainState:
    """Everything a training step touches; built once by :func:`run_pretrain` (or a test/benchmark)."""

    student: nn.Module
    teacher: PassPretrainNet
    loss_fn: PASSLoss
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    schedule: PretrainSchedule
    multicrop: MultiCrop
    device: torch.device
    precision: str = "fp32"
    clip_grad: float = 3.0
    freeze_last_layer_epochs: int = 1
    skip_nonfinite: bool = False
    student_params: list[Tensor] = field(init=False)
    teacher_params: list[Tensor] = field(init=False)
    trainable: list[Tensor] = field(init=False)
    last_layer: list[Tensor] = field(init=False)

    def __post_init__(self) -> None:
        student = unwrap(self.student)
        self.student_params = list(student.parameters())
        self.teacher_params = list(self.teacher.parameters())
        self.trainable = [p for p in self.student_params if p.requires_grad]
        self.last_layer = last_layer_params(student)


class StepResult(NamedTuple):
    """What one step reports: detached loss statistics on the device (empty for a skipped
    non-finite step), the scheduled values used, and whether any rank asked to stop."""

    stats: dict[str, Tensor]
    scalars: dict[str, float]
    stop: bool


def train_step(state: PretrainState, batch: Any, epoch: int, it: int, *,
               last_checkpoint: Path | None = None, stop: GracefulStop | None = None) -> StepResult:
    """One optimisation step on a loader batch (1-based ``epoch``, global iteration ``it``)."""
    s = state
    scalars = {"lr": s.schedule.lr(it), "wd": s.schedule.wd(it), "momentum": s.schedule.teacher_momentum(it),
               "teacher_temp": s.loss_fn.teacher_temperature(it)}
    for i, group in enumerate(s.optimizer.param_groups):
        group["lr"] = scalars["lr"]
        if i == 0:  # the decayed group; the other keeps weight decay 0
            group["weight_decay"] = scalars["wd"]
    views = s.multicrop.views(batch, s.device)
    with autocast(s.device, s.precision):
        with torch.no_grad():
            teacher_out = s.teacher(views.global_views)  # only the global views pass through the teacher
        student_out = s.student(views.global_views, views.local_views)
        out = s.loss_fn(student_out, teacher_out, it)
    loss, stop_now = agree_across_ranks(out.loss, stop)
    s.optimizer.zero_grad(set_to_none=True)
    if not loss_is_finite(loss, step=it, epoch=epoch, last_checkpoint=last_checkpoint, skip=s.skip_nonfinite):
        return StepResult({}, scalars, stop_now)
    s.loss_fn.update_center(teacher_out)
    s.scaler.scale(out.loss).backward()
    s.scaler.unscale_(s.optimizer)
    if epoch <= s.freeze_last_layer_epochs:
        # Moving the prototypes while the rest is still random lets the training collapse (DINO).
        for p in s.last_layer:
            p.grad = None
    if s.clip_grad > 0:
        clip_gradients(s.trainable, s.clip_grad)
    s.scaler.step(s.optimizer)
    s.scaler.update()
    ema_update(s.teacher_params, s.student_params, scalars["momentum"])
    return StepResult({"loss": loss, **out.stats}, scalars, stop_now)


def train_one_epoch(
    state: PretrainState,
    loader: DataLoader,
    epoch: int,
    *,
    start_step: int = 0,
    max_steps: int = 0,
    stop: GracefulStop | None = None,
    run_dir: RunDir | None = None,
    log_every: int = 50,
    progress: bool = False,
) -> dict[str, float]:
    """One (rest of an) epoch: at most ``max_steps`` steps (0: up to ``iters_per_epoch``) from ``start_step``.

    Args:
        state: the models, optimiser and schedules.
        loader: this rank's loader, already positioned at ``start_step``.
        epoch: 1-based epoch (the last layer is frozen while ``epoch <= freeze_last_layer_epochs``).
        run_dir: TensorBoard every ``log_every`` steps (loss per term, lr, wd, momentum,
            teacher temperature and entropy, images/s).
        progress: a progress bar with images/s (the CLI's).

    Returns:
        averages over the steps taken (``loss``, ``loss_cls``, ``loss_part1..3``,
        ``teacher_entropy``), the last ``lr``, ``wd``, ``momentum``, ``teacher_temp``,
        and ``steps``, ``skipped``, ``images_per_s`` (all ranks), ``stopped`` (1.0 if
        a stop request ended the epoch early).
    """
    state.student.train()
    world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    ipe = state.schedule.iters_per_epoch
    total = ipe - start_step if max_steps <= 0 else min(ipe - start_step, max_steps)
    images_per_step = loader.batch_size * world
    sums = MeanStats()  # summed on the device: no synchronisation per step
    scalars: dict[str, float] = {}
    steps = skipped = 0
    stopped = False
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=total, desc=f"epoch {epoch}", unit="step", leave=False, dynamic_ncols=True)
    start = window = time.perf_counter()
    window_steps = 0
    last_checkpoint = run_dir.last if run_dir is not None else None
    try:
        for i, batch in enumerate(loader):
            if i >= total:
                break
            it = (epoch - 1) * ipe + start_step + i
            result = train_step(state, batch, epoch, it, last_checkpoint=last_checkpoint, stop=stop)
            scalars = result.scalars
            if not result.stats:
                skipped += 1
            else:
                steps += 1
                window_steps += 1
                sums.add({key: value.float() for key, value in result.stats.items()})
                if (it + 1) % log_every == 0:  # reading the values waits for the device: only every log_every steps
                    now = time.perf_counter()
                    rate = window_steps * images_per_step / max(now - window, 1e-9)
                    values = {k: float(v) for k, v in result.stats.items()}
                    if run_dir is not None:
                        run_dir.add_scalars({**values, **scalars, "images_per_s": rate}, it + 1, prefix="train/")
                    if bar is None:
                        logger.info("epoch %d step %d/%d loss %.4f lr %.2e %.0f img/s", epoch, start_step + i + 1,
                                    ipe, values["loss"], scalars["lr"], rate)
                    else:
                        bar.set_postfix(loss=f"{values['loss']:.3f}", img_s=f"{rate:.0f}")
                    window, window_steps = now, 0
            if bar is not None:
                bar.update(1)
            if result.stop:
                stopped = i + 1 < total
                break
    finally:
        if bar is not None:
            bar.close()  # also when a step raises: the error is not printed over it
    seconds = time.perf_counter() - start
    out = sums.means()
    out.update(scalars)
    out.update(steps=float(steps), skipped=float(skipped), stopped=float(stopped),
               images_per_s=(steps + skipped) * images_per_step / seconds if seconds > 0 else 0.0)
    return out


# ----------------------------------------------------------------------------- the run


def build_monitor(cfg: PretrainConfig, device: torch.device) -> RetrievalMonitor | None:
    """The frozen-feature monitor on ``cfg.eval``'s labelled set, or None when it is not set."""
    if not cfg.eval.dataset:
        return None
    from passreid.data.datasets import build_dataset

    dataset = build_dataset(cfg.eval.dataset, cfg.eval.root)
    return RetrievalMonitor(dataset, cfg.data.img_size, device=device, batch_size=cfg.eval.batch_size,
                            knn_k=cfg.eval.knn_k)


def run_pretrain(cfg: PretrainConfig, resume: str | None = None, force_resume: bool = False,
                 progress: bool = False) -> dict[str, Any]:
    """PASS (or plain DINO) pretraining on ``cfg.data.root``; one process or one per GPU under ``torchrun``.

    Args:
        cfg: the recipe.
        resume: None for a fresh run; ``""`` for the run directory's ``last.pth``; or a
            checkpoint path. Student, teacher, centers, optimiser, scaler, every rank's
            RNG and the position in the epoch are restored: a resumed run computes what
            the uninterrupted run would have (same hardware and process count), from an
            epoch boundary or inside an epoch, with either backend and any
            ``data.num_workers`` (the PIL views of an image are drawn from the seed of its
            position in the epoch, :class:`~passreid.data.seeding.PositionSeeds`).
        force_resume: resume even if the config or the data set changed.
        progress: progress bar on rank 0.

    Returns:
        ``{"run_dir", "epoch" (last completed), "backbone" (exported path or None
        if stopped early), "stopped", "metrics" (last epoch's record)}``.
    """
    with TrainingRun(cfg, resume=resume, force=force_resume) as run:
        info = run.info
        if info.device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.benchmark = True

        precision = resolve_precision(cfg.run.precision, info.device)
        multicrop = build_multicrop(cfg.aug.backend, cfg.multicrop_spec(), tuple(cfg.aug.decode_size))
        loader, sampler, fingerprint = build_loader(cfg, info, multicrop)
        run.check_data(fingerprint)
        ipe = sampler.batches_per_epoch
        if cfg.run.max_iters_per_epoch:
            ipe = min(ipe, cfg.run.max_iters_per_epoch)

        # A resumed run's checkpoint holds the weights: model.init is not read again (nor needed any more).
        model_cfg = dataclasses.replace(cfg.model, init="") if run.resumed else cfg.model
        student, teacher = build_networks(model_cfg, cfg.data.img_size)
        student, teacher = student.to(info.device), teacher.to(info.device)
        loss_fn = PASSLoss(cfg.model.out_dim, num_tokens=student.head.num_tokens,
                           student_temp=cfg.loss.student_temp, teacher_temp=cfg.loss.teacher_temp,
                           warmup_teacher_temp=cfg.loss.warmup_teacher_temp,
                           warmup_teacher_temp_iters=cfg.loss.warmup_teacher_temp_epochs * ipe,
                           center_momentum=cfg.loss.center_momentum).to(info.device)
        optimizer = torch.optim.AdamW(param_groups(student), lr=0.0, fused=info.device.type == "cuda")
        scaler = make_grad_scaler(precision, info.device)
        schedule = PretrainSchedule(
            iters_per_epoch=ipe, epochs=cfg.run.epochs, peak_lr=cfg.optim.lr * cfg.data.batch_size / 256,
            min_lr=cfg.optim.min_lr, warmup_epochs=cfg.optim.warmup_epochs, weight_decay=cfg.optim.weight_decay,
            weight_decay_end=cfg.optim.weight_decay_end, momentum=cfg.optim.momentum_teacher,
            momentum_end=cfg.optim.momentum_teacher_end,
        )
        # The checkpoint's "model" is {"student", "teacher", "centers"}, the published layout.
        progress_state = run.restore(model={"student": student, "teacher": teacher, "centers": loss_fn},
                                     optimizer=optimizer, scaler=scaler)
        state = PretrainState(student=run.wrap(student), teacher=teacher, loss_fn=loss_fn, optimizer=optimizer,
                              scaler=scaler, schedule=schedule, multicrop=multicrop, device=info.device,
                              precision=precision, clip_grad=cfg.optim.clip_grad,
                              freeze_last_layer_epochs=cfg.optim.freeze_last_layer_epochs,
                              skip_nonfinite=cfg.run.skip_nonfinite)
        if info.is_main:
            logger.info("%s pretraining %s (depth %d) on %d images for %d epochs x %d steps, %d x %s, %s, "
                        "batch %d, peak lr %.2e, views made on %s by the %s backend",
                        cfg.model.mode.upper(), cfg.model.name, cfg.model.depth, len(loader.dataset), cfg.run.epochs,
                        ipe, info.world_size, info.device, precision, cfg.data.batch_size, schedule.peak_lr,
                        "the device" if cfg.aug.backend == "gpu" else "the loader workers", cfg.aug.backend)

        monitor = build_monitor(cfg, info.device) if info.is_main else None
        if monitor is not None and not run.resumed:
            # Epoch 0: the random-init teacher, the baseline the monitor's later epochs are read against.
            before = monitor(teacher.backbone, cfg.model.mode)
            run.dir.log_metrics({"epoch": 0, **before})
            logger.info("epoch 0 (before training): frozen %s", describe_monitor(before))

        last_record: dict[str, Any] = {}
        for epoch in run.epochs():
            start_step = progress_state.step
            sampler.set_epoch(epoch, start_batch=start_step)
            with explain_oom(cfg.data.batch_size // info.world_size):
                stats = train_one_epoch(state, loader, epoch, start_step=start_step,
                                        max_steps=ipe - start_step, stop=run.stop, run_dir=run.dir,
                                        log_every=cfg.run.log_every, progress=progress and info.is_main)
            if stats["stopped"]:
                run.interrupt(epoch, start_step + int(stats["steps"] + stats["skipped"]))
                continue
            last_record = {"epoch": epoch, **{k: v for k, v in stats.items() if k != "stopped"}}
            if monitor is not None and (epoch % cfg.eval.every == 0 or epoch == cfg.run.epochs):
                last_record.update(monitor(teacher.backbone, cfg.model.mode))
            run.end_epoch(epoch, last_record)
            if info.is_main:
                logger.info("epoch %d: loss %.4f (cls %.4f) teacher entropy %.3f, %.0f img/s%s", epoch,
                            stats.get("loss", math.nan), stats.get("loss_cls", math.nan),
                            stats.get("teacher_entropy", math.nan), stats["images_per_s"],
                            f"; frozen {describe_monitor(last_record)}" if "mAP" in last_record else "")
                warning = collapse_warning(stats.get("teacher_entropy", math.nan),
                                           stats.get("teacher_usage_entropy", math.inf), cfg.model.out_dim)
                if warning:
                    logger.warning("epoch %d: %s", epoch, warning)

        backbone_path = None
        if not run.stopped and info.is_main:
            backbone_path = run.dir.path / "backbone.pth"
            export_backbone(run.last, backbone_path)
        return {"run_dir": run.dir.path, "epoch": progress_state.epoch, "backbone": backbone_path,
                "stopped": run.stopped, "metrics": last_record}
