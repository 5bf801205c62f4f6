"""The synthetic Market-1501-layout generator (passreid.data.synthetic) and ``passreid synth``."""

from __future__ import annotations

import argparse
import re
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from passreid.commands import synth as synth_command
from passreid.data import Market1501, ReIDDataset, build_dataset, generate_synthetic
from passreid.data.synthetic import DOMAINS, domain_cameras
from passreid.errors import ConfigError, DatasetError

SMALL = dict(num_ids=10, num_cams=3, img_size=(64, 32), num_distractors=4, num_junk=3)
MARKET_NAME = re.compile(r"^(\d{4}|-1)_c(\d)s\d_\d{6}_\d{2}\.jpg$")


def files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_same_seed_same_bytes_other_seed_other_bytes(tmp_path: Path) -> None:
    generate_synthetic(tmp_path / "a", seed=3, **SMALL)
    generate_synthetic(tmp_path / "b", seed=3, **SMALL)
    generate_synthetic(tmp_path / "c", seed=4, **SMALL)
    a, b, c = files(tmp_path / "a"), files(tmp_path / "b"), files(tmp_path / "c")
    assert len(a) > 50 and a == b
    shared = set(a) & set(c)
    assert any(a[name] != c[name] for name in shared) or set(a) != set(c)


def test_exact_market_layout_parses_with_market1501(tmp_path: Path) -> None:
    returned = generate_synthetic(tmp_path, seed=0, images_per_cam=3, **SMALL)
    names = {folder: sorted(p.name for p in (tmp_path / folder).iterdir())
             for folder in ("bounding_box_train", "bounding_box_test", "query")}
    assert all(MARKET_NAME.match(n) for ns in names.values() for n in ns)
    assert len({n for ns in names.values() for n in ns}) == sum(map(len, names.values()))  # unique names
    train_ids = {int(n[:4]) for n in names["bounding_box_train"]}
    query_ids = {int(n[:4]) for n in names["query"]}
    assert train_ids == {1, 2, 3, 4, 5} and query_ids == {6, 7, 8, 9, 10}
    assert sum(n.startswith("-1_") for n in names["bounding_box_test"]) == 3
    assert sum(n.startswith("0000_") for n in names["bounding_box_test"]) == 4

    ds = Market1501(tmp_path)
    assert isinstance(returned, ReIDDataset) and returned.name == "synthetic"
    assert [(r.path, r.pid, r.camid) for r in returned.gallery] == [(r.path, r.pid, r.camid) for r in ds.gallery]
    assert {r.pid for r in ds.train} == {0, 1, 2, 3, 4} and ds.num_train_cams == 3
    assert sum(r.pid == 0 for r in ds.gallery) == 4 and all(r.pid != -1 for r in ds.gallery)
    # One query per (identity, camera); its other 2 images of that camera are in the gallery.
    query_pairs = Counter((r.pid, r.camid) for r in ds.query)
    assert set(query_pairs.values()) == {1}
    assert Counter((r.pid, r.camid) for r in ds.gallery if r.pid > 0) == {pair: 2 for pair in query_pairs}
    # Every identity is seen by >= 2 cameras, so every query has a cross-camera match.
    for q in ds.query:
        assert any(g.pid == q.pid and g.camid != q.camid for g in ds.gallery)
    with Image.open(ds.query[0].path) as image:
        assert image.size == (32, 64) and image.mode == "RGB"


def test_identities_per_split_as_requested(tmp_path: Path) -> None:
    ds = generate_synthetic(tmp_path, num_ids=8, num_train_ids=3, num_cams=4, img_size=(32, 16), seed=1,
                            num_distractors=0, num_junk=0)
    assert ds.num_train_pids == 3 and {r.pid for r in ds.query} == {4, 5, 6, 7, 8}
    assert {r.pid for r in ds.gallery} == {4, 5, 6, 7, 8}
    assert len(ds.train) == 2 * len({(Path(r.path).name[:4], r.camid) for r in ds.train})


def corner_means(ds: ReIDDataset) -> np.ndarray:
    """Mean RGB of the top-left corner (background: the person stands in the middle), ``(N, 3)``."""
    return np.stack([np.asarray(Image.open(r.path), np.float32)[:10, :6].reshape(-1, 3).mean(0) for r in ds.train])


