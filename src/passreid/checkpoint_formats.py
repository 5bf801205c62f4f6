"""Checkpoint layouts and their conversion to the PASS parameter names (DESIGN §2), and what a
checkpoint describes (architecture, input size, necks, fusion).

:func:`parse_checkpoint` recognises the layouts a user may hand us:

- a training checkpoint of this package ``{"model", "optimizer", ..., "config", "meta"}``;
- (a) a pretraining dict with a ``teacher`` (preferred) or ``student`` entry whose
  keys carry ``backbone.`` and maybe ``module.`` prefixes (projection heads ignored);
- (b) a bare PASS backbone state dict;
- (c) a fine-tuned ReID state dict (``base.*`` + ``bottleneck*`` + ``classifier.weight``);
- (d) a timm / DINO ViT with one ``cls_token`` and a class slot in ``pos_embed``,
  converted by copying the class token and its position into the part tokens;

and combinations of them ((a)+(d) is a DINO/LUPerson pretraining checkpoint), also
behind the usual ``state_dict`` / ``model`` wrappers.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor

from passreid.checkpoint_io import read_sidecar, safe_load
from passreid.errors import CheckpointError
from passreid.models.vit import NUM_PARTS, infer_grid

logger = logging.getLogger(__name__)

ARCH_BY_DIM: dict[int, str] = {192: "pass_vit_tiny", 384: "pass_vit_small", 768: "pass_vit_base"}
"""Registered backbone for each embedding width (all have 64-dim heads and patch 16)."""

STANDARD_WIDTH_PX = 128
"""Person crops are 128 px wide in every published recipe: the last resort for guessing a grid."""

MAX_LISTED = 30
"""Names listed at most in a message about a checkpoint."""

_TRAINING_KEYS = frozenset({"optimizer", "scheduler", "scaler", "rng", "epoch", "config", "meta"})
_WRAPPER_KEYS = ("state_dict", "model", "module", "net")
_REID_HEAD = re.compile(r"^(bottleneck(_\d+|_pt\d+)?|classifier)\.")
_BACKBONE_HEAD = re.compile(r"^(head|head_dist|pre_logits)\.")


# ----------------------------------------------------------------------------- format detection


@dataclass
class ParsedCheckpoint:
    """A checkpoint reduced to PASS backbone tensors plus what else it holds.

    Attributes:
        format: what was recognised, e.g. ``"pretrain-teacher+timm"``, ``"training:reid-finetuned"``.
        backbone: PASS parameter names (no prefix) -> tensors, converted from timm if needed.
        heads: ReID necks / classifier (``bottleneck*``, ``classifier.*``) -> tensors; empty if none.
        unknown: tensors that fit no known layout, kept under their stored names so that
            loading reports them as unexpected instead of dropping them.
        ignored: stored keys left out on purpose (pretraining projection heads, timm ``head.*``).
        timm: the backbone had one class token (converted, DESIGN §2 (d)).
        pretrain_heads: number of pretraining projection-head tensors among ``ignored``.
        config: the training config (nested dict) when stored, else None.
        meta: provenance (versions, data fingerprint, time) when stored or beside the file.
        epoch: training epoch when stored.
        metrics: the evaluation stored with it (``mAP``, ...), from ``best.pth`` or ``model.json``; may be empty.
        args: the pickled ``argparse.Namespace`` of a published checkpoint, as a dict.
        img_size: (H, W) from the config or meta, None if neither says.
        img_size_source: where ``img_size`` came from (``"config"``, ``"meta"``, ``"OUT.json"``).
        source: the path, or ``"<in-memory checkpoint>"``, for messages.
    """

    format: str
    backbone: dict[str, Tensor]
    heads: dict[str, Tensor] = field(default_factory=dict)
    unknown: dict[str, Tensor] = field(default_factory=dict)
    ignored: list[str] = field(default_factory=list)
    timm: bool = False
    pretrain_heads: int = 0
    config: dict[str, Any] | None = None
    meta: dict[str, Any] | None = None
    epoch: int | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    args: dict[str, Any] | None = None
    img_size: tuple[int, int] | None = None
    img_size_source: str | None = None
    source: str = "<in-memory checkpoint>"


def _stored_metrics(node: Mapping[str, Any]) -> dict[str, float]:
    """Scalars of a checkpoint's ``metrics`` (fine-tuning ``best.pth``) or ``best`` (cluster) entry."""
    for key in ("metrics", "best"):
        value = node.get(key)
        if isinstance(value, Mapping):
            return {k: float(v) for k, v in value.items()
                    if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "epoch"}
    return {}


