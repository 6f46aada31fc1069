"""``purenn probe``: linear probes on a purified layer, original channels against pure virtual neurons, from the
.safetensors model or its ONNX export."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np

from purenn.cli.common import (
    EXIT_OK,
    add_data_args,
    check_preprocessing,
    data_from_args,
    load_purified_file,
    say,
    table,
)
from purenn.cli.loaders import (
    InputError,
)


def _onnx_virtual_channels(session: Any, path: str, layer: str | None) -> tuple[str, list[int], tuple[int, ...]]:
    """Layer, virtual-neuron source channels and input shape from an exported file's metadata."""
    meta = session.get_modelmeta().custom_metadata_map.get("purenn")
    if meta is None:
        raise InputError(f"{path!r} has no purenn metadata; export it with purenn export / purenn.export_onnx.")
    info = json.loads(meta)
    by_layer = {e["layer"]: e for e in info["layers"]}
    name = layer or info["layers"][-1]["layer"]
    if name not in by_layer:
        raise InputError(f"layer {name!r} is not purified in {path!r}; purified layers: {list(by_layer)}.")
    return name, list(by_layer[name]["virtual_channels"]), tuple(info["input_shape"])


def run(args: argparse.Namespace) -> int:
    from sklearn.model_selection import train_test_split

    from purenn.analysis.probe import compare_probes

    if not 0 < args.test_fraction < 1:
        raise InputError(f"--test-fraction must be between 0 and 1, got {args.test_fraction}.")
    path = Path(args.model)
    virtual_channels = None
    if path.suffix == ".onnx":
        if not path.is_file():
            raise InputError(f"model file {args.model!r} does not exist.")
        import onnxruntime as ort

        try:
            source: Any = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        except Exception as e:
            raise InputError(f"ONNX Runtime cannot load {args.model!r}: {e}") from None
        layer, virtual_channels, shape = _onnx_virtual_channels(source, args.model, args.layer)
        in_ch = shape[0]
    else:
        source = load_purified_file(args.model)
        layer = args.layer or source.layers[-1]
        source.pure_layer(layer)
        from purenn.arch import input_conv

        in_ch, shape = int(input_conv(source.base_model).in_channels), None
    data = data_from_args(args, in_ch)
    if shape is None:
        check_preprocessing(args, source, data)
    if shape is not None:
        sample = tuple(data.dataset[0][0].shape)
        if sample != shape:
            raise InputError(f"the data gives inputs of shape {sample}, but {args.model!r} was exported for {shape}; "
                           f"pass --image-size {shape[-1]}.")
    labels = data.coarse if args.labels == "coarse" and data.coarse is not None else data.labels
    idx = np.arange(len(labels))
    counts = np.bincount(labels)
    stratify = labels if counts[counts > 0].min() >= 2 else None
    try:
        train, test = train_test_split(idx, test_size=args.test_fraction, random_state=args.seed, stratify=stratify)
    except ValueError as e:
        raise InputError(f"cannot split {len(idx)} samples into train and test: {e}. Use more data.") from None
    from torch.utils.data import Subset

    say(args, f"data: {data.description}; probing {layer} on {len(train)} train / {len(test)} test samples")
    cmp = compare_probes(source, Subset(data.dataset, train.tolist()), labels[train],
                         Subset(data.dataset, test.tolist()), labels[test], layer=layer,
                         virtual_channels=virtual_channels, progress=not args.quiet)
    result = {"layer": layer, "labels": args.labels if data.coarse is not None else "class",
              "n_train": len(train), "n_test": len(test),
              "original": {"accuracy": cmp.original.accuracy, "features": cmp.original.n_features},
              "pure": {"accuracy": cmp.pure.accuracy, "features": cmp.pure.n_features}, "gain": cmp.gain}
    if args.json:
        print(json.dumps(result, indent=2))
        return EXIT_OK
    print(table([["original channels", cmp.original.n_features, f"{cmp.original.accuracy:.4f}"],
                  ["pure virtual neurons", cmp.pure.n_features, f"{cmp.pure.accuracy:.4f}"]],
                 [f"{layer} features", "dims", "test accuracy"]))
    print(f"gain: {cmp.gain:+.4f} (pure minus original: test accuracy of a logistic-regression probe on the "
          f"spatially averaged features; {len(train)} train / {len(test)} test samples, {result['labels']} labels)")
    return EXIT_OK


def add_parser(sub: Any, epilog: str, fmt: Any) -> None:
    """Add the ``probe`` sub-command to the ``purenn`` parser."""
    p = sub.add_parser("probe", help="linear probes: original channels vs pure virtual neurons", epilog=epilog,
                       formatter_class=fmt, description="Fit linear probes (scikit-learn) on a purified layer's "
                       "pooled features, the original channels against the pure virtual neurons, and report held-out "
                       "accuracy. Works on the .safetensors model or on its ONNX export (ONNX Runtime).\n\n"
                       "  purenn probe purified.safetensors --fashion-mnist --split test --limit 2000\n"
                       "  purenn probe purified.onnx --data images/ --image-size 224")
    p.add_argument("model", help="purified .safetensors file or exported .onnx file")
    add_data_args(p)
    p.add_argument("--labels", choices=("fine", "coarse"), default="fine",
                   help="Fashion-MNIST labels to probe (default fine); folders use their class sub-folders")
    p.add_argument("--layer", help="purified layer (default: the last)")
    p.add_argument("--test-fraction", type=float, default=0.3, metavar="F",
                   help="held-out share of the data (default 0.3)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("-q", "--quiet", action="store_true")
    p.set_defaults(func=run)
