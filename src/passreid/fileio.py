"""One way to write a file so that a reader sees either the old or the new one: a temporary file
beside it, flushed to disk, then renamed over it (``os.replace``).

A kill or a full disk in the middle leaves the previous file untouched and no
temporary file behind. Every writer of a file that a later run trusts
(checkpoints, exports, ``config.yaml``, feature and index files) goes through
:func:`atomic_write`.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "wb", *, encoding: str | None = None) -> Iterator[IO[Any]]:
    """Open a temporary file beside ``path`` for writing; on a clean exit it replaces ``path``.

    >>> with atomic_write("index.txt", "w", encoding="utf-8") as f:
    ...     f.write("a.jpg\\n")

    The parent folder is created. The temporary file is hidden (``.NAME.XXXX.tmp``)
    and removed when the body raises (the error propagates unchanged). The file
    gets the permissions ``open()`` would give it (0o666 less the umask), not the
    owner-only ones of a temporary file, so a shared run folder stays readable.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.chmod(tmp, 0o666 & ~current_umask())
        with os.fdopen(fd, mode, encoding=encoding) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def current_umask() -> int:
    """The process's umask (read by setting it and putting it back)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """``Path(path).write_text(text)`` through :func:`atomic_write`."""
    with atomic_write(path, "w", encoding="utf-8") as f:
        f.write(text)
