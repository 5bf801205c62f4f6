"""Interrupted and damaged training runs: nothing is lost, a resume is exact, every checkpoint says where it came from.

The runs are real ``python -m passreid train`` processes on a tiny synthetic set
(pass_vit_tiny with one block at 64x32, batches of 2 identities x 4 images, four
short epochs, no loader workers, one thread): a reference run goes through
uninterrupted, the others are killed (SIGKILL) or stopped (SIGTERM) after the
first epoch's ``last.pth`` appears, resumed with ``--resume``, and must end with
exactly the reference weights.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

import passreid
from passreid.cli import main as cli_main
from passreid.commands.train import EXIT_STOPPED
from passreid.config import config_to_dict, load_config
from passreid.data.datasets import build_dataset, dataset_fingerprint
from passreid.data.synthetic import generate_synthetic
from passreid.engine import load_training_checkpoint
from passreid.errors import DatasetError
from passreid.finetune import FinetuneConfig, run_finetune

EPOCHS = 4
RECIPE = {
    "data": {"dataset": "synthetic", "img_size": [64, 32], "num_workers": 0},
    "model": {"name": "pass_vit_tiny", "depth": 1, "drop_path_rate": 0.1, "pretrained": ""},
    "run": {"seed": 3, "epochs": EPOCHS, "eval_every": EPOCHS, "log_every": 1000, "device": "cpu",
            "precision": "fp32"},
    "optim": {"lr": 0.01, "warmup_epochs": 1, "warmup_factor": 0.1, "batch_size": 8, "num_instances": 4},
    "test": {"batch_size": 32},
}
# One thread: the runs are as fast as they get on a shared 2-core machine, and bitwise repeatable.
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
RUN_TIMEOUT_S = 120

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A synthetic set (6 training identities, ~40 images) and the tiny recipe pointing at it."""
    root = tmp_path_factory.mktemp("interrupt")
    generate_synthetic(root / "data", num_ids=12, num_cams=3, seed=0, img_size=(64, 32), images_per_cam=3,
                       num_distractors=2, num_junk=1)
    recipe = {**RECIPE, "data": {**RECIPE["data"], "root": str(root / "data")}}
    (root / "tiny.yaml").write_text(yaml.safe_dump(recipe, sort_keys=False))
    return root


def train_command(workdir: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "passreid", "train", str(workdir / "tiny.yaml"), f"run.output_dir={out}", *extra]