def test_domains_differ_in_background(tmp_path: Path) -> None:
    market = corner_means(generate_synthetic(tmp_path / "m", domain="market", seed=0, **SMALL))
    duke = corner_means(generate_synthetic(tmp_path / "d", domain="duke", seed=0, **SMALL))
    # market: bright and warm; duke: dim and cool.
    assert market.mean() - duke.mean() > 60
    warm = lambda rgb: float((rgb[:, 0] - rgb[:, 2]).mean())  # noqa: E731
    assert warm(market) > 20 and warm(duke) < 0


@pytest.mark.parametrize("domain", sorted(DOMAINS))
def test_cameras_cover_the_domains_background_kinds(domain: str) -> None:
    style = DOMAINS[domain]
    kinds = set(style.backgrounds)
    for seed in range(5):
        six = [cam.background for cam in domain_cameras([seed, 0], style, 6)]
        assert set(six) == kinds  # every kind shows with as many cameras as kinds or more
        few = [cam.background for cam in domain_cameras([seed, 0], style, 3)]
        assert len(set(few)) == 3  # fewer cameras: all different
        assert few == six[:3]  # adding cameras keeps the first ones


def band_features(ds_records: list, bands: int) -> np.ndarray:
    """Mean colour of ``bands`` horizontal bands of the central third (``bands=0``: whole image), normalised."""
    feats = []
    for r in ds_records:
        a = np.asarray(Image.open(r.path), np.float32) / 255
        if bands == 0:
            feats.append(a.reshape(-1, 3).mean(0))
        else:
            centre = a[:, a.shape[1] // 3: 2 * a.shape[1] // 3]
            feats.append(np.concatenate([b.reshape(-1, 3).mean(0) for b in np.array_split(centre, bands)]))
    f = np.stack(feats)
    f -= f.mean(0)
    return f / np.linalg.norm(f, axis=1, keepdims=True)


def rank1(ds: ReIDDataset, bands: int) -> float:
    q, g = band_features(ds.query, bands), band_features(ds.gallery, bands)
    hits = []
    for i, query in enumerate(ds.query):
        keep = [j for j, x in enumerate(ds.gallery) if not (x.pid == query.pid and x.camid == query.camid)]
        best = keep[int(np.argmax(g[keep] @ q[i]))]
        hits.append(ds.gallery[best].pid == query.pid)
    return float(np.mean(hits))


def test_identity_lives_in_parts_not_in_the_global_colour(tmp_path: Path) -> None:
    ds = generate_synthetic(tmp_path, num_ids=40, num_cams=4, img_size=(64, 32), seed=0)
    chance = 1 / 20
    # Cross-camera rank-1 of hand-made features: per-band colours find the person,
    # the whole-image mean colour (dominated by the camera) does not beat chance.
    assert rank1(ds, bands=8) > 8 * chance
    assert rank1(ds, bands=0) <= 2 * chance


def test_bad_arguments_and_overwrite(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="unknown synthetic domain 'mars'.*market"):
        generate_synthetic(tmp_path, domain="mars")
    with pytest.raises(ConfigError, match="images_per_cam must be >= 2"):
        generate_synthetic(tmp_path, images_per_cam=1)
    with pytest.raises(ConfigError, match="num_cams must be >= 2"):
        generate_synthetic(tmp_path, num_cams=1)
    generate_synthetic(tmp_path, seed=0, **SMALL)
    with pytest.raises(DatasetError, match="already holds a data set"):
        generate_synthetic(tmp_path, seed=0, **SMALL)
    small = generate_synthetic(tmp_path, seed=0, overwrite=True, **{**SMALL, "num_ids": 4})
    assert small.num_train_pids == 2 and {r.pid for r in build_dataset("synthetic", tmp_path).query} == {3, 4}


def test_synth_command(tmp_path: Path, capsys) -> None:
    parser = argparse.ArgumentParser()
    synth_command.add_arguments(parser)
    args = parser.parse_args([str(tmp_path / "out"), "--ids", "6", "--cams", "2", "--seed", "5", "--domain", "duke",
                              "--images-per-cam", "2", "--size", "32x16"])
    assert synth_command.run(args) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("synthetic") and lines[2].split()[:2] == ["train", "3"]
    with Image.open(next((tmp_path / "out" / "query").iterdir())) as image:
        assert image.size == (16, 32)
    with pytest.raises(SystemExit):
        parser.parse_args([str(tmp_path), "--size", "32"])
