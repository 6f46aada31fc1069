"""Helpers the commands share: the model, the data and a purified file from the arguments, output
paths, messages."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

import numpy as np

from purenn.cli.loaders import (
    ARCHITECTURES,
    TIMM_PREFIX,
    InputError,
    LoadedData,
    load_checkpoint_model,
    load_data,
    timm_model,
    torchvision_model,
)
from purenn.common.checks import check_int, check_number
from purenn.common.choices import MAX_DPI
from purenn.errors import PurennError

EXIT_OK, EXIT_UNEXPECTED, EXIT_USAGE, EXIT_INPUT, EXIT_MISSING_DEPENDENCY, EXIT_INTERRUPTED = 0, 1, 2, 3, 4, 130
EXIT_CODES = {
    EXIT_OK: "success",
    EXIT_UNEXPECTED: "unexpected error (a bug: rerun with --traceback and report it)",
    EXIT_USAGE: "usage error: unknown option, missing or malformed argument",
    EXIT_INPUT: "bad input: missing or unreadable file, wrong architecture, unusable data, refused option value, "
                "failed ONNX verification",
    EXIT_MISSING_DEPENDENCY: "an optional dependency is missing (the message says what to pip install)",
    EXIT_INTERRUPTED: "interrupted (Ctrl-C)",
}


def check_ranges(args: argparse.Namespace) -> None:
    """Refuse a numeric option outside its range (see ``_RANGES``) with an :class:`InputError`."""
    for dest, (flag, low, high, low_open) in _RANGES.items():
        value = getattr(args, dest, None)
        for v in value if isinstance(value, list) else [value]:
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                continue
            if isinstance(v, int) and not low_open:
                check_int(flag, v, None if low is None else int(low), None if high is None else int(high),
                          error=InputError)
            else:
                check_number(flag, v, low, high, low_open=low_open, error=InputError)


def parse_blocks(text: str) -> tuple[int, ...]:
    try:
        blocks = tuple(int(v) for v in text.split(","))
    except ValueError:
        blocks = ()
    if len(blocks) != 4 or min(blocks) < 1:
        raise argparse.ArgumentTypeError(f"expected four positive integers such as 1,1,1,1, got {text!r}")
    return blocks


def looks_like_path(text: str) -> bool:
    return os.sep in text or "/" in text or Path(text).suffix in (".safetensors", ".pt", ".pth", ".bin", ".ckpt") \
        or Path(text).exists()


def load_purified_file(path: str) -> Any:
    from purenn.io.format import load_purified

    p = Path(path)
    if not p.is_file():
        raise InputError(f"model file {path!r} does not exist" + (" (it is a directory)." if p.is_dir() else "."))
    if p.suffix == ".onnx":
        raise InputError(f"{path!r} is an ONNX file; this command needs the purified .safetensors file.")
    return load_purified(p)


def base_model(args: argparse.Namespace) -> tuple[Any, str]:
    """The model to purify and a description of where it came from."""
    source = args.model
    if source.startswith(TIMM_PREFIX):
        return timm_base_model(args)
    if looks_like_path(source):
        if args.checkpoint or args.weights:
            raise InputError(f"{source!r} is a file; --checkpoint/--weights go with an architecture name such as "
                           "resnet18.")
        p = Path(source)
        if p.suffix != ".safetensors" and p.is_file():
            raise InputError(f"{source!r} looks like a checkpoint: give the architecture first, e.g. "
                           f"purenn purify resnet18 --checkpoint {source} --data ...")
        try:
            pm = load_purified_file(source)
        except PurennError as e:
            if p.suffix == ".safetensors" and "not a purenn model" in str(e):
                raise InputError(f"{source!r} holds plain weights, not a purenn model: purenn purify resnet18 "
                               f"--checkpoint {source} --data ...") from None
            raise
        return pm.base_model, f"base model of {source}"
    if source not in ARCHITECTURES:
        raise InputError(f"unknown architecture or missing file {source!r}: give a torchvision ResNet name "
                       f"({', '.join(ARCHITECTURES)}), timm:NAME for a timm ResNet, or a purified .safetensors file.")
    if args.weights:
        if args.checkpoint:
            raise InputError("use either --checkpoint or --weights, not both.")
        return torchvision_model(source, args.weights), f"{source} with torchvision weights {args.weights}"
    if not args.checkpoint:
        raise InputError(f"{source} needs trained weights: --checkpoint model.pt|model.safetensors, or --weights "
                         "DEFAULT for torchvision's pretrained weights.")
    model = load_checkpoint_model(source, args.checkpoint, blocks=args.blocks, stem_stride=args.stem_stride)
    return model, f"{source} from {args.checkpoint}"


def timm_base_model(args: argparse.Namespace) -> tuple[Any, str]:
    from purenn.cli.loaders import check_timm_name

    name = check_timm_name(args.model)
    if getattr(args, "blocks", None) is not None:
        raise InputError("--blocks goes with a torchvision architecture; a timm model name fixes its depth.")
    if args.weights and args.checkpoint:
        raise InputError("use either --checkpoint or --weights, not both.")
    if args.weights:
        if args.weights != "DEFAULT":
            if "." in name:
                raise InputError(f"{args.model} names its pretrained tag already; pass --weights DEFAULT.")
            name = f"{name}.{args.weights}"
        return timm_model(name, pretrained=True), f"timm {name} with timm's pretrained weights"
    if not args.checkpoint:
        raise InputError(f"{args.model} needs trained weights: --checkpoint model.pth|model.safetensors, or --weights "
                         "DEFAULT for timm's pretrained weights.")
    return timm_model(name, checkpoint=args.checkpoint), f"timm {name} from {args.checkpoint}"


# ============================================================================================ data
def data_from_args(args: argparse.Namespace, in_channels: int) -> LoadedData:
    return load_data(folder=args.data, fashion_mnist=args.fashion_mnist, split=args.split, in_channels=in_channels,
                     image_size=args.image_size, limit=args.limit, mean=args.mean, std=args.std)


def data_flags(args: argparse.Namespace) -> str:
    """The data options as given on the command line."""
    import shlex

    if args.data is not None:
        parts = ["--data", args.data]
    else:
        parts = ["--fashion-mnist", *([args.fashion_mnist] if args.fashion_mnist else []), "--split", args.split]
    for flag, value in (("--image-size", args.image_size), ("--limit", args.limit)):
        if value is not None:
            parts += [flag, str(value)]
    for flag, values in (("--mean", args.mean), ("--std", args.std)):
        if values:
            parts += [flag, *map(str, values)]
    return " ".join(shlex.quote(str(p)) for p in parts)


def data_options(args: argparse.Namespace, data: LoadedData) -> dict[str, Any]:
    """What purify records about its data beside the reference fingerprint (see purenn.io.refdata)."""
    return {"flags": data_flags(args), "description": data.description,
            "source": "folder" if args.data is not None else "fashion-mnist",
            "input_shape": [int(s) for s in data.dataset[0][0].shape], "mean": args.mean, "std": args.std}


def check_preprocessing(args: argparse.Namespace, pm: Any, data: LoadedData) -> None:
    """Refuse data preprocessed otherwise than the data ``pm`` was purified on (probe: other samples are fine)."""
    used = (getattr(pm, "reference_data", None) or {}).get("options")
    if not used:
        return
    now = data_options(args, data)
    diffs = [f"{what} {used.get(key)} vs {now[key]}" for key, what in
             (("source", "source"), ("input_shape", "input shape"), ("mean", "--mean"), ("std", "--std"))
             if used.get(key) != now[key]]
    if diffs:
        raise InputError(f"{args.model!r} was purified on data given as `{used['flags']}` ({used['description']}); "
                         f"this data (`{now['flags']}`) is preprocessed otherwise ({'; '.join(diffs)}). Give the "
                         "same source, --image-size and --mean/--std (another --split, --limit or folder is fine).")


def check_accuracy(args: argparse.Namespace, model: Any, data: LoadedData, n: int = 256) -> None:
    """Print the model's accuracy on (up to ``n`` evenly spaced samples of) the data when the data's labels
    are the model's classes, and warn when it is at chance level."""
    import torch

    from purenn.fit.data import DataSource

    n_classes = getattr(getattr(model, "fc", None), "out_features", None)
    if data.coarse is not None and data.coarse_names is not None and n_classes == len(data.coarse_names):
        labels, kind = data.coarse, "superclasses"
    elif n_classes == len(data.class_names):
        labels, kind = data.labels, "classes"
    else:
        say(args, f"accuracy not checked: the model has {n_classes} classes, the data {len(data.class_names)}")
        return
    idx = np.unique(np.linspace(0, len(labels) - 1, min(n, len(labels))).round().astype(np.int64))
    source = DataSource.from_data(data.dataset, args.batch_size)
    preds = []
    model.eval()
    with torch.inference_mode():
        for s in range(0, len(idx), args.batch_size):
            preds.append(model(source.fetch(idx[s : s + args.batch_size].tolist())).argmax(1).numpy())
    y = labels[idx]
    acc = float((np.concatenate(preds) == y).mean())
    chance = float(np.bincount(y).max() / len(y))
    say(args, f"model accuracy on {len(idx)} samples of this data ({kind}): {acc:.1%} (chance level {chance:.1%})")
    if acc <= chance + 0.25 * (1 - chance):
        folder = getattr(args, "data", None) or getattr(args, "eval", None)
        order = "; the folder's sub-folders must be the model's classes in its order" if folder else ""
        print(f"purenn {args.command}: warning: the model is near chance level on this data ({acc:.1%} on "
              f"{len(idx)} samples, chance {chance:.1%}). Check that the checkpoint is rebuilt as it was trained "
              f"(--stem-stride, --blocks) and that the data is preprocessed as in training (--image-size, "
              f"--mean/--std){order}.", file=sys.stderr)


