"""``passreid visualize``: ranked-list pictures of chosen or worst queries, and part-token attention maps.

    passreid visualize --checkpoint CKPT --dataset market1501 --root DIR --worst 10 --out pictures/ --attention

Writes ``rank_<query>.png`` per query (worst: ``worst<N>_<query>.png``, N = 1 the
lowest AP) and, with ``--attention``, ``attention.png``: one row per chosen
query with the class-token and part-token attention of the last block.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from passreid.commands._common import add_model_data_arguments, extraction_kwargs, load_model_and_data, positive_int

NAME = "visualize"
HELP = "ranked-list pictures (green: correct, red: wrong) of chosen or worst queries, and attention maps"


def _indices(text: str) -> list[int]:
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--queries takes comma-separated query indices, got {text!r}") from None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_data_arguments(parser)
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--queries", type=_indices, metavar="I,J,...", help="query indices (in data set order)")
    which.add_argument("--worst", type=positive_int, metavar="N", help="the N queries with the lowest AP (default 5)")
    parser.add_argument("-k", type=positive_int, default=10, help="gallery images per ranked list")
    parser.add_argument("--out", metavar="DIR", required=True, help="folder for the pictures")
    parser.add_argument("--attention", action="store_true",
                        help="also draw the class/part-token attention maps of the chosen queries")


def run(args: argparse.Namespace) -> int:
    from passreid.errors import ConfigError
    from passreid.features import extract_features
    from passreid.visualize import attention_figure, rank_queries, ranked_list_grid, worst_queries

    model, dataset, img_size, device = load_model_and_data(args)
    kwargs = extraction_kwargs(args, img_size, device)
    query = extract_features(model, dataset.query, **kwargs)
    gallery = extract_features(model, dataset.gallery, **kwargs)
    rankings = rank_queries(query.features, gallery.features, query.pids, gallery.pids, query.camids,
                            gallery.camids, k=args.k)
    if args.queries:
        bad = [i for i in args.queries if not 0 <= i < len(query)]
        if bad:
            raise ConfigError(f"--queries {bad} out of range: the data set has {len(query)} queries "
                              f"(0..{len(query) - 1})")
        chosen = [(i, f"rank_{Path(str(query.paths[i])).stem}") for i in args.queries]
    else:
        worst = worst_queries(rankings.ap, 5 if args.worst is None else args.worst)
        chosen = [(i, f"worst{n}_{Path(str(query.paths[i])).stem}") for n, i in enumerate(worst, start=1)]
    out = Path(args.out)
    for i, name in chosen:
        valid = rankings.top[i] >= 0
        ranked_list_grid(str(query.paths[i]), [str(gallery.paths[j]) for j in rankings.top[i][valid]],
                         rankings.top_dist[i][valid].tolist(), rankings.top_correct[i][valid].tolist(),
                         out=out / f"{name}.png", k=args.k)
        ap = rankings.ap[i]
        ap_text = f"AP {100 * ap:5.1f}" if ap == ap else "no correct match in the gallery"
        print(f"{out / f'{name}.png'}  query {i} (pid {query.pids[i]}, cam {query.camids[i] + 1}), {ap_text}")
    if args.attention:
        attention_figure(model, [str(query.paths[i]) for i, _ in chosen], out=out / "attention.png")
        print(f"{out / 'attention.png'}  attention of the class and part tokens, one row per query")
    return 0
