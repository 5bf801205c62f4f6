"""``passreid uda``: domain adaptation by cluster contrast on the unlabelled target set (DESIGN §5).

Starts from a model fine-tuned on the labelled source set (``model.pretrained``,
the output of ``passreid train``); only its backbone is carried over.

    passreid train configs/finetune/msmt17_vit_small.yaml data.root=data/msmt17
    passreid uda configs/uda/msmt17_to_market_vit_small.yaml data.root=data/market1501 \\
        model.pretrained=runs/finetune/msmt17_vit_small/model.pth
"""

from __future__ import annotations

import argparse

from passreid.commands._common import add_training_arguments
from passreid.commands.usl import run_mode

NAME = "uda"
HELP = "domain adaptation: cluster contrast on an unlabelled target set, from a source fine-tuned model"

__all__ = ["NAME", "HELP", "add_arguments", "run"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """``CONFIG [key.sub=value ...]`` with a UDA recipe: the target set in ``data``, the source model in
    ``model.pretrained``."""
    add_training_arguments(parser, example_config="configs/uda/msmt17_to_market_vit_small.yaml",
                           example_override="data.root=data/market1501 "
                                            "model.pretrained=runs/finetune/msmt17_vit_small/model.pth")


def run(args: argparse.Namespace) -> int:
    return run_mode(args, "uda")
