"""The end-to-end demo: an ordered list of stages on two synthetic domains.

:data:`DEMO_STAGES` lists the stages in the order they run; a stage is a function
of the shared :class:`DemoContext` that returns table rows, and adding one is
one entry there. Stages share artefacts through ``DemoContext.state`` (for
example the path of a pretrained backbone). The stage modules are imported
inside the stages, so ``passreid demo --help`` stays fast. The whole demo uses
the tiny model at 128x64 and must stay within 5 minutes on 2 CPU cores.
"""

from __future__ import annotations

import logging
import math
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

if TYPE_CHECKING:
    from passreid.cluster import ClusterConfig
    from passreid.finetune import FinetuneConfig
    from passreid.pretrain import PretrainConfig

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
    """Run the stages of :data:`DEMO_STAGES` in order (those named in ``only``, if given); returns the
    demo JSON (DESIGN §8).

    The JSON is ``{"stages": [{"name", "mAP", "rank1", "seconds", "mINP"}, ...], "seconds",
    "seed", "device", "workdir", "versions"}``; the work folder keeps the data, runs and pictures.
    """
    start = time.perf_counter()
    prepare_workdir(workdir)
    source, target = prepare_data(workdir, seed)
    ctx = DemoContext(workdir=workdir, source_root=source, target_root=target, device=device, seed=seed)
    results: list[StageResult] = []
    for name, fn in DEMO_STAGES:
        if only and name not in only:
            continue
        logger.info("demo stage %s", name)
        results.extend(fn(ctx))
    return {"stages": [r.as_dict() for r in results], "seconds": round(time.perf_counter() - start, 2),
            "seed": seed, "device": str(device), "workdir": str(workdir), "versions": versions()}


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


# ----------------------------------------------------------------------------- fine-tuning


FINETUNE_EPOCHS = 10
"""Demo fine-tuning length: about 50 s for the tiny model on 2 CPU cores (DESIGN §8 budget)."""


def finetune_config(ctx: DemoContext, name: str, pretrained: str | None = None) -> FinetuneConfig:
    """The short CPU recipe of the demo: tiny ViT at 128x64, AdamW, a short warm-up.

    The published recipe (SGD, 20 of 120 epochs of warm-up) suits a pretrained
    ViT-S and a GPU; a few CPU epochs of a tiny model, possibly from random
    initialisation, learn far more with AdamW at 1e-3 and small batches (on the
    demo data, 8 epochs: mAP ~0.39 against ~0.15 for the best SGD rate tried).
    Ten epochs also need every step: the demo keeps the cover-all P x K epoch
    and one warm-up epoch (with the published epoch length and two warm-up
    epochs, of which the first trains at the warm-up start, the finetune stage
    fell from 18.7 to 10.1 mAP; with these two settings it measured 16.8).
    """
    from passreid.config import DataConfig, ModelConfig, RunConfig
    from passreid.finetune import FinetuneConfig, OptimConfig

    return FinetuneConfig(
        data=DataConfig(dataset="synthetic", root=str(ctx.source_root), img_size=list(DEMO_IMG_SIZE),
                        num_workers=1),
        model=ModelConfig(name=DEMO_MODEL["name"], depth=DEMO_MODEL["depth"], drop_path_rate=0.0,
                          pretrained=pretrained or ""),
        run=RunConfig(output_dir=str(ctx.workdir / name), seed=ctx.seed, epochs=FINETUNE_EPOCHS,
                      eval_every=FINETUNE_EPOCHS, log_every=10, device=str(ctx.device)),
        optim=OptimConfig(name="adamw", lr=1e-3, bias_lr_factor=1.0, weight_decay=0.05, weight_decay_bias=0.0,
                          warmup_epochs=1, warmup_factor=0.1, batch_size=16, num_instances=4, cover_all_images=True),
    )


def finetune_for_demo(ctx: DemoContext, name: str, pretrained: str | None = None) -> StageResult:
    """Fine-tune the demo model on ``ctx.source_root`` (from ``pretrained`` or random init) and evaluate it.

    The exported model's path goes to ``ctx.state["finetuned_checkpoint"]``
    (the latest fine-tuned model: later stages such as UDA start from it) and
    to ``ctx.state[f"{name}_checkpoint"]``.
    """
    from passreid.finetune import run_finetune
    from passreid.runtime import cores_beside_workers

    start = time.perf_counter()
    cfg = finetune_config(ctx, name, pretrained)
    with cores_beside_workers(cfg.data.num_workers, cfg.run.device):
        result = run_finetune(cfg)
    raise_if_stopped(result)
    ctx.state["finetuned_checkpoint"] = result["model"]
    ctx.state[f"{name}_checkpoint"] = result["model"]
    metrics = {"mAP": result["metrics"]["mAP"], "mINP": result["metrics"]["mINP"], "cmc": [result["metrics"]["rank1"]]}
    return result_from_metrics(name, metrics, time.perf_counter() - start)


