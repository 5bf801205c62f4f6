"""``benchmarks/gpu_check.py --cpu``: the dry run of the one-command GPU check, through every CPU-capable stage."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest

from conftest import benchmark_module

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def gpu_check() -> Iterator[ModuleType]:
    with benchmark_module("gpu_check") as module:
        yield module


CPU_STAGES = ["finetune-tiny", "pretrain-tiny", "multicrop-cuda", "usl-vit-s", "uda-tiny", "eval-cuda",
              "jaccard-cuda"]


def test_cpu_dry_run_passes_every_stage_and_prints_one_json_line(
    gpu_check: ModuleType, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """ONNX export is left out here (tests/test_export.py covers it); NCCL and the benchmarks are skipped on CPU."""
    code = gpu_check.main(["--cpu", "--workdir", str(tmp_path), "--stages", *CPU_STAGES, "nccl", "bench-eval"])
    out = capsys.readouterr().out
    assert code == 0, out
    (line,) = out.strip().splitlines()
    report = json.loads(line)
    assert report["ok"] is True and report["failed"] == [] and report["device"] == "cpu"
    stages = report["stages"]
    assert list(stages) == ["env", "data", *CPU_STAGES[:2], CPU_STAGES[2], *CPU_STAGES[3:], "nccl", "bench-eval"]
    assert all(stages[name]["ok"] is True for name in ["env", "data", *CPU_STAGES])
    assert stages["finetune-tiny"]["epoch"] == 1 and 0.0 <= stages["finetune-tiny"]["mAP"] <= 1.0
    assert stages["pretrain-tiny"]["backbone"] is True
    assert stages["multicrop-cuda"]["global"][:2] == [2, 2] and stages["multicrop-cuda"]["local"][0] == 9
    assert stages["eval-cuda"]["plain"]["max_diff_vs_cpu"] == 0.0
    assert stages["nccl"] == {"ok": None, "skipped": "NCCL needs a GPU", "seconds": 0.0}
    assert stages["bench-eval"]["ok"] is None and "--with-benchmarks" in stages["bench-eval"]["skipped"]
    assert (tmp_path / "finetune-tiny" / "model.pth").is_file()


def test_a_failing_stage_is_named_and_the_rest_still_run(
    gpu_check: ModuleType, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def broken(check):
        raise RuntimeError("evaluate on cuda differs from the CPU by 3.00e-02 (rerank=False)")

    stages = [(name, broken if name == "eval-cuda" else fn) for name, fn in gpu_check.STAGES]
    monkeypatch.setattr(gpu_check, "STAGES", stages)
    code = gpu_check.main(["--cpu", "--workdir", str(tmp_path), "--stages", "eval-cuda", "jaccard-cuda"])
    captured = capsys.readouterr()
    assert code == 1
    report = json.loads(captured.out)
    assert report["failed"] == ["eval-cuda"] and report["stages"]["jaccard-cuda"]["ok"] is True
    assert report["stages"]["eval-cuda"]["error"] == (
        "RuntimeError: evaluate on cuda differs from the CPU by 3.00e-02 (rerank=False)")
    assert "gpu_check: error: stage(s) failed: eval-cuda" in captured.err
