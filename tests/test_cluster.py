"""Cluster contrast (DESIGN §5): pseudo labels, cluster memory, recipes, a short USL run and its resume."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.metrics import adjusted_rand_score

from passreid.cluster import ClusterConfig
from passreid.clustering import cluster_stats, pseudo_label_quality, pseudo_labels
from passreid.losses.cluster_memory import ClusterMemory, cluster_centroids
from passreid.config import load_config
from passreid.errors import ConfigError

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def blobs(num_groups: int = 6, size: int = 12, dim: int = 32, noise: float = 0.05,
          seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Unit features around ``num_groups`` random directions (nearly orthogonal in 32-d), and their group."""
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((num_groups, dim))
    groups = np.repeat(np.arange(num_groups), size)
    feats = centers[groups] / np.linalg.norm(centers[groups], axis=1, keepdims=True)
    feats = feats + noise * rng.standard_normal(feats.shape)
    return (feats / np.linalg.norm(feats, axis=1, keepdims=True)).astype(np.float32), groups


# ----------------------------------------------------------------------------- pseudo labels


def test_pseudo_labels_recover_well_separated_groups():
    feats, groups = blobs()
    feats[:5] = feats[0]  # exact duplicates sit at Jaccard distance 0: stored zeros must count as neighbours
    labels = pseudo_labels(feats, eps=0.5, min_samples=4, k1=10, k2=4)
    assert (labels >= 0).all()
    assert labels.max() + 1 == 6
    assert adjusted_rand_score(groups, labels) == 1.0


def test_scattered_points_are_outliers():
    feats, groups = blobs(num_groups=3, size=10)
    rng = np.random.default_rng(1)
    lonely = rng.standard_normal((4, feats.shape[1])).astype(np.float32)
    lonely /= np.linalg.norm(lonely, axis=1, keepdims=True)
    # k2=1: no query expansion, which would lend a lonely point its neighbours' encodings
    labels = pseudo_labels(np.concatenate([feats, lonely]), eps=0.5, min_samples=4, k1=8, k2=1)
    assert (labels[-4:] == -1).all()
    kept = labels[:-4] >= 0
    assert kept.mean() > 0.8
    assert adjusted_rand_score(groups[kept], labels[:-4][kept]) == 1.0
    assert cluster_stats(labels) == {"num_clusters": 3, "outlier_fraction": float((labels < 0).mean())}


def test_pseudo_label_quality_by_hand():
    # Clustered: cluster 0 = ids {5, 5, 6}, cluster 1 = ids {7, 7}; the outlier (id 8) is left out.
    labels, pids = np.array([0, 0, 0, 1, 1, -1]), np.array([5, 5, 6, 7, 7, 8])
    quality = pseudo_label_quality(labels, pids)
    assert quality["pseudo_purity"] == pytest.approx(4 / 5)
    # ARI: pair counts 2 within both, 4 within clusters, 2 within ids, of C(5, 2) = 10 pairs:
    # (2 - 4 * 2 / 10) / ((4 + 2) / 2 - 4 * 2 / 10)
    assert quality["pseudo_ari"] == pytest.approx(1.2 / 2.2)
    assert 0 < quality["pseudo_nmi"] < 1
    perfect = pseudo_label_quality(np.array([1, 1, 0, 0, -1]), np.array([3, 3, 9, 9, 4]))
    assert perfect == {"pseudo_purity": 1.0, "pseudo_ari": 1.0, "pseudo_nmi": pytest.approx(1.0)}


def test_pseudo_label_quality_is_empty_without_identities_or_clusters():
    assert pseudo_label_quality(np.array([0, 0, 1, 1]), np.array([-1, -1, -1, -1])) == {}  # unlabelled folder
    assert pseudo_label_quality(np.array([0, 0, 1, 1]), np.zeros(4, np.int64)) == {}  # one identity: no labels
    assert pseudo_label_quality(np.array([-1, -1]), np.array([1, 2])) == {}  # everything an outlier
    with pytest.raises(ValueError, match="shape"):
        pseudo_label_quality(np.array([0, 1]), np.array([0, 1, 2]))


