"""What every training stage shares: devices, DDP, precision, run directory, checkpoints, resume.

A stage (fine-tuning, pretraining, clustering) owns its model, loss and epoch
loop; this module owns the plumbing around it so that every stage writes the
same run-directory layout (DESIGN §8) and resumes the same way.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import random
import signal
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from passreid._compat import destroy_process_group
from passreid.checkpoint import build_meta, save_atomic
from passreid.config import config_diff, rename_old_keys
from passreid.errors import ConfigError, TrainingError

logger = logging.getLogger(__name__)

# Keys that may change between a run and its resumption without changing what is computed.
RESUME_IGNORED_KEYS = ("run.output_dir", "data.num_workers", "run.log_every", "run.device")


# ----------------------------------------------------------------------------- devices, DDP, precision


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits in a (possibly single-process) run."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def resolve_device(preference: str = "auto", local_rank: int = 0) -> torch.device:
    """``auto`` picks CUDA when present; ``cuda`` without a GPU, or a name torch does not know
    (``gpu``), is an error that says so."""
    if not _is_device_name(preference):
        raise ConfigError(f"unknown device {preference!r}: use auto, cpu, cuda or cuda:N (e.g. --device cuda, "
                          "run.device=cuda)")
    if preference == "auto":
        preference = "cuda" if torch.cuda.is_available() else "cpu"
    if preference.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ConfigError(f"device {preference!r} was asked for but CUDA is not available")
        return torch.device(preference if ":" in preference else f"cuda:{local_rank}")
    return torch.device(preference)


def _is_device_name(name: str) -> bool:
    """Whether ``name`` is ``auto`` or a device string torch accepts (``cpu``, ``cuda``, ``cuda:1``, ``mps``)."""
    if name == "auto":
        return True
    try:
        torch.device(name)
    except (RuntimeError, ValueError):
        return False
    return True


def setup_distributed(device_preference: str = "auto") -> DistInfo:
    """Join the process group when launched by ``torchrun`` (NCCL on GPU, gloo on CPU)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(device_preference, local_rank)
    if world_size > 1 and not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return DistInfo(rank=rank, world_size=world_size, local_rank=local_rank, device=device)


def cleanup_distributed() -> None:
    if dist.is_available() and dist.is_initialized():
        destroy_process_group()  # works around the gloo shutdown hang of torch < 2.8


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside a DDP (or ``torch.compile``) wrapper."""
    model = getattr(model, "module", model)
    return getattr(model, "_orig_mod", model)


def resolve_precision(precision: str, device: torch.device, *, auto: str = "fp16") -> str:
    """The precision a stage runs at: ``fp32``, ``fp16`` (autocast + loss scaling) or ``bf16`` (autocast).

    ``auto`` means ``auto`` on a GPU (default fp16 with a gradient scaler, the
    precision the published pretraining and fine-tuning trained in; ``bf16``
    falls back to fp16 on a GPU without it) and fp32 on the CPU. Mixed precision
    is a GPU feature here: on the CPU, fp16 autocast is slow or unsupported for
    many kernels and bf16 is slower than fp32 on most CPUs, so an explicit
    ``fp16``/``bf16`` on the CPU runs in fp32 with a warning that says so.
    """
    if precision == "auto":
        if device.type != "cuda":
            return "fp32"
        precision = auto
        if precision == "bf16" and not torch.cuda.is_bf16_supported():
            return "fp16"
        return precision
    if precision in ("bf16", "fp16") and device.type != "cuda":
        logger.warning("precision %s requested on %s: mixed precision is GPU-only here, using fp32", precision,
                       device)
        return "fp32"
    return precision


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager[Any]:
    """The autocast context for a resolved precision (``fp32`` is a no-op)."""
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def make_grad_scaler(precision: str, device: torch.device) -> torch.amp.GradScaler:
    """A loss scaler that is only active for fp16 (bf16 and fp32 need none)."""
    return torch.amp.GradScaler(device.type, enabled=precision == "fp16")


# ----------------------------------------------------------------------------- randomness


def seed_everything(seed: int, rank: int = 0) -> None:
    """Seed python, numpy and torch; each rank gets its own stream."""
    seed = seed + rank
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def capture_rng_state() -> dict[str, Any]:
    """All RNG states as tensors and plain containers (loadable with ``weights_only=True``)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ----------------------------------------------------------------------------- run directory


