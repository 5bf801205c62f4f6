"""``passreid synth``: write a synthetic ReID set in the Market-1501 layout."""

from __future__ import annotations

import argparse
import re

NAME = "synth"
HELP = "write a synthetic person ReID set (Market-1501 layout) for demos, tests and UDA"


def _size(text: str) -> tuple[int, int]:
    match = re.fullmatch(r"(\d+)[xX](\d+)", text.strip())
    if match is None:
        raise argparse.ArgumentTypeError(f"size {text!r} is not HxW, e.g. 128x64")
    return int(match.group(1)), int(match.group(2))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("out", metavar="OUT", help="folder to write (bounding_box_train, bounding_box_test, query)")
    parser.add_argument("--ids", type=int, default=100, help="number of identities, half train and half test")
    parser.add_argument("--train-ids", type=int, help="number of training identities (default: half of --ids)")
    parser.add_argument("--cams", type=int, default=6, help="number of cameras")
    parser.add_argument("--seed", type=int, default=0, help="same seed, same bytes")
    parser.add_argument("--domain",
                        help="camera style family (backgrounds, light, colour cast), one of passreid.data.DOMAINS "
                             "(market, msmt, duke; default market); two domains give a UDA pair")
    parser.add_argument("--images-per-cam", type=int, default=2, help="images of an identity in each of its cameras")
    parser.add_argument("--size", type=_size, default=(128, 64), metavar="HxW", help="crop size, e.g. 256x128")
    parser.add_argument("--overwrite", action="store_true", help="replace a set already written to OUT")
    parser.add_argument("--pool", type=int, metavar="N",
                        help="instead of a labelled set, write N unlabeled crops for pretraining, LUPerson-like: "
                             "a new scene per image, each person in --images-per-person images, scenes from "
                             "every domain (or only --domain if given)")
    parser.add_argument("--images-per-person", type=int, default=4, help="with --pool: images of one person")
    parser.add_argument("--scenes", type=int, default=0, metavar="N",
                        help="with --pool: N cameras, each filming many people (as LUPerson's videos do), "
                             "instead of a new scene per image")
    parser.add_argument("--no-clutter", dest="clutter", action="store_false",
                        help="with --pool: one scene behind the whole image instead of a patchwork of scenes")


def run(args: argparse.Namespace) -> int:
    from passreid.data.synthetic import DOMAINS, generate_pool, generate_synthetic

    if args.pool is not None:
        paths = generate_pool(args.out, num_images=args.pool, seed=args.seed,
                              domains=[args.domain] if args.domain else list(DOMAINS), img_size=args.size,
                              images_per_person=args.images_per_person, overwrite=args.overwrite,
                              num_scenes=args.scenes, clutter=args.clutter)
        print(f"{len(paths)} unlabeled images in {args.out}")
        return 0
    dataset = generate_synthetic(
        args.out,
        num_ids=args.ids,
        num_cams=args.cams,
        seed=args.seed,
        domain=args.domain or "market",
        img_size=args.size,
        images_per_cam=args.images_per_cam,
        num_train_ids=args.train_ids,
        overwrite=args.overwrite,
    )
    print(dataset.summary())
    return 0
