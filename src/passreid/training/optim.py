"""Optimisers and the optimisation pieces the stages share: one SGD/AdamW builder, weight-decay
groups, per-parameter gradient clipping and the EMA of a teacher."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn


def build_optimizer(model: nn.Module, *, name: str, lr: float, weight_decay: float, momentum: float = 0.9,
                    bias_lr_factor: float | None = None, weight_decay_bias: float | None = None,
                    fused: bool = False) -> torch.optim.Optimizer:
    """SGD (``momentum``) or AdamW (``name="adamw"``) over the trainable parameters of ``model``.

    Without ``bias_lr_factor`` all of them form one group (``lr``, ``weight_decay``); with it,
    two: weights (``lr``, ``weight_decay``) and biases (``lr * bias_lr_factor``,
    ``weight_decay_bias``), group 0 being the weights, so ``param_groups[0]["lr"]`` is the
    base rate. ``fused`` (CUDA) updates all tensors in one kernel.
    """
    groups: list[Any]
    if bias_lr_factor is None:
        groups = [p for p in model.parameters() if p.requires_grad]
    else:
        weights, biases = [], []
        for param_name, param in model.named_parameters():
            if param.requires_grad:
                (biases if param_name.endswith("bias") else weights).append(param)
        groups = [
            {"params": weights, "lr": lr, "weight_decay": weight_decay},
            {"params": biases, "lr": lr * bias_lr_factor,
             "weight_decay": weight_decay if weight_decay_bias is None else weight_decay_bias},
        ]
    kwargs: dict[str, Any] = {"fused": True} if fused else {}
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=lr, weight_decay=weight_decay, **kwargs)
    return torch.optim.SGD(groups, lr=lr, momentum=momentum, weight_decay=weight_decay, **kwargs)


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
