"""Save and load a :class:`~purenn.PurifiedModel` as one safetensors file.

The file holds

- the base model's ``state_dict`` under ``base_model.`` (keys otherwise unchanged, so
  ``{k[len("base_model."):]: v}`` loads straight into the original ResNet);
- each purified layer's tensors under ``purenn.<layer>.<name>``: ``neurons``, ``centroids``,
  ``n_clusters``, ``scores``, ``ref_counts``, ``ref_indices``, ``ref_clusters`` and
  ``merge_weight`` (the suppression mask: 1 on, 0 suppressed);
- a JSON config in the safetensors metadata under ``"purenn"``: format and purenn version, the
  base architecture (torchvision builder name when it is one, block layout, stem, input channels,
  classes, a structural fingerprint), and per layer its :meth:`PureLayer.config` (layer, upstream,
  rule, ...), neurons, clusters per neuron, scores and suppressed virtual neurons.

Loading never unpickles (safetensors holds raw tensors, the config is JSON), loads strictly and
raises :class:`~purenn.errors.FileFormatError` naming what does not fit. Writes go to a temporary
file next to the target and are renamed into place, so a failed write never leaves a partial file.

Example:
    >>> pm.save("pure.safetensors")                                  # doctest: +SKIP
    >>> pm2 = purenn.load_purified("pure.safetensors")                # doctest: +SKIP
    >>> torch.equal(pm2(x), pm(x))                                    # doctest: +SKIP
    True
"""

from __future__ import annotations

import hashlib
import json
import os
import uuid
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor, nn
from torchvision.models.resnet import BasicBlock, Bottleneck, ResNet
from torchvision.ops.misc import FrozenBatchNorm2d

from ._version import __version__
from .arch import ResNetSpec
from .errors import ConfigError, FileFormatError, LayerError, PurennError
from .surgery import PureLayer, PurifiedModel

__all__ = [
    "FORMAT_VERSION",
    "save_purified",
    "load_purified",
    "read_config",
    "describe_architecture",
    "build_base_model",
]

#: version of the file layout; files with a higher number are refused
FORMAT_VERSION = 1
METADATA_KEY = "purenn"
BASE_PREFIX = "base_model."
PURE_PREFIX = "purenn."
MERGE_KEY = "merge_weight"

_STAGES = ("layer1", "layer2", "layer3", "layer4")
_STANDARD_STEM = {"kernel_size": [7, 7], "stride": [2, 2], "padding": [3, 3], "bias": False,
                  "maxpool": {"kernel_size": 3, "stride": 2, "padding": 1}}
# torchvision builder -> (block, layers, groups, width_per_group)
_BUILDERS = {
    "resnet18": ("BasicBlock", [2, 2, 2, 2], 1, 64),
    "resnet34": ("BasicBlock", [3, 4, 6, 3], 1, 64),
    "resnet50": ("Bottleneck", [3, 4, 6, 3], 1, 64),
    "resnet101": ("Bottleneck", [3, 4, 23, 3], 1, 64),
    "resnet152": ("Bottleneck", [3, 8, 36, 3], 1, 64),
    "wide_resnet50_2": ("Bottleneck", [3, 4, 6, 3], 1, 128),
    "wide_resnet101_2": ("Bottleneck", [3, 4, 23, 3], 1, 128),
    "resnext50_32x4d": ("Bottleneck", [3, 4, 6, 3], 32, 4),
    "resnext101_32x8d": ("Bottleneck", [3, 4, 23, 3], 32, 8),
    "resnext101_64x4d": ("Bottleneck", [3, 4, 23, 3], 64, 4),
}
_BLOCKS = {"BasicBlock": BasicBlock, "Bottleneck": Bottleneck}
_NORMS = {"BatchNorm2d": nn.BatchNorm2d, "FrozenBatchNorm2d": FrozenBatchNorm2d}
_ARCH_FIELDS = ("builder", "block", "layers", "groups", "width_per_group", "num_classes", "in_channels",
                "stem", "dilation", "norm")


# ---------------------------------------------------------------------------------------- architecture
def _pair(v: Any) -> list[int]:
    return [int(v), int(v)] if isinstance(v, int) else [int(i) for i in v]


