"""Ranked-list pictures (layout, border colours), per-query AP vs the protocol, CMC PNG, attention maps, demo stage."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from passreid.demo import DemoContext, visualize_stage
from passreid.evaluation import evaluate
from passreid.models import ReIDModel, create_model
from passreid.visualize import (
    CORRECT_COLOR,
    QUERY_COLOR,
    UNKNOWN_COLOR,
    WRONG_COLOR,
    attention_figure,
    attention_maps,
    average_precision,
    cell_origin,
    grid_size,
    plot_cmc,
    rank_queries,
    ranked_list_grid,
    worst_queries,
)

SIZE = (64, 32)


def tiny_backbone(depth: int = 2, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return create_model("pass_vit_tiny", img_size=SIZE, depth=depth).eval()


def solid(path: Path, color: tuple[int, int, int], size: tuple[int, int] = (40, 20)) -> str:
    Image.new("RGB", size, color).save(path)
    return str(path)


def test_ranked_list_layout_and_border_colours(tmp_path: Path) -> None:
    colours = [(10, 20, 30), (200, 200, 0), (0, 200, 200), (90, 60, 30), (250, 250, 250)]
    query = solid(tmp_path / "q.png", (123, 45, 67))
    gallery = [solid(tmp_path / f"g{i}.png", c) for i, c in enumerate(colours)]
    out = tmp_path / "pics" / "ranked.png"
    picture = ranked_list_grid(query, gallery, [0.1, 0.2, 0.3, 0.4, 0.5], [True, False, None, True, False],
                               out=out, k=3, cell_size=(32, 16))
    # Hand layout with BORDER 4, GAP 4, QUERY_GAP 12: framed cell 24 x 40, cells at x = 4, 44, 72, 100;
    # width 4 + 4 * 28 + 12 = 128; height 4 + 40 + 14 (text) + 4 = 62.
    assert picture.size == (128, 62) == grid_size(3, (32, 16))
    assert [cell_origin(i, (32, 16)) for i in range(4)] == [(4, 4), (44, 4), (72, 4), (100, 4)]
    assert Image.open(out).size == (128, 62)
    expected = [QUERY_COLOR, CORRECT_COLOR, WRONG_COLOR, UNKNOWN_COLOR]
    images = [(123, 45, 67), *colours[:3]]
    for i, (x, y) in enumerate([(4, 4), (44, 4), (72, 4), (100, 4)]):
        for px, py in ((x + 1, y + 1), (x + 23, y + 39), (x + 1, y + 20), (x + 12, y + 2)):  # frame corners/edges
            assert picture.getpixel((px, py)) == expected[i], (i, px, py)
        assert picture.getpixel((x + 12, y + 20)) == images[i]  # the image itself inside the frame
    assert picture.getpixel((2, 30)) == (255, 255, 255)  # margin stays background
    assert picture.getpixel((38, 30)) == (255, 255, 255)  # the gap after the query
    text_band = np.asarray(picture)[48:58, 44:68]
    assert (text_band.sum(axis=2) < 200).any()  # the distance is written under rank 1

    fewer = ranked_list_grid(query, gallery[:2], [0.1, 0.2], None, k=10, cell_size=(32, 16))
    assert fewer.size == grid_size(2, (32, 16))
    assert fewer.getpixel((45, 5)) == UNKNOWN_COLOR  # no labels: grey frames


def test_average_precision_hand_values() -> None:
    assert average_precision(np.array([False, True, False, True])) == pytest.approx((1 / 2 + 2 / 4) / 2)
    assert average_precision(np.array([True, True, False])) == 1.0
    assert np.isnan(average_precision(np.array([False, False])))
    assert worst_queries(np.array([0.5, np.nan, 0.1, 0.9, 0.1]), 3) == [2, 4, 0]


def test_rank_queries_matches_the_evaluation_protocol() -> None:
    rng = np.random.default_rng(0)
    g_pids, g_cams = rng.integers(0, 12, 150), rng.integers(0, 4, 150)
    q_pids, q_cams = rng.integers(0, 12, 40), rng.integers(0, 4, 40)
    centres = rng.standard_normal((12, 16))
    gf = centres[g_pids] + 1.2 * rng.standard_normal((150, 16))
    qf = centres[q_pids] + 1.2 * rng.standard_normal((40, 16))
    gf /= np.linalg.norm(gf, axis=1, keepdims=True)
    qf /= np.linalg.norm(qf, axis=1, keepdims=True)
    rankings = rank_queries(qf.astype(np.float32), gf.astype(np.float32), q_pids, g_pids, q_cams, g_cams, k=5,
                            chunk_size=7)
    metrics = evaluate(qf.astype(np.float32), gf.astype(np.float32), q_pids, g_pids, q_cams, g_cams)
    valid = np.isfinite(rankings.ap)
    assert valid.sum() == metrics["num_valid_queries"]
    assert rankings.ap[valid].mean() == pytest.approx(metrics["mAP"], abs=1e-9)
    assert rankings.top_correct[valid, 0].mean() == pytest.approx(metrics["cmc"][0], abs=1e-9)
    # No same-identity-same-camera item is ever shown, and distances ascend.
    for i in range(40):
        shown = rankings.top[i]
        assert not np.any((g_pids[shown] == q_pids[i]) & (g_cams[shown] == q_cams[i]))
        assert np.all(np.diff(rankings.top_dist[i]) >= 0)
        np.testing.assert_allclose(rankings.top_dist[i], 2 - 2 * gf[shown] @ qf[i], atol=1e-5)


def test_plot_cmc_writes_a_png(tmp_path: Path) -> None:
    out = plot_cmc([0.5, 0.7, 0.8, 0.9, 1.0], tmp_path / "cmc" / "curve.png", title="test")
    with Image.open(out) as img:
        assert img.format == "PNG" and img.size == (500, 350)
        assert np.asarray(img.convert("L")).std() > 0
    with pytest.raises(ValueError, match="empty"):
        plot_cmc([], tmp_path / "x.png")


def test_attention_maps_one_per_token_summing_to_one() -> None:
    model = ReIDModel(tiny_backbone())
    image = torch.randn(3, *SIZE)
    maps = attention_maps(model, image)
    assert maps.shape == (4, 4, 2)
    torch.testing.assert_close(maps.sum(dim=(1, 2)), torch.ones(4))
    assert (maps >= 0).all()
    # Same numbers from the raw attention: head mean of the special-token rows over the patch columns.
    attn = model.base.forward_attention(image[None])[0].mean(0)[:4, 4:]
    torch.testing.assert_close(maps.flatten(1), attn / attn.sum(1, keepdim=True))
    assert not torch.allclose(maps[1], maps[3])  # the part tokens do not all look alike


def test_attention_maps_known_answer_with_blind_queries() -> None:
    backbone = tiny_backbone(depth=1)
    with torch.no_grad():  # q = k = 0 in the last block: softmax of equal logits is uniform
        backbone.blocks[-1].attn.qkv.weight.zero_()
        backbone.blocks[-1].attn.qkv.bias.zero_()
    maps = attention_maps(backbone, torch.randn(1, 3, *SIZE))
    torch.testing.assert_close(maps, torch.full((4, 4, 2), 1 / 8))


def test_attention_figure_size(tmp_path: Path) -> None:
    images = [solid(tmp_path / "a.png", (200, 0, 0)), Image.new("RGB", (30, 70), (0, 0, 200))]
    picture = attention_figure(tiny_backbone(), images, out=tmp_path / "att.png", scale=2)
    # 5 columns of 64 px + gaps of 4; header 14 + 4, then 2 rows of 128 + 14 (peak text) + 4.
    assert picture.size == (4 + 5 * (64 + 4), 18 + 2 * (128 + 14 + 4))
    assert picture.getpixel((4 + 32, 18 + 64)) == (200, 0, 0)  # the first column is the image itself
    assert Image.open(tmp_path / "att.png").size == picture.size


def test_demo_stage(tmp_path: Path) -> None:
    from passreid.data.synthetic import generate_synthetic

    ctx = DemoContext(workdir=tmp_path, source_root=tmp_path / "src", target_root=tmp_path / "tgt",
                      device=torch.device("cpu"))
    assert visualize_stage(ctx) == [] and "pictures" not in ctx.state  # nothing fine-tuned yet: skipped
    generate_synthetic(ctx.source_root, num_ids=8, num_cams=3, seed=0, num_distractors=2, num_junk=1)
    ckpt = tmp_path / "ft.pth"
    torch.save(ReIDModel(tiny_backbone(depth=1), num_classes=4).state_dict(), ckpt)
    ctx.state["finetuned_checkpoint"] = ckpt
    assert visualize_stage(ctx) == []
    assert set(ctx.state["pictures"]) == {"ranked_list", "attention"}
    for path in ctx.state["pictures"].values():
        assert Path(path).parent == tmp_path and Image.open(path).format == "PNG"
    with Image.open(ctx.state["pictures"]["ranked_list"]) as ranked:
        first = cell_origin(1)
        assert ranked.convert("RGB").getpixel((first[0] + 1, first[1] + 1)) in (CORRECT_COLOR, WRONG_COLOR)


def test_visualize_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from passreid.cli import main
    from passreid.data.synthetic import generate_synthetic

    root = tmp_path / "data"
    generate_synthetic(root, num_ids=8, num_cams=3, seed=1, num_distractors=2, num_junk=1)
    ckpt = tmp_path / "ft.pth"
    torch.save(ReIDModel(tiny_backbone(depth=1), num_classes=4).state_dict(), ckpt)
    common = ["visualize", "--checkpoint", str(ckpt), "--dataset", "market1501", "--root", str(root),
              "--num-workers", "0", "--device", "cpu", "-k", "4", "--out", str(tmp_path / "out")]
    assert main([*common, "--worst", "2", "--attention"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 3 and "worst1_" in lines[0] and "worst2_" in lines[1]
    aps = [float(line.split("AP")[1].split()[0]) for line in lines[:2]]
    assert aps[0] <= aps[1]
    assert len(list((tmp_path / "out").glob("worst*.png"))) == 2
    assert Image.open(tmp_path / "out" / "attention.png").size[1] == 18 + 2 * (2 * SIZE[0] + 14 + 4)
    assert main([*common, "--queries", "0,1"]) == 0
    assert len(list((tmp_path / "out").glob("rank_*.png"))) == 2
    assert main([*common, "--queries", "999"]) == 2
    assert "out of range" in capsys.readouterr().err
