"""Fine-tuning throughput: passreid's training step against the published recipe's step.

Both sides train the same ReID model (PASS ViT-S/16 at 256x128, multi-neck,
cat fusion, 751 classes as Market-1501) on the same batch of 64 images (16
identities x 4) already on the device, so only the step is timed, not JPEG
decoding:

- ``baseline`` mirrors the published TransReID/PASS loop: fp16 autocast with a
  GradScaler, attention written out (``softmax(q k^T / sqrt(d)) v`` as three
  kernels), SGD updating one tensor at a time (``foreach=False``), and the
  per-step ``loss.item()`` and ``torch.cuda.synchronize()`` of that loop;
- ``passreid`` is :func:`passreid.finetune.train_one_epoch` as ``passreid
  train`` runs it: bf16 autocast (no loss scaling), fused
  ``scaled_dot_product_attention``, fused SGD, fp32 losses; ``--compile``
  adds ``torch.compile`` (``compile: true`` in a recipe).

Prints one JSON line: images/s of both, and ``ratio`` = passreid / baseline.

    python benchmarks/bench_finetune.py                  # GPU, ViT-S 256x128, batch 64
    python benchmarks/bench_finetune.py --compile        # also time passreid with torch.compile
    python benchmarks/bench_finetune.py --quick          # tiny sizes on the CPU: a smoke test, not a measurement
"""

from __future__ import annotations

import argparse
import json
import time
import types
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor, nn

from passreid.runtime import make_grad_scaler, resolve_precision
from passreid.finetune import OptimConfig, build_optimizer, train_one_epoch
from passreid.losses.reid import ReIDLoss
from passreid.models import ReIDModel, create_model
from passreid.models.vit import Attention


def explicit_attention(self: Attention, x: Tensor) -> Tensor:
    """The published attention: scores, softmax and weighted sum as separate kernels (B, T, D) -> (B, T, D)."""
    b, t, d = x.shape
    q, k, v = self._qkv(x)
    attn = (q @ k.transpose(-2, -1)) * self.scale
    attn = attn.softmax(dim=-1)
    return self.proj((attn @ v).transpose(1, 2).reshape(b, t, d))


def make_model(args: argparse.Namespace, device: torch.device, *, explicit: bool) -> ReIDModel:
    torch.manual_seed(0)
    backbone = create_model(args.model, img_size=tuple(args.img_size), depth=args.depth, drop_path_rate=0.1)
    if explicit:
        for module in backbone.modules():
            if isinstance(module, Attention):
                module.forward = types.MethodType(explicit_attention, module)  # type: ignore[method-assign]
    return ReIDModel(backbone, num_classes=args.num_classes).to(device)


