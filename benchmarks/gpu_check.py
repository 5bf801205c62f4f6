"""One command for the first GPU: every GPU path of passreid, briefly, then the four benchmarks.

Run from the repository root on a machine with one CUDA GPU (no network needed;
faiss optional)::

    python benchmarks/gpu_check.py                  # about 5-8 minutes on one GPU
    python benchmarks/gpu_check.py --json gpu_check.json
    python benchmarks/gpu_check.py --cpu            # dry run on the CPU: tiny sizes, no NCCL, no benchmarks

Stages, in order (each is timed; a failure is recorded with the stage's name and
the script goes on with the stages that do not depend on it):

1. ``env``: GPU name, capability, bf16 support, torch/CUDA versions, optional packages.
2. ``data``: two small synthetic domains (Market layout) in a temporary folder.
3. ``finetune-tiny`` and ``finetune-vit-s``: ``passreid train`` for 16 steps (2 epochs)
   (``configs/finetune/tiny_cpu.yaml`` on the GPU, and the ViT-S Market recipe
   from random init), in the recipe's precision (``auto``: bf16 where supported),
   through the end-of-run evaluation and the export.
4. ``pretrain-tiny`` and ``pretrain-vit-s``: ``passreid pretrain`` for 16 steps
   (``demo_tiny.yaml``; ``pass_vit_small.yaml`` with the batched multi-crop on the
   GPU, ``aug.backend: gpu``, at a batch of 32).
5. ``multicrop-cuda``: :class:`passreid.data.multicrop.BatchedMultiCrop` on a CUDA
   uint8 batch: view shapes, device, finite values, same crop boxes as on the CPU
   for one seed.
6. ``usl-vit-s`` and ``uda-tiny``: ``passreid usl`` (ViT-S, from the pretrained
   backbone of step 4) and ``passreid uda`` (tiny, from the fine-tuned model of
   step 3, on the other domain), 16 steps over 2 epochs (each re-clusters).
7. ``eval-cuda``: :func:`passreid.evaluation.evaluate` on CUDA against the CPU
   (same mAP/CMC/mINP), with and without re-ranking.
8. ``jaccard-cuda``: k-reciprocal Jaccard with the torch kNN on CUDA against the
   CPU (same sparse matrix) and the pseudo labels it gives.
9. ``nccl``: a one-process ``torchrun`` job that joins an NCCL group, trains one
   DDP step of the tiny ReID model and all-reduces.
10. ``onnx``: ``passreid export-onnx`` of the GPU-trained tiny model, checked with
    onnxruntime (skipped when onnxscript/onnxruntime are not installed).
11. ``bench-finetune``, ``bench-pretrain``, ``bench-eval``, ``bench-cluster``: the
    four scripts of ``benchmarks/`` with their baselines, on the GPU, at sizes that
    fit the time budget (their last JSON line is kept).

Prints one JSON line ``{"ok", "device", "seconds", "stages": {name: {"ok", "seconds", ...}}}``
and exits 1 when a stage failed (the error names it), 0 otherwise. ``--cpu`` runs
stages 1-8 and 10 on the CPU with tiny sizes and 2-3 steps (a test of the suite
runs it), and the benchmarks only with ``--with-benchmarks`` (in their ``--quick`` mode).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if importlib.util.find_spec("passreid") is None:  # a checkout that was not pip-installed
    sys.path.insert(0, str(REPO / "src"))

BUDGET_S = 8 * 60
"""The GPU run must end within this; stages that would start after it are skipped and reported."""


@dataclass
class Check:
    """Settings of one run of the check (the GPU run, or the ``--cpu`` dry run)."""

    cpu: bool
    work: Path
    steps: int
    benchmarks: bool
    budget_s: float
    state: dict[str, Any] = field(default_factory=dict)
    started: float = field(default_factory=time.perf_counter)

    @property
    def device(self) -> str:
        return "cpu" if self.cpu else "cuda"

    def seconds_left(self) -> float:
        """What remains of the time budget (a subprocess gets at most this, so the check ends in time)."""
        return self.budget_s - (time.perf_counter() - self.started)


class StageSkipped(Exception):
    """A stage that cannot run here (a missing optional package, a failed stage it needs)."""


# ----------------------------------------------------------------------------- helpers


def child_env() -> dict[str, str]:
    """Environment of the subprocesses: they import passreid from this checkout if it is not installed."""
    env = dict(os.environ)
    src = str(REPO / "src")
    if src not in env.get("PYTHONPATH", "").split(os.pathsep):
        env["PYTHONPATH"] = os.pathsep.join(p for p in (src, env.get("PYTHONPATH", "")) if p)
    return env


def run_child(argv: list[str], timeout: float) -> str:
    """Run ``argv``; its stdout, or a RuntimeError with the tail of its output."""
    done = subprocess.run(argv, capture_output=True, text=True, env=child_env(), timeout=timeout, cwd=REPO)
    if done.returncode != 0:
        tail = "\n".join((done.stdout + done.stderr).strip().splitlines()[-15:])
        raise RuntimeError(f"{' '.join(argv[:4])} ... exited {done.returncode}:\n{tail}")
    return done.stdout


def last_json_line(text: str) -> dict[str, Any]:
    """The last line of ``text`` that parses as a JSON object."""
    for line in reversed(text.strip().splitlines()):
        line = line.strip()
        if line.startswith("{"):
            try:
                return json.loads(line)
            except ValueError:
                continue
    raise RuntimeError(f"no JSON line in the output: {text.strip()[-500:]}")


def passreid_cli(argv: list[str]) -> None:
    """``passreid ARGV`` in this process; a non-zero exit status is an error."""
    import contextlib

    from passreid.cli import main

    with contextlib.redirect_stdout(sys.stderr):  # stdout carries only the report line
        code = main(argv)
    if code != 0:
        raise RuntimeError(f"passreid {' '.join(argv[:2])} exited with status {code}")


def metrics_of(run: Path) -> dict[str, Any]:
    """Epoch and metrics that a run's ``model.json`` records."""
    sidecar = json.loads((run / "model.json").read_text())
    return {"epoch": sidecar.get("epoch"), **{k: round(v, 4) for k, v in (sidecar.get("metrics") or {}).items()}}


