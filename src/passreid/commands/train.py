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

from passreid.commands._common import EXIT_STOPPED, add_training_arguments, resume_command

NAME = "train"
HELP = "fine-tune a ReID model on a labelled data set (TransReID recipe with PASS tokens)"



def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_training_arguments(parser, example_config="configs/finetune/market_vit_small.yaml",
                           example_override="data.root=data/market1501 optim.batch_size=128")


def run(args: argparse.Namespace) -> int:
    from passreid.config import load_config
    from passreid.engine import cores_beside_workers
    from passreid.finetune import FinetuneConfig, run_finetune

    cfg = load_config(FinetuneConfig, args.config, args.overrides)
    with cores_beside_workers(cfg.data.num_workers, cfg.run.device):
        result = run_finetune(cfg, resume=args.resume, force_resume=args.force_resume, progress=True)
    is_main = int(os.environ.get("RANK", "0")) == 0  # under torchrun only rank 0 reports
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
