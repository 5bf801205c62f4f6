"""Feature extraction and feature files: which feature each stage evaluates, test resize, optional paths."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torchvision.transforms import v2

from passreid.cli import main
from passreid.cluster import build_cluster_model
from passreid.config import ModelConfig
from passreid.data.datasets import ImageRecord
from passreid.errors import DatasetError
from passreid.features import FeatureSet, eval_interpolation, extract_features
from passreid.models import ReIDModel, create_model


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> list[ImageRecord]:
    """Four random-noise images at 96x48, so that resizing to 32x16 depends on the kernel."""
    root = tmp_path_factory.mktemp("imgs")
    rng = np.random.default_rng(0)
    records = []
    for i in range(4):
        path = root / f"{i}.png"
        Image.fromarray(rng.integers(0, 256, (96, 48, 3), dtype=np.uint8)).save(path)
        records.append(ImageRecord(str(path), i, i % 2))
    return records


def tiny_reid(**kwargs) -> ReIDModel:
    torch.manual_seed(0)
    return ReIDModel(create_model("pass_vit_tiny", img_size=(32, 16), depth=1), **kwargs)


def warm_necks(model: ReIDModel) -> None:
    """Give the necks running statistics far from (0, 1), so that the BatchNorm step matters."""
    with torch.no_grad():
        for i, bn in enumerate(m for m in model.modules() if isinstance(m, torch.nn.BatchNorm1d)):
            bn.running_mean.uniform_(-0.5, 0.5)
            bn.running_var.uniform_(0.5, 2.0 + i)
            bn.weight.uniform_(0.5, 1.5)


def loaded(records: list[ImageRecord], interpolation: v2.InterpolationMode) -> torch.Tensor:
    """The test transform written out independently: resize (antialiased), [0, 1], mean/std 0.5."""
    batch = []
    for r in records:
        x = v2.functional.pil_to_tensor(Image.open(r.path).convert("RGB"))
        x = v2.functional.resize(x, [32, 16], interpolation=interpolation, antialias=True).float() / 255
        batch.append((x - 0.5) / 0.5)
    return torch.stack(batch)


# ----------------------------------------------------------------------------- which feature is evaluated


@pytest.mark.parametrize("fusion", ["cat", "mean"])
def test_cluster_model_evaluates_the_fused_normalised_tokens_without_normalising_again(images, fusion):
    """Published multi-neck cluster feature: cat [n(g), mean n(p)] or mean (n(g) + mean n(p)) / 2, as it is."""
    model = tiny_reid(fusion=fusion, neck="multi", test_feature="after", neck_names="cluster",
                      normalize_output=False)
    warm_necks(model)
    model.eval()
    x = loaded(images, v2.InterpolationMode.BICUBIC)
    with torch.no_grad():
        tokens = model.base(x)
        necks = [model.bottleneck, model.bottleneck_pt1, model.bottleneck_pt2, model.bottleneck_pt3]
        n = [F.normalize(bn(tokens[:, i]), dim=1) for i, bn in enumerate(necks)]
        parts = (n[1] + n[2] + n[3]) / 3
        expected = torch.cat([n[0], parts], dim=1) if fusion == "cat" else (n[0] + parts) / 2
    feats = extract_features(model, images, img_size=(32, 16), num_workers=0, batch_size=3)
    assert np.allclose(feats.features, expected.numpy(), atol=1e-5)
    norms = np.linalg.norm(feats.features, axis=1)
    assert (np.abs(norms - 1) > 0.01).all()  # not unit vectors: cat in (1, sqrt 2], mean below 1
    # the earlier behaviour, kept as an option: the same direction, normalised once more
    model.normalize_output = True
    again = extract_features(model, images, img_size=(32, 16), num_workers=0)
    assert np.allclose(again.features, F.normalize(expected, dim=1).numpy(), atol=1e-5)


def test_cluster_runs_build_the_published_feature_and_fine_tuned_models_the_unit_one(images):
    cluster = build_cluster_model(ModelConfig(name="pass_vit_tiny", depth=1, neck="multi", test_feature="after"),
                                  (32, 16), mode="usl")
    assert cluster.normalize_output is False and eval_interpolation(cluster) == "bicubic"
    renorm = build_cluster_model(ModelConfig(name="pass_vit_tiny", depth=1, test_feature="after"), (32, 16),
                                 mode="usl", renormalize=True)
    assert renorm.normalize_output is True
    fine = tiny_reid(num_classes=3)  # fine-tuning: fused tokens before the neck, L2-normalised
    fine.eval()
    feats = extract_features(fine, images, img_size=(32, 16), num_workers=0)
    with torch.no_grad():
        expected = F.normalize(fine.fuse(fine.base(loaded(images, v2.InterpolationMode.BILINEAR))), dim=1)
    assert np.allclose(feats.features, expected.numpy(), atol=1e-5)
    assert np.allclose(np.linalg.norm(feats.features, axis=1), 1.0, atol=1e-5)


def test_checkpoint_of_a_cluster_model_rebuilds_with_the_published_feature(tmp_path, images):
    from passreid.checkpoint import build_model_from_checkpoint

    model = tiny_reid(fusion="cat", neck="multi", test_feature="after", neck_names="cluster",
                      normalize_output=False)
    torch.save(model.state_dict(), tmp_path / "cluster.pth")
    rebuilt, _ = build_model_from_checkpoint(tmp_path / "cluster.pth")
    assert rebuilt.neck_names == "cluster" and rebuilt.normalize_output is False
    torch.save(tiny_reid(num_classes=3).state_dict(), tmp_path / "fine.pth")
    rebuilt, _ = build_model_from_checkpoint(tmp_path / "fine.pth")
    assert rebuilt.neck_names == "finetune" and rebuilt.normalize_output is True


# ----------------------------------------------------------------------------- test resize


def test_fine_tuned_models_are_evaluated_with_a_bilinear_resize_cluster_models_bicubic(images):
    fine = tiny_reid(num_classes=3).eval()
    cluster = tiny_reid(test_feature="after", neck_names="cluster").eval()
    assert (eval_interpolation(fine), eval_interpolation(cluster)) == ("bilinear", "bicubic")
    with torch.no_grad():
        for model, mode in ((fine, v2.InterpolationMode.BILINEAR), (cluster, v2.InterpolationMode.BICUBIC)):
            got = extract_features(model, images, img_size=(32, 16), num_workers=0).features
            assert np.allclose(got, model(loaded(images, mode)).numpy(), atol=1e-5)
        other = extract_features(fine, images, img_size=(32, 16), num_workers=0, interpolation="bicubic").features
        assert np.allclose(other, fine(loaded(images, v2.InterpolationMode.BICUBIC)).numpy(), atol=1e-5)
        assert not np.allclose(other, fine(loaded(images, v2.InterpolationMode.BILINEAR)).numpy(), atol=1e-4)


# ----------------------------------------------------------------------------- feature files without paths


def _hand_case(tmp_path: Path) -> tuple[Path, Path]:
    """q0 (pid 2) ranks g0 (pid 1), g1, g2 (pid 2): AP (1/2 + 2/3) / 2 = 7/12; q1 (pid 1) ranks g2, g1, g0:
    AP 1/3. mAP 11/24, rank-1 0, rank-3 1. No paths key in either file (as other tools write them)."""
    q, g = tmp_path / "q.npz", tmp_path / "g.npz"
    np.savez(q, features=np.array([[1, 0], [0, 1]], np.float32), pids=np.array([2, 1]), camids=np.array([0, 0]))
    np.savez(g, features=np.array([[1, 0], [0.6, 0.8], [0, 1]], np.float32), pids=np.array([1, 2, 2]),
             camids=np.array([1, 1, 1]))
    return q, g


def test_eval_of_feature_files_without_paths(tmp_path, capsys):
    q, g = _hand_case(tmp_path)
    assert FeatureSet.load(q).paths is None
    out = tmp_path / "metrics.json"
    assert main(["eval", "--query-features", str(q), "--gallery-features", str(g), "--json", str(out)]) == 0
    metrics = json.loads(out.read_text())
    assert metrics["mAP"] == pytest.approx(11 / 24)
    assert metrics["cmc"][:3] == pytest.approx([0.0, 0.5, 1.0])


def test_what_needs_paths_says_so_when_a_feature_file_has_none(tmp_path):
    from passreid.search import Gallery

    q, _ = _hand_case(tmp_path)
    with pytest.raises(DatasetError, match=r"no 'paths' key: a search gallery needs the image paths") as err:
        Gallery.load(q)
    assert str(q) in str(err.value)
    fs = FeatureSet.load(q)
    fs.save(tmp_path / "again.npz")  # written back without paths, still evaluable
    with np.load(tmp_path / "again.npz") as data:
        assert sorted(data.files) == ["camids", "features", "pids"]
