"""DINO projection heads for PASS pretraining (DESIGN §3).

One :class:`DINOHead` per token type (class token and the three part tokens):
a 3-layer MLP ``D -> 2048 -> 2048 -> 256`` with GELU, L2 normalisation, then a
weight-normalised linear layer ``256 -> 65536`` without bias. With
``norm_last_layer`` the norm of every output row (``weight_g``) is fixed at 1,
so the logits are cosine similarities to 65536 learned prototypes; this keeps
the softmax of the self-distillation loss from being dominated by the weight
norm and is what makes the 65536-way head stable.

Parameter names follow DINO (``mlp.{0,2,4}.*``, ``last_layer.weight_g``,
``last_layer.weight_v``), so a DINO head state dict loads unchanged.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from timm.layers import trunc_normal_
from torch import Tensor, nn

TOKEN_NAMES = ("cls", "part1", "part2", "part3")
"""Head names in token order: the backbone's output tokens ``[cls, part1, part2, part3]``."""


class WeightNormLinear(nn.Module):
    """``y = x @ (g * v / ||v||)^T``: a bias-free linear layer whose rows are weight-normalised.

    Same parameters and names as ``torch.nn.utils.weight_norm(nn.Linear(...))``
    (``weight_g`` of shape (out, 1), ``weight_v`` of shape (out, in)), written
    out so the state dict keeps those names (the parametrization API renames them).

    Args:
        in_features: input size.
        out_features: output size (number of prototypes).
        fix_norm: keep ``weight_g`` at 1 and out of the optimiser (``norm_last_layer``).
    """

    def __init__(self, in_features: int, out_features: int, fix_norm: bool = True) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        # Default nn.Linear initialisation of the direction, unit norm: as DINO.
        weight = torch.empty(out_features, in_features)
        nn.init.kaiming_uniform_(weight, a=math.sqrt(5))
        self.weight_v = nn.Parameter(weight)
        self.weight_g = nn.Parameter(torch.ones(out_features, 1), requires_grad=not fix_norm)

    @property
    def weight(self) -> Tensor:
        """The effective weight (out, in), rows of norm ``weight_g``."""
        return self.weight_g * F.normalize(self.weight_v, dim=1)

    def forward(self, x: Tensor) -> Tensor:
        """(..., in) -> (..., out)."""
        return F.linear(x, self.weight)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}"


class DINOHead(nn.Module):
    """MLP projection + L2 normalisation + weight-normalised prototype layer.

    Args:
        in_dim: backbone token size D.
        out_dim: number of prototypes K (65536 as published; small for demos).
        hidden_dim: MLP hidden size.
        bottleneck_dim: size of the normalised embedding fed to the last layer.
        nlayers: MLP depth (>= 1).
        norm_last_layer: fix the prototype norms at 1.

    Example:
        >>> head = DINOHead(192, out_dim=1024, hidden_dim=256, bottleneck_dim=64)
        >>> head(torch.randn(5, 192)).shape
        torch.Size([5, 1024])
    """

    def __init__(
        self,
        in_dim: int,
        out_dim: int = 65536,
        hidden_dim: int = 2048,
        bottleneck_dim: int = 256,
        nlayers: int = 3,
        norm_last_layer: bool = True,
    ) -> None:
        super().__init__()
        if nlayers < 1:
            raise ValueError(f"nlayers must be >= 1, got {nlayers}")
        if nlayers == 1:
            self.mlp: nn.Module = nn.Linear(in_dim, bottleneck_dim)
        else:
            layers: list[nn.Module] = [nn.Linear(in_dim, hidden_dim), nn.GELU()]
            for _ in range(nlayers - 2):
                layers += [nn.Linear(hidden_dim, hidden_dim), nn.GELU()]
            layers.append(nn.Linear(hidden_dim, bottleneck_dim))
            self.mlp = nn.Sequential(*layers)
        for module in self.mlp.modules():
            if isinstance(module, nn.Linear):
                trunc_normal_(module.weight, std=0.02)
                nn.init.zeros_(module.bias)
        self.last_layer = WeightNormLinear(bottleneck_dim, out_dim, fix_norm=norm_last_layer)

    def forward(self, x: Tensor) -> Tensor:
        """Tokens (N, D) -> prototype logits (N, K)."""
        x = F.normalize(self.mlp(x), dim=-1)
        return self.last_layer(x)


class PassHeads(nn.Module):
    """One :class:`DINOHead` per token type, named ``cls``, ``part1``, ``part2``, ``part3``.

    Args:
        in_dim: backbone token size D.
        num_tokens: 4 for PASS, 1 for the plain-DINO ablation (class token only).
        **head_kwargs: :class:`DINOHead` arguments (``out_dim``, ``hidden_dim``, ...).
    """

    def __init__(self, in_dim: int, num_tokens: int = 4, **head_kwargs: int | bool) -> None:
        super().__init__()
        if num_tokens not in (1, len(TOKEN_NAMES)):
            raise ValueError(f"num_tokens must be 1 (DINO) or {len(TOKEN_NAMES)} (PASS), got {num_tokens}")
        self.heads = nn.ModuleDict({name: DINOHead(in_dim, **head_kwargs) for name in TOKEN_NAMES[:num_tokens]})

    @property
    def num_tokens(self) -> int:
        return len(self.heads)

    def forward(self, x: Tensor, token: int) -> Tensor:
        """Tokens (N, D) of token type ``token`` (0 = cls, k = part k) -> logits (N, K)."""
        return self.heads[TOKEN_NAMES[token]](x)
