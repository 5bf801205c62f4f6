"""Supervised fine-tuning: schedule, optimizer, configs, short runs, resume, faults and DDP (CPU, tiny model)."""

from __future__ import annotations

import json
from collections import Counter
import math
import os
import re
import signal
import socket
from pathlib import Path

import pytest
import torch

from passreid import finetune
from passreid.checkpoint import build_model_from_checkpoint, safe_load
from passreid.config import load_config
from passreid.data.datasets import build_dataset, dataset_fingerprint
from passreid.engine import seed_everything
from passreid.errors import ConfigError, TrainingError
from passreid.features import evaluate_model
from passreid.finetune import FinetuneConfig, WarmupCosineLR, build_model, build_optimizer, run_finetune

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "finetune"
IMG = (64, 32)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny tensors gain nothing from intra-op threads, and on a busy machine their spinning costs 10x."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def synth(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """12 training identities (58 images), 12 test identities, 64x32 crops: for the mechanics."""
    from passreid.data.synthetic import generate_synthetic

    root = tmp_path_factory.mktemp("synth")
    generate_synthetic(root, num_ids=24, num_cams=3, images_per_cam=2, img_size=IMG, seed=0, num_distractors=4,
                       num_junk=2)
    return root


@pytest.fixture(scope="module")
def learnable(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """20 training identities (~120 images) at 128x64: enough for a short run to learn something."""
    from passreid.data.synthetic import generate_synthetic

    root = tmp_path_factory.mktemp("learnable")
    generate_synthetic(root, num_ids=40, num_cams=4, images_per_cam=2, img_size=(128, 64), seed=0,
                       num_distractors=4, num_junk=2)
    return root


def tiny_config(root: Path, out: Path, *overrides: str) -> FinetuneConfig:
    base = [
        "data.dataset=synthetic", f"data.root={root}", f"data.img_size=[{IMG[0]},{IMG[1]}]", "data.num_workers=0",
        "model.name=pass_vit_tiny", "model.depth=1", f"run.output_dir={out}", "run.epochs=2",
        "run.eval_every=1", "run.device=cpu", "run.log_every=1", "optim.batch_size=16", "optim.lr=0.05",
        "optim.warmup_epochs=1", "test.batch_size=64",
    ]
    return load_config(FinetuneConfig, None, [*base, *overrides])


def metrics_of(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


# ----------------------------------------------------------------------------- schedule, optimizer, configs


def test_schedule_is_the_published_warmup_then_cosine_one_epoch_behind():
    """Published: timm's scheduler stepped after each epoch, so 1-based epoch e trains at f(e - 1)."""
    model = torch.nn.Linear(2, 2)
    opt = torch.optim.SGD([{"params": [model.weight], "lr": 4e-4}, {"params": [model.bias], "lr": 8e-4}], lr=4e-4)
    sched = WarmupCosineLR(opt, base_lr=4e-4, epochs=120, warmup_epochs=20, warmup_factor=0.01, eta_min_factor=0.002)
    w, m = 4e-6, 8e-7  # absolute warm-up start and floor, shared by both groups
    sched.set_epoch(1)  # the warm-up start itself, for both groups
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([w, w], rel=1e-12)
    sched.set_epoch(2)
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([w + (4e-4 - w) / 20, w + (8e-4 - w) / 20])
    sched.set_epoch(20)  # last warm-up epoch: t = 19
    assert opt.param_groups[0]["lr"] == pytest.approx(w + 19 * (4e-4 - w) / 20)
    sched.set_epoch(21)  # first cosine epoch: cosine of the whole run at t = 20 of 120, ~0.93 x base
    assert opt.param_groups[0]["lr"] == pytest.approx(m + 0.5 * (4e-4 - m) * (1 + math.cos(math.pi / 6)))
    assert opt.param_groups[0]["lr"] / 4e-4 == pytest.approx(0.9331, abs=1e-4)
    sched.set_epoch(120)  # t = 119: one step above the floor
    assert opt.param_groups[0]["lr"] == pytest.approx(m + 0.5 * (4e-4 - m) * (1 + math.cos(math.pi * 119 / 120)))
    state = sched.state_dict()
    fresh = WarmupCosineLR(opt, base_lr=4e-4, epochs=120, warmup_epochs=20, warmup_factor=0.01, eta_min_factor=0.002)
    sched.set_epoch(3)
    fresh.load_state_dict(state)
    assert opt.param_groups[0]["lr"] == pytest.approx(m + 0.5 * (4e-4 - m) * (1 + math.cos(math.pi * 119 / 120)))


