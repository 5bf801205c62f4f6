"""Does pretraining help? Random init vs plain DINO vs PASS on the tiny ViT, same compute, 3 seeds.

The ladder the method is about (PASS paper, Table 4 at full scale), measured at
CPU scale on synthetic data:

1. an unlabeled pretraining pool, LUPerson-like (``generate_pool`` with 50
   cameras from three domain styles, each filming ~120 people, every person in
   4 images, the background behind each a patchwork of other scenes:
   ``passreid synth --pool 6000 --scenes 50``; ``--no-clutter`` for one scene
   behind each image, the pool of the earlier rounds);
2. a labelled msmt-style set with disjoint identities: its train split (100
   identities) for a short fine-tuning, its query/gallery (100 other identities)
   for every evaluation;
3. per seed: the tiny ViT (depth 4, 128x64) from random init, pretrained with
   plain DINO (``model.mode=dino``) and with PASS, both with the recipe
   ``configs/pretrain/synthetic_tiny.yaml`` and the same steps, batch and views
   (``--epochs`` over the pool, by default the recipe's 20: 3,740 steps per
   pretraining on the 6,000-image pool; on 2 CPU cores each takes about 100
   minutes with two others beside it, so the three arms take about 4 hours;
   see the README for the figures. ``--pool-images 3000 --epochs 4`` (375
   steps) fits the hour; at that length no arm moved on the one-scene pool.
   Runs left in ``--workdir`` are picked up: a finished one is reused, an
   interrupted one resumed);
   then for each: frozen-feature mAP/R1 (no training, :mod:`passreid.monitor`)
   and mAP/R1 after the same short fine-tuning (the demo's fine-tuning recipe).

Prints one JSON line: per arm the per-seed figures, their mean and spread, and
whether the issue's targets hold (PASS frozen >= random frozen + 10 mAP; PASS +
fine-tuning >= random + fine-tuning + 5 mAP on the mean with every seed ahead;
PASS vs DINO reported as measured).

    python benchmarks/bench_pretrain_quality.py --jobs 3   # 3 seeds x (2 pretrainings of 3,740 steps + 3 fine-tunings)
    python benchmarks/bench_pretrain_quality.py --quick    # smoke run: one seed, 2 x 8 steps (58 s on 2 idle cores)
    python benchmarks/bench_pretrain_quality.py --arms pass random --jobs 3 --workdir runs/bq   # the targets' arms

``--jobs N`` runs the (arm, seed) units in N one-thread processes. On a GPU
(``--device auto`` picks it; pretraining, frozen features and fine-tuning all
run there), all three arms at twice the recipe's length, with more loader
workers to feed the device (not timed on a GPU yet)::

    python benchmarks/bench_pretrain_quality.py --epochs 40 --jobs 3 data.num_workers=4

``--arms`` runs some of the arms only (the JSON then leaves out the gaps it cannot compute).
"""

from __future__ import annotations

import argparse
import json
import logging
import multiprocessing
import statistics
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
RECIPE = REPO / "configs" / "pretrain" / "synthetic_tiny.yaml"
ARMS = ("random", "dino", "pass")


