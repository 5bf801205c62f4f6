"""Checkpoint formats, conversion to the PASS parameter names, loading, atomic saving (DESIGN §2, §8).

Every reader goes through :func:`safe_load` (``weights_only`` unpickling; the
only class allowed besides tensors and containers is ``argparse.Namespace``,
which published pretraining checkpoints store under ``args``) and
:func:`parse_checkpoint`, which recognises the layouts a user may hand us:

- a training checkpoint of this package ``{"model", "optimizer", ..., "config", "meta"}``;
- (a) a pretraining dict with a ``teacher`` (preferred) or ``student`` entry whose
  keys carry ``backbone.`` and maybe ``module.`` prefixes (projection heads ignored);
- (b) a bare PASS backbone state dict;
- (c) a fine-tuned ReID state dict (``base.*`` + ``bottleneck*`` + ``classifier.weight``);
- (d) a timm / DINO ViT with one ``cls_token`` and a class slot in ``pos_embed``,
  converted by copying the class token and its position into the part tokens;

and combinations of them ((a)+(d) is a DINO/LUPerson pretraining checkpoint), also
behind the usual ``state_dict`` / ``model`` wrappers. :func:`load_checkpoint` then
fits the result to a model: patch positions of another grid are resized, every
other difference raises :class:`CheckpointError` listing missing keys, unexpected
keys and shape conflicts.
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import os
import pickle
import re
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor, nn

from passreid._compat import safe_globals
from passreid.errors import CheckpointError
from passreid.fileio import atomic_write, write_text_atomic
from passreid.models import PassViT, ReIDModel, create_model, resize_pos_embed
from passreid.models.vit import NUM_PARTS, infer_grid

logger = logging.getLogger(__name__)

SAFE_GLOBALS: tuple[type, ...] = (argparse.Namespace,)
"""Classes weights-only loading accepts besides tensors and containers (published ``args``)."""

ARCH_BY_DIM: dict[int, str] = {192: "pass_vit_tiny", 384: "pass_vit_small", 768: "pass_vit_base"}
"""Registered backbone for each embedding width (all have 64-dim heads and patch 16)."""

STANDARD_WIDTH_PX = 128
"""Person crops are 128 px wide in every published recipe: the last resort for guessing a grid."""

_TRAINING_KEYS = frozenset({"optimizer", "scheduler", "scaler", "rng", "epoch", "config", "meta"})
_WRAPPER_KEYS = ("state_dict", "model", "module", "net")
_REID_HEAD = re.compile(r"^(bottleneck(_\d+|_pt\d+)?|classifier)\.")
_BACKBONE_HEAD = re.compile(r"^(head|head_dist|pre_logits)\.")
_MAX_LISTED = 30


# ----------------------------------------------------------------------------- saving


def save_atomic(obj: Any, path: str | os.PathLike) -> None:
    """Write ``obj`` with ``torch.save`` so that ``path`` is either the old or the new file.

    The data goes to a temporary file in the same folder, is flushed to disk and
    then renamed over ``path``; a failure (disk full, kill) leaves the previous
    file untouched and removes the temporary one.

    Raises:
        CheckpointError: the file could not be written (disk full, no permission);
            the message names it and says the previous version is unchanged.
    """
    path = Path(path)
    try:
        with atomic_write(path) as f:
            torch.save(obj, f)
    except OSError as exc:
        raise CheckpointError(
            f"cannot write {path}: {exc.strerror or exc}; the previous {path.name}, if any, is unchanged"
        ) from exc


def write_export(state: dict[str, torch.Tensor], path: str | os.PathLike, sidecar: dict[str, Any]) -> Path:
    """Write an export: the plain state dict ``state`` to ``path`` and ``sidecar`` as JSON beside it
    (``path`` with suffix ``.json``), both atomically; returns ``path``."""
    path = Path(path)
    save_atomic(state, path)
    write_text_atomic(path.with_suffix(".json"), json.dumps(sidecar, indent=2, default=str) + "\n")
    return path


def build_meta(fingerprint: dict[str, Any] | None = None) -> dict[str, Any]:
    """The provenance stored beside every checkpoint and export (DESIGN §8)."""
    from passreid import __version__  # here, so that importing this module never needs a finished package init

    return {
        "passreid_version": __version__,
        "torch_version": str(torch.__version__),
        "dataset": fingerprint,
        "time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


# ----------------------------------------------------------------------------- reading


def folder_not_checkpoint(path: Path) -> str:
    """The message for a folder given where a checkpoint file belongs, naming the checkpoints inside."""
    inside = sorted(p.name for p in path.glob("*.pth"))
    preferred = next((name for name in ("model.pth", "best.pth", "last.pth") if name in inside), None)
    if preferred:
        hint = f"; it holds {', '.join(inside)}: e.g. {path / preferred}"
    elif inside:
        hint = f"; it holds {', '.join(inside[:5])}"
    else:
        hint = "; it holds no .pth file"
    return f"{path} is a folder, not a checkpoint file{hint}"


def safe_load(path: str | os.PathLike) -> Any:
    """``torch.load`` on CPU with weights-only unpickling; ``argparse.Namespace`` is the one extra class.

    Raises:
        CheckpointError: the file is missing, truncated or not a torch file, or it
            pickles code or a class outside the allow-list (the message names the global).
    """
    path = Path(path)
    if path.is_dir():
        raise CheckpointError(folder_not_checkpoint(path))
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        with safe_globals(SAFE_GLOBALS):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        refused = re.search(r"Unsupported global: GLOBAL (\S+)", str(exc))
        if refused:
            raise CheckpointError(
                f"{path}: weights-only loading refused the global {_global_name(refused.group(1))!r}: the file pickles "
                "code or a class that is not a tensor, a container or argparse.Namespace; it was not loaded"
            ) from None
        detail = re.search(r"WeightsUnpickler error:\s*(\S[^\n]*)", str(exc))
        raise CheckpointError(
            f"{path} is truncated, corrupt or not a PyTorch checkpoint (weights-only unpickling failed: "
            f"{detail.group(1) if detail else _first_line(exc)})"
        ) from None
    except (RuntimeError, EOFError, KeyError, ValueError, zipfile.BadZipFile, OSError) as exc:
        raise CheckpointError(
            f"{path} is truncated, corrupt or not a PyTorch checkpoint "
            f"({type(exc).__name__}: {_first_line(exc) or 'unexpected end of file'})"
        ) from None


def _global_name(name: str) -> str:
    """A refused global as torch 2.5+ names it: ``exec``, where torch 2.4 says ``builtins.exec``."""
    return name.removeprefix("builtins.")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else ""


def read_sidecar(path: str | os.PathLike) -> dict[str, Any] | None:
    """The ``OUT.json`` written beside an export ``OUT.pth`` (its ``meta``, maybe ``config``), or None."""
    sidecar = Path(path).with_suffix(".json")
    if not sidecar.is_file():
        return None
    try:
        data = json.loads(sidecar.read_text())
    except (OSError, ValueError) as exc:
        logger.warning("ignoring %s: not readable JSON (%s)", sidecar, exc)
        return None
    if not isinstance(data, dict):
        logger.warning("ignoring %s: expected a JSON object, found %s", sidecar, type(data).__name__)
        return None
    return data


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
        entries = ", ".join(f"{k!r}: {type(v).__name__}" for k, v in list(node.items())[:_MAX_LISTED]) \
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
        sample = ", ".join(list(state)[:_MAX_LISTED])
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
    shown = "\n    ".join(items[:_MAX_LISTED])
    more = f"\n    ... and {len(items) - _MAX_LISTED} more" if len(items) > _MAX_LISTED else ""
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


def _neck_layout(heads: Mapping[str, Tensor]) -> tuple[str | None, str | None]:
    """(neck, neck_names) from the stored neck keys; (None, None) without necks."""
    if "bottleneck_pt1.weight" in heads:
        return "multi", "cluster"
    if "bottleneck_1.weight" in heads:
        return "multi", "finetune"
    if "bottleneck.weight" in heads:
        return "single", None
    return None, None


def _fusion_from_heads(heads: Mapping[str, Tensor], dim: int) -> str | None:
    """cat if the fused width (classifier input or single-neck width) is 2D, mean if D."""
    neck, _ = _neck_layout(heads)
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
    neck, neck_names = _neck_layout(parsed.heads)
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
        "fusion": config_value(parsed.config, "model.fusion") or _fusion_from_heads(parsed.heads, arch["embed_dim"]),
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


# ----------------------------------------------------------------------------- building a model


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

    neck, neck_names = _neck_layout(parsed.heads)
    fusion = config_value(parsed.config, "model.fusion") or _fusion_from_heads(parsed.heads, dim)
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