def needs(check: Check, key: str, stage: str) -> Any:
    if key not in check.state:
        raise StageSkipped(f"needs the output of the {stage} stage, which did not finish")
    return check.state[key]


# ----------------------------------------------------------------------------- stages


def stage_env(check: Check) -> dict[str, Any]:
    import torch

    info: dict[str, Any] = {"torch": torch.__version__, "cuda": torch.version.cuda,
                            "python": sys.version.split()[0]}
    for package in ("faiss", "onnxruntime", "onnxscript", "torchvision", "timm"):
        info[package] = importlib.util.find_spec(package) is not None
    if check.cpu:
        info["threads"] = torch.get_num_threads()
        return info
    if not torch.cuda.is_available():
        raise RuntimeError("CUDA is not available to torch: run with --cpu for the dry run, or check the "
                           f"driver and the torch build (torch {torch.__version__}, CUDA {torch.version.cuda})")
    props = torch.cuda.get_device_properties(0)
    info.update(gpu=props.name, capability=f"{props.major}.{props.minor}", memory_gib=round(props.total_memory / 2**30),
                bf16=torch.cuda.is_bf16_supported(), gpus=torch.cuda.device_count(),
                nccl=torch.distributed.is_nccl_available())
    return info


def stage_data(check: Check) -> dict[str, Any]:
    from passreid.data.synthetic import generate_synthetic

    size = (128, 64)
    # on the GPU: 32 training identities x 16 images, so that a ViT-S epoch is 8 steps of 64
    ids, per_cam = (16, 2) if check.cpu else (64, 4)
    for name, domain, seed in (("source", "msmt", 0), ("target", "market", 1)):
        root = check.work / f"synth_{name}"
        generate_synthetic(root, num_ids=ids, num_cams=4, seed=seed, domain=domain, img_size=size,
                           images_per_cam=per_cam)
        check.state[f"{name}_root"] = root
    return {"ids": ids, "cams": 4, "images_per_cam": per_cam, "img_size": list(size)}


def _train_overrides(check: Check, name: str) -> list[str]:
    """``check.steps`` steps in all: one epoch on the CPU, two of half as many steps on the GPU (the
    second resumes the schedule and evaluates again)."""
    epochs = 1 if check.cpu else 2
    return [f"run.output_dir={check.work / name}", f"run.max_iters_per_epoch={max(1, check.steps // epochs)}",
            f"run.epochs={epochs}", "run.eval_every=1", f"run.device={check.device}", "--no-progress"]


