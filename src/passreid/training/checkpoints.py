"""Training checkpoints (DESIGN §8): writing and reading them, the checks before a resume, and exports.

A training checkpoint is ``{"model", "optimizer", "scheduler", "scaler", "rng",
"epoch", "config", "meta"}`` plus what a stage's run adds (the position inside
an epoch, every rank's random streams, the best result so far). These functions
are the parts :class:`passreid.training.run.TrainingRun` is made of.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from passreid.checkpoint import build_meta, save_atomic, write_export
from passreid.config import config_diff, rename_old_keys
from passreid.errors import ConfigError, TrainingError
from passreid.runtime import capture_rng_state, restore_rng_state, unwrap
from passreid.training.rundir import RunDir

logger = logging.getLogger(__name__)

# Keys that may change between a run and its resumption without changing what is computed.
RESUME_IGNORED_KEYS = ("run.output_dir", "data.num_workers", "run.log_every", "run.device")


def state_of(obj: Any) -> Any:
    """``obj.state_dict()`` or None."""
    return None if obj is None else obj.state_dict()


def save_training_checkpoint(
    path: str | os.PathLike,
    *,
    model: nn.Module | dict[str, Any],
    optimizer: torch.optim.Optimizer | None,
    scheduler: Any,
    scaler: torch.amp.GradScaler | None,
    epoch: int,
    config: dict[str, Any],
    fingerprint: dict[str, Any] | None = None,
    extra: dict[str, Any] | None = None,
) -> None:
    """Write the DESIGN §8 training checkpoint atomically.

    ``model`` is a module (its unwrapped state dict is stored) or a ready dict of
    states (pretraining stores student, teacher and centers under ``model``).
    """
    model_state = model if isinstance(model, dict) else unwrap(model).state_dict()
    ckpt = {
        "model": model_state,
        "optimizer": state_of(optimizer),
        "scheduler": state_of(scheduler),
        "scaler": state_of(scaler),
        "rng": capture_rng_state(),
        "epoch": epoch,
        "config": config,
        "meta": build_meta(fingerprint),
    }
    if extra:
        ckpt.update(extra)
    save_atomic(ckpt, path)


def load_training_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Read a training checkpoint (weights-only) and check it has the DESIGN §8 keys."""
    from passreid.checkpoint import safe_load

    ckpt = safe_load(path)
    missing = [k for k in ("model", "optimizer", "epoch", "config", "rng") if not isinstance(ckpt, dict) or k not in ckpt]
    if missing:
        raise TrainingError(f"{path} is not a passreid training checkpoint (missing {', '.join(missing)})")
    return ckpt


def check_resume_fingerprint(ckpt: dict[str, Any], fingerprint: dict[str, Any], path: Path | None,
                             force: bool = False) -> None:
    """Refuse to resume on other training images than the checkpoint's unless forced."""
    saved = (ckpt.get("meta") or {}).get("dataset")
    if saved is None or saved == fingerprint:
        return
    message = (f"the training images differ from those {path} was trained on ({saved.get('num_images')} images, "
               f"list {str(saved.get('list_sha1', '?'))[:12]} vs {fingerprint['num_images']} images, "
               f"list {fingerprint['list_sha1'][:12]})")
    if not force:
        raise ConfigError(message + "; pass --force-resume to continue anyway")
    logger.warning("%s (forced)", message)


def export_model(run_dir: RunDir, state: dict[str, torch.Tensor], config: dict[str, Any],
                 fingerprint: dict[str, Any] | None, *, epoch: int | None = None,
                 metrics: dict[str, float] | None = None, selection: str | None = None) -> Path:
    """Write ``model.pth`` (a plain state dict in the published layout) and ``model.json`` beside it.

    ``model.json`` is ``{"meta": build_meta(fingerprint), "config": config, "epoch", "metrics"}``
    (plus ``"selection"``: how the exported epoch was chosen, when given): what lets
    ``passreid eval`` rebuild the model (input size, fusion, necks) and ``passreid info``
    say which epoch was exported, how it was chosen and what it scored.
    """
    record: dict[str, Any] = {"meta": build_meta(fingerprint), "config": config}
    if epoch is not None:
        record["epoch"] = int(epoch)
    if metrics:
        record["metrics"] = {k: float(v) for k, v in metrics.items()}
    if selection is not None:
        record["selection"] = selection
    return write_export(state, run_dir.path / "model.pth", record)


