"""The ``purenn`` command: purify a ResNet, inspect, export, probe, draw and unlearn.

Run ``purenn --help`` or ``purenn <command> --help``. The same entry point is
``python -m purenn``. :func:`main` returns the exit code instead of exiting, for use from Python.

Exit codes: 0 success; 1 unexpected error (a bug: rerun with ``--traceback`` and report it);
2 usage error (unknown option, missing or malformed argument); 3 bad input (missing or unreadable
file, wrong architecture, unusable data, an option value purenn refuses, a failed ONNX
verification); 4 an optional dependency is missing (the message names the ``pip install``);
130 interrupted.

Example:
    >>> from purenn.cli import main
    >>> main(["--version"])                                   # doctest: +SKIP
    purenn 0.1.0
    0
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ._choices import CONCEPT_SCORE, MAX_DPI, score_text
from ._validate import check_int, check_number
from ._version import __version__
from .errors import PurennError
from .loaders import (
    ARCHITECTURES,
    TIMM_PREFIX,
    InputError,
    LoadedData,
    load_checkpoint_model,
    load_data,
    timm_model,
    torchvision_model,
)

__all__ = ["main", "build_parser", "EXIT_CODES"]

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
#: optional or easily missing modules -> how to install them
_INSTALL = {"matplotlib": 'pip install "purenn[viz]"', "timm": 'pip install "purenn[timm]"',
            "onnx": "pip install onnx", "onnxruntime": "pip install "
            "onnxruntime (or onnxruntime-gpu)", "sklearn": "pip install scikit-learn", "PIL": "pip install pillow"}


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


def _check_ranges(args: argparse.Namespace) -> None:
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


def _parse_blocks(text: str) -> tuple[int, ...]:
    try:
        blocks = tuple(int(v) for v in text.split(","))
    except ValueError:
        blocks = ()
    if len(blocks) != 4 or min(blocks) < 1:
        raise argparse.ArgumentTypeError(f"expected four positive integers such as 1,1,1,1, got {text!r}")
    return blocks


def _looks_like_path(text: str) -> bool:
    return os.sep in text or "/" in text or Path(text).suffix in (".safetensors", ".pt", ".pth", ".bin", ".ckpt") \
        or Path(text).exists()


def _load_purified(path: str) -> Any:
    from .io import load_purified

    p = Path(path)
    if not p.is_file():
        raise InputError(f"model file {path!r} does not exist" + (" (it is a directory)." if p.is_dir() else "."))
    if p.suffix == ".onnx":
        raise InputError(f"{path!r} is an ONNX file; this command needs the purified .safetensors file.")
    return load_purified(p)


def _base_model(args: argparse.Namespace) -> tuple[Any, str]:
    """The model to purify and a description of where it came from."""
    source = args.model
    if source.startswith(TIMM_PREFIX):
        return _timm_base_model(args)
    if _looks_like_path(source):
        if args.checkpoint or args.weights:
            raise InputError(f"{source!r} is a file; --checkpoint/--weights go with an architecture name such as "
                           "resnet18.")
        p = Path(source)
        if p.suffix != ".safetensors" and p.is_file():
            raise InputError(f"{source!r} looks like a checkpoint: give the architecture first, e.g. "
                           f"purenn purify resnet18 --checkpoint {source} --data ...")
        try:
            pm = _load_purified(source)
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


def _timm_base_model(args: argparse.Namespace) -> tuple[Any, str]:
    from .loaders import check_timm_name

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
def _data_from_args(args: argparse.Namespace, in_channels: int) -> LoadedData:
    return load_data(folder=args.data, fashion_mnist=args.fashion_mnist, split=args.split, in_channels=in_channels,
                     image_size=args.image_size, limit=args.limit, mean=args.mean, std=args.std)


def _data_flags(args: argparse.Namespace) -> str:
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


def _data_options(args: argparse.Namespace, data: LoadedData) -> dict[str, Any]:
    """What purify records about its data beside the reference fingerprint (see purenn.refdata)."""
    return {"flags": _data_flags(args), "description": data.description,
            "source": "folder" if args.data is not None else "fashion-mnist",
            "input_shape": [int(s) for s in data.dataset[0][0].shape], "mean": args.mean, "std": args.std}


def _check_preprocessing(args: argparse.Namespace, pm: Any, data: LoadedData) -> None:
    """Refuse data preprocessed otherwise than the data ``pm`` was purified on (probe: other samples are fine)."""
    used = (getattr(pm, "reference_data", None) or {}).get("options")
    if not used:
        return
    now = _data_options(args, data)
    diffs = [f"{what} {used.get(key)} vs {now[key]}" for key, what in
             (("source", "source"), ("input_shape", "input shape"), ("mean", "--mean"), ("std", "--std"))
             if used.get(key) != now[key]]
    if diffs:
        raise InputError(f"{args.model!r} was purified on data given as `{used['flags']}` ({used['description']}); "
                         f"this data (`{now['flags']}`) is preprocessed otherwise ({'; '.join(diffs)}). Give the "
                         "same source, --image-size and --mean/--std (another --split, --limit or folder is fine).")


def _check_accuracy(args: argparse.Namespace, model: Any, data: LoadedData, n: int = 256) -> None:
    """Print the model's accuracy on (up to ``n`` evenly spaced samples of) the data when the data's labels
    are the model's classes, and warn when it is at chance level."""
    import torch

    from .data import DataSource

    n_classes = getattr(getattr(model, "fc", None), "out_features", None)
    if data.coarse is not None and data.coarse_names is not None and n_classes == len(data.coarse_names):
        labels, kind = data.coarse, "superclasses"
    elif n_classes == len(data.class_names):
        labels, kind = data.labels, "classes"
    else:
        _say(args, f"accuracy not checked: the model has {n_classes} classes, the data {len(data.class_names)}")
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
    _say(args, f"model accuracy on {len(idx)} samples of this data ({kind}): {acc:.1%} (chance level {chance:.1%})")
    if acc <= chance + 0.25 * (1 - chance):
        folder = getattr(args, "data", None) or getattr(args, "eval", None)
        order = "; the folder's sub-folders must be the model's classes in its order" if folder else ""
        print(f"purenn {args.command}: warning: the model is near chance level on this data ({acc:.1%} on "
              f"{len(idx)} samples, chance {chance:.1%}). Check that the checkpoint is rebuilt as it was trained "
              f"(--stem-stride, --blocks) and that the data is preprocessed as in training (--image-size, "
              f"--mean/--std){order}.", file=sys.stderr)


