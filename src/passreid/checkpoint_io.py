"""Reading and writing checkpoint files: weights-only loading, atomic saving, provenance, exports.

Every reader goes through :func:`safe_load` (``weights_only`` unpickling; the
only class allowed besides tensors and containers is ``argparse.Namespace``,
which published pretraining checkpoints store under ``args``).
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
from pathlib import Path
from typing import Any

import torch

from passreid._compat import safe_globals
from passreid.errors import CheckpointError
from passreid.fileio import atomic_write, write_text_atomic

logger = logging.getLogger(__name__)

SAFE_GLOBALS: tuple[type, ...] = (argparse.Namespace,)
"""Classes weights-only loading accepts besides tensors and containers (published ``args``)."""


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
