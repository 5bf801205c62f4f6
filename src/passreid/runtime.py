"""Where and how a process computes: devices, DDP, precision, seeds and random streams, threads.

Everything here is below the training loop and the inference path alike: a
stage, :mod:`passreid.features` and :mod:`passreid.api` import it, and it
imports nothing of passreid above :mod:`passreid.errors`.
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from passreid._compat import destroy_process_group
from passreid.errors import ConfigError, TrainingError

logger = logging.getLogger(__name__)


class StopFlag(Protocol):
    """Anything with a ``requested`` flag (:class:`passreid.training.run.GracefulStop`)."""

    requested: bool


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


def agree_across_ranks(loss: torch.Tensor, stop: StopFlag | None) -> tuple[torch.Tensor, bool]:
    """The loss averaged over ranks and whether any rank was asked to stop, in one all-reduce,
    so every rank skips the same non-finite steps and stops at the same step (DDP lock-step)."""
    requested = bool(stop is not None and stop.requested)
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return loss.detach(), requested
    packed = torch.stack([loss.detach().float(), torch.tensor(float(requested), device=loss.device)])
    dist.all_reduce(packed)
    return packed[0] / dist.get_world_size(), bool(packed[1] > 0)


def gather_rows(tensor: torch.Tensor, world_size: int) -> torch.Tensor:
    """Concatenate equally shaped (B, ...) tensors of all ranks in rank order (no gradient)."""
    if world_size == 1:
        return tensor
    parts = [torch.empty_like(tensor) for _ in range(world_size)]
    dist.all_gather(parts, tensor.contiguous())
    return torch.cat(parts)


def broadcast_from_main(obj: Any, info: DistInfo) -> Any:
    """Rank 0's ``obj`` (any picklable object) on every rank; other ranks pass anything, e.g. None."""
    box: list[Any] = [obj]
    if info.distributed:
        dist.broadcast_object_list(box, src=0)
    return box[0]


# ----------------------------------------------------------------------------- threads and memory


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
