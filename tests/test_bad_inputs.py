"""Catalogue of bad inputs and faults: each gives a clear error naming the culprit, or a stated recovery.

Every case here is a row of ``docs/bad_inputs.md``. An error case asserts the
exact ``passreid.errors`` type and that the message names the file, key or value
a user has to fix; a recovery case asserts what was recovered (counts, surviving
files, computed metrics). The cases work on a real synthetic Market-1501 layout
and tiny models, through the same entry points a user calls.
"""

from __future__ import annotations

import builtins
import errno
import importlib.metadata
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml

from passreid import create_model, load_checkpoint
from passreid.checkpoint import safe_load
from passreid.cli import main as cli_main
from passreid.cluster import ClusterConfig
from passreid.config import config_to_dict, load_config
from passreid.data.datasets import ImageRecord, build_dataset
from passreid.data.images import ImageDataset, read_image
from passreid.data.synthetic import generate_synthetic
from passreid.engine import (
    check_resume_config,
    explain_oom,
    load_training_checkpoint,
    loss_is_finite,
    save_training_checkpoint,
)
from passreid.errors import CheckpointError, ConfigError, DatasetError, TrainingError
from passreid.evaluation import evaluate
from passreid.features import FeatureSet
from passreid.finetune import FinetuneConfig, train_one_epoch
from passreid.losses.reid import ReIDLoss
from passreid.models import ReIDModel
from passreid.runfolder import LOCK_NAME, claim_run_folder, lock_holder
from passreid.search import Gallery

SRC = Path(__file__).resolve().parents[1] / "src"
TINY = dict(depth=1)
SIZE = (64, 32)

