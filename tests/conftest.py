"""Fixtures shared by several test modules."""

from __future__ import annotations

import importlib.util
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]

SPAWN_TIMEOUT_S = 180.0
"""How long spawned DDP workers may run before they count as hung (a normal run takes under 20 s);
below the per-test timeout in pyproject.toml, so that the workers are killed, not left behind."""


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models gain nothing from threads, and on a shared 2-core machine extra threads only contend.

    Modules opt in with ``pytestmark = pytest.mark.usefixtures("one_thread")``.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _spawn_and_join(fn: Callable[..., None], args: tuple[Any, ...], nprocs: int,
                    timeout_s: float = SPAWN_TIMEOUT_S) -> None:
    """``mp.spawn(fn, args, nprocs)`` that cannot hang the suite.

    A worker still running after ``timeout_s`` (e.g. stuck in ``destroy_process_group``,
    seen on torch 2.5.1) fails the test, and every worker left is killed, also when
    one raised or the test was interrupted, so none outlives the test.
    """
    import torch.multiprocessing as mp

    context = mp.start_processes(fn, args=args, nprocs=nprocs, join=False, start_method="spawn")
    deadline = time.monotonic() + timeout_s
    try:
        while not context.join(timeout=min(5.0, max(0.1, deadline - time.monotonic()))):
            if time.monotonic() >= deadline:
                alive = [rank for rank, p in enumerate(context.processes) if p.is_alive()]
                pytest.fail(f"spawned workers {alive} still running after {timeout_s:.0f} s (hung); killed them")
    finally:
        for process in context.processes:
            if process.is_alive():
                process.kill()
                process.join()


@pytest.fixture
def spawn() -> Callable[..., None]:
    """Run ``fn(rank, *args)`` in ``nprocs`` spawned processes, failing instead of hanging (see ``_spawn_and_join``)."""
    return _spawn_and_join


@contextmanager
def benchmark_module(name: str) -> Iterator[ModuleType]:
    """``benchmarks/<name>.py`` imported as module ``name`` (the scripts are not a package).

    The module is registered in ``sys.modules`` while in use, since dataclasses and pickling look
    their module up there, and removed afterwards.
    """
    spec = importlib.util.spec_from_file_location(name, REPO / "benchmarks" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.modules.pop(name, None)
