"""``passreid usl``: unsupervised ReID by cluster contrast, from a pretrained backbone (DESIGN §5).

``passreid uda`` (commands/uda.py) is the same loop from a source fine-tuned
model and shares the arguments and the runner defined here.
"""

from __future__ import annotations

import argparse

from passreid.commands._common import (
    EXIT_STOPPED,
    add_training_arguments,
    load_training_config,
    resume_command,
    run_in_folder,
)

NAME = "usl"
HELP = "unsupervised ReID: cluster contrast on an unlabelled train split, from a pretrained backbone"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """``CONFIG [key.sub=value ...] [--resume [CKPT]] [--force-resume]``."""
    add_training_arguments(parser, example_config="configs/usl/market_vit_small.yaml",
                           example_override="cluster.eps=0.5")


def run_mode(args: argparse.Namespace, mode: str) -> int:
    """Load the recipe, run cluster contrast in ``mode`` (usl or uda) and print where the model went."""
    from passreid.cluster import ClusterConfig, run_cluster

    cfg = load_training_config(ClusterConfig, args)
    if cfg is None:
        return 0
    result = run_in_folder(args, cfg, lambda: run_cluster(cfg, mode=mode, resume=args.resume,
                                                          force_resume=args.force_resume))
    if result["stopped"]:
        print(f"stopped early; continue with: {resume_command(mode, args)} "
              f"(checkpoint {result['run_dir']}/last.pth)")
        return EXIT_STOPPED
    elif result["model"] is not None:
        print(f"best mAP {100 * result['best_mAP']:.1f}% at epoch {result['best_epoch']}; "
              f"model exported to {result['model']}")
    return 0


def run(args: argparse.Namespace) -> int:
    return run_mode(args, "usl")