def make_batch(args: argparse.Namespace, device: torch.device) -> tuple[Tensor, Tensor]:
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(args.batch_size, 3, *args.img_size, generator=generator).to(device)
    labels = torch.arange(args.batch_size // 4).repeat_interleave(4).to(device)
    return images, labels


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench_baseline(args: argparse.Namespace, device: torch.device) -> float:
    """Images/s of the published step: fp16 + GradScaler, explicit attention, one-tensor-at-a-time SGD."""
    model = make_model(args, device, explicit=True).train()
    weights = [p for n, p in model.named_parameters() if p.requires_grad and not n.endswith("bias")]
    biases = [p for n, p in model.named_parameters() if p.requires_grad and n.endswith("bias")]
    optimizer = torch.optim.SGD([{"params": weights}, {"params": biases, "lr": 8e-4}], lr=4e-4, momentum=0.9,
                                weight_decay=1e-4, foreach=False)
    scaler = torch.amp.GradScaler(device.type)
    criterion = ReIDLoss()
    images, labels = make_batch(args, device)

    def step() -> None:
        optimizer.zero_grad()
        with torch.autocast(device_type=device.type, dtype=torch.float16):
            out = model(images)
            loss, _ = criterion(out.logits, out.feat, labels)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        (out.logits.max(1)[1] == labels).float().mean()
        loss.item()
        sync(device)

    for _ in range(args.warmup):
        step()
    sync(device)
    start = time.perf_counter()
    for _ in range(args.steps):
        step()
    sync(device)
    return args.steps * args.batch_size / (time.perf_counter() - start)


class RepeatLoader:
    """The same on-device batch ``steps`` times, shaped like a ReID loader: (images, pids, camids, index)."""

    def __init__(self, images: Tensor, labels: Tensor, steps: int) -> None:
        self.batch = (images, labels, torch.zeros_like(labels), labels)
        self.steps = steps
        self.batch_size = images.shape[0]

    def __iter__(self) -> Iterator[tuple[Tensor, ...]]:
        return iter([self.batch] * self.steps)

    def __len__(self) -> int:
        return self.steps


def bench_passreid(args: argparse.Namespace, device: torch.device, *, compile_model: bool) -> float:
    """Images/s of :func:`passreid.finetune.train_one_epoch` with the recipe's precision, SDPA and fused SGD."""
    model: nn.Module = make_model(args, device, explicit=False)
    optimizer = build_optimizer(model, OptimConfig(), device=device)
    precision = resolve_precision("auto", device)
    scaler = make_grad_scaler(precision, device)
    if compile_model:
        model = torch.compile(model)  # type: ignore[assignment]
    criterion = ReIDLoss()
    images, labels = make_batch(args, device)
    kwargs: dict[str, Any] = dict(epoch=1, device=device, precision=precision)
    train_one_epoch(model, RepeatLoader(images, labels, args.warmup), criterion, optimizer, scaler, **kwargs)
    sync(device)
    start = time.perf_counter()
    train_one_epoch(model, RepeatLoader(images, labels, args.steps), criterion, optimizer, scaler, **kwargs)
    sync(device)
    return args.steps * args.batch_size / (time.perf_counter() - start)


def check_same_model(args: argparse.Namespace, device: torch.device) -> float:
    """Largest difference between explicit and fused attention features in fp32 (both sides compute one model)."""
    a = make_model(args, device, explicit=True).eval()
    b = make_model(args, device, explicit=False).eval()
    images, _ = make_batch(args, device)
    with torch.no_grad():
        return float((a(images[:4]) - b(images[:4])).abs().max())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="auto", help="auto (CUDA if present), cuda or cpu")
    parser.add_argument("--model", default="pass_vit_small")
    parser.add_argument("--depth", type=int, default=12)
    parser.add_argument("--img-size", type=int, nargs=2, default=[256, 128], metavar=("H", "W"))
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--num-classes", type=int, default=751)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--compile", action="store_true", help="also time passreid with torch.compile")
    parser.add_argument("--quick", action="store_true", help="tiny model, 64x32, batch 8, 2 steps (CPU smoke test)")
    args = parser.parse_args()
    if args.quick:
        args.model, args.depth, args.img_size, args.batch_size = "pass_vit_tiny", 2, [64, 32], 8
        args.num_classes, args.steps, args.warmup = 10, 2, 1
    if args.batch_size % 4:
        parser.error("--batch-size must be a multiple of 4 (identities x 4 images)")
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    if device.type == "cpu" and not args.quick:
        print("no GPU: the numbers below do not measure the target (ViT-S on a GPU); use --quick for a smoke test")

    max_diff = check_same_model(args, device)
    baseline = bench_baseline(args, device)
    passreid = bench_passreid(args, device, compile_model=False)
    result: dict[str, Any] = {
        "benchmark": "finetune_train_step",
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "model": args.model,
        "depth": args.depth,
        "img_size": args.img_size,
        "batch_size": args.batch_size,
        "steps": args.steps,
        "baseline": {"images_per_s": round(baseline, 2), "precision": "fp16+GradScaler",
                     "attention": "explicit", "optimizer": "SGD foreach=False"},
        "passreid": {"images_per_s": round(passreid, 2), "precision": resolve_precision("auto", device),
                     "attention": "sdpa", "optimizer": "SGD fused" if device.type == "cuda" else "SGD foreach"},
        "ratio": round(passreid / baseline, 3),
        "attention_max_abs_diff_fp32": max_diff,
    }
    if args.compile:
        compiled = bench_passreid(args, device, compile_model=True)
        result["passreid_compiled"] = {"images_per_s": round(compiled, 2)}
        result["ratio_compiled"] = round(compiled / baseline, 3)
    if args.quick:
        result["note"] = "smoke test at tiny sizes; not a throughput measurement"
    print(json.dumps(result))


if __name__ == "__main__":
    main()
