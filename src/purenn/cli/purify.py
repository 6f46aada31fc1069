"""``purenn purify``: purify a trained ResNet (torchvision, timm or a purified file's base model) and save it."""

from __future__ import annotations

import argparse
import os
from typing import Any

from purenn.cli.common import (
    EXIT_OK,
    add_data_args,
    base_model,
    check_accuracy,
    data_from_args,
    data_options,
    output_path,
    parse_blocks,
    say,
)
from purenn.cli.loaders import (
    ARCHITECTURES,
    InputError,
)
from purenn.common.choices import DEFAULT_SCORE, GATES, PRECISIONS, RULES, SCORES


# ============================================================================================ commands
def _parse_neurons(counts: list[str] | None, channels: list[str] | None, layers: list[str]) -> Any:
    """``--neurons N|LAYER:N`` (the N most polysemantic) and ``--channels LAYER:C1,C2,...`` as purify_model's
    ``neurons=`` argument."""
    spec: dict[str, Any] = {}

    def layer_of(value: str, text: str) -> str:
        if text not in layers:
            raise InputError(f"{value!r} names layer {text!r}, which is not among --layers {layers}.")
        if text in spec:
            raise InputError(f"layer {text!r} is given twice in --neurons/--channels.")
        return text

    for v in counts or []:
        if v == "all":
            continue
        layer, sep, rest = v.rpartition(":")
        if not rest.isdigit():
            raise InputError(f"--neurons {v!r}: use N or LAYER:N (the N most polysemantic neurons), or all.")
        for name in [layer] if sep else layers:
            spec[layer_of(v, name)] = int(rest)
    for v in channels or []:
        layer, sep, rest = v.partition(":")
        try:
            chans = [int(c) for c in rest.split(",") if c.strip()]
        except ValueError:
            chans = []
        if not sep or not chans:
            raise InputError(f"--channels {v!r}: use LAYER:C1,C2,... such as layer4:0,5,7.")
        spec[layer_of(v, layer)] = chans
    return spec or None


def _check_device(device: str | None) -> None:
    if device is None:
        return
    import torch

    try:
        dev = torch.device(device)
    except RuntimeError:
        raise InputError(f"--device {device!r} is not a device; use cpu, cuda or cuda:N.") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise InputError(f"--device {device}: no CUDA GPU is available to PyTorch here; use --device cpu.")


def run(args: argparse.Namespace) -> int:
    from purenn.arch import ResNetSpec
    from purenn.fit.pipeline import purify_model

    out = output_path(args.out, ".safetensors", f"--out {args.out!r}")
    _check_device(args.device)
    named = [v.partition(":")[0] for v in args.channels or []] + [v.rpartition(":")[0] for v in args.neurons or []]
    if args.layers is None:  # default: the layers that --channels/--neurons name, else layer4
        layers = list(dict.fromkeys(n for n in named if n)) or ["layer4"]
    else:
        layers = [name for item in args.layers for name in item.split(",") if name]
    neurons = _parse_neurons(args.neurons, args.channels, layers)
    n_clusters = args.n_clusters if args.n_clusters == "auto" else int(args.n_clusters)
    model, origin = base_model(args)
    spec = ResNetSpec(model)
    for name in layers:
        spec.default_upstream(name)  # unknown layer names fail here, before the data is read
    in_ch = spec.in_channels
    data = data_from_args(args, in_ch)
    say(args, f"model: {origin}\ndata: {data.description}")
    check_accuracy(args, model, data)
    from purenn.common.distributed import init_from_env

    device, started = init_from_env(args.device)  # under torchrun: one process group, one GPU per rank
    try:
        pm = purify_model(
            model, layers, data.dataset, n_refs=args.n_refs, n_clusters=n_clusters, neurons=neurons,
            max_clusters=args.max_clusters, gate=args.gate, gate_weight=args.gate_weight, score=args.score,
            batch_size=args.batch_size, device=device, progress=not args.quiet, seed=args.seed,
            workers=args.workers, precision=args.precision, checkpoint_dir=args.checkpoint_dir, rule=args.rule,
        )
        pm.reference_data = {**(pm.reference_data or {}), "options": data_options(args, data)}
        pm.to("cpu")
        pm.save(out)  # rank 0 writes, the other ranks wait for it
    finally:
        if started:
            import torch.distributed

            torch.distributed.destroy_process_group()
    if int(os.environ.get("RANK", "0")) != 0:  # torchrun: rank 0 alone reports
        return EXIT_OK
    for name in pm.layers:
        print(f"{name}: {pm.pure_layer(name).summary()} (upstream {pm.pure_layer(name).upstream})")
    print(f"saved {out}")
    say(args, f"next: purenn inspect {out}")
    return EXIT_OK


