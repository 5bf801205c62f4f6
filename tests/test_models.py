"""PassViT, the model registry and ReIDModel against hand-computed answers."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from passreid.errors import ConfigError
from passreid.models import (
    PassViT,
    ReIDModel,
    ReIDOutput,
    create_model,
    list_models,
    resize_pos_embed,
)
from passreid.models import vit as vit_module


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def tiny(img_size: tuple[int, int] = (256, 128), depth: int = 1, **kwargs) -> PassViT:
    return create_model("pass_vit_tiny", img_size=img_size, depth=depth, **kwargs).eval()


def manual_forward(model: PassViT, x: Tensor, pos: Tensor, part: int | None = None) -> Tensor:
    """The PASS forward spelled out step by step with a given patch position table."""
    b = x.shape[0]
    patches = model.patch_embed.proj(x).flatten(2).transpose(1, 2) + pos
    cls = model.cls_token + model.cls_pos
    parts = [
        model.part_token1 + model.part1_pos,
        model.part_token2 + model.part2_pos,
        model.part_token3 + model.part3_pos,
    ]
    special = [cls] + (parts if part is None else [parts[part - 1]])
    seq = torch.cat([t.expand(b, -1, -1) for t in special] + [patches], dim=1)
    for block in model.blocks:
        seq = block(seq)
    return model.norm(seq)[:, : len(special)]


# --------------------------------------------------------------------------- PassViT


@pytest.mark.parametrize(
    ("img_size", "grid"), [((256, 128), (16, 8)), ((384, 128), (24, 8))]
)
def test_output_shapes_full_and_part(img_size: tuple[int, int], grid: tuple[int, int]) -> None:
    model = tiny(img_size)
    assert model.grid_size == grid
    assert model.pos_embed.shape == (1, grid[0] * grid[1], 192)
    x = torch.randn(2, 3, *img_size)
    assert model(x).shape == (2, 4, 192)
    for k in (1, 2, 3):
        assert model(x, part=k).shape == (2, 2, 192)


def test_full_forward_uses_pos_embed_unchanged(monkeypatch: pytest.MonkeyPatch) -> None:
    model = tiny(depth=2)
    x = torch.randn(2, 3, 256, 128)

    def no_resize(*args, **kwargs):
        raise AssertionError("pos_embed must not be resampled at the native input size")

    monkeypatch.setattr(vit_module, "resize_pos_embed", no_resize)
    out = model(x)
    torch.testing.assert_close(out, manual_forward(model, x, model.pos_embed), rtol=0, atol=1e-5)
    # The part-k sequence [cls, part_k, patches] at native size.
    torch.testing.assert_close(
        model(x, part=2), manual_forward(model, x, model.pos_embed, part=2), rtol=0, atol=1e-5
    )


def test_local_crop_uses_bicubic_resized_pos_embed() -> None:
    model = tiny((256, 128), depth=2)
    crop = torch.randn(3, 3, 128, 64)
    out = model(crop, part=3)
    assert out.shape == (3, 2, 192)
    pos = resize_pos_embed(model.pos_embed, (16, 8), (8, 4), mode="bicubic")
    torch.testing.assert_close(out, manual_forward(model, crop, pos, part=3), rtol=0, atol=1e-5)
    # Bilinear positions give a different answer, so the check above pins the mode.
    pos_bilinear = resize_pos_embed(model.pos_embed, (16, 8), (8, 4), mode="bilinear")
    assert not torch.allclose(out, manual_forward(model, crop, pos_bilinear, part=3), atol=1e-5)
    # A full 4-token pass on a crop works too.
    assert model(crop).shape == (3, 4, 192)


def test_size_not_multiple_of_patch_raises() -> None:
    model = tiny()
    with pytest.raises(ValueError, match="250x128"):
        model(torch.randn(1, 3, 250, 128))
    with pytest.raises(ValueError, match="part"):
        model(torch.randn(1, 3, 256, 128), part=4)


def test_parameter_names_match_official_layout() -> None:
    model = tiny(depth=1)
    expected = {
        "cls_token", "part_token1", "part_token2", "part_token3",
        "cls_pos", "part1_pos", "part2_pos", "part3_pos", "pos_embed",
        "patch_embed.proj.weight", "patch_embed.proj.bias",
        "blocks.0.norm1.weight", "blocks.0.norm1.bias",
        "blocks.0.attn.qkv.weight", "blocks.0.attn.qkv.bias",
        "blocks.0.attn.proj.weight", "blocks.0.attn.proj.bias",
        "blocks.0.norm2.weight", "blocks.0.norm2.bias",
        "blocks.0.mlp.fc1.weight", "blocks.0.mlp.fc1.bias",
        "blocks.0.mlp.fc2.weight", "blocks.0.mlp.fc2.bias",
        "norm.weight", "norm.bias",
    }  # fmt: skip
    assert set(model.state_dict()) == expected
    for name in ("cls_token", "part_token2", "cls_pos", "part3_pos"):
        assert model.state_dict()[name].shape == (1, 1, 192)
    assert model.blocks[0].attn.qkv.weight.shape == (3 * 192, 192)
    assert model.blocks[0].mlp.fc1.weight.shape == (4 * 192, 192)
    assert model.norm.eps == 1e-6 and model.blocks[0].norm1.eps == 1e-6


def test_init_statistics() -> None:
    model = create_model("pass_vit_small", img_size=(256, 128), depth=2)
    assert 0.015 < model.pos_embed.std().item() < 0.025
    assert 0.015 < model.blocks[0].attn.qkv.weight.std().item() < 0.025
    assert torch.count_nonzero(model.blocks[0].mlp.fc1.bias) == 0
    assert torch.all(model.norm.weight == 1) and torch.all(model.norm.bias == 0)


def test_drop_path_rates_grow_linearly() -> None:
    model = create_model("pass_vit_tiny", depth=3, drop_path_rate=0.1)
    assert isinstance(model.blocks[0].drop_path, nn.Identity)
    assert [b.drop_path.drop_prob for b in model.blocks[1:]] == pytest.approx([0.05, 0.1])


# --------------------------------------------------------------------------- resize_pos_embed


def test_resize_identity_is_exact() -> None:
    pos = torch.randn(1, 128, 8)
    for mode in ("bicubic", "bilinear"):
        assert torch.equal(resize_pos_embed(pos, (16, 8), (16, 8), mode=mode), pos)
        assert torch.equal(resize_pos_embed(pos, None, (16, 8), mode=mode), pos)


def test_resize_bilinear_hand_values() -> None:
    # Row 0..1 grid of width 2 ([0, 1] in channel 0) widened to 4 with align_corners=False:
    # source x = (j + 0.5) / 2 - 0.5 = -0.25, 0.25, 0.75, 1.25 -> clamp -> 0, .25, .75, 1.
    pos = torch.tensor([[[0.0], [1.0], [0.0], [1.0]]])  # grid (2, 2), row-major
    out = resize_pos_embed(pos, (2, 2), (2, 4), mode="bilinear")
    expected = torch.tensor([0.0, 0.25, 0.75, 1.0, 0.0, 0.25, 0.75, 1.0]).reshape(1, 8, 1)
    torch.testing.assert_close(out, expected)


def test_resize_keeps_rows_and_columns_apart() -> None:
    # A field that only depends on the row must stay constant along each new row.
    h, w = 16, 8
    rows = torch.arange(h, dtype=torch.float32).repeat_interleave(w)
    pos = torch.stack([rows, -rows], dim=-1).unsqueeze(0)  # (1, 128, 2)
    out = resize_pos_embed(pos, (h, w), (24, 4), mode="bilinear").reshape(24, 4, 2)
    torch.testing.assert_close(out, out[:, :1].expand_as(out))
    torch.testing.assert_close(out[..., 1], -out[..., 0])
    # Interior row i maps to source row (i + 0.5) * 16 / 24 - 0.5.
    assert out[6, 0, 0].item() == pytest.approx((6 + 0.5) * 16 / 24 - 0.5)


def test_resize_bilinear_round_trip_approximates_original() -> None:
    h, w = 16, 8
    yy, xx = torch.meshgrid(torch.linspace(0, 1, h), torch.linspace(0, 1, w), indexing="ij")
    field = torch.stack([torch.sin(2 * yy + xx), torch.cos(yy - 2 * xx), yy * xx], dim=-1)
    pos = field.reshape(1, h * w, 3)
    up = resize_pos_embed(pos, None, (32, 16), mode="bilinear")
    assert up.shape == (1, 512, 3)
    back = resize_pos_embed(up, (32, 16), (h, w), mode="bilinear")
    err = (back - pos).abs().max().item()
    assert err < 0.05
    assert err > 0  # a real resampling happened


def test_infer_grid() -> None:
    pos = torch.randn(1, 128, 4)
    torch.testing.assert_close(
        resize_pos_embed(pos, None, (24, 8)), resize_pos_embed(pos, (16, 8), (24, 8))
    )
    assert vit_module.infer_grid(64) == (8, 8)
    assert vit_module.infer_grid(128) == (16, 8)
    with pytest.raises(ValueError, match="192"):
        resize_pos_embed(torch.randn(1, 192, 4), None, (16, 8))
    with pytest.raises(ValueError, match="4x4"):
        resize_pos_embed(pos, (4, 4), (16, 8))


# --------------------------------------------------------------------------- attention


def test_forward_attention_matches_hand_computation() -> None:
    model = tiny((128, 64), depth=2)
    x = torch.randn(2, 3, 128, 64)
    probs = model.forward_attention(x)
    t = 4 + 8 * 4
    assert probs.shape == (2, 3, t, t)
    torch.testing.assert_close(probs.sum(-1), torch.ones(2, 3, t))

    # Re-compute the last block's attention from its weights.
    seq = model.prepare_tokens(x)
    seq = model.blocks[0](seq)
    last = model.blocks[1]
    normed = F.layer_norm(seq, (192,), last.norm1.weight, last.norm1.bias, eps=1e-6)
    qkv = normed @ last.attn.qkv.weight.T + last.attn.qkv.bias
    q, k, v = (c.reshape(2, t, 3, 64).transpose(1, 2) for c in qkv.split(192, dim=-1))
    expected = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(64), dim=-1)
    torch.testing.assert_close(probs, expected, rtol=1e-4, atol=1e-6)

    # The SDPA path of the block computes the same attention.
    mixed = (probs @ v).transpose(1, 2).reshape(2, t, 192)
    torch.testing.assert_close(
        last.attn(normed), last.attn.proj(mixed), rtol=1e-4, atol=1e-5
    )


# --------------------------------------------------------------------------- registry


def test_registry_names() -> None:
    assert list_models() == ["pass_vit_base", "pass_vit_small", "pass_vit_tiny"]
    dims = {"pass_vit_tiny": (192, 3), "pass_vit_small": (384, 6), "pass_vit_base": (768, 12)}
    for name, (dim, heads) in dims.items():
        model = create_model(name, depth=1)
        assert (model.embed_dim, model.num_heads, model.patch_size) == (dim, heads, 16)
        assert model.img_size == (256, 128)
    assert create_model("pass_vit_small", depth=1).depth == 1


def test_unknown_model_lists_valid_names() -> None:
    with pytest.raises(ValueError) as info:
        create_model("pass_vit_huge")
    message = str(info.value)
    assert "pass_vit_huge" in message
    for name in list_models():
        assert name in message
    assert isinstance(info.value, ConfigError)


@pytest.mark.parametrize("name", list_models())
def test_every_model_forward_backward(name: str) -> None:
    model = create_model(name, img_size=(64, 32), depth=1, drop_path_rate=0.1).train()
    out = model(torch.randn(2, 3, 64, 32))
    assert out.shape == (2, 4, model.embed_dim)
    loss = out.square().mean() + model(torch.randn(2, 3, 32, 32), part=1).square().mean()
    loss.backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.any()]
    assert missing == []


def test_autocast_bf16_runs() -> None:
    model = tiny((64, 32))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(torch.randn(2, 3, 64, 32))
        attn = model.forward_attention(torch.randn(2, 3, 64, 32))
    assert torch.isfinite(out).all()
    torch.testing.assert_close(attn.sum(-1), torch.ones_like(attn.sum(-1)))


# --------------------------------------------------------------------------- ReIDModel


class TokenBackbone(nn.Module):
    """Fake backbone: its 'image' already is the (B, 4, D) token tensor."""

    def __init__(self, embed_dim: int) -> None:
        super().__init__()
        self.embed_dim = embed_dim

    def forward(self, x: Tensor) -> Tensor:
        return x


# g = [1, 2]; parts [0, 3], [3, 0], [0, 0] -> part mean [1, 1].
TOKENS = torch.tensor([[[1.0, 2.0], [0.0, 3.0], [3.0, 0.0], [0.0, 0.0]]])


def reid(**kwargs) -> ReIDModel:
    return ReIDModel(TokenBackbone(2), **kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("fusion", "fused"), [("cat", [1.0, 2.0, 1.0, 1.0]), ("mean", [1.0, 1.5])]
)
@pytest.mark.parametrize("neck", ["multi", "single"])
def test_eval_feature_before_neck(fusion: str, fused: list[float], neck: str) -> None:
    model = reid(fusion=fusion, neck=neck).eval()
    assert model.feat_dim == len(fused)
    expected = torch.tensor([fused]) / torch.tensor(fused).norm()
    torch.testing.assert_close(model(TOKENS), expected)


def _shift_multi_necks(model: ReIDModel, names: tuple[str, str, str]) -> None:
    """Running means that make the normalised part tokens [0,1], [1,0], [1,0]."""
    getattr(model, names[0]).running_mean.copy_(torch.tensor([0.0, 1.0]))
    getattr(model, names[2]).running_mean.copy_(torch.tensor([-1.0, 0.0]))


@pytest.mark.parametrize("neck_names", ["finetune", "cluster"])
def test_eval_feature_after_multi_neck(neck_names: str) -> None:
    names = ("bottleneck_1", "bottleneck_2", "bottleneck_3")
    if neck_names == "cluster":
        names = ("bottleneck_pt1", "bottleneck_pt2", "bottleneck_pt3")
    g = torch.tensor([1.0, 2.0]) / math.sqrt(5)
    p = torch.tensor([2.0, 1.0]) / 3  # mean of [0,1], [1,0], [1,0]
    for fusion, fused in (("cat", torch.cat([g, p])), ("mean", (g + p) / 2)):
        model = reid(fusion=fusion, neck="multi", test_feature="after", neck_names=neck_names)
        model.eval()
        _shift_multi_necks(model, names)
        torch.testing.assert_close(model(TOKENS)[0], fused / fused.norm())


def test_eval_feature_after_single_neck() -> None:
    model = reid(fusion="cat", neck="single", test_feature="after").eval()
    model.bottleneck.running_mean.copy_(torch.tensor([1.0, 0.0, 0.0, 1.0]))
    model.bottleneck.running_var.copy_(torch.tensor([1.0, 4.0, 1.0, 1.0]))
    # ([1, 2, 1, 1] - mean) / std = [0, 1, 1, 0]
    expected = torch.tensor([[0.0, 1.0, 1.0, 0.0]]) / math.sqrt(2)
    torch.testing.assert_close(model(TOKENS), expected, rtol=0, atol=1e-5)


def _train_batch() -> Tensor:
    """Two samples; the second differs from the first by +1 (g), -1 (parts 1, 2) or 0 (part 3)."""
    delta = torch.tensor([[[1.0, 1.0], [-1.0, -1.0], [-1.0, -1.0], [0.0, 0.0]]])
    return torch.cat([TOKENS, TOKENS + delta])


@pytest.mark.parametrize("fusion", ["cat", "mean"])
def test_train_output_multi_neck(fusion: str) -> None:
    model = reid(num_classes=3, fusion=fusion, neck="multi").train()
    out = model(_train_batch())
    assert isinstance(out, ReIDOutput)
    before = model.fuse(_train_batch())
    torch.testing.assert_close(out.feat, before)
    # Batch-stat BN of two samples gives -1/+1 (0 where equal): sample 0 has g -> -1,
    # parts 1, 2 -> +1, part 3 -> 0, so the part mean is 2/3.
    g, p = torch.tensor([-1.0, -1.0]), torch.tensor([2.0, 2.0]) / 3
    first = torch.cat([g, p]) if fusion == "cat" else (g + p) / 2
    torch.testing.assert_close(out.neck_feat, torch.stack([first, -first]), rtol=0, atol=1e-4)
    torch.testing.assert_close(out.logits, out.neck_feat @ model.classifier.weight.T)


def test_train_output_single_neck_after() -> None:
    model = reid(fusion="cat", neck="single", test_feature="after").train()
    out = model(_train_batch())
    assert out.logits is None
    # Fused sample 1 - sample 0 = [1, 1, -2/3, -2/3] -> BN signs, then L2 over 4 dims.
    first = torch.tensor([-1.0, -1.0, 1.0, 1.0]) / 2
    torch.testing.assert_close(out.neck_feat, torch.stack([first, -first]), rtol=0, atol=1e-4)


def test_train_output_multi_neck_after_is_fused_unit_tokens() -> None:
    model = reid(fusion="cat", neck="multi", test_feature="after").train()
    out = model(_train_batch())
    # Tokens BN'd to -[1, 1] (g), +[1, 1] (parts 1, 2), 0 (part 3); L2 each, then fused.
    s = 1 / math.sqrt(2)
    first = torch.tensor([-s, -s, 2 * s / 3, 2 * s / 3])
    torch.testing.assert_close(out.neck_feat, torch.stack([first, -first]), rtol=0, atol=1e-4)


@pytest.mark.parametrize(
    ("neck", "neck_names", "necks"),
    [
        ("multi", "finetune", ["bottleneck", "bottleneck_1", "bottleneck_2", "bottleneck_3"]),
        ("multi", "cluster", ["bottleneck", "bottleneck_pt1", "bottleneck_pt2", "bottleneck_pt3"]),
        ("single", "finetune", ["bottleneck"]),
    ],
)
def test_state_dict_layout(neck: str, neck_names: str, necks: list[str]) -> None:
    backbone = tiny((64, 32))
    model = ReIDModel(backbone, num_classes=7, neck=neck, neck_names=neck_names)
    bn_keys = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")
    expected = {f"base.{k}" for k in backbone.state_dict()}
    expected |= {f"{n}.{k}" for n in necks for k in bn_keys}
    expected.add("classifier.weight")
    assert set(model.state_dict()) == expected
    assert model.classifier.weight.shape == (7, 384)
    assert 0.0005 < model.classifier.weight.std().item() < 0.002
    assert "classifier.weight" not in ReIDModel(tiny((64, 32)), num_classes=0).state_dict()


def test_bn_bias_frozen_at_zero() -> None:
    model = ReIDModel(tiny((64, 32)), num_classes=4, neck="multi")
    necks = [model.bottleneck, model.bottleneck_1, model.bottleneck_2, model.bottleneck_3]
    out = model.train()(torch.randn(4, 3, 64, 32))
    (out.logits.sum() + out.feat.sum()).backward()
    for bn in necks:
        assert not bn.bias.requires_grad and bn.bias.grad is None
        assert torch.all(bn.bias == 0) and torch.all(bn.weight == 1)
        assert bn.weight.grad is not None
    model.eval()
    feat = model(torch.randn(3, 3, 64, 32))
    assert feat.shape == (3, 384)
    torch.testing.assert_close(feat.norm(dim=-1), torch.ones(3))
    assert model.tokens(torch.zeros(1, 3, 64, 32)).shape == (1, 4, 192)


def test_invalid_options_raise_config_error() -> None:
    with pytest.raises(ConfigError, match="sum"):
        reid(fusion="sum")
    with pytest.raises(ConfigError, match="neck_names"):
        reid(neck_names="dino")


# --------------------------------------------------------------------------- ghost batch norm


def test_ghost_batch_norm_equals_one_batch_norm_per_group_and_keeps_the_first_groups_statistics() -> None:
    """A batch of 12 in groups of 4 = what DataParallel on 3 devices does: three BatchNorm1d calls."""
    from passreid.models import GhostBatchNorm1d

    torch.manual_seed(0)
    x = torch.randn(12, 5) * torch.tensor([1.0, 2.0, 3.0, 0.5, 4.0]) + torch.arange(12.0).unsqueeze(1)
    ghost = GhostBatchNorm1d(5, group_size=4)
    with torch.no_grad():
        ghost.weight.uniform_(0.5, 1.5)
        ghost.bias.uniform_(-0.5, 0.5)
    replicas = [nn.BatchNorm1d(5) for _ in range(3)]
    for bn in replicas:
        bn.load_state_dict(ghost.state_dict())
    out = ghost(x)
    expected = torch.cat([bn(x[4 * i : 4 * (i + 1)]) for i, bn in enumerate(replicas)])
    torch.testing.assert_close(out, expected)
    # by hand for group 2: its own mean and biased variance
    g = x[8:12]
    manual = (g - g.mean(0)) / torch.sqrt(g.var(0, unbiased=False) + ghost.eps) * ghost.weight + ghost.bias
    torch.testing.assert_close(out[8:12], manual.detach())
    whole = nn.BatchNorm1d(5)
    whole.load_state_dict(replicas[1].state_dict())
    assert not torch.allclose(out, whole(x), atol=1e-2)  # one BatchNorm over all 12 is something else
    # the running statistics are replica 0's (the first group's), as DataParallel keeps them
    torch.testing.assert_close(ghost.running_mean, replicas[0].running_mean)
    torch.testing.assert_close(ghost.running_var, replicas[0].running_var)
    # gradients flow through every group
    x.requires_grad_(True)
    ghost(x).square().sum().backward()
    assert x.grad is not None and bool((x.grad.abs().sum(1) > 0).all())
    # eval mode, and batches that are not a multiple of the group, are plain BatchNorm1d
    plain = nn.BatchNorm1d(5)
    plain.load_state_dict(ghost.state_dict())
    ghost.eval(), plain.eval()
    torch.testing.assert_close(ghost(x.detach()), plain(x.detach()))


def test_ghost_batch_differs_from_whole_batch_normalisation_and_reaches_every_neck() -> None:
    torch.manual_seed(0)
    backbone = TokenBackbone(6)
    model = ReIDModel(backbone, neck="multi", test_feature="after", neck_names="cluster", ghost_batch=4).train()
    necks = [m for m in model.modules() if isinstance(m, nn.BatchNorm1d)]
    assert len(necks) == 4 and all(getattr(m, "group_size", 0) == 4 for m in necks)
    tokens = torch.randn(8, 4, 6) + torch.arange(8.0).view(8, 1, 1)  # the two halves differ in mean
    plain = ReIDModel(TokenBackbone(6), neck="multi", test_feature="after", neck_names="cluster").train()
    plain.load_state_dict(model.state_dict())
    assert not torch.allclose(model(tokens).neck_feat, plain(tokens).neck_feat, atol=1e-3)
    per_half = torch.cat([plain(tokens[:4]).neck_feat, plain(tokens[4:]).neck_feat])
    torch.testing.assert_close(model(tokens).neck_feat, per_half)
    single = ReIDModel(TokenBackbone(6), neck="single", ghost_batch=4)
    assert getattr(single.bottleneck, "group_size", 0) == 4
    with pytest.raises(ConfigError, match="ghost_batch"):
        ReIDModel(TokenBackbone(6), ghost_batch=-1)