def run_to_end(workdir: Path, out: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(train_command(workdir, out, *extra), env=ENV, cwd=workdir, capture_output=True, text=True,
                          timeout=RUN_TIMEOUT_S)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def start_and_wait_for_first_checkpoint(workdir: Path, out: Path) -> subprocess.Popen[str]:
    """Start a run and return as soon as ``last.pth`` (written at the end of epoch 1) exists."""
    proc = subprocess.Popen(train_command(workdir, out), env=ENV, cwd=workdir, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + RUN_TIMEOUT_S
    while not (out / "last.pth").exists():
        if proc.poll() is not None:
            raise AssertionError(f"the run ended before writing last.pth:\n{proc.stderr.read()[-3000:]}")
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError("no last.pth after the time limit")
        time.sleep(0.005)
    return proc


def weights(path: Path) -> dict[str, torch.Tensor]:
    return load_training_checkpoint(path)["model"]


def assert_same_weights(got: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert got.keys() == expected.keys()
    different = [k for k in expected if not torch.equal(got[k], expected[k])]
    assert not different, f"{len(different)} tensors differ from the uninterrupted run, e.g. {different[:5]}"


@pytest.fixture(scope="module")
def reference(workdir: Path) -> Path:
    """The uninterrupted run's directory."""
    out = workdir / "reference"
    run_to_end(workdir, out)
    return out


# ----------------------------------------------------------------------------- interruptions


@pytest.mark.slow
def test_sigkill_mid_run_then_resume_gives_the_uninterrupted_weights(workdir: Path, reference: Path) -> None:
    out = workdir / "killed"
    proc = start_and_wait_for_first_checkpoint(workdir, out)
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=RUN_TIMEOUT_S)
    assert proc.returncode == -signal.SIGKILL  # killed while still training, not after finishing
    saved = load_training_checkpoint(out / "last.pth")  # whatever the kill interrupted, last.pth is whole
    assert 1 <= saved["epoch"] < EPOCHS
    assert not [p.name for p in out.iterdir() if p.name.endswith(".tmp")]

    run_to_end(workdir, out, "--resume")
    assert load_training_checkpoint(out / "last.pth")["epoch"] == EPOCHS
    assert_same_weights(weights(out / "last.pth"), weights(reference / "last.pth"))
    epochs = [json.loads(line)["epoch"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert epochs == list(range(1, EPOCHS + 1))  # nothing lost, nothing logged twice


@pytest.mark.slow
def test_sigterm_saves_exits_cleanly_and_resumes_to_the_same_weights(workdir: Path, reference: Path) -> None:
    out = workdir / "terminated"
    proc = start_and_wait_for_first_checkpoint(workdir, out)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=RUN_TIMEOUT_S)
    assert proc.returncode == EXIT_STOPPED, stderr[-3000:]
    assert "Traceback" not in stderr
    assert "training stopped after" in stderr and "--resume" in stderr
    saved = load_training_checkpoint(out / "last.pth")
    assert saved["epoch"] < EPOCHS  # stopped early, and said where
    assert not (out / "model.pth").exists()  # an unfinished run exports nothing

    run_to_end(workdir, out, "--resume")
    assert_same_weights(weights(out / "last.pth"), weights(reference / "last.pth"))
    assert (out / "model.pth").is_file()


def stop_during_call(patch: pytest.MonkeyPatch, owner: object, name: str, n: int) -> None:
    """Send this process SIGINT during the ``n``-th call of ``owner.name``: the run saves after that step."""
    original = getattr(owner, name)
    calls = {"n": 0}

    def wrapper(*args: object, **kwargs: object) -> object:
        calls["n"] += 1
        if calls["n"] == n:
            os.kill(os.getpid(), signal.SIGINT)  # this process only: the loader workers never see it
        return original(*args, **kwargs)

    patch.setattr(owner, name, wrapper)


def test_stop_inside_an_epoch_with_two_loader_workers_resumes_to_the_weights_of_any_worker_count(
    workdir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`passreid train` with 2 workers, Ctrl-C at step 3 of epoch 1, `--resume`: the weights of an uninterrupted
    run without workers (every image's augmentation is seeded by its position in the epoch)."""
    from passreid.losses.reid import ReIDLoss

    def train(out: Path, workers: int, *extra: str) -> int:
        return cli_main(["train", str(workdir / "tiny.yaml"), f"run.output_dir={out}", "run.epochs=2",
                         "run.eval_every=2", f"data.num_workers={workers}", *extra])

    assert train(tmp_path / "straight", 0) == 0
    with monkeypatch.context() as patch:
        stop_during_call(patch, ReIDLoss, "forward", 3)
        assert train(tmp_path / "stopped", 2) == EXIT_STOPPED
    saved = load_training_checkpoint(tmp_path / "stopped" / "last.pth")
    assert (saved["epoch"], saved["resume_step"]) == (0, 3)
    assert train(tmp_path / "stopped", 2, "--resume") == 0
    assert_same_weights(weights(tmp_path / "stopped" / "last.pth"), weights(tmp_path / "straight" / "last.pth"))


# ----------------------------------------------------------------------------- provenance


def test_every_checkpoint_records_config_versions_and_data_fingerprint(workdir: Path, reference: Path) -> None:
    resolved = config_to_dict(load_config(FinetuneConfig, workdir / "tiny.yaml", [f"run.output_dir={reference}"]))
    fingerprint = dataset_fingerprint(build_dataset("synthetic", workdir / "data").train)
    assert fingerprint["num_images"] > 0 and len(fingerprint["list_sha1"]) == 40
    for name in ("last.pth", "best.pth"):
        ckpt = load_training_checkpoint(reference / name)
        assert ckpt["config"] == resolved, name
        meta = ckpt["meta"]
        assert meta["passreid_version"] == passreid.__version__, name
        assert meta["torch_version"] == torch.__version__, name
        assert meta["dataset"] == fingerprint, name
    sidecar = json.loads((reference / "model.json").read_text())  # the export's provenance sits beside it
    assert sidecar["config"] == resolved and sidecar["meta"]["dataset"] == fingerprint
    assert sidecar["meta"]["passreid_version"] == passreid.__version__


@pytest.mark.parametrize("name", ["last.pth", "best.pth", "model.pth"])
def test_info_shows_config_versions_and_fingerprint(
    workdir: Path, reference: Path, name: str, capsys: pytest.CaptureFixture[str]
) -> None:
    fingerprint = dataset_fingerprint(build_dataset("synthetic", workdir / "data").train)
    assert cli_main(["info", str(reference / name), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["meta"]["passreid_version"] == passreid.__version__
    assert info["meta"]["torch_version"] == torch.__version__
    assert info["meta"]["dataset"] == fingerprint
    assert info["config"]["optim"]["batch_size"] == RECIPE["optim"]["batch_size"]
    assert info["config"]["data"]["root"] == str(workdir / "data")

    assert cli_main(["info", str(reference / name)]) == 0
    table = capsys.readouterr().out
    for text in ("passreid_version", passreid.__version__, torch.__version__, fingerprint["list_sha1"],
                 "optim.lr"):
        assert text in table, text


# ----------------------------------------------------------------------------- corrupt images while training


def damaged_copy(workdir: Path, dest: Path) -> tuple[Path, Path]:
    """A copy of the data set whose first training image is zero bytes long."""
    root = Path(shutil.copytree(workdir / "data", dest))
    bad = Path(build_dataset("synthetic", root).train[0].path)
    bad.write_bytes(b"")
    return root, bad


def tiny_config(workdir: Path, root: Path, out: Path, *extra: str) -> FinetuneConfig:
    """One epoch that reads every training image: the published P x K epoch may leave the damaged one out."""
    return load_config(FinetuneConfig, workdir / "tiny.yaml",
                       [f"data.root={root}", f"run.output_dir={out}", "run.epochs=1", "run.eval_every=1",
                        "optim.cover_all_images=true", *extra])


@pytest.mark.parametrize("workers", [0, 1])
def test_corrupt_training_image_stops_with_its_name(workdir: Path, tmp_path: Path, workers: int) -> None:
    """Without skip_corrupt a bad file is a DatasetError naming it, also when read in a loader worker."""
    root, bad = damaged_copy(workdir, tmp_path / "data")
    cfg = tiny_config(workdir, root, tmp_path / "run", f"data.num_workers={workers}")
    with pytest.raises(DatasetError) as err:
        run_finetune(cfg)
    assert str(bad) in str(err.value) and "empty (0 bytes)" in str(err.value)


def test_corrupt_training_image_is_skipped_and_counted_with_skip_corrupt(
    workdir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    root, bad = damaged_copy(workdir, tmp_path / "data")
    cfg = tiny_config(workdir, root, tmp_path / "run", "data.skip_corrupt=true")
    result = run_finetune(cfg)
    assert not result["stopped"] and result["model"] is not None
    assert 0.0 <= result["metrics"]["mAP"] <= 1.0
    skips = [r.getMessage() for r in caplog.records if "skipping a bad image" in r.getMessage()]
    assert skips and "(1 skipped so far)" in skips[0] and str(bad) in skips[0]
