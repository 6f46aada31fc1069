"""``purenn show``: draw one purified neuron, its reference images per virtual neuron and its circuits in 2-D."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from purenn.cli.common import (
    EXIT_OK,
    add_data_args,
    data_flags,
    data_from_args,
    load_purified_file,
    say,
)
from purenn.cli.loaders import (
    InputError,
)


def run(args: argparse.Namespace) -> int:
    from purenn.analysis.viz import save_neuron_figure
    from purenn.fit.refcheck import check_references

    pm = load_purified_file(args.model)
    layer = args.layer or pm.layers[0]
    pl = pm.pure_layer(layer)
    if args.neuron is None:
        split = (pl.n_clusters > 1).nonzero().flatten()
        pick = split if len(split) else pl.n_clusters.new_tensor(range(len(pl.neurons)))
        channel = int(pl.neurons[pick[int(pl.scores[pick].argmax())]])
    else:
        channel = args.neuron
        if channel not in pl.neurons.tolist():
            shown = ", ".join(map(str, pl.neurons.tolist()[:12])) + (", ..." if len(pl.neurons) > 12 else "")
            raise InputError(f"--neuron {channel} is not a purified channel of {layer}; purified channels: {shown}.")
    from purenn.arch import input_conv

    data = data_from_args(args, int(input_conv(pm.base_model).in_channels))
    out = Path(args.out or f"{Path(args.model).stem}_{layer}_{channel}.png")
    if not out.parent.exists():
        raise InputError(f"cannot write {str(out)!r}: folder {str(out.parent)!r} does not exist.")
    say(args, f"data: {data.description}")
    check_references(pm, data.dataset, given=data_flags(args))
    save_neuron_figure(pm, layer, channel, data.dataset, str(out), n_images=args.n_images,
                       embedding=args.embedding, seed=args.seed, labels=data.labels, class_names=data.class_names,
                       dpi=args.dpi)
    print(f"wrote {out} ({layer} neuron {channel})")
    return EXIT_OK


def add_parser(sub: Any, epilog: str, fmt: Any) -> None:
    """Add the ``show`` sub-command to the ``purenn`` parser."""
    p = sub.add_parser("show", help="draw a neuron: reference images per virtual neuron and its circuits in 2-D",
                       epilog=epilog, formatter_class=fmt, description="Draw one purified neuron: its top "
                       "reference images per virtual neuron next to a 2-D embedding of its circuits, coloured by "
                       "cluster. Pass the same data options as to purify (reference samples are stored by index)."
                       "\n\n  purenn show purified.safetensors --data images/ --neuron 7 --out neuron7.png")
    p.add_argument("model", help="purified .safetensors file")
    add_data_args(p)
    p.add_argument("--layer", help="purified layer (default: the first)")
    p.add_argument("--neuron", type=int, metavar="CHANNEL", help="channel (default: the most polysemantic)")
    p.add_argument("--embedding", choices=("pca", "tsne"), default="pca")
    p.add_argument("--n-images", type=int, default=6, metavar="N", help="images per virtual neuron (default 6)")
    p.add_argument("--dpi", type=int, default=110)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("-o", "--out", metavar="FILE.png", help="figure file (default MODEL_LAYER_NEURON.png)")
    p.add_argument("-q", "--quiet", action="store_true")
    p.set_defaults(func=run)
