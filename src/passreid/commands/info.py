"""``passreid info``: what a checkpoint holds (format, architecture, input size, heads, provenance)."""

from __future__ import annotations

import argparse
import json
from typing import Any

NAME = "info"
HELP = "describe a checkpoint: format, architecture, input size, necks/classifier, meta and config"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", metavar="CKPT", help="any supported checkpoint or export (.pth)")
    parser.add_argument("--json", action="store_true", help="print the description as JSON instead of a table")


def _flatten(value: Any, prefix: str) -> list[tuple[str, str]]:
    """Nested dicts as ``a.b`` rows, everything else as one compact JSON value."""
    if isinstance(value, dict) and value:
        rows: list[tuple[str, str]] = []
        for key, sub in value.items():
            rows.extend(_flatten(sub, f"{prefix}.{key}" if prefix else str(key)))
        return rows
    text = value if isinstance(value, str) else json.dumps(value, default=str)
    return [(prefix, text)]


def run(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from passreid.checkpoint import checkpoint_info

    info = checkpoint_info(args.checkpoint)
    if args.json:
        print(json.dumps(info, indent=2, default=str))
        return 0

    console = Console()
    summary = Table(title=f"checkpoint {info['path']}", show_header=False)
    summary.add_column("field", style="bold")
    summary.add_column("value")
    for key in ("format", "arch", "embed_dim", "depth", "num_heads", "patch_size", "mlp_ratio", "qkv_bias"):
        summary.add_row(key, str(info[key]))
    summary.add_row("img_size", f"{info['img_size'][0]}x{info['img_size'][1]} (from {info['img_size_source']})")
    summary.add_row("grid", f"{info['grid'][0]}x{info['grid'][1]}")
    summary.add_row("tokens", f"{info['tokens']} ({'timm, converted on load' if info['tokens'] == 1 else 'PASS'})")
    summary.add_row("backbone parameters", f"{info['backbone_parameters']:,}")
    summary.add_row("pretraining heads", "yes" if info["pretrain_heads"] else "no")
    necks = ", ".join(info["necks"]) or "none"
    if info["neck"]:
        necks += f" ({info['neck']}-neck" + (f", {info['neck_names']} names)" if info["neck_names"] else ")")
    summary.add_row("necks", necks)
    summary.add_row("fusion", str(info["fusion"] or "unknown"))
    summary.add_row("classifier", f"{info['num_classes']} classes" if info["classifier"] else "none")
    summary.add_row("keys ignored on load", str(info["ignored_keys"]))
    if info["unknown_keys"]:
        summary.add_row("unknown keys", ", ".join(info["unknown_keys"]))
    if info["epoch"] is not None:
        summary.add_row("epoch", str(info["epoch"]))
    for key, value in (info.get("metrics") or {}).items():
        summary.add_row(key, f"{100 * value:.2f}%" if key == "mAP" or key.startswith(("rank", "mINP")) else str(value))
    console.print(summary)

    for section in ("meta", "config", "args"):
        if info[section]:
            table = Table(title=section, show_header=False)
            table.add_column("key", style="bold")
            table.add_column("value")
            for key, value in _flatten(info[section], ""):
                table.add_row(key, value)
            console.print(table)
    return 0
