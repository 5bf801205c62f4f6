"""The pretraining network: a PASS backbone with per-token projection heads over multi-crop views.

Student and teacher are two :class:`PassPretrainNet` of the same architecture
(:func:`build_pretrain_networks`); :mod:`passreid.pretrain` trains them.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from passreid.losses.pass_loss import ViewLogits
from passreid.models import create_model
from passreid.models.heads import TOKEN_NAMES, PassHeads
from passreid.models.vit import NUM_PARTS, PassViT


def class_token_only(backbone: PassViT, x: Tensor) -> Tensor:
    """(B, 3, H, W) -> (B, D): the final-normed class token of the sequence ``[cls, patches]``.

    The plain-DINO ablation trains without part tokens: they must not take part in attention.
    """
    seq = backbone.prepare_tokens(x)
    seq = torch.cat((seq[:, :1], seq[:, 1 + NUM_PARTS:]), dim=1)
    for block in backbone.blocks:
        seq = block(seq)
    return backbone.norm(seq[:, 0])


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


def build_pretrain_networks(name: str, *, img_size: tuple[int, int], depth: int | None = None,
                            drop_path_rate: float = 0.1, part_aware: bool = True, out_dim: int = 65536,
                            hidden_dim: int = 2048, bottleneck_dim: int = 256,
                            norm_last_layer: bool = True) -> tuple[PassPretrainNet, PassPretrainNet]:
    """Student (drop path) and teacher (no drop path, no gradient, same initial weights).

    ``part_aware=False`` is the DINO ablation: one head on the class token, and the
    part tokens frozen out of the optimiser (and of DDP's gradient reduction).
    """
    num_tokens = len(TOKEN_NAMES) if part_aware else 1
    head_kwargs: dict[str, Any] = dict(out_dim=out_dim, hidden_dim=hidden_dim, bottleneck_dim=bottleneck_dim,
                                       norm_last_layer=norm_last_layer)
    nets = []
    for drop_path in (drop_path_rate, 0.0):
        backbone = create_model(name, img_size=img_size, depth=depth, drop_path_rate=drop_path)
        nets.append(PassPretrainNet(backbone, PassHeads(backbone.embed_dim, num_tokens=num_tokens, **head_kwargs)))
    student, teacher = nets
    if num_tokens == 1:
        parts = range(1, NUM_PARTS + 1)
        for token in (*(f"part_token{k}" for k in parts), *(f"part{k}_pos" for k in parts)):
            getattr(student.backbone, token).requires_grad_(False)
    teacher.load_state_dict(student.state_dict())
    teacher.requires_grad_(False)
    teacher.eval()
    return student, teacher


def last_layer_params(model: nn.Module) -> list[Tensor]:
    """The prototype layers of the heads (frozen during the first ``freeze_last_layer_epochs``)."""
    return [p for name, p in model.named_parameters() if ".last_layer." in f".{name}"]