def say(args: argparse.Namespace, text: str) -> None:
    if not getattr(args, "quiet", False) and os.environ.get("RANK", "0") == "0":  # torchrun: rank 0 speaks
        print(text, file=sys.stderr)


def output_path(text: str, suffix: str, what: str) -> Path:
    """A writable output path with the given suffix, else an :class:`InputError` naming the problem."""
    out = Path(text)
    if out.suffix != suffix:
        raise InputError(f"{what} must end in {suffix}.")
    if out.is_dir() or not out.parent.exists():
        raise InputError(f"cannot write {text!r}: " + ("it is a directory." if out.is_dir()
                                                      else f"folder {str(out.parent)!r} does not exist."))
    return out


# ============================================================================================ parser
def add_data_args(p: argparse.ArgumentParser, required: bool = True) -> None:
    g = p.add_argument_group("data (give --data or --fashion-mnist)")
    src = g.add_mutually_exclusive_group(required=required)
    src.add_argument("--data", metavar="DIR", help="image folder, one sub-folder per class (torchvision ImageFolder)")
    src.add_argument("--fashion-mnist", nargs="?", const="", metavar="DIR",
                     help="Fashion-MNIST IDX files (default: $PURENN_FASHION_MNIST or the Debian package)")
    g.add_argument("--split", choices=("train", "test"), default="train", help="Fashion-MNIST split (default train)")
    g.add_argument("--image-size", type=int, metavar="N", help="square input size (default 224 for folders, 28 "
                   "for Fashion-MNIST)")
    g.add_argument("--limit", type=int, metavar="N", help="use N samples (evenly spaced over a folder, the first N "
                   "of Fashion-MNIST)")
    g.add_argument("--mean", type=float, nargs="+", metavar="M", help="normalisation mean per channel (folders; "
                   "default ImageNet)")
    g.add_argument("--std", type=float, nargs="+", metavar="S", help="normalisation std per channel (folders)")


