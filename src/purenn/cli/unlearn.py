"""``purenn unlearn``: remove a concept (e.g. a Clever-Hans artifact) from a ResNet with concept examples.

The examples are an image folder with two sub-folders, ``concept/`` (images with the concept) and
``other/`` (images without it; ideally the same images without the artifact). The command splits
the channels the concept raises most (or, with ``--target``, those most relevant to the class the
concept points to) into a concept and a rest virtual neuron (:func:`purenn.fit.concept.purify_concept`),
suppresses the concept parts and saves the result. With
``--eval`` (clean test images, one sub-folder per class, in the model's class order),
``--eval-concept`` (images with the concept, same layout) and ``--target`` (the class the concept
points to), it prints the artifact reliance and the accuracy before and after, and with the same
channels ablated whole (:func:`purenn.analysis.unlearn.shortcut_report`).

Example:
    purenn unlearn resnet18 --checkpoint model.pt --examples examples/ --neurons 64 \\
        --eval test/ --eval-concept test_stamped/ --target cat --out unlearned.safetensors
"""

from __future__ import annotations

import argparse
from typing import Any

import numpy as np

from purenn.cli.loaders import InputError, load_data

__all__ = ["add_parser", "run"]

EXAMPLE_CLASSES = ("concept", "other")
_DESCRIPTION = (
    "Split the channels a concept raises most into a concept and a rest virtual neuron, using example images "
    "with the concept (EXAMPLES/concept/) and without it (EXAMPLES/other/), suppress the concept parts and save "
    "the model. With --eval, --eval-concept and --target, report the concept's reliance and the accuracy before, "
    "after, and with the same channels ablated whole."
)


def _folder(args: argparse.Namespace, path: str, in_channels: int) -> Any:
    return load_data(folder=path, in_channels=in_channels, image_size=args.image_size, mean=args.mean, std=args.std)


def _examples(args: argparse.Namespace, in_channels: int) -> tuple[Any, Any, str]:
    from torch.utils.data import Subset

    data = _folder(args, args.examples, in_channels)
    if sorted(data.class_names) != sorted(EXAMPLE_CLASSES):
        raise InputError(f"--examples {args.examples!r} must hold exactly the sub-folders concept/ and other/, found "
                         f"{data.class_names}.")
    concept = np.flatnonzero(data.labels == data.class_names.index("concept")).tolist()
    other = np.flatnonzero(data.labels == data.class_names.index("other")).tolist()
    return Subset(data.dataset, concept), Subset(data.dataset, other), \
        f"{len(concept)} concept and {len(other)} other examples from {args.examples}"


def _layers(text: list[str]) -> list[str]:
    return [name for item in text for name in item.split(",") if name]


def run(args: argparse.Namespace) -> int:
    """Run ``purenn unlearn`` (see the module docstring); returns the exit code."""
    from purenn.analysis.unlearn import shortcut_report
    from purenn.arch import ResNetSpec
    from purenn.cli import common
    from purenn.fit.concept import concept_virtual_indices, purify_concept

    out = common.output_path(args.out, ".safetensors", f"--out {args.out!r}")
    if args.neurons < 1:
        raise InputError(f"--neurons must be a positive number of channels, got {args.neurons}.")
    if args.rest_clusters < 1:
        raise InputError(f"--rest-clusters must be at least 1, got {args.rest_clusters}.")
    if (args.eval is None) != (args.eval_concept is None):
        raise InputError("the report needs both --eval and --eval-concept (and --target).")
    if args.eval is not None and args.target is None:
        raise InputError("the report needs --target, the class the concept points to.")
    layers = _layers(args.layers)
    model, origin = common.base_model(args)
    spec = ResNetSpec(model)
    for name in layers:
        spec.default_upstream(name)  # unknown layer names fail here, before any image is read
    in_ch = spec.in_channels
    clean = stamped = None
    target = None
    if args.eval is not None:
        clean = _folder(args, args.eval, in_ch)
        stamped = _folder(args, args.eval_concept, in_ch)
        if clean.class_names != stamped.class_names:
            raise InputError(f"--eval and --eval-concept must have the same class sub-folders: {clean.class_names} "
                             f"vs {stamped.class_names}.")
        if args.target not in clean.class_names:
            raise InputError(f"--target {args.target!r} is not a class of --eval: {clean.class_names}.")
        target = clean.class_names.index(args.target)
        common.check_accuracy(args, model, clean)  # a checkpoint rebuilt wrongly makes every figure meaningless
    elif args.target is not None:
        if not args.target.isdigit():
            raise InputError(f"--target {args.target!r}: without --eval, give the class as an index (0, 1, ...).")
        target = int(args.target)
    concept, other, what = _examples(args, in_ch)
    common.say(args, f"model: {origin}\nexamples: {what}")
    pm = purify_concept(model, layers, concept, other, neurons=args.neurons, target=target, gate=args.gate,
                        gate_weight=args.gate_weight, rest_clusters=args.rest_clusters, batch_size=args.batch_size)
    for name in pm.layers:
        idx = concept_virtual_indices(pm, name)
        pm.suppress(name, idx)
        print(f"{name}: {len(idx)} channels split into {args.rest_clusters} rest and 1 concept virtual neuron(s) "
              f"each; the {len(idx)} concept virtual neurons are suppressed")
    if clean is not None and stamped is not None and target is not None:
        report = shortcut_report(pm, clean.dataset, clean.labels, stamped.dataset, stamped.labels, target,
                                 batch_size=args.batch_size)
        print(f"target class {args.target!r}; reliance = share of other classes' images with the concept predicted "
              "as the target, minus that share without it")
        print(report.summary())
    pm.save(out)
    print(f"saved {out}")
    common.say(args, f"next: purenn export {out} {out.with_suffix('.onnx')} --input-shape C,H,W --outputs logits")
    return 0