def _module_signature(m: nn.Module) -> list:
    """The settings of a module that decide its computation and its state_dict shapes."""
    if isinstance(m, nn.Conv2d):
        padding = m.padding if isinstance(m.padding, str) else _pair(m.padding)
        return [m.in_channels, m.out_channels, list(m.kernel_size), list(m.stride), padding, list(m.dilation),
                m.groups, m.bias is not None, m.padding_mode]
    if isinstance(m, (nn.BatchNorm2d, FrozenBatchNorm2d)):
        return [m.num_features, float(m.eps), bool(getattr(m, "affine", True)),
                bool(getattr(m, "track_running_stats", True))]
    if isinstance(m, nn.Linear):
        return [m.in_features, m.out_features, m.bias is not None]
    if isinstance(m, nn.MaxPool2d):
        return [_pair(m.kernel_size), _pair(m.stride), _pair(m.padding), _pair(m.dilation), m.ceil_mode]
    if isinstance(m, nn.AdaptiveAvgPool2d):
        return [_pair(m.output_size) if m.output_size is not None else None]
    return []


def _fingerprint(model: nn.Module) -> str:
    """SHA-256 over every submodule's name, type and settings (the root's own class is left out,
    so a ResNet subclass with the standard forward fits a plain ResNet skeleton)."""
    rows = [[name, type(m).__name__, _module_signature(m)] for name, m in model.named_modules() if name]
    return hashlib.sha256(json.dumps(rows, separators=(",", ":")).encode()).hexdigest()