def _is_state_dict(node: Mapping[str, Any]) -> bool:
    return len(node) > 0 and all(isinstance(v, Tensor) for v in node.values())


def _strip_module(key: str) -> str:
    while key.startswith("module."):
        key = key[len("module."):]
    return key


def config_value(config: Mapping[str, Any] | None, dotted: str) -> Any:
    """``config["model"]["fusion"]`` for ``"model.fusion"``; also accepts flat dotted keys. None if absent."""
    if not config:
        return None
    if dotted in config:
        return config[dotted]
    node: Any = config
    for part in dotted.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return None
        node = node[part]
    return node


def _as_img_size(value: Any) -> tuple[int, int] | None:
    if isinstance(value, int) and value > 0:
        return value, value
    if isinstance(value, (list, tuple)) and len(value) == 2 and all(isinstance(v, int) and v > 0 for v in value):
        return int(value[0]), int(value[1])
    return None


def parse_checkpoint(obj: Any, source: str = "<in-memory checkpoint>") -> ParsedCheckpoint:
    """Recognise the layout of a loaded checkpoint and convert its backbone to PASS names.

    Raises:
        CheckpointError: no ViT backbone tensors can be found; the message lists the top-level entries.
    """
    node: Any = obj
    training = False
    config = meta = args = None
    epoch = None
    metrics: dict[str, float] = {}
    pretrain_entry: str | None = None
    for _ in range(6):
        if not isinstance(node, Mapping):
            raise CheckpointError(f"{source}: expected a dict of tensors, found {type(node).__name__}")
        if isinstance(node.get("args"), argparse.Namespace):
            args = vars(node["args"])
        if _is_state_dict(node):
            break
        if isinstance(node.get("model"), Mapping) and _TRAINING_KEYS & set(node):
            training = True
            config = node.get("config") if isinstance(node.get("config"), Mapping) else config
            meta = node.get("meta") if isinstance(node.get("meta"), Mapping) else meta
            epoch = node.get("epoch") if isinstance(node.get("epoch"), int) else epoch
            metrics = _stored_metrics(node) or metrics
            node = node["model"]
            continue
        entry = next((e for e in ("teacher", "student") if isinstance(node.get(e), Mapping)), None)
        if entry is not None:
            if entry == "student":
                logger.info("%s: no teacher entry, using the student", source)
            pretrain_entry = entry
            node = node[entry]
            break
        wrapper = next((w for w in _WRAPPER_KEYS if isinstance(node.get(w), Mapping)), None)
        if wrapper is None:
            break
        node = node[wrapper]
    if not isinstance(node, Mapping) or not _is_state_dict(node):
        entries = ", ".join(f"{k!r}: {type(v).__name__}" for k, v in list(node.items())[:MAX_LISTED]) \
            if isinstance(node, Mapping) else type(node).__name__
        raise CheckpointError(
            f"{source}: found no state dict of tensors (looked through training, pretraining "
            f"'teacher'/'student' and {'/'.join(_WRAPPER_KEYS)} wrappers); entries: {entries}"
        )

    state = {_strip_module(k): v for k, v in node.items()}
    ignored: list[str] = []
    pretrain_heads = 0
    heads: dict[str, Tensor] = {}
    unknown: dict[str, Tensor] = {}
    backbone: dict[str, Tensor]
    if pretrain_entry is not None:
        kind = f"pretrain-{pretrain_entry}"
        if any(k.startswith("backbone.") for k in state):
            backbone = {k[len("backbone."):]: v for k, v in state.items() if k.startswith("backbone.")}
            head_keys = [k for k in state if not k.startswith("backbone.")]
            ignored += head_keys
            pretrain_heads = len(head_keys)
        else:
            backbone = state
    elif any(k.startswith("base.") for k in state):
        kind = "reid-finetuned"
        backbone = {k[len("base."):]: v for k, v in state.items() if k.startswith("base.")}
        heads = {k: v for k, v in state.items() if _REID_HEAD.match(k)}
        unknown = {k: v for k, v in state.items() if not k.startswith("base.") and k not in heads}
    else:
        kind = "backbone"
        backbone = state

    backbone_heads = [k for k in backbone if _BACKBONE_HEAD.match(k)]
    ignored += backbone_heads
    backbone = {k: v for k, v in backbone.items() if k not in backbone_heads}
    timm = "cls_token" in backbone and "part_token1" not in backbone and "cls_pos" not in backbone
    if timm:
        backbone, dropped = timm_to_pass(backbone)
        ignored += dropped
        kind = "timm" if kind == "backbone" else f"{kind}+timm"
    if "patch_embed.proj.weight" not in backbone:
        sample = ", ".join(list(state)[:MAX_LISTED])
        raise CheckpointError(f"{source}: no ViT backbone found (no patch_embed.proj.weight); keys: {sample}")

    parsed = ParsedCheckpoint(
        format=f"training:{kind}" if training else kind,
        backbone=backbone,
        heads=heads,
        unknown=unknown,
        ignored=ignored,
        timm=timm,
        pretrain_heads=pretrain_heads,
        config=dict(config) if config is not None else None,
        meta=dict(meta) if meta is not None else None,
        epoch=epoch,
        metrics=metrics,
        args=args,
        source=source,
    )
    parsed.img_size, parsed.img_size_source = _stored_img_size(parsed)
    return parsed


