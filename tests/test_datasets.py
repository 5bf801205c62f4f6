"""Loaders of the published layouts, CSV and image folders; image reading (passreid.data.datasets / images)."""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from passreid.data import datasets as ds_module
from passreid.data import (
    CSVDataset,
    CUHK03NP,
    DukeMTMC,
    ImageDataset,
    ImageFolderDataset,
    ImageRecord,
    Market1501,
    MSMT17,
    build_dataset,
    dataset_fingerprint,
    list_datasets,
    read_image,
    relabel,
)
from passreid.errors import DatasetError


def write_image(path: Path, color: tuple[int, int, int] = (200, 30, 40), size: tuple[int, int] = (4, 8)) -> Path:
    """A tiny real image (``size`` is PIL's (W, H)); the format follows the suffix."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path)
    return path


def by_name(records: list[ImageRecord]) -> dict[str, tuple[int, int]]:
    return {Path(r.path).name: (r.pid, r.camid) for r in records}


# --------------------------------------------------------------------------- Market-1501 and friends

MARKET = {
    "bounding_box_train": ["0002_c1s1_000451_03.jpg", "0002_c2s1_000551_01.jpg", "0007_c1s2_001000_01.jpg",
                           "0010_c6s4_002000_02.jpg", "0000_c1s1_000001_01.jpg", "-1_c3s1_000002_01.jpg"],
    "query": ["0003_c1s1_000100_00.jpg", "0005_c3s1_000200_00.jpg"],
    "bounding_box_test": ["0003_c2s1_000300_01.jpg", "0005_c4s2_000400_02.jpg", "0000_c1s1_000500_01.jpg",
                          "-1_c1s1_000401_03.jpg", "-1_c5s3_000600_01.jpg"],
}


def make_layout(root: Path, files: dict[str, list[str]]) -> Path:
    for folder, names in files.items():
        (root / folder).mkdir(parents=True, exist_ok=True)
        for name in names:
            write_image(root / folder / name)
    return root


@pytest.fixture
def market(tmp_path: Path) -> Path:
    root = make_layout(tmp_path / "Market-1501-v15.09.15", MARKET)
    (root / "bounding_box_train" / "Thumbs.db").write_bytes(b"\x00junk")  # shipped with the real archive
    return root


def test_market_identities_cameras_junk_and_distractors(market: Path) -> None:
    ds = Market1501(market)
    # Train: ids 2, 7, 10 relabelled 0, 1, 2 in sorted order; -1 and 0000 dropped; cameras 0-based.
    assert by_name(ds.train) == {"0002_c1s1_000451_03.jpg": (0, 0), "0002_c2s1_000551_01.jpg": (0, 1),
                                 "0007_c1s2_001000_01.jpg": (1, 0), "0010_c6s4_002000_02.jpg": (2, 5)}
    assert by_name(ds.query) == {"0003_c1s1_000100_00.jpg": (3, 0), "0005_c3s1_000200_00.jpg": (5, 2)}
    # Gallery keeps the original ids and the distractor 0000, drops the junk -1.
    assert by_name(ds.gallery) == {"0003_c2s1_000300_01.jpg": (3, 1), "0005_c4s2_000400_02.jpg": (5, 3),
                                   "0000_c1s1_000500_01.jpg": (0, 0)}
    assert (ds.num_train_pids, ds.num_train_cams) == (3, 3)
    assert all(Path(r.path).is_file() for r in ds.train + ds.query + ds.gallery)


def test_relabel_follows_sorted_original_ids() -> None:
    # {16, 9, 3} iterates as 16, 9, 3 in a Python set: only sorting gives 3 -> 0, 9 -> 1, 16 -> 2.
    records = [ImageRecord(f"{i}.jpg", pid, 0) for i, pid in enumerate([16, 9, 16, 3])]
    assert [r.pid for r in relabel(records)] == [2, 1, 2, 0]
    assert [r.path for r in relabel(records)] == ["0.jpg", "1.jpg", "2.jpg", "3.jpg"]


def test_summary_table(market: Path) -> None:
    lines = Market1501(market).summary().splitlines()
    assert lines[0].startswith("market1501 (custom)")
    assert lines[2].split() == ["train", "3", "4", "3"]
    assert lines[3].split() == ["query", "2", "2", "2"]
    assert lines[4].split() == ["gallery", "3", "3", "3"]


def test_published_count_mismatch_warns_and_loads_as_custom(market: Path, caplog) -> None:
    with caplog.at_level(logging.WARNING, logger="passreid.data.datasets"):
        ds = Market1501(market)
    assert ds.version == "custom"
    assert "loaded as a custom set" in caplog.text and "train 4 images/3 ids (published 12936/751)" in caplog.text


def test_published_counts_match_gives_the_release(market: Path, caplog, monkeypatch) -> None:
    fixture_counts = {"train": (4, 3), "query": (2, 2), "gallery": (3, 3)}
    monkeypatch.setitem(ds_module.PUBLISHED_COUNTS, "Market-1501", fixture_counts)
    with caplog.at_level(logging.WARNING):
        ds = Market1501(market)
    assert ds.version == "Market-1501"
    assert "custom" not in caplog.text


def test_dukemtmc_names(tmp_path: Path) -> None:
    root = make_layout(tmp_path / "DukeMTMC-reID", {
        "bounding_box_train": ["0005_c2_f0046985.jpg", "0005_c5_f0051781.jpg", "0001_c1_f0000010.jpg"],
        "query": ["0009_c8_f0123456.jpg"],
        "bounding_box_test": ["0009_c3_f0000001.jpg", "7000_c1_f0000002.jpg"],
    })
    ds = build_dataset("dukemtmc", root)
    assert by_name(ds.train) == {"0005_c2_f0046985.jpg": (1, 1), "0005_c5_f0051781.jpg": (1, 4),
                                 "0001_c1_f0000010.jpg": (0, 0)}
    assert by_name(ds.query) == {"0009_c8_f0123456.jpg": (9, 7)}
    assert by_name(ds.gallery) == {"0009_c3_f0000001.jpg": (9, 2), "7000_c1_f0000002.jpg": (7000, 0)}
    assert isinstance(ds, DukeMTMC) and ds.version == "custom"


def test_market_loader_rejects_duke_names(tmp_path: Path) -> None:
    root = make_layout(tmp_path / "m", {"bounding_box_train": ["0005_c2_f0046985.jpg"], "query": [],
                                        "bounding_box_test": []})
    with pytest.raises(DatasetError, match="0005_c2_f0046985.jpg"):
        Market1501(root)


@pytest.fixture
def cuhk(tmp_path: Path) -> Path:
    root = tmp_path / "cuhk03-np"
    for variant, train_id in (("labeled", 1), ("detected", 2)):
        make_layout(root / variant, {
            "bounding_box_train": [f"{train_id:04d}_c1_1.png", f"{train_id:04d}_c2_5.png"],
            "query": ["0100_c1_3.png"],
            "bounding_box_test": ["0100_c2_4.png"],
        })
    return root


def test_cuhk03np_variants_and_subfolder(cuhk: Path) -> None:
    labeled = CUHK03NP(cuhk)
    detected = build_dataset("cuhk03np", cuhk, variant="detected")
    assert labeled.variant == "labeled" and Path(labeled.train[0].path).parent.parent.name == "labeled"
    assert detected.variant == "detected" and Path(detected.train[0].path).parent.parent.name == "detected"
    assert by_name(labeled.train) == {"0001_c1_1.png": (0, 0), "0001_c2_5.png": (0, 1)}
    assert by_name(detected.query) == {"0100_c1_3.png": (100, 0)}
    pointed = CUHK03NP(cuhk / "detected")  # the subfolder itself: its name decides the variant
    assert pointed.variant == "detected" and by_name(pointed.train) == by_name(detected.train)
    with pytest.raises(DatasetError, match="variant 'both'"):
        CUHK03NP(cuhk, variant="both")


# --------------------------------------------------------------------------- MSMT17

MSMT_TRAIN = ["0000/0000_000_01_0303morning_0015_0.jpg 0", "0000/0000_001_05_0303morning_0016_1.jpg 0",
              "0001/0001_000_15_0303noon_0100_0.jpg 1"]
MSMT_VAL = ["0002/0002_000_03_0303afternoon_0200_0.jpg 2"]
MSMT_QUERY = ["0000/0000_000_02_0303morning_0500_0.jpg 0", "0001/0001_000_07_0303noon_0600_0.jpg 1"]
MSMT_GALLERY = ["0000/0000_001_04_0303morning_0700_0.jpg 0", "0001/0001_001_09_0303noon_0800_0.jpg 1",
                "0001/0001_002_10_0303noon_0900_0.jpg 1"]


def make_msmt(root: Path, version: str) -> Path:
    train_dir, test_dir = ("train", "test") if version == "V1" else ("mask_train_v2", "mask_test_v2")
    for list_name, lines, folder in (("list_train.txt", MSMT_TRAIN, train_dir), ("list_val.txt", MSMT_VAL, train_dir),
                                     ("list_query.txt", MSMT_QUERY, test_dir),
                                     ("list_gallery.txt", MSMT_GALLERY, test_dir)):
        for line in lines:
            write_image(root / folder / line.split()[0])
        root.mkdir(parents=True, exist_ok=True)
        (root / list_name).write_text("\n".join(lines) + "\n")
    return root


@pytest.mark.parametrize("version", ["V1", "V2"])
def test_msmt17_layouts(tmp_path: Path, version: str, caplog) -> None:
    root = make_msmt(tmp_path / f"MSMT17_{version}", version)
    with caplog.at_level(logging.INFO, logger="passreid.data.datasets"):
        ds = MSMT17(root)
    assert ds.layout == f"MSMT17_{version}"
    assert f"MSMT17_{version} layout" in caplog.text
    assert ds.version == "custom" and "loaded as a custom set" in caplog.text
    # train = train + val (4 images, ids 0, 1, 2); camera = third "_" field, 1-based -> 0-based.
    assert by_name(ds.train) == {
        "0000_000_01_0303morning_0015_0.jpg": (0, 0), "0000_001_05_0303morning_0016_1.jpg": (0, 4),
        "0001_000_15_0303noon_0100_0.jpg": (1, 14), "0002_000_03_0303afternoon_0200_0.jpg": (2, 2),
    }
    # Identity 0 is a real person in MSMT17: it stays in query and gallery.
    assert by_name(ds.query) == {
        "0000_000_02_0303morning_0500_0.jpg": (0, 1), "0001_000_07_0303noon_0600_0.jpg": (1, 6),
    }
    assert sorted(by_name(ds.gallery).values()) == [(0, 3), (1, 8), (1, 9)]
    folder = "train" if version == "V1" else "mask_train_v2"
    assert all(Path(r.path).parts[-3] == folder for r in ds.train)


def test_msmt17_published_counts_report_the_version(tmp_path: Path, monkeypatch, caplog) -> None:
    root = make_msmt(tmp_path / "MSMT17_V2", "V2")
    monkeypatch.setitem(ds_module.PUBLISHED_COUNTS, "MSMT17",
                        {"train": (4, 3), "query": (2, 2), "gallery": (3, 2)})
    with caplog.at_level(logging.WARNING):
        ds = build_dataset("msmt17", tmp_path)  # the folder above the archive is accepted too
    assert ds.version == "MSMT17_V2" and "custom" not in caplog.text


def test_msmt17_errors(tmp_path: Path) -> None:
    root = make_msmt(tmp_path / "msmt", "V1")
    (root / "test" / "0001" / "0001_002_10_0303noon_0900_0.jpg").unlink()
    with pytest.raises(DatasetError, match=r"list_gallery.txt:3: image not found: .*0001_002_10_0303noon_0900_0.jpg"):
        MSMT17(root)
    (root / "list_gallery.txt").write_text("0000/0000_001_04_0303morning_0700_0.jpg zero\n")
    with pytest.raises(DatasetError, match=r"list_gallery.txt:1: expected 'relative/path.jpg pid'"):
        MSMT17(root)
    (root / "list_gallery.txt").unlink()
    with pytest.raises(DatasetError, match="list file not found: .*list_gallery.txt"):
        MSMT17(root)
    (root / "test").rename(root / "elsewhere")
    with pytest.raises(DatasetError, match="MSMT17 image folders not found in .*msmt"):
        MSMT17(root)


# --------------------------------------------------------------------------- layout errors


def test_missing_root_and_split_folder(market: Path) -> None:
    with pytest.raises(DatasetError, match="data set root not found: .*nowhere"):
        Market1501(market.parent / "nowhere")
    (market / "query").rename(market / "queries")
    with pytest.raises(DatasetError, match=r"query folder not found: .*query"):
        Market1501(market)


def test_unparsable_name_empty_split_and_junk_only_split(market: Path) -> None:
    write_image(market / "query" / "person.jpg")
    with pytest.raises(DatasetError, match=r"cannot parse .*query.person\.jpg"):
        Market1501(market)
    for f in (market / "query").iterdir():
        f.unlink()
    with pytest.raises(DatasetError, match=r"query folder .*query holds no images"):
        Market1501(market)
    write_image(market / "query" / "-1_c1s1_000001_01.jpg")
    write_image(market / "query" / "0000_c2s1_000001_01.jpg")
    with pytest.raises(DatasetError, match=r"query folder .*query holds only junk"):
        Market1501(market)


def test_unknown_dataset_lists_the_names(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="unknown data set 'market'") as info:
        build_dataset("market", tmp_path)
    for name in ("market1501", "dukemtmc", "cuhk03np", "msmt17", "csv", "imagefolder", "synthetic"):
        assert name in str(info.value)
    assert list_datasets() == sorted(["market1501", "dukemtmc", "cuhk03np", "msmt17", "csv", "imagefolder",
                                      "synthetic"])


# --------------------------------------------------------------------------- CSV


def test_csv_with_camid(tmp_path: Path) -> None:
    for name in ("a.jpg", "b.jpg", "c.jpg", "d.jpg"):
        write_image(tmp_path / "img" / name)
    absolute = tmp_path / "img" / "d.jpg"
    (tmp_path / "set.csv").write_text(
        "path,pid,camid,split\nimg/a.jpg,42,0,train\nimg/b.jpg,17,1,train\n"
        f"img/c.jpg,5,2,query\n{absolute},5,3,gallery\n"
    )
    ds = build_dataset("csv", tmp_path / "set.csv")
    assert by_name(ds.train) == {"a.jpg": (1, 0), "b.jpg": (0, 1)}  # 17 -> 0, 42 -> 1
    assert by_name(ds.query) == {"c.jpg": (5, 2)} and by_name(ds.gallery) == {"d.jpg": (5, 3)}
    assert ds.train[0].path == str(tmp_path / "img" / "a.jpg")


def test_csv_without_camid_removes_only_the_same_image(tmp_path: Path) -> None:
    for name in ("t1.jpg", "t2.jpg", "q1.jpg", "g1.jpg", "g2.jpg"):
        write_image(tmp_path / name)
    (tmp_path / "set.csv").write_text(
        "split,pid,path\ntrain,1,t1.jpg\ntrain,1,t2.jpg\nquery,7,q1.jpg\n"
        "gallery,7,q1.jpg\ngallery,7,g1.jpg\ngallery,8,g2.jpg\n"
    )
    ds = CSVDataset(tmp_path / "set.csv")
    # DESIGN §6 removes gallery items with the same id and camera as the query:
    # with one camera per distinct image that is exactly the query image itself.
    for q in ds.query:
        removed = [g.path for g in ds.gallery if g.pid == q.pid and g.camid == q.camid]
        assert removed == [q.path]
    assert len({r.camid for r in ds.train}) == 2 and {r.pid for r in ds.train} == {0}


@pytest.mark.parametrize("content, message", [
    ("file,pid,split\na.jpg,1,train\n", r"set.csv lacks column\(s\) path"),
    ("path,pid,split\na.jpg,1,train\na.jpg,1,val\n", r"set.csv:3: split 'val' is not one of"),
    ("path,pid,split\na.jpg,one,train\n", r"set.csv:2: pid 'one'"),
    ("path,pid,camid,split\na.jpg,1,x,train\n", r"set.csv:2: camid 'x'"),
    ("path,pid,split\nmissing.jpg,1,train\n", r"set.csv:2: image not found: .*missing.jpg"),
    ("path,pid,split\na.jpg,1,train\na.jpg,2,query\n", r"set.csv has no rows for split\(s\) gallery"),
])
def test_csv_errors_name_file_and_line(tmp_path: Path, content: str, message: str) -> None:
    write_image(tmp_path / "a.jpg")
    (tmp_path / "set.csv").write_text(content)
    with pytest.raises(DatasetError, match=message):
        CSVDataset(tmp_path / "set.csv")


def test_csv_missing_file(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="CSV file not found: .*none.csv"):
        build_dataset("csv", tmp_path / "none.csv")


# --------------------------------------------------------------------------- image folder


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    root = tmp_path / "lup"
    for rel in ("b/2.jpg", "a/1.png", "a/sub/3.JPEG", "c.webp", "0.bmp", ".hidden/x.jpg"):
        write_image(root / rel, size=(2, 2))
    (root / "a" / "._1.png").write_bytes(b"resource fork")
    (root / "a" / "notes.txt").write_text("not an image")
    return root


def relative(ds: ImageFolderDataset) -> list[str]:
    return [Path(r.path).relative_to(ds.root).as_posix() for r in ds.records]


def test_image_folder_lists_recursively_sorted_unlabeled(folder: Path) -> None:
    ds = build_dataset("imagefolder", folder)
    assert relative(ds) == ["0.bmp", "a/1.png", "a/sub/3.JPEG", "b/2.jpg", "c.webp"]
    assert all(r.pid == -1 and r.camid == -1 for r in ds.records) and ds.train is ds.records
    assert ds.query == [] and ds.gallery == [] and ds.num_train_pids == 0


def test_image_folder_index_is_written_once_and_reused(folder: Path, tmp_path: Path) -> None:
    index = tmp_path / "cache" / "index.txt"
    first = ImageFolderDataset(folder, index_file=index)
    assert index.read_text().splitlines() == relative(first)
    write_image(folder / "d" / "new.jpg")
    reused = ImageFolderDataset(folder, index_file=index)
    assert relative(reused) == relative(first)  # the folder was not listed again
    assert "d/new.jpg" in relative(ImageFolderDataset(folder))


def test_image_folder_limit_and_filter(folder: Path, tmp_path: Path, caplog) -> None:
    assert relative(ImageFolderDataset(folder, limit=2)) == ["0.bmp", "a/1.png"]
    keep = tmp_path / "keep.txt"
    keep.write_text("c.webp\na/sub/3.JPEG\n\nnot/there.jpg\n")
    with caplog.at_level(logging.WARNING):
        ds = ImageFolderDataset(folder, filter_list=keep)
    assert relative(ds) == ["a/sub/3.JPEG", "c.webp"]
    assert "1 of the 3 paths" in caplog.text
    assert relative(ImageFolderDataset(folder, filter_list=keep, limit=1)) == ["a/sub/3.JPEG"]


def test_image_folder_errors(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="image folder not found: .*absent"):
        ImageFolderDataset(tmp_path / "absent")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="no images .* under .*empty"):
        ImageFolderDataset(tmp_path / "empty")
    write_image(tmp_path / "one" / "x.jpg")
    with pytest.raises(DatasetError, match="limit must be a positive"):
        ImageFolderDataset(tmp_path / "one", limit=0)
    (tmp_path / "keep.txt").write_text("y.jpg\n")
    with pytest.raises(DatasetError, match="none of the paths in .*keep.txt"):
        ImageFolderDataset(tmp_path / "one", filter_list=tmp_path / "keep.txt")


# --------------------------------------------------------------------------- fingerprint


def test_fingerprint_is_relative_sorted_and_sensitive(tmp_path: Path) -> None:
    def records(root: Path, names: list[str]) -> list[ImageRecord]:
        return [ImageRecord(str(root / n), 1, 0) for n in names]

    fp = dataset_fingerprint(records(tmp_path / "x", ["b/2.jpg", "a/1.jpg"]))
    expected = hashlib.sha1(b"a/1.jpg\nb/2.jpg").hexdigest()
    assert fp == {"num_images": 2, "list_sha1": expected}
    # Same files under another mount point, in another order: same fingerprint.
    assert dataset_fingerprint(records(tmp_path / "elsewhere" / "y", ["a/1.jpg", "b/2.jpg"])) == fp
    assert dataset_fingerprint(records(tmp_path / "x", ["a/1.jpg", "b/2.jpg", "b/3.jpg"]))["list_sha1"] != expected
    explicit = dataset_fingerprint(records(tmp_path / "x", ["a/1.jpg"]), root=tmp_path)
    assert explicit["list_sha1"] == hashlib.sha1(b"x/a/1.jpg").hexdigest()


# --------------------------------------------------------------------------- images


@pytest.fixture
def bad_files(tmp_path: Path) -> dict[str, Path]:
    good = write_image(tmp_path / "good.jpg", size=(16, 32))
    truncated = tmp_path / "truncated.jpg"
    truncated.write_bytes(good.read_bytes()[: len(good.read_bytes()) // 2])
    empty = tmp_path / "empty.jpg"
    empty.write_bytes(b"")
    text = tmp_path / "text.png"
    text.write_text("this is not a png")
    return {"truncated": truncated, "empty": empty, "text": text, "missing": tmp_path / "missing.jpg"}


def test_read_image_rgb(tmp_path: Path) -> None:
    gray = tmp_path / "gray.png"
    Image.new("L", (6, 12), 77).save(gray)
    image = read_image(gray)
    assert image.mode == "RGB" and image.size == (6, 12) and image.getpixel((0, 0)) == (77, 77, 77)


@pytest.mark.parametrize("kind, message", [("truncated", "truncated"), ("empty", "empty"),
                                           ("text", "not an image"), ("missing", "not found")])
def test_read_image_errors_name_the_file(bad_files: dict[str, Path], kind: str, message: str) -> None:
    with pytest.raises(DatasetError, match=message) as info:
        read_image(bad_files[kind])
    assert str(bad_files[kind]) in str(info.value)


def test_image_dataset_items(tmp_path: Path) -> None:
    records = [ImageRecord(str(write_image(tmp_path / f"{i}.png", (10 * i, 0, 0))), i, 5 - i) for i in range(3)]
    plain = ImageDataset(records)
    image, pid, camid, index = plain[2]
    assert isinstance(image, Image.Image) and image.getpixel((0, 0)) == (20, 0, 0) and (pid, camid, index) == (2, 3, 2)
    tensors = ImageDataset(records, transform=lambda im: torch.tensor(im.getpixel((0, 0))))
    assert tensors[1][0].tolist() == [10, 0, 0]
    assert len(plain) == 3 and plain.skipped_paths() == []


def test_image_dataset_raises_on_a_bad_file_by_default(tmp_path: Path, bad_files: dict[str, Path]) -> None:
    ds = ImageDataset([ImageRecord(str(bad_files["truncated"]), 0, 0)])
    with pytest.raises(DatasetError, match="truncated.jpg"):
        ds[0]


def test_skip_corrupt_replaces_and_counts(tmp_path: Path, bad_files: dict[str, Path], caplog) -> None:
    good = [write_image(tmp_path / f"ok{i}.jpg") for i in range(2)]
    paths = [good[0], bad_files["truncated"], bad_files["empty"], good[1], bad_files["text"]]
    ds = ImageDataset([ImageRecord(str(p), i, 0) for i, p in enumerate(paths)], skip_corrupt=True)
    with caplog.at_level(logging.WARNING, logger="passreid.data.images"):
        assert ds[1][1:] == (3, 0, 3)  # bad 1 and 2 are replaced by the next readable record, 3
        assert ds[2][1:] == (3, 0, 3)
        assert ds[4][1:] == (0, 0, 0)  # wraps around to the start
    assert ds.skipped_paths() == [str(paths[1]), str(paths[2]), str(paths[4])]
    assert "skipping a bad image" in caplog.text and "truncated.jpg" in caplog.text


def test_skip_corrupt_counts_files_skipped_in_workers(tmp_path: Path, bad_files: dict[str, Path]) -> None:
    good = write_image(tmp_path / "ok.jpg")
    paths = [good, bad_files["text"], good, good]
    ds = ImageDataset([ImageRecord(str(p), i, 0) for i, p in enumerate(paths)],
                      transform=lambda im: torch.zeros(1), skip_corrupt=True)
    batches = list(DataLoader(ds, batch_size=2, num_workers=1))
    assert torch.cat([b[3] for b in batches]).tolist() == [0, 2, 2, 3]
    assert ds.skipped_paths() == [str(bad_files["text"])]


def test_skip_corrupt_with_nothing_readable(bad_files: dict[str, Path]) -> None:
    ds = ImageDataset([ImageRecord(str(bad_files[k]), 0, 0) for k in ("empty", "text")], skip_corrupt=True)
    with pytest.raises(DatasetError, match="none of the 2 images is readable"):
        ds[0]
