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

import json
import logging
import math
import os
import shutil
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.utils.data import DataLoader, Sampler

from passreid.config import RunConfig, check_choice, check_img_size, check_positive, config_to_dict, config_to_yaml
from passreid.data.datasets import ImageRecord
from passreid.data.multicrop import MultiCrop, MultiCropSpec, build_multicrop
from passreid.data.seeding import PositionSeeds
from passreid.demo import (
    DEMO_IMG_SIZE,
    DEMO_MODEL,
    DemoContext,
    StageResult,
    register_demo_stage,
    raise_if_stopped,
    result_from_metrics,
)
from passreid.engine import (
    DistInfo,
    GracefulStop,
    RunDir,
    agree_across_ranks,
    autocast,
    check_resume_fingerprint,
    cleanup_distributed,
    cores_beside_workers,
    cosine_value,
    explain_oom,
    gather_rng_states,
    load_state_checked,
    loss_is_finite,
    make_grad_scaler,
    open_resume_checkpoint,
    resolve_precision,
    restore_rank_rng,
    restore_training_state,
    save_training_checkpoint,
    seed_everything,
    setup_distributed,
    unwrap,
)
from passreid.errors import CheckpointError, ConfigError, TrainingError
from passreid.losses.pass_loss import PASSLoss, ViewLogits
from passreid.models import PassViT, create_model
from passreid.models.heads import TOKEN_NAMES, PassHeads
from passreid.models.vit import NUM_PARTS
from passreid.monitor import RetrievalMonitor, class_token_only, collapse_warning

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
    (the ablation: class token only, local crops from the whole image)."""

    name: str = "pass_vit_small"
    depth: int = 12
    drop_path_rate: float = 0.1
    mode: str = "pass"
    out_dim: int = 65536
    hidden_dim: int = 2048
    bottleneck_dim: int = 256
    norm_last_layer: bool = True

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


class PassPretrainNet(nn.Module):
    """Backbone + per-token projection heads over multi-crop views (student or teacher).

    State-dict keys are ``backbone.*`` (the PASS names) and ``head.*``, the
    layout of the published pretraining checkpoints' ``student``/``teacher``.

    Args:
        backbone: the PASS ViT.
        head: :class:`PassHeads` with 4 heads (PASS) or 1 (DINO ablation: the
            backbone then runs on ``[cls, patches]`` only, without part tokens).
    """

    def __init__(self, backbone: PassViT, head: PassHeads) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head

    @property
    def part_aware(self) -> bool:
        return self.head.num_tokens > 1

    def forward(self, global_views: Tensor, local_views: Tensor | None = None) -> ViewLogits:
        """Logits of every token type over the views.

        Args:
            global_views: (G, B, 3, H, W).
            local_views: (L, B, 3, h, w), band-major for PASS (band k: views
                ``k*L/3 .. (k+1)*L/3 - 1``); None for the teacher.

        Returns:
            :class:`ViewLogits`: cls (G + L, B, K); part k (G + L/3, B, K): its
            global views, then the local crops of band k.
        """
        batch = global_views.shape[1]
        if not self.part_aware:
            views = [global_views] if local_views is None else [global_views, local_views]
            cls = torch.cat([class_token_only(self.backbone, v.flatten(0, 1)) for v in views])
            return ViewLogits(self.head(cls, 0).unflatten(0, (-1, batch)), ())
        tokens = self.backbone(global_views.flatten(0, 1))  # (G*B, 4, D)
        cls_in = [tokens[:, 0]]
        part_in = [[tokens[:, k]] for k in range(1, NUM_PARTS + 1)]
        if local_views is not None:
            per_band = local_views.shape[0] // NUM_PARTS
            for k in range(NUM_PARTS):
                crops = local_views[k * per_band:(k + 1) * per_band].flatten(0, 1)
                out = self.backbone(crops, part=k + 1)  # (n*B, 2, D): [cls, part_k]
                cls_in.append(out[:, 0])
                part_in[k].append(out[:, 1])
        cls = self.head(torch.cat(cls_in), 0).unflatten(0, (-1, batch))
        parts = tuple(self.head(torch.cat(part_in[k]), k + 1).unflatten(0, (-1, batch)) for k in range(NUM_PARTS))
        return ViewLogits(cls, parts)


def build_networks(model_cfg: PretrainModelConfig, img_size: Sequence[int]) -> tuple[PassPretrainNet, PassPretrainNet]:
    """Student (drop path) and teacher (no drop path, no gradient, same initial weights)."""
    num_tokens = len(TOKEN_NAMES) if model_cfg.mode == "pass" else 1
    size = (img_size[0], img_size[1])
    head_kwargs: dict[str, Any] = dict(out_dim=model_cfg.out_dim, hidden_dim=model_cfg.hidden_dim,
                                       bottleneck_dim=model_cfg.bottleneck_dim,
                                       norm_last_layer=model_cfg.norm_last_layer)
    nets = []
    for drop_path in (model_cfg.drop_path_rate, 0.0):
        backbone = create_model(model_cfg.name, img_size=size, depth=model_cfg.depth, drop_path_rate=drop_path)
        nets.append(PassPretrainNet(backbone, PassHeads(backbone.embed_dim, num_tokens=num_tokens, **head_kwargs)))
    student, teacher = nets
    if num_tokens == 1:
        # Unused in the ablation: keep them out of the optimiser (and of DDP's gradient reduction).
        parts = range(1, NUM_PARTS + 1)
        for name in (*(f"part_token{k}" for k in parts), *(f"part{k}_pos" for k in parts)):
            getattr(student.backbone, name).requires_grad_(False)
    teacher.load_state_dict(student.state_dict())
    teacher.requires_grad_(False)
    teacher.eval()
    return student, teacher


# ----------------------------------------------------------------------------- optimisation pieces


def param_groups(model: nn.Module) -> list[dict[str, Any]]:
    """AdamW groups: weight decay on weights, none on biases and norm parameters (1-D tensors)."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        (no_decay if name.endswith(".bias") or param.ndim == 1 else decay).append(param)
    return [{"params": decay}, {"params": no_decay, "weight_decay": 0.0}]


