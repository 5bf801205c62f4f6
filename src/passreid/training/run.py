"""The run loop every training stage shares: :class:`TrainingRun`.

A stage (fine-tuning, pretraining, cluster contrast) builds its model, loss,
optimiser and loader and trains one epoch at a time; the run around it is the
same for all and lives here once: the run directory (DESIGN §8), the config and
data checks before a resume, restoring every part and every rank's random
streams, DDP wrapping, the stop signal and the agreement of all ranks on it,
``last.pth`` / ``best.pth`` / ``metrics.jsonl`` / TensorBoard, and the export.

>>> with TrainingRun(cfg, resume=resume, force=force_resume) as run:
...     run.check_data(fingerprint)
...     run.restore(model=model, optimizer=optimizer, scheduler=scheduler, scaler=scaler)
...     train_model = run.wrap(model)
...     for epoch in run.epochs():
...         stats = train_one_epoch(..., stop=run.stop)
...         if stats["stopped"]:
...             run.interrupt(epoch, run.state.step + int(stats["steps"]))
...             continue
...         record = {"epoch": epoch, **stats}
...         if run.eval_due(epoch):
...             record.update(run.keep_best(epoch, evaluate(model), model))
...         run.end_epoch(epoch, record)
...     exported = run.export_final(state, selection="final epoch")
"""

from __future__ import annotations

import logging
import os
import signal
import time
from collections.abc import Generator, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from passreid.config import config_to_dict, config_to_yaml
from passreid.errors import TrainingError
from passreid.runtime import (
    DistInfo,
    agree_across_ranks,
    cleanup_distributed,
    gather_rng_states,
    restore_rank_rng,
    seed_everything,
    setup_distributed,
    unwrap,
)
from passreid.training.checkpoints import (
    check_resume_fingerprint,
    export_model,
    load_state_checked,
    load_training_checkpoint,
    open_resume_checkpoint,
    restore_training_state,
    save_training_checkpoint,
)
from passreid.training.rundir import RunDir

logger = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- faults


class GracefulStop:
    """Turn SIGTERM (and SIGINT) into a flag the loop checks, so it can save and exit cleanly.

    Use as a context manager around the training loop; the previous handlers are
    restored on exit. A second signal while stopping falls through to the default.
    """

    def __init__(self) -> None:
        self.requested = False
        self._previous: dict[int, Any] = {}
        self._pid = os.getpid()

    def _handler(self, signum: int, frame: Any) -> None:
        if os.getpid() != self._pid:
            # a forked DataLoader worker inherits this handler; Ctrl-C reaches the whole process
            # group, and only the training process decides (and says) what happens
            return
        if self.requested:
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
        logger.warning("received signal %d: will save and stop after the current step", signum)
        self.requested = True

    def __enter__(self) -> GracefulStop:
        self._pid = os.getpid()
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self._previous[sig] = signal.signal(sig, self._handler)
            except ValueError:  # not the main thread: signals cannot be caught here
                pass
        return self

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def loss_is_finite(loss: torch.Tensor, *, step: int, epoch: int, last_checkpoint: Path | None, skip: bool) -> bool:
    """True for a finite loss. A NaN/inf loss stops training with the step and the last good checkpoint
    named, or, with ``skip``, is logged and the caller skips the step (returns False)."""
    if bool(torch.isfinite(loss.detach()).all()):
        return True
    where = f"epoch {epoch}, step {step}"
    if skip:
        logger.warning("non-finite loss (%s) at %s: step skipped", loss.item(), where)
        return False
    ckpt = str(last_checkpoint) if last_checkpoint is not None and last_checkpoint.exists() else "none written yet"
    raise TrainingError(
        f"non-finite loss ({loss.item()}) at {where}; last good checkpoint: {ckpt}. "
        "Lower the learning rate, or set run.skip_nonfinite=true to skip such steps."
    )


# ----------------------------------------------------------------------------- step statistics