# ============================================================================================ output
def _rule_text(config: Any) -> str:
    """A rule config as text: its name, with parameters when they are not zennit's defaults."""
    from .rules import rule_text

    return rule_text(config)


def _table(rows: list[list[Any]], headers: list[str]) -> str:
    cells = [[str(h) for h in headers]] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in cells)


def _say(args: argparse.Namespace, text: str) -> None:
    if not getattr(args, "quiet", False) and os.environ.get("RANK", "0") == "0":  # torchrun: rank 0 speaks
        print(text, file=sys.stderr)


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


def _output_path(text: str, suffix: str, what: str) -> Path:
    """A writable output path with the given suffix, else an :class:`InputError` naming the problem."""
    out = Path(text)
    if out.suffix != suffix:
        raise InputError(f"{what} must end in {suffix}.")
    if out.is_dir() or not out.parent.exists():
        raise InputError(f"cannot write {text!r}: " + ("it is a directory." if out.is_dir()
                                                      else f"folder {str(out.parent)!r} does not exist."))
    return out


def _cmd_purify(args: argparse.Namespace) -> int:
    from .arch import ResNetSpec
    from .purify import purify_model

    out = _output_path(args.out, ".safetensors", f"--out {args.out!r}")
    _check_device(args.device)
    named = [v.partition(":")[0] for v in args.channels or []] + [v.rpartition(":")[0] for v in args.neurons or []]
    if args.layers is None:  # default: the layers that --channels/--neurons name, else layer4
        layers = list(dict.fromkeys(n for n in named if n)) or ["layer4"]
    else:
        layers = [name for item in args.layers for name in item.split(",") if name]
    neurons = _parse_neurons(args.neurons, args.channels, layers)
    n_clusters = args.n_clusters if args.n_clusters == "auto" else int(args.n_clusters)
    model, origin = _base_model(args)
    spec = ResNetSpec(model)
    for name in layers:
        spec.default_upstream(name)  # unknown layer names fail here, before the data is read
    in_ch = spec.in_channels
    data = _data_from_args(args, in_ch)
    _say(args, f"model: {origin}\ndata: {data.description}")
    _check_accuracy(args, model, data)
    from .distributed import init_from_env

    device, started = init_from_env(args.device)  # under torchrun: one process group, one GPU per rank
    try:
        pm = purify_model(
            model, layers, data.dataset, n_refs=args.n_refs, n_clusters=n_clusters, neurons=neurons,
            max_clusters=args.max_clusters, gate=args.gate, gate_weight=args.gate_weight, score=args.score,
            batch_size=args.batch_size, device=device, progress=not args.quiet, seed=args.seed,
            workers=args.workers, precision=args.precision, checkpoint_dir=args.checkpoint_dir, rule=args.rule,
        )
        pm.reference_data = {**(pm.reference_data or {}), "options": _data_options(args, data)}
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
    _say(args, f"next: purenn inspect {out}")
    return EXIT_OK