def describe_architecture(model: nn.Module) -> dict[str, Any]:
    """A JSON-serialisable description of a torchvision ResNet's architecture.

    Fields: ``builder`` (the torchvision builder it matches, e.g. ``"resnet50"``, else ``None``),
    ``block``, ``layers`` (blocks per stage), ``groups``, ``width_per_group``, ``num_classes``,
    ``in_channels``, ``stem`` (conv1 kernel/stride/padding/bias and the max-pool, ``None`` when
    it is an ``nn.Identity``), ``dilation`` (torchvision's ``replace_stride_with_dilation``),
    ``norm``, ``dtype``, ``fingerprint`` (SHA-256 of the module structure) and ``rebuildable``
    (whether :func:`build_base_model` reproduces that structure).

    Example:
        >>> import torchvision
        >>> arch = describe_architecture(torchvision.models.resnet50(num_classes=10))
        >>> arch["builder"], arch["layers"], arch["num_classes"]
        ('resnet50', [3, 4, 6, 3], 10)
    """
    spec = ResNetSpec(model)
    block = "Bottleneck" if len(spec.blocks[0].main) == 3 else "BasicBlock"
    first = model.layer1[0]
    groups = int(first.conv2.groups)
    width = int(first.conv2.out_channels // groups) if block == "Bottleneck" else 64
    dilation = []
    for stage in _STAGES[1:]:
        down = getattr(getattr(model, stage)[0], "downsample", None)
        dilation.append(bool(down is not None and tuple(down[0].stride) == (1, 1)))
    conv1, pool = model.conv1, model.maxpool
    if isinstance(pool, nn.MaxPool2d):
        maxpool: dict | str | None = {"kernel_size": pool.kernel_size, "stride": pool.stride,
                                      "padding": pool.padding}
    elif isinstance(pool, nn.Identity):
        maxpool = None
    else:
        maxpool = type(pool).__name__
    stem = {"kernel_size": list(conv1.kernel_size), "stride": list(conv1.stride),
            "padding": _pair(conv1.padding) if not isinstance(conv1.padding, str) else conv1.padding,
            "bias": conv1.bias is not None, "maxpool": maxpool}
    fc = model.fc
    param = next(model.parameters(), None)
    arch: dict[str, Any] = {
        "family": "torchvision.models.ResNet",
        "builder": None,
        "block": block,
        "layers": [len(getattr(model, s)) for s in _STAGES],
        "groups": groups,
        "width_per_group": width,
        "num_classes": int(fc.out_features) if isinstance(fc, nn.Linear) else None,
        "in_channels": int(conv1.in_channels),
        "stem": stem,
        "dilation": dilation,
        "norm": type(model.bn1).__name__,
        "dtype": str(param.dtype).replace("torch.", "") if param is not None else "float32",
        "fingerprint": _fingerprint(model),
    }
    try:
        arch["rebuildable"] = _fingerprint(build_base_model(arch, device="meta")) == arch["fingerprint"]
    except (FileFormatError, TypeError, ValueError):
        arch["rebuildable"] = False
    standard = stem == _STANDARD_STEM and arch["in_channels"] == 3 and not any(dilation)
    for name, (blk, layers, g, w) in _BUILDERS.items():
        if standard and arch["rebuildable"] and (block, arch["layers"], groups, width) == (blk, layers, g, w):
            arch["builder"] = name
    return arch


def build_base_model(arch: Mapping[str, Any], device: str | torch.device = "cpu") -> nn.Module:
    """An uninitialised torchvision ResNet with the architecture :func:`describe_architecture` gave
    (weights are left empty: load a ``state_dict`` into it).

    Raises:
        FileFormatError: the description names no block, norm or stem that torchvision's
            :class:`~torchvision.models.ResNet` can build.
    """
    try:
        block = _BLOCKS[arch["block"]]
        norm = _NORMS[arch["norm"]]
        stem = arch["stem"]
        if not isinstance(stem, Mapping) or isinstance(stem.get("maxpool"), str):
            raise KeyError("stem")
        if arch["num_classes"] is None:
            raise KeyError("num_classes (fc is not an nn.Linear)")
        with torch.device("meta"):
            model = ResNet(
                block, list(arch["layers"]), num_classes=int(arch["num_classes"]), groups=int(arch["groups"]),
                width_per_group=int(arch["width_per_group"]),
                replace_stride_with_dilation=list(arch["dilation"]), norm_layer=norm,
            )
            model.conv1 = nn.Conv2d(int(arch["in_channels"]), 64,
                                    tuple(stem["kernel_size"]), tuple(stem["stride"]),
                                    tuple(stem["padding"]) if not isinstance(stem["padding"], str)
                                    else stem["padding"], bias=bool(stem["bias"]))
            mp = stem["maxpool"]
            model.maxpool = nn.Identity() if mp is None else nn.MaxPool2d(mp["kernel_size"], mp["stride"],
                                                                           mp["padding"])
    except (KeyError, TypeError, ValueError) as e:
        raise FileFormatError(
            f"the stored architecture cannot be built with torchvision's ResNet ({type(e).__name__}: {e}); "
            "pass the base model skeleton: load_purified(path, model=...)."
        ) from None
    dtype = getattr(torch, str(arch.get("dtype", "float32")), None)
    if not isinstance(dtype, torch.dtype):
        raise FileFormatError(f"unknown dtype {arch.get('dtype')!r} in the stored architecture.")
    if str(device) != "meta":
        model = model.to_empty(device=device)
    return model.to(dtype).eval()


def _arch_difference(stored: Mapping[str, Any], given: Mapping[str, Any]) -> str:
    diffs = [f"{k}: file {stored.get(k)!r}, model {given.get(k)!r}" for k in _ARCH_FIELDS
             if stored.get(k) != given.get(k)]
    if not diffs:
        return "same layout, but module settings differ (e.g. BatchNorm eps or convolution options)"
    return "; ".join(diffs)


# ---------------------------------------------------------------------------------------- save
def _layer_entry(pl: PureLayer) -> dict[str, Any]:
    return {
        "config": pl.config(),
        "neurons": pl.neurons.tolist(),
        "n_clusters": pl.n_clusters.tolist(),
        "scores": [round(float(s), 6) for s in pl.scores.tolist()],
        "suppressed": torch.nonzero(pl.merge_weight == 0).flatten().tolist(),
    }


def _layer_tensors(pl: PureLayer) -> dict[str, Tensor]:
    names = (*PureLayer.TENSOR_KEYS, MERGE_KEY)
    return {f"{PURE_PREFIX}{pl.layer}.{n}": getattr(pl, n) for n in names}


def _write_atomic(tensors: dict[str, Tensor], metadata: dict[str, str], path: Path) -> None:
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        save_file(tensors, str(tmp), metadata=metadata)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def save_purified(pm: PurifiedModel, path: str | os.PathLike) -> Path:
    """Write ``pm`` to one safetensors file (see the module docstring for the layout).

    The write is atomic: the file appears at ``path`` complete or not at all (an existing file
    stays as it was if writing fails).

    Returns:
        The path written.

    Example:
        >>> purenn.io.save_purified(pm, "pure.safetensors")     # doctest: +SKIP
        PosixPath('pure.safetensors')
    """
    if not isinstance(pm, PurifiedModel):
        raise ConfigError(f"save_purified needs a PurifiedModel, got {type(pm).__name__}.")
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"{str(path)!r} is a directory; give a file name such as 'model.safetensors'.")
    config = {
        "format_version": FORMAT_VERSION,
        "purenn_version": __version__,
        "architecture": describe_architecture(pm.base_model),
        "max_memory": int(pm.max_memory),
        "layers": [_layer_entry(pm.pure_layer(name)) for name in pm.layers],
    }
    tensors: dict[str, Tensor] = {BASE_PREFIX + k: v for k, v in pm.base_model.state_dict().items()}
    for name in pm.layers:
        tensors.update(_layer_tensors(pm.pure_layer(name)))
    # safetensors refuses shared or non-contiguous storage: write independent contiguous copies
    tensors = {k: v.detach().to("cpu", copy=True).contiguous() for k, v in tensors.items()}
    metadata = {"format": "pt", METADATA_KEY: json.dumps(config, separators=(",", ":"))}
    _write_atomic(tensors, metadata, path)
    return path


