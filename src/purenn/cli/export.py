"""``purenn export``: export a purified file to ONNX and verify it with ONNX Runtime."""

from __future__ import annotations

import argparse
from typing import Any

from purenn.cli.common import (
    EXIT_OK,
    load_purified_file,
    output_path,
    say,
)


def _parse_shape(text: str) -> tuple[int, ...]:
    try:
        shape = tuple(int(v) for v in text.replace("x", ",").split(","))
    except ValueError:
        shape = ()
    if len(shape) != 3 or min(shape) < 1:
        raise argparse.ArgumentTypeError(f"expected C,H,W such as 3,224,224, got {text!r}")
    return shape


def run(args: argparse.Namespace) -> int:
    from purenn.errors import ConfigError
    from purenn.io.onnx import check_outputs, export_onnx

    out = output_path(args.onnx, ".onnx", f"the output {args.onnx!r}")
    try:
        outputs = check_outputs(args.outputs.split(","))
    except ConfigError as e:
        raise ConfigError(f"--outputs {args.outputs!r}: {e}") from None
    pm = load_purified_file(args.model)
    kwargs = {} if args.opset is None else {"opset": args.opset}
    say(args, f"exporting {args.model} -> {out} (input (batch, {', '.join(map(str, args.input_shape))}), "
         f"outputs {','.join(outputs)})")
    report = export_onnx(pm, out, input_shape=args.input_shape, outputs=outputs,
                         pool=None if args.pool == "none" else args.pool, verify=not args.no_verify, **kwargs)
    print(report.summary())
    print(f"outputs: {', '.join(report.outputs)}")
    print(f"wrote {out}" + ("" if report.ok is None else " (verified with ONNX Runtime)"))
    return EXIT_OK


def add_parser(sub: Any, epilog: str, fmt: Any) -> None:
    """Add the ``export`` sub-command to the ``purenn`` parser."""
    p = sub.add_parser("export", help="export to ONNX and verify it with ONNX Runtime", epilog=epilog,
                       formatter_class=fmt, description="Export a purified model to ONNX (outputs logits, "
                       "pure.<layer>, gate.<layer>) and compare ONNX Runtime with PyTorch. With --outputs logits "
                       "the graph gates only neurons with a suppressed virtual neuron (an unlearned model costs "
                       "only what its suppressions need).\n\n"
                       "  purenn export purified.safetensors purified.onnx --input-shape 3,224,224\n"
                       "  purenn export unlearned.safetensors unlearned.onnx --input-shape 3,224,224 --outputs logits")
    p.add_argument("model", help="purified .safetensors file")
    p.add_argument("onnx", help="output .onnx file")
    p.add_argument("--input-shape", type=_parse_shape, required=True, metavar="C,H,W", help="input shape per sample")
    p.add_argument("--opset", type=int, default=None, help="ONNX opset (default 17)")
    p.add_argument("--outputs", default="logits,pure,gate", metavar="KINDS",
                   help="comma-separated outputs of the graph among logits, pure, gate, with logits always "
                   "among them (default logits,pure,gate); logits alone gates only neurons with a suppression")
    p.add_argument("--pool", choices=("mean", "max", "none"), default="mean",
                   help="pure.<layer> outputs: pooled features (mean, max) or maps (none); default mean")
    p.add_argument("--no-verify", action="store_true", help="skip the ONNX Runtime comparison (onnx.checker runs)")
    p.add_argument("-q", "--quiet", action="store_true")
    p.set_defaults(func=run)
