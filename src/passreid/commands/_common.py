"""Flags shared by the commands that run a model over a data set (eval, extract, ...)."""

from __future__ import annotations

import argparse
import logging
from typing import Any

import torch
from torch import nn

from passreid.errors import ConfigError

logger = logging.getLogger(__name__)


def add_model_data_arguments(parser: argparse.ArgumentParser, *, required: bool = True) -> None:
    """``--checkpoint CKPT --dataset NAME --root DIR`` plus extraction options."""
    group = parser.add_argument_group("model and data")
    group.add_argument("--checkpoint", metavar="CKPT", required=required,
                       help="any supported checkpoint (fine-tuned, pretraining, backbone, timm)")
    group.add_argument("--dataset", metavar="NAME", required=required,
                       help="market1501, msmt17, dukemtmc, cuhk03np, csv, imagefolder or synthetic")
    group.add_argument("--root", metavar="DIR", required=required, help="data set folder (the CSV file for csv)")
    group.add_argument("--img-size", type=int, nargs=2, metavar=("H", "W"),
                       help="input size (default: the checkpoint's)")
    group.add_argument("--flip", action="store_true", help="average the features of each image and its mirror")
    group.add_argument("--batch-size", type=int, default=128)
    group.add_argument("--num-workers", type=int, default=2)
    group.add_argument("--device", default="auto", help="auto, cpu or cuda")


def load_model_and_data(args: argparse.Namespace) -> tuple[nn.Module, Any, tuple[int, int], torch.device]:
    """The ReID model of ``--checkpoint`` (eval mode), the data set, the input size and the device."""
    from passreid.checkpoint import build_model_from_checkpoint
    from passreid.data.datasets import build_dataset
    from passreid.engine import resolve_device

    device = resolve_device(args.device)
    model, report = build_model_from_checkpoint(args.checkpoint, device=device)
    logger.info("loaded %s (%s)", args.checkpoint, report.format)
    img_size = tuple(args.img_size) if args.img_size else tuple(model.base.img_size)
    if any(s % 16 for s in img_size):
        raise ConfigError(f"--img-size {img_size} must be multiples of 16")
    dataset = build_dataset(args.dataset, args.root)
    return model, dataset, img_size, device


def extraction_kwargs(args: argparse.Namespace, img_size: tuple[int, int], device: torch.device) -> dict[str, Any]:
    return dict(img_size=img_size, batch_size=args.batch_size, num_workers=args.num_workers, device=device,
                flip=args.flip, progress=True)


EXIT_STOPPED = 143
"""Exit status of a training command stopped by SIGTERM/SIGINT (128 + SIGTERM): saved, not finished."""


def add_training_arguments(parser: argparse.ArgumentParser, *, example_config: str, example_override: str) -> None:
    """``CONFIG [key.sub=value ...] [--resume [CKPT]] [--force-resume]``, shared by every training stage."""
    parser.add_argument("config", metavar="CONFIG", help=f"recipe YAML, e.g. {example_config}")
    parser.add_argument("overrides", nargs="*", metavar="key.sub=value",
                        help=f"dotted overrides, e.g. {example_override}")
    parser.add_argument("--resume", nargs="?", const="", metavar="CKPT",
                        help="continue a run (put it after CONFIG): from CKPT, or without a value from "
                             "<run.output_dir>/last.pth")
    parser.add_argument("--force-resume", action="store_true",
                        help="resume even though the config or the training images changed")


def resume_command(stage: str, args: argparse.Namespace) -> str:
    """The command line that continues a stopped run."""
    return " ".join(["passreid", stage, args.config, *args.overrides, "--resume"])
