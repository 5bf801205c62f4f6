"""``passreid eval``: mAP / CMC / mINP of a model on a data set, or of two feature files."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from passreid.commands._common import (
    add_model_data_arguments,
    check_output_path,
    extraction_kwargs,
    load_model_and_data,
)

NAME = "eval"
HELP = "evaluate a checkpoint on a data set (or query/gallery feature files): mAP, CMC, mINP"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_data_arguments(parser, required=False)
    feats = parser.add_argument_group("or precomputed features")
    feats.add_argument("--query-features", metavar="Q.npz")
    feats.add_argument("--gallery-features", metavar="G.npz")
    parser.add_argument("--rerank", action="store_true",
                        help="k-reciprocal re-ranking (k1 20, k2 6, lambda 0.3), ranked block by block of queries")
    parser.add_argument("--distance-precision", choices=("fp32", "bf16"), default="fp32",
                        help="bf16: faster distance product on GPUs, approximate ranks (not with --rerank)")
    parser.add_argument("--json", metavar="OUT", help="write the metrics JSON here")
    parser.add_argument("--plot", metavar="CMC.png", help="write the CMC curve as a PNG")


def run(args: argparse.Namespace) -> int:
    from passreid.runtime import resolve_device
    from passreid.errors import ConfigError
    from passreid.evaluation import format_metrics
    from passreid.features import FeatureSet, evaluate_features, extract_features

    use_features = args.query_features or args.gallery_features
    use_model = args.checkpoint or args.dataset or args.root
    if use_features and use_model:
        raise ConfigError("give either --checkpoint/--dataset/--root or --query-features/--gallery-features, not both")
    # output paths are checked before the slow work that fills them
    for flag, path in (("--json", args.json), ("--plot", args.plot)):
        if path:
            check_output_path(path, flag)
    if use_features:
        if not (args.query_features and args.gallery_features):
            raise ConfigError("--query-features and --gallery-features go together")
        query, gallery = FeatureSet.load(args.query_features), FeatureSet.load(args.gallery_features)
        device = resolve_device(args.device)
        source = {"query_features": str(args.query_features), "gallery_features": str(args.gallery_features)}
    else:
        if not (args.checkpoint and args.dataset and args.root):
            raise ConfigError("give --checkpoint, --dataset and --root (or --query-features and --gallery-features)")
        model, dataset, img_size, device = load_model_and_data(args, splits=("query", "gallery"))
        kwargs = extraction_kwargs(args, img_size, device)
        query = extract_features(model, dataset.query, **kwargs)
        gallery = extract_features(model, dataset.gallery, **kwargs)
        source = {"checkpoint": str(args.checkpoint), "dataset": args.dataset, "root": str(args.root),
                  "img_size": list(img_size), "flip": bool(args.flip)}
    metrics = evaluate_features(query, gallery, rerank=args.rerank, device=device,
                                precision=args.distance_precision)
    print(format_metrics(metrics))
    if args.json:
        record = {**metrics, **source, "rerank": bool(args.rerank)}
        Path(args.json).write_text(json.dumps(record, indent=2) + "\n")
    if args.plot:
        from passreid.visualize import plot_cmc

        print(f"wrote the CMC curve to {plot_cmc(metrics['cmc'], args.plot)}")
    return 0
