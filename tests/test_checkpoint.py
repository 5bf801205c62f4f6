"""Checkpoint formats round-trip into PassViT / ReIDModel; mismatches and unsafe files are refused."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import pytest
import timm
import torch
import torch.nn.functional as F

from passreid.checkpoint import (
    build_meta,
    build_model_from_checkpoint,
    checkpoint_info,
    extract_backbone_state,
    load_checkpoint,
    safe_load,
    save_atomic,
)
from passreid.errors import CheckpointError
from passreid.fileio import write_text_atomic
from passreid.models import PassViT, ReIDModel, create_model, resize_pos_embed

SMALL = (64, 32)  # 4x2 patch grid


def tiny(img_size: tuple[int, int] = SMALL, depth: int = 1, seed: int = 0) -> PassViT:
    torch.manual_seed(seed)
    return create_model("pass_vit_tiny", img_size=img_size, depth=depth).eval()


def perturb(module: torch.nn.Module, seed: int = 1) -> torch.nn.Module:
    """Random values in every float parameter and buffer, so that a load that skips a tensor shows."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for tensor in module.state_dict().values():
            if tensor.is_floating_point():
                tensor.add_(0.1 * torch.randn(tensor.shape, generator=gen))
                if tensor.ndim == 1:
                    tensor.abs_()  # keeps BatchNorm running_var positive
    return module


def images(img_size: tuple[int, int] = SMALL, n: int = 2) -> torch.Tensor:
    return torch.randn(n, 3, *img_size, generator=torch.Generator().manual_seed(7))


def assert_same_output(a: torch.nn.Module, b: torch.nn.Module, img_size: tuple[int, int] = SMALL) -> None:
    x = images(img_size)
    with torch.no_grad():
        torch.testing.assert_close(a.eval()(x), b.eval()(x), rtol=0, atol=0)


def timm_state(model: PassViT, class_pos: torch.Tensor) -> dict[str, torch.Tensor]:
    """A one-class-token ViT state (timm/DINO layout) holding ``model``'s shared weights."""
    state = {k: v.clone() for k, v in model.state_dict().items()
             if not k.startswith("part") and k not in ("cls_pos",)}
    state["pos_embed"] = torch.cat((class_pos, model.pos_embed.detach()), dim=1)
    state["head.weight"] = torch.randn(10, model.embed_dim)
    state["head.bias"] = torch.randn(10)
    return state


def expected_from_timm(model: PassViT, class_pos: torch.Tensor) -> PassViT:
    """DESIGN §2 (d) by hand: part tokens = cls_token, every special position = the class slot."""
    out = tiny(img_size=model.img_size, depth=model.depth, seed=99)
    out.load_state_dict(model.state_dict())
    with torch.no_grad():
        for k in (1, 2, 3):
            getattr(out, f"part_token{k}").copy_(model.cls_token)
            getattr(out, f"part{k}_pos").copy_(class_pos)
        out.cls_pos.copy_(class_pos)
    return out


def pretrain_dict(backbone_state: dict[str, torch.Tensor], *, student_shift: float = 1.0) -> dict:
    heads = {"head.mlp.0.weight": torch.randn(8, 192), "head.last_layer.weight_g": torch.ones(16, 1)}
    return {
        "teacher": {**{f"backbone.{k}": v for k, v in backbone_state.items()}, **heads},
        "student": {**{f"module.backbone.{k}": v + student_shift for k, v in backbone_state.items()},
                    **{f"module.{k}": v for k, v in heads.items()}},
        "optimizer": {"state": {}, "param_groups": []},
        "epoch": 99,
        "args": argparse.Namespace(arch="vit_tiny", lr=0.0005, local_crops_number=9, data_path="/data/lup"),
        "dino_loss": {"center": torch.zeros(1, 16)},
    }


# ----------------------------------------------------------------------------- formats round-trip


def test_pretraining_dict_loads_teacher_and_reports_heads(tmp_path: Path) -> None:
    source = perturb(tiny())
    path = tmp_path / "pass_pretrain.pth"
    torch.save(pretrain_dict(source.state_dict()), path)

    target = tiny(seed=5)
    report = load_checkpoint(target, path)

    assert report.format == "pretrain-teacher"
    assert sorted(report.ignored) == ["head.last_layer.weight_g", "head.mlp.0.weight"]
    assert report.loaded == len(source.state_dict())
    assert report.resized == []
    assert_same_output(source, target)


