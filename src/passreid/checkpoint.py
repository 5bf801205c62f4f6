"""Checkpoint formats, conversion to the PASS parameter names, atomic saving."""

from __future__ import annotations

import datetime
import os
import tempfile
from pathlib import Path
from typing import Any

import torch

from passreid import __version__


def save_atomic(obj: Any, path: str | os.PathLike) -> None:
    """Write ``obj`` with ``torch.save`` so that ``path`` is either the old or the new file.

    The data goes to a temporary file in the same folder, is flushed to disk and
    then renamed over ``path``; a failure (disk full, kill) leaves the previous
    file untouched and removes the temporary one.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def build_meta(fingerprint: dict[str, Any] | None = None) -> dict[str, Any]:
    """The provenance stored beside every checkpoint and export (DESIGN §8)."""
    return {
        "passreid_version": __version__,
        "torch_version": torch.__version__,
        "dataset": fingerprint,
        "time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