def clip_gradients(params: Sequence[Tensor], max_norm: float) -> Tensor:
    """Scale each parameter's gradient to norm <= ``max_norm`` separately (the DINO rule), vectorised.

    Returns:
        (P,) gradient norms before clipping, for the parameters that have a gradient.
    """
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return torch.zeros(0)
    norms = torch.stack(torch._foreach_norm(grads))
    coef = (max_norm / (norms + 1e-6)).clamp_(max=1.0)
    torch._foreach_mul_(grads, list(coef.unbind()))
    return norms


@torch.no_grad()
def ema_update(teacher_params: Sequence[Tensor], student_params: Sequence[Tensor], momentum: float) -> None:
    """``teacher <- momentum * teacher + (1 - momentum) * student`` for every pair, in one fused op."""
    torch._foreach_lerp_(list(teacher_params), list(student_params), 1.0 - momentum)


def last_layer_params(model: nn.Module) -> list[Tensor]:
    """The prototype layers of the heads (frozen during the first ``freeze_last_layer_epochs``)."""
    return [p for name, p in model.named_parameters() if ".last_layer." in f".{name}"]


@dataclass(frozen=True)
class PretrainSchedule:
    """Per-iteration values (DINO): learning rate with linear warm-up then cosine, weight decay and
    teacher momentum by cosine. ``peak_lr`` is already scaled by the batch size."""

    iters_per_epoch: int
    epochs: int
    peak_lr: float
    min_lr: float
    warmup_epochs: int
    weight_decay: float
    weight_decay_end: float
    momentum: float
    momentum_end: float

    @property
    def total_iters(self) -> int:
        return self.iters_per_epoch * self.epochs

    def lr(self, it: int) -> float:
        warmup = self.warmup_epochs * self.iters_per_epoch
        if it < warmup:
            return self.peak_lr * it / warmup
        return cosine_value(self.peak_lr, self.min_lr, (it - warmup) / max(1, self.total_iters - warmup))

    def wd(self, it: int) -> float:
        return cosine_value(self.weight_decay, self.weight_decay_end, it / self.total_iters)

    def teacher_momentum(self, it: int) -> float:
        return cosine_value(self.momentum, self.momentum_end, it / self.total_iters)


# ----------------------------------------------------------------------------- data


