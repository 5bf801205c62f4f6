"""The end-to-end demo: an ordered list of stages on two synthetic domains.

Each training stage registers itself with :func:`register_demo_stage`, so adding a
stage never edits another. Stages share artefacts through ``DemoContext.state``
(for example the path of a pretrained backbone). The whole demo uses the tiny
model at 128x64 and must stay within 5 minutes on 2 CPU cores.
"""

from __future__ import annotations

import logging
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

logger = logging.getLogger(__name__)

# The model and data every stage of the demo uses (DESIGN §8: tiny model, 128x64).
DEMO_MODEL: dict[str, Any] = {"name": "pass_vit_tiny", "depth": 4}
DEMO_IMG_SIZE: tuple[int, int] = (128, 64)
DEMO_DATA: dict[str, int] = {"num_ids": 100, "num_cams": 6, "images_per_cam": 2}


@dataclass
class DemoContext:
    """What the stages share: folders, device and the artefacts earlier stages left."""

    workdir: Path
    source_root: Path
    target_root: Path
    device: torch.device
    seed: int = 0
    state: dict[str, Any] = field(default_factory=dict)


@dataclass
class StageResult:
    """One row of the demo table; ``mINP`` is None where a stage did not compute it."""

    name: str
    mAP: float
    rank1: float
    seconds: float
    mINP: float | None = None

    def as_dict(self) -> dict[str, Any]:
        row: dict[str, Any] = {"name": self.name, "mAP": self.mAP, "rank1": self.rank1,
                               "seconds": round(self.seconds, 2)}
        if self.mINP is not None:
            row["mINP"] = self.mINP
        return row


StageFn = Callable[[DemoContext], list[StageResult]]
_STAGES: list[tuple[float, str, StageFn]] = []


def register_demo_stage(order: float, name: str) -> Callable[[StageFn], StageFn]:
    """Add ``fn`` to the demo; stages run by ascending ``order``."""

    def decorator(fn: StageFn) -> StageFn:
        if all(existing != name for _, existing, _ in _STAGES):
            _STAGES.append((order, name, fn))
        return fn

    return decorator


STAGE_MODULES: tuple[str, ...] = ("passreid.finetune", "passreid.pretrain", "passreid.cluster", "passreid.visualize")
"""Modules that register demo stages when imported (the command modules stay light for ``--help``)."""


def demo_stages() -> list[tuple[float, str, StageFn]]:
    """Every registered stage as ``(order, name, fn)``, by ascending order (imports :data:`STAGE_MODULES`)."""
    import importlib

    for module in STAGE_MODULES:
        importlib.import_module(module)
    return sorted(_STAGES, key=lambda s: s[0])


def raise_if_stopped(result: dict[str, Any]) -> None:
    """A training stage of the demo that was stopped by Ctrl-C/SIGTERM ends the demo as an interrupt
    (it has no metrics to report)."""
    if result.get("stopped"):
        raise KeyboardInterrupt


def result_from_metrics(name: str, metrics: dict[str, Any], seconds: float) -> StageResult:
    """A table row from a metrics dict (``mAP``, ``cmc`` and, when present, ``mINP``)."""
    minp = metrics.get("mINP")
    return StageResult(name=name, mAP=float(metrics["mAP"]), rank1=float(metrics["cmc"][0]), seconds=seconds,
                       mINP=None if minp is None else float(minp))


# Source and target domains, as in the published MSMT17 -> Market-1501 UDA row: the
# source has the more varied cameras (indoor and outdoor light, wide colour casts), so
# a model trained there transfers; the target is the easier, more uniform domain.
DEMO_DOMAINS: tuple[str, str] = ("msmt", "market")


def prepare_data(workdir: Path, seed: int) -> tuple[Path, Path]:
    """Write the two synthetic domains (A: source, B: target) unless they exist already."""
    from passreid.data.synthetic import generate_synthetic

    roots = []
    for offset, domain in enumerate(DEMO_DOMAINS):
        root = workdir / f"synth_{domain}"
        if not (root / "query").is_dir():
            generate_synthetic(root, seed=seed + offset, domain=domain, **DEMO_DATA)
        roots.append(root)
    return roots[0], roots[1]


DEMO_MARKER = ".passreid-demo"
"""File that marks a folder as a demo work folder, which a later demo may clear."""


def prepare_workdir(workdir: Path) -> None:
    """Create ``workdir`` or clear the runs of an earlier demo in it (its synthetic data is kept and reused).

    A non-empty folder that is not a demo work folder is refused, so that
    ``--workdir`` never deletes a user's files.
    """
    from passreid.errors import ConfigError

    if workdir.exists() and not workdir.is_dir():
        raise ConfigError(f"--workdir {workdir} is a file, not a folder")
    workdir.mkdir(parents=True, exist_ok=True)
    entries = [p for p in workdir.iterdir() if p.name != DEMO_MARKER]
    if entries and not (workdir / DEMO_MARKER).exists():
        raise ConfigError(f"--workdir {workdir} is not empty and was not made by passreid demo "
                          f"({', '.join(sorted(p.name for p in entries)[:5])}); choose a new or empty folder")
    for entry in entries:
        if entry.name.startswith("synth_"):
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()
    (workdir / DEMO_MARKER).write_text("a passreid demo work folder: `passreid demo` clears its runs\n")


def versions() -> dict[str, str]:
    """Versions that decide the demo's numbers: passreid, python, torch, torchvision, numpy, timm."""
    import importlib.metadata
    import platform

    from passreid import __version__

    found = {"passreid": __version__, "python": platform.python_version()}
    for package in ("torch", "torchvision", "numpy", "timm"):
        try:
            found[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            found[package] = "not installed"
    return found


def run_demo(workdir: Path, *, device: torch.device, seed: int = 0,
             only: list[str] | None = None) -> dict[str, Any]:
    """Run every registered stage in order; returns the demo JSON (DESIGN §8).

    The JSON is ``{"stages": [{"name", "mAP", "rank1", "seconds", "mINP"}, ...], "seconds",
    "seed", "device", "workdir", "versions"}``; the work folder keeps the data, runs and pictures.
    """
    start = time.perf_counter()
    prepare_workdir(workdir)
    source, target = prepare_data(workdir, seed)
    ctx = DemoContext(workdir=workdir, source_root=source, target_root=target, device=device, seed=seed)
    results: list[StageResult] = []
    for _, name, fn in demo_stages():
        if only and name not in only:
            continue
        logger.info("demo stage %s", name)
        results.extend(fn(ctx))
    return {"stages": [r.as_dict() for r in results], "seconds": round(time.perf_counter() - start, 2),
            "seed": seed, "device": str(device), "workdir": str(workdir), "versions": versions()}


@register_demo_stage(order=0, name="random-init")
def random_init_stage(ctx: DemoContext) -> list[StageResult]:
    """The floor every trained stage must beat: features of an untrained tiny PASS ViT."""
    from passreid.data.datasets import build_dataset
    from passreid.features import evaluate_model
    from passreid.models import ReIDModel, create_model

    t0 = time.perf_counter()
    torch.manual_seed(ctx.seed)
    backbone = create_model(DEMO_MODEL["name"], img_size=DEMO_IMG_SIZE, depth=DEMO_MODEL["depth"])
    model = ReIDModel(backbone).to(ctx.device)
    dataset = build_dataset("synthetic", ctx.source_root)
    metrics = evaluate_model(model, dataset, img_size=DEMO_IMG_SIZE, device=ctx.device, num_workers=0)
    return [result_from_metrics("random-init", metrics, time.perf_counter() - t0)]