def _neuron_rows(pm: Any, top: int) -> list[dict[str, Any]]:
    rows = []
    for name in pm.layers:
        pl = pm.pure_layer(name)
        counts, w = pl.ref_counts.tolist(), pl.merge_weight.tolist()
        for k, (ch, score, n_cl) in enumerate(zip(pl.neurons.tolist(), pl.scores.tolist(), pl.n_clusters.tolist())):
            virtual = []
            for c in range(n_cl):
                v = int(pl.channel_slots[ch, c])
                virtual.append({"name": f"{ch}.{c}", "index": v, "n_refs": counts[k][c], "suppressed": w[v] == 0})
            rows.append({"layer": name, "channel": ch, "score": round(float(score), 4), "n_clusters": n_cl,
                         "virtual": virtual})
    rows.sort(key=lambda r: -r["score"])
    return rows[:top]


def _cmd_inspect(args: argparse.Namespace) -> int:
    from .io import read_config

    pm = _load_purified(args.model)
    config = read_config(args.model)
    arch = config.get("architecture", {})
    layers = []
    for name in pm.layers:
        pl = pm.pure_layer(name)
        layers.append({"layer": name, "upstream": pl.upstream, "gate": pl.gate, "rule": pl.rule.config(),
                       "skip_aware": pl.skip_aware, "score_kind": pl.score_kind,
                       "channels": pl.channels, "fitted": len(pl.neurons), "split": int((pl.n_clusters > 1).sum()),
                       "virtual": pl.n_virtual, "suppressed": int((pl.merge_weight == 0).sum())})
    neurons = _neuron_rows(pm, args.top)
    if args.json:
        print(json.dumps({"file": args.model, "purenn_version": config.get("purenn_version"),
                          "format_version": config.get("format_version"), "architecture": arch, "layers": layers,
                          "top_neurons": neurons}, indent=2))
        return EXIT_OK
    stem = arch.get("stem") or {}
    kernel = "x".join(map(str, stem.get("kernel_size", [])))
    pool = "+ max-pool" if stem.get("maxpool") else "without max-pool"
    print(f"file: {args.model}  (purenn {config.get('purenn_version')}, format {config.get('format_version')})")
    if str(arch.get("family", "")).startswith("timm"):
        name = ".".join(str(p) for p in (arch.get("timm_model") or "custom timm ResNet", arch.get("timm_tag")) if p)
        attention = f" with {', '.join(arch['attention'])}" if arch.get("attention") else ""
        print(f"base: timm {name}: {arch.get('block')} blocks {arch.get('layers')}{attention}, "
              f"{arch.get('num_classes')} classes, {arch.get('in_channels')} input channel(s)")
    else:
        print(f"base: {arch.get('builder') or 'custom ResNet'}: {arch.get('block')} blocks {arch.get('layers')}, "
              f"{arch.get('num_classes')} classes, {arch.get('in_channels')} input channel(s), stem {kernel} "
              f"stride {(stem.get('stride') or ['?'])[0]} {pool}")
    print()
    print(_table([[r["layer"], r["upstream"], r["gate"], _rule_text(r["rule"]), "yes" if r["skip_aware"] else "no",
                   r["channels"], r["fitted"], r["split"], r["virtual"], r["suppressed"]] for r in layers],
                 ["layer", "upstream", "gate", "rule", "skip-aware", "channels", "fitted", "purified", "virtual",
                  "suppressed"]))
    print("  rule: the relevance rule of the circuits (gradient: PURE's; the others are zennit's LRP rules)\n"
          "  fitted: channels kept after clustering their references' circuits\n"
          "  purified: fitted channels split into 2 or more virtual neurons\n"
          "  virtual: the layer's virtual neurons (the purified channels' parts, plus one per channel left whole)\n"
          "  suppressed: virtual neurons switched off")
    print()
    kinds = {r["score_kind"] for r in layers}
    what = "most polysemantic neurons" if CONCEPT_SCORE not in kinds else "purified neurons, highest score first"
    print(f"{what} (top {len(neurons)} by score):")
    rows = [[r["layer"], r["channel"], f"{r['score']:.4f}", "  ".join(
        f"{v['name']}=v{v['index']}:{v['n_refs']}{' (off)' if v['suppressed'] else ''}" for v in r["virtual"])]
        for r in neurons]
    print(_table(rows, ["layer", "channel", "score", "virtual neurons"]))
    for kind in sorted(kinds, key=str):
        where = ", ".join(r["layer"] for r in layers if r["score_kind"] == kind)
        print(f"  score ({where}): {score_text(kind)}" + {
            "contrast": ", from the clusters of the references' circuits: how balanced and how different they are, "
                        "0 to 1",
            "silhouette": ", the silhouette of the references' circuits in their clusters, -1 to 1",
            "contrast+upstream": ": how balanced and how different the clusters of the references' circuits are, "
                                 "times the same for their pooled upstream activations, 0 to 1",
            CONCEPT_SCORE: " (concept minus other examples); not a polysemanticity score"}.get(kind, ""))
    print("  virtual neurons: CHANNEL.CLUSTER=vINDEX:REFERENCES; INDEX is the position in the layer's pure features, "
          "(off) = suppressed")
    data = (config.get("reference_data") or {}).get("options")
    if data:
        print(f"\nreference samples from: {data['flags']} ({data['description']}); show needs the same data options")
    return EXIT_OK


