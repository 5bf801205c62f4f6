"""Benchmark PASS pretraining end to end (images/s, MFU, peak GPU memory) against the published step.

For each configuration (default: ViT-S batch 128 and 256, ViT-B batch 64, per GPU,
256x128 globals, 128x64 locals, 65536-way heads):

* passreid: ``passreid.pretrain.train_step`` - views made on the GPU by the batched
  multi-crop from a pinned, padded uint8 batch of images at their own sizes (what the
  loader workers deliver after decoding; person-crop shapes: heights 0.5-2x the
  global view's, width/height 0.3-0.7, as LUPerson's varied crops), bf16 autocast,
  SDPA attention, fused AdamW, vectorised per-tensor clipping and EMA, the batched loss.
  The augmentation alone (``aug_ms``) and the step on ready-made views
  (``model_step_ms``) are also timed: the augmentation keeps up while
  ``aug_over_model_step`` is well under 1.
* baseline: the published step - 11 float views made on the CPU and copied to the GPU,
  fp16 autocast with a loss scaler, explicit (unfused) attention, the per-pair loss
  loop, per-parameter clipping with a Python loop (one host synchronisation per
  tensor), per-parameter EMA loop, for-loop AdamW. Same network and loss value.

The data side is measured per loader worker in this process (one thread, as a
DataLoader worker), on JPEGs of those shapes: JPEG decode + the PIL multi-crop for the
baseline, JPEG decode to uint8 at the image's own size (shrunk past the 2x-global cap)
for passreid. End-to-end rate = min(step rate, per-worker
rate x CPU cores). MFU = FLOPs of one passreid step (counted by
``torch.utils.flop_counter``, teacher forward + student forward/backward) per image x
images/s / the GPU's dense bf16 peak.

Prints a table and one JSON line. Examples::

    python benchmarks/bench_pretrain.py                 # on a GPU
    python benchmarks/bench_pretrain.py --quick         # tiny model on the CPU: a smoke test
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import os
import sys
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.flop_counter import FlopCounterMode

from passreid.data.multicrop import BatchedMultiCrop, CPUMultiCrop, DecodedBatch, MultiCropBatch, MultiCropSpec
from passreid.losses.pass_loss import PASSLoss, ViewLogits
from passreid.models import vit
from passreid.pretrain import (
    PretrainModelConfig,
    PretrainSchedule,
    PretrainState,
    build_networks,
    param_groups,
    train_step,
)

# Dense bf16/fp16 tensor-core peaks (TFLOP/s) by device-name fragment, most specific first.
PEAK_TFLOPS = (("H100 PCIe", 756.0), ("H100", 989.4), ("H200", 989.4), ("GH200", 989.4), ("A100", 312.0),
               ("L40S", 362.0), ("A10G", 125.0), ("L4", 121.0), ("RTX 4090", 165.2))


# ----------------------------------------------------------------------------- data side


def person_shapes(n: int, global_size: tuple[int, int], seed: int = 0) -> list[tuple[int, int]]:
    """(H, W) of ``n`` person crops of varied size and aspect: height 0.5-2x the global view's, W/H 0.3-0.7."""
    rng = np.random.default_rng(seed)
    heights = rng.uniform(0.5, 2.0, n) * global_size[0]
    widths = heights * rng.uniform(0.3, 0.7, n)
    return [(int(h), max(1, int(w))) for h, w in zip(heights, widths)]


def make_images(shapes: list[tuple[int, int]], seed: int = 0) -> list[Image.Image]:
    """Smooth random colour images of the given (H, W) shapes with a little noise, like person crops."""
    rng = np.random.default_rng(seed)
    out = []
    for height, width in shapes:
        yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
        img = np.stack([0.5 + 0.4 * np.sin(rng.uniform(1, 8) * yy / height + rng.uniform(1, 8) * xx / width
                                           + rng.uniform(0, 6)) for _ in range(3)], axis=-1)
        img += rng.normal(0, 0.05, img.shape)
        out.append(Image.fromarray((img.clip(0, 1) * 255).astype(np.uint8)))
    return out


