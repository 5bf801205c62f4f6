"""``passreid train``: supervised fine-tuning from a recipe (DESIGN §4), one process or under ``torchrun``.

    passreid train configs/finetune/market_vit_small.yaml data.root=data/market1501
    torchrun --nproc-per-node 4 -m passreid train configs/finetune/msmt17_vit_base.yaml
    passreid train configs/finetune/market_vit_small.yaml --resume          # continue <run>/last.pth

Importing this module also registers the fine-tuning demo stage.
"""

from __future__ import annotations

import argparse
import os
import sys

from passreid import finetune  # noqa: F401  (registers the "finetune" demo stage)

NAME = "train"
HELP = "fine-tune a ReID model on a labelled data set (TransReID recipe with PASS tokens)"

EXIT_STOPPED = 143
"""Exit status after a SIGTERM/SIGINT stop (128 + SIGTERM): the run is saved but not finished."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", metavar="CONFIG", help="recipe YAML, e.g. configs/finetune/market_vit_small.yaml")
    parser.add_argument("overrides", nargs="*", metavar="key.sub=value",
                        help="dotted overrides, e.g. data.root=data/market1501 optim.batch_size=128")
    parser.add_argument("--resume", nargs="?", const="", metavar="CKPT",
                        help="continue a run: from CKPT, or without a value from <run.output_dir>/last.pth")
    parser.add_argument("--force-resume", action="store_true",
                        help="resume even though the config or the training images changed")


def run(args: argparse.Namespace) -> int:
    from passreid.config import load_config
    from passreid.finetune import FinetuneConfig, run_finetune

    cfg = load_config(FinetuneConfig, args.config, args.overrides)
    result = run_finetune(cfg, resume=args.resume, force_resume=args.force_resume, progress=True)
    is_main = int(os.environ.get("RANK", "0")) == 0  # under torchrun only rank 0 reports
    if result["stopped"]:
        if is_main:
            command = " ".join(["passreid train", args.config, *args.overrides, "--resume"])
            where = f"{result['epoch']} epoch(s)" + (f" and {result['step']} step(s)" if result["step"] else "")
            print(f"training stopped after {where}, saved in {result['run_dir']}/last.pth; continue with: {command}",
                  file=sys.stderr)
        return EXIT_STOPPED
    if not is_main:
        return 0
    metrics = result["metrics"]
    print(f"final: mAP {100 * metrics['mAP']:.2f}  R1 {100 * metrics.get('rank1', 0.0):.2f}  "
          f"mINP {100 * metrics['mINP']:.2f}   best mAP {100 * result['best_mAP']:.2f} (epoch {result['best_epoch']})")
    print(f"model: {result['model']}  (run directory {result['run_dir']})")
    return 0