def finetune_stage(ctx: DemoContext) -> list[StageResult]:
    """Supervised fine-tuning of the tiny model from random initialisation on the source domain."""
    return [finetune_for_demo(ctx, "finetune")]


# ----------------------------------------------------------------------------- pretraining


PRETRAIN_LOCAL_SIZE = (64, 32)
PRETRAIN_EPOCHS = 3
"""About 50 s of pretraining for the tiny model on 2 CPU cores (~25 images/s over 3 x 384 images)."""


def pretrain_config(ctx: DemoContext, output_dir: Path) -> PretrainConfig:
    """A short CPU recipe: the demo's tiny ViT at 128x64 (locals 64x32), small heads.

    The PIL multi-crop runs in one loader worker while the model trains on the
    other core. The published learning rate (5e-4 x 32/256) with one warm-up
    epoch; the teacher follows the student faster than the published 0.996,
    since the export is the teacher and there are only ~35 steps. (A peak rate
    of 5e-4 made the outputs collapse to uniform within these steps.)
    """
    from passreid.config import RunConfig
    from passreid.pretrain import (
        AugConfig,
        PretrainConfig,
        PretrainDataConfig,
        PretrainEvalConfig,
        PretrainModelConfig,
        PretrainOptimConfig,
    )

    return PretrainConfig(
        data=PretrainDataConfig(root=str(ctx.source_root / "bounding_box_train"), img_size=list(DEMO_IMG_SIZE),
                                batch_size=32, num_workers=1),
        aug=AugConfig(backend="cpu", decode_size=list(DEMO_IMG_SIZE), local_size=list(PRETRAIN_LOCAL_SIZE)),
        model=PretrainModelConfig(name=DEMO_MODEL["name"], depth=DEMO_MODEL["depth"], drop_path_rate=0.1,
                                  out_dim=1024, hidden_dim=512, bottleneck_dim=128),
        optim=PretrainOptimConfig(lr=5e-4, warmup_epochs=1, momentum_teacher=0.99),
        eval=PretrainEvalConfig(dataset="synthetic", root=str(ctx.source_root), every=PRETRAIN_EPOCHS),
        run=RunConfig(output_dir=str(output_dir), seed=ctx.seed, epochs=PRETRAIN_EPOCHS, log_every=10,
                      device=str(ctx.device)),
    )


