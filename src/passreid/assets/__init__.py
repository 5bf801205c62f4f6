"""Files shipped inside the package: the demo's pretrained backbone.

``pass_vit_tiny_synthetic.pth`` is the teacher backbone that ``passreid pretrain``
exported after the small-scale recipe (``configs/pretrain/synthetic_tiny.yaml``,
at the 13 epochs = 2,431 steps it had then: 35 minutes alone on 2 CPU cores, 80
for this file beside other jobs) on a 6,000-image synthetic pool of 50 cameras,
one scene behind each image. Its ``.json``
sidecar is the export's own (the run's full config and metadata) plus
``meta.made_by``: the commands, run from the repository root, that made it. The demo fine-tunes from it, because
pretraining that learns (issue #14) takes longer than the demo's 5 minutes.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from passreid.checkpoint_io import read_sidecar
from passreid.fileio import atomic_write, write_text_atomic

DEMO_BACKBONE = Path(__file__).with_name("pass_vit_tiny_synthetic.pth")
"""The demo's pretrained tiny PASS ViT (depth 4, 128x64): a plain backbone state dict, published key names."""

DEMO_BACKBONE_COMMANDS: tuple[str, ...] = (
    "passreid synth data/synth_pool --pool 6000 --scenes 50 --no-clutter --seed 3",
    "passreid pretrain configs/pretrain/synthetic_tiny.yaml run.epochs=13",
)
"""What made :data:`DEMO_BACKBONE`, from the repository root; the export is
``runs/pretrain/synthetic_tiny/backbone.pth``."""


def ship_demo_backbone(export: str | Path, dest: Path = DEMO_BACKBONE) -> dict[str, Any]:
    """Copy an export of :data:`DEMO_BACKBONE_COMMANDS` (``backbone.pth`` and its sidecar) to ``dest``,
    recording the commands in the sidecar's ``meta.made_by``; returns the new sidecar."""
    export = Path(export)
    sidecar = read_sidecar(export)
    if sidecar is None:
        raise FileNotFoundError(f"{export.with_suffix('.json')}: no sidecar beside the export {export}")
    sidecar["meta"]["made_by"] = list(DEMO_BACKBONE_COMMANDS)
    with open(export, "rb") as src, atomic_write(dest) as out:
        shutil.copyfileobj(src, out)
    write_text_atomic(dest.with_suffix(".json"), json.dumps(sidecar, indent=2, default=str) + "\n")
    return sidecar
