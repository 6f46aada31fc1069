"""Save and load a :class:`~purenn.PurifiedModel` as one safetensors file.

The file holds

- the base model's ``state_dict`` under ``base_model.`` (keys otherwise unchanged, so
  ``{k[len("base_model."):]: v}`` loads straight into the original ResNet);
- each purified layer's tensors under ``purenn.<layer>.<name>``: ``neurons``, ``centroids``,
  ``n_clusters``, ``scores``, ``ref_counts``, ``ref_indices``, ``ref_clusters`` and
  ``merge_weight`` (the suppression mask: 1 on, 0 suppressed);
- a JSON config in the safetensors metadata under ``"purenn"``: format and purenn version, the
  base architecture (torchvision builder name when it is one, or the timm model name and the
  arguments that rebuild it; block layout, stem, input channels, classes, a structural fingerprint),
  and per layer its :meth:`PureLayer.config` (layer, upstream,
  rule, ...), neurons, clusters per neuron, scores and suppressed virtual neurons.

A second metadata entry, ``"purenn_sha256"``, holds content hashes: SHA-256 of the config text and,
per tensor, of its name, dtype, shape and bytes.

Loading never unpickles (safetensors holds raw tensors, the config is JSON) and checks the file
before using it: every tensor is there with the shape and dtype the architecture gives; every value
is what it may be (finite weights and centroids, non-negative BatchNorm variances, merge weights 0
or 1, cluster counts, reference counts, reference indices and clusters in range, finite scores);
every config value fits the architecture and the tensors (layers, upstream layers, channels, gate,
a ``skip_aware`` that needs an identity skip only where there is one, the suppressed list); then the
content hashes, naming the first tensor that differs from what was saved (``verify=False`` skips
only this last check, for files edited on purpose; files saved before hashes existed load with a
warning). Anything else raises :class:`~purenn.errors.FileFormatError`, and nothing is written into
a given skeleton before every check passed. Writes go to a temporary file next to the target and
are renamed into place, so a failed write never leaves a partial file.

Example:
    >>> pm.save("pure.safetensors")                                  # doctest: +SKIP
    >>> pm2 = purenn.load_purified("pure.safetensors")                # doctest: +SKIP
    >>> torch.equal(pm2(x), pm(x))                                    # doctest: +SKIP
    True
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save as safetensors_save
from torch import Tensor, nn
from torchvision.models.resnet import BasicBlock, Bottleneck, ResNet
from torchvision.ops.misc import FrozenBatchNorm2d

from ._choices import is_score_kind
from ._files import as_path, resolve_target, write_chunks
from ._version import __version__
from .arch import ResNetSpec, input_conv
from .distributed import writes_on_rank_zero
from .errors import ConfigError, FileFormatError, LayerError, PurennError
from .gating import CIRCUIT_GATES
from .purify import _check_device
from .refdata import validate_record
from .relevance import has_identity_path
from .rules import RULES, rule_from_config
from .surgery import PureLayer, PurifiedModel

__all__ = [
    "FORMAT_VERSION",
    "save_purified",
    "load_purified",
    "read_config",
    "describe_architecture",
    "build_base_model",
    "content_hashes",
]

#: version of the file layout; files with a higher number are refused
FORMAT_VERSION = 1
METADATA_KEY = "purenn"
HASH_KEY = "purenn_sha256"
_INT_KEYS = ("neurons", "n_clusters", "ref_counts", "ref_indices", "ref_clusters")
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
_ARCH_FIELDS = ("family", "timm_model", "timm_kwargs",
                "builder", "block", "layers", "groups", "width_per_group", "num_classes", "in_channels",
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
    if isinstance(m, nn.AvgPool2d):
        return [_pair(m.kernel_size), _pair(m.stride), _pair(m.padding), m.ceil_mode, m.count_include_pad]
    if isinstance(m, nn.Conv1d):
        return [m.in_channels, m.out_channels, list(m.kernel_size), list(m.stride), list(m.padding),
                list(m.dilation), m.groups, m.bias is not None, m.padding_mode]
    if type(m).__name__ == "SelectAdaptivePool2d":  # timm's head pooling
        return [str(getattr(m, "pool_type", "")), bool(getattr(m, "flatten", None) is not None)]
    return []


def _fingerprint(model: nn.Module) -> str:
    """SHA-256 over every submodule's name, type and settings (the root's own class is left out,
    so a ResNet subclass with the standard forward fits a plain ResNet skeleton)."""
    rows = [[name, type(m).__name__, _module_signature(m)] for name, m in model.named_modules() if name]
    return hashlib.sha256(json.dumps(rows, separators=(",", ":")).encode()).hexdigest()


def describe_architecture(model: nn.Module) -> dict[str, Any]:
    """A JSON-serialisable description of a ResNet's architecture (torchvision or timm).

    For a timm ResNet the fields are ``family``, ``timm_model`` and ``timm_tag`` (from its
    ``pretrained_cfg``; ``None`` when it was not built by ``timm.create_model``), ``timm_kwargs``
    (the ``create_model`` arguments that rebuild its structure), ``block``, ``layers``,
    ``attention``, ``num_classes``, ``in_channels``, ``norm``, ``dtype``, ``fingerprint`` and
    ``rebuildable``. For a torchvision ResNet: ``builder`` (the torchvision builder it matches,
    e.g. ``"resnet50"``, else ``None``),
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
    if spec.family.name == "timm":
        return _describe_timm(model, spec)
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


