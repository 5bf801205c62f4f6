"""``passreid export-backbone CKPT OUT``: the teacher backbone of a pretraining checkpoint, under the PASS names.

OUT is a plain ``{name: tensor}`` state dict with exactly the DESIGN §2 names
(no ``module.``/``backbone.`` prefixes), the format fine-tuning and the
published PASS backbones use; OUT with suffix ``.json`` holds its provenance.
"""

from __future__ import annotations

import argparse

NAME = "export-backbone"
HELP = "write the teacher backbone of a pretraining checkpoint as a plain PASS state dict (+ OUT.json)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", metavar="CKPT",
                        help="pretraining checkpoint (passreid last.pth, a published PASS/DINO one, or a backbone)")
    parser.add_argument("out", metavar="OUT", help="output file, e.g. pass_vit_small.pth")


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from passreid.export import export_backbone

    sidecar = export_backbone(args.checkpoint, args.out)
    meta = sidecar["meta"]
    arch = meta["arch"]
    print(f"wrote {args.out} (embed_dim {arch['embed_dim']}, depth {arch['depth']}, input "
          f"{meta['img_size'][0]}x{meta['img_size'][1]}, from {meta['format']}) and {Path(args.out).with_suffix('.json')}")
    return 0