def check_resume_config(saved: dict[str, Any], current: dict[str, Any], force: bool = False) -> None:
    """Refuse to resume with a changed config unless forced; the error shows the diff. A run saved
    with an old key name (:data:`passreid.config.RENAMED_KEYS`) compares under the new name."""
    saved = rename_old_keys(saved, "the saved run config", warn=False)
    diff = config_diff(saved, current, ignore=RESUME_IGNORED_KEYS)
    if not diff:
        return
    listing = "\n  ".join(diff)
    if force:
        logger.warning("resuming with a changed config (forced):\n  %s", listing)
        return
    raise ConfigError(
        "the config differs from the one the run was started with; pass --force-resume to accept:\n  " + listing
    )


def resolve_resume_path(resume: str | None, run_dir: RunDir) -> Path | None:
    """``--resume`` without a path means the run directory's ``last.pth``."""
    if resume is None:
        return None
    path = Path(resume) if resume else run_dir.last
    if path.is_dir():
        hint = f"; its last.pth is {path / 'last.pth'}" if (path / "last.pth").is_file() else ""
        raise TrainingError(f"cannot resume: {path} is a folder, not a checkpoint file (--resume takes a .pth file, "
                            f"or no value for <run.output_dir>/last.pth){hint}")
    if not path.is_file():
        raise TrainingError(f"cannot resume: checkpoint {path} does not exist")
    return path


def open_resume_checkpoint(resume: str | None, run_dir: RunDir, config: dict[str, Any],
                           force: bool = False) -> tuple[dict[str, Any] | None, Path | None]:
    """The training checkpoint ``--resume`` names (or None, None), refused if its config differs
    from ``config`` unless forced."""
    path = resolve_resume_path(resume, run_dir)
    if path is None:
        return None, None
    ckpt = load_training_checkpoint(path)
    check_resume_config(ckpt["config"], config, force=force)
    return ckpt, path


def load_state_checked(module: nn.Module, state: dict[str, Any], what: str) -> None:
    """``module.load_state_dict(state)``, with a resumed checkpoint of another model refused in one
    :class:`~passreid.errors.CheckpointError` that counts the conflicts and shows the first ones
    (instead of torch's listing of every tensor)."""
    from passreid.errors import CheckpointError

    own = module.state_dict()
    if not isinstance(state, dict):
        raise CheckpointError(f"the checkpoint's {what} is not a state dict ({type(state).__name__})")
    shapes = [f"{k}: checkpoint {list(state[k].shape)} vs model {list(own[k].shape)}" for k in own
              if k in state and hasattr(state[k], "shape") and tuple(state[k].shape) != tuple(own[k].shape)]
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    if shapes or missing or unexpected:
        parts = []
        if shapes:
            parts.append(f"{len(shapes)} tensor(s) of another shape, e.g. {shapes[0]}")
        if missing:
            parts.append(f"{len(missing)} missing, e.g. {missing[0]}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected, e.g. {unexpected[0]}")
        raise CheckpointError(
            f"the checkpoint's {what} does not fit the model of this config ({'; '.join(parts)}): a run resumes "
            "only with the architecture and image size it was started with (--force-resume does not change that)"
        )
    module.load_state_dict(state)


def restore_training_state(
    ckpt: dict[str, Any],
    *,
    model: nn.Module | None,
    optimizer: torch.optim.Optimizer | None,
    scheduler: Any,
    scaler: torch.amp.GradScaler | None,
) -> int:
    """Load model/optimizer/scheduler/scaler/RNG from a training checkpoint; returns the next epoch."""
    if model is not None:
        load_state_checked(unwrap(model), ckpt["model"], "model")
    for obj, key in ((optimizer, "optimizer"), (scheduler, "scheduler"), (scaler, "scaler")):
        if obj is not None and ckpt.get(key) is not None:
            obj.load_state_dict(ckpt[key])
    restore_rng_state(ckpt["rng"])
    return int(ckpt["epoch"]) + 1
