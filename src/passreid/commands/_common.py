"""Flags shared by the commands that run a model over a data set (eval, extract, ...)."""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from passreid.errors import ConfigError

if TYPE_CHECKING:  # torch is imported by the commands that run a model, never for ``--help``
    import torch
    from torch import nn

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
    group.add_argument("--batch-size", type=positive_int, default=128)
    group.add_argument("--num-workers", type=non_negative_int, default=2)
    group.add_argument("--device", default="auto", help="auto, cpu or cuda")
    add_progress_argument(parser)


def check_output_path(path: str, flag: str) -> None:
    """Refuse an output file that cannot be written, before the slow work that would fill it.

    The folder is created if needed and a probe file is written and removed in it.
    """
    import tempfile
    from pathlib import Path

    out = Path(path)
    if out.is_dir():
        raise ConfigError(f"{flag} {out} is a folder; give a file name")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=out.parent, prefix=f".{out.name}.", suffix=".probe"):
            pass
    except OSError as exc:
        raise ConfigError(f"{flag} {out}: cannot write into {out.parent} ({exc.strerror or exc})") from None


def positive_int(text: str) -> int:
    """An argparse type: an integer of at least 1 (a bad value is a usage error, exit 2)."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} must be a positive integer")
    return value


def non_negative_int(text: str) -> int:
    """An argparse type: an integer of at least 0."""
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{value} must be 0 or more")
    return value


def add_progress_argument(parser: argparse.ArgumentParser) -> None:
    """``--no-progress``: log lines instead of progress bars (bars are also off when stderr is not a terminal)."""
    parser.add_argument("--no-progress", action="store_true",
                        help="no progress bars (they are off by themselves when output goes to a file or pipe)")


def progress_wanted(args: argparse.Namespace) -> bool:
    """Progress bars only on a terminal and without ``--no-progress``: a redirected log gets plain lines."""
    return not getattr(args, "no_progress", False) and sys.stderr.isatty()


def load_model_and_data(args: argparse.Namespace, splits: tuple[str, ...] = ("query", "gallery")
                        ) -> tuple[nn.Module, Any, tuple[int, int], torch.device]:
    """The ReID model of ``--checkpoint`` (eval mode), the data set, the input size and the device.

    ``splits`` are the splits the command reads: a Market-layout set then needs no
    ``bounding_box_train`` unless ``train`` is among them, and an unlabelled image
    folder is refused with a message saying why when query/gallery are needed.
    """
    from passreid.checkpoint import build_model_from_checkpoint
    from passreid.data.datasets import build_dataset
    from passreid.runtime import resolve_device

    device = resolve_device(args.device)
    if args.dataset.lower() == "imagefolder" and {"query", "gallery"} & set(splits):
        raise ConfigError(
            "--dataset imagefolder is a folder of unlabelled images: it has no identities and no query/gallery "
            "split to evaluate. Evaluate on a labelled set (market1501 layout or csv, see the README), or index "
            "the folder with `passreid search index --folder DIR` and query it"
        )
    model, report = build_model_from_checkpoint(args.checkpoint, device=device)
    logger.info("loaded %s (%s)", args.checkpoint, report.format)
    img_size = tuple(args.img_size) if args.img_size else tuple(model.base.img_size)
    if any(s % 16 for s in img_size):
        raise ConfigError(f"--img-size {img_size} must be multiples of 16")
    dataset = build_dataset(args.dataset, args.root, need_train="train" in splits)
    return model, dataset, img_size, device


def extraction_kwargs(args: argparse.Namespace, img_size: tuple[int, int], device: torch.device) -> dict[str, Any]:
    return dict(img_size=img_size, batch_size=args.batch_size, num_workers=args.num_workers, device=device,
                flip=args.flip, progress=progress_wanted(args))


EXIT_STOPPED = 143
"""Exit status of a training command stopped by SIGTERM/SIGINT (128 + SIGTERM): saved, not finished."""


def add_training_arguments(parser: argparse.ArgumentParser, *, example_config: str, example_override: str) -> None:
    """``CONFIG [key.sub=value ...] [--resume [CKPT]] [--force-resume] [--overwrite] [--print-config]
    [--no-progress]``, shared by every training stage."""
    parser.add_argument("config", metavar="CONFIG", help=f"recipe YAML, e.g. {example_config}")
    parser.add_argument("overrides", nargs="*", metavar="key.sub=value",
                        help=f"dotted overrides, e.g. {example_override}")
    parser.add_argument("--resume", nargs="?", const="", metavar="CKPT",
                        help="continue a run (put it after CONFIG): from CKPT, or without a value from "
                             "<run.output_dir>/last.pth")
    parser.add_argument("--force-resume", action="store_true",
                        help="resume even though the config or the training images changed")
    parser.add_argument("--overwrite", action="store_true",
                        help="start again in a run.output_dir that holds a previous run (its files are deleted)")
    parser.add_argument("--print-config", action="store_true",
                        help="print the resolved config (recipe + overrides) as YAML and exit without training")
    add_progress_argument(parser)


def is_main_process() -> bool:
    """Rank 0, or the only process (``torchrun`` sets ``RANK``)."""
    return int(os.environ.get("RANK", "0")) == 0


def load_training_config(schema: type, args: argparse.Namespace) -> Any:
    """The recipe of a training command with its overrides; with ``--print-config`` it is printed
    and the command ends (returns None)."""
    from passreid.config import config_to_yaml, load_config

    cfg = load_config(schema, args.config, args.overrides)
    if args.print_config:
        print(config_to_yaml(cfg), end="")
        return None
    return cfg


def run_in_folder(args: argparse.Namespace, cfg: Any, train: Callable[[], Any]) -> Any:
    """``train()`` with ``cfg.run.output_dir`` claimed for the run (lock, no silent overwrite, nothing
    left behind by a failed start; see :mod:`passreid.runfolder`), on CPU with a core left to
    each loader worker."""
    from passreid.runtime import cores_beside_workers
    from passreid.errors import BadImageError
    from passreid.runfolder import claim_run_folder

    with contextlib.ExitStack() as stack:
        stack.enter_context(claim_run_folder(cfg.run.output_dir, resume=args.resume is not None,
                                             overwrite=args.overwrite, is_main=is_main_process()))
        stack.enter_context(cores_beside_workers(cfg.data.num_workers, cfg.run.device))
        try:
            return train()
        except BadImageError as exc:
            if getattr(cfg.data, "skip_corrupt", True):
                raise
            from passreid.cli import user_message

            raise BadImageError(f"{user_message(exc)} (set data.skip_corrupt=true to skip unreadable images "
                                "and count them)") from exc


def resume_command(stage: str, args: argparse.Namespace) -> str:
    """The command line that continues a stopped run."""
    return " ".join(["passreid", stage, args.config, *args.overrides, "--resume"])
