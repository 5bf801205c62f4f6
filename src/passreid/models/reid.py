"""ReID model: PASS backbone + token fusion + BatchNorm neck(s) + ID classifier (DESIGN §4, §5).

With g the class token and p the mean of the three part tokens, fusion
``cat`` gives ``[g, p]`` (2D) and ``mean`` gives ``(g + p) / 2`` (D).

- Supervised fine-tuning (test_feature ``"before"``): the triplet loss sees
  the fused tokens, the classifier sees the fused after-neck feature, and
  the test feature is the fused tokens, L2-normalised.
- Cluster contrast (test_feature ``"after"``): clustering, memory and test
  all use the after-neck feature: multi-neck BN + L2 per token then fuse;
  single neck fuse, BN, L2. As published, the multi-neck fused vector is used
  as it is (its norm is below 1), not normalised again (``normalize_output``).

State-dict layout is that of the published fine-tuned models: ``base.*``,
``bottleneck.*``, ``bottleneck_1..3.*`` (or ``bottleneck_pt1..3.*`` for
cluster-contrast models) and ``classifier.weight``.
"""

from __future__ import annotations

from typing import Literal, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from passreid.errors import ConfigError
from passreid.models.vit import NUM_PARTS, PassViT

Fusion = Literal["cat", "mean"]
Neck = Literal["multi", "single"]
TestFeature = Literal["before", "after"]
NeckNames = Literal["finetune", "cluster"]

_PART_NECK_PREFIX = {"finetune": "bottleneck_", "cluster": "bottleneck_pt"}


class ReIDOutput(NamedTuple):
    """Training-mode output.

    Attributes:
        logits: (B, num_classes), or None without a classifier.
        feat: (B, F) fused tokens before the neck (triplet loss).
        neck_feat: (B, F) fused after-neck feature (classifier input; cluster memory
            feature when test_feature is "after").
    """

    logits: Tensor | None
    feat: Tensor
    neck_feat: Tensor


def _check(name: str, value: str, valid: tuple[str, ...]) -> None:
    if value not in valid:
        raise ConfigError(f"{name} must be one of {', '.join(valid)}; got {value!r}")