class EpochSampler(Sampler[int]):
    """A new permutation every epoch (seeded by ``seed + epoch``), this rank's share, whole batches only.

    ``set_epoch(epoch, start_batch)`` skips the first batches, so a run stopped
    inside an epoch continues with the images it had not seen yet.
    """

    def __init__(self, num_samples: int, batch_size: int, *, seed: int = 0, rank: int = 0,
                 world_size: int = 1) -> None:
        self.num_samples = num_samples
        self.batch_size = batch_size
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.epoch = 0
        self.start_batch = 0

    @property
    def batches_per_epoch(self) -> int:
        return self.num_samples // self.world_size // self.batch_size

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.epoch = epoch
        self.start_batch = start_batch

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        perm = torch.randperm(self.num_samples, generator=generator)
        mine = perm[self.rank::self.world_size][: self.batches_per_epoch * self.batch_size]
        return iter(mine[self.start_batch * self.batch_size:].tolist())

    def __len__(self) -> int:
        return max(0, self.batches_per_epoch - self.start_batch) * self.batch_size


class CompactRecords(Sequence[ImageRecord]):
    """Unlabeled image records kept as one numpy byte-string array.

    A Python list of millions of records is copied page by page into every
    loader worker as reference counts change (copy-on-write); one array is not.
    """

    def __init__(self, records: Sequence[ImageRecord]) -> None:
        self._paths = np.array([os.fsencode(r.path) for r in records])

    def __len__(self) -> int:
        return len(self._paths)

    def __getitem__(self, index: int) -> ImageRecord:  # type: ignore[override]
        return ImageRecord(os.fsdecode(self._paths[index]), -1, -1)


def build_loader(cfg: PretrainConfig, info: DistInfo, multicrop: MultiCrop) -> tuple[DataLoader, EpochSampler,
                                                                                     dict[str, Any]]:
    """This rank's loader over the image folder, its sampler, and the folder's fingerprint."""
    from passreid.data.datasets import ImageFolderDataset, dataset_fingerprint
    from passreid.data.images import ImageDataset

    data = cfg.data
    if data.batch_size % info.world_size:
        raise ConfigError(f"config key 'data.batch_size': {data.batch_size} (total) does not split into "
                          f"{info.world_size} processes")
    index = Path(data.root) / data.index_file if data.index_file else None
    folder = ImageFolderDataset(data.root, index_file=index, limit=data.limit or None,
                                filter_list=data.filter_list or None)
    fingerprint = dataset_fingerprint(folder.records, data.root)
    records = CompactRecords(folder.records)
    del folder
    per_rank = data.batch_size // info.world_size
    sampler = EpochSampler(len(records), per_rank, seed=cfg.run.seed, rank=info.rank, world_size=info.world_size)
    if sampler.batches_per_epoch == 0:
        raise ConfigError(f"config key 'data.batch_size': {data.batch_size} is more than the {len(records)} "
                          f"images under {data.root}")
    dataset = ImageDataset(records, transform=multicrop.image_transform(), skip_corrupt=data.skip_corrupt)
    # Each image is augmented from the seed of its position in the epoch, whichever worker reads it; the loader's
    # own generator keeps the iterator from drawing on the global RNG (that would shift the checkpointed stream).
    loader = DataLoader(dataset, batch_size=per_rank, sampler=PositionSeeds(sampler, per_rank),
                        num_workers=data.num_workers,
                        collate_fn=multicrop.collate, pin_memory=info.device.type == "cuda", drop_last=True,
                        generator=torch.Generator())
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
    sums: dict[str, Tensor] = {}
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
                for key, value in result.stats.items():  # summed on the device: no synchronisation per step
                    sums[key] = sums[key] + value.float() if key in sums else value.float().clone()
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
    out: dict[str, float] = {k: float(v) / steps for k, v in sums.items()} if steps else {}
    out.update(scalars)
    out.update(steps=float(steps), skipped=float(skipped), stopped=float(stopped),
               images_per_s=(steps + skipped) * images_per_step / seconds if seconds > 0 else 0.0)
    return out


# ----------------------------------------------------------------------------- export