# ============================================================================================ inputs
#: numeric options, by argparse dest, checked for every command before it runs (exit code 3):
#: flag, lowest and highest allowed value (None: unbounded), whether the lowest is excluded.
#: Options of one dest that are not numbers (purify's --neurons N|LAYER:N) and --test-fraction (open
#: at both ends) are checked where they are used.
_RANGES: dict[str, tuple[str, float | None, float | None, bool]] = {
    "image_size": ("--image-size", 1, 8192, False),
    "limit": ("--limit", 1, None, False),
    "mean": ("--mean", None, None, False),
    "std": ("--std", 0, None, True),
    "n_refs": ("--n-refs", 1, None, False),
    "max_clusters": ("--max-clusters", 2, None, False),
    "neurons": ("--neurons", 1, None, False),
    "rest_clusters": ("--rest-clusters", 1, None, False),
    "gate_weight": ("--gate-weight", 0, None, False),
    "batch_size": ("--batch-size", 1, None, False),
    "workers": ("--workers", 0, None, False),
    "seed": ("--seed", 0, 2**32 - 1, False),
    "top": ("--top", 1, None, False),
    "neuron": ("--neuron", 0, None, False),
    "n_images": ("--n-images", 1, 64, False),
    "dpi": ("--dpi", 1, MAX_DPI, False),
}


def table(rows: list[list[Any]], headers: list[str]) -> str:
    cells = [[str(h) for h in headers]] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in cells)