def _parse_shape(text: str) -> tuple[int, ...]:
    try:
        shape = tuple(int(v) for v in text.replace("x", ",").split(","))
    except ValueError:
        shape = ()
    if len(shape) != 3 or min(shape) < 1:
        raise argparse.ArgumentTypeError(f"expected C,H,W such as 3,224,224, got {text!r}")
    return shape


def _cmd_export(args: argparse.Namespace) -> int:
    from .errors import ConfigError
    from .export import check_outputs, export_onnx

    out = _output_path(args.onnx, ".onnx", f"the output {args.onnx!r}")
    try:
        outputs = check_outputs(args.outputs.split(","))
    except ConfigError as e:
        raise ConfigError(f"--outputs {args.outputs!r}: {e}") from None
    pm = _load_purified(args.model)
    kwargs = {} if args.opset is None else {"opset": args.opset}
    _say(args, f"exporting {args.model} -> {out} (input (batch, {', '.join(map(str, args.input_shape))}), "
         f"outputs {','.join(outputs)})")
    report = export_onnx(pm, out, input_shape=args.input_shape, outputs=outputs,
                         pool=None if args.pool == "none" else args.pool, verify=not args.no_verify, **kwargs)
    print(report.summary())
    print(f"outputs: {', '.join(report.outputs)}")
    print(f"wrote {out}" + ("" if report.ok is None else " (verified with ONNX Runtime)"))
    return EXIT_OK


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


