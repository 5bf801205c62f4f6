"""The shipped demo backbone: what made it, that it loads, and that its frozen features beat random init."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import pytest
import torch

from passreid.assets import DEMO_BACKBONE, DEMO_BACKBONE_COMMANDS, ship_demo_backbone
from passreid.checkpoint import load_checkpoint
from passreid.config import load_config
from passreid.data.datasets import build_dataset
from passreid.data.synthetic import generate_synthetic
from passreid.demo import DEMO_IMG_SIZE, DEMO_MODEL
from passreid.models import create_model
from passreid.monitor import RetrievalMonitor
from passreid.pretrain import PretrainConfig

pytestmark = pytest.mark.usefixtures("one_thread")
REPO = Path(__file__).resolve().parents[1]


def test_the_demo_backbone_is_small_and_says_what_made_it(tmp_path: Path) -> None:
    assert DEMO_BACKBONE.stat().st_size <= 10 * 2**20
    sidecar = json.loads(DEMO_BACKBONE.with_suffix(".json").read_text())
    assert sidecar["meta"]["made_by"] == list(DEMO_BACKBONE_COMMANDS)
    assert sidecar["meta"]["format"] == "training:pretrain-teacher" and sidecar["meta"]["epoch"] == 13
    # The run's config is the shipped recipe with the second command's overrides, nothing else: that command,
    # run from the repository root, makes it again (read back as a recipe, so that keys added since then take
    # their defaults, as a resume would).
    (tmp_path / "run.yaml").write_text(json.dumps(sidecar["config"]))
    ran = load_config(PretrainConfig, tmp_path / "run.yaml", [])
    _, _, recipe_path, *overrides = DEMO_BACKBONE_COMMANDS[1].split()
    assert recipe_path == "configs/pretrain/synthetic_tiny.yaml"
    recipe = load_config(PretrainConfig, REPO / recipe_path, overrides)
    assert asdict(ran) == asdict(recipe)
    assert f"passreid synth {recipe.data.root} " in DEMO_BACKBONE_COMMANDS[0]


def test_its_frozen_features_beat_random_init_on_unseen_identities(tmp_path: Path) -> None:
    # A synthetic set the backbone never saw (other seed, the demo's source style); the demo measures the
    # same thing on its own source set (`pass-checkpoint (frozen)` against `random-init`).
    generate_synthetic(tmp_path / "set", num_ids=70, num_train_ids=10, num_cams=6, images_per_cam=2, seed=11,
                       domain="msmt")
    monitor = RetrievalMonitor(build_dataset("synthetic", str(tmp_path / "set")), DEMO_IMG_SIZE)
    torch.manual_seed(0)
    random_init = create_model(DEMO_MODEL["name"], img_size=DEMO_IMG_SIZE, depth=DEMO_MODEL["depth"])
    pretrained = create_model(DEMO_MODEL["name"], img_size=DEMO_IMG_SIZE, depth=DEMO_MODEL["depth"])
    report = load_checkpoint(pretrained, DEMO_BACKBONE)
    assert not report.resized and report.loaded == len(pretrained.state_dict())
    before, after = monitor(random_init)["mAP"], monitor(pretrained)["mAP"]
    assert after > 2 * before and after - before > 0.03, (before, after)


def test_ship_copies_the_export_and_records_the_commands(tmp_path: Path) -> None:
    export = tmp_path / "run" / "backbone.pth"
    export.parent.mkdir()
    torch.save({"w": torch.ones(2)}, export)
    export.with_suffix(".json").write_text(json.dumps({"meta": {"epoch": 3}, "config": {"a": 1}}))
    sidecar = ship_demo_backbone(export, tmp_path / "asset.pth")
    assert sidecar == {"meta": {"epoch": 3, "made_by": list(DEMO_BACKBONE_COMMANDS)}, "config": {"a": 1}}
    assert json.loads((tmp_path / "asset.json").read_text()) == sidecar
    assert torch.equal(torch.load(tmp_path / "asset.pth")["w"], torch.ones(2))
    export.with_suffix(".json").unlink()
    with pytest.raises(FileNotFoundError, match="backbone.json"):
        ship_demo_backbone(export, tmp_path / "other.pth")
