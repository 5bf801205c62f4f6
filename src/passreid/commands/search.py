"""``passreid search``: index a folder or a data set split once, then find people in it.

    passreid search index --checkpoint CKPT --folder DIR --index gallery.npz
    passreid search index --checkpoint CKPT --dataset market1501 --root DIR --split gallery --index gallery.npz
    passreid search query --checkpoint CKPT --index gallery.npz person.jpg -k 10 --picture ranked.png

Indexing into an existing file extracts and adds only the images it does not
hold yet, so a growing folder is updated, not re-indexed. An index records the
fingerprint of the model that built it: indexing into it or querying it with
another model is refused, naming both (mixed features cannot be compared).

``search query`` shows each result's cosine and, as its score, the cosine's
standard score among the query's cosines with the whole gallery (see
:meth:`passreid.search.Gallery.relative_scores`): same ranking, readable numbers.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

from passreid.commands._common import add_progress_argument, non_negative_int, positive_int

NAME = "search"
HELP = "index a folder or data set split with a model, then query it with images (top-k + ranked-list picture)"

_CHUNK = 10_000
"""Images extracted per progress step while indexing."""


def _add_model_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", metavar="CKPT", required=True, help="any supported checkpoint")
    parser.add_argument("--index", metavar="IDX.npz", required=True, help="the gallery index file")
    parser.add_argument("--batch-size", type=positive_int, default=128)
    parser.add_argument("--num-workers", type=non_negative_int, default=2)
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda (feature extraction)")
    add_progress_argument(parser)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="search_command", metavar="{index,query}", required=True)

    index = sub.add_parser("index", help="extract and index gallery images (adds only new ones to an existing index)")
    _add_model_arguments(index)
    source = index.add_argument_group("images (a folder, or a data set split)")
    source.add_argument("--folder", metavar="DIR", help="every image under DIR, recursively")
    source.add_argument("--dataset", metavar="NAME", help="market1501, msmt17, dukemtmc, cuhk03np, csv or synthetic")
    source.add_argument("--root", metavar="DIR", help="data set folder (the CSV file for csv)")
    source.add_argument("--split", choices=("gallery", "query", "train"), default="gallery")
    index.add_argument("--flip", action="store_true", help="average each image's feature with its mirror's")
    index.add_argument("--skip-corrupt", action="store_true",
                       help="leave out unreadable images (empty, truncated, not an image), listing them, "
                            "instead of stopping at the first")
    index.add_argument("--index-type", choices=("auto", "flat", "ivf"), default="auto",
                       help="flat (exact) or ivf (approximate, for > 1M images); auto picks by size "
                            "when the index is created")
    index.add_argument("--nlist", type=int, help="IVF lists (default about 4 sqrt(N))")
    index.add_argument("--nprobe", type=int, default=16, help="IVF lists scanned per query")

    query = sub.add_parser("query", help="top-k gallery images for a query image or a folder of them")
    _add_model_arguments(query)
    query.add_argument("query", metavar="IMAGE_OR_DIR", help="a query image, or a folder of query images")
    query.add_argument("-k", type=positive_int, default=10, help="results per query")
    query.add_argument("--picture", metavar="OUT.png",
                       help="write the ranked list as a picture (one per query: OUT_<name>.png for a folder)")


def run(args: argparse.Namespace) -> int:
    if args.search_command == "index":
        return _run_index(args)
    return _run_query(args)


def _source_records(args: argparse.Namespace) -> list[Any]:
    """The image records to index, with absolute paths (so an index is the same from any folder)."""
    from passreid.data.datasets import ImageFolderDataset, ImageRecord, build_dataset
    from passreid.errors import ConfigError

    if bool(args.folder) == bool(args.dataset or args.root):
        raise ConfigError("give either --folder DIR or --dataset NAME --root DIR [--split S]")
    if args.folder:
        records = ImageFolderDataset(args.folder).records
    else:
        if not (args.dataset and args.root):
            raise ConfigError("--dataset and --root go together")
        records = getattr(build_dataset(args.dataset, args.root), args.split)
    return [ImageRecord(os.path.abspath(r.path), r.pid, r.camid) for r in records]


def _run_index(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from passreid.api import load
    from passreid.commands._common import progress_wanted
    from passreid.errors import ConfigError
    from passreid.search import IVF_THRESHOLD, Gallery

    index_path = Path(args.index)
    records = _source_records(args)
    pipeline = load(args.checkpoint, device=args.device)
    fingerprint = pipeline.fingerprint()
    if index_path.exists():
        gallery = Gallery.load(index_path)
        gallery.require_model(fingerprint, args.checkpoint, where=str(index_path))
        if gallery.meta.get("flip", args.flip) != args.flip:
            raise ConfigError(f"{index_path} was built with flip={gallery.meta['flip']}; index with the same setting")
    else:
        kind = args.index_type
        if kind == "auto":
            kind = "ivf" if len(records) > IVF_THRESHOLD else "flat"
        gallery = Gallery(index=kind, nlist=args.nlist, nprobe=args.nprobe)
        gallery.meta = {"checkpoint": os.path.abspath(args.checkpoint), "flip": args.flip}
    gallery.meta.setdefault("model", fingerprint)  # an index from before fingerprints were recorded gets one
    missing = set(gallery.missing([r.path for r in records]))
    new = [r for r in records if r.path in missing]
    if not new:
        print(f"{index_path}: all {len(records)} images are indexed already ({len(gallery)} in total)")
        return 0
    gallery.meta["img_size"] = list(pipeline.img_size)
    skipped: list[str] = []
    with tqdm(total=len(new), desc="index", unit="img", disable=not progress_wanted(args)) as progress:
        for start in range(0, len(new), _CHUNK):
            chunk = new[start : start + _CHUNK]
            progress_step = len(chunk)
            if args.skip_corrupt:
                feats, chunk, bad = _extract_skipping_bad(pipeline, chunk, args)
                skipped.extend(bad)
            else:
                feats = pipeline.extract([r.path for r in chunk], batch_size=args.batch_size, flip=args.flip,
                                         num_workers=args.num_workers)
            if chunk:
                gallery.add(feats, [r.path for r in chunk], [r.pid for r in chunk], [r.camid for r in chunk])
            progress.update(progress_step)
    for path in skipped:
        print(f"skipped unreadable image: {path}")
    gallery.save(index_path)
    added = len(new) - len(skipped)
    print(f"{index_path}: added {added} images ({len(records) - len(new)} already there"
          f"{f', {len(skipped)} unreadable skipped' if skipped else ''}), "
          f"{len(gallery)} in total, {gallery.index_type} index, feature dim {gallery.dim}")
    return 0


def _extract_skipping_bad(pipeline: Any, chunk: list[Any], args: argparse.Namespace
                          ) -> tuple[Any, list[Any], list[str]]:
    """Features of the readable images of ``chunk``: ``(features, kept records, unreadable paths)``.

    The chunk is extracted in one go; only when that meets a bad image is every
    image of the chunk read once to find the bad ones, and the rest extracted again.
    """
    from passreid.data.images import read_image
    from passreid.errors import BadImageError

    def extract(records: list[Any]) -> Any:
        return pipeline.extract([r.path for r in records], batch_size=args.batch_size, flip=args.flip,
                                num_workers=args.num_workers)

    try:
        return extract(chunk), chunk, []
    except BadImageError:
        pass
    kept, bad = [], []
    for record in chunk:
        try:
            read_image(record.path)
        except BadImageError:
            bad.append(record.path)
        else:
            kept.append(record)
    return (extract(kept) if kept else None), kept, bad


def _query_paths(source: str) -> list[str]:
    from passreid.data.datasets import ImageFolderDataset
    from passreid.errors import DatasetError

    path = Path(source)
    if path.is_dir():
        return [r.path for r in ImageFolderDataset(path).records]
    if not path.is_file():
        raise DatasetError(f"query image or folder not found: {path}")
    return [str(path)]


def _run_query(args: argparse.Namespace) -> int:
    import numpy as np

    from passreid.api import load
    from passreid.search import Gallery
    from passreid.visualize import ranked_list_grid

    index_path = Path(args.index)
    gallery = Gallery.load(index_path)
    paths = _query_paths(args.query)
    pipeline = load(args.checkpoint, device=args.device)
    gallery.require_model(pipeline.fingerprint(), args.checkpoint, where=str(index_path))
    feats = pipeline.extract(paths, batch_size=args.batch_size, flip=bool(gallery.meta.get("flip", False)),
                             num_workers=args.num_workers)
    result = gallery.search(feats, k=args.k)
    relative = gallery.relative_scores(feats, result.scores)
    pids, camids = gallery.pids, gallery.camids
    print(f"score: the cosine's standard score among the query's cosines with all {len(gallery)} gallery images "
          "(about 0 for a typical one; ranks as the cosine)")
    for i, query in enumerate(paths):
        print(f"query {query}")
        print(f"{'rank':>4}  {'score':>6}  {'cosine':>7}  {'pid':>5}  {'cam':>3}  path")  # cameras 1-based, as in names
        valid = result.indices[i] >= 0
        rows = result.indices[i][valid].tolist()
        cosines = result.scores[i][valid].tolist()
        scores = relative[i][valid].tolist()
        for rank, (j, score, cosine) in enumerate(zip(rows, scores, cosines), start=1):
            cam = str(camids[j] + 1) if camids[j] >= 0 else "-"
            shown = f"{score:6.2f}" if np.isfinite(score) else f"{'-':>6}"
            print(f"{rank:>4}  {shown}  {cosine:7.5f}  {pids[j]:>5}  {cam:>3}  {result.paths[i][rank - 1]}")
        if args.picture:
            out = Path(args.picture)
            if len(paths) > 1:
                out = out.with_name(f"{out.stem}_{Path(query).stem}{out.suffix or '.png'}")
            finite = all(np.isfinite(scores))
            ranked_list_grid(query, result.paths[i], scores if finite else cosines, None, out=out, k=args.k,
                             label="score=" if finite else "cos=")
            print(f"picture: {out}")
    return 0
