"""Schedules: warm-up then cosine, for learning rates, weight decay and EMA momentum (one function).

:func:`warmup_cosine` is the shape every stage uses: the per-epoch learning rate
of fine-tuning (:class:`WarmupCosineLR`, the published timm schedule) and the
per-iteration learning rate, weight decay and teacher momentum of pretraining
(:class:`PretrainSchedule`, DINO's ``cosine_scheduler``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch


def cosine_value(start: float, end: float, progress: float) -> float:
    """Cosine interpolation from ``start`` (progress 0) to ``end`` (progress 1)."""
    progress = min(max(progress, 0.0), 1.0)
    return end + 0.5 * (start - end) * (1.0 + math.cos(math.pi * progress))


def warmup_cosine(t: float, *, peak: float, end: float, total: float, warmup: float = 0, start: float = 0.0,
                  cosine_from_warmup: bool = True) -> float:
    """Linear warm-up from ``start`` to ``peak`` over ``t < warmup``, then cosine from ``peak`` to ``end``.

    The cosine runs over ``[warmup, total]`` (``cosine_from_warmup``, DINO) or over
    ``[0, total]`` and is simply entered at ``warmup`` (the published timm fine-tuning
    schedule, whose cosine is not shifted by the warm-up).
    """
    if t < warmup:
        return start + t * (peak - start) / warmup
    progress = (t - warmup) / max(1, total - warmup) if cosine_from_warmup else t / total
    return cosine_value(peak, end, progress)


class WarmupCosineLR:
    """The published per-epoch schedule: linear warm-up, then cosine over the whole run.

    It reproduces the timm ``CosineLRScheduler`` of the published recipe as that
    recipe calls it: ``step(epoch)`` *after* 1-based epoch ``epoch``, so epoch
    ``e`` trains at ``f(t)`` with ``t = e - 1`` (epoch 1 at the warm-up start),
    and the cosine is not shifted by the warm-up. For a group whose peak is ``b``
    and a run of ``T`` epochs:

    - ``t < warmup``: ``f(t) = w + t * (b - w) / warmup`` with ``w = warmup_factor * base_lr``;
    - otherwise: ``f(t) = m + (b - m) * (1 + cos(pi * t / T)) / 2`` with ``m = eta_min_factor * base_lr``.

    ``w`` and ``m`` are absolute (the same for the 2x-lr bias group), as published.
    Call :meth:`set_epoch` at the start of every epoch; it is stateless apart
    from the epoch, so resuming is exact.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, *, base_lr: float, epochs: int, warmup_epochs: int,
                 warmup_factor: float, eta_min_factor: float) -> None:
        self.optimizer = optimizer
        self.peak_lrs = [float(g["lr"]) for g in optimizer.param_groups]
        self.epochs = epochs
        self.warmup_epochs = warmup_epochs
        self.warmup_lr = warmup_factor * base_lr
        self.min_lr = eta_min_factor * base_lr
        self.epoch = 0

    def lr_at(self, epoch: int, peak: float) -> float:
        """Learning rate of a group with peak ``peak`` during 1-based ``epoch``: ``f(epoch - 1)``."""
        return warmup_cosine(max(epoch - 1, 0), peak=peak, end=self.min_lr, total=self.epochs,
                             warmup=self.warmup_epochs, start=self.warmup_lr, cosine_from_warmup=False)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        for group, peak in zip(self.optimizer.param_groups, self.peak_lrs):
            group["lr"] = self.lr_at(epoch, peak)

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "peak_lrs": list(self.peak_lrs)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.peak_lrs = [float(v) for v in state["peak_lrs"]]
        self.set_epoch(int(state["epoch"]))


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
        return warmup_cosine(it, peak=self.peak_lr, end=self.min_lr, total=self.total_iters,
                             warmup=self.warmup_epochs * self.iters_per_epoch)

    def wd(self, it: int) -> float:
        return cosine_value(self.weight_decay, self.weight_decay_end, it / self.total_iters)

    def teacher_momentum(self, it: int) -> float:
        return cosine_value(self.momentum, self.momentum_end, it / self.total_iters)