def export_backbone(checkpoint: str | Path, out: str | Path) -> dict[str, Any]:
    """Write the teacher backbone of ``checkpoint`` as a plain ``{name: tensor}`` state dict with the PASS
    names (DESIGN §2) to ``out``, and ``{"meta", "config"}`` to ``out`` with suffix ``.json``.

    ``checkpoint`` is a training checkpoint of :func:`run_pretrain` or any format
    :func:`passreid.checkpoint.parse_checkpoint` knows (a published PASS or DINO
    pretraining checkpoint, a bare or timm backbone). A plain-DINO ablation
    trained no part tokens: they are written as copies of the class token and
    its position, as a DINO checkpoint is converted (DESIGN §2 (d)).

    Returns:
        the sidecar dict (``meta`` holds ``img_size``, ``arch``, ``source``, ``format``, ``epoch``).

    Raises:
        CheckpointError: no backbone, or its names are not exactly those of a PASS ViT.
    """
    from passreid.checkpoint import (
        backbone_arch,
        build_meta,
        checkpoint_img_size,
        config_value,
        load_parsed,
        save_atomic,
    )

    parsed = load_parsed(checkpoint)
    if parsed.unknown:
        raise CheckpointError(f"{checkpoint}: tensors outside the backbone layout: {', '.join(sorted(parsed.unknown))}")
    state = {k: v.detach().clone().contiguous() for k, v in parsed.backbone.items()}
    mode = config_value(parsed.config, "model.mode") or "pass"
    if mode == "dino":
        for k in range(1, NUM_PARTS + 1):
            state[f"part_token{k}"] = state["cls_token"].clone()
            state[f"part{k}_pos"] = state["cls_pos"].clone()
    arch = backbone_arch(state)
    img_size, _ = checkpoint_img_size(parsed)
    reference = PassViT(img_size=img_size, patch_size=arch["patch_size"], embed_dim=arch["embed_dim"],
                        depth=arch["depth"], num_heads=arch["num_heads"], mlp_ratio=arch["mlp_ratio"],
                        qkv_bias=arch["qkv_bias"]).state_dict()
    missing = sorted(set(reference) - set(state))
    unexpected = sorted(set(state) - set(reference))
    wrong = sorted(k for k in set(reference) & set(state) if reference[k].shape != state[k].shape)
    if missing or unexpected or wrong:
        raise CheckpointError(f"{checkpoint}: the backbone does not have the PASS layout; missing: {missing}, "
                              f"unexpected: {unexpected}, shapes differ: {wrong}")
    meta = dict(parsed.meta or build_meta(None))
    meta.update(img_size=list(img_size), arch=arch, source=str(checkpoint), format=parsed.format,
                epoch=parsed.epoch, mode=mode)
    sidecar = {"meta": meta, "config": parsed.config}
    out = Path(out)
    save_atomic(state, out)
    side_path = out.with_suffix(".json")
    tmp = side_path.with_name(side_path.name + ".tmp")
    tmp.write_text(json.dumps(sidecar, indent=2, default=str) + "\n")
    tmp.replace(side_path)
    logger.info("exported the %s backbone of %s (%d tensors, %s) to %s", parsed.format, checkpoint, len(state),
                "x".join(map(str, img_size)), out)
    return sidecar


# ----------------------------------------------------------------------------- the run


def build_monitor(cfg: PretrainConfig, device: torch.device) -> RetrievalMonitor | None:
    """The frozen-feature monitor on ``cfg.eval``'s labelled set, or None when it is not set."""
    if not cfg.eval.dataset:
        return None
    from passreid.data.datasets import build_dataset

    dataset = build_dataset(cfg.eval.dataset, cfg.eval.root)
    return RetrievalMonitor(dataset, cfg.data.img_size, device=device, batch_size=cfg.eval.batch_size,
                            knn_k=cfg.eval.knn_k)