def test_centroids_are_normalised_means_without_outliers():
    feats = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 2.0], [5.0, 5.0]])
    labels = torch.tensor([0, 0, 1, -1])
    expected = torch.tensor([[1 / math.sqrt(2), 1 / math.sqrt(2)], [0.0, 1.0]])
    assert torch.allclose(cluster_centroids(feats, labels), expected)


# ----------------------------------------------------------------------------- memory


def hand_memory(mode: str) -> ClusterMemory:
    memory = ClusterMemory(num_features=2, num_clusters=3, temp=0.5, momentum=0.2, mode=mode)
    memory.centroids.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]]))
    return memory


def test_memory_loss_equals_hand_computed_value():
    memory = hand_memory("hard")
    x = torch.tensor([[3.0, 4.0]], requires_grad=True)  # normalised: (0.6, 0.8)
    loss = memory(x, torch.tensor([1]))
    # logits = (0.6, 0.8, -0.6) / 0.5 = (1.2, 1.6, -1.2); CE for class 1
    expected = -1.6 + math.log(math.exp(1.2) + math.exp(1.6) + math.exp(-1.2))
    assert loss.item() == pytest.approx(expected, abs=1e-6)
    loss.backward()
    assert x.grad is not None and not memory.centroids.requires_grad


# Batch: cluster 0 gets x_a = 2 * (0.8, 0.6) (similarity 0.8 to its centroid (1, 0)) then
# x_b = (0.6, 0.8) (similarity 0.6, the hardest); cluster 1 gets (-0.6, 0.8); cluster 2 is absent.
# hard:     normalize(0.2 * (1, 0) + 0.8 * x_b) = normalize(0.68, 0.64)
# mean:     normalize(0.2 * (1, 0) + 0.8 * (0.7, 0.7)) = normalize(0.76, 0.56)
# instance: m = normalize(0.2 * (1, 0) + 0.8 * (0.8, 0.6)) = (0.868243, 0.496139), then
#           normalize(0.2 * m + 0.8 * x_b) = normalize(0.653649, 0.739228)
@pytest.mark.parametrize("mode, cluster0", [
    ("hard", (0.728200, 0.685365)),
    ("mean", (0.805056, 0.593199)),
    ("instance", (0.662413, 0.749139)),
])
def test_memory_update_follows_its_formula(mode, cluster0):
    memory = hand_memory(mode)
    batch = torch.tensor([[1.6, 1.2], [-0.6, 0.8], [0.6, 0.8]])
    memory.update(batch, torch.tensor([0, 1, 0]))
    expected = torch.tensor([cluster0, (-0.496139, 0.868243), (-1.0, 0.0)])
    assert torch.allclose(memory.centroids, expected, atol=1e-5)


def test_memory_from_features_starts_at_the_cluster_means():
    feats, groups = blobs(num_groups=4, size=5)
    memory = ClusterMemory.from_features(torch.from_numpy(feats), torch.from_numpy(groups), mode="mean")
    assert memory.num_clusters == 4
    means = torch.stack([torch.from_numpy(feats[groups == c]).mean(0) for c in range(4)])
    assert torch.allclose(memory.centroids, torch.nn.functional.normalize(means, dim=1), atol=1e-6)


# ----------------------------------------------------------------------------- recipes


