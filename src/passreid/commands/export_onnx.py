"""``passreid export-onnx``: a checkpoint's test feature as an ONNX graph with a dynamic batch axis.

By default the graph takes float32 RGB in [0, 1] and normalises it itself
(``--input uint8``: RGB in 0..255; ``--input normalised``: the caller normalises,
as earlier exports expected); the contract is printed and stored in the model's
metadata (``input``, ``input_contract``).
"""

from __future__ import annotations

import argparse

NAME = "export-onnx"
HELP = "export a checkpoint to ONNX (RGB images -> L2-normalised features), checked with onnxruntime"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", metavar="CKPT", help="any supported checkpoint (fine-tuned, backbone, ...)")
    parser.add_argument("out", metavar="OUT.onnx", help="the ONNX file to write")
    parser.add_argument("--opset", type=int, help="ONNX opset (default: passreid.export.DEFAULT_OPSET, 18)")
    parser.add_argument("--input", choices=("float", "uint8", "normalised"), default="float",
                        help="what the graph takes: float32 RGB in [0, 1] (default) or uint8 RGB in 0..255, "
                             "normalised inside the graph; or 'normalised': images already (x - mean) / std")
    parser.add_argument("--no-verify", action="store_true",
                        help="skip the onnxruntime-vs-torch check on batches of 1 and 3")


def run(args: argparse.Namespace) -> int:
    from passreid.export import DEFAULT_OPSET, OUTPUT_NAME, export_onnx

    opset = DEFAULT_OPSET if args.opset is None else args.opset
    report = export_onnx(args.checkpoint, args.out, opset=opset, verify=not args.no_verify, input_format=args.input)
    print(f"wrote {report.path} (opset {report.opset})")
    print(f"input  {report.contract}")
    print(f"output {OUTPUT_NAME}: (batch, {report.feat_dim}) float32, L2-normalised")
    if report.max_abs_diff is not None:
        print(f"onnxruntime vs torch on batches 1 and 3: max abs diff {report.max_abs_diff:.2e}")
    return 0
