"""PASS pretraining: networks, EMA teacher, schedules, frozen last layer, exact resume, backbone export."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import passreid.pretrain as pretrain
from passreid.checkpoint import load_checkpoint, safe_load
from passreid.cli import main as cli_main
from passreid.config import RunConfig, load_config
from passreid.data.multicrop import BatchedMultiCrop
from passreid.data.records import CompactRecords
from passreid.losses.pass_loss import PASSLoss
from passreid.models import ReIDModel, create_model
from passreid.models.heads import DINOHead
from passreid.pretrain import (
    AugConfig,
    EpochSampler,
    PassPretrainNet,
    PretrainConfig,
    PretrainDataConfig,
    PretrainModelConfig,
    PretrainOptimConfig,
    PretrainSchedule,
    PretrainState,
    build_networks,
    clip_gradients,
    ema_update,
    export_backbone,
    param_groups,
    run_pretrain,
    train_step,
)

IMG = [64, 32]
LOCAL = [32, 16]
REPO = Path(__file__).resolve().parents[1]


def tiny_model(mode: str = "pass") -> PretrainModelConfig:
    return PretrainModelConfig(name="pass_vit_tiny", depth=1, mode=mode, out_dim=32, hidden_dim=16, bottleneck_dim=8)


def tiny_config(root: Path, out: Path, *, mode: str = "pass", backend: str = "gpu", epochs: int = 2) -> PretrainConfig:
    return PretrainConfig(
        data=PretrainDataConfig(root=str(root), img_size=IMG, batch_size=4, num_workers=0),
        aug=AugConfig(backend=backend, decode_size=IMG, local_size=LOCAL,
                      local_scale=[0.1, 0.8] if mode == "pass" else [0.05, 0.4]),
        model=tiny_model(mode),
        optim=PretrainOptimConfig(warmup_epochs=1, lr=5e-3),
        run=RunConfig(output_dir=str(out), epochs=epochs, max_iters_per_epoch=2, log_every=2, device="cpu"),
    )


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("luperson")
    rng = np.random.default_rng(0)
    for i in range(10):
        sub = root / f"video{i % 2}"
        sub.mkdir(exist_ok=True)
        pixels = rng.integers(0, 255, size=(48 + 8 * (i % 3), 24, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(sub / f"{i:03d}.jpg")
    return root


def _batch(seed: int, n: int = 2) -> torch.Tensor:
    return torch.randint(0, 256, (n, 3, *IMG), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def _state(mode: str = "pass", epochs: int = 2, momentum: float = 0.9) -> PretrainState:
    torch.manual_seed(0)
    cfg = tiny_config(Path("."), Path("."), mode=mode)
    student, teacher = build_networks(cfg.model, IMG)
    loss_fn = PASSLoss(cfg.model.out_dim, num_tokens=student.head.num_tokens)
    schedule = PretrainSchedule(iters_per_epoch=2, epochs=epochs, peak_lr=1e-2, min_lr=1e-4, warmup_epochs=0,
                                weight_decay=0.04, weight_decay_end=0.4, momentum=momentum, momentum_end=1.0)
    return PretrainState(student=student, teacher=teacher, loss_fn=loss_fn,
                         optimizer=torch.optim.AdamW(param_groups(student)), scaler=torch.amp.GradScaler("cpu",
                                                                                                    enabled=False),
                         schedule=schedule, multicrop=BatchedMultiCrop(cfg.multicrop_spec(), tuple(IMG)),
                         device=torch.device("cpu"))


# ----------------------------------------------------------------------------- networks


def test_head_last_layer_has_unit_fixed_norm_and_dino_names() -> None:
    head = DINOHead(12, out_dim=10, hidden_dim=16, bottleneck_dim=8)
    assert {k for k in head.state_dict() if k.startswith("last_layer")} == {"last_layer.weight_g",
                                                                           "last_layer.weight_v"}
    assert not head.last_layer.weight_g.requires_grad
    torch.testing.assert_close(head.last_layer.weight.norm(dim=1), torch.ones(10))
    x = torch.randn(3, 12)
    # logits are cosines between the normalised bottleneck embedding and unit prototypes
    emb = torch.nn.functional.normalize(head.mlp(x), dim=-1)
    torch.testing.assert_close(head(x), emb @ torch.nn.functional.normalize(head.last_layer.weight_v, dim=1).T)
    assert head(x).abs().max() <= 1 + 1e-6


def test_student_outputs_and_band_k_uses_part_token_k() -> None:
    torch.manual_seed(1)
    student, _ = build_networks(tiny_model(), IMG)
    student.eval()
    views = BatchedMultiCrop(tiny_config(Path("."), Path(".")).multicrop_spec(), tuple(IMG))(_batch(0, n=3))
    out = student(views.global_views, views.local_views)
    assert out.cls.shape == (11, 3, 32) and [p.shape for p in out.parts] == [(5, 3, 32)] * 3
    with torch.no_grad():
        student.backbone.part_token2.add_(1.0)
    changed = student(views.global_views, views.local_views)
    # Band-2 (middle) crops are encoded with part token 2: their outputs move, band 1 and 3 crops do not.
    band = lambda t, k: t[2 + 3 * (k - 1): 5 + 3 * (k - 1)]  # noqa: E731
    torch.testing.assert_close(band(changed.cls, 1), band(out.cls, 1))
    torch.testing.assert_close(band(changed.cls, 3), band(out.cls, 3))
    assert not torch.allclose(band(changed.cls, 2), band(out.cls, 2))
    torch.testing.assert_close(changed.parts[0][2:], out.parts[0][2:])
    assert not torch.allclose(changed.parts[1][2:], out.parts[1][2:])


def test_teacher_sees_global_views_only_and_dino_mode_ignores_part_tokens() -> None:
    torch.manual_seed(2)
    student, teacher = build_networks(tiny_model("dino"), IMG)
    views = BatchedMultiCrop(tiny_config(Path("."), Path("."), mode="dino").multicrop_spec(), tuple(IMG))(_batch(1))
    out_t = teacher(views.global_views)
    assert out_t.cls.shape == (2, 2, 32) and out_t.parts == ()
    with torch.no_grad():
        teacher.backbone.part_token1.add_(5.0)
        teacher.backbone.part1_pos.add_(5.0)
    torch.testing.assert_close(teacher(views.global_views).cls, out_t.cls)
    assert not student.backbone.part_token1.requires_grad
    assert all(p.grad is None for p in teacher.parameters()) and not any(p.requires_grad for p in teacher.parameters())


def test_teacher_has_no_drop_path_and_starts_equal_to_the_student() -> None:
    student, teacher = build_networks(PretrainModelConfig(name="pass_vit_tiny", depth=2, drop_path_rate=0.1,
                                                          out_dim=8, hidden_dim=8, bottleneck_dim=4), IMG)
    assert type(student.backbone.blocks[1].drop_path).__name__ == "DropPath"
    assert all(isinstance(b.drop_path, torch.nn.Identity) for b in teacher.backbone.blocks)
    for (name, s), t in zip(student.state_dict().items(), teacher.state_dict().values()):
        assert torch.equal(s, t), name


# ----------------------------------------------------------------------------- optimisation pieces


def test_param_groups_exclude_biases_and_norms_from_weight_decay() -> None:
    student, _ = build_networks(tiny_model(), IMG)
    decay, no_decay = param_groups(student)
    names = {id(p): n for n, p in student.named_parameters()}
    assert all(p.ndim > 1 and not names[id(p)].endswith(".bias") for p in decay["params"])
    assert {names[id(p)] for p in no_decay["params"]} >= {"backbone.norm.weight", "backbone.norm.bias",
                                                          "head.heads.cls.mlp.0.bias"}
    assert no_decay["weight_decay"] == 0.0
    assert "head.heads.cls.last_layer.weight_g" not in {names[id(p)] for g in (decay, no_decay) for p in g["params"]}


def test_clip_gradients_is_per_parameter_tensor() -> None:
    params = [torch.nn.Parameter(torch.zeros(3)), torch.nn.Parameter(torch.zeros(2, 2)),
              torch.nn.Parameter(torch.zeros(1))]
    grads = [torch.tensor([3.0, 4.0, 0.0]), torch.full((2, 2), 0.5), torch.tensor([-10.0])]
    for p, g in zip(params, grads):
        p.grad = g.clone()
    norms = clip_gradients(params, 3.0)
    torch.testing.assert_close(norms, torch.tensor([5.0, 1.0, 10.0]))
    torch.testing.assert_close(params[0].grad, torch.tensor([3.0, 4.0, 0.0]) * 3 / (5 + 1e-6))
    torch.testing.assert_close(params[1].grad, grads[1])  # norm 1 < 3: untouched
    torch.testing.assert_close(params[2].grad, torch.tensor([-3.0]), rtol=0, atol=1e-5)


def test_schedules() -> None:
    s = PretrainSchedule(iters_per_epoch=10, epochs=10, peak_lr=1e-3, min_lr=1e-6, warmup_epochs=2,
                         weight_decay=0.04, weight_decay_end=0.4, momentum=0.996, momentum_end=1.0)
    assert s.lr(0) == 0 and s.lr(10) == pytest.approx(5e-4) and s.lr(20) == pytest.approx(1e-3)
    assert s.lr(60) == pytest.approx(1e-6 + 0.5 * (1e-3 - 1e-6) * (1 + np.cos(np.pi * 40 / 80)))
    assert s.lr(100) == pytest.approx(1e-6)
    assert s.wd(0) == pytest.approx(0.04) and s.wd(50) == pytest.approx(0.22) and s.wd(100) == pytest.approx(0.4)
    assert s.teacher_momentum(0) == pytest.approx(0.996) and s.teacher_momentum(100) == pytest.approx(1.0)
    assert PASSLoss(4, warmup_teacher_temp=0.04, teacher_temp=0.07, warmup_teacher_temp_iters=30).teacher_temperature(
        15) == pytest.approx(0.055)


def test_epoch_sampler_shards_and_skips() -> None:
    shards = [list(EpochSampler(23, 3, seed=1, rank=r, world_size=2)) for r in range(2)]
    assert len(shards[0]) == len(shards[1]) == 9 and not set(shards[0]) & set(shards[1])
    sampler = EpochSampler(23, 3, seed=1)
    sampler.set_epoch(2)
    full = list(sampler)
    sampler.set_epoch(2, start_batch=2)
    assert list(sampler) == full[6:] and len(sampler) == len(full) - 6
    sampler.set_epoch(3)
    assert list(sampler) != full


# ----------------------------------------------------------------------------- one step


def test_step_updates_teacher_by_ema_and_gives_it_no_gradient() -> None:
    state = _state(momentum=0.9)
    teacher_before = [p.detach().clone() for p in state.teacher_params]
    result = train_step(state, _batch(3), epoch=2, it=2)
    assert result.stats and np.isfinite(float(result.stats["loss"]))
    m = state.schedule.teacher_momentum(2)
    for before, t, s in zip(teacher_before, state.teacher_params, state.student_params):
        assert t.grad is None
        torch.testing.assert_close(t, m * before + (1 - m) * s.detach(), rtol=0, atol=1e-6)
    assert result.scalars["momentum"] == pytest.approx(m) and 0.9 < m < 1


def test_ema_update_formula() -> None:
    teacher, student = [torch.ones(3), torch.zeros(2)], [torch.full((3,), 3.0), torch.ones(2)]
    ema_update(teacher, student, 0.75)
    torch.testing.assert_close(teacher[0], torch.full((3,), 1.5))
    torch.testing.assert_close(teacher[1], torch.full((2,), 0.25))


@pytest.mark.parametrize(("epoch", "frozen"), [(1, True), (2, False)])
def test_last_layer_is_frozen_in_epoch_1(epoch: int, frozen: bool) -> None:
    state = _state()
    student = state.student
    last = student.head.heads["cls"].last_layer.weight_v.detach().clone()
    mlp = student.head.heads["cls"].mlp[0].weight.detach().clone()
    train_step(state, _batch(4), epoch=epoch, it=(epoch - 1) * 2)
    assert torch.equal(student.head.heads["cls"].last_layer.weight_v, last) == frozen
    assert not torch.equal(student.head.heads["cls"].mlp[0].weight, mlp)
    torch.testing.assert_close(student.head.heads["cls"].last_layer.weight_g, torch.ones(32, 1))


def test_step_moves_the_centers_towards_the_teacher_mean() -> None:
    state = _state()
    torch.manual_seed(5)
    views = state.multicrop(_batch(5))
    with torch.no_grad():
        teacher_out = state.teacher(views.global_views)
    expected = 0.1 * torch.stack([t.mean(dim=(0, 1)) for t in teacher_out.tokens()])
    torch.manual_seed(5)
    train_step(state, _batch(5), epoch=2, it=2)
    torch.testing.assert_close(state.loss_fn.center, expected, rtol=0, atol=1e-6)


# ----------------------------------------------------------------------------- runs


def _checkpoint_tensors(path: Path) -> dict[str, torch.Tensor]:
    ckpt = safe_load(path)
    flat = {f"{net}.{k}": v for net in ("student", "teacher", "centers") for k, v in ckpt["model"][net].items()}
    for pid, state in ckpt["optimizer"]["state"].items():
        flat.update({f"optim.{pid}.{k}": v for k, v in state.items() if isinstance(v, torch.Tensor)})
    return flat


@pytest.fixture(scope="module")
def full_run(image_folder: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An uninterrupted 2-epoch run (batched multi-crop, run on the CPU): its run directory."""
    out = tmp_path_factory.mktemp("full")
    result = run_pretrain(tiny_config(image_folder, out))
    assert result["epoch"] == 2 and not result["stopped"] and result["backbone"] == out / "backbone.pth"
    return out