@pytest.mark.parametrize("recipe, dataset, fusion, neck, eps, ghost, eval_every", [
    ("usl/market_vit_small.yaml", "market1501", "cat", "single", 0.6, 64, 10),
    ("usl/msmt17_vit_small.yaml", "msmt17", "mean", "single", 0.7, 128, 50),
    ("uda/msmt17_to_market_vit_small.yaml", "market1501", "cat", "multi", 0.6, 64, 10),
    ("uda/market_to_msmt17_vit_small.yaml", "msmt17", "mean", "multi", 0.7, 128, 10),
])
def test_recipes_are_the_published_rows(recipe, dataset, fusion, neck, eps, ghost, eval_every):
    cfg = load_config(ClusterConfig, CONFIGS / recipe)
    assert (cfg.data.dataset, cfg.model.fusion, cfg.model.neck, cfg.cluster.eps) == (dataset, fusion, neck, eps)
    # 256 images over 4 (Market) or 2 (MSMT17) DataParallel GPUs; MSMT17 USL evaluates only at epoch 50
    assert (cfg.model.ghost_batch, cfg.run.eval_every) == (ghost, eval_every)
    assert (cfg.optim.sampler, cfg.data.erasing, cfg.run.precision, cfg.cluster.renormalize_features) == (
        "camera", "constant", "fp32", False)
    assert (cfg.cluster.k1, cfg.cluster.k2, cfg.cluster.min_samples, cfg.cluster.temp, cfg.cluster.momentum) == (
        30, 6, 4, 0.05, 0.2)
    assert (cfg.optim.name, cfg.optim.lr, cfg.optim.batch_size, cfg.optim.num_instances, cfg.optim.iters) == (
        "sgd", 3.5e-4, 256, 8, 200)
    assert (cfg.run.epochs, cfg.optim.step_size, cfg.model.drop_path_rate, cfg.data.img_size) == (50, 20, 0.3,
                                                                                                   [256, 128])


def test_config_refuses_the_before_neck_feature():
    with pytest.raises(ConfigError, match="model.test_feature"):
        load_config(ClusterConfig, CONFIGS / "usl/market_vit_small.yaml", ["model.test_feature=before"])


def test_config_refuses_a_batch_that_splits_a_pseudo_identity():
    with pytest.raises(ConfigError, match="optim.batch_size"):
        load_config(ClusterConfig, None, ["optim.batch_size=250"])


# ----------------------------------------------------------------------------- a short USL run


PALETTE = np.array([(220, 30, 30), (30, 160, 40), (30, 60, 200), (230, 210, 40), (240, 240, 240), (30, 30, 30),
                    (150, 60, 170), (240, 130, 30)], dtype=np.float64)
SIZE = (64, 32)


