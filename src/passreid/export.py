"""Exports: a pretraining checkpoint's backbone (:func:`export_backbone`, ``passreid export-backbone``)
and the ONNX graph of a ReID model's test path: images (B, 3, H, W) -> unit features (B, F).

Uses the ``torch.export``-based exporter (``torch.onnx.export(..., dynamo=True)``,
which needs ``onnxscript``: ``pip install 'passreid[onnx]'``) on torch 2.8 and newer;
the TorchScript exporter is deprecated since torch 2.9. Before 2.8 ``torch.export``
cannot keep the ViT's batch axis dynamic, so older torch uses the TorchScript
exporter (``dynamic_axes``), which gives the same graph contract (see
:mod:`passreid._compat`). The batch axis is dynamic, the image size is fixed
at the checkpoint's (the positional embedding is made for one grid). The export is checked with onnxruntime against the torch model before it counts
as done.

The input contract (``input_format``):

- ``"float"`` (default): float32 RGB in [0, 1]; the graph normalises
  ``(x - mean) / std`` itself, so a consumer feeds decoded, resized pixels;
- ``"uint8"``: uint8 RGB in 0..255; the graph divides by 255, then normalises;
- ``"normalised"``: float32 already normalised ``(x - mean) / std``, what
  earlier exports took (fed raw [0, 1] pixels, such a graph silently gives
  other features: hence the default).

Images are resized to the graph's (H, W) outside it, with the interpolation
the evaluation path uses (``resize`` in the metadata). The ONNX metadata
(``metadata_props``) states all of it: ``input`` (the format), ``input_contract``
(one sentence), ``img_size``, ``resize``, ``mean``, ``std``, ``feat_dim`` and
the passreid version.
"""

from __future__ import annotations

import contextlib
import inspect
import io
import json
import logging
import os
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import nn

from passreid import __version__, _compat
from passreid.data.transforms import HALF
from passreid.errors import CheckpointError, ConfigError
from passreid.fileio import atomic_write
from passreid.features import eval_interpolation
from passreid.models import PassViT
from passreid.models.vit import NUM_PARTS

logger = logging.getLogger(__name__)

DEFAULT_OPSET = 18
"""The lowest opset the torch.export-based exporter emits natively (no down-conversion)."""
INPUT_NAME = "images"
OUTPUT_NAME = "features"

InputFormat = Literal["float", "uint8", "normalised"]
INPUT_FORMATS: tuple[str, ...] = ("float", "uint8", "normalised")


@dataclass
class ExportReport:
    """What :func:`export_onnx` wrote and how close onnxruntime came to torch.

    Attributes:
        path: the ``.onnx`` file.
        img_size: (H, W) of the input.
        feat_dim: F of the output.
        opset: ONNX opset.
        max_abs_diff: largest |onnxruntime - torch| over the checked batches (None if not verified).
        input_format: what the graph takes (see the module).
        contract: the input contract in one sentence, as in the metadata.
    """

    path: Path
    img_size: tuple[int, int]
    feat_dim: int
    opset: int
    max_abs_diff: float | None
    input_format: str = "float"
    contract: str = ""


def input_contract(input_format: str, img_size: Sequence[int], resize: str,
                   mean: Sequence[float], std: Sequence[float]) -> str:
    """What a consumer must feed a graph of ``input_format``, in one sentence."""
    h, w = img_size
    shape = f"{INPUT_NAME}: (batch, 3, {h}, {w}) RGB resized to {h}x{w} ({resize})"
    norm = f"(x - mean) / std with mean {list(mean)}, std {list(std)}"
    if input_format == "float":
        return f"{shape}, float32 in [0, 1]; the graph normalises {norm}"
    if input_format == "uint8":
        return f"{shape}, uint8 in 0..255; the graph takes x = pixel / 255 and normalises {norm}"
    return f"{shape}, float32 already normalised: {norm}, x in [0, 1]"