def timm_to_pass(state: dict[str, Tensor]) -> tuple[dict[str, Tensor], list[str]]:
    """Convert a one-class-token ViT (timm, DINO, LUPerson) to PASS names (DESIGN §2 (d)).

    ``part_token1..3`` start as copies of ``cls_token``; ``cls_pos`` and the three
    part positions as copies of the class slot of ``pos_embed`` (1, 1 + N, D),
    and ``pos_embed`` keeps the N patch slots. A timm ``no_embed_class`` model
    (no class slot) is not guessed at: its patch positions come out one short,
    which loading reports as a ``pos_embed`` shape conflict.

    Returns:
        the converted state and the keys dropped on purpose (``fc_norm.*`` when ``norm.*`` exists).
    """
    out = {k: v for k, v in state.items() if k not in ("cls_token", "pos_embed")}
    cls_token = state["cls_token"]
    for k in range(1, NUM_PARTS + 1):
        out[f"part_token{k}"] = cls_token.clone()
    out["cls_token"] = cls_token
    dropped: list[str] = []
    if "pos_embed" in state:
        pos = state["pos_embed"]
        class_pos, patch_pos = pos[:, :1], pos[:, 1:]
        out["pos_embed"] = patch_pos.clone()
        out["cls_pos"] = class_pos.clone()
        for k in range(1, NUM_PARTS + 1):
            out[f"part{k}_pos"] = class_pos.clone()
    if "norm.weight" in state:
        dropped = [k for k in state if k.startswith("fc_norm.")]
        for k in dropped:
            del out[k]
    return out, dropped