def _cmd_probe(args: argparse.Namespace) -> int:
    from sklearn.model_selection import train_test_split

    from .probe import compare_probes

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
        source = _load_purified(args.model)
        layer = args.layer or source.layers[-1]
        source.pure_layer(layer)
        from .arch import input_conv

        in_ch, shape = int(input_conv(source.base_model).in_channels), None
    data = _data_from_args(args, in_ch)
    if shape is None:
        _check_preprocessing(args, source, data)
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

    _say(args, f"data: {data.description}; probing {layer} on {len(train)} train / {len(test)} test samples")
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
    print(_table([["original channels", cmp.original.n_features, f"{cmp.original.accuracy:.4f}"],
                  ["pure virtual neurons", cmp.pure.n_features, f"{cmp.pure.accuracy:.4f}"]],
                 [f"{layer} features", "dims", "test accuracy"]))
    print(f"gain: {cmp.gain:+.4f} (pure minus original: test accuracy of a logistic-regression probe on the "
          f"spatially averaged features; {len(train)} train / {len(test)} test samples, {result['labels']} labels)")
    return EXIT_OK


def _cmd_show(args: argparse.Namespace) -> int:
    from .refdata import check_references
    from .viz import save_neuron_figure

    pm = _load_purified(args.model)
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
    from .arch import input_conv

    data = _data_from_args(args, int(input_conv(pm.base_model).in_channels))
    out = Path(args.out or f"{Path(args.model).stem}_{layer}_{channel}.png")
    if not out.parent.exists():
        raise InputError(f"cannot write {str(out)!r}: folder {str(out.parent)!r} does not exist.")
    _say(args, f"data: {data.description}")
    check_references(pm, data.dataset, given=_data_flags(args))
    save_neuron_figure(pm, layer, channel, data.dataset, str(out), n_images=args.n_images,
                       embedding=args.embedding, seed=args.seed, labels=data.labels, class_names=data.class_names,
                       dpi=args.dpi)
    print(f"wrote {out} ({layer} neuron {channel})")
    return EXIT_OK


# ============================================================================================ parser
def _add_data_args(p: argparse.ArgumentParser, required: bool = True) -> None:
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


