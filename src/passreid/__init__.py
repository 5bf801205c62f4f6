"""passreid: part-aware self-supervised pre-training (PASS) for person re-identification.

>>> import passreid
>>> backbone = passreid.create_model("pass_vit_small", img_size=(256, 128))
>>> report = passreid.load_checkpoint(backbone, "pass_vit_small_full.pth")
>>> model = passreid.load("finetuned.pth")          # a ready ReID model
>>> feats = model.extract(["a.jpg", "b.jpg"])
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

# Public names and the module that defines each; imported on first use so that
# `import passreid` stays cheap and the CLI starts fast.
_EXPORTS = {
    "create_model": "passreid.models",
    "list_models": "passreid.models",
    "load_checkpoint": "passreid.checkpoint",
    "load": "passreid.api",
    "Gallery": "passreid.api",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'passreid' has no attribute {name!r}")