def test_pretraining_dict_with_only_student_strips_module_prefix(tmp_path: Path) -> None:
    source = perturb(tiny())
    ckpt = pretrain_dict(source.state_dict(), student_shift=0.0)
    del ckpt["teacher"]
    path = tmp_path / "student_only.pth"
    torch.save(ckpt, path)

    target = tiny(seed=5)
    report = load_checkpoint(target, path)

    assert report.format == "pretrain-student"
    assert sorted(report.ignored) == ["head.last_layer.weight_g", "head.mlp.0.weight"]
    assert_same_output(source, target)


def test_bare_backbone_state_dict(tmp_path: Path) -> None:
    source = perturb(tiny())
    path = tmp_path / "backbone.pth"
    torch.save(source.state_dict(), path)

    target = tiny(seed=5)
    report = load_checkpoint(target, path)

    assert (report.format, report.ignored, report.loaded) == ("backbone", [], len(source.state_dict()))
    assert_same_output(source, target)


def test_wrapped_and_ddp_prefixed_backbone() -> None:
    source = perturb(tiny())
    obj = {"state_dict": {f"module.{k}": v for k, v in source.state_dict().items()}}
    state, fmt, ignored = extract_backbone_state(obj)
    assert fmt == "backbone" and ignored == []
    assert set(state) == set(source.state_dict())


@pytest.mark.parametrize(
    "layout",
    [
        dict(fusion="cat", neck="multi", test_feature="before", neck_names="finetune"),
        dict(fusion="mean", neck="multi", test_feature="after", neck_names="cluster"),
        dict(fusion="cat", neck="single", test_feature="after", neck_names="finetune"),
    ],
)
def test_reid_state_loads_everything_into_reid_model(tmp_path: Path, layout: dict) -> None:
    source = perturb(ReIDModel(tiny(), num_classes=5, **layout))
    path = tmp_path / "reid.pth"
    torch.save(source.state_dict(), path)

    target = ReIDModel(tiny(seed=5), num_classes=5, **layout)
    report = load_checkpoint(target, path)

    assert report.format == "reid-finetuned"
    assert report.loaded == len(source.state_dict()) and report.ignored == [] and report.initialised == []
    for key, value in source.state_dict().items():
        torch.testing.assert_close(target.state_dict()[key], value, rtol=0, atol=0)
    assert_same_output(source, target)
    x = images()
    with torch.no_grad():
        torch.testing.assert_close(source.train()(x).logits, target.train()(x).logits, rtol=0, atol=0)


def test_reid_state_into_backbone_ignores_necks_and_classifier(tmp_path: Path) -> None:
    source = perturb(ReIDModel(tiny(), num_classes=5, neck_names="cluster"))
    path = tmp_path / "reid.pth"
    torch.save(source.state_dict(), path)

    uda_start = ReIDModel(tiny(seed=5), num_classes=0, neck_names="cluster")
    necks_before = {k: v.clone() for k, v in uda_start.state_dict().items() if not k.startswith("base.")}
    report = load_checkpoint(uda_start.base, path)

    assert report.format == "reid-finetuned"
    assert "classifier.weight" in report.ignored and "bottleneck_pt3.running_var" in report.ignored
    assert len(report.ignored) == len(source.state_dict()) - len(source.base.state_dict())
    assert_same_output(source.base, uda_start.base)
    for key, value in necks_before.items():
        torch.testing.assert_close(uda_start.state_dict()[key], value, rtol=0, atol=0)


def test_backbone_checkpoint_into_reid_model_keeps_necks_initialised(tmp_path: Path) -> None:
    source = perturb(tiny())
    path = tmp_path / "backbone.pth"
    torch.save(source.state_dict(), path)

    model = ReIDModel(tiny(seed=5), num_classes=3)
    report = load_checkpoint(model, path)

    assert report.format == "backbone"
    assert "classifier.weight" in report.initialised and "bottleneck_1.weight" in report.initialised
    assert all(not k.startswith("base.") for k in report.initialised)
    assert_same_output(source, model.base)
    torch.testing.assert_close(model.bottleneck_1.weight, torch.ones(192))


