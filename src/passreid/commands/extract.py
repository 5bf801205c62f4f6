"""``passreid extract``: features of one split to an ``.npz`` (features, pids, camids, paths)."""

from __future__ import annotations

import argparse

from passreid.commands._common import (
    add_model_data_arguments,
    check_output_path,
    extraction_kwargs,
    load_model_and_data,
)

NAME = "extract"
HELP = "extract L2-normalised features of a data set split to an .npz file"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_data_arguments(parser)
    parser.add_argument("--split", choices=("query", "gallery", "train"), required=True)
    parser.add_argument("--out", metavar="F.npz", required=True)


def run(args: argparse.Namespace) -> int:
    from passreid.features import extract_features

    check_output_path(args.out, "--out")  # before the slow work that fills it
    model, dataset, img_size, device = load_model_and_data(args, splits=(args.split,))
    records = getattr(dataset, args.split)
    features = extract_features(model, records, **extraction_kwargs(args, img_size, device))
    features.save(args.out)
    print(f"wrote {len(features)} x {features.features.shape[1]} features of {args.split} to {args.out}")
    return 0