def make_data(work: Path, pool_images: int, quick: bool, scenes: int, clutter: bool) -> tuple[Path, Path]:
    """The unlabeled pool and the labelled evaluation set (msmt style, 100 + 100 identities)."""
    from passreid.data.synthetic import generate_pool, generate_synthetic

    pool, labelled = work / "pool", work / "labelled"
    if not pool.exists():
        generate_pool(pool, num_images=pool_images, seed=1000, clutter=clutter, num_scenes=scenes)
    if not labelled.exists():
        ids = 40 if quick else 200
        generate_synthetic(labelled, num_ids=ids, num_train_ids=ids // 2, num_cams=6, seed=1001, domain="msmt")
    return pool, labelled


def pretrain(arm: str, seed: int, pool: Path, work: Path, overrides: list[str]) -> tuple[Path, float | None]:
    """Run ``passreid pretrain`` (in process) with the small-scale recipe.

    Returns the exported backbone and the seconds the pretraining took here. A run
    folder left in ``work`` by an interrupted benchmark is resumed from its
    ``last.pth``; a finished one (its ``backbone.pth`` written) is not run again and
    its seconds are ``None``.
    """
    from passreid.config import load_config
    from passreid.runtime import cores_beside_workers
    from passreid.pretrain import PretrainConfig, run_pretrain

    folder = work / f"{arm}-{seed}"
    if (folder / "backbone.pth").is_file():
        return folder / "backbone.pth", None
    cfg = load_config(PretrainConfig, RECIPE, [f"data.root={pool}", f"model.mode={arm}", f"run.seed={seed}",
                                               f"run.output_dir={folder}", *overrides])
    resume = "" if (folder / "last.pth").is_file() else None
    t0 = time.perf_counter()
    with cores_beside_workers(cfg.data.num_workers, cfg.run.device):
        result = run_pretrain(cfg, resume=resume)
    if result["backbone"] is None:
        raise RuntimeError(f"pretraining {arm} (seed {seed}) stopped early; run the benchmark again to resume it")
    return Path(result["backbone"]), round(time.perf_counter() - t0, 1)


def frozen(arm: str, seed: int, backbone_path: Path | None, monitor: Any) -> dict[str, float]:
    """Frozen-feature metrics of the backbone (random init drawn from ``seed``)."""
    from passreid.checkpoint import load_checkpoint
    from passreid.demo import DEMO_IMG_SIZE, DEMO_MODEL
    from passreid.models import create_model

    torch.manual_seed(seed)
    backbone = create_model(DEMO_MODEL["name"], img_size=DEMO_IMG_SIZE, depth=DEMO_MODEL["depth"])
    if backbone_path is not None:
        load_checkpoint(backbone, backbone_path)
    return monitor(backbone, "dino" if arm == "dino" else "pass")


def finetune(arm: str, seed: int, backbone_path: Path | None, labelled: Path, work: Path,
             epochs: int | None, device: str) -> dict[str, float]:
    """The demo's short fine-tuning on the labelled train split, evaluated on its query/gallery."""
    from passreid.demo import DemoContext
    from passreid.runtime import cores_beside_workers
    from passreid.demo import finetune_config
    from passreid.finetune import run_finetune

    ctx = DemoContext(workdir=work, source_root=labelled, target_root=labelled, device=torch.device(device),
                      seed=seed)
    cfg = finetune_config(ctx, f"finetune-{arm}-{seed}", pretrained=str(backbone_path or ""))
    if epochs is not None:
        cfg.run.epochs = cfg.run.eval_every = epochs
    with cores_beside_workers(cfg.data.num_workers, cfg.run.device):
        result = run_finetune(cfg)
    if result["stopped"]:
        raise RuntimeError(f"fine-tuning {arm} (seed {seed}) stopped early")
    return {"mAP": result["metrics"]["mAP"], "rank1": result["metrics"]["rank1"]}


def run_unit(arm: str, seed: int, pool: Path, labelled: Path, work: Path, overrides: list[str],
             ft_epochs: int | None, device: str) -> dict[str, float]:
    """One arm at one seed: pretrain (unless random init), then frozen and fine-tuned figures."""
    from passreid.data.datasets import build_dataset
    from passreid.demo import DEMO_IMG_SIZE
    from passreid.monitor import RetrievalMonitor

    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s")
    torch.set_num_threads(1)
    monitor = RetrievalMonitor(build_dataset("synthetic", str(labelled)), DEMO_IMG_SIZE, device=device)
    backbone, seconds = (None, 0.0) if arm == "random" else pretrain(arm, seed, pool, work, overrides)
    fz = frozen(arm, seed, backbone, monitor)
    fn = finetune(arm, seed, backbone, labelled, work, ft_epochs, device)
    unit = {"frozen_mAP": round(100 * fz["mAP"], 2), "frozen_rank1": round(100 * fz["rank1"], 2),
            "finetune_mAP": round(100 * fn["mAP"], 2), "finetune_rank1": round(100 * fn["rank1"], 2),
            "pretrain_seconds": seconds}
    print(f"seed {seed} {arm}: frozen mAP {unit['frozen_mAP']:.1f}, fine-tuned mAP {unit['finetune_mAP']:.1f} "
          f"({'reused' if seconds is None else f'{seconds:.0f} s'} pretraining)", file=sys.stderr, flush=True)
    return unit


def summary(values: list[float]) -> dict[str, float]:
    return {"mean": round(statistics.fmean(values), 2),
            "std": round(statistics.stdev(values), 2) if len(values) > 1 else 0.0,
            "min": round(min(values), 2), "max": round(max(values), 2)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--quick", action="store_true", help="one seed, a small pool, few steps (a smoke run)")
    parser.add_argument("--pool-images", type=int, default=6000)
    parser.add_argument("--scenes", type=int, default=50, help="cameras of the pool (0: a new scene per image)")
    parser.add_argument("--no-clutter", action="store_true",
                        help="one scene behind each pool image instead of a patchwork of scenes")
    parser.add_argument("--epochs", type=int,
                        help="pretraining epochs over the pool, every arm (default: the recipe's run.epochs)")
    parser.add_argument("--arms", nargs="+", choices=ARMS, default=list(ARMS), help="which arms to run")
    parser.add_argument("--jobs", type=int, default=1,
                        help="(arm, seed) units run in this many processes of one thread each (3 on 2 cores: "
                             "three 3,740-step pretrainings side by side took 102 minutes)")
    parser.add_argument("--device", default="auto",
                        help="cpu, cuda or auto (cuda when there is one): pretraining, frozen features, fine-tuning")
    parser.add_argument("--workdir", type=Path, help="keep data and runs here (default: a temporary folder)")
    parser.add_argument("overrides", nargs="*", help="extra key=value overrides for the pretraining recipe")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s")
    torch.set_num_threads(1)

    from passreid.config import load_config
    from passreid.pretrain import PretrainConfig
    from passreid.runtime import resolve_device

    seeds = args.seeds[:1] if args.quick else args.seeds
    pool_images = 512 if args.quick else args.pool_images
    epochs = 2 if args.quick else args.epochs or load_config(PretrainConfig, RECIPE, []).run.epochs
    device = str(resolve_device(args.device))
    overrides = [f"run.epochs={epochs}", f"run.device={device}", *args.overrides]
    ft_epochs = None
    if args.quick:
        overrides += ["data.limit=256", "optim.warmup_epochs=1"]
        ft_epochs = 2
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        work = args.workdir or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        pool, labelled = make_data(work, pool_images, args.quick, args.scenes, not args.no_clutter)
        # the pretraining units first: with --jobs, the short random-init units fill the gaps at the end
        units = [(arm, seed) for arm in ("pass", "dino", "random") for seed in seeds if arm in args.arms]
        jobs = [(arm, seed, pool, labelled, work, overrides, ft_epochs, device) for arm, seed in units]
        if args.jobs > 1:
            context = multiprocessing.get_context("spawn")
            with ProcessPoolExecutor(max_workers=args.jobs, mp_context=context) as executor:
                done = list(executor.map(run_unit, *zip(*jobs)))
        else:
            done = [run_unit(*job) for job in jobs]
    results: dict[str, dict[str, list[float]]] = {
        arm: {"frozen_mAP": [], "frozen_rank1": [], "finetune_mAP": [], "finetune_rank1": [],
              "pretrain_seconds": []} for arm in args.arms}
    for (arm, _), unit in sorted(zip(units, done), key=lambda pair: seeds.index(pair[0][1])):
        for key, value in unit.items():
            results[arm][key].append(value)

    arms = {arm: {**vals, **{f"{k}_summary": summary(v) for k, v in vals.items() if k != "pretrain_seconds"}}
            for arm, vals in results.items()}
    mean = {arm: {k: arms[arm][f"{k}_summary"]["mean"] for k in ("frozen_mAP", "finetune_mAP")} for arm in arms}

    def gap(a: str, b: str, key: str) -> float | None:
        return round(mean[a][key] - mean[b][key], 2) if a in mean and b in mean else None

    every_seed_ahead = None
    if "pass" in results and "random" in results:
        every_seed_ahead = all(p > r for p, r in zip(results["pass"]["finetune_mAP"],
                                                      results["random"]["finetune_mAP"]))
    frozen_gap, finetune_gap = gap("pass", "random", "frozen_mAP"), gap("pass", "random", "finetune_mAP")
    out = {
        "bench": "pretrain_quality",
        "quick": args.quick,
        "seeds": seeds,
        "model": "pass_vit_tiny depth 4, 128x64",
        "recipe": str(RECIPE.relative_to(REPO)),
        "overrides": overrides,
        "pool": {"images": pool_images, "scenes": args.scenes, "clutter": not args.no_clutter},
        "arms": arms,
        "pass_minus_random_frozen_mAP": frozen_gap,
        "pass_minus_random_finetune_mAP": finetune_gap,
        "pass_minus_dino_frozen_mAP": gap("pass", "dino", "frozen_mAP"),
        "pass_minus_dino_finetune_mAP": gap("pass", "dino", "finetune_mAP"),
        "targets": {
            "frozen_pass_ge_random_plus_10": None if frozen_gap is None else frozen_gap >= 10,
            "finetune_pass_ge_random_plus_5": None if finetune_gap is None else finetune_gap >= 5,
            "finetune_pass_ahead_every_seed": every_seed_ahead,
        },
        "seconds": round(time.perf_counter() - start, 1),
        "jobs": args.jobs,
        "threads_per_job": 1,
        "device": device,
        "torch": torch.__version__,
    }
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