def _timm_kwargs(model: nn.Module) -> dict[str, Any]:
    """The ``timm.create_model`` arguments that, with the model name, rebuild ``model``'s structure."""
    drop_path = [float(b.drop_path.drop_prob) for s in _STAGES for b in getattr(model, s)
                 if getattr(b, "drop_path", None) is not None]
    drop_block = [float(b.drop_block.drop_prob) for s in _STAGES for b in getattr(model, s)
                  if type(getattr(b, "drop_block", None)).__name__ == "DropBlock2d"]
    info = getattr(model, "feature_info", None)
    stride = info[-1].get("reduction") if isinstance(info, list) and info and isinstance(info[-1], dict) else None
    kwargs: dict[str, Any] = {
        "num_classes": int(model.fc.out_features) if isinstance(model.fc, nn.Linear) else 0,
        "in_chans": int(input_conv(model).in_channels),
        "global_pool": str(getattr(model.global_pool, "pool_type", "avg")),
        "drop_rate": float(getattr(model, "drop_rate", 0.0) or 0.0),
    }
    if isinstance(stride, int) and stride != 32:
        kwargs["output_stride"] = stride
    if drop_path:
        kwargs["drop_path_rate"] = max(drop_path)  # timm's linear decay: the last block has the full rate
    if drop_block:
        kwargs["drop_block_rate"] = max(drop_block)
    return kwargs


def _describe_timm(model: nn.Module, spec: ResNetSpec) -> dict[str, Any]:
    cfg = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None) or {}
    name = cfg.get("architecture") if isinstance(cfg, Mapping) else None
    tag = cfg.get("tag") if isinstance(cfg, Mapping) else None
    conv1 = input_conv(model)
    param = next(model.parameters(), None)
    arch: dict[str, Any] = {
        "family": "timm.models.resnet.ResNet",
        "timm_model": name if isinstance(name, str) and name else None,
        "timm_tag": tag if isinstance(tag, str) and tag else None,
        "timm_kwargs": _timm_kwargs(model),
        "builder": None,
        "block": "Bottleneck" if len(spec.blocks[0].main) == 3 else "BasicBlock",
        "layers": [len(getattr(model, s)) for s in _STAGES],
        "attention": sorted({type(b.attn).__name__ for b in spec.blocks if b.attn is not None}),
        "num_classes": int(model.fc.out_features) if isinstance(model.fc, nn.Linear) else None,
        "in_channels": int(conv1.in_channels),
        "norm": type(model.bn1).__name__,
        "dtype": str(param.dtype).replace("torch.", "") if param is not None else "float32",
        "fingerprint": _fingerprint(model),
    }
    try:
        arch["rebuildable"] = (arch["timm_model"] is not None
                               and _fingerprint(build_base_model(arch, device="meta")) == arch["fingerprint"])
    except (FileFormatError, TypeError, ValueError, RuntimeError):
        arch["rebuildable"] = False
    return arch


