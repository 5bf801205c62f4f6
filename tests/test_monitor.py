"""The pretraining monitor: frozen features, k-NN accuracy, collapse checks, and its place in a run."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from passreid.config import RunConfig
from passreid.data.synthetic import generate_pool, generate_synthetic
from passreid.models import create_model
from passreid.monitor import RetrievalMonitor, class_token_only, collapse_warning, frozen_feature, knn_accuracy
from passreid.pretrain import (
    AugConfig,
    PretrainConfig,
    PretrainDataConfig,
    PretrainEvalConfig,
    PretrainModelConfig,
    PretrainOptimConfig,
    run_pretrain,
)

pytestmark = pytest.mark.usefixtures("one_thread")


def test_knn_accuracy_matches_a_hand_count() -> None:
    # Points on a circle: two tight pairs (labels 0, 1) and a fifth point near the label-0 pair.
    angles = torch.tensor([0.0, 0.1, 2.0, 2.1, 0.3])
    feats = torch.stack((angles.cos(), angles.sin()), dim=1)
    labels = torch.tensor([0, 0, 1, 1, 1])
    # k=1: 0->1 (ok), 1->0 (ok), 2->3 (ok), 3->2 (ok), 4->1 (label 0, wrong): 4/5.
    assert knn_accuracy(feats, labels, k=1) == pytest.approx(4 / 5)
    # k=2, T=0.07: point 4 sees 1 (cos 0.98) and 0 (cos 0.955), both label 0: still wrong. Point 0 sees
    # 1 (label 0, cos 0.995) and 4 (label 1, cos 0.955): label 0 wins by weight. Same for point 1.
    # Points 2 and 3 see each other (label 1) plus a label-0 point far away: right.
    assert knn_accuracy(feats, labels, k=2) == pytest.approx(4 / 5)
    # Weighted vote by hand for point 4 with k=4 and T=1: label 0 gets e^cos(0.3)+e^cos(0.2),
    # label 1 gets e^cos(1.7)+e^cos(1.8), so label 0 still wins.
    votes0 = math.exp(math.cos(0.3)) + math.exp(math.cos(0.2))
    votes1 = math.exp(math.cos(1.7)) + math.exp(math.cos(1.8))
    assert votes0 > votes1
    assert knn_accuracy(feats, labels, k=4, temperature=1.0) < 1.0


def test_frozen_feature_is_cls_and_mean_of_parts_or_class_token_only() -> None:
    backbone = create_model("pass_vit_tiny", img_size=(64, 32), depth=1).eval()
    x = torch.randn(3, 3, 64, 32)
    with torch.no_grad():
        tokens = backbone(x)
        want = F.normalize(torch.cat((tokens[:, 0], (tokens[:, 1] + tokens[:, 2] + tokens[:, 3]) / 3), 1), dim=1)
        torch.testing.assert_close(frozen_feature(backbone, x, "pass"), want)
        dino = frozen_feature(backbone, x, "dino")
        assert dino.shape == (3, backbone.embed_dim)
        torch.testing.assert_close(dino, F.normalize(class_token_only(backbone, x), dim=1))
        # Without part tokens in the sequence the class token differs from the 4-token forward's.
        assert not torch.allclose(dino, F.normalize(tokens[:, 0], dim=1), atol=1e-4)


def test_collapse_warning_names_the_settings() -> None:
    k = 1024
    assert collapse_warning(0.5 * math.log(k), 4.0, k) is None
    uniform = collapse_warning(0.99 * math.log(k), 6.9, k)
    assert uniform is not None and "optim.lr" in uniform and "teacher_temp" in uniform
    single = collapse_warning(0.01, 0.2, k)
    assert single is not None and "same prototype" in single and "center_momentum" in single


def test_pool_has_a_scene_per_image_and_is_deterministic(tmp_path: Path) -> None:
    a = generate_pool(tmp_path / "a", num_images=6, seed=3, images_per_person=3, img_size=(64, 32))
    b = generate_pool(tmp_path / "b", num_images=6, seed=3, images_per_person=3, img_size=(64, 32))
    assert [p.name for p in a] == ["000000_0.jpg", "000000_1.jpg", "000000_2.jpg", "000001_0.jpg",
                                   "000001_1.jpg", "000001_2.jpg"]
    assert all(x.read_bytes() == y.read_bytes() for x, y in zip(a, b))
    # The top-left corner is background: one person's three images are in three different scenes.
    import numpy as np
    from PIL import Image

    corners = [np.asarray(Image.open(p))[:6, :6].reshape(-1, 3).mean(0) for p in a[:3]]
    assert min(np.abs(corners[i] - corners[j]).max() for i in range(3) for j in range(i + 1, 3)) > 3
    with pytest.raises(Exception, match="not empty"):
        generate_pool(tmp_path / "a", num_images=2)


def test_pool_with_scenes_shares_each_camera_between_many_images(tmp_path: Path) -> None:
    import numpy as np
    from PIL import Image

    def top_spread(paths: list[Path]) -> float:
        """Relative spread over images of the top rows' mean colour (the wall behind everyone)."""
        means = np.stack([np.asarray(Image.open(p), np.float32)[:12].reshape(-1, 3).mean(0) for p in paths])
        return float((means.std(0) / means.mean(0)).max())

    # One camera: the same wall behind everyone, up to the per-image gain (+-5%), noise and panning.
    one = generate_pool(tmp_path / "one", num_images=8, seed=3, img_size=(64, 32), clutter=False, num_scenes=1)
    per_image = generate_pool(tmp_path / "per", num_images=8, seed=3, img_size=(64, 32), clutter=False)
    assert top_spread(one) < 0.2 and top_spread(per_image) > 0.3
    # The draws of a scene-per-image pool are unchanged by the option.
    again = generate_pool(tmp_path / "again", num_images=6, seed=3, img_size=(64, 32), num_scenes=0)
    default = generate_pool(tmp_path / "default", num_images=6, seed=3, img_size=(64, 32))
    assert all(x.read_bytes() == y.read_bytes() for x, y in zip(again, default))
    with pytest.raises(Exception, match="num_scenes"):
        generate_pool(tmp_path / "bad", num_images=2, num_scenes=-1)


