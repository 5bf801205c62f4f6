"""What differs between the torch versions passreid supports (2.4 to 2.14), in one place.

- :func:`safe_globals`: ``torch.serialization.safe_globals`` (a context manager) is
  2.5+; torch 2.4 only has the process-wide ``add_safe_globals``. Torch 2.4 is the
  floor because before it weights-only loading cannot allow ``argparse.Namespace``
  at all, and published PASS checkpoints pickle one.
- :data:`DYNAMO_ONNX_EXPORT`: the ``torch.export``-based ONNX exporter
  (``torch.onnx.export(..., dynamo=True, dynamic_shapes=...)``) exists from 2.5, but
  before 2.8 ``torch.export`` refuses the ViT's dynamic batch; older torch uses the
  TorchScript exporter with ``dynamic_axes`` instead.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterable, Iterator

import torch


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