def test_timm_state_converts_class_token_and_slot(tmp_path: Path) -> None:
    source = perturb(tiny())
    class_pos = torch.randn(1, 1, 192)
    path = tmp_path / "timm.pth"
    torch.save(timm_state(source, class_pos), path)

    target = tiny(seed=5)
    report = load_checkpoint(target, path)

    assert report.format == "timm"
    assert sorted(report.ignored) == ["head.bias", "head.weight"]
    torch.testing.assert_close(target.part_token2, source.cls_token, rtol=0, atol=0)
    torch.testing.assert_close(target.part3_pos, class_pos, rtol=0, atol=0)
    torch.testing.assert_close(target.pos_embed, source.pos_embed, rtol=0, atol=0)
    assert_same_output(expected_from_timm(source, class_pos), target)


def test_real_timm_vit_state_dict_loads() -> None:
    vit = timm.models.vision_transformer.VisionTransformer(
        img_size=SMALL, patch_size=16, embed_dim=192, depth=1, num_heads=3, num_classes=10
    )
    target = tiny(seed=5)
    report = load_checkpoint(target, {"model": vit.state_dict()})
    assert report.format == "timm"
    assert sorted(report.ignored) == ["head.bias", "head.weight"]
    torch.testing.assert_close(target.cls_pos, vit.pos_embed[:, :1], rtol=0, atol=0)
    torch.testing.assert_close(target.pos_embed, vit.pos_embed[:, 1:], rtol=0, atol=0)
    torch.testing.assert_close(target.blocks[0].attn.qkv.weight, vit.blocks[0].attn.qkv.weight, rtol=0, atol=0)


def test_dino_pretraining_dict_with_timm_teacher(tmp_path: Path) -> None:
    source = perturb(tiny())
    class_pos = torch.randn(1, 1, 192)
    state = timm_state(source, class_pos)
    del state["head.weight"], state["head.bias"]
    path = tmp_path / "dino_lup.pth"
    torch.save(pretrain_dict(state), path)

    target = tiny(seed=5)
    report = load_checkpoint(target, path)

    assert report.format == "pretrain-teacher+timm"
    assert_same_output(expected_from_timm(source, class_pos), target)


def training_checkpoint(model: torch.nn.Module, config: dict) -> dict:
    return {
        "model": model.state_dict(),
        "optimizer": {"state": {}, "param_groups": [{"lr": 0.1, "params": [0]}]},
        "scheduler": None,
        "scaler": None,
        "rng": {"torch": torch.get_rng_state(), "python": (3, tuple(range(5)), None)},
        "epoch": 4,
        "config": config,
        "meta": build_meta({"num_images": 12, "hash": "abc"}),
    }


def test_training_checkpoints(tmp_path: Path) -> None:
    reid = perturb(ReIDModel(tiny(), num_classes=4, fusion="mean", neck="single", test_feature="after"))
    config = {"model": {"name": "pass_vit_tiny", "fusion": "mean", "neck": "single", "test_feature": "after"},
              "data": {"img_size": list(SMALL)}}
    path = tmp_path / "last.pth"
    save_atomic(training_checkpoint(reid, config), path)

    target = ReIDModel(tiny(seed=5), num_classes=4, fusion="mean", neck="single", test_feature="after")
    assert load_checkpoint(target, path).format == "training:reid-finetuned"
    assert_same_output(reid, target)

    built, report = build_model_from_checkpoint(path)
    assert report.format == "training:reid-finetuned"
    assert (built.fusion, built.neck, built.test_feature, built.num_classes) == ("mean", "single", "after", 4)
    assert not built.training
    assert_same_output(reid, built)

    backbone = perturb(tiny())
    pretrain_state = {"student": {f"backbone.{k}": v + 1 for k, v in backbone.state_dict().items()},
                      "teacher": {f"backbone.{k}": v for k, v in backbone.state_dict().items()},
                      "centers": torch.zeros(4, 16)}
    pre_path = tmp_path / "pretrain_last.pth"
    save_atomic(training_checkpoint(torch.nn.Module(), {"data": {"img_size": list(SMALL)}}) | {"model": pretrain_state},
                pre_path)
    target = tiny(seed=5)
    assert load_checkpoint(target, pre_path).format == "training:pretrain-teacher"
    assert_same_output(backbone, target)