def stage_finetune_tiny(check: Check) -> dict[str, Any]:
    run = check.work / "finetune-tiny"
    passreid_cli(["train", str(REPO / "configs/finetune/tiny_cpu.yaml"), "data.dataset=synthetic",
                  f"data.root={check.state['source_root']}", "data.num_workers=2",
                  *_train_overrides(check, "finetune-tiny")])
    check.state["tiny_model"] = run / "model.pth"
    return metrics_of(run)


def stage_finetune_vit_s(check: Check) -> dict[str, Any]:
    if check.cpu:
        raise StageSkipped("ViT-S runs on the GPU only")
    run = check.work / "finetune-vit-s"
    passreid_cli(["train", str(REPO / "configs/finetune/market_vit_small.yaml"), "data.dataset=synthetic",
                  f"data.root={check.state['source_root']}", "model.pretrained=", "data.num_workers=4",
                  *_train_overrides(check, "finetune-vit-s")])
    return metrics_of(run)


def _pretrain_overrides(check: Check, name: str, batch: int) -> list[str]:
    images = check.state["source_root"] / "bounding_box_train"
    return [f"data.root={images}", "data.index_file=", f"data.batch_size={batch}", "data.num_workers=2",
            f"run.output_dir={check.work / name}", f"run.max_iters_per_epoch={check.steps}", "run.epochs=1",
            "optim.warmup_epochs=1", f"run.device={check.device}", "--no-progress"]


def stage_pretrain_tiny(check: Check) -> dict[str, Any]:
    passreid_cli(["pretrain", str(REPO / "configs/pretrain/demo_tiny.yaml"),
                  *_pretrain_overrides(check, "pretrain-tiny", 16)])
    return {"backbone": (check.work / "pretrain-tiny" / "backbone.pth").is_file()}


def stage_pretrain_vit_s(check: Check) -> dict[str, Any]:
    if check.cpu:
        raise StageSkipped("ViT-S runs on the GPU only")
    passreid_cli(["pretrain", str(REPO / "configs/pretrain/pass_vit_small.yaml"), "aug.backend=gpu",
                  *_pretrain_overrides(check, "pretrain-vit-s", 32)])
    backbone = check.work / "pretrain-vit-s" / "backbone.pth"
    check.state["vit_s_backbone"] = backbone
    return {"backbone": backbone.is_file()}


def stage_multicrop(check: Check) -> dict[str, Any]:
    import torch

    from passreid.data.multicrop import BatchedMultiCrop, MultiCropSpec

    crop = BatchedMultiCrop(MultiCropSpec())
    images = torch.randint(0, 256, (2 if check.cpu else 64, 3, 256, 128), dtype=torch.uint8,
                           generator=torch.Generator().manual_seed(0))
    views = crop(images.to(check.device), torch.Generator().manual_seed(0))
    reference = crop(images, torch.Generator().manual_seed(0))
    for name, tensor in (("global", views.global_views), ("local", views.local_views)):
        if tensor.device.type != check.device or not bool(torch.isfinite(tensor).all()):
            raise RuntimeError(f"{name} views: device {tensor.device}, finite {bool(torch.isfinite(tensor).all())}")
    if not torch.equal(views.boxes.cpu(), reference.boxes):
        raise RuntimeError("crop boxes differ between the device and the CPU for the same seed")
    return {"global": list(views.global_views.shape), "local": list(views.local_views.shape),
            "max_abs_diff_vs_cpu": float((views.global_views.cpu() - reference.global_views).abs().max())}


SMALL_CLUSTERS = ["optim.batch_size=32", "optim.num_instances=4", "cluster.k1=8", "cluster.k2=2", "cluster.eps=0.6",
                  "cluster.min_samples=2"]
"""Clustering settings for the check's small synthetic sets (8 images per identity) and barely trained
models; the recipes' k1 30 / min_samples 4 are made for thousands of images and find one cluster here."""


