"""``benchmarks/bench_pretrain_quality.py``: a benchmark of hours picks up the pretraining runs it left behind."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest

from conftest import benchmark_module
from passreid.data.synthetic import generate_pool

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = ["run.epochs=1", "data.batch_size=8", "data.num_workers=0", "model.depth=1", "model.out_dim=32",
        "model.hidden_dim=16", "model.bottleneck_dim=8", "run.device=cpu"]


@pytest.fixture(scope="module")
def bench() -> Iterator[ModuleType]:
    with benchmark_module("bench_pretrain_quality") as module:
        yield module


def test_pretraining_is_reused_when_finished_and_resumed_when_interrupted(bench: ModuleType, tmp_path: Path) -> None:
    pool = tmp_path / "pool"
    generate_pool(pool, num_images=16, seed=0)
    backbone, seconds = bench.pretrain("pass", 0, pool, tmp_path, TINY)
    assert backbone == tmp_path / "pass-0" / "backbone.pth" and seconds > 0
    records = (tmp_path / "pass-0" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(r)["epoch"] for r in records] == [1]

    # Finished: read back, not trained again (a run folder that is not empty would otherwise be refused).
    stamp = backbone.stat().st_mtime_ns
    assert bench.pretrain("pass", 0, pool, tmp_path, TINY) == (backbone, None)
    assert backbone.stat().st_mtime_ns == stamp

    # Interrupted after its last checkpoint (no export yet): resumed from last.pth, no epoch trained twice.
    backbone.unlink()
    backbone_again, seconds = bench.pretrain("pass", 0, pool, tmp_path, TINY)
    assert backbone_again == backbone and backbone.is_file() and seconds > 0
    assert (tmp_path / "pass-0" / "metrics.jsonl").read_text().splitlines() == records