def preprocess(images: torch.Tensor, input_format: str, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """Graph input of ``input_format`` (B, 3, H, W) -> the normalised images the model takes."""
    if input_format == "normalised":
        return images
    x = images.float() / 255 if input_format == "uint8" else images
    return (x - mean) / std


class _WithNormalisation(nn.Module):
    """A ReID model behind its input normalisation, so the exported graph takes raw RGB."""

    def __init__(self, model: nn.Module, input_format: str, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        self.model = model
        self.input_format = input_format
        self.register_buffer("mean", torch.tensor(list(mean), dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(list(std), dtype=torch.float32).view(1, 3, 1, 1))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Raw images (B, 3, H, W) -> unit features (B, F)."""
        return self.model(preprocess(images, self.input_format, self.mean, self.std))


def _require(module: str) -> Any:
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise ConfigError(f"ONNX export needs {module}: pip install 'passreid[onnx]'") from None


@contextlib.contextmanager
def _quiet_loggers(*names: str) -> Iterator[None]:
    """Raise the exporter's graph-optimisation loggers to WARNING (each pass logs at INFO)."""
    loggers = [logging.getLogger(name) for name in names]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(max(lg.getEffectiveLevel(), logging.WARNING))
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def export_onnx(
    model_or_checkpoint: nn.Module | str | os.PathLike,
    out: str | os.PathLike,
    *,
    opset: int = DEFAULT_OPSET,
    verify: bool = True,
    tolerance: float = 1e-4,
    mean: Sequence[float] = HALF,
    std: Sequence[float] = HALF,
    input_format: InputFormat = "float",
) -> ExportReport:
    """Export the test feature of a ReID model (or of any checkpoint passreid reads) to ONNX.

    Args:
        model_or_checkpoint: a ReID model (a ``.base`` PassViT, eval forward -> (B, F))
            or a checkpoint path for :func:`passreid.checkpoint.build_model_from_checkpoint`.
        out: the ``.onnx`` file to write.
        opset: ONNX opset (>= 18 for this exporter).
        verify: run onnxruntime on batches of 1 and 3 and compare with torch.
        tolerance: the largest allowed |onnxruntime - torch| when verifying.
        mean, std: the input normalisation (inside the graph unless ``input_format``
            is ``"normalised"``), stored in the metadata.
        input_format: ``"float"`` RGB in [0, 1], ``"uint8"`` RGB in 0..255, or
            ``"normalised"`` (the caller normalises); see the module.

    Raises:
        ConfigError: onnx / onnxscript / onnxruntime missing, an opset below 18,
            or an unknown ``input_format``.
        CheckpointError: the exported graph disagrees with torch by more than ``tolerance``.
    """
    onnx = _require("onnx")
    if _compat.DYNAMO_ONNX_EXPORT:
        _require("onnxscript")
    if opset < DEFAULT_OPSET:
        raise ConfigError(f"opset {opset} is too old for the torch.export-based exporter; use {DEFAULT_OPSET} or newer")
    if input_format not in INPUT_FORMATS:
        raise ConfigError(f"input_format must be one of {', '.join(INPUT_FORMATS)}, got {input_format!r}")
    if isinstance(model_or_checkpoint, nn.Module):
        model = model_or_checkpoint
    else:
        from passreid.checkpoint import build_model_from_checkpoint

        model, report = build_model_from_checkpoint(model_or_checkpoint, device="cpu")
        logger.info("loaded %s: %s", model_or_checkpoint, report.summary())
    model = model.float().cpu().eval()
    img_size: tuple[int, int] = tuple(model.base.img_size)  # type: ignore[assignment]
    graph = model if input_format == "normalised" else _WithNormalisation(model, input_format, mean, std).eval()
    example = (torch.randint(0, 256, (2, 3, *img_size), dtype=torch.uint8) if input_format == "uint8"
               else torch.rand(2, 3, *img_size))
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings(), _quiet_loggers("onnxscript", "onnx_ir", "torch.onnx"):
        warnings.simplefilter("ignore")  # exporter chatter about decompositions is not actionable for users
        if _compat.DYNAMO_ONNX_EXPORT:
            proto = _export_dynamo(graph, example, opset)
        else:
            proto = onnx.load_model_from_string(_export_torchscript(graph, example, opset))
    feat_dim = int(model.feat_dim)
    resize = eval_interpolation(model)
    contract = input_contract(input_format, img_size, resize, mean, std)
    metadata = {
        "input": input_format,
        "input_contract": contract,
        "img_size": json.dumps(list(img_size)),
        "resize": resize,
        "mean": json.dumps(list(mean)),
        "std": json.dumps(list(std)),
        "feat_dim": str(feat_dim),
        "producer": f"passreid {__version__}",
    }
    for key, value in metadata.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    with atomic_write(out) as f:
        f.write(proto.SerializeToString())  # what onnx.save_model writes (no external data)
    logger.info("wrote %s (opset %d, %s -> %s (B, %d))", out, opset, contract, OUTPUT_NAME, feat_dim)
    max_diff = verify_onnx(out, model, tolerance=tolerance) if verify else None
    return ExportReport(path=out, img_size=img_size, feat_dim=feat_dim, opset=opset, max_abs_diff=max_diff,
                        input_format=input_format, contract=contract)


def onnx_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The ``metadata_props`` of an ONNX file as a dict (what :func:`export_onnx` recorded)."""
    onnx = _require("onnx")
    return {p.key: p.value for p in onnx.load(os.fspath(path), load_external_data=False).metadata_props}


def _export_dynamo(model: nn.Module, example: torch.Tensor, opset: int) -> Any:
    """The ``torch.export``-based exporter (torch 2.8+): the ``onnx.ModelProto``."""
    batch = torch.export.Dim("batch", min=1)
    program = torch.onnx.export(
        model,
        (example,),
        input_names=[INPUT_NAME],
        output_names=[OUTPUT_NAME],
        dynamic_shapes=({0: batch},),
        opset_version=opset,
        dynamo=True,
        verbose=False,
    )
    return program.model_proto


def _export_torchscript(model: nn.Module, example: torch.Tensor, opset: int) -> bytes:
    """The TorchScript exporter (torch before 2.8): the serialised model, batch axis named ``batch``."""
    extra: dict[str, Any] = {}
    if "dynamo" in inspect.signature(torch.onnx.export).parameters:
        extra["dynamo"] = False  # torch 2.9+ defaults to the torch.export-based exporter
    buffer = io.BytesIO()
    torch.onnx.export(
        model,
        (example,),
        buffer,
        input_names=[INPUT_NAME],
        output_names=[OUTPUT_NAME],
        dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
        opset_version=opset,
        do_constant_folding=True,
        verbose=False,
        **extra,
    )
    return buffer.getvalue()


@torch.no_grad()
def verify_onnx(path: str | os.PathLike, model: nn.Module, *, batch_sizes: Sequence[int] = (1, 3),
                tolerance: float = 1e-4, seed: int = 0) -> float:
    """Largest |onnxruntime - torch| on random batches of each size (CPU, fp32).

    The inputs follow the graph's recorded contract (``input`` in its metadata;
    a graph without it takes normalised images): raw images go to the graph, and
    torch gets them normalised as the contract says.

    Raises:
        CheckpointError: above ``tolerance``, or the graph's output shape is wrong.
    """
    ort = _require("onnxruntime")
    meta = onnx_metadata(path)
    input_format = meta.get("input", "normalised")
    mean = torch.tensor(json.loads(meta.get("mean", json.dumps(HALF)))).view(1, 3, 1, 1)
    std = torch.tensor(json.loads(meta.get("std", json.dumps(HALF)))).view(1, 3, 1, 1)
    session = ort.InferenceSession(os.fspath(path), providers=["CPUExecutionProvider"])
    model = model.float().cpu().eval()
    generator = torch.Generator().manual_seed(seed)
    worst = 0.0
    for b in batch_sizes:
        shape = (b, 3, *model.base.img_size)
        if input_format == "uint8":
            images = torch.randint(0, 256, shape, dtype=torch.uint8, generator=generator)
        elif input_format == "float":
            images = torch.rand(shape, generator=generator)
        else:
            images = torch.randn(shape, generator=generator)
        expected = model(preprocess(images, input_format, mean, std)).numpy()
        got = session.run([OUTPUT_NAME], {INPUT_NAME: images.numpy()})[0]
        if got.shape != expected.shape:
            raise CheckpointError(f"{path}: output shape {got.shape} for batch {b}, torch gives {expected.shape}")
        worst = max(worst, float(np.abs(got - expected).max()))
    if worst > tolerance:
        raise CheckpointError(f"{path}: onnxruntime differs from torch by {worst:.2e} (tolerance {tolerance:.0e})")
    logger.info("onnxruntime matches torch on batches %s: max abs diff %.2e", list(batch_sizes), worst)
    return worst


# ----------------------------------------------------------------------------- backbone export


def export_backbone(checkpoint: str | Path, out: str | Path) -> dict[str, Any]:
    """Write the teacher backbone of ``checkpoint`` as a plain ``{name: tensor}`` state dict with the PASS
    names (DESIGN §2) to ``out``, and ``{"meta", "config"}`` to ``out`` with suffix ``.json``.

    ``checkpoint`` is a training checkpoint of :func:`run_pretrain` or any format
    :func:`passreid.checkpoint.parse_checkpoint` knows (a published PASS or DINO
    pretraining checkpoint, a bare or timm backbone). A plain-DINO ablation
    trained no part tokens: they are written as copies of the class token and
    its position, as a DINO checkpoint is converted (DESIGN §2 (d)).

    Returns:
        the sidecar dict (``meta`` holds ``img_size``, ``arch``, ``source``, ``format``, ``epoch``).

    Raises:
        CheckpointError: no backbone, or its names are not exactly those of a PASS ViT.
    """
    from passreid.checkpoint import (
        backbone_arch,
        build_meta,
        checkpoint_img_size,
        config_value,
        load_parsed,
        write_export,
    )

    parsed = load_parsed(checkpoint)
    if parsed.unknown:
        raise CheckpointError(f"{checkpoint}: tensors outside the backbone layout: {', '.join(sorted(parsed.unknown))}")
    state = {k: v.detach().clone().contiguous() for k, v in parsed.backbone.items()}
    mode = config_value(parsed.config, "model.mode") or "pass"
    if mode == "dino":
        for k in range(1, NUM_PARTS + 1):
            state[f"part_token{k}"] = state["cls_token"].clone()
            state[f"part{k}_pos"] = state["cls_pos"].clone()
    arch = backbone_arch(state)
    img_size, _ = checkpoint_img_size(parsed)
    reference = PassViT(img_size=img_size, patch_size=arch["patch_size"], embed_dim=arch["embed_dim"],
                        depth=arch["depth"], num_heads=arch["num_heads"], mlp_ratio=arch["mlp_ratio"],
                        qkv_bias=arch["qkv_bias"]).state_dict()
    missing = sorted(set(reference) - set(state))
    unexpected = sorted(set(state) - set(reference))
    wrong = sorted(k for k in set(reference) & set(state) if reference[k].shape != state[k].shape)
    if missing or unexpected or wrong:
        raise CheckpointError(f"{checkpoint}: the backbone does not have the PASS layout; missing: {missing}, "
                              f"unexpected: {unexpected}, shapes differ: {wrong}")
    meta = dict(parsed.meta or build_meta(None))
    meta.update(img_size=list(img_size), arch=arch, source=str(checkpoint), format=parsed.format,
                epoch=parsed.epoch, mode=mode)
    sidecar = {"meta": meta, "config": parsed.config}
    out = write_export(state, out, sidecar)
    logger.info("exported the %s backbone of %s (%d tensors, %s) to %s", parsed.format, checkpoint, len(state),
                "x".join(map(str, img_size)), out)
    return sidecar