def encode_jpegs(images: list[Image.Image]) -> list[bytes]:
    """JPEG (quality 95) of each image."""
    out = []
    for img in images:
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=95)
        out.append(buf.getvalue())
    return out


def worker_rate(jpegs: list[bytes], transform: Any, seconds: float = 3.0) -> float:
    """Images/s of decode + ``transform`` in one thread (a DataLoader worker)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        done, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds or done < len(jpegs):
            with Image.open(io.BytesIO(jpegs[done % len(jpegs)])) as img:
                transform(img.convert("RGB"))
            done += 1
        return done / (time.perf_counter() - start)
    finally:
        torch.set_num_threads(threads)


# ----------------------------------------------------------------------------- the published step


@contextlib.contextmanager
def unfused_attention() -> Iterator[None]:
    """Swap SDPA for the explicit softmax(q k^T) v of the published ViT, for the duration."""
    original = vit.Attention.forward

    def forward(self: vit.Attention, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        qkv = self.qkv(x).reshape(b, t, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        attn = ((q @ k.transpose(-2, -1)) * self.scale).softmax(dim=-1)
        return self.proj((attn @ v).transpose(1, 2).reshape(b, t, d))

    vit.Attention.forward = forward  # type: ignore[method-assign]
    try:
        yield
    finally:
        vit.Attention.forward = original  # type: ignore[method-assign]


def pair_loop_loss(student: ViewLogits, teacher: ViewLogits, center: torch.Tensor, teacher_temp: float,
                   student_temp: float = 0.1) -> torch.Tensor:
    """The published loss structure: one log-softmax and one reduction per (teacher, student) pair."""
    total, pairs = 0.0, 0
    for t, (t_logits, s_logits) in enumerate(zip(teacher.tokens(), student.tokens())):
        q = F.softmax((t_logits - center[t]) / teacher_temp, dim=-1).detach()
        s = s_logits / student_temp
        for g in range(q.shape[0]):
            for v in range(s.shape[0]):
                if v == g:
                    continue
                total = total + torch.sum(-q[g] * F.log_softmax(s[v], dim=-1), dim=-1).mean()
                pairs += 1
    return total / pairs


def baseline_step(student: torch.nn.Module, teacher: torch.nn.Module, center: torch.Tensor,
                  optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler, views: list[torch.Tensor],
                  device: torch.device, clip: float = 3.0, momentum: float = 0.996) -> float:
    gpu = [v.to(device, non_blocking=True) for v in views]
    global_views, local_views = torch.stack(gpu[:2]), torch.stack(gpu[2:])
    with torch.autocast(device.type, dtype=torch.float16, enabled=device.type == "cuda"):
        teacher_out = teacher(global_views)
        student_out = student(global_views, local_views)
        loss = pair_loop_loss(student_out, teacher_out, center, 0.04)
    if not math.isfinite(loss.item()):
        raise RuntimeError("non-finite baseline loss")
    optimizer.zero_grad()
    scaler.scale(loss).backward()
    scaler.unscale_(optimizer)
    for p in student.parameters():
        if p.grad is not None:
            coef = clip / (p.grad.data.norm(2) + 1e-6)
            if coef < 1:  # a host synchronisation per parameter tensor, as published
                p.grad.data.mul_(coef)
    scaler.step(optimizer)
    scaler.update()
    with torch.no_grad():
        for q_param, k_param in zip(student.parameters(), teacher.parameters()):
            k_param.data.mul_(momentum).add_((1 - momentum) * q_param.detach().data)
        for t, logits in enumerate(teacher_out.tokens()):
            center[t] = center[t] * 0.9 + logits.float().mean(dim=(0, 1)) * 0.1
    return float(loss.detach())


# ----------------------------------------------------------------------------- measurement


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(step: Any, device: torch.device, warmup: int, steps: int) -> tuple[float, float | None]:
    """(seconds per step, peak GPU memory in GiB)."""
    for _ in range(warmup):
        step()
    _sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    _sync(device)
    seconds = (time.perf_counter() - start) / steps
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    return seconds, peak


class FixedViews:
    """Stands in for the multi-crop of a :class:`PretrainState` to time the model step alone."""

    def __init__(self, views: MultiCropBatch) -> None:
        self._views = views

    def views(self, batch: Any, device: torch.device, generator: torch.Generator | None = None) -> MultiCropBatch:
        return self._views


def _model_cfg(name: str, quick: bool) -> PretrainModelConfig:
    if quick:
        return PretrainModelConfig(name="pass_vit_tiny", depth=2, out_dim=256, hidden_dim=64, bottleneck_dim=32)
    return PretrainModelConfig(name=name)


def bench_config(name: str, batch: int, args: argparse.Namespace, device: torch.device,
                 spec: MultiCropSpec, max_size: tuple[int, int]) -> dict[str, Any]:
    torch.manual_seed(0)
    cfg = _model_cfg(name, args.quick)
    multicrop = BatchedMultiCrop(spec, max_size)
    pil_images = make_images(person_shapes(batch, spec.global_size, seed=batch))
    decode = multicrop.image_transform()
    images = multicrop.collate([(decode(img), -1, -1, i) for i, img in enumerate(pil_images)])
    if device.type == "cuda":
        images = DecodedBatch(images.images.pin_memory(), images.sizes.pin_memory())
    result: dict[str, Any] = {"model": name, "batch": batch, "padded_hw": list(images.images.shape[2:])}

    # passreid
    student, teacher = build_networks(cfg, spec.global_size)
    student, teacher = student.to(device), teacher.to(device)
    loss_fn = PASSLoss(cfg.out_dim).to(device)
    state = PretrainState(
        student=student, teacher=teacher, loss_fn=loss_fn,
        optimizer=torch.optim.AdamW(param_groups(student), fused=device.type == "cuda"),
        scaler=torch.amp.GradScaler(device.type, enabled=False),
        schedule=PretrainSchedule(iters_per_epoch=10**6, epochs=100, peak_lr=1e-4, min_lr=1e-6, warmup_epochs=0,
                                  weight_decay=0.04, weight_decay_end=0.4, momentum=0.996, momentum_end=1.0),
        multicrop=multicrop, device=device,
        precision="bf16" if device.type == "cuda" else "fp32",
    )
    it = iter(range(10**9))
    seconds, peak = _timed(lambda: train_step(state, images, epoch=2, it=next(it)), device, args.warmup, args.steps)
    result.update(passreid_step_img_s=batch / seconds, passreid_peak_gib=peak)
    # The two halves of that step: the augmentation alone, and the step on views made beforehand.
    aug_seconds, _ = _timed(lambda: multicrop.views(images, device), device, args.warmup, args.steps)
    state.multicrop = FixedViews(multicrop.views(images, device))  # type: ignore[assignment]
    model_seconds, _ = _timed(lambda: train_step(state, images, epoch=2, it=next(it)), device, args.warmup,
                              args.steps)
    result.update(aug_ms=aug_seconds * 1e3, model_step_ms=model_seconds * 1e3,
                  aug_over_model_step=aug_seconds / model_seconds)
    # FLOPs of the model step only (teacher forward, student forward and backward), on 4 images.
    flop_batch = DecodedBatch(images.images[: min(4, batch)], images.sizes[: min(4, batch)])
    state.multicrop = FixedViews(multicrop.views(flop_batch, device))  # type: ignore[assignment]
    with FlopCounterMode(display=False) as counter:
        train_step(state, flop_batch, epoch=2, it=0)
    result["gflop_per_image"] = counter.get_total_flops() / flop_batch.images.shape[0] / 1e9
    del state, student, teacher, loss_fn
    if device.type == "cuda":
        torch.cuda.empty_cache()

    # published step
    torch.manual_seed(0)
    student, teacher = build_networks(cfg, spec.global_size)
    student, teacher = student.to(device), teacher.to(device)
    center = torch.zeros(4, cfg.out_dim, device=device)
    optimizer = torch.optim.AdamW(param_groups(student), lr=1e-4, foreach=False)
    scaler = torch.amp.GradScaler(device.type, enabled=device.type == "cuda")
    cpu_views = CPUMultiCrop(spec)
    sample = [cpu_views(img)[0] for img in pil_images[:8]]
    views = [torch.stack([sample[i % len(sample)][v] for i in range(batch)]) for v in range(spec.num_views)]
    if device.type == "cuda":
        views = [v.pin_memory() for v in views]
    with unfused_attention():
        seconds, peak = _timed(lambda: baseline_step(student, teacher, center, optimizer, scaler, views, device),
                               device, args.warmup, args.steps)
    result.update(baseline_step_img_s=batch / seconds, baseline_peak_gib=peak)
    del student, teacher, optimizer, views
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny model, small images, CPU: a smoke test")
    parser.add_argument("--configs", nargs="+", default=["pass_vit_small:128", "pass_vit_small:256", "pass_vit_base:64"],
                        metavar="MODEL:BATCH")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--cpu-cores", type=int, default=os.cpu_count(), help="loader workers the host can run")
    parser.add_argument("--peak-tflops", type=float, help="GPU dense bf16 peak (default: looked up by name)")
    parser.add_argument("--json", metavar="OUT", help="also write the JSON here")
    args = parser.parse_args()

    device = torch.device("cuda" if torch.cuda.is_available() and not args.quick else "cpu")
    if args.quick:
        args.configs = ["pass_vit_tiny:4"]
        args.steps, args.warmup = min(args.steps, 2), min(args.warmup, 1)
        spec = MultiCropSpec(global_size=(64, 32), local_size=(32, 16))
    else:
        if device.type != "cuda":
            print("no GPU: run with --quick for a CPU smoke test", file=sys.stderr)
            return 2
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
        spec = MultiCropSpec()
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    peak = args.peak_tflops or next((p for key, p in PEAK_TFLOPS if key in device_name), None)

    max_size = (2 * spec.global_size[0], 2 * spec.global_size[1])  # the batched backend's default cap, 512x256
    jpegs = encode_jpegs(make_images(person_shapes(16, spec.global_size)))
    seconds = 0.5 if args.quick else 3.0
    baseline_worker = worker_rate(jpegs, CPUMultiCrop(spec), seconds)
    decode_worker = worker_rate(jpegs, BatchedMultiCrop(spec, max_size).image_transform(), seconds)

    rows = []
    for item in args.configs:
        name, batch = item.split(":")
        row = bench_config(name, int(batch), args, device, spec, max_size)
        row["baseline_e2e_img_s"] = min(row["baseline_step_img_s"], baseline_worker * args.cpu_cores)
        row["passreid_e2e_img_s"] = min(row["passreid_step_img_s"], decode_worker * args.cpu_cores)
        row["speedup_e2e"] = row["passreid_e2e_img_s"] / row["baseline_e2e_img_s"]
        row["speedup_step"] = row["passreid_step_img_s"] / row["baseline_step_img_s"]
        row["mfu"] = (row["gflop_per_image"] * 1e9 * row["passreid_step_img_s"] / (peak * 1e12)) if peak else None
        rows.append(row)
        mfu = "n/a" if row["mfu"] is None else f"{row['mfu']:.1%}"
        print(f"{name:>15} batch {int(batch):>4}: passreid {row['passreid_step_img_s']:8.1f} img/s "
              f"(e2e {row['passreid_e2e_img_s']:8.1f}, MFU {mfu}, peak {row['passreid_peak_gib']} GiB) | "
              f"baseline {row['baseline_step_img_s']:8.1f} img/s (e2e {row['baseline_e2e_img_s']:8.1f}, "
              f"peak {row['baseline_peak_gib']} GiB) | e2e x{row['speedup_e2e']:.2f} | augmentation "
              f"{row['aug_ms']:.1f} ms vs model step {row['model_step_ms']:.1f} ms", flush=True)
    report = {
        "device": device_name, "peak_tflops": peak, "cpu_cores": args.cpu_cores, "torch": torch.__version__,
        "baseline_aug_img_s_per_worker": baseline_worker, "passreid_decode_img_s_per_worker": decode_worker,
        "steps": args.steps, "quick": args.quick, "results": rows,
    }
    print(json.dumps(report))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