# ----------------------------------------------------------------------------- positional embedding resize


def test_256x128_checkpoint_into_384x128_model_resizes_pos_embed(tmp_path: Path) -> None:
    source = perturb(tiny(img_size=(256, 128)))
    path = tmp_path / "b256.pth"
    torch.save(source.state_dict(), path)

    target = tiny(img_size=(384, 128), seed=5)
    report = load_checkpoint(target, path)

    assert report.resized == [("pos_embed", (1, 128, 192), (1, 192, 192))]
    expected = resize_pos_embed(source.pos_embed.detach(), (16, 8), (24, 8), mode="bilinear")
    torch.testing.assert_close(target.pos_embed.detach(), expected, rtol=0, atol=0)
    # Independent of resize_pos_embed: bilinear, align_corners=False on the (16, 8) grid.
    grid = source.pos_embed.detach().reshape(1, 16, 8, 192).permute(0, 3, 1, 2)
    by_hand = F.interpolate(grid, size=(24, 8), mode="bilinear", align_corners=False)
    torch.testing.assert_close(target.pos_embed.detach(), by_hand.permute(0, 2, 3, 1).reshape(1, 192, 192))
    torch.testing.assert_close(target.cls_pos, source.cls_pos, rtol=0, atol=0)

    reid = ReIDModel(tiny(img_size=(384, 128), seed=5))
    report = load_checkpoint(reid, {"model": ReIDModel(source).state_dict(), "config": {}, "epoch": 1})
    assert report.resized == [("base.pos_embed", (1, 128, 192), (1, 192, 192))]
    torch.testing.assert_close(reid.base.pos_embed.detach(), expected, rtol=0, atol=0)


def test_stored_img_size_gives_the_old_grid(tmp_path: Path) -> None:
    """24x8 positions are neither square nor 2:1: the config's 384x128 tells the grid."""
    source = perturb(tiny(img_size=(384, 128)))
    path = tmp_path / "b384.pth"
    torch.save(training_checkpoint(source, {"data": {"img_size": [384, 128]}}), path)

    target = tiny(img_size=(256, 128), seed=5)
    report = load_checkpoint(target, path)

    assert report.resized == [("pos_embed", (1, 192, 192), (1, 128, 192))]
    expected = resize_pos_embed(source.pos_embed.detach(), (24, 8), (16, 8), mode="bilinear")
    torch.testing.assert_close(target.pos_embed.detach(), expected, rtol=0, atol=0)


def test_grid_neither_square_nor_2to1_without_config(tmp_path: Path) -> None:
    """A bare 384x128 export: loading assumes the model's grid width, describing a 128 px width."""
    source = perturb(tiny(img_size=(384, 128)))
    path = tmp_path / "b384_export.pth"
    torch.save(source.state_dict(), path)

    target = tiny(img_size=(256, 128), seed=5)
    load_checkpoint(target, path)
    expected = resize_pos_embed(source.pos_embed.detach(), (24, 8), (16, 8), mode="bilinear")
    torch.testing.assert_close(target.pos_embed.detach(), expected, rtol=0, atol=0)

    info = checkpoint_info(path)
    assert (info["img_size"], info["img_size_source"], info["grid"]) == ([384, 128], "pos_embed", [24, 8])
    built, report = build_model_from_checkpoint(path)
    assert built.base.img_size == (384, 128) and report.resized == []

    with pytest.raises(CheckpointError, match=r"pos_embed: checkpoint \[1, 192, 192\] vs model \[1, 20, 192\]"):
        load_checkpoint(tiny(img_size=(64, 80), seed=5), path)  # 192 positions fit no 5-wide grid


# ----------------------------------------------------------------------------- mismatches


def test_wrong_key_is_named(tmp_path: Path) -> None:
    state = tiny().state_dict()
    state["norm.wieght"] = state.pop("norm.weight")
    path = tmp_path / "typo.pth"
    torch.save(state, path)
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(tiny(), path)
    message = str(err.value)
    assert str(path) in message
    assert "missing keys (1)" in message and "norm.weight" in message
    assert "unexpected keys (1)" in message and "norm.wieght" in message


