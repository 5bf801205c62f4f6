"""``passreid train``: supervised fine-tuning from a recipe (DESIGN §4), one process or under ``torchrun``.

    passreid train configs/finetune/market_vit_small.yaml data.root=data/market1501
    torchrun --nproc-per-node 4 -m passreid train configs/finetune/msmt17_vit_base.yaml
    passreid train configs/finetune/market_vit_small.yaml --resume          # continue <run>/last.pth
"""

from __future__ import annotations

import argparse
import sys

from passreid.commands._common import (
    EXIT_STOPPED,
    add_training_arguments,
    is_main_process,
    load_training_config,
    progress_wanted,
    resume_command,
    run_in_folder,
)

NAME = "train"
HELP = "fine-tune a ReID model on a labelled data set (TransReID recipe with PASS tokens)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_training_arguments(parser, example_config="configs/finetune/market_vit_small.yaml",
                           example_override="data.root=data/market1501 optim.batch_size=128")


def run(args: argparse.Namespace) -> int:
    from passreid.finetune import FinetuneConfig, run_finetune

    cfg = load_training_config(FinetuneConfig, args)
    if cfg is None:
        return 0
    result = run_in_folder(args, cfg, lambda: run_finetune(cfg, resume=args.resume, force_resume=args.force_resume,
                                                           progress=progress_wanted(args)))
    is_main = is_main_process()  # under torchrun only rank 0 reports
    if result["stopped"]:
        if is_main:
            command = resume_command("train", args)
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
