"""``passreid uda``: domain adaptation by cluster contrast on the unlabelled target set (DESIGN §5).

Starts from a model fine-tuned on the labelled source set (``model.pretrained``,
the output of ``passreid train``); only its backbone is carried over.
"""

from __future__ import annotations

import argparse

from passreid.commands.usl import add_arguments, run_mode

NAME = "uda"
HELP = "domain adaptation: cluster contrast on an unlabelled target set, from a source fine-tuned model"

__all__ = ["NAME", "HELP", "add_arguments", "run"]


def run(args: argparse.Namespace) -> int:
    return run_mode(args, "uda")
