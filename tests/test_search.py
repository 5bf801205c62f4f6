"""Gallery search: known neighbours, save/load, incremental add, IVF, and the ``passreid search`` command."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from PIL import Image

import passreid
from passreid.cli import main
from passreid.data.synthetic import generate_synthetic
from passreid.data.datasets import build_dataset
from passreid.errors import ConfigError, DatasetError
from passreid.evaluation import evaluate_distmat
from passreid.features import FeatureSet
from passreid.models import ReIDModel, create_model
from passreid.knn import default_nlist, faiss_available
from passreid.search import Gallery, ModelMismatchError
from passreid.visualize import grid_size

BACKENDS = ["torch", pytest.param("faiss", marks=pytest.mark.skipif(not faiss_available(), reason="needs faiss"))]
needs_faiss = pytest.mark.skipif(not faiss_available(), reason="needs faiss")


def write_images(folder: Path, n: int, seed: int) -> list[str]:
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / f"img_{seed}_{i}.png" for i in range(n)]
    for path in paths:
        Image.fromarray(rng.integers(0, 256, (80, 40, 3), dtype=np.uint8)).save(path)
    return [str(p) for p in paths]


def unit_rows(n: int, d: int, seed: int) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def brute_force(q: np.ndarray, g: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    scores = q @ g.T
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(scores, order, 1), order


@pytest.mark.parametrize("backend", BACKENDS)
def test_hand_computed_ranking(backend: str) -> None:
    gallery = Gallery(backend=backend)
    # Cosine with the query (1, 0): 1.0, 0.0, -1.0, 0.6; the last row is unnormalised on purpose.
    gallery.add(torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [3.0, 4.0]]), paths=["a", "b", "c", "d"])
    result = gallery.search(torch.tensor([2.0, 0.0]), k=3)
    assert result.indices.tolist() == [[0, 3, 1]]
    torch.testing.assert_close(result.scores, torch.tensor([[1.0, 0.6, 0.0]]))
    assert result.paths == [["a", "d", "b"]]
    # k beyond the gallery is clamped; q = (0.1, -1) scores a 0.1, b -1, c -0.1, d -0.74 (times 1/|q|).
    assert gallery.search(torch.tensor([0.1, -1.0]), k=10).indices.tolist() == [[0, 2, 3, 1]]


@pytest.mark.parametrize("backend", BACKENDS)
def test_known_nearest_neighbours(backend: str) -> None:
    g = unit_rows(300, 32, seed=0)
    targets = np.array([5, 17, 123, 299, 0])
    noise = 0.05 * np.random.default_rng(1).standard_normal((5, 32)).astype(np.float32)
    gallery = Gallery(backend=backend)
    gallery.add(g, paths=[f"img{i}.jpg" for i in range(300)], pids=np.arange(300) // 3, camids=np.arange(300) % 6)
    queries = g[targets] + noise
    result = gallery.search(queries, k=7)
    assert result.indices[:, 0].tolist() == targets.tolist()  # each query's own source row comes first
    exp_scores, exp_idx = brute_force(queries / np.linalg.norm(queries, axis=1, keepdims=True), g, 7)
    assert result.indices.tolist() == exp_idx.tolist()
    np.testing.assert_allclose(result.scores.numpy(), exp_scores, atol=1e-5)
    assert result.paths[0][0] == "img5.jpg"
    assert gallery.pids[result.indices[2, 0]] == 41 and gallery.camids[result.indices[2, 0]] == 3


@pytest.mark.parametrize("backend", BACKENDS)
def test_saved_gallery_answers_identically(tmp_path: Path, backend: str) -> None:
    g, q = unit_rows(120, 16, seed=2), unit_rows(9, 16, seed=3)
    gallery = Gallery(backend=backend)
    gallery.add(g, paths=[f"p{i}" for i in range(120)], pids=np.arange(120) % 7, camids=np.arange(120) % 3)
    gallery.meta = {"checkpoint": "/models/ft.pth", "flip": True}
    before = gallery.search(q, k=5)
    path = gallery.save(tmp_path / "gallery.npz")
    again = Gallery.load(path, backend=backend)
    after = again.search(q, k=5)
    assert torch.equal(before.indices, after.indices) and torch.equal(before.scores, after.scores)
    assert after.paths == before.paths
    torch.testing.assert_close(again.relative_scores(q, after.scores), gallery.relative_scores(q, before.scores),
                               atol=1e-9, rtol=0)
    assert again.meta == {"checkpoint": "/models/ft.pth", "flip": True}
    np.testing.assert_array_equal(again.pids, np.arange(120) % 7)
    np.testing.assert_array_equal(again.camids, np.arange(120) % 3)
    # The file is also a DESIGN §8 feature file.
    fs = FeatureSet.load(path)
    np.testing.assert_allclose(fs.features, g, atol=1e-6)
    assert list(fs.paths[:2]) == ["p0", "p1"]
    # A feature file without the saved moments (or an index from before them) gets them summed on first need.
    fs.save(tmp_path / "plain.npz")
    plain = Gallery.load(tmp_path / "plain.npz", backend=backend)
    torch.testing.assert_close(plain.relative_scores(q, after.scores), gallery.relative_scores(q, before.scores),
                               atol=1e-9, rtol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_incremental_add_equals_rebuild(backend: str) -> None:
    g, q = unit_rows(200, 24, seed=4), unit_rows(11, 24, seed=5)
    names = [f"x{i}" for i in range(200)]
    whole = Gallery(backend=backend)
    whole.add(g, names, np.arange(200), np.zeros(200))
    parts = Gallery(backend=backend)
    for lo, hi in ((0, 50), (50, 51), (51, 200)):
        parts.add(g[lo:hi], names[lo:hi], np.arange(lo, hi), np.zeros(hi - lo))
    assert len(parts) == 200 and parts.paths == names
    np.testing.assert_array_equal(parts.features, whole.features)
    np.testing.assert_array_equal(parts.pids, whole.pids)
    a, b = whole.search(q, k=10), parts.search(q, k=10)
    assert torch.equal(a.indices, b.indices) and torch.equal(a.scores, b.scores)
    torch.testing.assert_close(parts.relative_scores(q, b.scores), whole.relative_scores(q, a.scores),
                               atol=1e-9, rtol=0)
    assert parts.missing(["x3", "new.jpg", "x199", "other.jpg"]) == ["new.jpg", "other.jpg"]
    assert parts.contains("x150") and not parts.contains("x200")


def test_torch_and_faiss_agree() -> None:
    pytest.importorskip("faiss")
    g, q = unit_rows(500, 64, seed=6), unit_rows(20, 64, seed=7)
    results = []
    for backend in ("torch", "faiss"):
        gallery = Gallery(backend=backend)
        gallery.add(g)
        results.append(gallery.search(q, k=15))
    assert torch.equal(results[0].indices, results[1].indices)
    torch.testing.assert_close(results[0].scores, results[1].scores, atol=1e-5, rtol=0)


@needs_faiss
def test_ivf_exhaustive_probe_is_exact_and_reload_keeps_training(tmp_path: Path) -> None:
    g, q = unit_rows(2000, 16, seed=8), unit_rows(25, 16, seed=9)
    ivf = Gallery(index="ivf", nlist=8, nprobe=8)  # probing every list makes IVF exact
    ivf.add(g[:1000])  # trained here, on the first batch only
    ivf.add(g[1000:])  # appended to the trained lists, no retraining
    exact = Gallery(index="flat")
    exact.add(g)
    a, b = ivf.search(q, k=10), exact.search(q, k=10)
    assert torch.equal(a.indices, b.indices)
    torch.testing.assert_close(a.scores, b.scores, atol=1e-5, rtol=0)
    np.testing.assert_allclose(ivf.features, g, atol=1e-6)
    # Approximate answers (one list probed) depend on the trained lists: a reload must restore them.
    one = Gallery.load(ivf.save(tmp_path / "ivf.npz"), nprobe=1)
    ivf._backend.index.nprobe = 1
    before, after = ivf.search(q, k=10), one.search(q, k=10)
    assert torch.equal(before.indices, after.indices)
    assert one.index_type == "ivf" and one.nlist == 8


@needs_faiss
def test_ivf_needs_enough_training_vectors() -> None:
    assert default_nlist(1_000_000) == 4000 and default_nlist(100) == 2 and default_nlist(10) == 1
    with pytest.raises(ConfigError, match="nlist=64"):
        Gallery(index="ivf", nlist=64).add(unit_rows(10, 8, seed=0))


def test_gallery_errors() -> None:
    gallery = Gallery(backend="torch")
    with pytest.raises(DatasetError, match="empty"):
        gallery.search(np.ones(4), k=1)
    gallery.add(unit_rows(3, 4, seed=0), paths=["a", "b", "c"])
    with pytest.raises(DatasetError, match="8 dims, the gallery 4"):
        gallery.search(np.ones(8), k=1)
    with pytest.raises(DatasetError, match="8 dims, the gallery 4"):
        gallery.add(np.ones((1, 8)))
    with pytest.raises(DatasetError, match="2 features but 1 paths"):
        gallery.add(np.ones((2, 4)), paths=["z"])
    with pytest.raises(DatasetError, match="NaN"):
        gallery.add(np.full((1, 4), np.nan))
    with pytest.raises(ConfigError, match="index must be"):
        Gallery(index="hnsw")  # type: ignore[arg-type]


def test_relative_scores_are_standard_scores_over_the_whole_gallery() -> None:
    # Cosines with the query (1, 0): 1.0, 0.0, -1.0, 0.6 -> mean 0.15, variance 2.36/4 - 0.15^2 = 0.5675.
    gallery = Gallery(backend="torch")
    gallery.add(torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [3.0, 4.0]]))
    result = gallery.search(torch.tensor([2.0, 0.0]), k=2)
    z = gallery.relative_scores(torch.tensor([2.0, 0.0]), result.scores)
    assert z.dtype == torch.float64
    torch.testing.assert_close(z, torch.tensor([[0.85, 0.45]], dtype=torch.float64) / np.sqrt(0.5675),
                               atol=1e-6, rtol=0)
    # Moments kept up to date by add equal moments summed afresh; a gallery of copies of one row has no spread.
    g, q = unit_rows(90, 12, seed=10), unit_rows(4, 12, seed=11)
    grown = Gallery(backend="torch")
    grown.add(g[:30])
    grown.relative_scores(q, np.zeros((4, 1)))  # sums the moments of the first 30 rows now
    grown.add(g[30:])
    scores = q @ g.T
    expected = (scores - scores.mean(1, keepdims=True)) / scores.std(1, keepdims=True)
    np.testing.assert_allclose(grown.relative_scores(q, scores).numpy(), expected, atol=1e-5)
    copies = Gallery(backend="torch")
    copies.add(np.repeat(g[:1], 3, axis=0))
    assert torch.isnan(copies.relative_scores(q, copies.search(q, k=2).scores)).all()


def test_relative_scores_tell_matches_from_a_large_common_component() -> None:
    """Features as a ReID model's: one shared direction, a small identity part, smaller noise."""
    rng = np.random.default_rng(12)
    ids, per_id, dim = 40, 4, 64
    common = np.zeros(dim, np.float32)
    common[0] = 1.0
    identity = 0.005 * rng.standard_normal((ids, dim)).astype(np.float32)
    def images(n: int) -> np.ndarray:
        noise = 0.002 * rng.standard_normal((ids, n, dim)).astype(np.float32)
        return (common + identity[:, None] + noise).reshape(ids * n, dim)
    gallery = Gallery(backend="torch")
    gallery.add(images(per_id), pids=np.repeat(np.arange(ids), per_id))
    query = images(1)
    result = gallery.search(query, k=len(gallery))
    same = gallery.pids[result.indices.numpy()] == np.arange(ids)[:, None]
    cos, z = result.scores.numpy(), gallery.relative_scores(query, result.scores).numpy()
    assert np.median(cos[same]) - np.median(cos[~same]) < 0.01  # near 1 for everybody
    assert np.median(z[same]) > 4 and abs(np.median(z[~same])) < 0.5  # several units apart


