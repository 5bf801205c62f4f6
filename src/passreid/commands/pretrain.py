"""``passreid pretrain``: PASS (part-aware DINO) pretraining on a folder of unlabeled person crops (DESIGN §3).

One process: ``passreid pretrain configs/pretrain/pass_vit_small.yaml data.root=data/LUPerson``;
several GPUs: ``torchrun --nproc-per-node 8 -m passreid pretrain CONFIG ...``.
"""

from __future__ import annotations

import argparse

from passreid import pretrain  # noqa: F401  (registers the demo stage)

NAME = "pretrain"
HELP = "PASS self-supervised pretraining on unlabeled person images (exports the teacher backbone)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """``CONFIG [key.sub=value ...] [--resume [CKPT]] [--force-resume] [--no-progress]``."""
    parser.add_argument("config", metavar="CONFIG", help="recipe YAML, e.g. configs/pretrain/pass_vit_small.yaml")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                        help="dotted overrides, e.g. data.root=data/LUPerson data.limit=100000")
    parser.add_argument("--resume", nargs="?", const="", metavar="CKPT",
                        help="continue a run: from CKPT, or without a path from <run.output_dir>/last.pth")
    parser.add_argument("--force-resume", action="store_true", help="resume even if the config or images changed")
    parser.add_argument("--no-progress", action="store_true", help="log lines instead of a progress bar")


def run(args: argparse.Namespace) -> int:
    from passreid.config import load_config
    from passreid.pretrain import PretrainConfig, run_pretrain

    cfg = load_config(PretrainConfig, args.config, args.overrides)
    result = run_pretrain(cfg, resume=args.resume, force_resume=args.force_resume, progress=not args.no_progress)
    if result["stopped"]:
        command = " ".join(["passreid pretrain", args.config, *args.overrides, "--resume"])
        print(f"stopped after epoch {result['epoch']}; continue with: {command}")
    elif result["backbone"] is not None:
        print(f"pretrained {result['epoch']} epochs; teacher backbone exported to {result['backbone']}")
    return 0