# ---------------------------------------------------------------------------------------- load
def _open_error(path: Path, err: Exception) -> FileFormatError:
    return FileFormatError(
        f"{str(path)!r} is not a readable safetensors file (truncated or corrupted?): {err}. "
        "Write it again with PurifiedModel.save()."
    )


def _parse_config(path: Path, metadata: Mapping[str, str] | None) -> dict[str, Any]:
    if not metadata or METADATA_KEY not in metadata:
        raise FileFormatError(
            f"{str(path)!r} is a safetensors file but not a purenn model: its metadata has no "
            f"{METADATA_KEY!r} entry. Save purified models with PurifiedModel.save()."
        )
    try:
        config = json.loads(metadata[METADATA_KEY])
    except json.JSONDecodeError as e:
        raise FileFormatError(f"the purenn config in {str(path)!r} is not valid JSON ({e}).") from None
    if not isinstance(config, dict):
        raise FileFormatError(
            f"the purenn config in {str(path)!r} must be a JSON object, got {type(config).__name__}."
        )
    version = config.get("format_version")
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise FileFormatError(
            f"{str(path)!r} has an unknown purenn format version {version!r}; this purenn "
            f"({__version__}) reads format versions 1..{FORMAT_VERSION}."
        )
    if version > FORMAT_VERSION:
        raise FileFormatError(
            f"{str(path)!r} was written in purenn format version {version} (by purenn "
            f"{config.get('purenn_version', '?')}); this purenn ({__version__}) reads versions up to "
            f"{FORMAT_VERSION}. Upgrade purenn to load it."
        )
    for key, kind in (("architecture", dict), ("layers", list)):
        if not isinstance(config.get(key), kind):
            raise FileFormatError(
                f"the purenn config in {str(path)!r} lacks {key!r} (a JSON {kind.__name__})."
            )
    for i, entry in enumerate(config["layers"]):
        if not (isinstance(entry, dict) and isinstance(entry.get("config"), dict)
                and isinstance(entry["config"].get("layer"), str)):
            raise FileFormatError(
                f"layer entry {i} of the purenn config in {str(path)!r} has no 'config' with a 'layer' name."
            )
    return config


