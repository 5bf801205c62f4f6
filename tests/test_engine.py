"""Run plumbing: RNG capture, run directory, training checkpoints, resume checks, faults."""

from __future__ import annotations

import json
import os
import random
import signal
from pathlib import Path

import numpy as np
import pytest
import torch

from passreid import engine
from passreid.errors import ConfigError, TrainingError


def draw() -> tuple[float, float, float]:
    return random.random(), float(np.random.rand()), float(torch.rand(1))


def test_rng_state_round_trips_through_a_weights_only_file(tmp_path):
    engine.seed_everything(7)
    state = engine.capture_rng_state()
    torch.save(state, tmp_path / "rng.pth")
    expected = draw()
    draw()  # move every stream on
    engine.restore_rng_state(torch.load(tmp_path / "rng.pth", weights_only=True))
    assert draw() == expected


def test_seed_differs_per_rank():
    engine.seed_everything(3, rank=0)
    a = draw()
    engine.seed_everything(3, rank=1)
    assert draw() != a


def test_training_checkpoint_round_trip(tmp_path):
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    model(torch.randn(4, 3)).sum().backward()
    opt.step()
    sched.step()
    engine.save_training_checkpoint(tmp_path / "last.pth", model=model, optimizer=opt, scheduler=sched, scaler=None,
                                    epoch=4, config={"run": {"epochs": 9}}, fingerprint={"num_images": 3})
    ckpt = engine.load_training_checkpoint(tmp_path / "last.pth")
    assert set(ckpt) == {"model", "optimizer", "scheduler", "scaler", "rng", "epoch", "config", "meta"}
    assert ckpt["meta"]["dataset"] == {"num_images": 3}
    assert ckpt["meta"]["torch_version"] == torch.__version__

    fresh = torch.nn.Linear(3, 2)
    fresh_opt = torch.optim.SGD(fresh.parameters(), lr=0.1, momentum=0.9)
    fresh_sched = torch.optim.lr_scheduler.StepLR(fresh_opt, step_size=1, gamma=0.5)
    next_epoch = engine.restore_training_state(ckpt, model=fresh, optimizer=fresh_opt, scheduler=fresh_sched,
                                               scaler=None)
    assert next_epoch == 5
    assert torch.equal(fresh.weight, model.weight)
    assert fresh_opt.param_groups[0]["lr"] == pytest.approx(0.05)
    assert torch.equal(fresh_opt.state_dict()["state"][0]["momentum_buffer"],
                       opt.state_dict()["state"][0]["momentum_buffer"])


def test_load_training_checkpoint_rejects_other_files(tmp_path):
    torch.save({"weight": torch.zeros(1)}, tmp_path / "plain.pth")
    with pytest.raises(TrainingError, match="plain.pth"):
        engine.load_training_checkpoint(tmp_path / "plain.pth")


def test_run_dir_metrics_and_truncation(tmp_path):
    run = engine.RunDir(tmp_path / "run")
    for epoch in (1, 2, 3):
        run.log_metrics({"epoch": epoch, "loss": 1.0 / epoch})
    assert [r["epoch"] for r in run.read_metrics()] == [1, 2, 3]
    run.truncate_metrics(2)
    lines = run.metrics_path.read_text().splitlines()
    assert [json.loads(x)["epoch"] for x in lines] == [1, 2]
    run.close()
    assert any((tmp_path / "run" / "tb").iterdir())


def test_run_dir_on_other_ranks_writes_nothing(tmp_path):
    run = engine.RunDir(tmp_path / "run", is_main=False)
    run.log_metrics({"epoch": 1})
    run.write_config("a: 1\n")
    assert not (tmp_path / "run").exists()


def test_resume_path_defaults_to_last(tmp_path):
    run = engine.RunDir(tmp_path)
    assert engine.resolve_resume_path(None, run) is None
    with pytest.raises(TrainingError, match="last.pth"):
        engine.resolve_resume_path("", run)
    run.last.write_bytes(b"x")
    assert engine.resolve_resume_path("", run) == run.last


def test_resume_with_changed_config_is_refused_unless_forced():
    saved = {"optim": {"lr": 0.1}, "run": {"output_dir": "a"}}
    engine.check_resume_config(saved, {"optim": {"lr": 0.1}, "run": {"output_dir": "b"}})
    with pytest.raises(ConfigError, match=r"optim\.lr: 0\.1 -> 0\.2"):
        engine.check_resume_config(saved, {"optim": {"lr": 0.2}, "run": {"output_dir": "a"}})
    engine.check_resume_config(saved, {"optim": {"lr": 0.2}, "run": {"output_dir": "a"}}, force=True)