class MeanStats:
    """Running sums of whatever scalar statistics the steps report, averaged at the end.

    A stage passes the loss dict of each step as it is (``{"loss": ..., "id_loss": ...,
    "acc": ...}``); nothing here names a loss term, so a new term shows up in the epoch
    record, ``metrics.jsonl`` and TensorBoard without touching a loop. Values are summed
    as they come (tensors stay on their device: no host synchronisation per step).
    """

    def __init__(self) -> None:
        self.sums: dict[str, Any] = {}
        self.count = 0

    def add(self, values: Mapping[str, Any]) -> None:
        for key, value in values.items():
            self.sums[key] = self.sums[key] + value if key in self.sums else (
                value.clone() if isinstance(value, torch.Tensor) else value)
        self.count += 1

    def means(self) -> dict[str, float]:
        """``{key: sum / steps}`` as floats; empty when no step was added."""
        return {k: float(v) / self.count for k, v in self.sums.items()} if self.count else {}


def describe(stats: Mapping[str, Any], skip: tuple[str, ...] = ("steps", "skipped", "stopped", "epoch")) -> str:
    """``loss 0.1234 id_loss 0.0500 lr 3.50e-04`` for a log line: every scalar of ``stats``."""
    parts = []
    for key, value in stats.items():
        if key in skip or isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        parts.append(f"{key} {value:.2e}" if key in ("lr", "wd") else f"{key} {value:.4g}")
    return " ".join(parts)


# ----------------------------------------------------------------------------- the run


@dataclass
class RunState:
    """Where a run stands beyond its parts' states; stored in ``last.pth`` for ``--resume``.

    ``epoch`` is the last completed epoch and ``step`` the batches already trained
    of the next one (non-zero only after a stop inside an epoch); ``best_mAP`` /
    ``best_epoch`` the best test evaluation so far (-1 / 0 before any) and
    ``last_metrics`` the latest evaluation's record.
    """

    epoch: int = 0
    step: int = 0
    global_step: int = 0
    best_mAP: float = -1.0
    best_epoch: int = 0
    last_metrics: dict[str, float] = field(default_factory=dict)

    def as_extra(self) -> dict[str, Any]:
        return {"resume_step": self.step, "global_step": self.global_step, "best_mAP": self.best_mAP,
                "best_epoch": self.best_epoch, "last_metrics": dict(self.last_metrics)}

    @classmethod
    def from_checkpoint(cls, ckpt: dict[str, Any]) -> RunState:
        # Cluster-contrast checkpoints of earlier versions kept the best result as {"best": {"mAP", "epoch"}}.
        legacy = ckpt.get("best") or {}
        return cls(epoch=int(ckpt["epoch"]), step=int(ckpt.get("resume_step", 0)),
                   global_step=int(ckpt.get("global_step", 0)),
                   best_mAP=float(ckpt.get("best_mAP", legacy.get("mAP", -1.0))),
                   best_epoch=int(ckpt.get("best_epoch", legacy.get("epoch", 0))),
                   last_metrics=dict(ckpt.get("last_metrics") or {}))


Parts = nn.Module | Mapping[str, nn.Module]