def _build_timm(arch: Mapping[str, Any]) -> nn.Module:
    name, tag, kwargs = arch.get("timm_model"), arch.get("timm_tag"), arch.get("timm_kwargs")
    if not isinstance(name, str) or not name or not isinstance(kwargs, Mapping):
        raise FileFormatError(
            "the stored timm architecture names no timm model (it was not built by timm.create_model); pass the "
            "base model skeleton: load_purified(path, model=...)."
        )
    try:
        import timm
    except ImportError:
        raise FileFormatError(
            f"the base model is the timm model {name!r}, and rebuilding it needs timm: pip install "
            "\"purenn[timm]\", or pass the base model skeleton: load_purified(path, model=...)."
        ) from None
    names = [f"{name}.{tag}", name] if isinstance(tag, str) and tag else [name]
    for i, full in enumerate(names):
        try:
            with torch.device("meta"):
                return timm.create_model(full, pretrained=False, **dict(kwargs))
        except RuntimeError as e:  # unknown model or pretrained tag in this timm version
            if i + 1 < len(names):
                continue
            raise FileFormatError(
                f"timm {timm.__version__} cannot build {full!r} ({e}); install the timm version that saved it, or "
                "pass the base model skeleton: load_purified(path, model=...)."
            ) from None
        except (TypeError, ValueError, KeyError, AssertionError) as e:
            raise FileFormatError(
                f"timm cannot build {full!r} with the stored arguments {dict(kwargs)} ({type(e).__name__}: {e}); "
                "pass the base model skeleton: load_purified(path, model=...)."
            ) from None
    raise AssertionError("unreachable")


def build_base_model(arch: Mapping[str, Any], device: str | torch.device = "cpu") -> nn.Module:
    """An uninitialised ResNet with the architecture :func:`describe_architecture` gave (weights
    are left empty: load a ``state_dict`` into it): torchvision's ResNet, or for a timm model
    ``timm.create_model(name, pretrained=False, **kwargs)`` with the stored name and arguments.

    Raises:
        FileFormatError: the description names no block, norm or stem that torchvision's
            :class:`~torchvision.models.ResNet` can build; or a timm model when timm is not
            installed (``pip install "purenn[timm]"``) or cannot build it.

    Example:
        >>> import torchvision
        >>> arch = describe_architecture(torchvision.models.resnet18(num_classes=3))
        >>> type(build_base_model(arch, device="meta")).__name__
        'ResNet'
    """
    if str(arch.get("family", "")).startswith("timm"):
        model = _build_timm(arch)
        dtype = getattr(torch, str(arch.get("dtype", "float32")), None)
        if not isinstance(dtype, torch.dtype):
            raise FileFormatError(f"unknown dtype {arch.get('dtype')!r} in the stored architecture.")
        if str(device) != "meta":
            model = model.to_empty(device=device)
        return model.to(dtype).eval()
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


def _arch_name(arch: Mapping[str, Any]) -> str:
    if arch.get("timm_model"):
        return f"timm model {arch['timm_model']!r}"
    return f"builder {arch.get('builder')!r}"


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