def test_train_loader_epoch_has_the_published_number_of_steps(synth, tmp_path):
    """12 identities of 4 or 6 images, K 4: one group each (leftovers dropped), P 4 -> exactly 3 steps.

    With ``optim.cover_all_images`` the 5 identities of 6 images bring a topped-up second
    group: 17 groups, at least 5 steps.
    """
    from passreid.engine import DistInfo

    info = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    dataset = build_dataset("synthetic", str(synth))
    sizes = sorted(Counter(r.pid for r in dataset.train).values())
    assert sizes == [4] * 7 + [6] * 5
    for epoch in (1, 2, 3):
        loader, sampler = finetune.build_train_loader(dataset.train, tiny_config(synth, tmp_path), info)
        sampler.set_epoch(epoch)
        assert len(loader) == 3
        loader, sampler = finetune.build_train_loader(
            dataset.train, tiny_config(synth, tmp_path, "optim.cover_all_images=true"), info)
        sampler.set_epoch(epoch)
        assert len(loader) >= 5


def test_optimizer_gives_biases_twice_the_rate_and_skips_frozen_neck_bias():
    cfg = finetune.OptimConfig(weight_decay=1e-4, weight_decay_bias=0.0)
    model = build_model(finetune.ModelConfig(name="pass_vit_tiny", depth=1), num_classes=5, img_size=IMG)
    opt = build_optimizer(model, cfg, device=torch.device("cpu"))
    weights, biases = opt.param_groups
    assert (weights["lr"], biases["lr"]) == (cfg.lr, 2 * cfg.lr)
    assert (weights["weight_decay"], biases["weight_decay"]) == (1e-4, 0.0)
    names = {id(p): n for n, p in model.named_parameters()}
    assert all(names[id(p)].endswith("bias") for p in biases["params"])
    assert not any(names[id(p)].startswith("bottleneck") and names[id(p)].endswith("bias")
                   for p in biases["params"])  # BNNeck shift is frozen at 0
    assert len(weights["params"]) + len(biases["params"]) == sum(p.requires_grad for p in model.parameters())


@pytest.mark.parametrize("recipe", sorted(p.name for p in CONFIGS.glob("*.yaml")
                                    if p.name not in ("base.yaml", "tiny_cpu.yaml")))
def test_every_recipe_loads_and_names_its_published_numbers(recipe):
    cfg = load_config(FinetuneConfig, CONFIGS / recipe)
    header = (CONFIGS / recipe).read_text().splitlines()[0]
    if recipe == "market_vit_small_mean.yaml":  # a source model only: its published row is the UDA one
        assert "source model of the published UDA Market->MSMT17 row" in header, header
    else:
        assert re.search(r"Published: mAP \d+\.\d, R1 \d+\.\d", header), header
    assert cfg.data.dataset in {"market1501", "msmt17"}
    assert cfg.data.img_size == ([384, 128] if "384" in recipe else [256, 128])
    assert cfg.model.name == ("pass_vit_base" if "vit_base" in recipe else "pass_vit_small")
    assert (cfg.optim.batch_size, cfg.optim.num_instances, cfg.run.epochs) == (64, 4, 120)
    assert recipe.removesuffix(".yaml") in cfg.run.output_dir