def _stored_img_size(parsed: ParsedCheckpoint) -> tuple[tuple[int, int] | None, str | None]:
    """The input size a config or meta records, and which of them recorded it."""
    for where, key, value in (
        ("config", "data.img_size", config_value(parsed.config, "data.img_size")),
        ("config", "model.img_size", config_value(parsed.config, "model.img_size")),
        ("meta", "img_size", (parsed.meta or {}).get("img_size")),
    ):
        size = _as_img_size(value)
        if size is not None:
            return size, where
        if value is not None:
            logger.warning("%s: ignoring %s %s = %r (not [H, W])", parsed.source, where, key, value)
    return None, None


def load_parsed(path_or_obj: str | os.PathLike | Mapping[str, Any] | ParsedCheckpoint) -> ParsedCheckpoint:
    """Read (if a path) and parse a checkpoint; an export's ``OUT.json`` fills meta/config/img_size."""
    if isinstance(path_or_obj, ParsedCheckpoint):
        return path_or_obj
    if not isinstance(path_or_obj, (str, os.PathLike)):
        return parse_checkpoint(path_or_obj)
    parsed = parse_checkpoint(safe_load(path_or_obj), source=str(path_or_obj))
    sidecar = read_sidecar(path_or_obj)
    if sidecar is not None:
        side_meta = sidecar.get("meta") if isinstance(sidecar.get("meta"), dict) else sidecar
        parsed.meta = parsed.meta or side_meta
        if parsed.config is None and isinstance(sidecar.get("config"), dict):
            parsed.config = sidecar["config"]
        if parsed.epoch is None and isinstance(sidecar.get("epoch"), int):
            parsed.epoch = sidecar["epoch"]
        if not parsed.metrics and isinstance(sidecar.get("metrics"), dict):
            parsed.metrics = dict(sidecar["metrics"])
        if parsed.img_size is None:
            parsed.img_size, parsed.img_size_source = _stored_img_size(parsed)
        if parsed.img_size is None and _as_img_size(sidecar.get("img_size")) is not None:
            parsed.img_size, parsed.img_size_source = _as_img_size(sidecar.get("img_size")), "OUT.json"
    return parsed


def extract_backbone_state(obj: Any) -> tuple[dict[str, Tensor], str, list[str]]:
    """PASS backbone tensors of any supported checkpoint (already loaded).

    Returns:
        (state with PASS names, format string, keys ignored on purpose). Tensors that
        fit no layout are left in the state under their stored names so that a
        later load reports them.
    """
    parsed = parse_checkpoint(obj)
    ignored = parsed.ignored + list(parsed.heads)
    return {**parsed.backbone, **parsed.unknown}, parsed.format, ignored


# ----------------------------------------------------------------------------- description