def _tensor_hash(name: str, t: Tensor) -> str:
    h = hashlib.sha256(json.dumps([name, str(t.dtype).replace("torch.", ""), list(t.shape)]).encode())
    h.update(t.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()


def content_hashes(tensors: Mapping[str, Tensor], config_text: str) -> dict[str, Any]:
    """The content hashes stored next to the config: SHA-256 of ``config_text`` and, per tensor, of
    its name, dtype, shape and bytes.

    Example:
        >>> h = content_hashes({"w": torch.zeros(2)}, "{}")
        >>> h["algorithm"], sorted(h["tensors"]), len(h["config"])
        ('sha256', ['w'], 64)
    """
    return {
        "algorithm": "sha256",
        "config": hashlib.sha256(config_text.encode()).hexdigest(),
        "tensors": {name: _tensor_hash(name, tensors[name]) for name in sorted(tensors)},
    }


def _write_atomic(tensors: dict[str, Tensor], metadata: dict[str, str], path: Path) -> None:
    """Serialise in memory, then write with :func:`purenn._files.write_chunks` (temporary file next to
    the target, renamed into place; stale temporary files of killed runs removed; normal file mode;
    a symlink is written through)."""
    write_chunks(path, [safetensors_save(tensors, metadata=metadata)], "file name such as 'model.safetensors'")


@writes_on_rank_zero
def save_purified(pm: PurifiedModel, path: str | os.PathLike) -> Path:
    """Write ``pm`` to one safetensors file (see the module docstring for the layout).

    The write is atomic: the file appears at ``path`` complete or not at all (an existing file
    stays as it was if writing fails). The temporary file ``.NAME.purenn-tmp-<pid>-<random>`` lies
    next to ``path``; one left by a killed save is removed by the next save to ``path``. The file gets
    a normal file's mode (an existing file's mode, else ``0o666`` less the umask); a symbolic link
    is written through (the file it points to is replaced). A missing directory raises
    :class:`~purenn.errors.ConfigError` naming it.
    Under torch.distributed only rank 0 writes; the other ranks wait for it and write nothing.

    Returns:
        The path written.

    Example:
        >>> purenn.io.save_purified(pm, "pure.safetensors")     # doctest: +SKIP
        PosixPath('pure.safetensors')
    """
    if not isinstance(pm, PurifiedModel):
        raise ConfigError(f"save_purified needs a PurifiedModel, got {type(pm).__name__}.")
    path = as_path(path)
    resolve_target(path, "file name such as 'model.safetensors'")  # before any work: a missing directory, ...
    pm._check_base()  # a model converted behind pm's back, or one on the meta device, holds nothing to save
    config = {
        "format_version": FORMAT_VERSION,
        "purenn_version": __version__,
        "architecture": describe_architecture(pm.base_model),
        "max_memory": int(pm.max_memory),
        "layers": [_layer_entry(pm.pure_layer(name)) for name in pm.layers],
    }
    if getattr(pm, "reference_data", None):
        config["reference_data"] = pm.reference_data
    tensors: dict[str, Tensor] = {BASE_PREFIX + k: v for k, v in pm.base_model.state_dict().items()}
    for name in pm.layers:
        tensors.update(_layer_tensors(pm.pure_layer(name)))
    # safetensors refuses shared or non-contiguous storage: write independent contiguous copies
    tensors = {k: v.detach().to("cpu", copy=True).contiguous() for k, v in tensors.items()}
    text = json.dumps(config, separators=(",", ":"))
    metadata = {"format": "pt", METADATA_KEY: text,
                HASH_KEY: json.dumps(content_hashes(tensors, text), separators=(",", ":"))}
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
    path = as_path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no file at {str(path)!r}.")
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata()
    except SafetensorError as e:
        raise _open_error(path, e) from None
    return _parse_config(path, metadata)


def _stored_dtype(arch: Mapping[str, Any], path: Path) -> torch.dtype:
    name = arch.get("dtype", "float32")
    dtype = getattr(torch, name, None) if isinstance(name, str) else None
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise FileFormatError(
            f"the architecture in {str(path)!r} names dtype {name!r}; a purified model's weights are floating point."
        )
    return dtype


def _base_skeleton(arch: dict[str, Any], model: nn.Module | None, path: Path) -> nn.Module:
    """The base model to load into: rebuilt (``model=None``) or the given skeleton, checked but not
    changed (it is converted and written only after every check of the file passed)."""
    if model is None:
        if str(arch.get("family", "")).startswith("timm") and arch.get("timm_model"):
            build_base_model(arch, device="meta")  # says what to install when timm is missing
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
            f"Pass a skeleton of the saved architecture ({_arch_name(arch)}) or model=None "
            "to rebuild it."
        )
    return model


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


def _check_base_values(path: Path, tensors: Mapping[str, Tensor]) -> None:
    """Finite floating-point weights and statistics, non-negative BatchNorm variances."""
    for k, t in tensors.items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise FileFormatError(f"tensor {k!r} in {str(path)!r} holds NaN or infinite values.")
        if k.endswith("running_var") and bool((t < 0).any()):
            raise FileFormatError(f"tensor {k!r} in {str(path)!r} holds negative BatchNorm variances.")


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _check_layer_config(path: Path, cfg: Mapping[str, Any]) -> None:
    """Types and ranges of a layer's plain config values (the rest is checked against the model)."""
    layer = cfg["layer"]

    def bad(key: str, what: str) -> FileFormatError:
        return FileFormatError(
            f"layer {layer!r} in {str(path)!r}: config {key!r} is {cfg.get(key)!r}; it must be {what}."
        )

    if "upstream" in cfg and not isinstance(cfg["upstream"], str):
        raise bad("upstream", "a layer name")
    if "channels" in cfg and not (_is_int(cfg["channels"]) and cfg["channels"] > 0):
        raise bad("channels", "a positive integer")
    if "skip_aware" in cfg and not isinstance(cfg["skip_aware"], bool):
        raise bad("skip_aware", "true or false")
    if "rule" in cfg:
        try:
            rule_from_config(cfg["rule"])
        except ConfigError:
            raise bad("rule", f"one of {', '.join(repr(r) for r in RULES)} or such a rule's parameters") from None
    if "gate" in cfg and not isinstance(cfg["gate"], str):
        raise bad("gate", "a gate name")
    w = cfg.get("gate_weight", 0.5)
    if not _is_number(w) or not math.isfinite(w) or w < 0:
        raise bad("gate_weight", "a finite number >= 0")
    if not is_score_kind(cfg.get("score_kind")):
        raise bad("score_kind", "null or a short lower-case score name")