def test_tiny_cpu_recipe_is_the_demo_fine_tuning(tmp_path):
    """configs/finetune/tiny_cpu.yaml trains as the demo's finetune stage does, so its numbers carry over."""
    from passreid.demo import DemoContext, finetune_config

    recipe = load_config(FinetuneConfig, CONFIGS / "tiny_cpu.yaml")
    ctx = DemoContext(workdir=tmp_path, source_root=tmp_path, target_root=tmp_path, device=torch.device("cpu"))
    demo = finetune_config(ctx, "finetune")
    for section in ("model", "optim", "loss", "test"):
        assert getattr(recipe, section) == getattr(demo, section), section
    assert (recipe.data.img_size, recipe.data.num_workers) == (demo.data.img_size, demo.data.num_workers)
    assert (recipe.run.epochs, recipe.run.eval_every) == (demo.run.epochs, demo.run.eval_every)
    assert recipe.run.device == "cpu"


def test_market_to_msmt17_uda_starts_from_the_final_model_of_the_mean_fusion_market_recipe():
    from passreid.cluster import ClusterConfig

    source = load_config(FinetuneConfig, CONFIGS / "market_vit_small_mean.yaml")
    cat = load_config(FinetuneConfig, CONFIGS / "market_vit_small.yaml")
    assert (source.data.dataset, source.model.fusion, cat.model.fusion) == ("market1501", "mean", "cat")
    assert source.model.neck == "multi" and source.run.epochs == 120
    assert source.run.output_dir != cat.run.output_dir
    uda = load_config(ClusterConfig, CONFIGS.parent / "uda" / "market_to_msmt17_vit_small.yaml")
    # model.pth is the final epoch's model (best.pth would be the test-selected one)
    assert Path(uda.model.pretrained) == Path(source.run.output_dir) / "model.pth"
    assert uda.model.fusion == "mean"


@pytest.mark.parametrize(
    ("override", "fragment"),
    [
        ("optim.learning_rate=0.1", "optim.learning_rate"),
        ("optim.lr=fast", "optim.lr"),
        ("loss.triplet_margin=wide", "loss.triplet_margin"),
        ("optim.batch_size=30", "optim.batch_size"),
        ("loss.label_smoothing=1.5", "loss.label_smoothing"),
    ],
)
def test_bad_config_names_the_key(override, fragment):
    with pytest.raises(ConfigError, match=re.escape(fragment)):
        load_config(FinetuneConfig, CONFIGS / "market_vit_small.yaml", [override])


def test_triplet_margin_accepts_a_number_or_null():
    assert load_config(FinetuneConfig, None, ["loss.triplet_margin=0.3"]).loss.triplet_margin == 0.3
    assert load_config(FinetuneConfig, None, ["loss.triplet_margin=null"]).loss.triplet_margin is None


# ----------------------------------------------------------------------------- short runs


def test_short_run_learns_beats_random_init_and_exports_the_published_layout(learnable, tmp_path):
    size = (128, 64)
    cfg = tiny_config(learnable, tmp_path / "run", "data.img_size=[128,64]", "run.epochs=6", "run.eval_every=3",
                      "optim.name=adamw", "optim.lr=0.003", "model.drop_path_rate=0.0")
    result = run_finetune(cfg)
    run = tmp_path / "run"
    records = metrics_of(run)
    assert [r["epoch"] for r in records] == list(range(1, 7))
    assert records[-1]["loss"] < records[0]["loss"] - 1.0
    assert ["mAP" in r for r in records] == [False, False, True, False, False, True]

    torch.manual_seed(0)
    dataset = build_dataset("synthetic", learnable)
    random_model = build_model(cfg.model, num_classes=dataset.num_train_pids, img_size=size)
    random_map = evaluate_model(random_model, dataset, img_size=size, num_workers=0)["mAP"]
    assert result["metrics"]["mAP"] > random_map + 0.1, (result["metrics"], random_map)

    assert {p.name for p in run.iterdir()} >= {"config.yaml", "metrics.jsonl", "tb", "last.pth", "best.pth",
                                               "model.pth", "model.json"}
    state = safe_load(run / "model.pth")
    assert all(isinstance(v, torch.Tensor) for v in state.values())
    heads = {k.split(".")[0] for k in state if not k.startswith("base.")}
    assert heads == {"bottleneck", "bottleneck_1", "bottleneck_2", "bottleneck_3", "classifier"}
    assert state["classifier.weight"].shape == (dataset.num_train_pids, 2 * 192)
    side = json.loads((run / "model.json").read_text())
    assert side["meta"]["dataset"] == dataset_fingerprint(dataset.train)
    assert side["config"]["model"]["fusion"] == "cat" and side["config"]["data"]["img_size"] == [128, 64]
    # The export is the final epoch's model: rebuilt from the file alone it scores the last evaluation.
    model, _ = build_model_from_checkpoint(run / "model.pth")
    final = evaluate_model(model, dataset, img_size=size, num_workers=0)["mAP"]
    assert final == pytest.approx(result["metrics"]["mAP"]) and final == pytest.approx(records[-1]["mAP"])
    assert result["best_mAP"] == max(r["mAP"] for r in records if "mAP" in r)


