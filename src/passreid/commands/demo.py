"""``passreid demo``: every stage end to end on synthetic data, as a table (and JSON)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

DEFAULT_WORKDIR = "runs/demo"

NAME = "demo"
HELP = "run every stage end to end on two small synthetic domains (tiny model, CPU friendly)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", metavar="OUT", help="also write the results as JSON")
    parser.add_argument("--workdir", metavar="DIR", default=DEFAULT_WORKDIR,
                        help=f"folder for the synthetic data, the runs and the pictures, kept afterwards (default "
                             f"{DEFAULT_WORKDIR}); a later demo reuses its data and replaces its runs")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--stages", nargs="+", metavar="NAME", help="run only these stages")


def run(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from passreid.demo import DEMO_STAGES, run_demo
    from passreid.runtime import resolve_device

    known = [name for name, _ in DEMO_STAGES]
    unknown = sorted(set(args.stages or ()) - set(known))
    if unknown:
        from passreid.errors import ConfigError

        raise ConfigError(f"unknown demo stage(s) {', '.join(unknown)}; stages: {', '.join(known)}")
    if args.json:
        from passreid.commands._common import check_output_path

        check_output_path(args.json, "--json")
    device = resolve_device(args.device)
    workdir = Path(args.workdir)
    try:
        result = run_demo(workdir, device=device, seed=args.seed, only=args.stages)
    except KeyboardInterrupt:
        raise KeyboardInterrupt(f"{workdir} keeps the data and the runs finished so far") from None

    table = Table(title=f"passreid demo ({device}, {result['seconds']:.0f} s)")
    for col in ("stage", "mAP", "R1", "mINP", "seconds"):
        table.add_column(col, justify="left" if col == "stage" else "right")
    for stage in result["stages"]:
        minp = f"{100 * stage['mINP']:.1f}" if "mINP" in stage else "-"
        table.add_row(stage["name"], f"{100 * stage['mAP']:.1f}", f"{100 * stage['rank1']:.1f}", minp,
                      f"{stage['seconds']:.1f}")
    Console().print(table)
    print(f"data, runs and pictures: {workdir}")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return 0
