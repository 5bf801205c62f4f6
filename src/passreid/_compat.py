"""What differs between the torch versions passreid supports (2.4 to 2.14), in one place.

- :func:`safe_globals`: ``torch.serialization.safe_globals`` (a context manager) is
  2.5+; torch 2.4 only has the process-wide ``add_safe_globals``. Torch 2.4 is the
  floor because before it weights-only loading cannot allow ``argparse.Namespace``
  at all, and published PASS checkpoints pickle one.
- :func:`destroy_process_group`: before 2.8 the process group's destructor joins
  gloo's worker threads while holding the GIL, and a worker that still has to free
  a tensor of the last collective waits for the GIL: both hang for good
  (pytorch/pytorch#154976, seen on 2.4.1 and 2.5.1 under load). The GIL is
  released for a moment first so that the workers can finish.
- :data:`DYNAMO_ONNX_EXPORT`: the ``torch.export``-based ONNX exporter
  (``torch.onnx.export(..., dynamo=True, dynamic_shapes=...)``) exists from 2.5, but
  before 2.8 ``torch.export`` refuses the ViT's dynamic batch; older torch uses the
  TorchScript exporter with ``dynamic_axes`` instead.
"""

from __future__ import annotations

import contextlib
import gc
import re
import time
from collections.abc import Iterable, Iterator

import torch
import torch.distributed as dist


def torch_version(version: str | None = None) -> tuple[int, int]:
    """(major, minor) of ``version`` (default: the installed torch), e.g. ``"2.4.1+cu121"`` -> (2, 4)."""
    text = str(torch.__version__) if version is None else version
    match = re.match(r"(\d+)\.(\d+)", text)
    if match is None:
        raise ValueError(f"cannot read a torch version from {text!r}")
    return int(match.group(1)), int(match.group(2))


TORCH_VERSION: tuple[int, int] = torch_version()
"""(major, minor) of the installed torch."""

DYNAMO_ONNX_EXPORT: bool = TORCH_VERSION >= (2, 8)
"""Export ONNX with the ``torch.export``-based exporter (else the TorchScript one)."""

GIL_FREE_DESTROY: bool = TORCH_VERSION >= (2, 8)
"""The process group's destructor releases the GIL (pytorch/pytorch#154976)."""

GLOO_SETTLE_S = 0.5
"""How long the GIL is left free before a gloo group is destroyed on torch < 2.8."""


@contextlib.contextmanager
def safe_globals(classes: Iterable[type]) -> Iterator[None]:
    """Allow ``classes`` in ``torch.load(..., weights_only=True)`` inside the block.

    On torch 2.4 the allow-list is process-wide (``add_safe_globals``) and the
    classes stay allowed after the block; passreid only ever allows
    ``argparse.Namespace``, which builds no code.
    """
    classes = list(classes)
    scoped = getattr(torch.serialization, "safe_globals", None)
    if scoped is not None:
        with scoped(classes):
            yield
        return
    torch.serialization.add_safe_globals(classes)
    yield


def destroy_process_group() -> None:
    """``dist.destroy_process_group()`` without the gloo shutdown deadlock of torch < 2.8.

    Before 2.8 the destructor joins gloo's worker threads with the GIL held; a worker
    still dropping the tensors of the last collective needs the GIL to free them. So the
    GIL is released (``sleep``) for :data:`GLOO_SETTLE_S` first, which lets the workers
    finish; nothing here waits for the other ranks, so it is safe after an error too.
    """
    if not GIL_FREE_DESTROY and dist.get_backend() == "gloo":
        gc.collect()  # Python references of finished collectives' tensors go now, while the GIL can be had
        time.sleep(GLOO_SETTLE_S)
    dist.destroy_process_group()