def _check_layer_tensors(path: Path, layer: str, tensors: Mapping[str, Tensor], dtype: torch.dtype) -> None:
    """Dtypes and dimensions of a layer's tensors, before they are used."""
    for key in _INT_KEYS:
        if tensors[key].dtype != torch.int64:
            raise FileFormatError(
                f"tensor '{PURE_PREFIX}{layer}.{key}' in {str(path)!r} has dtype {tensors[key].dtype}, expected "
                "torch.int64."
            )
    for key, allowed in (("centroids", (dtype,)), (MERGE_KEY, (dtype,)), ("scores", (torch.float32, dtype))):
        if tensors[key].dtype not in allowed:
            raise FileFormatError(
                f"tensor '{PURE_PREFIX}{layer}.{key}' in {str(path)!r} has dtype {tensors[key].dtype}, expected "
                f"{' or '.join(str(d) for d in dict.fromkeys(allowed))}."
            )
    for key, ndim in (("neurons", 1), ("n_clusters", 1), ("scores", 1), (MERGE_KEY, 1), ("centroids", 3),
                      ("ref_counts", 2), ("ref_indices", 2), ("ref_clusters", 2)):
        if tensors[key].ndim != ndim:
            raise FileFormatError(
                f"tensor '{PURE_PREFIX}{layer}.{key}' in {str(path)!r} has {tensors[key].ndim} dimensions, "
                f"expected {ndim}."
            )
    c_max, n_cl = tensors["centroids"].shape[1], tensors["n_clusters"]
    if n_cl.numel() and (int(n_cl.min()) < 1 or int(n_cl.max()) > c_max):
        raise FileFormatError(
            f"tensor '{PURE_PREFIX}{layer}.n_clusters' in {str(path)!r} holds counts outside 1..{c_max} (the "
            "centroid rows per neuron)."
        )


def _check_layer_values(path: Path, entry: Mapping[str, Any], pl: PureLayer) -> None:
    """The values of a built layer: what each tensor may hold, and the config entry agreeing with them."""
    layer = pl.layer

    def bad(key: str, what: str) -> FileFormatError:
        return FileFormatError(f"tensor '{PURE_PREFIX}{layer}.{key}' in {str(path)!r} {what}.")

    k, c_max = pl.centroids.shape[:2]
    if pl.scores.shape != (k,):
        raise bad("scores", f"has shape {tuple(pl.scores.shape)}, expected ({k},)")
    if not bool(torch.isfinite(pl.centroids).all()):
        raise bad("centroids", "holds NaN or infinite values")
    if not bool(torch.isfinite(pl.scores).all()):
        raise bad("scores", "holds NaN or infinite values")
    w = pl.merge_weight
    if not bool(((w == 0) | (w == 1)).all()):
        odd = w[(w != 0) & (w != 1)][0].item()
        raise bad(MERGE_KEY, f"holds {odd!r}; merge weights are 0 (suppressed) or 1")
    n_cl = pl.n_clusters
    counts = pl.ref_counts
    if bool((counts < 0).any()):
        raise bad("ref_counts", "holds negative counts")
    beyond = torch.arange(c_max)[None] >= n_cl[:, None]
    if bool((counts[beyond] != 0).any()):
        raise bad("ref_counts", "counts references in clusters a neuron does not have")
    if pl.ref_indices.shape[1]:
        if bool((pl.ref_indices < 0).any()):
            raise bad("ref_indices", "holds negative data indices")
        rc = pl.ref_clusters
        if bool(((rc < 0) | (rc >= n_cl[:, None])).any()):
            raise bad("ref_clusters", "holds clusters outside 0..n_clusters-1 of their neuron")
        per_cluster = torch.stack([(rc == c).sum(dim=1) for c in range(c_max)], dim=1) if c_max else counts
        if not torch.equal(per_cluster, counts):
            raise bad("ref_counts", "disagrees with the clusters of the reference samples (ref_clusters)")
    where = f"layer {layer!r} in {str(path)!r}: the config's"
    for key in ("neurons", "n_clusters"):
        if key in entry and entry[key] != getattr(pl, key).tolist():
            raise FileFormatError(f"{where} {key!r} disagrees with the stored tensor.")
    if "suppressed" in entry and entry["suppressed"] != torch.nonzero(w == 0).flatten().tolist():
        raise FileFormatError(f"{where} 'suppressed' disagrees with the stored merge weights.")
    scores = entry.get("scores")
    if scores is not None:
        stored = pl.scores.tolist()
        close = isinstance(scores, list) and len(scores) == len(stored) and all(
            _is_number(a) and math.isclose(a, b, rel_tol=1e-6, abs_tol=1e-5) for a, b in zip(scores, stored))
        if not close:
            raise FileFormatError(f"{where} 'scores' disagrees with the stored tensor.")