class GhostBatchNorm1d(nn.BatchNorm1d):
    """BatchNorm1d that, in training, normalises each group of ``group_size`` consecutive rows on its own.

    (B, C) with B a multiple of ``group_size`` -> (B, C): every group of rows is
    normalised with its own batch mean and (biased) variance, exactly as
    ``B / group_size`` separate BatchNorm1d calls would (what DataParallel on
    ``B / group_size`` GPUs does to the published cluster-contrast necks). The
    running statistics follow the first group only, as DataParallel keeps those
    of its first replica. A batch that is not a multiple of ``group_size``, or
    not larger than it, is normalised as a whole. Eval mode is plain BatchNorm1d;
    the state dict is BatchNorm1d's.
    """

    def __init__(self, num_features: int, group_size: int, **kwargs: object) -> None:
        super().__init__(num_features, **kwargs)  # type: ignore[arg-type]
        self.group_size = group_size

    def forward(self, x: Tensor) -> Tensor:
        b = x.shape[0]
        g = self.group_size
        if not self.training or g <= 0 or b <= g or b % g:
            return super().forward(x)
        groups = x.reshape(b // g, g, -1)
        first = super().forward(groups[0])  # updates the running statistics, as replica 0 does
        mean = groups[1:].mean(dim=1, keepdim=True)
        var = groups[1:].var(dim=1, unbiased=False, keepdim=True)
        rest = (groups[1:] - mean) * torch.rsqrt(var + self.eps)
        if self.affine:
            rest = rest * self.weight + self.bias
        return torch.cat([first.unsqueeze(0), rest]).reshape(b, -1)


def _bn_neck(dim: int, ghost_batch: int = 0) -> nn.BatchNorm1d:
    """BNNeck with its shift frozen at 0, as in the published recipes; ghost batches when ``ghost_batch`` > 0."""
    bn = GhostBatchNorm1d(dim, ghost_batch) if ghost_batch > 0 else nn.BatchNorm1d(dim)
    nn.init.ones_(bn.weight)
    nn.init.zeros_(bn.bias)
    bn.bias.requires_grad_(False)
    return bn


class ReIDModel(nn.Module):
    """Backbone + fusion + neck + optional classifier.

    Args:
        backbone: a :class:`PassViT`, stored as ``base``.
        num_classes: training identities; 0 builds no classifier (cluster
            contrast, evaluation).
        fusion: ``"cat"`` -> ``[g, mean(p1..p3)]`` (2D); ``"mean"`` -> their average (D).
        neck: ``"multi"`` (one BatchNorm1d per token) or ``"single"`` (one over the fused vector).
        test_feature: ``"before"`` or ``"after"`` the neck; see the module docstring.
        neck_names: ``"finetune"`` names part necks ``bottleneck_1..3``,
            ``"cluster"`` ``bottleneck_pt1..3`` (the published layouts).
        normalize_output: L2-normalise the eval-mode feature. False is the
            published cluster-contrast output: the multi-neck after-neck feature
            as fused (single neck and ``"before"`` are unit vectors either way).
        ghost_batch: normalise the necks in training over groups of this many
            images (0: the whole batch); see :class:`GhostBatchNorm1d`.

    ``train()`` mode: ``forward(x)`` -> :class:`ReIDOutput`. ``eval()`` mode:
    ``forward(x)`` -> (B, F) test feature (unit norm unless ``normalize_output`` is
    False), F = :attr:`feat_dim`.
    """

    def __init__(
        self,
        backbone: PassViT,
        num_classes: int = 0,
        fusion: Fusion = "cat",
        neck: Neck = "multi",
        test_feature: TestFeature = "before",
        neck_names: NeckNames = "finetune",
        normalize_output: bool = True,
        ghost_batch: int = 0,
    ) -> None:
        super().__init__()
        _check("fusion", fusion, ("cat", "mean"))
        _check("neck", neck, ("multi", "single"))
        _check("test_feature", test_feature, ("before", "after"))
        _check("neck_names", neck_names, ("finetune", "cluster"))
        if num_classes < 0:
            raise ConfigError(f"num_classes must be >= 0; got {num_classes}")
        self.fusion = fusion
        self.neck = neck
        self.test_feature = test_feature
        self.neck_names = neck_names
        self.num_classes = num_classes
        self.normalize_output = normalize_output
        if ghost_batch < 0:
            raise ConfigError(f"ghost_batch must be >= 0; got {ghost_batch}")

        self.base = backbone
        dim = backbone.embed_dim
        self.feat_dim = 2 * dim if fusion == "cat" else dim
        if neck == "multi":
            self.bottleneck = _bn_neck(dim, ghost_batch)
            prefix = _PART_NECK_PREFIX[neck_names]
            part_necks = tuple(f"{prefix}{k}" for k in range(1, NUM_PARTS + 1))
            self._neck_attrs = ("bottleneck", *part_necks)
            for attr in self._neck_attrs[1:]:
                self.add_module(attr, _bn_neck(dim, ghost_batch))
        else:
            self.bottleneck = _bn_neck(self.feat_dim, ghost_batch)
            self._neck_attrs = ("bottleneck",)
        self.classifier: nn.Linear | None = None
        if num_classes > 0:
            self.classifier = nn.Linear(self.feat_dim, num_classes, bias=False)
            nn.init.normal_(self.classifier.weight, std=0.001)

    def tokens(self, x: Tensor) -> Tensor:
        """Images (B, 3, H, W) -> backbone tokens (B, 4, D) = [cls, part1, part2, part3]."""
        return self.base(x)

    def fuse(self, tokens: Tensor) -> Tensor:
        """(B, 4, D) -> (B, F): cat ``[g, p]`` or mean ``(g + p) / 2``; p = part-token mean."""
        glob = tokens[:, 0]
        parts = tokens[:, 1:].mean(dim=1)
        if self.fusion == "cat":
            return torch.cat((glob, parts), dim=-1)
        return (glob + parts) / 2

    def neck_feature(self, tokens: Tensor) -> Tensor:
        """(B, 4, D) -> (B, F) after-neck feature; L2 steps only when test_feature is "after"."""
        normalise = self.test_feature == "after"
        if self.neck == "multi":
            necked = [getattr(self, attr)(tokens[:, i]) for i, attr in enumerate(self._neck_attrs)]
            if normalise:
                necked = [F.normalize(t, dim=-1) for t in necked]
            return self.fuse(torch.stack(necked, dim=1))
        out = self.bottleneck(self.fuse(tokens))
        return F.normalize(out, dim=-1) if normalise else out

    def forward(self, x: Tensor) -> ReIDOutput | Tensor:
        """Images (B, 3, H, W) -> :class:`ReIDOutput` (train) or (B, F) unit test feature (eval)."""
        tokens = self.tokens(x)
        if not self.training:
            if self.test_feature == "before":
                return F.normalize(self.fuse(tokens), dim=-1)
            feat = self.neck_feature(tokens)
            return F.normalize(feat, dim=-1) if self.normalize_output else feat
        neck_feat = self.neck_feature(tokens)
        logits = self.classifier(neck_feat) if self.classifier is not None else None
        return ReIDOutput(logits=logits, feat=self.fuse(tokens), neck_feat=neck_feat)