pytestmark = pytest.mark.usefixtures("one_thread")


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def synth_master(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One small synthetic Market-1501 set per module (8 ids, 3 cameras, 64x32), copied per test."""
    root = tmp_path_factory.mktemp("synth") / "market"
    generate_synthetic(root, num_ids=8, num_cams=3, seed=0, img_size=SIZE, num_distractors=2, num_junk=2)
    return root


@pytest.fixture
def market(synth_master: Path, tmp_path: Path) -> Path:
    """A private copy of the synthetic set that a test may damage."""
    return Path(shutil.copytree(synth_master, tmp_path / "market"))


def first_image(folder: Path) -> Path:
    return sorted(p for p in folder.iterdir() if p.suffix == ".jpg")[0]


def tiny_backbone(img_size: tuple[int, int] = SIZE, name: str = "pass_vit_tiny", depth: int = 1):
    torch.manual_seed(0)
    return create_model(name, img_size=img_size, depth=depth)


# ----------------------------------------------------------------------------- images


def _zero_byte(path: Path) -> None:
    path.write_bytes(b"")


def _truncated(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _not_an_image(path: Path) -> None:
    path.write_text("this is a README saved with a .jpg name\n")


BAD_IMAGES = {
    "zero-byte": (_zero_byte, "empty (0 bytes)"),
    "truncated": (_truncated, "truncated"),
    "not-an-image": (_not_an_image, "not an image"),
}


@pytest.mark.parametrize("kind", sorted(BAD_IMAGES))
def test_bad_image_names_the_file(market: Path, kind: str) -> None:
    damage, fragment = BAD_IMAGES[kind]
    path = first_image(market / "bounding_box_train")
    damage(path)
    with pytest.raises(DatasetError) as err:
        read_image(path)
    assert fragment in str(err.value) and str(path) in str(err.value)


@pytest.mark.parametrize("kind", sorted(BAD_IMAGES))
def test_bad_image_in_a_loader_worker_is_a_dataset_error_naming_the_file(market: Path, kind: str) -> None:
    """A bad file read inside a DataLoader worker process reaches the main process as the same error type."""
    damage, fragment = BAD_IMAGES[kind]
    dataset = build_dataset("market1501", market)
    bad = Path(dataset.train[3].path)
    damage(bad)
    loader = torch.utils.data.DataLoader(ImageDataset(dataset.train[:6]), batch_size=None, num_workers=1)
    with pytest.raises(DatasetError) as err:
        list(loader)
    assert str(bad) in str(err.value) and fragment in str(err.value)


def test_skip_corrupt_replaces_bad_images_and_counts_them(market: Path) -> None:
    dataset = build_dataset("market1501", market)
    records = dataset.train[:6]
    _zero_byte(Path(records[1].path))
    _truncated(Path(records[4].path))
    images = ImageDataset(records, skip_corrupt=True)
    loader = torch.utils.data.DataLoader(images, batch_size=None, num_workers=1, collate_fn=lambda item: item)
    served = [index for _, _, _, index in loader]
    # The bad items are replaced by their next readable neighbour; nothing else changes.
    assert served == [0, 2, 2, 3, 5, 5]
    assert images.skipped_paths() == [records[1].path, records[4].path]


def test_non_image_files_in_a_data_folder_are_ignored(market: Path, synth_master: Path) -> None:
    """Archive leftovers (notes, ``Thumbs.db``, macOS ``._x.jpg`` forks) are not images and are not listed."""
    train = market / "bounding_box_train"
    (train / "readme.txt").write_text("downloaded from ...\n")
    (train / "Thumbs.db").write_bytes(b"\x00" * 64)
    (train / ("._" + first_image(train).name)).write_bytes(b"\x00\x05\x16\x07")
    (train / "sub").mkdir()
    got = build_dataset("market1501", market)
    clean = build_dataset("market1501", synth_master)
    assert [Path(r.path).name for r in got.train] == [Path(r.path).name for r in clean.train]


# ----------------------------------------------------------------------------- data set layouts


def test_missing_split_folder_is_named(market: Path) -> None:
    shutil.rmtree(market / "query")
    with pytest.raises(DatasetError) as err:
        build_dataset("market1501", market)
    assert str(market / "query") in str(err.value) and "not found" in str(err.value)


def test_missing_data_set_root_is_named(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="not found") as err:
        build_dataset("market1501", tmp_path / "nowhere")
    assert str(tmp_path / "nowhere") in str(err.value)


@pytest.mark.parametrize("name", ["person12.jpg", "0001_cam1_000001.jpg", "0001_c1s1_000451.jpg"])
def test_file_name_that_does_not_parse_is_named(market: Path, name: str) -> None:
    shutil.copy(first_image(market / "bounding_box_test"), market / "bounding_box_test" / name)
    with pytest.raises(DatasetError, match="cannot parse identity and camera") as err:
        build_dataset("market1501", market)
    assert str(market / "bounding_box_test" / name) in str(err.value)


def test_empty_split_is_named(market: Path) -> None:
    for path in (market / "bounding_box_test").iterdir():
        path.unlink()
    with pytest.raises(DatasetError, match="holds no images") as err:
        build_dataset("market1501", market)
    assert str(market / "bounding_box_test") in str(err.value)


def test_split_of_only_junk_identities_is_named(market: Path) -> None:
    query = market / "query"
    for i, path in enumerate(sorted(query.iterdir())):
        path.rename(query / f"-1_c1s1_{i:06d}_01.jpg")
    with pytest.raises(DatasetError, match="only junk") as err:
        build_dataset("market1501", market)
    assert str(query) in str(err.value)


def test_unknown_data_set_name_lists_the_known_ones(market: Path) -> None:
    with pytest.raises(DatasetError) as err:
        build_dataset("market-1501", market)
    assert "'market-1501'" in str(err.value) and "market1501" in str(err.value) and "msmt17" in str(err.value)


def _msmt17(root: Path, image: Path) -> Path:
    """A minimal MSMT17_V1 tree: two identities seen by two cameras in train, query and gallery."""
    lists: dict[str, list[str]] = {}
    for split, folder in (("train", "train"), ("val", "train"), ("query", "test"), ("gallery", "test")):
        lines = []
        for pid in (0, 1):
            for cam in (1, 2):
                rel = f"{pid:04d}/{pid:04d}_{split}_{cam:02d}_0303morning_{cam:04d}_0.jpg"
                (root / folder / rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy(image, root / folder / rel)
                lines.append(f"{rel} {pid}")
        lists[split] = lines
    for split, lines in lists.items():
        (root / f"list_{split}.txt").write_text("\n".join(lines) + "\n")
    return root


def test_msmt17_list_pointing_at_a_missing_image_names_list_line_and_image(market: Path, tmp_path: Path) -> None:
    root = _msmt17(tmp_path / "MSMT17_V1", first_image(market / "query"))
    assert len(build_dataset("msmt17", root).gallery) == 4  # the intact tree loads
    missing = root / "test" / "0001" / "0001_gallery_02_0303morning_0002_0.jpg"
    missing.unlink()
    with pytest.raises(DatasetError) as err:
        build_dataset("msmt17", root)
    assert f"{root / 'list_gallery.txt'}:4" in str(err.value) and str(missing) in str(err.value)


# ----------------------------------------------------------------------------- evaluation


def test_query_identity_absent_from_gallery_is_skipped_and_counted() -> None:
    """Query pid 7 has no match in the gallery: it is left out of the averages, and counted."""
    gallery = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]])
    query = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    # Query 0 (pid 1): gallery 0 is pid 2, gallery 2 is pid 1 -> first correct match at rank 2, AP 1/2.
    metrics = evaluate(query, gallery, q_pids=[1, 7], g_pids=[2, 3, 1], q_camids=[0, 0], g_camids=[1, 1, 1])
    assert metrics["num_queries"] == 2 and metrics["num_valid_queries"] == 1
    assert metrics["mAP"] == pytest.approx(0.5)  # 0.25 if the unmatched query counted as AP 0
    assert metrics["cmc"][:3] == pytest.approx([0.0, 1.0, 1.0])


def test_no_query_with_a_match_is_an_error() -> None:
    features = torch.eye(2)
    with pytest.raises(DatasetError, match="none of the 2 queries has a correct match"):
        evaluate(features, features, q_pids=[1, 2], g_pids=[3, 4], q_camids=[0, 0], g_camids=[1, 1])


def _features(n: int = 3) -> dict[str, np.ndarray]:
    return dict(features=np.eye(n, 4, dtype=np.float32), pids=np.arange(n), camids=np.zeros(n, dtype=np.int64),
                paths=np.array([f"img{i}.jpg" for i in range(n)]))


@pytest.mark.parametrize("dropped", ["features", "camids", "pids"])
def test_feature_file_missing_a_key_names_file_and_key(tmp_path: Path, dropped: str) -> None:
    arrays = _features()
    del arrays[dropped]
    path = tmp_path / "query.npz"
    np.savez(path, **arrays)
    with pytest.raises(DatasetError) as err:
        FeatureSet.load(path)
    assert str(path) in str(err.value) and dropped in str(err.value)


def test_feature_file_with_pickled_objects_is_refused(tmp_path: Path) -> None:
    arrays = _features()
    arrays["paths"] = np.array([{"not": "a path"}] * 3, dtype=object)
    path = tmp_path / "query.npz"
    np.savez(path, **arrays)
    with pytest.raises(DatasetError, match="cannot be read") as err:
        FeatureSet.load(path)
    assert str(path) in str(err.value)


def test_feature_file_round_trip_is_intact(tmp_path: Path) -> None:
    """The control for the two cases above: a complete file loads unchanged."""
    arrays = _features()
    FeatureSet(**arrays).save(tmp_path / "ok.npz")
    loaded = FeatureSet.load(tmp_path / "ok.npz")
    assert np.array_equal(loaded.features, arrays["features"]) and list(loaded.paths) == list(arrays["paths"])


# ----------------------------------------------------------------------------- checkpoints


def test_checkpoint_of_another_architecture_names_both(tmp_path: Path) -> None:
    path = tmp_path / "tiny.pth"
    torch.save(tiny_backbone().state_dict(), path)
    small = create_model("pass_vit_small", img_size=SIZE, depth=1)
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(small, path)
    text = str(err.value)
    assert str(path) in text
    assert "checkpoint backbone: embed_dim 192, depth 1; model: embed_dim 384, depth 1" in text
    assert "patch_embed.proj.weight: checkpoint [192, 3, 16, 16] vs model [384, 3, 16, 16]" in text


def test_checkpoint_of_another_depth_lists_the_missing_blocks(tmp_path: Path) -> None:
    path = tmp_path / "tiny.pth"
    torch.save(tiny_backbone().state_dict(), path)
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(tiny_backbone(depth=2), path)
    assert "missing keys (12)" in str(err.value) and "blocks.1.attn.qkv.weight" in str(err.value)


def test_checkpoint_of_another_image_size_is_resized_and_reported(tmp_path: Path) -> None:
    """A 128x64 checkpoint (8x4 grid) into a 64x32 model (4x2): bilinear resize, align_corners=False."""
    source = tiny_backbone(img_size=(128, 64))
    path = tmp_path / "t128.pth"
    torch.save(source.state_dict(), path)
    target = tiny_backbone(img_size=SIZE)
    report = load_checkpoint(target, path)
    assert report.resized == [("pos_embed", (1, 32, 192), (1, 8, 192))]
    assert "resized pos_embed [1, 32, 192] -> [1, 8, 192]" in report.summary()
    grid = source.pos_embed.detach().reshape(1, 8, 4, 192).permute(0, 3, 1, 2)
    expected = F.interpolate(grid, size=(4, 2), mode="bilinear", align_corners=False)
    assert torch.allclose(target.pos_embed.detach(), expected.permute(0, 2, 3, 1).reshape(1, 8, 192), atol=1e-6)
    assert torch.equal(target.blocks[0].attn.qkv.weight, source.blocks[0].attn.qkv.weight)


@pytest.mark.parametrize(
    ("content", "fragment"),
    [
        ({"conv1.weight": torch.zeros(8, 3, 7, 7), "fc.weight": torch.zeros(10, 8)}, "no ViT backbone found"),
        ({"epoch": 3, "notes": ["a", "b"]}, "found no state dict of tensors"),
        ([torch.zeros(2)], "expected a dict of tensors, found list"),
    ],
    ids=["resnet-state-dict", "dict-without-tensors", "list"],
)
def test_checkpoint_of_another_format_is_refused(tmp_path: Path, content: object, fragment: str) -> None:
    path = tmp_path / "other.pth"
    torch.save(content, path)
    with pytest.raises(CheckpointError, match=fragment) as err:
        load_checkpoint(tiny_backbone(), path)
    assert str(path) in str(err.value)


def test_non_torch_file_given_as_checkpoint(tmp_path: Path) -> None:
    path = tmp_path / "config.pth"
    path.write_text('{"model": "pass_vit_small"}\n')
    with pytest.raises(CheckpointError, match="not a PyTorch checkpoint") as err:
        load_checkpoint(tiny_backbone(), path)
    assert str(path) in str(err.value)


@pytest.mark.parametrize("keep", [0.5, 0.02])
def test_truncated_checkpoint_file(tmp_path: Path, keep: float) -> None:
    path = tmp_path / "cut.pth"
    torch.save(tiny_backbone().state_dict(), path)
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])
    with pytest.raises(CheckpointError, match="truncated, corrupt or not a PyTorch checkpoint") as err:
        load_checkpoint(tiny_backbone(), path)
    assert str(path) in str(err.value)


class _Payload:
    """Unpickling this runs ``exec``: the kind of file weights-only loading exists to refuse."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return builtins.exec, (f"open({str(self.marker)!r}, 'w').close()",)


def test_checkpoint_with_pickled_code_is_refused_and_not_run(tmp_path: Path) -> None:
    marker = tmp_path / "code-ran"
    path = tmp_path / "evil.pth"
    torch.save({"model": tiny_backbone().state_dict(), "hook": _Payload(marker)}, path)
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(tiny_backbone(), path)
    assert "refused the global 'exec'" in str(err.value) and str(path) in str(err.value)
    assert not marker.exists()


# ----------------------------------------------------------------------------- faults while saving and training


def _save(path: Path, model: torch.nn.Module, epoch: int) -> None:
    save_training_checkpoint(path, model=model, optimizer=None, scheduler=None, scaler=None, epoch=epoch,
                             config={"run": {"epochs": 3}}, fingerprint={"num_images": 1, "list_sha1": "0" * 40})


def test_disk_full_while_saving_keeps_the_previous_checkpoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model = torch.nn.Linear(3, 2)
    last = tmp_path / "last.pth"
    _save(last, model, epoch=1)
    saved_weight = model.weight.detach().clone()
    real_save = torch.save

    def full_disk(obj, f, *args, **kwargs):
        f.write(b"PK\x03\x04 half a checkpoint")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(torch, "save", full_disk)
    with torch.no_grad():
        model.weight.add_(1.0)
    with pytest.raises(CheckpointError) as err:
        _save(last, model, epoch=2)
    assert str(last) in str(err.value) and "No space left on device" in str(err.value)
    monkeypatch.setattr(torch, "save", real_save)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pth"]  # no temporary file left behind
    ckpt = load_training_checkpoint(last)
    assert ckpt["epoch"] == 1 and torch.equal(ckpt["model"]["weight"], saved_weight)


def test_out_of_memory_suggests_a_smaller_batch() -> None:
    with pytest.raises(TrainingError) as err:
        with explain_oom(64):
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
    text = str(err.value)
    assert "batch size 64" in text and "try a batch size of 32" in text and "Tried to allocate 2.00 GiB" in text
    assert isinstance(err.value.__cause__, torch.OutOfMemoryError)


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_loss_stops_naming_step_and_last_checkpoint(tmp_path: Path, value: float) -> None:
    last = tmp_path / "last.pth"
    _save(last, torch.nn.Linear(2, 2), epoch=4)
    with pytest.raises(TrainingError) as err:
        loss_is_finite(torch.tensor(value), step=13, epoch=5, last_checkpoint=last, skip=False)
    text = str(err.value)
    assert "epoch 5, step 13" in text and str(last) in text and "run.skip_nonfinite=true" in text


def test_non_finite_loss_is_skipped_when_configured(caplog: pytest.LogCaptureFixture) -> None:
    assert loss_is_finite(torch.tensor(0.5), step=1, epoch=1, last_checkpoint=None, skip=True)
    assert not loss_is_finite(torch.tensor(float("nan")), step=2, epoch=1, last_checkpoint=None, skip=True)
    assert "step 2" in caplog.text and "skipped" in caplog.text


class NonFiniteAt(ReIDLoss):
    """The ReID loss, except that call number ``bad_call`` (1-based) returns NaN, as a diverging step would."""

    def __init__(self, bad_call: int) -> None:
        super().__init__()
        self.bad_call = bad_call
        self.calls = 0

    def forward(self, logits, features, labels):
        loss, parts = super().forward(logits, features, labels)
        self.calls += 1
        return (loss * float("nan") if self.calls == self.bad_call else loss), parts


def _train_steps(criterion: ReIDLoss, batches: list[int], *, skip: bool, last: Path | None = None):
    """``finetune.train_one_epoch`` of a fixed tiny model over the chosen batches of a fixed random set."""
    torch.manual_seed(0)
    images, pids = torch.randn(32, 3, *SIZE), torch.arange(4).repeat_interleave(2).repeat(4)
    chosen = torch.cat([torch.arange(8 * b, 8 * b + 8) for b in batches])
    data = torch.utils.data.TensorDataset(images[chosen], pids[chosen], torch.zeros(len(chosen)), chosen)
    loader = torch.utils.data.DataLoader(data, batch_size=8, shuffle=False)
    torch.manual_seed(1)
    model = ReIDModel(tiny_backbone(), num_classes=4)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    stats = train_one_epoch(model, loader, criterion, optimizer, scaler, epoch=3, device=torch.device("cpu"),
                            skip_nonfinite=skip, last_checkpoint=last)
    return model, stats


def test_nan_loss_in_fine_tuning_stops_naming_epoch_step_and_checkpoint(tmp_path: Path) -> None:
    last = tmp_path / "last.pth"
    _save(last, torch.nn.Linear(2, 2), epoch=2)
    with pytest.raises(TrainingError) as err:
        _train_steps(NonFiniteAt(2), [0, 1, 2, 3], skip=False, last=last)
    text = str(err.value)
    # The second batch of epoch 3 is step 2, counted as the progress log counts ("epoch 3 step 2/4").
    assert "non-finite loss (nan) at epoch 3, step 2;" in text and f"last good checkpoint: {last}" in text


def test_nan_loss_in_fine_tuning_is_skipped_with_run_skip_nonfinite() -> None:
    """A skipped step changes no weight: the result equals training without that batch."""
    skipped_model, stats = _train_steps(NonFiniteAt(2), [0, 1, 2, 3], skip=True)
    assert stats["steps"] == 3 and stats["skipped"] == 1
    clean_model, _ = _train_steps(ReIDLoss(), [0, 2, 3], skip=False)
    for (name, got), (_, want) in zip(skipped_model.named_parameters(), clean_model.named_parameters()):
        assert torch.equal(got, want), name


# ----------------------------------------------------------------------------- configs

RECIPE = Path(__file__).resolve().parents[1] / "configs" / "finetune" / "market_vit_small.yaml"


def test_config_unknown_key_names_file_and_key(tmp_path: Path) -> None:
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"_base_: {RECIPE}\noptim:\n  learning_rate: 0.1\n")
    with pytest.raises(ConfigError) as err:
        load_config(FinetuneConfig, recipe)
    assert str(recipe) in str(err.value) and "optim.learning_rate" in str(err.value)