def write_banded_people(root: Path, num_train_ids: int = 12, num_cams: int = 4, per_cam: int = 3,
                        seed: int = 0) -> None:
    """A tiny Market-1501-layout set of people drawn as head / upper / lower colour bands.

    Cameras change gain and colour cast, every image gets pixel noise and jittered
    band borders. The test identities wear the train identities' clothes, so what
    a short run learns from its pseudo labels is exactly what the evaluation
    measures (a few dozen steps cannot teach a ViT colours it has never seen).
    """
    from PIL import Image

    rng = np.random.default_rng(seed)
    combos = rng.permutation(len(PALETTE) ** 3)[:num_train_ids]
    gains = rng.uniform(0.7, 1.2, num_cams)
    casts = rng.normal(0.0, 40.0, (num_cams, 3))
    for sub in ("bounding_box_train", "bounding_box_test", "query"):
        (root / sub).mkdir(parents=True)
    frame = 0
    for pid in range(1, 2 * num_train_ids + 1):
        code = int(combos[(pid - 1) % num_train_ids])
        colors = PALETTE[[code // 64, code // 8 % 8, code % 8]]
        for cam in range(num_cams):
            for k in range(per_cam):
                frame += 1
                cut = np.array([16, 40]) + rng.integers(-3, 4, 2)
                img = np.empty((*SIZE, 3))
                img[: cut[0]], img[cut[0] : cut[1]], img[cut[1] :] = colors
                img = img * gains[cam] + casts[cam] + rng.normal(0.0, 10.0, img.shape)
                sub = "bounding_box_train" if pid <= num_train_ids else ("query" if k == 0 else "bounding_box_test")
                Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(
                    root / sub / f"{pid:04d}_c{cam + 1}s1_{frame:06d}_00.jpg")


@pytest.fixture(scope="module")
def banded(tmp_path_factory):
    """The data folder and a randomly initialised tiny backbone saved as the 'pretrained' one."""
    from passreid.models import create_model

    root = tmp_path_factory.mktemp("banded")
    write_banded_people(root / "data")
    torch.manual_seed(0)
    torch.save(create_model("pass_vit_tiny", img_size=SIZE, depth=2).state_dict(), root / "backbone.pth")
    return root


def tiny_config(root: Path, out: Path, epochs: int, iters: int = 20, eval_every: int = 1) -> ClusterConfig:
    overrides = [
        "data.dataset=market1501", f"data.root={root / 'data'}", f"data.img_size=[{SIZE[0]},{SIZE[1]}]",
        "data.num_workers=0", "model.name=pass_vit_tiny", "model.depth=2", "model.drop_path_rate=0.0",
        f"model.pretrained={root / 'backbone.pth'}", "model.fusion=cat", "model.neck=multi",
        f"run.output_dir={out}", f"run.epochs={epochs}", f"run.eval_every={eval_every}", "run.device=cpu",
        "cluster.eps=0.5", "cluster.k1=10", "cluster.k2=4", "cluster.memory_mode=mean", "cluster.calibrate_necks=true",
        "optim.name=adamw", "optim.lr=1e-3", "optim.weight_decay=0.05", "optim.batch_size=32",
        "optim.num_instances=4", f"optim.iters={iters}",
    ]
    return load_config(ClusterConfig, None, overrides)


def test_short_usl_run_improves_on_its_starting_model_and_exports_it(banded, tmp_path):
    from passreid.checkpoint import build_model_from_checkpoint
    from passreid.cluster import build_cluster_model, run_cluster
    from passreid.data.datasets import build_dataset
    from passreid.features import evaluate_model

    cfg = tiny_config(banded, tmp_path / "run", epochs=3)
    dataset = build_dataset("market1501", banded / "data")
    start = evaluate_model(build_cluster_model(cfg.model, SIZE, mode="usl"), dataset, img_size=SIZE, num_workers=0)
    result = run_cluster(cfg, mode="usl")
    assert result["best_mAP"] > start["mAP"] + 0.05

    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1, 2, 3]
    assert all(r["num_clusters"] >= 8 and 0 <= r["outlier_fraction"] < 0.5 for r in records)
    # The train split's own identities grade the pseudo labels (a diagnostic, never trained on).
    assert all(0 < r["pseudo_purity"] <= 1 and -1 <= r["pseudo_ari"] <= 1 for r in records)
    # The export rebuilds as the best model: same layout names, same features, same mAP.
    model, _ = build_model_from_checkpoint(result["model"])
    assert any(k.startswith("bottleneck_pt1.") for k in model.state_dict())
    assert evaluate_model(model, dataset, img_size=SIZE, num_workers=0)["mAP"] == pytest.approx(result["best_mAP"])


def test_resumed_run_ends_where_the_uninterrupted_one_does(banded, tmp_path):
    from passreid.cluster import run_cluster
    from passreid.engine import load_training_checkpoint

    run_cluster(tiny_config(banded, tmp_path / "full", epochs=2, iters=3), mode="usl")
    run_cluster(tiny_config(banded, tmp_path / "split", epochs=1, iters=3), mode="usl")
    with pytest.raises(ConfigError, match="run.epochs"):
        run_cluster(tiny_config(banded, tmp_path / "split", epochs=2, iters=3), mode="usl", resume="")
    run_cluster(tiny_config(banded, tmp_path / "split", epochs=2, iters=3), mode="usl", resume="", force_resume=True)

    full = load_training_checkpoint(tmp_path / "full" / "last.pth")
    split = load_training_checkpoint(tmp_path / "split" / "last.pth")
    assert full["epoch"] == split["epoch"] == 2
    for key, value in full["model"].items():
        assert torch.equal(value, split["model"][key]), key
    epochs = [json.loads(line)["epoch"] for line in (tmp_path / "split" / "metrics.jsonl").read_text().splitlines()]
    assert epochs == [1, 2]


def test_stop_inside_an_epoch_with_two_loader_workers_resumes_to_the_uninterrupted_weights(banded, tmp_path,
                                                                                          monkeypatch):
    """Ctrl-C at step 3 of epoch 2 (inside its second sampler pass), resumed with 2 workers: the epoch's
    pseudo labels and memory come back from last.pth, the batches and their augmentation from the step on are
    those of an uninterrupted run without workers."""
    import os
    import signal

    from passreid.cluster import run_cluster
    from passreid.engine import load_training_checkpoint

    def config(out, workers):
        cfg = tiny_config(banded, out, epochs=2, iters=4, eval_every=2)
        cfg.data.num_workers = workers
        return cfg

    run_cluster(config(tmp_path / "full", 0), mode="usl")
    calls = {"n": 0}
    forward = ClusterMemory.forward

    def forward_then_sigint(self, *args):
        calls["n"] += 1
        if calls["n"] == 4 + 3:
            os.kill(os.getpid(), signal.SIGINT)  # the run stops after this step
        return forward(self, *args)

    with monkeypatch.context() as patch:
        patch.setattr(ClusterMemory, "forward", forward_then_sigint)
        assert run_cluster(config(tmp_path / "split", 2), mode="usl")["stopped"]
    saved = load_training_checkpoint(tmp_path / "split" / "last.pth")
    assert (saved["epoch"], saved["resume_step"]) == (1, 3)
    assert not run_cluster(config(tmp_path / "split", 2), mode="usl", resume="")["stopped"]

    full = load_training_checkpoint(tmp_path / "full" / "last.pth")["model"]
    split = load_training_checkpoint(tmp_path / "split" / "last.pth")["model"]
    assert full.keys() == split.keys() and all(torch.equal(full[k], split[k]) for k in full)
    epochs = [json.loads(line)["epoch"] for line in (tmp_path / "split" / "metrics.jsonl").read_text().splitlines()]
    assert epochs == [1, 2]


def test_uda_command_needs_a_source_model_and_runs_from_one(banded, tmp_path, capsys):
    from passreid.cli import main

    recipe = str(CONFIGS / "uda/msmt17_to_market_vit_small.yaml")
    tiny = [f"{k}={v}" for k, v in (
        ("data.root", banded / "data"), ("data.img_size", f"[{SIZE[0]},{SIZE[1]}]"), ("data.num_workers", 0),
        ("model.name", "pass_vit_tiny"), ("model.depth", 2), ("run.output_dir", tmp_path / "uda"),
        ("run.epochs", 1), ("run.device", "cpu"), ("cluster.k1", 10), ("cluster.k2", 4), ("cluster.eps", 0.5),
        ("optim.batch_size", 32), ("optim.num_instances", 4), ("optim.iters", 2))]
    assert main(["uda", recipe, *tiny, "model.pretrained="]) == 2
    assert "model.pretrained" in capsys.readouterr().err
    assert main(["uda", recipe, *tiny, f"model.pretrained={banded / 'backbone.pth'}"]) == 0
    assert (tmp_path / "uda" / "model.pth").is_file()
    assert json.loads((tmp_path / "uda" / "model.json").read_text())["config"]["model"]["fusion"] == "cat"


def test_train_one_epoch_steps_and_stops_when_asked():
    from passreid.cluster import build_cluster_model, train_one_epoch
    from passreid.config import ModelConfig
    from passreid.engine import GracefulStop

    torch.manual_seed(0)
    model = build_cluster_model(ModelConfig(name="pass_vit_tiny", depth=1, test_feature="after"), (32, 16),
                                mode="usl")
    memory = ClusterMemory(model.feat_dim, 2, mode="hard")
    memory.centroids.copy_(torch.nn.functional.normalize(torch.randn(2, model.feat_dim), dim=1))
    before = memory.centroids.clone()
    batches = iter([(torch.randn(4, 3, 32, 16), torch.tensor([0, 0, 1, 1]))] * 5)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    stop = GracefulStop()
    stats = train_one_epoch(model, memory, batches, optimizer, torch.amp.GradScaler("cpu", enabled=False), iters=5,
                            epoch=1, device=torch.device("cpu"))
    assert stats["iters"] == 5 and not stats["stopped"] and math.isfinite(stats["loss"])
    assert not torch.equal(memory.centroids, before)
    stop.requested = True
    batches = iter([(torch.randn(4, 3, 32, 16), torch.tensor([0, 0, 1, 1]))] * 5)
    stats = train_one_epoch(model, memory, batches, optimizer, torch.amp.GradScaler("cpu", enabled=False), iters=5,
                            epoch=2, device=torch.device("cpu"), stop=stop)
    assert stats["iters"] == 1 and stats["stopped"]


def test_fewer_clusters_than_a_batch_holds_shrink_the_batch_instead_of_stopping(banded, tmp_path, monkeypatch):
    """3 clusters with batches of 8 x 4: this epoch's batches hold the 3 clusters x 4 images;
    a single cluster is an error that names the count and the fix."""
    import passreid.cluster
    from passreid.cluster import _endless_batches, run_cluster
    from passreid.data.datasets import ImageRecord, build_dataset
    from passreid.engine import DistInfo
    from passreid.errors import TrainingError

    cfg = tiny_config(banded, tmp_path / "run", epochs=1)
    info = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    train = build_dataset("market1501", banded / "data").train
    three = [ImageRecord(r.path, r.pid % 3, r.camid) for r in train]
    batches = _endless_batches(three, cfg, info, epoch=1)
    for _ in range(3):
        images, labels = next(batches)
        assert images.shape == (12, 3, *SIZE)
        assert sorted(torch.bincount(labels).tolist()) == [4, 4, 4]
    batches.close()
    monkeypatch.setattr(passreid.cluster, "pseudo_labels", lambda features, *a, **k: np.zeros(len(features), int))
    with pytest.raises(TrainingError, match=r"epoch 1: DBSCAN .* found 1 cluster\(s\) among .*cluster\.eps"):
        run_cluster(cfg, mode="usl")


# ----------------------------------------------------------------------------- DDP: stop and resume


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_stop_resume_worker(rank: int, ports: list[int], root: str, out: str) -> None:
    """One torchrun-like process: an uninterrupted 2-epoch run, then the same run stopped by SIGTERM after
    epoch 1 and resumed (each run joins its own process group)."""
    import os
    import signal

    import passreid.cluster as cluster

    os.environ.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1")
    torch.set_num_threads(1)
    original = cluster.train_one_epoch

    def stop_after_epoch_one(*args, **kwargs):
        stats = original(*args, **kwargs)
        if kwargs["epoch"] == 1:
            os.kill(os.getpid(), signal.SIGTERM)  # as a scheduler would, on every rank
        return stats

    def run(name: str, port: int, **kwargs) -> dict:
        os.environ["MASTER_PORT"] = str(port)
        cfg = tiny_config(Path(root), Path(out) / name, epochs=2, iters=3, eval_every=2)
        return cluster.run_cluster(cfg, mode="usl", **kwargs)

    run("full", ports[0])
    cluster.train_one_epoch = stop_after_epoch_one
    assert run("split", ports[1])["stopped"]
    cluster.train_one_epoch = original
    assert not run("split", ports[2], resume="")["stopped"]


def test_two_gloo_processes_stopped_and_resumed_end_with_the_uninterrupted_weights(banded, tmp_path, spawn):
    """Each rank's random streams (augmentation, loader seeds) are saved and restored: with rank 0's
    streams on every rank, rank 1 would train on other augmentations after the resume."""
    from passreid.training.checkpoints import load_training_checkpoint

    spawn(_ddp_stop_resume_worker, ([_free_port() for _ in range(3)], str(banded), str(tmp_path)), nprocs=2)
    full = load_training_checkpoint(tmp_path / "full" / "last.pth")
    split = load_training_checkpoint(tmp_path / "split" / "last.pth")
    assert full["epoch"] == split["epoch"] == 2 and len(split["rng_per_rank"]) == 2
    for key, value in full["model"].items():
        assert torch.equal(value, split["model"][key]), key
    epochs = [json.loads(line)["epoch"] for line in (tmp_path / "split" / "metrics.jsonl").read_text().splitlines()]
    assert epochs == [1, 2]