def _build_layer(path: Path, entry: dict[str, Any], tensors: dict[str, Tensor], dtype: torch.dtype) -> PureLayer:
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
    _check_layer_config(path, cfg)
    _check_layer_tensors(path, layer, tensors, dtype)
    try:
        pl = PureLayer.from_config(cfg, tensors)
    except KeyError as e:
        raise FileFormatError(f"the config of layer {layer!r} in {str(path)!r} lacks {e}.") from None
    except (PurennError, TypeError, ValueError, RuntimeError) as e:
        raise FileFormatError(
            f"the tensors of layer {layer!r} in {str(path)!r} do not fit together: {e}"
        ) from None
    _check_layer_values(path, entry, pl)
    return pl


def _check_skip_aware(path: Path, pm: PurifiedModel) -> None:
    """``skip_aware`` only for a circuit gate over a segment with an identity skip."""
    for pl, _, blocks, _ in pm._plan.values():
        if pl.skip_aware and (pl.gate not in CIRCUIT_GATES or not has_identity_path(blocks)):
            why = (f"its gate {pl.gate!r} does not use circuits" if pl.gate not in CIRCUIT_GATES else
                   f"no identity skip carries channels from {pl.upstream!r} to {pl.layer!r}")
            raise FileFormatError(
                f"layer {pl.layer!r} in {str(path)!r} is marked skip_aware, which is impossible here: {why}."
            )


def _verify_hashes(path: Path, metadata: Mapping[str, str], found: Mapping[str, Tensor]) -> None:
    raw = metadata.get(HASH_KEY)
    if raw is None:
        warnings.warn(
            f"{str(path)!r} has no content hashes (saved by a purenn before they were added), so it cannot "
            "be checked against what was saved; save it again to add them, or load it with verify=False.",
            UserWarning,
            stacklevel=3,
        )
        return
    try:
        hashes = json.loads(raw)
    except json.JSONDecodeError:
        hashes = None
    if not (isinstance(hashes, dict) and hashes.get("algorithm") == "sha256" and isinstance(hashes.get("config"), str)
            and isinstance(hashes.get("tensors"), dict)):
        raise FileFormatError(f"the content hashes of {str(path)!r} are malformed; the file was edited or damaged.")
    hint = "the file was edited or damaged (load it with verify=False if it was edited on purpose)"
    if hashlib.sha256(metadata[METADATA_KEY].encode()).hexdigest() != hashes["config"]:
        raise FileFormatError(f"the purenn config in {str(path)!r} differs from the one saved: {hint}.")
    stored = hashes["tensors"]
    for name in sorted(set(stored) | set(found)):
        if name not in found:
            raise FileFormatError(f"tensor {name!r} was saved in {str(path)!r} but is missing: {hint}.")
        if name not in stored:
            raise FileFormatError(f"tensor {name!r} in {str(path)!r} was not there when it was saved: {hint}.")
        if _tensor_hash(name, found[name]) != stored[name]:
            raise FileFormatError(f"tensor {name!r} in {str(path)!r} differs from what was saved: {hint}.")