def test_config_unknown_override_names_the_key() -> None:
    with pytest.raises(ConfigError) as err:
        load_config(FinetuneConfig, RECIPE, ["optim.learning_rate=0.1"])
    message = str(err.value)
    assert "override 'optim.learning_rate=0.1'" in message and "Key 'learning_rate' not in 'OptimConfig'" in message


@pytest.mark.parametrize(
    ("override", "fragment"),
    [
        ("optim.batch_size=many", "'optim.batch_size': Value 'many' of type 'str' could not be converted"),
        ("run.skip_nonfinite=maybe", "'run.skip_nonfinite': Value 'maybe' is not a valid bool"),
        ("data.img_size=big", "'data.img_size'"),
    ],
)
def test_config_wrong_type_names_key_and_value(override: str, fragment: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(FinetuneConfig, RECIPE, [override])
    assert fragment in str(err.value)


@pytest.mark.parametrize(
    ("schema", "override", "fragment"),
    [
        (FinetuneConfig, "optim.batch_size=30", "'optim.batch_size': 30 is not a multiple of optim.num_instances = 4"),
        (ClusterConfig, "optim.batch_size=30", "'optim.batch_size': 30 must be a multiple of optim.num_instances (8)"),
        (FinetuneConfig, "data.img_size=[250,128]",
         "'data.img_size': [250, 128] must be [height, width], both positive multiples of 16"),
        (FinetuneConfig, "data.img_size=[256]", "'data.img_size': [256] must be [height, width]"),
        (FinetuneConfig, "run.epochs=0", "'run.epochs': 0 must be > 0"),
        (FinetuneConfig, "model.drop_path_rate=1.5", "'model.drop_path_rate': 1.5 must be in [0, 1)"),
        (FinetuneConfig, "loss.label_smoothing=1.0", "'loss.label_smoothing': 1.0 must be in [0, 1)"),
    ],
    ids=lambda v: v if isinstance(v, str) else v.__name__,
)
def test_config_impossible_value_names_key_and_value(schema: type, override: str, fragment: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(schema, None, [override])
    assert fragment in str(err.value)


def test_unknown_model_name_lists_the_registered_ones() -> None:
    with pytest.raises(ConfigError) as err:
        create_model("pass_vit_huge", img_size=SIZE)
    assert "'pass_vit_huge'" in str(err.value) and "pass_vit_small, pass_vit_tiny" in str(err.value)


# ----------------------------------------------------------------------------- command line


def _error_lines(capsys: pytest.CaptureFixture[str]) -> list[str]:
    """What the user reads on stderr apart from progress bars (tqdm writes them there too); no traceback allowed."""
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = []
    for segment in re.split(r"[\r\n]", err):
        if re.match(r"(extract|epoch \d+): ", segment):
            if "passreid " not in segment:
                continue
            segment = segment[segment.index("passreid "):]  # an error printed right after a progress bar
        if segment.strip():
            lines.append(segment)
    return lines


def test_cli_eval_with_missing_checkpoint_prints_one_line_and_exits_2(
    market: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    missing = tmp_path / "runs" / "best.pth"
    code = cli_main(["eval", "--checkpoint", str(missing), "--dataset", "market1501", "--root", str(market),
                     "--device", "cpu"])
    assert code == 2
    assert _error_lines(capsys) == [f"passreid eval: error: checkpoint not found: {missing}"]


def test_cli_eval_with_missing_feature_file_prints_one_line_and_exits_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    FeatureSet(**_features()).save(tmp_path / "gallery.npz")
    code = cli_main(["eval", "--query-features", str(tmp_path / "query.npz"),
                     "--gallery-features", str(tmp_path / "gallery.npz"), "--device", "cpu"])
    assert code == 2
    assert _error_lines(capsys) == [f"passreid eval: error: feature file not found: {tmp_path / 'query.npz'}"]


def test_cli_eval_with_a_corrupt_image_prints_one_line_naming_it(
    market: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A bad gallery image read in a loader worker: one line naming the file, exit 2, no worker traceback."""
    model = ReIDModel(tiny_backbone(), num_classes=4)
    ckpt = tmp_path / "model.pth"
    torch.save(model.state_dict(), ckpt)
    bad = Path(build_dataset("market1501", market).gallery[0].path)
    _zero_byte(bad)
    code = cli_main(["eval", "--checkpoint", str(ckpt), "--dataset", "market1501", "--root", str(market),
                     "--device", "cpu", "--num-workers", "1", "--batch-size", "4"])
    assert code == 2
    assert _error_lines(capsys) == [f"passreid eval: error: image file is empty (0 bytes): {bad}"]


@pytest.fixture
def tiny_recipe(market: Path, tmp_path: Path) -> Path:
    """A ``passreid train`` recipe: tiny model at 64x32 on the synthetic set, 2 identities x 4 images per batch."""
    recipe = tmp_path / "tiny.yaml"
    recipe.write_text(
        f"data: {{dataset: synthetic, root: {market}, img_size: [64, 32], num_workers: 0}}\n"
        "model: {name: pass_vit_tiny, depth: 1, pretrained: ''}\n"
        f"run: {{output_dir: {tmp_path / 'run'}, epochs: 2, device: cpu}}\n"
        "optim: {batch_size: 8, num_instances: 4, lr: 0.01}\n"
    )
    return recipe


def _fake_last(recipe: Path, overrides: list[str], fingerprint: dict | None = None) -> Path:
    """A ``last.pth`` as a run of ``recipe`` would leave it (only what resuming checks first is real)."""
    cfg = load_config(FinetuneConfig, recipe, overrides)
    last = Path(cfg.run.output_dir) / "last.pth"
    save_training_checkpoint(last, model=torch.nn.Linear(1, 1), optimizer=None, scheduler=None, scaler=None,
                             epoch=1, config=config_to_dict(cfg), fingerprint=fingerprint)
    return last


def test_resume_without_a_checkpoint_names_the_missing_file(
    tiny_recipe: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli_main(["train", str(tiny_recipe), "--resume"]) == 2
    assert _error_lines(capsys) == [
        f"passreid train: error: cannot resume: checkpoint {tmp_path / 'run' / 'last.pth'} does not exist"
    ]


def test_resume_with_a_changed_config_is_refused_showing_the_diff(
    tiny_recipe: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _fake_last(tiny_recipe, [])
    code = cli_main(["train", str(tiny_recipe), "optim.lr=0.02", "loss.label_smoothing=0.1", "--resume"])
    assert code == 2
    lines = _error_lines(capsys)
    assert lines[0].startswith("passreid train: error: the config differs from the one the run was started with")
    assert "--force-resume" in lines[0]
    assert [line.strip() for line in lines[1:]] == ["loss.label_smoothing: 0.0 -> 0.1", "optim.lr: 0.01 -> 0.02"]


def test_forced_resume_with_a_changed_config_logs_the_diff(caplog: pytest.LogCaptureFixture) -> None:
    saved = {"optim": {"lr": 0.01}, "run": {"output_dir": "a", "epochs": 4}}
    check_resume_config(saved, {"optim": {"lr": 0.02}, "run": {"output_dir": "b", "epochs": 4}}, force=True)
    assert "resuming with a changed config (forced)" in caplog.text and "optim.lr: 0.01 -> 0.02" in caplog.text
    assert "output_dir" not in caplog.text  # where the run lives is not part of what it computes


def test_resume_on_other_training_images_is_refused(
    tiny_recipe: Path, market: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    last = _fake_last(tiny_recipe, [], fingerprint={"num_images": 3, "list_sha1": "f" * 40})
    assert cli_main(["train", str(tiny_recipe), "--resume"]) == 2
    (line,) = _error_lines(capsys)
    assert f"the training images differ from those {last} was trained on (3 images, list ffffffffffff vs" in line
    assert line.endswith("pass --force-resume to continue anyway")


def test_out_of_memory_while_training_suggests_a_batch_size(
    tiny_recipe: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def no_memory(self, x):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    monkeypatch.setattr(ReIDModel, "forward", no_memory)
    assert cli_main(["train", str(tiny_recipe)]) == 2
    (line,) = _error_lines(capsys)
    assert line.startswith("passreid train: error: GPU out of memory at batch size 8; try a batch size of 4 or lower")


def test_safe_load_of_missing_checkpoint_names_it(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="checkpoint not found") as err:
        safe_load(tmp_path / "nope.pth")
    assert str(tmp_path / "nope.pth") in str(err.value)


def test_image_records_with_missing_files_name_the_file(tmp_path: Path) -> None:
    records = [ImageRecord(str(tmp_path / "gone.jpg"), 0, 0)]
    with pytest.raises(DatasetError, match="image not found") as err:
        ImageDataset(records)[0]
    assert str(tmp_path / "gone.jpg") in str(err.value)


# ----------------------------------------------------------------------------- run folders


def _hold_lock_in_another_process(folder: Path) -> subprocess.Popen[str]:
    """A process that claims ``folder`` as a run would and holds it until its stdin closes."""
    code = ("import sys\nfrom passreid.runfolder import claim_run_folder\n"
            "with claim_run_folder(sys.argv[1]):\n    print('held', flush=True)\n    sys.stdin.read()\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen([sys.executable, "-c", code, str(folder)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            text=True, env=env)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "held"
    return proc


def test_second_run_into_a_folder_in_use_is_refused_naming_pid_and_host(
    tiny_recipe: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = tmp_path / "run"
    holder = _hold_lock_in_another_process(run)
    try:
        assert cli_main(["train", str(tiny_recipe)]) == 2
        (line,) = _error_lines(capsys)
        assert line.startswith(f"passreid train: error: run folder {run} is in use by another run "
                               f"(pid {holder.pid} on host {socket.gethostname()} since ")
        assert cli_main(["train", str(tiny_recipe), "--resume"]) == 2  # resuming a live run is refused too
        assert f"pid {holder.pid}" in _error_lines(capsys)[0]
    finally:
        holder.communicate("")
    assert sorted(p.name for p in run.iterdir()) == []  # the refused runs wrote nothing


def test_lock_of_a_killed_run_is_taken_over(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    run = tmp_path / "run"
    holder = _hold_lock_in_another_process(run)
    holder.kill()  # SIGKILL: the lock file stays, the kernel drops the lock
    holder.wait()
    assert lock_holder(run / LOCK_NAME)["pid"] == holder.pid
    with claim_run_folder(run, resume=True):
        assert lock_holder(run / LOCK_NAME)["pid"] == os.getpid()
    assert f"taking over the stale lock of pid {holder.pid} on host {socket.gethostname()}" in caplog.text
    assert not (run / LOCK_NAME).exists()


def _fake_run_finetune(calls: list[list[str]]):
    """A stand-in for ``run_finetune`` that records what the run folder held when training began."""

    def run_finetune(cfg, resume=None, force_resume=False, progress=False):
        out = Path(cfg.run.output_dir)
        calls.append(sorted(p.name for p in out.iterdir()))
        (out / "last.pth").write_bytes(b"new")
        return {"stopped": False, "metrics": {"mAP": 0.5, "mINP": 0.1, "rank1": 0.6}, "best_mAP": 0.5,
                "best_epoch": 2, "model": out / "model.pth", "run_dir": out, "epoch": 2, "step": 0}

    return run_finetune


def test_run_folder_holding_a_run_is_refused_without_resume_or_overwrite(
    tiny_recipe: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text('{"epoch": 1}\n')
    (run / "last.pth").write_bytes(b"old")
    calls: list[list[str]] = []
    monkeypatch.setattr("passreid.finetune.run_finetune", _fake_run_finetune(calls))
    assert cli_main(["train", str(tiny_recipe)]) == 2
    assert _error_lines(capsys) == [
        f"passreid train: error: run folder {run} is not empty (last.pth, metrics.jsonl); continue that run with "
        "--resume, start it again with --overwrite, or choose another run.output_dir"
    ]
    assert calls == [] and (run / "last.pth").read_bytes() == b"old"
    assert cli_main(["train", str(tiny_recipe), "--overwrite"]) == 0
    assert calls == [[LOCK_NAME]]  # the old run's files were gone before training began
    assert not (run / "metrics.jsonl").exists() and (run / "last.pth").read_bytes() == b"new"


def test_overwrite_never_deletes_files_that_are_not_a_run(
    tiny_recipe: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = tmp_path / "run"
    run.mkdir()
    (run / "thesis.tex").write_text("precious")
    (run / "last.pth").write_bytes(b"old")
    assert cli_main(["train", str(tiny_recipe), "--overwrite"]) == 2
    (line,) = _error_lines(capsys)
    assert f"--overwrite: {run} holds files that are not from a passreid run (thesis.tex); nothing was deleted" in line
    assert (run / "thesis.tex").read_text() == "precious" and (run / "last.pth").exists()


@pytest.mark.parametrize("override, fragment", [
    ("data.root=/nonexistent/market", "data set root not found: /nonexistent/market"),
    ("run.device=gpu", "unknown device 'gpu': use auto, cpu, cuda or cuda:N"),
])
def test_failed_start_leaves_no_run_folder(
    tiny_recipe: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], override: str, fragment: str
) -> None:
    assert cli_main(["train", str(tiny_recipe), override]) == 2
    (line,) = _error_lines(capsys)
    assert fragment in line
    assert not (tmp_path / "run").exists()


def test_print_config_shows_the_resolved_recipe_and_trains_nothing(
    tiny_recipe: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli_main(["train", str(tiny_recipe), "optim.lr=0.02", "--print-config"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["optim"]["lr"] == 0.02 and printed["run"]["output_dir"] == str(tmp_path / "run")
    assert printed["loss"]["label_smoothing"] == 0.0  # defaults are filled in
    assert not (tmp_path / "run").exists()


# ----------------------------------------------------------------------------- one line, not a traceback


@pytest.mark.parametrize("flag, value, fragment", [
    ("--batch-size", "-4", "argument --batch-size: -4 must be a positive integer"),
    ("--batch-size", "0", "argument --batch-size: 0 must be a positive integer"),
    ("--num-workers", "-1", "argument --num-workers: -1 must be 0 or more"),
])
def test_cli_eval_with_an_impossible_number_is_a_usage_error(
    market: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], flag: str, value: str, fragment: str
) -> None:
    with pytest.raises(SystemExit) as exit_:
        cli_main(["eval", "--checkpoint", str(tmp_path / "m.pth"), "--dataset", "market1501", "--root", str(market),
                  flag, value])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert fragment in err and "Traceback" not in err


@pytest.mark.parametrize("argv", [["visualize", "--worst", "0"], ["visualize", "-k", "0"]])
def test_cli_visualize_with_zero_queries_or_results_is_a_usage_error(
    market: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], argv: list[str]
) -> None:
    with pytest.raises(SystemExit) as exit_:
        cli_main([*argv, "--checkpoint", str(tmp_path / "m.pth"), "--dataset", "market1501", "--root", str(market),
                  "--out", str(tmp_path / "pictures")])
    assert exit_.value.code == 2
    flag = "--worst" if "--worst" in argv else "-k"
    assert f"argument {flag}: 0 must be a positive integer" in capsys.readouterr().err


@pytest.fixture
def tiny_checkpoint(tmp_path: Path) -> Path:
    """A fine-tuned-layout state dict of a tiny model at 64x32."""
    ckpt = tmp_path / "model.pth"
    torch.save(ReIDModel(tiny_backbone(), num_classes=4).state_dict(), ckpt)
    return ckpt


def _cli_eval(market: Path, checkpoint: Path, *extra: str) -> int:
    return cli_main(["eval", "--checkpoint", str(checkpoint), "--dataset", "market1501", "--root", str(market),
                     "--device", "cpu", "--num-workers", "0", *extra])


def test_unknown_device_is_one_line_for_eval_search_and_demo(
    market: Path, tiny_checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    expected = "unknown device 'gpu': use auto, cpu, cuda or cuda:N (e.g. --device cuda, run.device=cuda)"
    assert _cli_eval(market, tiny_checkpoint, "--device", "gpu") == 2
    assert _error_lines(capsys) == [f"passreid eval: error: {expected}"]
    index = tmp_path / "gallery.npz"
    assert cli_main(["search", "index", "--checkpoint", str(tiny_checkpoint), "--index", str(index),
                     "--folder", str(market / "query"), "--device", "gpu"]) == 2
    assert _error_lines(capsys) == [f"passreid search: error: {expected}"]
    assert cli_main(["demo", "--device", "gpu", "--workdir", str(tmp_path / "demo")]) == 2
    assert _error_lines(capsys) == [f"passreid demo: error: {expected}"]


def test_verbose_keeps_the_exit_status_and_adds_the_traceback(
    market: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    missing = tmp_path / "best.pth"
    assert cli_main(["-v", "eval", "--checkpoint", str(missing), "--dataset", "market1501", "--root", str(market),
                     "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" in err and err.rstrip().endswith(f"passreid eval: error: checkpoint not found: {missing}")


def test_resume_from_a_model_of_another_size_is_one_line(
    tiny_recipe: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A ``last.pth`` whose model is another architecture: one line counting the conflicts, forced or not."""
    _fake_last(tiny_recipe, [])
    assert cli_main(["train", str(tiny_recipe), "--resume", "--force-resume"]) == 2
    (line,) = _error_lines(capsys)
    assert line.startswith("passreid train: error: the checkpoint's model does not fit the model of this config (")
    assert "missing, e.g. base.cls_token" in line and "2 unexpected, e.g. weight" in line


def test_cli_eval_refuses_an_unwritable_json_before_extracting(
    market: Path, tiny_checkpoint: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def must_not_run(*args, **kwargs):
        raise AssertionError("features extracted before the output path was checked")

    monkeypatch.setattr("passreid.features.extract_features", must_not_run)
    assert _cli_eval(market, tiny_checkpoint, "--json", "/proc/m.json") == 2
    assert _error_lines(capsys) == [
        "passreid eval: error: --json /proc/m.json: cannot write into /proc (No such file or directory)"
    ]


def test_ctrl_c_during_eval_is_one_line_and_exit_130(
    market: Path, tiny_checkpoint: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("passreid.features.extract_features", interrupted)
    assert _cli_eval(market, tiny_checkpoint) == 130
    assert _error_lines(capsys) == ["passreid eval: interrupted"]


def test_a_folder_given_as_checkpoint_is_named_as_a_folder(
    tiny_recipe: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = tmp_path / "runs" / "x"
    folder.mkdir(parents=True)
    (folder / "model.pth").write_bytes(b"")
    (folder / "last.pth").write_bytes(b"")
    assert cli_main(["info", str(folder)]) == 2
    assert _error_lines(capsys) == [
        f"passreid info: error: {folder} is a folder, not a checkpoint file; it holds last.pth, model.pth: "
        f"e.g. {folder / 'model.pth'}"
    ]
    assert cli_main(["train", str(tiny_recipe), "--resume", str(folder)]) == 2
    assert _error_lines(capsys) == [
        f"passreid train: error: cannot resume: {folder} is a folder, not a checkpoint file (--resume takes a .pth "
        f"file, or no value for <run.output_dir>/last.pth); its last.pth is {folder / 'last.pth'}"
    ]


def test_cli_eval_of_an_image_folder_says_it_has_no_labels(
    market: Path, tiny_checkpoint: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli_main(["eval", "--checkpoint", str(tiny_checkpoint), "--dataset", "imagefolder", "--root",
                     str(market / "query"), "--device", "cpu"]) == 2
    (line,) = _error_lines(capsys)
    assert line.startswith("passreid eval: error: --dataset imagefolder is a folder of unlabelled images: it has no "
                           "identities and no query/gallery split to evaluate")


def test_cli_eval_needs_no_train_folder_and_records_what_it_evaluated(
    market: Path, tiny_checkpoint: Path, tmp_path: Path
) -> None:
    shutil.rmtree(market / "bounding_box_train")
    out = tmp_path / "metrics.json"
    assert _cli_eval(market, tiny_checkpoint, "--json", str(out), "--flip") == 0
    record = json.loads(out.read_text())
    assert {"mAP", "mINP", "cmc", "num_queries", "num_valid_queries"} <= set(record)  # DESIGN §8 keys kept
    assert record["checkpoint"] == str(tiny_checkpoint) and record["dataset"] == "market1501"
    assert record["root"] == str(market) and record["flip"] is True and record["rerank"] is False
    assert record["img_size"] == list(SIZE)


def test_bad_training_image_error_names_data_skip_corrupt(
    tiny_recipe: Path, market: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = Path(build_dataset("market1501", market).train[0].path)
    _zero_byte(bad)
    assert cli_main(["train", str(tiny_recipe)]) == 2
    assert _error_lines(capsys) == [
        f"passreid train: error: image file is empty (0 bytes): {bad} (set data.skip_corrupt=true to skip "
        "unreadable images and count them)"
    ]
    assert not (tmp_path / "run").exists()  # stopped before its first checkpoint: nothing left behind


def test_skip_corrupt_also_covers_the_end_of_run_evaluation_and_the_export_records_epoch_and_map(
    tiny_recipe: Path, market: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    dataset = build_dataset("market1501", market)
    _zero_byte(Path(dataset.train[0].path))
    bad_gallery = Path(dataset.gallery[1].path)
    _truncated(bad_gallery)
    assert cli_main(["train", str(tiny_recipe), "data.skip_corrupt=true", "run.epochs=1"]) == 0
    assert f"1 unreadable image(s) left out (data.skip_corrupt), first: {bad_gallery}" in caplog.text
    sidecar = json.loads((tmp_path / "run" / "model.json").read_text())
    assert sidecar["epoch"] == 1 and 0.0 <= sidecar["metrics"]["mAP"] <= 1.0 and "mINP" in sidecar["metrics"]
    capsys.readouterr()
    assert cli_main(["info", str(tmp_path / "run" / "model.pth"), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["epoch"] == 1 and info["metrics"]["mAP"] == sidecar["metrics"]["mAP"]


def test_extraction_drops_unreadable_images_when_asked(market: Path) -> None:
    from passreid.features import extract_features

    gallery = build_dataset("market1501", market).gallery[:6]
    _zero_byte(Path(gallery[2].path))
    model = ReIDModel(tiny_backbone(), num_classes=4)
    feats = extract_features(model, gallery, img_size=SIZE, num_workers=0, on_bad_image="drop")
    assert len(feats) == 5 and gallery[2].path not in set(feats.paths.tolist())
    assert feats.pids.tolist() == [r.pid for i, r in enumerate(gallery) if i != 2]
    with pytest.raises(DatasetError, match="image file is empty"):
        extract_features(model, gallery, img_size=SIZE, num_workers=0)


def test_search_index_of_a_folder_can_skip_unreadable_images(
    market: Path, tiny_checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = tmp_path / "photos"
    folder.mkdir()
    for path in sorted((market / "query").glob("*.jpg"))[:3]:
        shutil.copy(path, folder / path.name)
    bad = sorted(folder.glob("*.jpg"))[1]
    _zero_byte(bad)
    index = tmp_path / "photos.npz"
    argv = ["search", "index", "--checkpoint", str(tiny_checkpoint), "--index", str(index), "--folder", str(folder),
            "--device", "cpu", "--num-workers", "0"]
    assert cli_main(argv) == 2
    assert _error_lines(capsys) == [f"passreid search: error: image file is empty (0 bytes): {bad}"]
    assert cli_main([*argv, "--skip-corrupt"]) == 0
    out = capsys.readouterr().out
    assert f"skipped unreadable image: {os.path.abspath(bad)}" in out
    assert "added 2 images (0 already there, 1 unreadable skipped), 2 in total" in out


def test_search_query_shows_cameras_one_based_as_in_file_names(
    market: Path, tiny_checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    index = tmp_path / "gallery.npz"
    common = ["--checkpoint", str(tiny_checkpoint), "--index", str(index), "--device", "cpu", "--num-workers", "0"]
    assert cli_main(["search", "index", *common, "--dataset", "market1501", "--root", str(market)]) == 0
    query = first_image(market / "query")
    assert cli_main(["search", "query", *common, str(query), "-k", "3"]) == 0
    rows = [line.split() for line in capsys.readouterr().out.splitlines() if re.match(r"\s+\d+\s+-?\d", line)]
    assert len(rows) == 3
    for _, _, _, pid, cam, path in rows:
        name_cam = re.match(r"^(-1|\d+)_c(\d+)s", Path(path).name)
        assert name_cam is not None and cam == name_cam.group(2)


def test_search_refuses_an_index_of_another_model_naming_both(
    tiny_checkpoint: Path, market: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    index = tmp_path / "gallery.npz"
    other = tmp_path / "other.pth"
    other_model = ReIDModel(tiny_backbone(), num_classes=4)
    with torch.no_grad():
        other_model.base.norm.weight.mul_(-1)  # another model of the same architecture
    torch.save(other_model.state_dict(), other)
    copy = tmp_path / "copy.pth"
    shutil.copy(tiny_checkpoint, copy)
    common = ["--index", str(index), "--device", "cpu", "--num-workers", "0"]
    query = str(first_image(market / "query"))
    assert cli_main(["search", "index", "--checkpoint", str(tiny_checkpoint), *common,
                     "--folder", str(market / "query")]) == 0
    built = Gallery.load(index).meta["model"]
    before = index.read_bytes()
    capsys.readouterr()
    for argv in (["search", "query", "--checkpoint", str(other), *common, query],
                 ["search", "index", "--checkpoint", str(other), *common, "--folder", str(market / "bounding_box_test")]):
        assert cli_main(argv) == 2
        lines = _error_lines(capsys)
        assert len(lines) == 1 and lines[0].startswith(
            f"passreid search: error: {index} holds features of model {tiny_checkpoint} [{built}], not of {other} "
            "[sha256:")
        assert "features of different models cannot be compared or mixed" in lines[0]
    assert index.read_bytes() == before  # nothing was added
    # The same weights under another name are the same model.
    assert cli_main(["search", "query", "--checkpoint", str(copy), *common, query, "-k", "2"]) == 0


# ----------------------------------------------------------------------------- progress and noise


def test_progress_bars_only_on_a_terminal_and_without_no_progress(monkeypatch: pytest.MonkeyPatch) -> None:
    from argparse import Namespace

    from passreid.commands._common import progress_wanted

    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    assert progress_wanted(Namespace(no_progress=False)) is True
    assert progress_wanted(Namespace(no_progress=True)) is False
    monkeypatch.setattr(sys.stderr, "isatty", lambda: False)  # a redirected log
    assert progress_wanted(Namespace(no_progress=False)) is False


@pytest.mark.parametrize("command", ["train", "pretrain", "usl", "uda", "eval", "extract", "visualize"])
def test_every_long_command_takes_no_progress(command: str) -> None:
    from passreid.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command").choices[command]
    assert "--no-progress" in sub._option_string_actions


def test_a_signal_seen_by_a_forked_worker_is_not_logged_again(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    from passreid.engine import GracefulStop

    with GracefulStop() as stop:
        real = os.getpid()
        monkeypatch.setattr(os, "getpid", lambda: real + 1)  # as in a DataLoader worker forked from it
        stop._handler(signal.SIGINT, None)
        assert not stop.requested and "received signal" not in caplog.text
        monkeypatch.setattr(os, "getpid", lambda: real)
        stop._handler(signal.SIGINT, None)
    assert stop.requested and caplog.text.count("received signal 2") == 1


def test_help_imports_no_torch() -> None:
    """``passreid --help`` builds every subcommand's parser without importing torch or torchvision."""
    code = ("import sys\nfrom passreid.cli import build_parser\nbuild_parser()\n"
            "print(sorted(m for m in ('torch', 'torchvision', 'numpy') if m in sys.modules))\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert done.stdout.strip() == "[]"


# ----------------------------------------------------------------------------- demo


def test_demo_keeps_its_work_folder_and_records_seed_versions_and_minp(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from passreid import demo

    monkeypatch.setitem(demo.DEMO_DATA, "num_ids", 8)
    workdir, out = tmp_path / "demo", tmp_path / "demo.json"
    argv = ["demo", "--device", "cpu", "--stages", "random-init", "--workdir", str(workdir), "--json", str(out)]
    assert cli_main(argv) == 0
    result = json.loads(out.read_text())
    (stage,) = result["stages"]
    assert set(stage) == {"name", "mAP", "rank1", "seconds", "mINP"} and stage["name"] == "random-init"
    assert result["seed"] == 0 and result["device"] == "cpu" and result["workdir"] == str(workdir)
    assert result["versions"]["torch"] == importlib.metadata.version("torch")
    assert {"passreid", "python", "torch", "torchvision", "numpy"} <= set(result["versions"])
    assert (workdir / "synth_msmt" / "query").is_dir()  # kept after the demo
    assert f"data, runs and pictures: {workdir}" in capsys.readouterr().out
    (workdir / "finetune").mkdir()  # a run of an earlier demo: replaced, the data reused
    assert cli_main(argv) == 0 and not (workdir / "finetune").exists()


def test_demo_refuses_a_work_folder_it_did_not_make(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    workdir = tmp_path / "mine"
    workdir.mkdir()
    (workdir / "notes.txt").write_text("keep")
    assert cli_main(["demo", "--device", "cpu", "--stages", "random-init", "--workdir", str(workdir)]) == 2
    assert _error_lines(capsys) == [
        f"passreid demo: error: --workdir {workdir} is not empty and was not made by passreid demo (notes.txt); "
        "choose a new or empty folder"
    ]
    assert (workdir / "notes.txt").read_text() == "keep"


def test_ctrl_c_during_the_demo_is_one_line_naming_the_work_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from passreid import demo

    def stopped_stage(ctx):
        demo.raise_if_stopped({"stopped": True, "metrics": {}})  # what a training stage sees after Ctrl-C
        return []

    monkeypatch.setattr(demo, "DEMO_STAGES", [("stopped", stopped_stage)])
    workdir = tmp_path / "demo"
    assert cli_main(["demo", "--device", "cpu", "--workdir", str(workdir)]) == 130
    assert _error_lines(capsys) == [
        f"passreid demo: interrupted; {workdir} keeps the data and the runs finished so far"
    ]


def test_faiss_loader_lines_are_not_shown_without_verbose(
    market: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import logging

    cli_main(["eval", "--checkpoint", str(tmp_path / "none.pth"), "--dataset", "market1501", "--root", str(market),
              "--device", "cpu"])
    assert logging.getLogger("faiss.loader").getEffectiveLevel() == logging.WARNING
    capsys.readouterr()


def test_uda_help_shows_a_uda_recipe() -> None:
    from passreid.cli import build_parser

    sub = next(a for a in build_parser()._actions if a.dest == "command").choices
    uda_help, usl_help = sub["uda"].format_help(), sub["usl"].format_help()
    flat_uda, flat_usl = re.sub(r"\s+", "", uda_help), re.sub(r"\s+", "", usl_help)  # help text is wrapped
    assert "configs/uda/msmt17_to_market_vit_small.yaml" in flat_uda and "configs/usl/" not in flat_uda
    assert "model.pretrained=runs/finetune/msmt17_vit_small/model.pth" in flat_uda
    assert "configs/usl/market_vit_small.yaml" in flat_usl