def test_export_is_the_final_epoch_and_best_pth_says_it_was_selected_on_the_test_set(synth, tmp_path, monkeypatch):
    """The test mAP falls after epoch 1, so best.pth is epoch 1 and model.pth must still be epoch 3."""
    import passreid.features

    scores = iter([0.9, 0.5, 0.1])

    def falling_map(*args, **kwargs):
        return {"mAP": next(scores), "mINP": 0.0, "cmc": [0.5] * 10}

    monkeypatch.setattr(passreid.features, "evaluate_model", falling_map)
    run = tmp_path / "final"
    result = run_finetune(tiny_config(synth, run, "run.epochs=3"))
    assert (result["best_epoch"], result["best_mAP"], result["metrics"]["mAP"]) == (1, 0.9, 0.1)
    exported, last, best = safe_load(run / "model.pth"), safe_load(run / "last.pth"), safe_load(run / "best.pth")
    assert all(torch.equal(exported[k], v) for k, v in last["model"].items())
    assert best["epoch"] == 1 and "test set" in best["selected_on"]
    assert not all(torch.equal(exported[k], v) for k, v in best["model"].items())
    assert json.loads((run / "model.json").read_text())["selection"] == "final epoch (3)"

    scores = iter([0.9, 0.5, 0.1])
    run = tmp_path / "best"
    run_finetune(tiny_config(synth, run, "run.epochs=3", "export=best"))  # the earlier behaviour, as an option
    exported, best = safe_load(run / "model.pth"), safe_load(run / "best.pth")
    assert all(torch.equal(exported[k], v) for k, v in best["model"].items())
    assert "selected on the test set" in json.loads((run / "model.json").read_text())["selection"]


def stop_after_epoch(monkeypatch: pytest.MonkeyPatch, epoch: int) -> None:
    """Send ourselves SIGTERM right after the training pass of ``epoch``, as a scheduler would."""
    original = finetune.train_one_epoch

    def spy(*args, **kwargs):
        stats = original(*args, **kwargs)
        if kwargs["epoch"] == epoch:
            os.kill(os.getpid(), signal.SIGTERM)
        return stats

    monkeypatch.setattr(finetune, "train_one_epoch", spy)


def test_resume_after_epoch_one_gives_the_uninterrupted_weights(synth, tmp_path, monkeypatch):
    run_finetune(tiny_config(synth, tmp_path / "straight"))

    cfg = tiny_config(synth, tmp_path / "stopped")
    with monkeypatch.context() as patch:
        stop_after_epoch(patch, 1)
        first = run_finetune(cfg)
    assert first["stopped"] and first["epoch"] == 1 and first["model"] is None
    assert safe_load(tmp_path / "stopped" / "last.pth")["epoch"] == 1
    second = run_finetune(cfg, resume="")
    assert not second["stopped"] and second["epoch"] == 2

    straight = safe_load(tmp_path / "straight" / "last.pth")["model"]
    resumed = safe_load(tmp_path / "stopped" / "last.pth")["model"]
    assert straight.keys() == resumed.keys()
    for key in straight:
        assert torch.equal(straight[key], resumed[key]), key
    assert [r["epoch"] for r in metrics_of(tmp_path / "stopped")] == [1, 2]
    assert metrics_of(tmp_path / "stopped")[1]["mAP"] == metrics_of(tmp_path / "straight")[1]["mAP"]


