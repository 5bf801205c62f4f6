"""Claiming a run folder for one training run: a lock held for the run's life, no silent overwrite.

Two runs writing into one folder interleave ``metrics.jsonl`` and leave whichever
checkpoints finished last; a re-run without ``--resume`` would silently replace
a finished run. :func:`claim_run_folder` prevents both:

* a lock file (``.passreid.lock``, holding pid, host and start time) is held with
  ``flock`` for the run's life, so a second run into the folder is refused with
  the holder named. The kernel drops the lock when its process dies, so the file
  left by a killed run is recognised as stale and taken over;
* a folder that already holds a run is refused unless the run is resumed or
  ``--overwrite`` was given (which clears the old run's files first);
* a run that fails before writing its first ``last.pth`` leaves no folder behind.

This module imports no torch, so the lock costs nothing at start-up.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import logging
import os
import shutil
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from passreid.errors import ConfigError, TrainingError

try:
    import fcntl
except ImportError:  # Windows: fall back to checking whether the recorded pid is alive
    fcntl = None  # type: ignore[assignment]

logger = logging.getLogger(__name__)

LOCK_NAME = ".passreid.lock"
"""The lock file inside a run folder."""

RUN_ARTEFACTS = ("config.yaml", "last.pth", "best.pth", "metrics.jsonl", "tb", "model.pth", "model.json")
"""Names that mark a folder as a passreid run folder (DESIGN §8 layout plus the exported model)."""


def lock_holder(path: str | os.PathLike) -> dict[str, Any]:
    """What a lock file says about its holder (``pid``, ``host``, ``started``); ``{}`` if unreadable."""
    try:
        data = json.loads(Path(path).read_text() or "{}")
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by someone else
        return True
    except OSError:
        return False
    return True


def _describe(holder: dict[str, Any]) -> str:
    since = f" since {holder['started']}" if holder.get("started") else ""
    return f"pid {holder.get('pid', '?')} on host {holder.get('host', '?')}{since}"


class RunFolderLock:
    """An exclusive lock on a run folder, held until :meth:`release`."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.path = folder / LOCK_NAME
        self._fd: int | None = None

    def acquire(self) -> None:
        """Take the lock or raise :class:`TrainingError` naming the run that holds it."""
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        previous = lock_holder(self.path)
        try:
            if fcntl is not None:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except OSError:
                    raise self._in_use(previous) from None
            elif previous and self._held_elsewhere(previous):
                raise self._in_use(previous)
        except BaseException:
            os.close(fd)
            raise
        if previous:
            logger.warning("run folder %s: taking over the stale lock of %s (that run is no longer running)",
                           self.folder, _describe(previous))
        me = {"pid": os.getpid(), "host": socket.gethostname(),
              "started": datetime.datetime.now().isoformat(timespec="seconds")}
        os.ftruncate(fd, 0)
        os.write(fd, (json.dumps(me) + "\n").encode())
        os.fsync(fd)
        self._fd = fd

    @staticmethod
    def _held_elsewhere(holder: dict[str, Any]) -> bool:
        """Without ``flock``: held unless the holder is a dead process of this host."""
        if holder.get("host") != socket.gethostname():
            return True
        pid = holder.get("pid")
        return isinstance(pid, int) and pid != os.getpid() and _pid_alive(pid)

    def _in_use(self, holder: dict[str, Any]) -> TrainingError:
        return TrainingError(
            f"run folder {self.folder} is in use by another run ({_describe(holder)}); wait for it to end or "
            f"choose another run.output_dir (if no such run exists, delete {self.path})"
        )

    def release(self) -> None:
        """Drop the lock and remove the lock file."""
        if self._fd is None:
            return
        with contextlib.suppress(OSError):
            self.path.unlink()
        os.close(self._fd)  # closing the descriptor releases the flock
        self._fd = None


def _run_entries(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.name != LOCK_NAME)


def _clear_old_run(folder: Path, entries: list[Path]) -> None:
    """``--overwrite``: delete the previous run's files, but only in a folder that holds nothing else."""
    foreign = [p.name for p in entries if p.name not in RUN_ARTEFACTS and not p.name.endswith(".tmp")]
    if not any(p.name in RUN_ARTEFACTS for p in entries) or foreign:
        raise ConfigError(
            f"--overwrite: {folder} holds files that are not from a passreid run ({', '.join(foreign[:5]) or '?'}); "
            "nothing was deleted: choose an empty or new run.output_dir"
        )
    for entry in entries:
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()
    logger.warning("--overwrite: deleted the previous run in %s (%s)", folder, ", ".join(p.name for p in entries))


@contextlib.contextmanager
def claim_run_folder(folder: str | os.PathLike, *, resume: bool = False, overwrite: bool = False,
                     is_main: bool = True) -> Iterator[Path]:
    """Hold ``folder`` for one run (see the module docstring); yields the folder.

    Args:
        folder: the run's ``run.output_dir`` (created if needed).
        resume: the run continues a checkpoint (``--resume``): a non-empty folder is expected.
        overwrite: a folder holding a previous run may be cleared (``--overwrite``).
        is_main: only the main process of a ``torchrun`` job claims the folder; on others
            this does nothing.

    Raises:
        TrainingError: another live run holds the folder.
        ConfigError: the folder holds a run and neither ``resume`` nor ``overwrite`` is set,
            or ``folder`` is a file.
    """
    path = Path(folder)
    if not is_main:
        yield path
        return
    if path.exists() and not path.is_dir():
        raise ConfigError(f"config key 'run.output_dir': {path} is a file, not a folder")
    created = not path.exists()
    path.mkdir(parents=True, exist_ok=True)
    lock = RunFolderLock(path)
    try:
        lock.acquire()
    except BaseException:
        if created:
            shutil.rmtree(path, ignore_errors=True)
        raise
    was_empty = False
    try:
        entries = _run_entries(path)
        was_empty = not entries
        if entries and not resume:
            if not overwrite:
                names = ", ".join(p.name for p in entries[:5]) + (", ..." if len(entries) > 5 else "")
                raise ConfigError(
                    f"run folder {path} is not empty ({names}); continue that run with --resume, start it again "
                    "with --overwrite, or choose another run.output_dir"
                )
            _clear_old_run(path, entries)
            was_empty = True
        yield path
    except BaseException:
        lock.release()
        if was_empty and not (path / "last.pth").exists():
            # a failed start: nothing worth keeping was written (no checkpoint to resume from)
            if created:
                shutil.rmtree(path, ignore_errors=True)
            else:
                for entry in _run_entries(path):
                    if entry.is_dir() and not entry.is_symlink():
                        shutil.rmtree(entry, ignore_errors=True)
                    else:
                        entry.unlink(missing_ok=True)
        raise
    else:
        lock.release()