def stage_usl(check: Check) -> dict[str, Any]:
    if check.cpu:
        backbone = check.work / "pretrain-tiny" / "backbone.pth"
        recipe, extra = REPO / "configs/usl/market_vit_small.yaml", ["model.name=pass_vit_tiny", "model.depth=4",
                                                                     "data.img_size=[128,64]"]
    else:
        backbone = needs(check, "vit_s_backbone", "pretrain-vit-s")
        recipe, extra = REPO / "configs/usl/market_vit_small.yaml", []
    if not backbone.is_file():
        raise StageSkipped(f"needs {backbone} from the pretraining stage")
    run = check.work / "usl"
    passreid_cli(["usl", str(recipe), "data.dataset=synthetic", f"data.root={check.state['target_root']}",
                  f"model.pretrained={backbone}", *SMALL_CLUSTERS, "data.num_workers=2", *extra,
                  *_train_overrides(check, "usl")])
    return metrics_of(run)


def stage_uda(check: Check) -> dict[str, Any]:
    model = needs(check, "tiny_model", "finetune-tiny")
    run = check.work / "uda"
    passreid_cli(["uda", str(REPO / "configs/uda/msmt17_to_market_vit_small.yaml"), "data.dataset=synthetic",
                  f"data.root={check.state['target_root']}", f"model.pretrained={model}", "model.name=pass_vit_tiny",
                  "model.depth=4", "data.img_size=[128,64]", *SMALL_CLUSTERS, "data.num_workers=2",
                  *_train_overrides(check, "uda")])
    return metrics_of(run)