def _clusters_arg(text: str) -> str:
    if text == "auto" or text.isdigit():
        return text
    raise argparse.ArgumentTypeError(f"expected an integer or 'auto', got {text!r}")


def add_parser(sub: Any, epilog: str, fmt: Any) -> None:
    """Add the ``purify`` sub-command to the ``purenn`` parser."""
    p = sub.add_parser("purify", help="purify a trained ResNet and save it", epilog=epilog, formatter_class=fmt,
                       description="Find each neuron's reference samples, cluster their circuits and save the "
                       "purified model.\n\n  purenn purify resnet18 --checkpoint model.pt --data images/ "
                       "--out purified.safetensors\n  purenn purify resnet18 --checkpoint fmnist.pt --blocks "
                       "1,1,1,1 --fashion-mnist --limit 5000 --neurons 16")
    p.add_argument("model", help=f"torchvision ResNet name ({', '.join(ARCHITECTURES)}), a timm ResNet as "
                   "timm:NAME (e.g. timm:resnet50.a1_in1k; needs purenn[timm]) or a purified .safetensors file (its "
                   "base model is purified again)")
    p.add_argument("-c", "--checkpoint", metavar="FILE", help="trained weights: .pt/.pth state_dict (loaded with "
                   "weights_only=True) or .safetensors; classes, input channels and stem are read from it")
    p.add_argument("--weights", metavar="NAME", help="pretrained weights instead: torchvision's (e.g. DEFAULT) or "
                   "timm's (DEFAULT: the tag in the name, or a tag such as a1_in1k)")
    p.add_argument("--blocks", type=parse_blocks, metavar="A,B,C,D", help="blocks per stage for a custom depth")
    p.add_argument("--stem-stride", type=int, choices=(1, 2), default=None,
                   help="stride of an adapted (non-7x7) stem convolution; needed when the checkpoint does not "
                   "record its architecture (checkpoints purenn trained do)")
    add_data_args(p)
    g = p.add_argument_group("purification")
    g.add_argument("--layers", nargs="+", metavar="LAYER", help="target layers, e.g. layer4 layer3.1 (default: "
                   "the layers --channels/--neurons name, else layer4)")
    g.add_argument("--neurons", action="append", metavar="N|LAYER:N", help="purify the N most polysemantic neurons "
                   "(of every layer, or of LAYER; repeatable); default all (every neuron is fitted and scored either "
                   "way)")
    g.add_argument("--channels", action="append", metavar="LAYER:C1,C2,...", help="purify only these channels of "
                   "LAYER (repeatable); much faster than fitting every neuron")
    g.add_argument("--n-clusters", default="2", type=_clusters_arg, metavar="C|auto",
                   help="virtual neurons per neuron, or auto (default 2)")
    g.add_argument("--max-clusters", type=int, default=4, metavar="C", help="largest count for auto (default 4)")
    g.add_argument("--n-refs", type=int, default=100, metavar="N", help="reference samples per neuron (default 100)")
    g.add_argument("--gate", default="circuit", choices=GATES,
                   help="what selects the virtual neuron (default circuit: PURE; the others are baselines)")
    g.add_argument("--gate-weight", type=float, default=0.5, metavar="W",
                   help="weight of the activation map in a circuit+map gate (default 0.5)")
    g.add_argument("--rule", default="gradient", choices=RULES,
                   help="relevance rule of the circuits: gradient (PURE's, default) or one of zennit's LRP rules "
                   "with zennit's default parameters")
    g.add_argument("--score", default=DEFAULT_SCORE, choices=SCORES,
                   help=f"polysemanticity score that ranks neurons for --neurons N (default {DEFAULT_SCORE})")
    g.add_argument("--batch-size", type=int, default=64, metavar="N")
    g.add_argument("--workers", type=int, default=0, metavar="N", help="data loading processes (default 0)")
    g.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default cpu)")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--precision", default="float32", choices=PRECISIONS,
                   help="arithmetic of the relevance stage: tf32 needs CUDA (default float32)")
    g.add_argument("--checkpoint-dir", metavar="DIR", help="keep the run's state in DIR; running the same command "
                   "again continues an interrupted run (other arguments or data are refused)")
    p.add_argument("-o", "--out", default="purified.safetensors", metavar="FILE",
                   help="output file (default purified.safetensors)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars or notes")
    p.set_defaults(func=run)