def describe_monitor(record: dict[str, Any]) -> str:
    """``mAP 12.3% R1 30.1% kNN 41.0%`` for the log line."""
    text = f"mAP {100 * record['mAP']:.1f}% R1 {100 * record.get('rank1', math.nan):.1f}%"
    if "knn_top1" in record:
        text += f" kNN {100 * record['knn_top1']:.1f}%"
    return text


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
    info = setup_distributed(cfg.run.device)
    try:
        seed_everything(cfg.run.seed, info.rank)
        run_dir = RunDir(cfg.run.output_dir, is_main=info.is_main)
        config = config_to_dict(cfg)
        ckpt, resume_path = open_resume_checkpoint(resume, run_dir, config, force_resume)
        if info.device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.benchmark = True

        precision = resolve_precision(cfg.run.precision, info.device)
        multicrop = build_multicrop(cfg.aug.backend, cfg.multicrop_spec(), tuple(cfg.aug.decode_size))
        loader, sampler, fingerprint = build_loader(cfg, info, multicrop)
        if ckpt is not None:
            check_resume_fingerprint(ckpt, fingerprint, resume_path, force_resume)
        ipe = sampler.batches_per_epoch
        if cfg.run.max_iters_per_epoch:
            ipe = min(ipe, cfg.run.max_iters_per_epoch)

        student, teacher = build_networks(cfg.model, cfg.data.img_size)
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

        start_epoch, start_step = 1, 0
        last_record: dict[str, Any] = {}
        if ckpt is not None:
            models = ckpt["model"]
            load_state_checked(student, models["student"], "student")
            load_state_checked(teacher, models["teacher"], "teacher")
            loss_fn.load_state_dict(models["centers"])
            start_epoch = restore_training_state(ckpt, model=None, optimizer=optimizer, scheduler=None, scaler=scaler)
            restore_rank_rng(ckpt, info, resume_path)
            start_step = int(ckpt.get("resume_step", 0))
            run_dir.truncate_metrics(start_epoch - 1)
            logger.info("resumed from %s at epoch %d%s", resume_path, start_epoch,
                        f", step {start_step}" if start_step else "")
        else:
            run_dir.truncate_metrics(0)
            run_dir.write_config(config_to_yaml(cfg))

        ddp_student: nn.Module = student
        if info.distributed:
            ddp_kwargs: dict[str, Any] = {"device_ids": [info.device.index]} if info.device.type == "cuda" else {}
            ddp_student = nn.parallel.DistributedDataParallel(student, **ddp_kwargs)
        state = PretrainState(student=ddp_student, teacher=teacher, loss_fn=loss_fn, optimizer=optimizer,
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

        def save_last(epoch_done: int, resume_step: int) -> None:
            rng_all = gather_rng_states(info)
            if info.is_main:
                save_training_checkpoint(
                    run_dir.last, model={"student": student.state_dict(), "teacher": teacher.state_dict(),
                                         "centers": loss_fn.state_dict()},
                    optimizer=optimizer, scheduler=None, scaler=scaler, epoch=epoch_done, config=config,
                    fingerprint=fingerprint, extra={"resume_step": resume_step, "rng_per_rank": rng_all},
                )

        monitor = build_monitor(cfg, info.device) if info.is_main else None
        if monitor is not None and ckpt is None:
            # Epoch 0: the random-init teacher, the baseline the monitor's later epochs are read against.
            before = monitor(teacher.backbone, cfg.model.mode)
            run_dir.log_metrics({"epoch": 0, **before})
            logger.info("epoch 0 (before training): frozen %s", describe_monitor(before))

        stopped = False
        epoch = start_epoch - 1
        with GracefulStop() as stop:
            for epoch in range(start_epoch, cfg.run.epochs + 1):
                t0 = time.perf_counter()
                sampler.set_epoch(epoch, start_batch=start_step)
                with explain_oom(cfg.data.batch_size // info.world_size):
                    stats = train_one_epoch(state, loader, epoch, start_step=start_step,
                                            max_steps=ipe - start_step, stop=stop, run_dir=run_dir,
                                            log_every=cfg.run.log_every, progress=progress and info.is_main)
                done = int(stats["steps"] + stats["skipped"])
                if stats["stopped"]:
                    save_last(epoch - 1, start_step + done)
                    stopped = True
                    logger.warning("stopped in epoch %d after step %d; %s holds the run", epoch, start_step + done,
                                   run_dir.last)
                    break
                start_step = 0
                last_record = {"epoch": epoch, **{k: v for k, v in stats.items() if k != "stopped"},
                               "seconds": time.perf_counter() - t0}
                if monitor is not None and (epoch % cfg.eval.every == 0 or epoch == cfg.run.epochs):
                    last_record.update(monitor(teacher.backbone, cfg.model.mode))
                run_dir.log_metrics(last_record)
                save_last(epoch, 0)
                if info.is_main:
                    logger.info("epoch %d: loss %.4f (cls %.4f) teacher entropy %.3f, %.0f img/s%s", epoch,
                                stats.get("loss", math.nan), stats.get("loss_cls", math.nan),
                                stats.get("teacher_entropy", math.nan), stats["images_per_s"],
                                f"; frozen {describe_monitor(last_record)}" if "mAP" in last_record else "")
                    warning = collapse_warning(stats.get("teacher_entropy", math.nan),
                                               stats.get("teacher_usage_entropy", math.inf), cfg.model.out_dim)
                    if warning:
                        logger.warning("epoch %d: %s", epoch, warning)
                if agree_across_ranks(torch.zeros((), device=info.device), stop)[1]:
                    stopped = epoch < cfg.run.epochs
                    if stopped:
                        logger.warning("stopped after epoch %d; %s holds the run", epoch, run_dir.last)
                    break

        backbone_path = None
        if not stopped and info.is_main:
            backbone_path = run_dir.path / "backbone.pth"
            export_backbone(run_dir.last, backbone_path)
        run_dir.close()
        return {"run_dir": run_dir.path, "epoch": epoch, "backbone": backbone_path, "stopped": stopped,
                "metrics": last_record}
    finally:
        cleanup_distributed()


# ----------------------------------------------------------------------------- demo


DEMO_LOCAL_SIZE = (64, 32)
DEMO_EPOCHS = 3
"""About 50 s of pretraining for the tiny model on 2 CPU cores (~25 images/s over 3 x 384 images)."""


def demo_config(ctx: DemoContext, output_dir: Path) -> PretrainConfig:
    """A short CPU recipe: the demo's tiny ViT at 128x64 (locals 64x32), small heads.

    The PIL multi-crop runs in one loader worker while the model trains on the
    other core. The published learning rate (5e-4 x 32/256) with one warm-up
    epoch; the teacher follows the student faster than the published 0.996,
    since the export is the teacher and there are only ~35 steps. (A peak rate
    of 5e-4 made the outputs collapse to uniform within these steps.)
    """
    return PretrainConfig(
        data=PretrainDataConfig(root=str(ctx.source_root / "bounding_box_train"), img_size=list(DEMO_IMG_SIZE),
                                batch_size=32, num_workers=1),
        aug=AugConfig(backend="cpu", decode_size=list(DEMO_IMG_SIZE), local_size=list(DEMO_LOCAL_SIZE)),
        model=PretrainModelConfig(name=DEMO_MODEL["name"], depth=DEMO_MODEL["depth"], drop_path_rate=0.1,
                                  out_dim=1024, hidden_dim=512, bottleneck_dim=128),
        optim=PretrainOptimConfig(lr=5e-4, warmup_epochs=1, momentum_teacher=0.99),
        eval=PretrainEvalConfig(dataset="synthetic", root=str(ctx.source_root), every=DEMO_EPOCHS),
        run=RunConfig(output_dir=str(output_dir), seed=ctx.seed, epochs=DEMO_EPOCHS, log_every=10,
                      device=str(ctx.device)),
    )


@register_demo_stage(order=20, name="pass-pretrain+finetune")
def pass_pretrain_stage(ctx: DemoContext) -> list[StageResult]:
    """Pretrain the tiny model with PASS on the source training images (labels unused), export the
    teacher backbone and fine-tune from it; ``ctx.state["pretrained_backbone"]`` keeps the export.

    Two rows: the monitor's frozen-feature figures of the exported teacher on the source test set
    (``pass-pretrain (frozen)``, to read against ``random-init``), and the fine-tuned model."""
    from passreid.finetune import finetune_for_demo

    start = time.perf_counter()
    run_path = ctx.workdir / "pass-pretrain"
    if run_path.exists():
        shutil.rmtree(run_path)
    cfg = demo_config(ctx, run_path)
    with cores_beside_workers(cfg.data.num_workers, cfg.run.device):
        result = run_pretrain(cfg)
    raise_if_stopped(result)
    if result["backbone"] is None:
        raise TrainingError("demo pretraining stopped before the end")
    ctx.state["pretrained_backbone"] = result["backbone"]
    pretrain_seconds = time.perf_counter() - start
    last = result["metrics"]  # the last epoch's record, with the monitor's figures (eval.every = DEMO_EPOCHS)
    before = RunDir(run_path).read_metrics()[0]  # epoch 0: the random-init teacher
    logger.info("demo pretraining: %.0f s, last loss %.4f; frozen features on the source test set: mAP %.1f%% "
                "before, %.1f%% after", pretrain_seconds, last.get("loss", math.nan), 100 * before["mAP"],
                100 * last["mAP"])
    after = {"mAP": last["mAP"], "cmc": [last["rank1"]], "mINP": last["mINP"]}
    frozen = result_from_metrics("pass-pretrain (frozen)", after, pretrain_seconds)
    stage = finetune_for_demo(ctx, "pass-pretrain+finetune", pretrained=str(result["backbone"]))
    return [frozen, stage]