class TrainingRun:
    """One training run of a stage: set-up, resume, stop, save, log and export, in one place.

    Args:
        cfg: the stage's config; ``cfg.run`` is a :class:`~passreid.config.RunConfig`.
        resume: None for a fresh run; ``""`` for the run directory's ``last.pth``; or a path.
        force: resume even if the config or the training images changed.

    Entering joins the process group (under ``torchrun``) and seeds every rank;
    leaving closes TensorBoard and the process group. A fresh run over an earlier
    run's folder starts a new ``metrics.jsonl``; a resumed one forgets the epochs
    logged after its checkpoint.
    """

    def __init__(self, cfg: Any, *, resume: str | None = None, force: bool = False) -> None:
        self.cfg = cfg
        self.info: DistInfo = setup_distributed(cfg.run.device)
        try:
            seed_everything(cfg.run.seed, self.info.rank)
            self.dir = RunDir(cfg.run.output_dir, is_main=self.info.is_main)
            self.config = config_to_dict(cfg)
            self.ckpt, self.resume_path = open_resume_checkpoint(resume, self.dir, self.config, force)
        except BaseException:
            cleanup_distributed()
            raise
        self.force = force
        self.fingerprint: dict[str, Any] | None = None
        self.state = RunState()
        self.stopped = False
        self.stop = GracefulStop()
        self._parts: dict[str, Any] = {}
        self._epoch_start = time.perf_counter()
        self._epoch_loop: Generator[int, None, None] | None = None

    def __enter__(self) -> TrainingRun:
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._epoch_loop is not None:
            self._epoch_loop.close()  # an error inside an epoch: the signal handlers are restored now
        self.dir.close()
        cleanup_distributed()

    # -- before training

    @property
    def resumed(self) -> bool:
        return self.ckpt is not None

    @property
    def last(self) -> Path:
        """``last.pth``: the last good checkpoint a non-finite loss names."""
        return self.dir.last

    def check_data(self, fingerprint: dict[str, Any]) -> None:
        """Remember the training images' fingerprint (stored in every checkpoint) and, on a resume,
        refuse other images than the checkpoint's unless forced."""
        self.fingerprint = fingerprint
        if self.ckpt is not None:
            check_resume_fingerprint(self.ckpt, fingerprint, self.resume_path, self.force)

    def restore(self, *, model: Parts, optimizer: torch.optim.Optimizer | None = None, scheduler: Any = None,
                scaler: torch.amp.GradScaler | None = None) -> RunState:
        """Name the parts a checkpoint holds and, on a resume, load them and this rank's random streams.

        ``model`` is a module (``ckpt["model"]`` is its state dict) or a dict of modules
        (``ckpt["model"]`` is a dict of their state dicts, e.g. pretraining's student,
        teacher and centers). A fresh run writes ``config.yaml`` and starts ``metrics.jsonl``
        anew; a resumed one drops the epochs logged after the checkpoint.
        """
        self._parts = dict(model=model, optimizer=optimizer, scheduler=scheduler, scaler=scaler)
        if self.ckpt is None:
            if self.dir.last.exists():
                logger.warning("%s holds an earlier run: starting afresh over it (pass --resume to continue it)",
                               self.dir.path)
            self.dir.truncate_metrics(0)
            self.dir.write_config(config_to_yaml(self.cfg))
            return self.state
        if isinstance(model, Mapping):
            for name, module in model.items():
                load_state_checked(unwrap(module), self.ckpt["model"][name], name)
            restore_training_state(self.ckpt, model=None, optimizer=optimizer, scheduler=scheduler, scaler=scaler)
        else:
            restore_training_state(self.ckpt, model=model, optimizer=optimizer, scheduler=scheduler, scaler=scaler)
        restore_rank_rng(self.ckpt, self.info, self.resume_path)
        self.state = RunState.from_checkpoint(self.ckpt)
        self.dir.truncate_metrics(self.state.epoch)
        logger.info("resumed from %s after epoch %d%s", self.resume_path, self.state.epoch,
                    f" and {self.state.step} steps of the next" if self.state.step else "")
        return self.state

    def wrap(self, model: nn.Module) -> nn.Module:
        """``model`` in DDP when the run has several processes (itself otherwise)."""
        if not self.info.distributed:
            return model
        kwargs: dict[str, Any] = {"device_ids": [self.info.device.index]} if self.info.device.type == "cuda" else {}
        return nn.parallel.DistributedDataParallel(model, **kwargs)

    # -- the epochs

    def epochs(self) -> Iterator[int]:
        """The epochs still to train, with SIGTERM/SIGINT turned into :attr:`stop` meanwhile.

        After each epoch every rank agrees on whether any was asked to stop; the run then
        ends (``last.pth`` was written by :meth:`end_epoch`). After :meth:`interrupt` no
        further epoch is given. The signal handlers are restored when the loop ends, or at
        the latest when the run is left.
        """
        self._epoch_loop = self._epochs()
        return self._epoch_loop

    def _epochs(self) -> Generator[int, None, None]:
        with self.stop:
            for epoch in range(self.state.epoch + 1, self.cfg.run.epochs + 1):
                self._epoch_start = time.perf_counter()
                yield epoch
                if self.stopped:
                    return
                if agree_across_ranks(torch.zeros((), device=self.info.device), self.stop)[1]:
                    self.stopped = epoch < self.cfg.run.epochs
                    if self.stopped:
                        logger.warning("stopped after epoch %d; %s holds the run", epoch, self.dir.last)
                    return

    def eval_due(self, epoch: int) -> bool:
        """Evaluate every ``run.eval_every`` epochs and after the last."""
        return epoch % self.cfg.run.eval_every == 0 or epoch == self.cfg.run.epochs

    def barrier(self) -> None:
        """Wait for the main process (e.g. while it evaluates alone)."""
        if self.info.distributed:
            dist.barrier()

    def interrupt(self, epoch: int, step: int, note: str = "", extra: dict[str, Any] | None = None) -> None:
        """A stop request ended ``epoch`` after ``step`` steps: save ``last.pth`` at that position
        (``step`` 0: the epoch is rerun from its start on resume), with ``extra`` (what the stage
        needs to continue the epoch, read back from :attr:`ckpt`), and end the run. A collective."""
        self.state.step = step
        self.save_last(extra)
        self.stopped = True
        logger.warning("stopped in epoch %d after step %d; %s holds the run%s", epoch, step, self.dir.last, note)

    def end_epoch(self, epoch: int, record: dict[str, Any]) -> None:
        """Log the epoch's ``record`` (plus ``seconds``, evaluation included) to ``metrics.jsonl`` and
        TensorBoard, then save ``last.pth`` as of the end of ``epoch``. A collective."""
        record["seconds"] = time.perf_counter() - self._epoch_start
        self.dir.log_metrics(record)
        self.state.epoch, self.state.step = epoch, 0
        self.save_last()

    # -- saving

    def _model_states(self) -> Any:
        model = self._parts["model"]
        if isinstance(model, Mapping):
            return {name: unwrap(module).state_dict() for name, module in model.items()}
        return unwrap(model).state_dict()

    def save_last(self, extra: dict[str, Any] | None = None) -> None:
        """``last.pth`` with every part, every rank's random streams, :attr:`state` and ``extra``.
        A collective: all ranks call it, the main one writes."""
        rng_all = gather_rng_states(self.info)
        if self.info.is_main:
            save_training_checkpoint(self.dir.last, model=self._model_states(), optimizer=self._parts["optimizer"],
                                     scheduler=self._parts["scheduler"], scaler=self._parts["scaler"],
                                     epoch=self.state.epoch, config=self.config, fingerprint=self.fingerprint,
                                     extra={**self.state.as_extra(), "rng_per_rank": rng_all, **(extra or {})})

    def keep_best(self, epoch: int, metrics: dict[str, float], model: nn.Module, selected_on: str) -> dict[str, float]:
        """Record an evaluation (a :func:`~passreid.features.metrics_record`) and, on a new best mAP,
        write ``best.pth`` (``model``, ``epoch``, ``metrics``, ``selected_on``). Main process only."""
        self.state.last_metrics = dict(metrics)
        if metrics["mAP"] > self.state.best_mAP:
            self.state.best_mAP, self.state.best_epoch = float(metrics["mAP"]), epoch
            save_training_checkpoint(self.dir.best, model=model, optimizer=None, scheduler=None, scaler=None,
                                     epoch=epoch, config=self.config, fingerprint=self.fingerprint,
                                     extra={"metrics": dict(metrics), "selected_on": selected_on})
        return self.state.last_metrics

    def read_best(self) -> dict[str, Any]:
        """``best.pth`` as written by :meth:`keep_best`."""
        return load_training_checkpoint(self.dir.best)

    # -- the end

    def export_final(self, state: dict[str, torch.Tensor], selection: str) -> Path | None:
        """Export ``state`` (the final model) as ``model.pth`` + ``model.json``; None on other ranks
        or when the run stopped early."""
        if self.stopped or not self.info.is_main:
            return None
        return export_model(self.dir, state, self.config, self.fingerprint, epoch=self.state.epoch,
                            metrics=self.state.last_metrics, selection=selection)

    def export_best(self, selection: str) -> Path | None:
        """Export the model of ``best.pth`` as ``model.pth`` + ``model.json``; None on other ranks,
        when the run stopped early or when no evaluation was made."""
        if self.stopped or not self.info.is_main or not self.dir.best.is_file():
            return None
        best = self.read_best()
        return export_model(self.dir, best["model"], self.config, self.fingerprint, epoch=best.get("epoch"),
                            metrics=best.get("metrics"), selection=selection)