_EPILOG = "exit codes:\n" + "\n".join(f"  {code:<4} {text}" for code, text in EXIT_CODES.items())
_DESCRIPTION = ("Split polysemantic ResNet neurons into pure virtual neurons (PURE), inspect them, export the model "
                "to ONNX, probe its pure features and draw figures.")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``purenn`` command.

    Example:
        >>> build_parser().parse_args(["inspect", "pure.safetensors", "--top", "3"]).top
        3
    """
    from ._choices import DEFAULT_SCORE, GATES, PRECISIONS, RULES, SCORES

    fmt = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(prog="purenn", description=_DESCRIPTION, epilog=_EPILOG, formatter_class=fmt)
    parser.add_argument("--version", action="version", version=f"purenn {__version__}")
    parser.add_argument("--traceback", action="store_true", help="show the full traceback of unexpected errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser("purify", help="purify a trained ResNet and save it", epilog=_EPILOG, formatter_class=fmt,
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
    p.add_argument("--blocks", type=_parse_blocks, metavar="A,B,C,D", help="blocks per stage for a custom depth")
    p.add_argument("--stem-stride", type=int, choices=(1, 2), default=None,
                   help="stride of an adapted (non-7x7) stem convolution; needed when the checkpoint does not "
                   "record its architecture (checkpoints purenn trained do)")
    _add_data_args(p)
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
    p.set_defaults(func=_cmd_purify)

    p = sub.add_parser("inspect", help="show a purified model's config, layers and most polysemantic neurons",
                       epilog=_EPILOG, formatter_class=fmt)
    p.add_argument("model", help="purified .safetensors file")
    p.add_argument("--top", type=int, default=10, metavar="N", help="neurons in the table (default 10)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=_cmd_inspect)

    p = sub.add_parser("export", help="export to ONNX and verify it with ONNX Runtime", epilog=_EPILOG,
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
    p.set_defaults(func=_cmd_export)

    p = sub.add_parser("probe", help="linear probes: original channels vs pure virtual neurons", epilog=_EPILOG,
                       formatter_class=fmt, description="Fit linear probes (scikit-learn) on a purified layer's "
                       "pooled features, the original channels against the pure virtual neurons, and report held-out "
                       "accuracy. Works on the .safetensors model or on its ONNX export (ONNX Runtime).\n\n"
                       "  purenn probe purified.safetensors --fashion-mnist --split test --limit 2000\n"
                       "  purenn probe purified.onnx --data images/ --image-size 224")
    p.add_argument("model", help="purified .safetensors file or exported .onnx file")
    _add_data_args(p)
    p.add_argument("--labels", choices=("fine", "coarse"), default="fine",
                   help="Fashion-MNIST labels to probe (default fine); folders use their class sub-folders")
    p.add_argument("--layer", help="purified layer (default: the last)")
    p.add_argument("--test-fraction", type=float, default=0.3, metavar="F",
                   help="held-out share of the data (default 0.3)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("-q", "--quiet", action="store_true")
    p.set_defaults(func=_cmd_probe)

    p = sub.add_parser("show", help="draw a neuron: reference images per virtual neuron and its circuits in 2-D",
                       epilog=_EPILOG, formatter_class=fmt, description="Draw one purified neuron: its top "
                       "reference images per virtual neuron next to a 2-D embedding of its circuits, coloured by "
                       "cluster. Pass the same data options as to purify (reference samples are stored by index)."
                       "\n\n  purenn show purified.safetensors --data images/ --neuron 7 --out neuron7.png")
    p.add_argument("model", help="purified .safetensors file")
    _add_data_args(p)
    p.add_argument("--layer", help="purified layer (default: the first)")
    p.add_argument("--neuron", type=int, metavar="CHANNEL", help="channel (default: the most polysemantic)")
    p.add_argument("--embedding", choices=("pca", "tsne"), default="pca")
    p.add_argument("--n-images", type=int, default=6, metavar="N", help="images per virtual neuron (default 6)")
    p.add_argument("--dpi", type=int, default=110)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("-o", "--out", metavar="FILE.png", help="figure file (default MODEL_LAYER_NEURON.png)")
    p.add_argument("-q", "--quiet", action="store_true")
    p.set_defaults(func=_cmd_show)

    from .cli_unlearn import add_parser as add_unlearn_parser

    add_unlearn_parser(sub, _EPILOG, fmt)
    from .cli_report import add_parser as add_report_parser

    add_report_parser(sub, _EPILOG, fmt)
    return parser


def _clusters_arg(text: str) -> str:
    if text == "auto" or text.isdigit():
        return text
    raise argparse.ArgumentTypeError(f"expected an integer or 'auto', got {text!r}")


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``purenn`` command with ``argv`` (default ``sys.argv[1:]``) and return its exit code.

    Example:
        >>> main(["inspect", "purified.safetensors", "--top", "5"])      # doctest: +SKIP
        0
    """
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help, --version, usage errors
        return int(e.code or 0) if not isinstance(e.code, str) else EXIT_USAGE
    prefix = f"purenn {args.command}: error:"
    try:
        _check_ranges(args)
        return int(args.func(args))
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except ImportError as e:
        name = (getattr(e, "name", None) or "").split(".")[0]
        if isinstance(e, PurennError) or name in _INSTALL:
            hint = "" if isinstance(e, PurennError) else f" Install it: {_INSTALL[name]}."
            print(f"{prefix} {e}{hint}", file=sys.stderr)
            return EXIT_MISSING_DEPENDENCY
        return _unexpected(args, prefix, e)
    except (PurennError, FileNotFoundError, IsADirectoryError, PermissionError) as e:
        print(f"{prefix} {e}", file=sys.stderr)
        return EXIT_INPUT
    except OSError as e:
        print(f"{prefix} {e.strerror or e}{': ' + repr(e.filename) if e.filename else ''}", file=sys.stderr)
        return EXIT_INPUT
    except Exception as e:
        return _unexpected(args, prefix, e)


def _unexpected(args: argparse.Namespace, prefix: str, e: BaseException) -> int:
    if args.traceback:
        traceback.print_exc()
    print(f"{prefix} unexpected {type(e).__name__}: {e}", file=sys.stderr)
    if not args.traceback:
        print("rerun with `purenn --traceback ...` for details, and please report it.", file=sys.stderr)
    return EXIT_UNEXPECTED


if __name__ == "__main__":
    sys.exit(main())