def read_config(path: str | os.PathLike) -> dict[str, Any]:
    """The JSON config of a saved purified model, without loading its tensors.

    Example:
        >>> purenn.io.read_config("pure.safetensors")["architecture"]["builder"]   # doctest: +SKIP
        'resnet50'
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no file at {str(path)!r}.")
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata()
    except SafetensorError as e:
        raise _open_error(path, e) from None
    return _parse_config(path, metadata)


def _base_skeleton(arch: dict[str, Any], model: nn.Module | None, path: Path) -> nn.Module:
    if model is None:
        if not arch.get("rebuildable", False):
            raise FileFormatError(
                f"the base model in {str(path)!r} is a customised ResNet that cannot be rebuilt from its "
                "description; pass a skeleton of it: load_purified(path, model=MyResNet())."
            )
        model = build_base_model(arch)
        if _fingerprint(model) != arch.get("fingerprint"):
            raise FileFormatError(
                f"rebuilding the base model of {str(path)!r} gave a different structure; pass a skeleton of "
                "it: load_purified(path, model=...)."
            )
        return model
    if not isinstance(model, nn.Module):
        raise ConfigError(
            f"model must be an nn.Module skeleton of the base ResNet, got {type(model).__name__}."
        )
    given = describe_architecture(model)
    if given["fingerprint"] != arch.get("fingerprint"):
        raise FileFormatError(
            f"the model given as model= does not fit {str(path)!r}: {_arch_difference(arch, given)}. "
            f"Pass a skeleton of the saved architecture (builder {arch.get('builder')!r}) or model=None "
            "to rebuild it."
        )
    dtype = getattr(torch, str(arch.get("dtype", "float32")), torch.float32)
    return model.to(dtype).eval()


def _short(keys: list[str], n: int = 8) -> str:
    keys = sorted(keys)
    return ", ".join(keys[:n]) + (f", ... ({len(keys) - n} more)" if len(keys) > n else "")


def _check_tensors(path: Path, expected: Mapping[str, Tensor], found: Mapping[str, Tensor],
                   check_shape: bool) -> None:
    missing = set(expected) - set(found)
    extra = set(found) - set(expected)
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"missing tensors: {_short(list(missing))}")
        if extra:
            parts.append(f"unexpected tensors: {_short(list(extra))}")
        raise FileFormatError(f"{str(path)!r} does not fit the stored architecture: {'; '.join(parts)}.")
    if check_shape:
        for k, ref in expected.items():
            t = found[k]
            if t.shape != ref.shape:
                raise FileFormatError(
                    f"tensor {k!r} in {str(path)!r} has shape {tuple(t.shape)}, expected {tuple(ref.shape)}."
                )
            if t.dtype != ref.dtype:
                raise FileFormatError(
                    f"tensor {k!r} in {str(path)!r} has dtype {t.dtype}, expected {ref.dtype}."
                )


def _build_layer(path: Path, entry: dict[str, Any], tensors: dict[str, Tensor]) -> PureLayer:
    cfg = dict(entry["config"])
    layer = cfg["layer"]
    unknown = sorted(set(cfg) - set(PureLayer.CONFIG_KEYS))
    if unknown:
        warnings.warn(
            f"{str(path)!r}: ignoring unknown config keys {unknown} of layer {layer!r} (written by a newer "
            "purenn?).",
            stacklevel=3,
        )
        for k in unknown:
            del cfg[k]
    try:
        pl = PureLayer.from_config(cfg, tensors)
    except KeyError as e:
        raise FileFormatError(f"the config of layer {layer!r} in {str(path)!r} lacks {e}.") from None
    except (PurennError, TypeError, RuntimeError) as e:
        raise FileFormatError(
            f"the tensors of layer {layer!r} in {str(path)!r} do not fit together: {e}"
        ) from None
    for key in ("neurons", "n_clusters"):
        if key in entry and entry[key] != getattr(pl, key).tolist():
            raise FileFormatError(
                f"layer {layer!r} in {str(path)!r}: the config's {key!r} disagrees with the stored tensor."
            )
    return pl


def load_purified(
    path: str | os.PathLike, model: nn.Module | None = None, *, device: str | torch.device | None = None
) -> PurifiedModel:
    """Load a purified model written by :meth:`PurifiedModel.save`.

    Args:
        path: the safetensors file.
        model: ``None`` to rebuild the base ResNet from the stored architecture (every torchvision
            builder and adapted stems), or a skeleton of it (any weights; they are overwritten in
            place) for customised ResNets. A skeleton of another architecture is refused.
        device: where to put the loaded model (default: CPU).

    Returns:
        The :class:`PurifiedModel`, in eval mode, with suppressed virtual neurons still suppressed.

    Raises:
        FileFormatError: the file is not a readable safetensors file, not a purenn file, has a bad
            or newer config, missing, extra or misshapen tensors, or does not fit ``model``.

    Example:
        >>> pm2 = purenn.load_purified("pure.safetensors")          # doctest: +SKIP
        >>> skeleton = torchvision.models.resnet50()                      # doctest: +SKIP
        >>> pm2 = purenn.load_purified("pure.safetensors", model=skeleton)  # doctest: +SKIP
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no file at {str(path)!r}.")
    try:
        with safe_open(str(path), framework="pt") as f:
            config = _parse_config(path, f.metadata())
            found = {k: f.get_tensor(k) for k in f.keys()}
    except SafetensorError as e:
        raise _open_error(path, e) from None
    base = _base_skeleton(config["architecture"], model, path)

    base_expected = {BASE_PREFIX + k: v for k, v in base.state_dict().items()}
    layer_names = [e["config"]["layer"] for e in config["layers"]]
    pure_names = (*PureLayer.TENSOR_KEYS, MERGE_KEY)
    pure_expected = {f"{PURE_PREFIX}{layer}.{n}": torch.empty(0) for layer in layer_names for n in pure_names}
    _check_tensors(path, {**base_expected, **pure_expected}, found, check_shape=False)
    _check_tensors(path, base_expected, {k: found[k] for k in base_expected}, check_shape=True)

    base.load_state_dict({k[len(BASE_PREFIX):]: found[k] for k in base_expected}, strict=True)
    layers = []
    for entry, layer in zip(config["layers"], layer_names):
        tensors = {n: found[f"{PURE_PREFIX}{layer}.{n}"] for n in pure_names}
        layers.append(_build_layer(path, entry, tensors))
    max_memory = config.get("max_memory")
    kwargs = {"max_memory": int(max_memory)} if isinstance(max_memory, int) and max_memory > 0 else {}
    try:
        pm = PurifiedModel(base, layers, **kwargs)
    except (LayerError, ConfigError) as e:
        raise FileFormatError(
            f"the purified layers in {str(path)!r} do not fit the base model: {e}"
        ) from None
    return pm.to(device) if device is not None else pm