def pass_pretrain_stage(ctx: DemoContext) -> list[StageResult]:
    """PASS in the demo: a short live pretraining, then fine-tuning from the shipped pretrained backbone.

    Pretraining that helps takes ~2,400 steps (35 minutes on 2 cores, issue #14), longer than the whole
    demo, so the fine-tuning starts from :data:`passreid.assets.DEMO_BACKBONE`, which ``passreid
    pretrain`` made with ``configs/pretrain/synthetic_tiny.yaml`` (:data:`~passreid.assets.DEMO_BACKBONE_COMMANDS`).
    The live run (3 epochs of PASS on the source training images, labels unused) shows the command and
    its monitor at work; its export goes to ``ctx.state["pretrained_backbone"]``.

    Three rows: the monitor's frozen-feature figures on the source test set for the live run's teacher
    (``pass-pretrain (frozen)``) and for the shipped backbone (``pass-checkpoint (frozen)``), both to read
    against ``random-init``; and the model fine-tuned from the shipped backbone (``pass-pretrain+finetune``,
    to read against ``finetune``)."""
    from passreid.assets import DEMO_BACKBONE
    from passreid.checkpoint import load_checkpoint
    from passreid.data.datasets import build_dataset
    from passreid.errors import TrainingError
    from passreid.models import create_model
    from passreid.monitor import RetrievalMonitor
    from passreid.pretrain import run_pretrain
    from passreid.runtime import cores_beside_workers
    from passreid.training.rundir import RunDir

    start = time.perf_counter()
    run_path = ctx.workdir / "pass-pretrain"
    if run_path.exists():
        shutil.rmtree(run_path)
    cfg = pretrain_config(ctx, run_path)
    with cores_beside_workers(cfg.data.num_workers, cfg.run.device):
        result = run_pretrain(cfg)
    raise_if_stopped(result)
    if result["backbone"] is None:
        raise TrainingError("demo pretraining stopped before the end")
    ctx.state["pretrained_backbone"] = result["backbone"]
    pretrain_seconds = time.perf_counter() - start
    last = result["metrics"]  # the last epoch's record, with the monitor's figures (eval.every = PRETRAIN_EPOCHS)
    before = RunDir(run_path).read_metrics()[0]  # epoch 0: the random-init teacher
    logger.info("demo pretraining: %.0f s, last loss %.4f; frozen features on the source test set: mAP %.1f%% "
                "before, %.1f%% after", pretrain_seconds, last.get("loss", math.nan), 100 * before["mAP"],
                100 * last["mAP"])
    live = result_from_metrics("pass-pretrain (frozen)", {"mAP": last["mAP"], "cmc": [last["rank1"]],
                                                          "mINP": last["mINP"]}, pretrain_seconds)

    t0 = time.perf_counter()
    backbone = create_model(DEMO_MODEL["name"], img_size=DEMO_IMG_SIZE, depth=DEMO_MODEL["depth"])
    load_checkpoint(backbone, DEMO_BACKBONE)
    monitor = RetrievalMonitor(build_dataset("synthetic", ctx.source_root), DEMO_IMG_SIZE, device=ctx.device)
    shipped = monitor(backbone.to(ctx.device))  # what the live run's monitor computes, for the shipped backbone
    logger.info("shipped pretrained backbone %s: frozen mAP %.1f%% on the source test set", DEMO_BACKBONE.name,
                100 * shipped["mAP"])
    checkpoint = result_from_metrics("pass-checkpoint (frozen)", {"mAP": shipped["mAP"], "cmc": [shipped["rank1"]],
                                                                  "mINP": shipped["mINP"]}, time.perf_counter() - t0)
    stage = finetune_for_demo(ctx, "pass-pretrain+finetune", pretrained=str(DEMO_BACKBONE))
    return [live, checkpoint, stage]


# ----------------------------------------------------------------------------- domain adaptation


UDA_EPOCHS = 5
"""Demo adaptation length: with the settings below about 45 s for the tiny model on 2 CPU cores."""


def uda_config(ctx: DemoContext, pretrained: str) -> ClusterConfig:
    """The short CPU recipe of the demo's UDA stage (MSMT17->Market row layout: cat fusion, multi-neck).

    It departs from the published recipe where a few dozen steps of a tiny model
    need it: training images get a colour jitter (without it the synthetic
    cameras' light and colour casts are the easiest thing to learn from noisy
    clusters, and the adapted model fell back to the direct-transfer mAP or
    below), the neck statistics are calibrated before the first epoch, the
    memory follows the batch mean of each cluster (the hardest instance of a
    tiny model's augmented images is mostly noise), AdamW at a small rate keeps
    the source features, and k1/k2 fit ~8 images per identity instead of
    Market's ~17. The small eps keeps only tight clusters (about a quarter of
    the images at first): the source model's looser clusters mix identities,
    and training on them drifted towards camera features.
    """
    from passreid.cluster import ClusterConfig, ClusterOptimConfig, ClusterSettings
    from passreid.config import DataConfig, ModelConfig, RunConfig

    return ClusterConfig(
        data=DataConfig(dataset="synthetic", root=str(ctx.target_root), img_size=list(DEMO_IMG_SIZE),
                        num_workers=1, color_jitter=0.3),
        model=ModelConfig(name=DEMO_MODEL["name"], depth=DEMO_MODEL["depth"], drop_path_rate=0.0,
                          pretrained=pretrained, fusion="cat", neck="multi", test_feature="after"),
        run=RunConfig(output_dir=str(ctx.workdir / "uda"), seed=ctx.seed, epochs=UDA_EPOCHS,
                      eval_every=UDA_EPOCHS, log_every=10, device=str(ctx.device)),
        cluster=ClusterSettings(eps=0.35, k1=6, k2=3, memory_mode="mean", calibrate_necks=True),
        optim=ClusterOptimConfig(name="adamw", lr=1e-4, weight_decay=0.05, batch_size=32, num_instances=4,
                                 iters=30, step_size=UDA_EPOCHS),
    )