def stage_eval(check: Check) -> dict[str, Any]:
    import numpy as np
    import torch

    from passreid.evaluation import evaluate

    rng = np.random.default_rng(0)
    nq, ng, ids = (200, 2000, 100) if check.cpu else (2000, 20000, 700)
    centres = rng.standard_normal((ids, 256)).astype(np.float32)
    q_pids, g_pids = rng.integers(0, ids, nq), rng.integers(0, ids, ng)
    qf = centres[q_pids] + 1.5 * rng.standard_normal((nq, 256)).astype(np.float32)
    gf = centres[g_pids] + 1.5 * rng.standard_normal((ng, 256)).astype(np.float32)
    q_cams, g_cams = rng.integers(0, 6, nq), rng.integers(0, 6, ng)
    out: dict[str, Any] = {"queries": nq, "gallery": ng}
    for rerank in (False, True):
        if rerank:  # re-ranking is N x N: a smaller gallery
            gf, g_pids, g_cams = gf[: ng // 4], g_pids[: ng // 4], g_cams[: ng // 4]
        cpu = evaluate(qf, gf, q_pids, g_pids, q_cams, g_cams, device="cpu", rerank=rerank)
        t0 = time.perf_counter()
        dev = evaluate(qf, gf, q_pids, g_pids, q_cams, g_cams, device=torch.device(check.device), rerank=rerank)
        seconds = time.perf_counter() - t0
        diff = max(abs(cpu["mAP"] - dev["mAP"]), abs(cpu["mINP"] - dev["mINP"]),
                   float(np.abs(np.asarray(cpu["cmc"]) - np.asarray(dev["cmc"])).max()))
        if diff > 1e-4:
            raise RuntimeError(f"evaluate on {check.device} differs from the CPU by {diff:.2e} (rerank={rerank})")
        key = "rerank" if rerank else "plain"
        out[key] = {"mAP": round(dev["mAP"], 4), "max_diff_vs_cpu": diff, "seconds": round(seconds, 3)}
    return out


def stage_jaccard(check: Check) -> dict[str, Any]:
    import numpy as np
    import torch

    from passreid.clustering import pseudo_labels
    from passreid.kreciprocal import jaccard_distance

    rng = np.random.default_rng(0)
    n = 1000 if check.cpu else 12936
    centres = rng.standard_normal((n // 16, 128)).astype(np.float32)
    x = centres[rng.integers(0, len(centres), n)] + 0.5 * rng.standard_normal((n, 128)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    cpu = jaccard_distance(x, search="torch", device="cpu", max_distance=0.6)
    t0 = time.perf_counter()
    dev = jaccard_distance(x, search="torch", device=torch.device(check.device), max_distance=0.6)
    seconds = time.perf_counter() - t0
    # float rounding may order near-equal neighbours differently on the GPU: allow a few differing pairs
    differing = (abs(cpu - dev) > 1e-3).nnz
    if differing > 0.01 * max(cpu.nnz, 1):
        raise RuntimeError(f"Jaccard on {check.device}: {differing} of {cpu.nnz} stored pairs differ from the CPU's "
                           f"({dev.nnz} stored)")
    labels = pseudo_labels(x, eps=0.6, search="torch", device=torch.device(check.device))
    cpu_labels = pseudo_labels(x, eps=0.6, search="torch", device="cpu")
    from sklearn.metrics import adjusted_rand_score

    agreement = float(adjusted_rand_score(cpu_labels, labels))
    if agreement < 0.99:
        raise RuntimeError(f"pseudo labels on {check.device} agree with the CPU's only to ARI {agreement:.3f}")
    return {"n": n, "stored_pairs": int(dev.nnz), "differing_pairs": int(differing), "seconds": round(seconds, 2),
            "clusters": int(labels.max() + 1), "ari_vs_cpu": round(agreement, 4)}


NCCL_WORKER = "--nccl-worker"


def nccl_worker() -> None:
    """Inside ``torchrun``: one DDP step of the tiny ReID model over NCCL, then an all-reduce check."""
    import torch
    import torch.distributed as dist

    from passreid.runtime import agree_across_ranks, autocast, resolve_precision, setup_distributed
    from passreid.models import ReIDModel, create_model

    dist.init_process_group("nccl")
    info = setup_distributed("cuda")
    torch.cuda.set_device(info.device)
    torch.manual_seed(0)
    model = ReIDModel(create_model("pass_vit_tiny", img_size=(128, 64), depth=2), num_classes=8).to(info.device)
    ddp = torch.nn.parallel.DistributedDataParallel(model, device_ids=[info.device.index])
    optimizer = torch.optim.SGD(ddp.parameters(), lr=0.01)
    precision = resolve_precision("auto", info.device)
    images = torch.randn(8, 3, 128, 64, device=info.device)
    pids = torch.arange(8, device=info.device) % 8
    with autocast(info.device, precision):
        out = ddp(images)
        loss = torch.nn.functional.cross_entropy(out.logits.float(), pids)
    loss.backward()
    optimizer.step()
    mean_loss, stop = agree_across_ranks(loss, None)
    total = torch.ones((), device=info.device)
    dist.all_reduce(total)
    dist.destroy_process_group()
    print(json.dumps({"world_size": info.world_size, "loss": float(mean_loss), "all_reduce": float(total),
                      "precision": precision, "stop": stop}))


def stage_nccl(check: Check) -> dict[str, Any]:
    if check.cpu:
        raise StageSkipped("NCCL needs a GPU")
    out = run_child([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "1", "--standalone",
                     str(Path(__file__).resolve()), NCCL_WORKER], timeout=min(180, max(30, check.seconds_left())))
    result = last_json_line(out)
    if result["all_reduce"] != 1.0:
        raise RuntimeError(f"all_reduce of one process gave {result['all_reduce']}, expected 1.0")
    return result


def stage_onnx(check: Check) -> dict[str, Any]:
    missing = [m for m in ("onnxscript", "onnxruntime") if importlib.util.find_spec(m) is None]
    if missing:
        raise StageSkipped(f"{', '.join(missing)} not installed (pip install 'passreid[onnx]')")
    model = needs(check, "tiny_model", "finetune-tiny")
    out = check.work / "tiny.onnx"
    passreid_cli(["export-onnx", str(model), str(out)])
    return {"bytes": out.stat().st_size}


BENCHMARKS: dict[str, tuple[list[str], list[str]]] = {
    # name: (arguments on the GPU, arguments of the CPU --quick run); the slowest baseline last
    "bench-finetune": (["--steps", "20", "--warmup", "5"], ["--quick"]),
    "bench-pretrain": (["--configs", "pass_vit_small:128", "--steps", "10", "--warmup", "3"], ["--quick"]),
    "bench-eval": (["--device", "cuda", "--check"], ["--quick"]),
    # Market-1501 train size; the dense baseline on its first 8000 points (the sparse path timed there too)
    "bench-cluster": (["--device", "cuda", "--sizes", "12936", "--dense-max", "8000"],
                      ["--sizes", "1500", "--dense-max", "1500"]),
}


def make_bench_stage(name: str) -> Callable[[Check], dict[str, Any]]:
    script = REPO / "benchmarks" / f"bench_{name.removeprefix('bench-')}.py"

    def stage(check: Check) -> dict[str, Any]:
        if check.cpu and not check.benchmarks:
            raise StageSkipped("benchmarks run on the GPU (--with-benchmarks runs them --quick on the CPU)")
        gpu_args, cpu_args = BENCHMARKS[name]
        timeout = min(240, check.seconds_left())
        if timeout < 20:
            raise StageSkipped(f"less than 20 s of the {check.budget_s:.0f} s budget left")
        out = run_child([sys.executable, str(script), *(cpu_args if check.cpu else gpu_args)], timeout=timeout)
        return last_json_line(out)

    return stage


STAGES: list[tuple[str, Callable[[Check], dict[str, Any]]]] = [
    ("env", stage_env),
    ("data", stage_data),
    ("finetune-tiny", stage_finetune_tiny),
    ("finetune-vit-s", stage_finetune_vit_s),
    ("pretrain-tiny", stage_pretrain_tiny),
    ("pretrain-vit-s", stage_pretrain_vit_s),
    ("multicrop-cuda", stage_multicrop),
    ("usl-vit-s", stage_usl),
    ("uda-tiny", stage_uda),
    ("eval-cuda", stage_eval),
    ("jaccard-cuda", stage_jaccard),
    ("nccl", stage_nccl),
    ("onnx", stage_onnx),
    *((name, make_bench_stage(name)) for name in BENCHMARKS),
]


def run_check(check: Check, only: list[str] | None = None) -> dict[str, Any]:
    """Run the stages in order; the report that is printed as one JSON line."""
    start = check.started = time.perf_counter()
    stages: dict[str, Any] = {}
    for name, fn in STAGES:
        if only and name not in only and name not in ("env", "data"):
            continue
        if check.seconds_left() <= 0:
            stages[name] = {"ok": None, "skipped": f"time budget of {check.budget_s:.0f} s spent"}
            continue
        t0 = time.perf_counter()
        try:
            result = fn(check)
            stages[name] = {"ok": True, **result}
        except StageSkipped as why:
            stages[name] = {"ok": None, "skipped": str(why)}
        except Exception as exc:  # noqa: BLE001 - every failure is reported with its stage, then the next runs
            stages[name] = {"ok": False, "error": f"{type(exc).__name__}: {exc}",
                            "traceback": traceback.format_exc(limit=-6)}
            if name == "env" and not check.cpu:
                break  # no GPU: nothing else can run
        stages[name]["seconds"] = round(time.perf_counter() - t0, 2)
        print(f"gpu_check: {name}: {_status(stages[name])} ({stages[name]['seconds']:.1f} s)", file=sys.stderr,
              flush=True)
    failed = [name for name, s in stages.items() if s["ok"] is False]
    return {"ok": not failed, "failed": failed, "device": check.device,
            "seconds": round(time.perf_counter() - start, 1), "stages": stages}


def _status(stage: dict[str, Any]) -> str:
    if stage["ok"] is None:
        return f"skipped ({stage['skipped']})"
    return "ok" if stage["ok"] else f"FAILED: {stage['error'].splitlines()[0]}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cpu", action="store_true", help="dry run on the CPU: tiny sizes, few steps, no NCCL")
    parser.add_argument("--with-benchmarks", action="store_true",
                        help="with --cpu: also run the four benchmarks in their --quick mode")
    parser.add_argument("--steps", type=int, help="training steps per stage (default 16 on the GPU, 2 with --cpu)")
    parser.add_argument("--stages", nargs="+", metavar="NAME", choices=[name for name, _ in STAGES],
                        help="run only these stages (env and data always run)")
    parser.add_argument("--workdir", metavar="DIR", help="keep the runs here (default: a temporary folder)")
    parser.add_argument("--json", metavar="OUT", help="also write the report here")
    parser.add_argument(NCCL_WORKER, action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.nccl_worker:
        nccl_worker()
        return 0
    import logging

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    steps = args.steps or (2 if args.cpu else 16)
    with tempfile.TemporaryDirectory(prefix="passreid-gpu-check-") as tmp:
        work = Path(args.workdir) if args.workdir else Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        check = Check(cpu=args.cpu, work=work, steps=steps, benchmarks=args.with_benchmarks or not args.cpu,
                      budget_s=BUDGET_S)
        report = run_check(check, args.stages)
    line = json.dumps(report, default=str)
    print(line)
    if args.json:
        Path(args.json).write_text(line + "\n")
    if report["failed"]:
        print(f"gpu_check: error: stage(s) failed: {', '.join(report['failed'])}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
