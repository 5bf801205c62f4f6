"""Checkpoints (DESIGN §2, §8): loading any supported layout into a model, building a model from
an export, and (re-exported from :mod:`passreid.checkpoint_io` and :mod:`passreid.checkpoint_formats`)
reading, writing and recognising checkpoint files.

:func:`load_checkpoint` fits a parsed checkpoint to a model: patch positions of
another grid are resized, every other difference raises :class:`CheckpointError`
listing missing keys, unexpected keys and shape conflicts.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor, nn

from passreid.checkpoint_formats import (
    ARCH_BY_DIM,
    MAX_LISTED,
    STANDARD_WIDTH_PX,
    ParsedCheckpoint,
    backbone_arch,
    checkpoint_img_size,
    checkpoint_info,
    config_value,
    extract_backbone_state,
    fusion_from_heads,
    load_parsed,
    neck_layout,
    parse_checkpoint,
    timm_to_pass,
)
from passreid.checkpoint_io import (
    SAFE_GLOBALS,
    build_meta,
    folder_not_checkpoint,
    read_sidecar,
    safe_load,
    save_atomic,
    write_export,
)
from passreid.errors import CheckpointError
from passreid.models import PassViT, ReIDModel, create_model, resize_pos_embed
from passreid.models.vit import infer_grid

logger = logging.getLogger(__name__)

__all__ = [
    "ARCH_BY_DIM", "SAFE_GLOBALS", "STANDARD_WIDTH_PX", "LoadReport", "ParsedCheckpoint", "backbone_arch",
    "build_meta", "build_model_from_checkpoint", "build_reid_model", "checkpoint_img_size", "checkpoint_info", "config_value",
    "extract_backbone_state", "folder_not_checkpoint", "load_checkpoint", "load_parsed", "parse_checkpoint",
    "read_sidecar", "safe_load", "save_atomic", "timm_to_pass", "write_export",
]


# ----------------------------------------------------------------------------- loading into a model


@dataclass
class LoadReport:
    """What :func:`load_checkpoint` did.

    Attributes:
        format: the layout recognised (see :func:`parse_checkpoint`).
        resized: ``(key, checkpoint shape, model shape)`` of resized positional embeddings.
        ignored: stored keys not loaded on purpose (pretraining heads, timm head, ReID
            necks/classifier when only a backbone is loaded).
        loaded: number of tensors copied into the model.
        initialised: model keys that keep their initialisation on purpose (the
            necks/classifier of a ReIDModel given a backbone-only checkpoint).
    """

    format: str
    resized: list[tuple[str, tuple[int, ...], tuple[int, ...]]] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)
    loaded: int = 0
    initialised: list[str] = field(default_factory=list)

    def summary(self) -> str:
        """One line for logs."""
        parts = [f"format {self.format}", f"{self.loaded} tensors loaded"]
        parts += [f"resized {k} {list(a)} -> {list(b)}" for k, a, b in self.resized]
        if self.ignored:
            parts.append(f"{len(self.ignored)} keys ignored")
        if self.initialised:
            parts.append(f"{len(self.initialised)} model tensors kept at initialisation")
        return "; ".join(parts)


def load_checkpoint(
    model: nn.Module,
    path_or_obj: str | os.PathLike | Mapping[str, Any] | ParsedCheckpoint,
    *,
    interpolation: Literal["bilinear", "bicubic"] = "bilinear",
) -> LoadReport:
    """Load any supported checkpoint into a :class:`PassViT` or a :class:`ReIDModel`.

    A ReIDModel takes everything from a fine-tuned checkpoint (its necks and
    classifier must match); from a backbone-only checkpoint it loads ``base`` and
    its necks/classifier keep their initialisation (listed in
    ``report.initialised``). ``load_checkpoint(model.base, path)`` takes only the
    backbone of any checkpoint (how UDA starts from a fine-tuned source model).
    Patch positions of another grid are resized (bilinear by default,
    ``align_corners=False``); the stored grid comes from the checkpoint's config
    when it has one, else square or height = 2 x width (DESIGN §2).

    Raises:
        CheckpointError: any other mismatch; the message lists missing keys,
            unexpected keys and ``key: checkpoint shape vs model shape`` conflicts.
    """
    parsed = load_parsed(path_or_obj)
    if isinstance(model, ReIDModel):
        backbone = model.base
        if parsed.heads:
            target: nn.Module = model
            state = {**{f"base.{k}": v for k, v in parsed.backbone.items()}, **parsed.heads, **parsed.unknown}
            ignored = list(parsed.ignored)
            initialised: list[str] = []
            pos_key = "base.pos_embed"
        else:
            target = model.base
            state = {**parsed.backbone, **parsed.unknown}
            ignored = list(parsed.ignored)
            initialised = [k for k in model.state_dict() if not k.startswith("base.")]
            pos_key = "pos_embed"
    elif isinstance(model, PassViT):
        backbone = target = model
        state = {**parsed.backbone, **parsed.unknown}
        ignored = parsed.ignored + list(parsed.heads)
        initialised = []
        pos_key = "pos_embed"
    else:
        raise TypeError(f"load_checkpoint expects a PassViT or a ReIDModel, got {type(model).__name__}")

    state, resized = _fit(target, state, parsed, backbone, pos_key, interpolation)
    target.load_state_dict(state, strict=True)
    report = LoadReport(format=parsed.format, resized=resized, ignored=ignored, loaded=len(state),
                        initialised=initialised)
    logger.info("%s: %s", parsed.source, report.summary())
    for key in ignored:
        logger.debug("%s: ignored %s", parsed.source, key)
    if initialised:
        logger.info("%s holds no ReID necks/classifier: %s keep their initialisation",
                    parsed.source, ", ".join(sorted({k.split(".")[0] for k in initialised})))
    return report


def _fit(
    target: nn.Module,
    state: dict[str, Tensor],
    parsed: ParsedCheckpoint,
    backbone: PassViT,
    pos_key: str,
    interpolation: str,
) -> tuple[dict[str, Tensor], list[tuple[str, tuple[int, ...], tuple[int, ...]]]]:
    """Check ``state`` against ``target``'s keys and shapes; resize the patch positions.

    Returns the state to load strictly and the resized entries; raises on anything else.
    """
    expected = target.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    conflicts: list[str] = []
    resized: list[tuple[str, tuple[int, ...], tuple[int, ...]]] = []
    out = dict(state)
    for key in expected:
        if key not in state or state[key].shape == expected[key].shape:
            continue
        have, want = tuple(state[key].shape), tuple(expected[key].shape)
        if key == pos_key and len(have) == 3 and have[0] == 1 and have[2] == want[2]:
            try:
                old_grid = _stored_grid(have[1], parsed, backbone)
                out[key] = resize_pos_embed(
                    state[key].float(), old_grid, backbone.grid_size, mode=interpolation  # type: ignore[arg-type]
                ).to(state[key].dtype)
                resized.append((key, have, want))
                continue
            except ValueError as exc:
                conflicts.append(f"{key}: checkpoint {list(have)} vs model {list(want)} ({exc})")
                continue
        conflicts.append(f"{key}: checkpoint {list(have)} vs model {list(want)}")
    if missing or unexpected or conflicts:
        raise CheckpointError(_mismatch_message(parsed, target, missing, unexpected, conflicts))
    return out, resized


def _stored_grid(num_patches: int, parsed: ParsedCheckpoint, backbone: PassViT) -> tuple[int, int]:
    """The (h, w) patch grid a checkpoint's ``pos_embed`` was trained on.

    The config's input size when it agrees with the number of positions; else
    square or height = 2 x width (DESIGN §2); else, as a logged last resort, the
    model's own grid width.
    """
    patch = backbone.patch_size
    if parsed.img_size is not None:
        grid = (parsed.img_size[0] // patch, parsed.img_size[1] // patch)
        if grid[0] * grid[1] == num_patches:
            return grid
        logger.warning("%s: stored input size %s does not give %d patches; inferring the grid",
                       parsed.source, parsed.img_size, num_patches)
    try:
        return infer_grid(num_patches)
    except ValueError:
        width = backbone.grid_size[1]
        if num_patches % width:
            raise
        logger.warning("%s: %d patch positions are neither square nor 2:1; assuming the model's width %d",
                       parsed.source, num_patches, width)
        return num_patches // width, width


def _listing(items: list[str]) -> str:
    shown = "\n    ".join(items[:MAX_LISTED])
    more = f"\n    ... and {len(items) - MAX_LISTED} more" if len(items) > MAX_LISTED else ""
    return f"\n    {shown}{more}"


def _mismatch_message(
    parsed: ParsedCheckpoint,
    target: nn.Module,
    missing: list[str],
    unexpected: list[str],
    conflicts: list[str],
) -> str:
    lines = [f"{parsed.source} ({parsed.format}) does not fit {type(target).__name__}:"]
    if missing:
        lines.append(f"  missing keys ({len(missing)}):{_listing(missing)}")
    if unexpected:
        lines.append(f"  unexpected keys ({len(unexpected)}):{_listing(unexpected)}")
    if conflicts:
        lines.append(f"  shape conflicts ({len(conflicts)}):{_listing(conflicts)}")
    backbone = target.base if isinstance(target, ReIDModel) else target
    if isinstance(backbone, PassViT):
        arch = backbone_arch(parsed.backbone, strict=False)
        if (arch.get("embed_dim"), arch.get("depth")) != (backbone.embed_dim, backbone.depth):
            lines.append(
                f"  checkpoint backbone: embed_dim {arch.get('embed_dim')}, depth {arch.get('depth')}; "
                f"model: embed_dim {backbone.embed_dim}, depth {backbone.depth}"
            )
    return "\n".join(lines)


# ----------------------------------------------------------------------------- building a model


def build_reid_model(name: str, *, img_size: tuple[int, int], depth: int | None = None, drop_path_rate: float = 0.0,
                     pretrained: str = "", num_classes: int = 0, fusion: str = "cat", neck: str = "multi",
                     test_feature: str = "before", neck_names: str = "finetune", normalize_output: bool = True,
                     ghost_batch: int = 0) -> tuple[ReIDModel, LoadReport | None]:
    """A new :class:`ReIDModel` whose backbone is ``pretrained`` (any supported checkpoint) when given.

    Only the backbone is taken from the checkpoint (patch positions resized to
    ``img_size`` when it was trained at another size): necks and classifier start
    fresh. Returns the model and the load report (None without ``pretrained``).
    """
    backbone = create_model(name, img_size=img_size, depth=depth, drop_path_rate=drop_path_rate)
    report = load_checkpoint(backbone, pretrained) if pretrained else None
    model = ReIDModel(backbone, num_classes=num_classes, fusion=fusion, neck=neck,  # type: ignore[arg-type]
                      test_feature=test_feature, neck_names=neck_names,  # type: ignore[arg-type]
                      normalize_output=normalize_output, ghost_batch=ghost_batch)
    return model, report


def build_model_from_checkpoint(
    path: str | os.PathLike | Mapping[str, Any],
    device: str | torch.device = "cpu",
) -> tuple[ReIDModel, LoadReport]:
    """The ReIDModel a checkpoint describes, loaded, in eval mode on ``device``.

    Architecture from the backbone tensors (width, depth, patch); input size from
    the stored config/meta, else from ``pos_embed``; necks from the stored keys
    (``bottleneck_1..3`` -> multi-neck, fine-tuning names, test feature before the
    neck; ``bottleneck_pt1..3`` -> multi-neck, cluster names, after the neck; only
    ``bottleneck`` -> single neck); fusion from the classifier or single-neck
    width (2D cat, D mean); ``num_classes`` from the classifier. A training
    checkpoint's ``config`` (``model.fusion``, ``model.neck``,
    ``model.test_feature``, ``data.img_size``) wins where present. A pure backbone
    gives the defaults (cat, multi-neck, before). A cluster-contrast model's eval
    output is the published cluster feature, not normalised again unless its
    config says ``cluster.renormalize_features``.
    """
    parsed = load_parsed(path)
    arch = backbone_arch(parsed.backbone)
    img_size, _ = checkpoint_img_size(parsed)
    dim = arch["embed_dim"]
    name = config_value(parsed.config, "model.name")
    if name not in ARCH_BY_DIM.values() or ARCH_BY_DIM.get(dim) != name:
        name = ARCH_BY_DIM.get(dim)
    overrides: dict[str, Any] = dict(depth=arch["depth"], patch_size=arch["patch_size"],
                                     mlp_ratio=arch["mlp_ratio"], qkv_bias=arch["qkv_bias"])
    if name is None:
        backbone = PassViT(img_size=img_size, embed_dim=dim, num_heads=arch["num_heads"], **overrides)
    else:
        backbone = create_model(name, img_size=img_size, **overrides)

    neck, neck_names = neck_layout(parsed.heads)
    fusion = config_value(parsed.config, "model.fusion") or fusion_from_heads(parsed.heads, dim)
    if fusion is None:
        fusion = "cat"
        if parsed.heads:
            logger.warning("%s: multi-neck model without classifier or config: cannot tell cat from mean "
                           "fusion, assuming cat (write the config beside it as OUT.json)", parsed.source)
    neck = config_value(parsed.config, "model.neck") or neck or "multi"
    default_test = "after" if neck_names == "cluster" else "before"
    test_feature = config_value(parsed.config, "model.test_feature") or default_test
    classifier = parsed.heads.get("classifier.weight")
    # Cluster-contrast models give the published cluster feature (multi-neck: not normalised again).
    normalize_output = neck_names != "cluster" or bool(config_value(parsed.config, "cluster.renormalize_features"))
    model = ReIDModel(
        backbone,
        num_classes=int(classifier.shape[0]) if classifier is not None else 0,
        fusion=fusion,
        neck=neck,
        test_feature=test_feature,
        neck_names=neck_names or "finetune",
        normalize_output=normalize_output,
    )
    report = load_checkpoint(model, parsed)
    model.eval().to(device)
    return model, report