@pytest.fixture(scope="module")
def model_features(tmp_path_factory: pytest.TempPathFactory) -> tuple[np.ndarray, np.ndarray, dict]:
    """Query and gallery features of a tiny ReID model on a synthetic Market set, with their labels."""
    root = tmp_path_factory.mktemp("synth") / "market"
    generate_synthetic(root, num_ids=8, num_cams=3, seed=0, img_size=(64, 32))
    data = build_dataset("market1501", root)
    torch.manual_seed(0)
    model = passreid.load(ReIDModel(create_model("pass_vit_tiny", img_size=(64, 32), depth=1)), device="cpu")
    q, g = (model.extract([r.path for r in split]).numpy() for split in (data.query, data.gallery))
    labels = {name: np.array([getattr(r, attr) for r in split]) for name, split, attr in (
        ("q_pids", data.query, "pid"), ("g_pids", data.gallery, "pid"),
        ("q_camids", data.query, "camid"), ("g_camids", data.gallery, "camid"))}
    return q, g, labels


@pytest.mark.parametrize("backend", BACKENDS)
def test_relative_scores_rank_as_the_cosine_and_the_protocol(
    model_features: tuple[np.ndarray, np.ndarray, dict], backend: str
) -> None:
    q, g, labels = model_features
    gallery = Gallery(backend=backend)
    gallery.add(g)
    result = gallery.search(q, k=len(gallery))
    cos = result.scores.numpy()
    z = gallery.relative_scores(q, result.scores).numpy()
    assert np.isfinite(z).all()
    # Along each ranked list the score falls exactly where the cosine falls (never merges two cosines).
    np.testing.assert_array_equal(np.sign(np.diff(z, axis=1)), np.sign(np.diff(cos, axis=1)))
    # Over the whole gallery: the score's ranking is the cosine's, and the protocol's metrics are unchanged.
    full_cos = q @ g.T
    full_z = gallery.relative_scores(q, full_cos).numpy()
    np.testing.assert_array_equal(np.argsort(-full_z, axis=1, kind="stable"),
                                  np.argsort(-full_cos, axis=1, kind="stable"))
    by_cos = evaluate_distmat(torch.from_numpy(2 - 2 * full_cos), **labels)
    by_z = evaluate_distmat(torch.from_numpy(-full_z), **labels)
    assert by_z["mAP"] == by_cos["mAP"] and by_z["cmc"] == by_cos["cmc"] and by_z["mINP"] == by_cos["mINP"]


