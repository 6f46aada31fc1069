"""The architecture record of a base model: what :func:`describe_architecture` writes into a file
(torchvision builder name or timm model name and arguments, block layout, stem, input channels,
classes, a structural fingerprint) and what :func:`build_base_model` rebuilds from it, never
downloading weights (timm is imported only for a timm record).

Example:
    >>> import torchvision
    >>> arch = describe_architecture(torchvision.models.resnet18(num_classes=3))
    >>> arch["builder"], arch["num_classes"]
    ('resnet18', 3)
    >>> type(build_base_model(arch)).__name__
    'ResNet'
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn
from torchvision.models.resnet import BasicBlock, Bottleneck, ResNet
from torchvision.ops.misc import FrozenBatchNorm2d

from purenn.arch import ResNetSpec, input_conv
from purenn.errors import FileFormatError

_STAGES = ("layer1", "layer2", "layer3", "layer4")

__all__ = ["describe_architecture", "build_base_model"]


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


