"""The torch-version shims and the suite's guard against hung DDP workers."""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from passreid import _compat


def test_torch_version_is_read_from_local_builds() -> None:
    assert _compat.torch_version("2.4.1+cu121") == (2, 4) and _compat.torch_version("2.14.1") == (2, 14)
    assert _compat.TORCH_VERSION >= (2, 4)  # the oldest torch pyproject.toml allows
    with pytest.raises(ValueError, match="torch version"):
        _compat.torch_version("nightly")


def test_safe_globals_allows_the_listed_class_only(tmp_path: Path) -> None:
    path = tmp_path / "ckpt.pth"
    torch.save({"args": argparse.Namespace(lr=0.1)}, path)
    with _compat.safe_globals([argparse.Namespace]):
        assert torch.load(path, weights_only=True)["args"] == argparse.Namespace(lr=0.1)
    torch.save({"path": Path("x")}, path)
    with _compat.safe_globals([argparse.Namespace]), pytest.raises(Exception, match="PosixPath"):
        torch.load(path, weights_only=True)


def _sleeper(rank: int, pid_file: str) -> None:
    Path(pid_file).write_text(str(os.getpid()))
    time.sleep(600)


def test_hung_spawned_workers_fail_the_test_and_are_killed(tmp_path: Path, spawn: Callable[..., None]) -> None:
    pid_file = tmp_path / "pid"
    with pytest.raises(pytest.fail.Exception, match=r"workers \[0\] still running after 5 s"):
        spawn(_sleeper, (str(pid_file),), nprocs=1, timeout_s=5.0)
    if pid_file.exists():  # the worker got as far as writing its pid: it must be gone now
        with pytest.raises(ProcessLookupError):
            os.kill(int(pid_file.read_text()), 0)


def test_destroy_process_group_ends_a_gloo_group(tmp_path: Path) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'init'}", rank=0, world_size=1)
    try:
        total = torch.ones(3)
        dist.all_reduce(total)
        assert total.tolist() == [1.0, 1.0, 1.0]
    finally:
        _compat.destroy_process_group()
    assert not dist.is_initialized()