def test_a_gallery_refuses_another_models_features() -> None:
    gallery = Gallery(backend="torch")
    gallery.meta = {"checkpoint": "/models/a.pth", "model": "sha256:aaaa"}
    gallery.require_model("sha256:aaaa", "/elsewhere/copy_of_a.pth")  # the same weights anywhere are fine
    with pytest.raises(ModelMismatchError) as err:
        gallery.require_model("sha256:bbbb", "/models/b.pth", where="g.npz")
    assert str(err.value).startswith(
        "g.npz holds features of model /models/a.pth [sha256:aaaa], not of /models/b.pth [sha256:bbbb]")
    # An index from before fingerprints were recorded: compared by checkpoint path.
    gallery.meta = {"checkpoint": "/models/a.pth"}
    gallery.require_model("sha256:cccc", "/models/a.pth")
    with pytest.raises(ModelMismatchError, match="model /models/a.pth, not of /models/b.pth"):
        gallery.require_model("sha256:cccc", "/models/b.pth")


def test_search_command_indexes_once_and_queries(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ckpt = tmp_path / "ft.pth"
    torch.manual_seed(0)
    torch.save(ReIDModel(create_model("pass_vit_tiny", img_size=(64, 32), depth=1)).state_dict(), ckpt)
    folder = tmp_path / "gallery"
    paths = write_images(folder, 4, seed=0)
    index = tmp_path / "index.npz"
    base = ["search", "index", "--checkpoint", str(ckpt), "--index", str(index), "--num-workers", "0",
            "--device", "cpu"]
    assert main([*base, "--folder", str(folder)]) == 0
    assert "added 4 images (0 already there), 4 in total" in capsys.readouterr().out
    first = Gallery.load(index)
    write_images(folder / "more", 2, seed=1)  # two new images appear in the folder
    assert main([*base, "--folder", str(folder)]) == 0
    assert "added 2 images (4 already there), 6 in total" in capsys.readouterr().out
    grown = Gallery.load(index)
    np.testing.assert_array_equal(grown.features[:4], first.features)  # old rows untouched
    assert main([*base, "--folder", str(folder)]) == 0
    assert "all 6 images are indexed already" in capsys.readouterr().out

    picture = tmp_path / "ranked.png"
    assert main(["search", "query", "--checkpoint", str(ckpt), "--index", str(index), paths[1], "-k", "3",
                 "--picture", str(picture), "--num-workers", "0", "--device", "cpu"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("score: the cosine's standard score among the query's cosines with all 6 gallery")
    assert out[2].split() == ["rank", "score", "cosine", "pid", "cam", "path"]
    first_hit = out[3].split()
    assert first_hit[0] == "1" and float(first_hit[2]) == pytest.approx(1.0, abs=1e-5)  # the query image itself
    assert first_hit[-1] == str(Path(paths[1]).resolve())
    row = grown.paths.index(first_hit[-1])
    cosines = grown.features.astype(np.float64) @ grown.features[row].astype(np.float64)
    assert float(first_hit[1]) == pytest.approx((1 - cosines.mean()) / cosines.std(), abs=0.006)
    shown = [float(line.split()[1]) for line in out[3:6]]
    assert shown == sorted(shown, reverse=True)
    assert Image.open(picture).size == grid_size(3)
    assert main(["search", "query", "--checkpoint", str(ckpt), "--index", str(index), str(tmp_path / "no.jpg"),
                 "--device", "cpu"]) == 2
    assert "query image or folder not found" in capsys.readouterr().err
