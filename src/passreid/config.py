"""Typed configs: dataclass schemas, YAML recipes with ``_base_`` and dotted overrides.

Every stage declares one dataclass schema built from the shared pieces below.
``load_config(Schema, "configs/x.yaml", ["optim.lr=1e-3"])`` merges, in order,
the schema defaults, the YAML chain (a recipe names its parent with
``_base_: file.yaml``, relative to itself) and the command-line overrides, and
returns a schema instance. Unknown keys, wrong types and impossible values raise
``ConfigError`` naming the key and, where it came from a file, the file.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from passreid.errors import ConfigError

logger = logging.getLogger(__name__)

T = TypeVar("T")

PRECISIONS = ("auto", "fp32", "bf16", "fp16")


def check_choice(key: str, value: str, choices: Iterable[str]) -> None:
    """Raise ``ConfigError`` unless ``value`` is one of ``choices``."""
    choices = tuple(choices)
    if value not in choices:
        raise ConfigError(f"config key {key!r}: {value!r} is not one of {', '.join(map(repr, choices))}")


def check_positive(key: str, value: float, *, allow_zero: bool = False) -> None:
    """Raise ``ConfigError`` if ``value`` is negative (or zero unless ``allow_zero``)."""
    if value < 0 or (value == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        raise ConfigError(f"config key {key!r}: {value!r} must be {bound}")


def check_img_size(key: str, size: Sequence[int], patch: int = 16) -> None:
    """An input size is ``[H, W]`` with both sides positive multiples of the patch size."""
    if len(size) != 2 or any(s <= 0 or s % patch for s in size):
        raise ConfigError(
            f"config key {key!r}: {list(size)} must be [height, width], both positive multiples of {patch}"
        )


@dataclass
class DataConfig:
    """Where the images come from and how they are fed to the model.

    ``color_jitter`` (training only; 0, the published recipes, turns it off) draws
    brightness, contrast and saturation factors from ``[1 - s, 1 + s]`` and a hue
    shift from ``[-s / 6, s / 6]`` per image, so that a camera's light and colour
    cast stop being a shortcut (the demo's UDA stage needs it; see README).
    ``erasing`` is the training random erasing: ``noise`` (fine-tuning, random
    pixel values) or ``constant`` (cluster contrast, the published constant fill;
    see :class:`~passreid.data.transforms.ConstantErasing`).
    """

    dataset: str = "market1501"
    root: str = "data/market1501"
    img_size: list[int] = field(default_factory=lambda: [256, 128])
    num_workers: int = 4
    pixel_mean: list[float] = field(default_factory=lambda: [0.5, 0.5, 0.5])
    pixel_std: list[float] = field(default_factory=lambda: [0.5, 0.5, 0.5])
    skip_corrupt: bool = False
    color_jitter: float = 0.0
    erasing: str = "noise"

    def __post_init__(self) -> None:
        from passreid.data.datasets import list_datasets
        from passreid.data.transforms import ERASING

        check_choice("data.erasing", self.erasing, ERASING)
        check_choice("data.dataset", self.dataset, list_datasets())
        check_img_size("data.img_size", self.img_size)
        check_positive("data.num_workers", self.num_workers, allow_zero=True)
        if not 0.0 <= self.color_jitter < 1.0:
            raise ConfigError(f"config key 'data.color_jitter': {self.color_jitter} must be in [0, 1)")


@dataclass
class ModelConfig:
    """The ReID model: backbone, initial weights, fusion of the tokens and necks (DESIGN §4/§5).

    ``ghost_batch`` > 0 normalises the neck BatchNorms in training over groups
    of that many images of the batch (ghost batch norm; the published cluster
    runs' DataParallel split of 256 images over 4 or 2 GPUs is 64 or 128).
    """

    name: str = "pass_vit_small"
    depth: int = 12
    drop_path_rate: float = 0.1
    pretrained: str = ""
    fusion: str = "cat"
    neck: str = "multi"
    test_feature: str = "before"
    ghost_batch: int = 0

    def __post_init__(self) -> None:
        from passreid.models import list_models

        check_positive("model.ghost_batch", self.ghost_batch, allow_zero=True)
        check_choice("model.name", self.name, list_models())
        check_positive("model.depth", self.depth)
        check_choice("model.fusion", self.fusion, ("cat", "mean"))
        check_choice("model.neck", self.neck, ("multi", "single"))
        check_choice("model.test_feature", self.test_feature, ("before", "after"))
        if not 0.0 <= self.drop_path_rate < 1.0:
            raise ConfigError(f"config key 'model.drop_path_rate': {self.drop_path_rate} must be in [0, 1)")


@dataclass
class RunConfig:
    """Run-level settings shared by every training stage.

    ``precision``: ``auto`` is the stage's published precision on a GPU (fp16 with
    a gradient scaler for pretraining and fine-tuning; cluster contrast's
    recipes say fp32) and fp32 on the CPU; ``bf16``, ``fp16``, ``fp32`` force one
    (mixed precision on the CPU falls back to fp32 with a warning).
    """

    output_dir: str = "runs/default"
    seed: int = 0
    epochs: int = 120
    eval_every: int = 10
    log_every: int = 50
    device: str = "auto"
    precision: str = "auto"
    skip_nonfinite: bool = False
    max_iters_per_epoch: int = 0

    def __post_init__(self) -> None:
        check_positive("run.epochs", self.epochs)
        check_positive("run.eval_every", self.eval_every)
        check_positive("run.log_every", self.log_every)
        check_positive("run.max_iters_per_epoch", self.max_iters_per_epoch, allow_zero=True)
        check_choice("run.precision", self.precision, PRECISIONS)


def _read_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path} is not valid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping at the top level, not {type(data).__name__}")
    return data


def read_recipe(path: str | Path, _seen: tuple[Path, ...] = ()) -> list[tuple[Path, dict[str, Any]]]:
    """The chain of YAML mappings of a recipe, base first, each with its file."""
    path = Path(path).resolve()
    if path in _seen:
        raise ConfigError(f"config file {path} includes itself through _base_")
    data = _read_yaml(path)
    bases = data.pop("_base_", [])
    if isinstance(bases, str):
        bases = [bases]
    chain: list[tuple[Path, dict[str, Any]]] = []
    for base in bases:
        chain.extend(read_recipe(path.parent / base, _seen + (path,)))
    chain.append((path, data))
    return chain


RENAMED_KEYS: dict[str, str] = {"optim.base_lr": "optim.lr"}
"""Old dotted key -> its name now. Recipes, overrides and saved run configs that use an old name still
load (with a warning), so that one key names one setting in every stage."""


def rename_old_keys(data: dict[str, Any], source: str, warn: bool = True) -> dict[str, Any]:
    """A copy of the nested ``data`` with every key of :data:`RENAMED_KEYS` under its new name."""
    data = copy.deepcopy(data)
    for old, new in RENAMED_KEYS.items():
        *parents, leaf = old.split(".")
        node = data
        for part in parents:
            node = node.get(part) if isinstance(node, dict) else None
        if not isinstance(node, dict) or leaf not in node:
            continue
        new_leaf = new.rsplit(".", 1)[-1]
        if new_leaf in node:
            raise ConfigError(f"{source}: config keys {old!r} and {new!r} both set; {old!r} is the old name of "
                              f"{new!r}, keep only {new!r}")
        node[new_leaf] = node.pop(leaf)
        if warn:
            logger.warning("%s: config key %r is now %r; please rename it", source, old, new)
    return data


def _merge(schema_cfg: Any, data: Any, source: str) -> Any:
    if isinstance(data, dict):
        data = rename_old_keys(data, source)
    elif OmegaConf.is_dict(data):
        data = rename_old_keys(OmegaConf.to_container(data), source)
    try:
        return OmegaConf.merge(schema_cfg, data)
    except OmegaConfBaseException as exc:
        key = getattr(exc, "full_key", None) or "?"
        raise ConfigError(f"{source}: config key {key!r}: {_first_line(exc)}") from None


def _first_line(exc: BaseException) -> str:
    return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__


def load_config(schema: type[T], path: str | Path | None = None, overrides: Sequence[str] = ()) -> T:
    """Build a ``schema`` instance from defaults, a YAML recipe chain and ``key.sub=value`` overrides."""
    cfg = OmegaConf.structured(schema)
    if path is not None:
        for file, data in read_recipe(path):
            cfg = _merge(cfg, data, str(file))
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like key.sub=value")
        if item.endswith("="):  # `key=` means the empty string, not None
            item += "''"
        cfg = _merge(cfg, OmegaConf.from_dotlist([item]), f"override {item!r}")
    try:
        return OmegaConf.to_object(cfg)  # type: ignore[return-value]
    except OmegaConfBaseException as exc:
        key = getattr(exc, "full_key", None) or "?"
        raise ConfigError(f"config key {key!r}: {_first_line(exc)}") from None


def config_to_dict(cfg: Any) -> dict[str, Any]:
    """A plain, YAML/JSON-safe nested dict of a config dataclass."""
    return dataclasses.asdict(cfg)


def config_to_yaml(cfg: Any) -> str:
    return yaml.safe_dump(config_to_dict(cfg), sort_keys=False)


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` → ``{"a.b": 1}``."""
    out: dict[str, Any] = {}
    for key, value in d.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, name + "."))
        else:
            out[name] = value
    return out


def config_diff(old: dict[str, Any], new: dict[str, Any], ignore: Iterable[str] = ()) -> list[str]:
    """Lines ``key: old -> new`` for every dotted key whose value differs."""
    a, b = flatten(old), flatten(new)
    skip = set(ignore)
    lines = []
    for key in sorted(set(a) | set(b)):
        if key in skip:
            continue
        if a.get(key, "<missing>") != b.get(key, "<missing>"):
            lines.append(f"{key}: {a.get(key, '<missing>')!r} -> {b.get(key, '<missing>')!r}")
    return lines