def tiny_monitored_run(tmp_path: Path, name: str = "run", *, monitor: bool = True, init: str = "") -> PretrainConfig:
    if not (tmp_path / "pool").exists():
        generate_pool(tmp_path / "pool", num_images=16, seed=0, img_size=(64, 32))
        generate_synthetic(tmp_path / "eval", num_ids=8, num_cams=2, seed=1, img_size=(64, 32), num_distractors=2,
                           num_junk=1)
    return PretrainConfig(
        data=PretrainDataConfig(root=str(tmp_path / "pool"), img_size=[64, 32], batch_size=8, num_workers=0),
        aug=AugConfig(backend="gpu", decode_size=[64, 32], local_size=[32, 16]),
        model=PretrainModelConfig(name="pass_vit_tiny", depth=1, out_dim=32, hidden_dim=16, bottleneck_dim=8,
                                  init=init),
        optim=PretrainOptimConfig(warmup_epochs=1),
        eval=PretrainEvalConfig(dataset="synthetic" if monitor else "", root=str(tmp_path / "eval") if monitor else "",
                                every=2),
        run=RunConfig(output_dir=str(tmp_path / name), epochs=3, log_every=1, device="cpu"),
    )


def test_monitor_in_a_run_logs_epoch_0_and_every_epoch(tmp_path: Path) -> None:
    cfg = tiny_monitored_run(tmp_path)
    run_pretrain(cfg)
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [0, 1, 2, 3]
    # Evaluated before training, at epoch 2 (every 2) and at the last epoch; not at epoch 1.
    assert ["mAP" in r for r in records] == [True, False, True, True]
    for r in (records[0], records[2], records[3]):
        assert 0.0 <= r["mAP"] <= 1.0 and 0.0 <= r["rank1"] <= 1.0 and 0.0 <= r["knn_top1"] <= 1.0
    assert all("teacher_usage_entropy" in r for r in records[1:])
    # The epoch-0 figures are those of the random-init teacher: a monitor on a fresh model agrees.
    from passreid.data.datasets import build_dataset

    torch.manual_seed(0)
    monitor = RetrievalMonitor(build_dataset("synthetic", str(tmp_path / "eval")), (64, 32))
    backbone = create_model("pass_vit_tiny", img_size=(64, 32), depth=1)
    assert set(monitor(backbone)) == {"mAP", "mINP", "rank1", "rank5", "rank10", "knn_top1"}


def test_the_monitor_does_not_change_what_the_run_trains(tmp_path: Path) -> None:
    # Extracting features used to draw the loader's seed from the global RNG, so switching the monitor on
    # shifted drop path and the batched views: the same recipe trained other weights (study run N).
    watched = run_pretrain(tiny_monitored_run(tmp_path, "watched"))
    plain = run_pretrain(tiny_monitored_run(tmp_path, "plain", monitor=False))
    a, b = torch.load(watched["backbone"]), torch.load(plain["backbone"])
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_init_starts_student_and_teacher_from_a_backbone(tmp_path: Path) -> None:
    from passreid.errors import ConfigError
    from passreid.pretrain import build_networks

    first = run_pretrain(tiny_monitored_run(tmp_path, "first", monitor=False))
    exported = torch.load(first["backbone"])
    cfg = tiny_monitored_run(tmp_path, "second", monitor=False, init=str(first["backbone"]))
    torch.manual_seed(0)
    student, teacher = build_networks(cfg.model, cfg.data.img_size)
    for net in (student, teacher):
        state = net.backbone.state_dict()
        assert all(torch.equal(state[k], v) for k, v in exported.items())
    torch.manual_seed(0)
    fresh, _ = build_networks(tiny_monitored_run(tmp_path, "third", monitor=False).model, cfg.data.img_size)
    assert not torch.equal(fresh.backbone.cls_token, student.backbone.cls_token)
    # The heads start fresh (the same draw as without init).
    assert all(torch.equal(p, q) for p, q in zip(fresh.head.parameters(), student.head.parameters()))
    cfg.model.init = str(tmp_path / "missing.pth")
    with pytest.raises(ConfigError, match=r"model\.init.*missing\.pth"):
        build_networks(cfg.model, cfg.data.img_size)
    # A run started from init resumes from its own checkpoint, without reading the init file again.
    cfg.model.init = str(first["backbone"])
    cfg.run.epochs = 1
    run_pretrain(cfg)
    Path(first["backbone"]).unlink()
    cfg.run.epochs = 2
    resumed = run_pretrain(cfg, resume="", force_resume=True)
    assert resumed["epoch"] == 2 and not resumed["stopped"]


def test_eval_keys_go_together() -> None:
    with pytest.raises(Exception, match="eval.dataset"):
        PretrainEvalConfig(dataset="synthetic", root="")