def test_wrong_shape_is_named_with_both_shapes(tmp_path: Path) -> None:
    state = tiny().state_dict()
    state["blocks.0.mlp.fc1.weight"] = torch.zeros(10, 192)
    target = tiny(seed=5)
    before = {k: v.clone() for k, v in target.state_dict().items()}
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(target, state)
    assert "blocks.0.mlp.fc1.weight: checkpoint [10, 192] vs model [768, 192]" in str(err.value)
    for key, value in before.items():  # a refused load changes nothing
        torch.testing.assert_close(target.state_dict()[key], value, rtol=0, atol=0)


def test_wrong_depth_and_width_are_refused() -> None:
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(tiny(depth=1), tiny(depth=2).state_dict())
    message = str(err.value)
    assert "unexpected keys (12)" in message and "blocks.1.attn.qkv.weight" in message
    assert "depth 2; model: embed_dim 192, depth 1" in message

    small = create_model("pass_vit_small", img_size=SMALL, depth=1)
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(tiny(), small.state_dict())
    assert "cls_token: checkpoint [1, 1, 384] vs model [1, 1, 192]" in str(err.value)
    assert "pos_embed: checkpoint [1, 8, 384] vs model [1, 8, 192]" in str(err.value)


def test_reid_necks_of_another_layout_are_refused() -> None:
    cluster = ReIDModel(tiny(), neck_names="cluster")
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(ReIDModel(tiny(), neck_names="finetune"), cluster.state_dict())
    message = str(err.value)
    assert "missing keys (15)" in message and "bottleneck_1.weight" in message
    assert "unexpected keys (15)" in message and "bottleneck_pt1.weight" in message


def test_unknown_layout_lists_entries() -> None:
    with pytest.raises(CheckpointError, match="found no state dict of tensors.*'epoch': int"):
        load_checkpoint(tiny(), {"epoch": 3, "weights": [1, 2]})


# ----------------------------------------------------------------------------- unsafe and broken files

CALLS: list[str] = []


def _record_call(text: str) -> None:
    CALLS.append(text)


class PickledCode:
    def __reduce__(self) -> tuple:
        return (_record_call, ("unpickling ran code",))


class CustomObject:
    def __init__(self) -> None:
        self.weights = torch.zeros(2)


@pytest.mark.parametrize("payload, refused", [(PickledCode(), "_record_call"), (CustomObject(), "CustomObject")])
def test_pickled_code_or_custom_class_is_refused(tmp_path: Path, payload: object, refused: str) -> None:
    path = tmp_path / "evil.pth"
    torch.save({"model": tiny().state_dict(), "extra": payload}, path)
    with pytest.raises(CheckpointError) as err:
        safe_load(path)
    message = str(err.value)
    assert str(path) in message and "weights-only loading refused the global" in message and refused in message
    assert CALLS == []


def test_namespace_args_are_allowed(tmp_path: Path) -> None:
    path = tmp_path / "args.pth"
    torch.save({"args": argparse.Namespace(lr=0.1, arch="vit_small")}, path)
    assert safe_load(path)["args"] == argparse.Namespace(lr=0.1, arch="vit_small")


def test_truncated_missing_and_foreign_files(tmp_path: Path) -> None:
    path = tmp_path / "cut.pth"
    torch.save(tiny().state_dict(), path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=f"{path} is truncated, corrupt"):
        load_checkpoint(tiny(), path)

    with pytest.raises(CheckpointError, match="checkpoint not found: .*nope.pth"):
        safe_load(tmp_path / "nope.pth")

    text = tmp_path / "notes.pth"
    text.write_text("not a checkpoint")
    with pytest.raises(CheckpointError, match="notes.pth is truncated, corrupt or not a PyTorch checkpoint"):
        safe_load(text)


# ----------------------------------------------------------------------------- atomic save