def uda_stage(ctx: DemoContext) -> list[StageResult]:
    """Direct transfer of the source fine-tuned model to the target domain, then UDA by cluster contrast.

    Both are evaluated on the target domain's query/gallery: ``direct-transfer``
    with the source model's own test feature, ``uda`` after adapting on the
    target train split without its labels.
    """
    from passreid.checkpoint import build_model_from_checkpoint
    from passreid.cluster import run_cluster
    from passreid.data.datasets import build_dataset
    from passreid.features import evaluate_model
    from passreid.runtime import cores_beside_workers

    start = time.perf_counter()
    if ctx.state.get("finetuned_checkpoint") is None:
        finetune_for_demo(ctx, "finetune")
    source_model = str(ctx.state["finetuned_checkpoint"])
    model, _ = build_model_from_checkpoint(source_model, device=ctx.device)
    target = build_dataset("synthetic", ctx.target_root)
    direct = evaluate_model(model, target, img_size=DEMO_IMG_SIZE, device=ctx.device, num_workers=0)
    direct_result = result_from_metrics("direct-transfer", direct, time.perf_counter() - start)

    start = time.perf_counter()
    cfg = uda_config(ctx, source_model)
    with cores_beside_workers(cfg.data.num_workers, cfg.run.device):
        result = run_cluster(cfg, mode="uda")
    raise_if_stopped(result)
    metrics = {"mAP": result["metrics"]["mAP"], "mINP": result["metrics"].get("mINP"), "cmc": result["metrics"]["cmc"]}
    return [direct_result, result_from_metrics("uda", metrics, time.perf_counter() - start)]


# ----------------------------------------------------------------------------- pictures


def visualize_stage(ctx: DemoContext) -> list[StageResult]:
    """Ranked list of the worst query (lowest AP) and attention maps of the best one, fine-tuned demo model.

    Writes ``ranked_list.png`` and ``attention.png`` into ``ctx.workdir`` and
    records them in ``ctx.state["pictures"]`` (name -> path). Adds no metrics row.
    """
    from passreid.api import load
    from passreid.data.datasets import build_dataset
    from passreid.errors import DatasetError
    from passreid.visualize import attention_figure, rank_queries, ranked_list_grid, worst_queries

    checkpoint = ctx.state.get("finetuned_checkpoint")
    if checkpoint is None or not Path(checkpoint).is_file():
        logger.info("visualize stage skipped: no fine-tuned checkpoint in the demo state")
        return []
    t0 = time.perf_counter()
    pipeline = load(checkpoint, device=ctx.device)
    dataset = build_dataset("synthetic", ctx.source_root)
    query_paths = [r.path for r in dataset.query]
    gallery_paths = [r.path for r in dataset.gallery]
    qf = pipeline.extract(query_paths, batch_size=128)
    gf = pipeline.extract(gallery_paths, batch_size=128)
    def labels(records: list, field: str) -> np.ndarray:
        return np.array([getattr(r, field) for r in records])

    rankings = rank_queries(qf, gf, labels(dataset.query, "pid"), labels(dataset.gallery, "pid"),
                            labels(dataset.query, "camid"), labels(dataset.gallery, "camid"))
    worst = worst_queries(rankings.ap, 1)
    if not worst:
        raise DatasetError(f"no query of {ctx.source_root} has a correct match in its gallery")
    q = worst[0]
    valid = rankings.top[q] >= 0
    ranked = [gallery_paths[j] for j in rankings.top[q][valid]]
    correct = rankings.top_correct[q][valid].tolist()
    pictures = ctx.state.setdefault("pictures", {})
    pictures["ranked_list"] = ctx.workdir / "ranked_list.png"
    ranked_list_grid(query_paths[q], ranked, rankings.top_dist[q][valid], correct, out=pictures["ranked_list"])
    # The best-served query beside its first correct match: do the part tokens find the same body parts?
    best = int(np.nanargmax(rankings.ap))
    match = [gallery_paths[j] for j, ok in zip(rankings.top[best], rankings.top_correct[best]) if ok and j >= 0]
    pictures["attention"] = ctx.workdir / "attention.png"
    attention_figure(pipeline.model, [query_paths[best], *match[:1]], out=pictures["attention"])
    logger.info("visualize: worst query %s (AP %.3f); pictures in %s (%.1f s)", Path(query_paths[q]).name,
                rankings.ap[q], ctx.workdir, time.perf_counter() - t0)
    return []


# ----------------------------------------------------------------------------- the stages, in order


DEMO_STAGES: list[tuple[str, StageFn]] = [
    ("random-init", random_init_stage),
    ("finetune", finetune_stage),
    ("pass-pretrain+finetune", pass_pretrain_stage),
    ("uda", uda_stage),
    ("visualize", visualize_stage),
]
"""Every stage of the demo as ``(name, fn)``, in the order they run (``--only`` takes these names)."""