def test_non_finite_loss_stops_naming_step_and_checkpoint(tmp_path):
    good = torch.tensor(1.0)
    assert engine.loss_is_finite(good, step=1, epoch=1, last_checkpoint=None, skip=False)
    last = tmp_path / "last.pth"
    last.write_bytes(b"x")
    with pytest.raises(TrainingError) as err:
        engine.loss_is_finite(torch.tensor(float("nan")), step=17, epoch=3, last_checkpoint=last, skip=False)
    assert "step 17" in str(err.value) and "epoch 3" in str(err.value) and str(last) in str(err.value)
    assert not engine.loss_is_finite(torch.tensor(float("inf")), step=1, epoch=1, last_checkpoint=None, skip=True)


def test_graceful_stop_turns_sigterm_into_a_flag():
    previous = signal.getsignal(signal.SIGTERM)
    with engine.GracefulStop() as stop:
        assert not stop.requested
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.requested
    assert signal.getsignal(signal.SIGTERM) == previous


def test_precision_and_autocast_on_cpu():
    cpu = torch.device("cpu")
    assert engine.resolve_precision("auto", cpu) == "fp32"
    assert engine.resolve_precision("bf16", cpu) == "fp32"
    assert not engine.make_grad_scaler("fp32", cpu).is_enabled()
    with engine.autocast(cpu, "fp32"):
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.float32


RECIPES = Path(__file__).resolve().parents[1] / "configs"


def test_each_recipe_resolves_to_its_published_precision(caplog):
    """Published: pretraining and fine-tuning train in fp16 with a loss scaler, evaluation and cluster
    contrast run in fp32. Only the resolution is checked, for a GPU device (nothing runs on it)."""
    from passreid.cluster import ClusterConfig
    from passreid.config import load_config
    from passreid.finetune import FinetuneConfig
    from passreid.pretrain import PretrainConfig

    gpu, cpu = torch.device("cuda"), torch.device("cpu")
    stages = [(FinetuneConfig, "finetune", "fp16"), (PretrainConfig, "pretrain", "fp16"),
              (ClusterConfig, "usl", "fp32"), (ClusterConfig, "uda", "fp32")]
    for schema, folder, expected in stages:
        recipes = [p for p in sorted((RECIPES / folder).glob("*.yaml")) if p.name != "base.yaml"]
        assert recipes
        for recipe in recipes:
            cfg = load_config(schema, recipe)
            assert engine.resolve_precision(cfg.run.precision, gpu) == expected, recipe
            assert engine.resolve_precision(cfg.run.precision, cpu) == "fp32", recipe  # CPU: no autocast
            if schema is FinetuneConfig:
                assert cfg.test.precision == "fp32"
    assert load_config(ClusterConfig, None).run.precision == "fp32"
    assert engine.resolve_precision("bf16", gpu) == "bf16"  # kept as an option
    with caplog.at_level("WARNING", logger="passreid.runtime"):
        assert engine.resolve_precision("fp16", cpu) == "fp32"
    assert "GPU-only" in caplog.text and "fp32" in caplog.text


def test_cuda_device_without_gpu_is_a_clear_error():
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    with pytest.raises(ConfigError, match="CUDA is not available"):
        engine.resolve_device("cuda")


def test_cosine_value_ends_and_midpoint():
    assert engine.cosine_value(1.0, 0.0, 0.0) == pytest.approx(1.0)
    assert engine.cosine_value(1.0, 0.0, 1.0) == pytest.approx(0.0)
    assert engine.cosine_value(0.996, 1.0, 0.5) == pytest.approx(0.998)


def test_unwrap_returns_the_inner_module():
    inner = torch.nn.Linear(2, 2)

    class Wrapper(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.module = inner

    assert engine.unwrap(Wrapper()) is inner


def test_cores_beside_workers_gives_each_worker_a_core_on_cpu_and_restores():
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(3)
        with engine.cores_beside_workers(1, "cpu"):
            assert torch.get_num_threads() == 2
        assert torch.get_num_threads() == 3
        with engine.cores_beside_workers(8, "cpu"):
            assert torch.get_num_threads() == 1  # never below one thread
        with engine.cores_beside_workers(0, "cpu"):
            assert torch.get_num_threads() == 3  # no workers: nothing to leave room for
        with pytest.raises(RuntimeError), engine.cores_beside_workers(2, "cpu"):
            raise RuntimeError("a failing step")
        assert torch.get_num_threads() == 3  # restored after an error too
    finally:
        torch.set_num_threads(before)


def test_training_run_restores_the_signal_handlers_when_an_epoch_raises(tmp_path):
    import signal
    from dataclasses import dataclass, field

    from passreid.config import RunConfig
    from passreid.training.run import TrainingRun

    @dataclass
    class Cfg:
        run: RunConfig = field(default_factory=lambda: RunConfig(output_dir=str(tmp_path / "run"), epochs=3,
                                                                 device="cpu"))

    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(RuntimeError, match="boom"), TrainingRun(Cfg()) as run:
        for _ in run.epochs():
            assert signal.getsignal(signal.SIGTERM) is not before
            raise RuntimeError("boom")
    assert signal.getsignal(signal.SIGTERM) is before