def load_purified(
    path: str | os.PathLike,
    model: nn.Module | None = None,
    *,
    device: str | torch.device | None = None,
    verify: bool = True,
) -> PurifiedModel:
    """Load a purified model written by :meth:`PurifiedModel.save`.

    Everything in the file is checked before it is used (see the module docstring); a load that
    fails leaves ``model`` exactly as it was.

    Args:
        path: the safetensors file.
        model: ``None`` to rebuild the base ResNet from the stored architecture (every torchvision
            builder and adapted stems), or a skeleton of it (any weights) for customised ResNets: once
            every check passed it is converted to the stored dtype and its weights are overwritten in
            place, and the purified model shares it. A skeleton of another architecture is refused.
        device: where to put the loaded model (default: CPU). With a skeleton on another device, the
            purified model holds a copy there and the skeleton stays where it is.
        verify: check the content hashes saved with the file: the config and every tensor must be
            what was saved. ``False`` skips only this check (for a file edited on purpose); every
            value is still validated.

    Returns:
        The :class:`PurifiedModel`, in eval mode, with suppressed virtual neurons still suppressed.

    Raises:
        FileFormatError: the file is not a readable safetensors file, not a purenn file, has a bad
            or newer config, missing, extra or misshapen tensors, values a purified model cannot
            hold, contents that differ from what was saved, or does not fit ``model``.

    Example:
        >>> pm2 = purenn.load_purified("pure.safetensors")          # doctest: +SKIP
        >>> skeleton = torchvision.models.resnet50()                      # doctest: +SKIP
        >>> pm2 = purenn.load_purified("pure.safetensors", model=skeleton)  # doctest: +SKIP
        >>> pm3 = purenn.load_purified("edited.safetensors", verify=False)  # doctest: +SKIP
    """
    path = as_path(path)
    if not isinstance(verify, bool):
        raise ConfigError(f"verify must be True or False, got {verify!r}.")
    target = None if device is None else _check_device(device)
    if model is not None and not isinstance(model, nn.Module):
        raise ConfigError(
            f"model must be an nn.Module skeleton of the base ResNet, got {type(model).__name__}."
        )
    if not path.is_file():
        raise FileNotFoundError(f"no file at {str(path)!r}.")
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = dict(f.metadata() or {})
            config = _parse_config(path, metadata)
            found = {k: f.get_tensor(k) for k in f.keys()}
    except SafetensorError as e:
        raise _open_error(path, e) from None
    max_memory = config.get("max_memory")
    if max_memory is not None and not (_is_int(max_memory) and max_memory > 0):
        raise FileFormatError(
            f"the purenn config in {str(path)!r} has max_memory {max_memory!r}; it must be a positive integer."
        )
    dtype = _stored_dtype(config["architecture"], path)
    base = _base_skeleton(config["architecture"], model, path)  # not changed yet

    # 1. every tensor there, with the shape and dtype the architecture gives
    base_expected = {
        BASE_PREFIX + k: torch.empty(v.shape, dtype=dtype if v.is_floating_point() else v.dtype, device="meta")
        for k, v in base.state_dict().items()
    }
    layer_names = [e["config"]["layer"] for e in config["layers"]]
    pure_names = (*PureLayer.TENSOR_KEYS, MERGE_KEY)
    pure_expected = {f"{PURE_PREFIX}{layer}.{n}": torch.empty(0) for layer in layer_names for n in pure_names}
    _check_tensors(path, {**base_expected, **pure_expected}, found, check_shape=False)
    _check_tensors(path, base_expected, {k: found[k] for k in base_expected}, check_shape=True)
    # 2. every value what it may be, every config value consistent with the model and the tensors
    _check_base_values(path, {k: found[k] for k in base_expected})
    layers = []
    for entry, layer in zip(config["layers"], layer_names):
        tensors = {n: found[f"{PURE_PREFIX}{layer}.{n}"] for n in pure_names}
        layers.append(_build_layer(path, entry, tensors, dtype))
    kwargs = {"max_memory": max_memory} if max_memory is not None else {}
    try:
        pm = PurifiedModel(base, layers, **kwargs)  # reads the structure only
    except (LayerError, ConfigError) as e:
        raise FileFormatError(
            f"the purified layers in {str(path)!r} do not fit the base model: {e}"
        ) from None
    _check_skip_aware(path, pm)
    pm.reference_data = validate_record(config.get("reference_data"), repr(str(path)))
    # 3. the contents are what was saved
    if verify:
        _verify_hashes(path, metadata, found)
    # only now write into the base model
    with torch.no_grad():
        if model is not None:
            base.to(dtype)
        base.load_state_dict({k[len(BASE_PREFIX):]: found[k] for k in base_expected}, strict=True)
    pm._owns_base = model is None
    return pm.to(target) if target is not None else pm
