"""Model registry: named PASS backbones built by small factories (timm style).

A factory only sets the architecture; ``create_model`` passes the input size
and any overrides (``depth=2`` for tests, ``drop_path_rate=0.1`` for
fine-tuning) through to :class:`PassViT`.

Example:
    >>> from passreid.models import create_model
    >>> model = create_model("pass_vit_tiny", img_size=(128, 64), depth=2)
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

from passreid.errors import ConfigError
from passreid.models.reid import GhostBatchNorm1d, ReIDModel, ReIDOutput
from passreid.models.vit import PassViT, resize_pos_embed

__all__ = [
    "GhostBatchNorm1d",
    "PassViT",
    "ReIDModel",
    "ReIDOutput",
    "create_model",
    "list_models",
    "register_model",
    "resize_pos_embed",
]

ModelFactory = Callable[..., PassViT]
F = TypeVar("F", bound=ModelFactory)

_MODELS: dict[str, ModelFactory] = {}


def register_model(fn: F) -> F:
    """Register a factory under its function name; it must accept ``img_size`` and ``**kwargs``."""
    if fn.__name__ in _MODELS:
        raise ValueError(f"model {fn.__name__!r} is registered twice")
    _MODELS[fn.__name__] = fn
    return fn


def list_models() -> list[str]:
    """Names accepted by :func:`create_model`, sorted."""
    return sorted(_MODELS)


def create_model(name: str, img_size: tuple[int, int] | int = (256, 128), **kwargs: Any) -> PassViT:
    """Build a registered backbone.

    Args:
        name: one of :func:`list_models`.
        img_size: (H, W) the positional embedding is made for.
        **kwargs: :class:`PassViT` arguments overriding the factory's
            (``depth``, ``drop_path_rate``, ...).

    Raises:
        ConfigError (a ValueError): unknown name; the message lists the valid ones.
    """
    if name not in _MODELS:
        raise ConfigError(f"unknown model {name!r}; valid names: {', '.join(list_models())}")
    return _MODELS[name](img_size=img_size, **kwargs)


def _vit(
    img_size: tuple[int, int] | int, arch: dict[str, Any], overrides: dict[str, Any]
) -> PassViT:
    return PassViT(img_size=img_size, **{**arch, **overrides})


@register_model
def pass_vit_tiny(img_size: tuple[int, int] | int = (256, 128), **kwargs: Any) -> PassViT:
    """ViT-Ti/16 (D 192, 3 heads): CPU demos and tests."""
    return _vit(img_size, dict(patch_size=16, embed_dim=192, depth=12, num_heads=3), kwargs)


@register_model
def pass_vit_small(img_size: tuple[int, int] | int = (256, 128), **kwargs: Any) -> PassViT:
    """ViT-S/16 (D 384, 6 heads): the published PASS main model."""
    return _vit(img_size, dict(patch_size=16, embed_dim=384, depth=12, num_heads=6), kwargs)


@register_model
def pass_vit_base(img_size: tuple[int, int] | int = (256, 128), **kwargs: Any) -> PassViT:
    """ViT-B/16 (D 768, 12 heads)."""
    return _vit(img_size, dict(patch_size=16, embed_dim=768, depth=12, num_heads=12), kwargs)