def add_parser(sub: Any, epilog: str, fmt: Any) -> None:
    """Add the ``unlearn`` sub-command to the ``purenn`` parser."""
    from purenn.cli.loaders import ARCHITECTURES
    from purenn.common.choices import DEFAULT_CONCEPT_GATE, GATES

    p = sub.add_parser("unlearn", help="remove a concept (e.g. an artifact) using concept examples, and save",
                       epilog=epilog, formatter_class=fmt, description=_DESCRIPTION + "\n\n  "
                       "purenn unlearn resnet18 --checkpoint model.pt --examples examples/ --neurons 64 "
                       "--out unlearned.safetensors\n  ... --eval test/ --eval-concept test_stamped/ --target cat")
    p.add_argument("model", help=f"torchvision ResNet name ({', '.join(ARCHITECTURES)}), a timm ResNet as timm:NAME "
                   "or a purified .safetensors file (its base model is used)")
    p.add_argument("-c", "--checkpoint", metavar="FILE", help="trained weights (.pt/.pth state_dict or .safetensors)")
    p.add_argument("--weights", metavar="NAME", help="torchvision's or timm's pretrained weights instead, e.g. DEFAULT")
    from purenn.cli.common import parse_blocks

    p.add_argument("--blocks", type=parse_blocks, metavar="A,B,C,D", help="blocks per stage for a custom depth")
    p.add_argument("--stem-stride", type=int, choices=(1, 2), default=None,
                   help="stride of an adapted (non-7x7) stem convolution; needed when the checkpoint does not "
                   "record its architecture")
    p.add_argument("--examples", required=True, metavar="DIR", help="folder with sub-folders concept/ and other/")
    p.add_argument("--image-size", type=int, metavar="N", help="square input size (default 224)")
    p.add_argument("--mean", type=float, nargs="+", metavar="M", help="normalisation mean per channel")
    p.add_argument("--std", type=float, nargs="+", metavar="S", help="normalisation std per channel")
    p.add_argument("--layers", nargs="+", default=["layer4"], metavar="LAYER", help="target layers (default layer4)")
    p.add_argument("--neurons", type=int, default=64, metavar="N",
                   help="channels per layer to split: those the concept raises most (default 64)")
    p.add_argument("--rest-clusters", type=int, default=3, metavar="R",
                   help="virtual neurons for what a channel does besides the concept (default 3)")
    p.add_argument("--gate", default=DEFAULT_CONCEPT_GATE, choices=GATES,
                   help=f"what selects the virtual neuron (default {DEFAULT_CONCEPT_GATE}: one circuit for the "
                   "concept's channels together; circuit: PURE's, one per channel)")
    p.add_argument("--gate-weight", type=float, default=0.5, metavar="W",
                   help="weight of the activation map in a circuit+map gate (default 0.5)")
    p.add_argument("--batch-size", type=int, default=64, metavar="N")
    p.add_argument("--target", metavar="CLASS", help="the class the concept points to (a sub-folder name of --eval, "
                   "or an index): channels are then ranked by their relevance to it instead of by activation")
    g = p.add_argument_group("report (optional; with --target)")
    g.add_argument("--eval", metavar="DIR", help="clean test images, one sub-folder per class in the model's order")
    g.add_argument("--eval-concept", metavar="DIR", help="test images with the concept, same sub-folders")
    p.add_argument("-o", "--out", default="unlearned.safetensors", metavar="FILE",
                   help="output file (default unlearned.safetensors)")
    p.add_argument("-q", "--quiet", action="store_true", help="no notes")
    p.set_defaults(func=run)
