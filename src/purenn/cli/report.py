"""``purenn report``: a static HTML report of a purified file and its data
(:func:`purenn.analysis.report.write_report`).

The report folder holds ``index.html`` and the reference images beside it; it opens offline in any
browser. Pass the same data options as to ``purify`` (reference samples are stored by index).

Example:
    purenn report purified.safetensors --fashion-mnist --limit 3000 --out report/
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

__all__ = ["add_parser", "run"]

_DESCRIPTION = (
    "Write a static HTML report of a purified model: the model and its purified layers, a table of the purified "
    "neurons sortable by score and the other columns, and per neuron the reference images of each virtual neuron, "
    "the 2-D embedding of its circuits, the class shares of its references and the suppressed virtual neurons. "
    "The folder (index.html and img/) opens offline in any browser. Pass the same data options as to purify "
    "(reference samples are stored by index)."
)


def run(args: argparse.Namespace) -> int:
    """Run ``purenn report`` (see the module docstring); returns the exit code."""
    from purenn.analysis.report import write_report
    from purenn.arch import input_conv
    from purenn.cli import common
    from purenn.cli.loaders import InputError
    from purenn.fit.refcheck import check_references

    if args.top is not None and args.top < 1:
        raise InputError(f"--top must be a positive number of neurons, got {args.top}.")
    if args.n_images < 1:
        raise InputError(f"--n-images must be a positive number of images, got {args.n_images}.")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise InputError(f"--out {args.out!r} is a file; give a folder for the report.")
    pm = common.load_purified_file(args.model)
    layers = None if args.layers is None else [name for item in args.layers for name in item.split(",") if name]
    for name in layers or []:
        pm.pure_layer(name)
    data = common.data_from_args(args, int(input_conv(pm.base_model).in_channels))
    common.say(args, f"data: {data.description}")
    check_references(pm, data.dataset, given=common.data_flags(args))  # other data: a DataError saying which
    index = write_report(pm, data.dataset, out, labels=data.labels, class_names=data.class_names, layers=layers,
                         top=args.top, n_images=args.n_images, embedding=args.embedding, seed=args.seed,
                         title=f"purenn report: {Path(args.model).name}", data_description=data.description,
                         batch_size=args.batch_size, progress=not args.quiet)
    print(f"wrote {index}")
    return 0


def add_parser(sub: Any, epilog: str, fmt: Any) -> None:
    """Add the ``report`` sub-command to the ``purenn`` parser."""
    from purenn.cli.common import add_data_args

    p = sub.add_parser("report", help="write a static HTML report of a purified model and its data",
                       epilog=epilog, formatter_class=fmt, description=_DESCRIPTION + "\n\n  "
                       "purenn report purified.safetensors --fashion-mnist --limit 3000 --out report/\n"
                       "  purenn report purified.safetensors --data images/ --top 20 --out report/")
    p.add_argument("model", help="purified .safetensors file")
    add_data_args(p)
    p.add_argument("--layers", nargs="+", metavar="LAYER", help="purified layers to report (default: all)")
    p.add_argument("--top", type=int, default=50, metavar="N",
                   help="report the N highest-scoring purified neurons (default 50)")
    p.add_argument("--n-images", type=int, default=8, metavar="N", help="images per virtual neuron (default 8)")
    p.add_argument("--embedding", choices=("pca", "tsne"), default="pca", help="2-D embedding of the circuits")
    p.add_argument("--batch-size", type=int, default=64, metavar="N")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("-o", "--out", default="report", metavar="DIR", help="report folder (default report)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar or notes")
    p.set_defaults(func=run)