def test_resume_refuses_a_changed_config_unless_forced(synth, tmp_path, monkeypatch):
    cfg = tiny_config(synth, tmp_path / "run", "run.epochs=3")
    with monkeypatch.context() as patch:
        stop_after_epoch(patch, 1)
        run_finetune(cfg)
    changed = tiny_config(synth, tmp_path / "run", "run.epochs=3", "optim.lr=0.01")
    with pytest.raises(ConfigError, match="optim.lr: 0.05 -> 0.01"):
        run_finetune(changed, resume="")
    with pytest.raises(TrainingError, match="does not exist"):
        run_finetune(cfg, resume=str(tmp_path / "nope.pth"))


def test_stop_inside_an_epoch_resumes_at_the_next_batch(synth, tmp_path, monkeypatch):
    cfg = tiny_config(synth, tmp_path / "run", "run.epochs=1")
    calls = {"n": 0}
    original = finetune.ReIDLoss.forward

    def forward(self, *args):
        calls["n"] += 1
        if calls["n"] == 2:
            os.kill(os.getpid(), signal.SIGTERM)
        return original(self, *args)

    with monkeypatch.context() as patch:
        patch.setattr(finetune.ReIDLoss, "forward", forward)
        first = run_finetune(cfg)
    assert first["stopped"] and (first["epoch"], first["step"]) == (0, 2)
    ckpt = safe_load(tmp_path / "run" / "last.pth")
    assert (ckpt["epoch"], ckpt["resume_step"]) == (0, 2)

    second = run_finetune(cfg, resume="")
    assert not second["stopped"] and second["model"] is not None
    sampler_batches = first_epoch_batches(cfg)
    assert metrics_of(tmp_path / "run")[0]["steps"] == sampler_batches - 2


def first_epoch_batches(cfg: FinetuneConfig) -> int:
    from passreid.data.samplers import RandomIdentitySampler

    dataset = build_dataset("synthetic", cfg.data.root)
    sampler = RandomIdentitySampler([r.pid for r in dataset.train], cfg.optim.batch_size, cfg.optim.num_instances,
                                    seed=cfg.run.seed)
    sampler.set_epoch(1)
    return len(sampler.global_batches())


def test_nonfinite_loss_stops_naming_the_step_or_is_skipped(synth, tmp_path, monkeypatch):
    calls = {"n": 0}
    original = finetune.ReIDLoss.forward

    def forward(self, *args):
        calls["n"] += 1
        total, parts = original(self, *args)
        return (total * float("nan"), parts) if calls["n"] == 2 else (total, parts)

    monkeypatch.setattr(finetune.ReIDLoss, "forward", forward)
    with pytest.raises(TrainingError, match=r"epoch 1, step 2.*none written yet"):
        run_finetune(tiny_config(synth, tmp_path / "strict", "run.epochs=1"))
    calls["n"] = 0
    result = run_finetune(tiny_config(synth, tmp_path / "skip", "run.epochs=1", "run.skip_nonfinite=true"))
    assert metrics_of(tmp_path / "skip")[0]["skipped"] == 1 and result["model"] is not None