class RunDir:
    """A run directory: ``config.yaml``, ``last.pth``, ``best.pth``, ``metrics.jsonl``, ``tb/``.

    Only the main process writes; on other ranks every method is a no-op.
    """

    def __init__(self, path: str | os.PathLike, is_main: bool = True) -> None:
        self.path = Path(path)
        self.is_main = is_main
        self._tb: Any = None
        if is_main:
            self.path.mkdir(parents=True, exist_ok=True)

    @property
    def last(self) -> Path:
        return self.path / "last.pth"

    @property
    def best(self) -> Path:
        return self.path / "best.pth"

    @property
    def config_path(self) -> Path:
        return self.path / "config.yaml"

    @property
    def metrics_path(self) -> Path:
        return self.path / "metrics.jsonl"

    def write_config(self, yaml_text: str) -> None:
        if self.is_main:
            tmp = self.config_path.with_suffix(".yaml.tmp")
            tmp.write_text(yaml_text)
            os.replace(tmp, self.config_path)

    @property
    def tb(self) -> Any:
        """A TensorBoard ``SummaryWriter`` on ``tb/`` (created on first use, main rank only)."""
        if self._tb is None and self.is_main:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(str(self.path / "tb"))
        return self._tb

    def add_scalars(self, scalars: dict[str, float], step: int, prefix: str = "") -> None:
        if not self.is_main:
            return
        for key, value in scalars.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                self.tb.add_scalar(f"{prefix}{key}", value, step)

    def log_metrics(self, record: dict[str, Any]) -> None:
        """Append one JSON object (one epoch) to ``metrics.jsonl`` and its scalars to TensorBoard."""
        if not self.is_main:
            return
        with open(self.metrics_path, "a") as f:
            f.write(json.dumps(record, default=float) + "\n")
        step = int(record.get("epoch", 0))
        self.add_scalars({k: v for k, v in record.items() if k != "epoch"}, step, prefix="epoch/")
        self.tb.flush()

    def read_metrics(self) -> list[dict[str, Any]]:
        if not self.metrics_path.exists():
            return []
        return [json.loads(line) for line in self.metrics_path.read_text().splitlines() if line.strip()]

    def truncate_metrics(self, last_epoch: int) -> None:
        """On resume, forget epochs logged after the checkpoint (a crash may have logged them)."""
        if self.is_main and self.metrics_path.exists():
            kept = [r for r in self.read_metrics() if int(r.get("epoch", 0)) <= last_epoch]
            self.metrics_path.write_text("".join(json.dumps(r) + "\n" for r in kept))

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
            self._tb = None


# ----------------------------------------------------------------------------- training checkpoints


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


def gather_rng_states(info: DistInfo) -> list[Any] | None:
    """Every rank's RNG state, gathered on all ranks (a collective), so rank 0 can store them for an exact
    DDP resume; None in a single process."""
    if not info.distributed:
        return None
    states: list[Any] = [None] * info.world_size
    dist.all_gather_object(states, capture_rng_state())
    return states


def restore_rank_rng(ckpt: dict[str, Any], info: DistInfo, path: Path | None) -> None:
    """Give each rank its own saved random streams (``rng_per_rank``; the checkpoint's ``rng`` is rank 0's)."""
    per_rank = ckpt.get("rng_per_rank")
    if per_rank is not None and len(per_rank) == info.world_size:
        restore_rng_state(per_rank[info.rank])
    elif info.distributed:
        logger.warning("%s was written by %d process(es), this run has %d: random streams are not restored per rank",
                       path, len(per_rank) if per_rank else 1, info.world_size)


def agree_across_ranks(loss: torch.Tensor, stop: GracefulStop | None) -> tuple[torch.Tensor, bool]:
    """The loss averaged over ranks and whether any rank was asked to stop, in one all-reduce,
    so every rank skips the same non-finite steps and stops at the same step (DDP lock-step)."""
    requested = bool(stop is not None and stop.requested)
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return loss.detach(), requested
    packed = torch.stack([loss.detach().float(), torch.tensor(float(requested), device=loss.device)])
    dist.all_reduce(packed)
    return packed[0] / dist.get_world_size(), bool(packed[1] > 0)


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
    path = run_dir.path / "model.pth"
    save_atomic(state, path)
    sidecar = path.with_suffix(".json")
    tmp = sidecar.with_name(sidecar.name + ".tmp")
    record: dict[str, Any] = {"meta": build_meta(fingerprint), "config": config}
    if epoch is not None:
        record["epoch"] = int(epoch)
    if metrics:
        record["metrics"] = {k: float(v) for k, v in metrics.items()}
    if selection is not None:
        record["selection"] = selection
    tmp.write_text(json.dumps(record, indent=2) + "\n")
    os.replace(tmp, sidecar)
    return path


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


@contextlib.contextmanager
def cores_beside_workers(num_workers: int, device: str = "auto") -> Iterator[None]:
    """On CPU, one intra-op thread fewer per data-loader worker (at least one), restored afterwards.

    Loader workers decode and augment on their own cores; if torch's thread pool
    wants those cores too, it spins waiting for them (a tiny model on 2 cores with
    one worker trained several times slower with 2 threads than with 1). On a GPU
    the thread count is left alone.
    """
    if num_workers <= 0 or resolve_device(device).type != "cpu":
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(max(1, threads - num_workers))
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@contextlib.contextmanager
def explain_oom(batch_size: int) -> Iterator[None]:
    """Re-raise a CUDA out-of-memory error as a ``TrainingError`` that suggests a batch size."""
    try:
        yield
    except torch.OutOfMemoryError as exc:
        suggestion = max(1, batch_size // 2)
        raise TrainingError(
            f"GPU out of memory at batch size {batch_size}; try a batch size of {suggestion} or lower "
            f"(and scale the learning rate), or use precision bf16. ({str(exc).splitlines()[0]})"
        ) from exc


def cosine_value(start: float, end: float, progress: float) -> float:
    """Cosine interpolation from ``start`` (progress 0) to ``end`` (progress 1)."""
    progress = min(max(progress, 0.0), 1.0)
    return end + 0.5 * (start - end) * (1.0 + math.cos(math.pi * progress))
