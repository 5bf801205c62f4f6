"""The end-to-end demo: an ordered list of stages on two synthetic domains.

Each training stage registers itself with :func:`register_demo_stage`, so adding a
stage never edits another. Stages share artefacts through ``DemoContext.state``
(for example the path of a pretrained backbone). The whole demo uses the tiny
model at 128x64 and must stay within 5 minutes on 2 CPU cores.
"""

from __future__ import annotations

import logging
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
    name: str
    mAP: float
    rank1: float
    seconds: float

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "mAP": self.mAP, "rank1": self.rank1, "seconds": round(self.seconds, 2)}


StageFn = Callable[[DemoContext], list[StageResult]]
_STAGES: list[tuple[float, str, StageFn]] = []


def register_demo_stage(order: float, name: str) -> Callable[[StageFn], StageFn]:
    """Add ``fn`` to the demo; stages run by ascending ``order``."""

    def decorator(fn: StageFn) -> StageFn:
        if all(existing != name for _, existing, _ in _STAGES):
            _STAGES.append((order, name, fn))
        return fn

    return decorator


def demo_stages() -> list[tuple[float, str, StageFn]]:
    return sorted(_STAGES, key=lambda s: s[0])


def result_from_metrics(name: str, metrics: dict[str, Any], seconds: float) -> StageResult:
    return StageResult(name=name, mAP=float(metrics["mAP"]), rank1=float(metrics["cmc"][0]), seconds=seconds)


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


def run_demo(workdir: Path, *, device: torch.device, seed: int = 0,
             only: list[str] | None = None) -> dict[str, Any]:
    """Run every registered stage in order; returns the demo JSON (DESIGN §8)."""
    start = time.perf_counter()
    workdir.mkdir(parents=True, exist_ok=True)
    source, target = prepare_data(workdir, seed)
    ctx = DemoContext(workdir=workdir, source_root=source, target_root=target, device=device, seed=seed)
    results: list[StageResult] = []
    for _, name, fn in demo_stages():
        if only and name not in only:
            continue
        logger.info("demo stage %s", name)
        results.extend(fn(ctx))
    return {"stages": [r.as_dict() for r in results], "seconds": round(time.perf_counter() - start, 2)}


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