def backbone_arch(backbone: Mapping[str, Tensor], *, strict: bool = True) -> dict[str, Any]:
    """Architecture read off PASS backbone tensors: embed_dim, depth, num_heads, patch_size, mlp_ratio, qkv_bias.

    ``num_heads`` is not stored in the weights: every registered ViT uses 64-dim
    heads, so it is ``embed_dim // 64``.
    """
    proj = backbone.get("patch_embed.proj.weight")
    if proj is None or proj.ndim != 4:
        if strict:
            raise CheckpointError("backbone has no 4-D patch_embed.proj.weight")
        return {}
    dim = int(proj.shape[0])
    block_ids = {int(m.group(1)) for k in backbone if (m := re.match(r"blocks\.(\d+)\.", k))}
    depth = max(block_ids) + 1 if block_ids else 0
    fc1 = backbone.get("blocks.0.mlp.fc1.weight")
    return {
        "embed_dim": dim,
        "depth": depth,
        "num_heads": max(1, dim // 64),
        "patch_size": int(proj.shape[-1]),
        "mlp_ratio": float(fc1.shape[0]) / dim if fc1 is not None else 4.0,
        "qkv_bias": "blocks.0.attn.qkv.bias" in backbone,
    }


def checkpoint_img_size(parsed: ParsedCheckpoint) -> tuple[tuple[int, int], str]:
    """(H, W) the backbone was trained at, and where that came from (``config``, ``meta``, ``OUT.json``, ``pos_embed``).

    Without a stored size the grid is inferred from the number of patch positions:
    square, else height = 2 x width, else the standard 128-px person-crop width.
    """
    patch = backbone_arch(parsed.backbone)["patch_size"]
    pos = parsed.backbone.get("pos_embed")
    if parsed.img_size is not None and (
        pos is None or (parsed.img_size[0] // patch) * (parsed.img_size[1] // patch) == pos.shape[1]
    ):
        return parsed.img_size, parsed.img_size_source or "stored"
    if pos is None:
        raise CheckpointError(f"{parsed.source}: backbone has no pos_embed and no stored input size")
    n = int(pos.shape[1])
    try:
        h, w = infer_grid(n)
    except ValueError:
        w = STANDARD_WIDTH_PX // patch
        if n % w:
            raise CheckpointError(
                f"{parsed.source}: cannot infer the input size from {n} patch positions "
                "(neither square, 2:1 nor 128 px wide); store it in the config or the OUT.json"
            ) from None
        h = n // w
        logger.warning("%s: %d patch positions are neither square nor 2:1; assuming %d px width",
                       parsed.source, n, STANDARD_WIDTH_PX)
    return (h * patch, w * patch), "pos_embed"


def neck_layout(heads: Mapping[str, Tensor]) -> tuple[str | None, str | None]:
    """(neck, neck_names) from the stored neck keys; (None, None) without necks."""
    if "bottleneck_pt1.weight" in heads:
        return "multi", "cluster"
    if "bottleneck_1.weight" in heads:
        return "multi", "finetune"
    if "bottleneck.weight" in heads:
        return "single", None
    return None, None


def fusion_from_heads(heads: Mapping[str, Tensor], dim: int) -> str | None:
    """cat if the fused width (classifier input or single-neck width) is 2D, mean if D."""
    neck, _ = neck_layout(heads)
    width = None
    if "classifier.weight" in heads:
        width = int(heads["classifier.weight"].shape[1])
    elif neck == "single":
        width = int(heads["bottleneck.weight"].shape[0])
    return {2 * dim: "cat", dim: "mean"}.get(width) if width is not None else None


def checkpoint_info(path: str | os.PathLike) -> dict[str, Any]:
    """A JSON-safe description of a checkpoint: format, architecture, input size, heads, provenance."""
    parsed = load_parsed(path)
    arch = backbone_arch(parsed.backbone)
    img_size, size_source = checkpoint_img_size(parsed)
    patch = arch["patch_size"]
    neck, neck_names = neck_layout(parsed.heads)
    classifier = parsed.heads.get("classifier.weight")
    info: dict[str, Any] = {
        "path": str(path),
        "format": parsed.format,
        "arch": ARCH_BY_DIM.get(arch["embed_dim"], "custom"),
        **arch,
        "img_size": list(img_size),
        "img_size_source": size_source,
        "grid": [img_size[0] // patch, img_size[1] // patch],
        "tokens": 1 if parsed.timm else 1 + NUM_PARTS,
        "backbone_parameters": sum(int(t.numel()) for k, t in parsed.backbone.items()),
        "pretrain_heads": parsed.pretrain_heads > 0,
        "necks": sorted({k.split(".")[0] for k in parsed.heads if k.startswith("bottleneck")}),
        "neck": neck,
        "neck_names": neck_names,
        "fusion": config_value(parsed.config, "model.fusion") or fusion_from_heads(parsed.heads, arch["embed_dim"]),
        "classifier": classifier is not None,
        "num_classes": int(classifier.shape[0]) if classifier is not None else 0,
        "ignored_keys": len(parsed.ignored),
        "unknown_keys": sorted(parsed.unknown),
        "epoch": parsed.epoch,
        "metrics": parsed.metrics,
        "meta": parsed.meta,
        "config": parsed.config,
        "args": parsed.args,
    }
    return info