def test_save_atomic_keeps_old_file_when_writing_fails(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "last.pth"
    save_atomic({"epoch": 1, "w": torch.ones(3)}, path)

    def broken_save(obj: object, f: object, *args: object, **kwargs: object) -> None:
        f.write(b"PK\x03\x04 half a checkpoint")  # type: ignore[attr-defined]
        raise OSError("No space left on device")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(CheckpointError, match="No space left") as err:
        save_atomic({"epoch": 2, "w": torch.zeros(3)}, path)
    assert str(path) in str(err.value) and "unchanged" in str(err.value)
    monkeypatch.undo()

    assert os.listdir(tmp_path) == ["last.pth"]
    old = safe_load(path)
    assert old["epoch"] == 1 and torch.equal(old["w"], torch.ones(3))

    save_atomic({"epoch": 2}, path)
    assert safe_load(path) == {"epoch": 2} and os.listdir(tmp_path) == ["last.pth"]


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_atomic_writes_get_the_permissions_open_would_give(tmp_path: Path, umask: int) -> None:
    # mkstemp makes owner-only files; a checkpoint or export in a shared run folder must not be (0o644 at the
    # usual umask 022, as `open()` gives), and a stricter umask is still honoured.
    old = os.umask(umask)
    try:
        save_atomic({"epoch": 1}, tmp_path / "last.pth")
        write_text_atomic(tmp_path / "config.yaml", "a: 1\n")
        with open(tmp_path / "plain.txt", "w") as f:
            f.write("x")
    finally:
        os.umask(old)
    expected = (tmp_path / "plain.txt").stat().st_mode & 0o777
    assert expected == 0o666 & ~umask
    for name in ("last.pth", "config.yaml"):
        assert (tmp_path / name).stat().st_mode & 0o777 == expected, name


# ----------------------------------------------------------------------------- description and building


def test_checkpoint_info_of_pretraining_checkpoint(tmp_path: Path) -> None:
    source = tiny(img_size=(256, 128))
    path = tmp_path / "pretrain.pth"
    torch.save(pretrain_dict(source.state_dict()), path)

    info = checkpoint_info(path)

    assert info["format"] == "pretrain-teacher"
    assert (info["arch"], info["embed_dim"], info["depth"], info["num_heads"], info["patch_size"]) == (
        "pass_vit_tiny", 192, 1, 3, 16)
    assert (info["img_size"], info["img_size_source"], info["grid"]) == ([256, 128], "pos_embed", [16, 8])
    assert info["tokens"] == 4
    assert info["backbone_parameters"] == sum(p.numel() for p in source.parameters())
    assert info["pretrain_heads"] is True and info["ignored_keys"] == 2
    assert (info["classifier"], info["num_classes"], info["necks"], info["neck"]) == (False, 0, [], None)
    assert info["args"]["local_crops_number"] == 9 and info["epoch"] is None
    json.dumps(info)


def test_checkpoint_info_of_timm_and_training_and_export(tmp_path: Path) -> None:
    vit = timm.models.vision_transformer.VisionTransformer(
        img_size=(224, 224), patch_size=16, embed_dim=384, depth=1, num_heads=6, num_classes=0
    )
    path = tmp_path / "dino_vits16.pth"
    torch.save(vit.state_dict(), path)
    info = checkpoint_info(path)
    assert (info["format"], info["arch"], info["tokens"], info["img_size"]) == ("timm", "pass_vit_small", 1, [224, 224])
    # converted: + 3 part tokens + 4 special positions - the class slot of pos_embed
    assert info["backbone_parameters"] == sum(p.numel() for p in vit.parameters()) + (3 + 4 - 1) * 384

    reid = ReIDModel(tiny(img_size=(384, 128)), num_classes=7, fusion="mean")
    config = {"model": {"name": "pass_vit_tiny", "fusion": "mean"}, "data": {"img_size": [384, 128]}}
    path = tmp_path / "best.pth"
    save_atomic(training_checkpoint(reid, config), path)
    info = checkpoint_info(path)
    assert (info["format"], info["img_size"], info["img_size_source"]) == ("training:reid-finetuned", [384, 128], "config")
    assert (info["epoch"], info["config"], info["meta"]["dataset"]) == (4, config, {"num_images": 12, "hash": "abc"})
    assert (info["classifier"], info["num_classes"], info["fusion"]) == (True, 7, "mean")
    assert (info["neck"], info["neck_names"]) == ("multi", "finetune")
    assert info["necks"] == ["bottleneck", "bottleneck_1", "bottleneck_2", "bottleneck_3"]

    export = tmp_path / "model.pth"
    torch.save(reid.state_dict(), export)
    meta = build_meta({"num_images": 3, "hash": "def"})
    export.with_suffix(".json").write_text(json.dumps({"meta": meta, "config": config}))
    info = checkpoint_info(export)
    assert (info["format"], info["meta"], info["img_size"]) == ("reid-finetuned", meta, [384, 128])


def test_info_command_prints_json_and_table(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from passreid.cli import main

    path = tmp_path / "reid.pth"
    torch.save(ReIDModel(tiny(), num_classes=3).state_dict(), path)
    assert main(["info", str(path), "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert (printed["format"], printed["num_classes"], printed["img_size"]) == ("reid-finetuned", 3, [64, 32])
    assert main(["info", str(path)]) == 0
    table = capsys.readouterr().out
    assert "reid-finetuned" in table and "3 classes" in table and "64x32" in table


@pytest.mark.parametrize(
    "layout, expected",
    [
        (dict(neck="multi", neck_names="finetune", fusion="cat", num_classes=6),
         ("cat", "multi", "finetune", "before", 6)),
        (dict(neck="multi", neck_names="finetune", fusion="mean", num_classes=6),
         ("mean", "multi", "finetune", "before", 6)),
        # a cluster-contrast model gives the published feature, not normalised again
        (dict(neck="multi", neck_names="cluster", fusion="cat", test_feature="after", normalize_output=False),
         ("cat", "multi", "cluster", "after", 0)),
        (dict(neck="single", fusion="mean"), ("mean", "single", "finetune", "before", 0)),
        (dict(neck="single", fusion="cat", num_classes=2), ("cat", "single", "finetune", "before", 2)),
    ],
)
def test_build_model_picks_the_layout(tmp_path: Path, layout: dict, expected: tuple) -> None:
    source = perturb(ReIDModel(tiny(), **layout))
    path = tmp_path / "model.pth"
    torch.save(source.state_dict(), path)

    built, report = build_model_from_checkpoint(path)

    assert (built.fusion, built.neck, built.neck_names, built.test_feature, built.num_classes) == expected
    assert built.normalize_output is layout.get("normalize_output", True)
    assert report.format == "reid-finetuned" and report.initialised == []
    assert built.base.img_size == SMALL and not built.training
    assert_same_output(source, built)


def test_build_model_reads_fusion_of_neck_only_model_from_sidecar(tmp_path: Path) -> None:
    """Multi-neck cluster models have no classifier: cat vs mean is only in the config (OUT.json)."""
    source = perturb(ReIDModel(tiny(), fusion="mean", neck_names="cluster", test_feature="after",
                               normalize_output=False))
    path = tmp_path / "uda.pth"
    torch.save(source.state_dict(), path)
    config = {"model": {"fusion": "mean", "neck": "multi", "test_feature": "after"}}
    path.with_suffix(".json").write_text(json.dumps({"meta": build_meta(None), "config": config}))

    built, _ = build_model_from_checkpoint(path)

    assert (built.fusion, built.neck_names, built.test_feature, built.feat_dim) == ("mean", "cluster", "after", 192)
    assert_same_output(source, built)


def test_build_model_from_pure_backbone_uses_defaults(tmp_path: Path) -> None:
    source = perturb(tiny(img_size=(128, 64), depth=2))
    path = tmp_path / "backbone.pth"
    torch.save(pretrain_dict(source.state_dict()), path)

    built, report = build_model_from_checkpoint(path)

    assert (built.fusion, built.neck, built.test_feature, built.num_classes) == ("cat", "multi", "before", 0)
    assert (built.base.img_size, built.base.depth, built.base.embed_dim) == ((128, 64), 2, 192)
    assert report.format == "pretrain-teacher" and "bottleneck.weight" in report.initialised
    x = images((128, 64))
    with torch.no_grad():
        tokens = source(x)
        expected = F.normalize(torch.cat((tokens[:, 0], tokens[:, 1:].mean(1)), dim=-1), dim=-1)
        torch.testing.assert_close(built(x), expected, rtol=0, atol=0)