def test_resume_after_epoch_1_equals_uninterrupted_run(image_folder: Path, full_run: Path, tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    calls = {"n": 0}
    real = pretrain.train_one_epoch

    def crash_in_epoch_2(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("simulated crash")
        return real(*args, **kwargs)

    monkeypatch.setattr(pretrain, "train_one_epoch", crash_in_epoch_2)
    with pytest.raises(RuntimeError, match="simulated crash"):
        run_pretrain(tiny_config(image_folder, tmp_path))
    monkeypatch.setattr(pretrain, "train_one_epoch", real)
    assert safe_load(tmp_path / "last.pth")["epoch"] == 1
    resumed = run_pretrain(tiny_config(image_folder, tmp_path), resume="")
    assert resumed["epoch"] == 2

    a, b = _checkpoint_tensors(full_run / "last.pth"), _checkpoint_tensors(tmp_path / "last.pth")
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    # the two epochs actually trained something
    models = safe_load(tmp_path / "last.pth")["model"]
    assert not torch.equal(models["student"]["backbone.cls_token"], models["teacher"]["backbone.cls_token"])
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 2


def test_exported_backbone_loads_into_the_finetuning_model(full_run: Path, tmp_path: Path) -> None:
    backbone_path = full_run / "backbone.pth"
    state = safe_load(backbone_path)
    reference = create_model("pass_vit_tiny", img_size=tuple(IMG), depth=1).state_dict()
    assert set(state) == set(reference)  # exactly the PASS names, no prefixes
    teacher = safe_load(full_run / "last.pth")["model"]["teacher"]
    for key, value in state.items():
        assert torch.equal(value, teacher[f"backbone.{key}"]), key
    model = ReIDModel(create_model("pass_vit_tiny", img_size=tuple(IMG), depth=1), num_classes=5)
    report = load_checkpoint(model, backbone_path)
    assert report.loaded == len(reference) and not report.resized
    assert torch.equal(model.base.part_token3, state["part_token3"])
    meta = json.loads(backbone_path.with_suffix(".json").read_text())["meta"]
    assert meta["img_size"] == IMG and meta["mode"] == "pass" and meta["epoch"] == 2
    assert meta["dataset"]["num_images"] == 10

    # The command writes the same file from the training checkpoint.
    out = tmp_path / "cli" / "backbone.pth"
    assert cli_main(["export-backbone", str(full_run / "last.pth"), str(out)]) == 0
    again = safe_load(out)
    assert again.keys() == state.keys() and all(torch.equal(again[k], state[k]) for k in state)
    assert out.with_suffix(".json").is_file()


def test_dino_ablation_runs_and_exports_class_token_as_part_tokens(image_folder: Path, tmp_path: Path) -> None:
    # The PIL multi-crop of the loader workers (run in-process here).
    result = run_pretrain(tiny_config(image_folder, tmp_path / "dino", mode="dino", epochs=1, backend="cpu"))
    state = safe_load(result["backbone"])
    for k in (1, 2, 3):
        assert torch.equal(state[f"part_token{k}"], state["cls_token"])
        assert torch.equal(state[f"part{k}_pos"], state["cls_pos"])
    assert "loss_part1" not in result["metrics"] and np.isfinite(result["metrics"]["loss"])


def test_export_refuses_a_checkpoint_without_a_backbone(tmp_path: Path) -> None:
    from passreid.errors import CheckpointError

    torch.save({"teacher": {"head.weight": torch.zeros(2)}}, tmp_path / "bad.pth")
    with pytest.raises(CheckpointError):
        export_backbone(tmp_path / "bad.pth", tmp_path / "out.pth")


def test_recipes_load_and_demo_recipe_matches_the_demo_stage(tmp_path: Path) -> None:
    small = load_config(PretrainConfig, REPO / "configs/pretrain/pass_vit_small.yaml")
    base = load_config(PretrainConfig, REPO / "configs/pretrain/pass_vit_base.yaml")
    dino = load_config(PretrainConfig, REPO / "configs/pretrain/dino_vit_small.yaml")
    assert (small.model.name, small.data.batch_size, base.model.name, base.data.batch_size) == (
        "pass_vit_small", 1024, "pass_vit_base", 512)
    assert small.run.epochs == 100 and small.model.out_dim == 65536 and small.optim.lr == 5e-4
    assert dino.model.mode == "dino" and dino.multicrop_spec().banded is False
    demo_yaml = load_config(PretrainConfig, REPO / "configs/pretrain/demo_tiny.yaml")
    from passreid.demo import DemoContext, pretrain_config

    ctx = DemoContext(workdir=tmp_path, source_root=tmp_path, target_root=tmp_path, device=torch.device("cpu"))
    demo = pretrain_config(ctx, tmp_path / "run")
    for section in ("model", "aug", "optim", "loss"):
        assert getattr(demo, section) == getattr(demo_yaml, section), section
    assert demo.data.img_size == demo_yaml.data.img_size and demo.data.batch_size == demo_yaml.data.batch_size


def test_config_errors_name_the_key() -> None:
    from passreid.errors import ConfigError

    with pytest.raises(ConfigError, match="aug.backend"):
        load_config(PretrainConfig, overrides=["aug.backend=tpu"])
    with pytest.raises(ConfigError, match="model.mode"):
        load_config(PretrainConfig, overrides=["model.mode=byol"])
    with pytest.raises(ConfigError, match="optim.warmup_epochs"):
        load_config(PretrainConfig, overrides=["run.epochs=5", "optim.warmup_epochs=10"])
    with pytest.raises(ConfigError, match="aug.jitter"):
        load_config(PretrainConfig, overrides=["aug.jitter=[0.4,0.4,0.2,0.7]"])
    with pytest.raises(ConfigError, match="aug.gray_p"):
        load_config(PretrainConfig, overrides=["aug.gray_p=1.5"])


def test_photometric_keys_reach_the_multicrop_spec_and_default_to_the_published_values() -> None:
    published = load_config(PretrainConfig).multicrop_spec()
    assert (published.jitter, published.jitter_p, published.gray_p) == ((0.4, 0.4, 0.2, 0.1), 0.8, 0.2)
    spec = load_config(PretrainConfig, overrides=["aug.jitter=[0.3,0.3,0.1,0.0]", "aug.jitter_p=0.5",
                                                   "aug.gray_p=0"]).multicrop_spec()
    assert (spec.jitter, spec.jitter_p, spec.gray_p) == ((0.3, 0.3, 0.1, 0.0), 0.5, 0.0)


def test_batch_larger_than_the_folder_is_a_config_error(image_folder: Path, tmp_path: Path) -> None:
    from passreid.errors import ConfigError

    cfg = tiny_config(image_folder, tmp_path / "x")
    cfg.data.batch_size = 64
    with pytest.raises(ConfigError, match="data.batch_size"):
        run_pretrain(cfg)


def test_pretrain_net_state_dict_has_published_prefixes() -> None:
    student, _ = build_networks(tiny_model(), IMG)
    keys = list(student.state_dict())
    assert isinstance(student, PassPretrainNet)
    assert all(k.startswith(("backbone.", "head.")) for k in keys)
    assert "backbone.part_token1" in keys and "head.heads.part3.last_layer.weight_v" in keys


def test_compact_records_round_trip() -> None:
    from passreid.data.datasets import ImageRecord

    paths = ["/data/a.jpg", "/data/sub dir/bé.png", "/x/" + "y" * 200 + ".jpg"]
    records = CompactRecords([ImageRecord(p, -1, -1) for p in paths])
    assert len(records) == 3 and [r.path for r in records] == paths and records[1] == ImageRecord(paths[1], -1, -1)


@pytest.mark.parametrize(("backend", "workers"), [("gpu", 0), ("gpu", 2), ("cpu", 2)])
def test_a_signal_mid_epoch_saves_the_position_and_resume_gives_the_same_weights(
        image_folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, backend: str, workers: int) -> None:
    """Stopped and resumed with ``workers`` loader workers, compared with a run without workers: the batched
    views are drawn in the main process (restored random streams), the PIL views in the workers (seeded by
    each image's position in the epoch)."""
    import os
    import signal

    def config(out: Path, num_workers: int) -> PretrainConfig:
        cfg = tiny_config(image_folder, out, backend=backend, epochs=1)
        cfg.data.batch_size, cfg.data.num_workers, cfg.run.max_iters_per_epoch = 2, num_workers, 4
        return cfg

    run_pretrain(config(tmp_path / "full", 0))
    cfg = config(tmp_path, workers)
    real = pretrain.train_step
    calls = {"n": 0}

    def step_then_sigint(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        result = real(*args, **kwargs)
        calls["n"] += 1
        if calls["n"] == 1:
            os.kill(os.getpid(), signal.SIGINT)  # GracefulStop turns it into a stop after the next step
        return result

    monkeypatch.setattr(pretrain, "train_step", step_then_sigint)
    stopped = run_pretrain(cfg)
    assert stopped["stopped"] and stopped["backbone"] is None
    ckpt = safe_load(tmp_path / "last.pth")
    assert ckpt["epoch"] == 0 and ckpt["resume_step"] == 2
    monkeypatch.setattr(pretrain, "train_step", real)
    resumed = run_pretrain(cfg, resume="")
    assert not resumed["stopped"] and resumed["metrics"]["steps"] == 2  # the two steps the epoch had left
    assert resumed["backbone"] is not None and safe_load(tmp_path / "last.pth")["epoch"] == 1
    # Same weights as without the stop, and as without workers.
    a, b = _checkpoint_tensors(tmp_path / "full" / "last.pth"), _checkpoint_tensors(tmp_path / "last.pth")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