def test_cli_trains_a_recipe_with_overrides_and_guards_resume(synth, tmp_path, capsys):
    from passreid.cli import main

    recipe = tmp_path / "tiny.yaml"
    recipe.write_text(f"_base_: {CONFIGS / 'base.yaml'}\ndata:\n  dataset: synthetic\n  num_workers: 0\n"
                      "model:\n  name: pass_vit_tiny\n  depth: 1\n  pretrained: ''\n"
                      "run:\n  epochs: 1\n  device: cpu\noptim:\n  batch_size: 16\n")
    args = ["train", str(recipe), f"data.root={synth}", f"data.img_size=[{IMG[0]},{IMG[1]}]",
            f"run.output_dir={tmp_path / 'run'}", "run.max_iters_per_epoch=1"]
    assert main(args) == 0
    assert "final: mAP" in capsys.readouterr().out
    assert main([*args, "--resume"]) == 0  # a finished run: nothing left to train, the export is rewritten
    assert main([*args, "optim.lr=0.1", "--resume"]) == 2
    assert "optim.lr: 0.0004 -> 0.1" in capsys.readouterr().err
    assert main([*args, "optim.lr=0.1", "--resume", "--force-resume"]) == 0


# ----------------------------------------------------------------------------- DDP


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank: int, world_size: int, port: int, root: str, out: str) -> None:
    """One torchrun-like process: env rendezvous, run_finetune, then dump this rank's trained parameters."""
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    captured = {}
    original = finetune.train_one_epoch

    def spy(model, *args, **kwargs):
        captured["model"] = model
        return original(model, *args, **kwargs)

    finetune.train_one_epoch = spy
    cfg = tiny_config(Path(root), Path(out) / "run", "run.epochs=1", "run.max_iters_per_epoch=3")
    finetune.run_finetune(cfg)
    params = {n: p.detach().clone() for n, p in captured["model"].module.named_parameters()}
    torch.save(params, Path(out) / f"rank{rank}.pt")


def test_two_gloo_processes_end_with_identical_weights(synth, tmp_path, spawn):
    spawn(_ddp_worker, (2, _free_port(), str(synth), str(tmp_path)), nprocs=2)
    rank0, rank1 = (torch.load(tmp_path / f"rank{r}.pt") for r in range(2))
    seed_everything(0)  # as rank 0 did before building the model that DDP broadcast
    initial = build_model(tiny_config(synth, tmp_path).model, num_classes=12, img_size=IMG)
    assert rank0.keys() == rank1.keys()
    for name in rank0:
        assert torch.equal(rank0[name], rank1[name]), name
    assert not torch.equal(rank0["classifier.weight"], initial.classifier.weight)  # it did train
    assert metrics_of(tmp_path / "run")[0]["steps"] == 3
    assert (tmp_path / "run" / "model.pth").is_file()


# ----------------------------------------------------------------------------- the shared run loop


def test_fresh_run_over_an_earlier_run_folder_starts_a_clean_metrics_file(synth, tmp_path):
    """A fresh run (no --resume) into a folder that holds a run replaces its metrics.jsonl instead of
    appending to it (it appended in fine-tuning, while pretraining and clustering cleared it)."""
    cfg = tiny_config(synth, tmp_path / "run", "run.epochs=1", "run.max_iters_per_epoch=1")
    run_finetune(cfg)
    run_finetune(cfg)
    assert [r["epoch"] for r in metrics_of(tmp_path / "run")] == [1]


class ToyExtraLoss(finetune.ReIDLoss):
    """ReIDLoss plus a made-up term: what adding a loss looks like to the trainer."""

    def forward(self, logits, features, labels):
        total, parts = super().forward(logits, features, labels)
        toy = 1e-3 * features.float().pow(2).mean()
        return total + toy, {**parts, "toy": toy.detach()}


def test_a_new_loss_term_reaches_the_logs_metrics_and_tensorboard_without_touching_the_loop(synth, tmp_path,
                                                                                            monkeypatch):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    monkeypatch.setattr(finetune, "ReIDLoss", ToyExtraLoss)
    run = tmp_path / "run"
    run_finetune(tiny_config(synth, run, "run.epochs=1", "run.max_iters_per_epoch=2"))
    record = metrics_of(run)[0]
    assert {"loss", "id_loss", "triplet_loss", "toy_loss", "acc"} <= set(record)
    assert 0 < record["toy_loss"] < record["loss"]
    events = EventAccumulator(str(run / "tb"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"epoch/toy_loss", "train/toy_loss", "epoch/id_loss"} <= tags
