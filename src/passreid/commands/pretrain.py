"""``passreid pretrain``: PASS (part-aware DINO) pretraining on a folder of unlabeled person crops (DESIGN §3).

One process: ``passreid pretrain configs/pretrain/pass_vit_small.yaml data.root=data/LUPerson``;
several GPUs: ``torchrun --nproc-per-node 8 -m passreid pretrain CONFIG ...``.
"""

from __future__ import annotations

import argparse

from passreid.commands._common import (
    EXIT_STOPPED,
    add_training_arguments,
    load_training_config,
    progress_wanted,
    resume_command,
    run_in_folder,
)

NAME = "pretrain"
HELP = "PASS self-supervised pretraining on unlabeled person images (exports the teacher backbone)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """``CONFIG [key.sub=value ...] [--resume [CKPT]] [--force-resume] [--overwrite] [--no-progress] ...``."""
    add_training_arguments(parser, example_config="configs/pretrain/pass_vit_small.yaml",
                           example_override="data.root=data/LUPerson data.limit=100000")


def run(args: argparse.Namespace) -> int:
    from passreid.pretrain import PretrainConfig, run_pretrain

    cfg = load_training_config(PretrainConfig, args)
    if cfg is None:
        return 0
    result = run_in_folder(args, cfg, lambda: run_pretrain(cfg, resume=args.resume, force_resume=args.force_resume,
                                                           progress=progress_wanted(args)))
    if result["stopped"]:
        print(f"stopped after epoch {result['epoch']}; continue with: {resume_command('pretrain', args)}")
        return EXIT_STOPPED
    elif result["backbone"] is not None:
        print(f"pretrained {result['epoch']} epochs; teacher backbone exported to {result['backbone']}")
    return 0
