"""passreid.load -> extract: the evaluation path's features from every kind of image input; clear errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import passreid
from passreid.api import ReIDPipeline, load
from passreid.data.datasets import ImageRecord
from passreid.errors import CheckpointError, DatasetError
from passreid.features import extract_features
from passreid.models import ReIDModel, create_model
from passreid.search import Gallery

SIZE = (64, 32)


def tiny_reid(seed: int = 0, **kwargs) -> ReIDModel:
    torch.manual_seed(seed)
    return ReIDModel(create_model("pass_vit_tiny", img_size=SIZE, depth=1), num_classes=5, **kwargs).eval()


def write_images(folder: Path, n: int, seed: int = 0) -> list[str]:
    """Random RGB images of assorted sizes (so resizing matters), as PNG (lossless)."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        h, w = rng.integers(40, 120), rng.integers(20, 60)
        path = folder / f"img_{i}.png"
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path)
        paths.append(str(path))
    return paths


@pytest.fixture()
def checkpoint(tmp_path: Path) -> tuple[Path, ReIDModel]:
    model = tiny_reid()
    path = tmp_path / "finetuned.pth"
    torch.save(model.state_dict(), path)  # the fine-tuned layout: base.*, bottleneck*, classifier.weight
    return path, model


def test_load_extract_equals_evaluation_path(tmp_path: Path, checkpoint: tuple[Path, ReIDModel]) -> None:
    path, original = checkpoint
    paths = write_images(tmp_path / "imgs", 5)
    pipeline = passreid.load(path, device="cpu")
    assert isinstance(pipeline, ReIDPipeline)
    assert pipeline.img_size == SIZE and pipeline.feat_dim == 2 * 192
    records = [ImageRecord(p, 0, 0) for p in paths]
    for flip in (False, True):
        feats = pipeline.extract(paths, batch_size=2, flip=flip)
        # The reference runs the in-memory model that was saved, so checkpoint loading is checked too.
        ref = extract_features(original, records, img_size=SIZE, batch_size=3, num_workers=0, flip=flip)
        assert feats.shape == (5, 384) and feats.dtype == torch.float32
        torch.testing.assert_close(feats, torch.from_numpy(ref.features), atol=1e-5, rtol=0)
        torch.testing.assert_close(feats.norm(dim=1), torch.ones(5))
    no_flip = pipeline.extract(paths)
    assert (pipeline.extract(paths, flip=True) - no_flip).abs().max() > 1e-3  # flip really changes something


def test_every_input_kind_gives_the_same_feature(tmp_path: Path, checkpoint: tuple[Path, ReIDModel]) -> None:
    path, _ = checkpoint
    pipeline = load(path, device="cpu")
    [image_path] = write_images(tmp_path, 1, seed=3)
    pil = Image.open(image_path).convert("RGB")
    array = np.array(pil)
    chw = torch.from_numpy(array).permute(2, 0, 1).contiguous()
    ref = pipeline.extract(image_path)
    assert ref.shape == (1, 384)
    for item in (pil, array, chw, Path(image_path)):
        torch.testing.assert_close(pipeline.extract(item), ref, atol=1e-5, rtol=0)
    # A uint8 batch tensor is resized as a whole on the device: same numbers as the PIL path.
    torch.testing.assert_close(pipeline.extract(torch.stack([chw, chw])), ref.expand(2, -1), atol=1e-5, rtol=0)
    # Mixed lists keep their order.
    mixed = pipeline.extract([pil, image_path, array])
    torch.testing.assert_close(mixed, ref.expand(3, -1), atol=1e-5, rtol=0)
    # Float RGB in [0, 1] is accepted; a batch and a list of the same tensors agree.
    floats = torch.rand(3, 3, 70, 30, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(pipeline.extract(floats, batch_size=2), pipeline.extract(list(floats)),
                               atol=1e-5, rtol=0)
    # The pipeline is callable as well.
    torch.testing.assert_close(pipeline(image_path), ref)


def test_load_from_memory_and_gallery_round_trip(tmp_path: Path, checkpoint: tuple[Path, ReIDModel]) -> None:
    path, original = checkpoint
    paths = write_images(tmp_path / "g", 6, seed=1)
    from_file = load(path, device="cpu").extract(paths)
    from_module = load(original, device="cpu").extract(paths)
    torch.testing.assert_close(from_file, from_module, atol=1e-6, rtol=0)
    backbone_only = load(original.base, device="cpu")  # a bare PassViT gets the default ReID head
    assert backbone_only.feat_dim == 384
    torch.testing.assert_close(backbone_only.extract(paths), from_file, atol=1e-6, rtol=0)

    gallery = load(path, device="cpu").build_gallery(paths, pids=[0, 0, 1, 1, 2, 2], camids=[0, 1, 0, 1, 0, 1])
    result = gallery.search(from_file[2], k=1)
    assert result.indices.tolist() == [[2]] and result.paths == [[paths[2]]]
    assert result.scores[0, 0].item() == pytest.approx(1.0, abs=1e-5)
    assert passreid.Gallery is Gallery
    assert gallery.meta == {"model": load(original, device="cpu").fingerprint(), "flip": False, "img_size": [64, 32]}


def test_fingerprint_names_the_weights_not_the_file(tmp_path: Path, checkpoint: tuple[Path, ReIDModel]) -> None:
    path, original = checkpoint
    fingerprint = load(path, device="cpu").fingerprint()
    assert fingerprint.startswith("sha256:") and len(fingerprint) == 7 + 16
    assert load(original, device="cpu").fingerprint() == fingerprint  # the file's weights are the model's
    # A bare backbone gets its ReID necks at their (fixed) initialisation: loading it twice is the same model.
    backbone = tmp_path / "backbone.pth"
    torch.save(original.base.state_dict(), backbone)
    assert load(backbone, device="cpu").fingerprint() == load(backbone, device="cpu").fingerprint()
    # The ID classifier is not on the feature path; any other tensor is.
    retrained_head = tiny_reid()
    with torch.no_grad():
        retrained_head.classifier.weight.add_(1.0)
    assert load(retrained_head, device="cpu").fingerprint() == fingerprint
    other = tiny_reid()
    with torch.no_grad():
        other.base.norm.bias.add_(1e-3)
    assert load(other, device="cpu").fingerprint() != fingerprint


def test_bad_inputs_are_clear_errors(tmp_path: Path, checkpoint: tuple[Path, ReIDModel]) -> None:
    path, _ = checkpoint
    pipeline = load(path, device="cpu")
    missing = tmp_path / "nope.jpg"
    with pytest.raises(DatasetError, match="nope.jpg"):
        pipeline.extract([missing])
    text = tmp_path / "notes.jpg"
    text.write_text("this is not an image")
    with pytest.raises(DatasetError, match="not an image.*notes.jpg"):
        pipeline.extract(str(text))
    with pytest.raises(DatasetError, match="is a folder"):
        pipeline.extract(tmp_path)
    with pytest.raises(DatasetError, match="input 1 is a int"):
        pipeline.extract([Image.new("RGB", (32, 64)), 7])
    with pytest.raises(DatasetError, match=r"\[0, 1\]"):
        pipeline.extract(torch.full((2, 3, 64, 32), 2.0))
    with pytest.raises(DatasetError, match=r"\(3, H, W\) or \(B, 3, H, W\)"):
        pipeline.extract(torch.zeros(2, 1, 64, 32))
    with pytest.raises(DatasetError, match="uint8 RGB"):
        pipeline.extract(np.zeros((64, 32), np.uint8))
    with pytest.raises(CheckpointError, match="missing.pth"):
        load(tmp_path / "missing.pth", device="cpu")
