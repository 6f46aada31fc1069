"""Inputs of the ``purenn`` command: torchvision and timm ResNet checkpoints and image data.

:func:`load_checkpoint_model` builds a torchvision ResNet from a checkpoint (``.pt``/``.pth``
loaded with ``weights_only=True``, or ``.safetensors``), reading the number of classes, the input
channels and an adapted small-image stem from the weights and refusing a checkpoint of another
architecture with a message that says which one it holds; :func:`timm_model` does the same for a
timm model name (``timm:resnet50.a1_in1k``) or loads timm's pretrained weights. :func:`load_data` reads an image folder
(torchvision ``ImageFolder``) or Fashion-MNIST's IDX files into a dataset with stable indices and
its labels.

Example:
    >>> from purenn.cli.loaders import load_checkpoint_model, load_data
    >>> model = load_checkpoint_model("resnet18", "weights.pt")             # doctest: +SKIP
    >>> data = load_data(folder="images/", image_size=64)                   # doctest: +SKIP
    >>> pm = purenn.purify_model(model, ["layer4"], data.dataset)          # doctest: +SKIP
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from purenn.common.choices import ARCH_KEY
from purenn.errors import DataError, PurennError, UnsupportedModelError

__all__ = ["InputError", "ARCHITECTURES", "ARCH_KEY", "TIMM_PREFIX", "load_checkpoint_model", "save_checkpoint",
           "torchvision_model", "timm_model", "check_timm_name", "LoadedData", "load_data"]

#: torchvision builder -> (block, blocks per stage, groups, width per group)
ARCHITECTURES = {
    "resnet18": ("BasicBlock", (2, 2, 2, 2), 1, 64),
    "resnet34": ("BasicBlock", (3, 4, 6, 3), 1, 64),
    "resnet50": ("Bottleneck", (3, 4, 6, 3), 1, 64),
    "resnet101": ("Bottleneck", (3, 4, 23, 3), 1, 64),
    "resnet152": ("Bottleneck", (3, 8, 36, 3), 1, 64),
    "wide_resnet50_2": ("Bottleneck", (3, 4, 6, 3), 1, 128),
    "wide_resnet101_2": ("Bottleneck", (3, 4, 23, 3), 1, 128),
    "resnext50_32x4d": ("Bottleneck", (3, 4, 6, 3), 32, 4),
    "resnext101_32x8d": ("Bottleneck", (3, 4, 23, 3), 32, 8),
    "resnext101_64x4d": ("Bottleneck", (3, 4, 23, 3), 64, 4),
}
#: prefix of a timm model name on the command line: ``timm:resnet50.a1_in1k``
TIMM_PREFIX = "timm:"
_IMAGENET_STATS = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


class InputError(PurennError, ValueError):
    """A checkpoint, data folder or output path that cannot be used; the message says how to fix it."""


def save_checkpoint(model: Any, path: str | os.PathLike) -> Path:
    """Save ``model``'s weights with its architecture, so that ``purenn purify`` rebuilds it exactly.

    ``.safetensors``: the ``state_dict`` with the architecture in the metadata entry
    ``"purenn_architecture"``; ``.pt``/``.pth``: ``{"state_dict": ..., "purenn_architecture": json}``
    (loadable with ``torch.load(..., weights_only=True)``).

    Example:
        >>> save_checkpoint(model, "model.safetensors")                 # doctest: +SKIP
    """
    import json

    import torch
    from safetensors.torch import save_file

    from purenn.io.architecture import describe_architecture
    from purenn.io.files import atomic_write

    path = Path(path)
    if path.suffix not in (".safetensors", ".pt", ".pth"):
        raise InputError(f"checkpoint {str(path)!r} must end in .safetensors, .pt or .pth.")
    arch = json.dumps(describe_architecture(model), separators=(",", ":"))
    state = {k: v.detach().to("cpu", copy=True).contiguous() for k, v in model.state_dict().items()}
    with atomic_write(path, "checkpoint") as tmp:  # complete or absent, never half-written
        if path.suffix == ".safetensors":
            save_file(state, str(tmp), metadata={"format": "pt", ARCH_KEY: arch})
        else:
            torch.save({"state_dict": state, ARCH_KEY: arch}, str(tmp))
    return path


def _parse_arch(text: Any, path: Path) -> dict[str, Any] | None:
    import json

    if text is None:
        return None
    try:
        arch = json.loads(text) if isinstance(text, str) else None
    except json.JSONDecodeError:
        arch = None
    if not isinstance(arch, dict) or not isinstance(arch.get("stem"), dict):
        raise InputError(f"{str(path)!r} has a malformed {ARCH_KEY!r} entry; save it again with "
                         "purenn.cli.loaders.save_checkpoint(model, path).")
    return arch


def _read_checkpoint(path: Path) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """The ``state_dict`` of a checkpoint and the architecture it records (None when it records none)."""
    import torch

    arch_text = None

    if not path.is_file():
        what = " (it is a directory)." if path.is_dir() else "."
        raise InputError(f"checkpoint {str(path)!r} does not exist{what}")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError, safe_open
        from safetensors.torch import load_file

        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
            if "purenn" in meta:
                raise InputError(
                    f"{str(path)!r} is a purified purenn model, not a plain checkpoint; pass it as the model "
                    f"argument: purenn purify {path} --data ..."
                )
            state = load_file(str(path))
            arch_text = meta.get(ARCH_KEY)
        except SafetensorError as e:
            raise InputError(f"{str(path)!r} is not a readable safetensors file: {e}.") from None
    else:
        try:
            state = torch.load(str(path), map_location="cpu", weights_only=True)
        except Exception as e:  # UnpicklingError, zip errors, RuntimeError("invalid load key") ...
            with open(path, "rb") as f:
                head = f.read(4)
            if head[:2] == b"PK" or head[:1] == b"\x80":  # a torch.save zip or a pickle that holds more than tensors
                raise InputError(
                    f"{str(path)!r} pickles more than tensors, so it cannot be loaded safely (weights_only=True). "
                    "Save the weights only: torch.save(model.state_dict(), 'model.pt'), or use a .safetensors file."
                ) from None
            first = (str(e).strip().splitlines() or [""])[0]  # torch's messages run over many lines
            raise InputError(f"{str(path)!r} is not a PyTorch checkpoint ({type(e).__name__}: {first}).") from None
    if isinstance(state, dict):
        arch_text = state.pop(ARCH_KEY, arch_text) if isinstance(state.get(ARCH_KEY), str) else arch_text
        for key in ("state_dict", "model_state_dict", "model", "net", "weights"):
            if isinstance(state.get(key), dict):
                state = state[key]
                break
    if not isinstance(state, dict) or not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise InputError(
            f"{str(path)!r} does not hold a state_dict (a dict of tensor names to tensors); "
            "save one with torch.save(model.state_dict(), path)."
        )
    if all(k.startswith("module.") for k in state):  # saved from DataParallel / DDP
        state = {k[len("module."):]: v for k, v in state.items()}
    return state, _parse_arch(arch_text, path)


def _checkpoint_layout(state: dict[str, Any], path: Path) -> tuple[str, tuple[int, ...], int, int]:
    """(block, blocks per stage, groups, width per group) of a ResNet state_dict."""
    counts = []
    for stage in range(1, 5):
        ids = [int(m.group(1)) for k in state if (m := re.match(rf"layer{stage}\.(\d+)\.", k))]
        counts.append(max(ids) + 1 if ids else 0)
    needed = ("conv1.weight", "fc.weight", "layer1.0.conv1.weight", "layer1.0.conv2.weight")
    if not all(counts) or any(k not in state for k in needed):
        shown = ", ".join(sorted(state)[:6])
        raise InputError(
            f"{str(path)!r} is not the state_dict of a torchvision ResNet (expected conv1, layer1..layer4 and fc; "
            f"found keys such as {shown})."
        )
    if "layer1.0.conv3.weight" in state:
        width = int(state["layer1.0.conv1.weight"].shape[0])
        groups = max(1, width // int(state["layer1.0.conv2.weight"].shape[1]))
        return "Bottleneck", tuple(counts), groups, width // groups
    return "BasicBlock", tuple(counts), 1, 64


def _describe_layout(layout: tuple[str, tuple[int, ...], int, int]) -> str:
    name = next((n for n, spec in ARCHITECTURES.items() if spec == layout), None)
    block, counts, groups, width = layout
    text = f"{block} ResNet with blocks {list(counts)}, groups {groups}, width per group {width}"
    return f"{text} (a {name})" if name else text


def _load_weights(model: Any, state: dict[str, Any], stem: Any, path: Path, what: str) -> Any:
    """Load ``state`` strictly into ``model`` (an :class:`InputError` naming ``what`` when it does not
    fit) and return the model in eval mode, in the dtype of its stem weight ``stem`` (float32 for others)."""
    import torch

    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        lines = [ln.strip() for ln in str(e).splitlines()[1:4] if ln.strip()]
        raise InputError(f"{str(path)!r} does not fit {what}: {' '.join(lines)[:600]}") from None
    return model.to(stem.dtype if stem.is_floating_point() else torch.float32).eval()


def load_checkpoint_model(
    arch: str, checkpoint: str | os.PathLike, *, blocks: Sequence[int] | None = None, stem_stride: int | None = None
) -> Any:
    """A torchvision ResNet ``arch`` with the weights of ``checkpoint`` (``.pt``/``.pth`` loaded with
    ``weights_only=True``, or ``.safetensors``), in eval mode.

    ``num_classes``, the input channels and the stem are read from the checkpoint. A checkpoint that
    records its architecture (written by :func:`save_checkpoint` or by purenn's training helpers) is
    rebuilt exactly from that record. Otherwise a ``conv1`` kernel other than 7x7 means an adapted
    small-image stem (that kernel, no max-pool) whose stride the weights do not tell: ``stem_stride``
    (1 or 2) must say it. ``blocks`` overrides the blocks per stage of ``arch`` for a custom depth.

    Raises:
        InputError: the file is missing or unreadable, holds another architecture (the message
            says which one it holds), has an adapted stem but no recorded architecture and no
            ``stem_stride``, or records a stem stride other than ``stem_stride``.

    Example:
        >>> model = load_checkpoint_model("resnet18", "weights.pt")          # doctest: +SKIP
    """
    import torchvision
    from torch import nn

    if arch not in ARCHITECTURES:
        raise InputError(f"unknown architecture {arch!r}; purenn supports the torchvision ResNets: "
                         f"{', '.join(ARCHITECTURES)}.")
    if blocks is not None and (len(blocks) != 4 or not all(isinstance(b, int) and b >= 1 for b in blocks)):
        raise InputError(f"blocks must be four positive integers (blocks per stage), got {blocks!r}.")
    if stem_stride not in (None, 1, 2):
        raise InputError(f"stem_stride must be 1 or 2, got {stem_stride!r}.")
    path = Path(checkpoint)
    state, recorded = _read_checkpoint(path)
    found = _checkpoint_layout(state, path)
    block, counts, groups, width = ARCHITECTURES[arch]
    wanted = (block, tuple(blocks) if blocks is not None else counts, groups, width)
    if found != wanted:
        hint = ""
        if found[0] == block and found[2:] == (groups, width) and blocks is None:
            text = ",".join(map(str, found[1]))
            hint = f" For a custom depth pass blocks={list(found[1])} (purenn purify --blocks {text})."
        raise InputError(
            f"wrong architecture: {str(path)!r} holds a {_describe_layout(found)}, not a {_describe_layout(wanted)}."
            + hint
        )
    fc, conv1 = state["fc.weight"], state["conv1.weight"]
    out_ch, in_ch, kh, kw = (int(s) for s in conv1.shape)
    if recorded is not None:
        return _rebuild_recorded(recorded, state, path, stem_stride)
    if (kh, kw) != (7, 7) and stem_stride is None:
        raise InputError(
            f"{str(path)!r} has an adapted {kh}x{kw} stem convolution, and its weights do not say its stride: pass "
            "--stem-stride 1 or --stem-stride 2 (stem_stride=), the stride the model was trained with. A wrong "
            "stride gives a model with the same weights that computes something else. (Checkpoints saved with "
            "purenn.cli.loaders.save_checkpoint record it.)"
        )
    block_cls = getattr(torchvision.models.resnet, block)
    model = torchvision.models.ResNet(block_cls, list(wanted[1]), num_classes=int(fc.shape[0]), groups=groups,
                                      width_per_group=width)
    if (kh, kw) != (7, 7) or in_ch != 3:
        stride = 2 if (kh, kw) == (7, 7) else int(stem_stride)
        model.conv1 = nn.Conv2d(in_ch, out_ch, (kh, kw), stride, (kh // 2, kw // 2), bias="conv1.bias" in state)
        if (kh, kw) != (7, 7):
            model.maxpool = nn.Identity()
    return _load_weights(model, state, conv1, path, str(arch))


def _rebuild_recorded(recorded: dict[str, Any], state: dict[str, Any], path: Path, stem_stride: int | None) -> Any:
    """The model a checkpoint's recorded architecture describes, with its weights."""

    from purenn.errors import FileFormatError
    from purenn.io.architecture import build_base_model

    stride = (recorded["stem"].get("stride") or [None])[0]
    if stem_stride is not None and stride != stem_stride:
        raise InputError(f"{str(path)!r} records a stem stride of {stride}; --stem-stride {stem_stride} "
                         "(stem_stride=) contradicts it: leave the option out.")
    try:
        model = build_base_model(recorded)
    except FileFormatError as e:
        raise InputError(f"{str(path)!r}: {e}") from None
    return _load_weights(model, state, state["conv1.weight"], path, "the architecture it records")


def torchvision_model(arch: str, weights: str) -> Any:
    """A torchvision ResNet with torchvision's pretrained ``weights`` (e.g. ``"DEFAULT"``), in eval mode.

    Downloads the weights unless torchvision's cache holds them.

    Example:
        >>> model = torchvision_model("resnet50", "IMAGENET1K_V2")          # doctest: +SKIP
    """
    import torchvision

    if arch not in ARCHITECTURES:
        raise InputError(f"unknown architecture {arch!r}; use one of {', '.join(ARCHITECTURES)}.")
    try:
        return torchvision.models.get_model(arch, weights=weights).eval()
    except (ValueError, KeyError) as e:
        raise InputError(f"torchvision has no weights {weights!r} for {arch} ({e}); try DEFAULT.") from None
    except OSError as e:  # no network, no cache
        raise InputError(
            f"could not download the {arch} weights {weights!r} ({e}); use a local checkpoint instead."
        ) from None


def check_timm_name(name: str) -> str:
    """``name`` without a ``timm:`` prefix, if it names a model of timm's ResNet family (an optional
    pretrained tag after a dot), else an :class:`InputError`.

    Example:
        >>> check_timm_name("timm:resnet50.a1_in1k")                         # doctest: +SKIP
        'resnet50.a1_in1k'
    """
    import timm

    if name.startswith(TIMM_PREFIX):
        name = name[len(TIMM_PREFIX):]
    arch = name.partition(".")[0]
    resnets = timm.list_models(module="resnet")
    if not name or arch not in resnets:
        close = [n for n in resnets if arch and arch[:5] in n][:6]
        similar = f" (similar: {', '.join(close)})" if close else ""
        raise InputError(
            f"{name!r} is not a ResNet of timm {timm.__version__}{similar}; purenn supports timm's ResNet family, "
            "see timm.list_models(module='resnet')."
        )
    return name


def timm_model(name: str, *, checkpoint: str | os.PathLike | None = None, pretrained: bool = False) -> Any:
    """A timm ResNet ``name`` (``"resnet50"``, ``"seresnet50.a1_in1k"``; a ``timm:`` prefix is
    dropped) in eval mode, with the weights of ``checkpoint`` (classes and input channels read
    from it) or, with ``pretrained=True``, timm's pretrained weights (downloaded unless timm's cache
    holds them).

    Raises:
        ModuleNotFoundError: timm is not installed (``pip install "purenn[timm]"``).
        InputError: an unknown or non-ResNet timm model, a checkpoint that does not fit it, or
            pretrained weights that cannot be fetched.

    Example:
        >>> model = timm_model("timm:resnet50.a1_in1k", checkpoint="weights.pth")   # doctest: +SKIP
    """
    import timm

    name = check_timm_name(name)
    if (checkpoint is None) == (not pretrained):
        raise InputError(f"timm:{name} needs exactly one source of weights: a checkpoint or pretrained=True.")
    if pretrained:
        try:
            return timm.create_model(name, pretrained=True).eval()
        except RuntimeError as e:  # unknown pretrained tag
            raise InputError(f"timm has no pretrained weights {name!r} ({e}).") from None
        except Exception as e:  # no network, no cache: OSError, huggingface_hub and urllib errors
            raise InputError(
                f"could not fetch timm's pretrained weights for {name!r} ({type(e).__name__}: {e}); this machine "
                "may not reach the Hugging Face Hub: use a local checkpoint (--checkpoint) instead."
            ) from None
    path = Path(checkpoint)
    state, _ = _read_checkpoint(path)
    stem = next((state[k] for k in ("conv1.weight", "conv1.0.weight") if k in state), None)
    fc = state.get("fc.weight")
    if stem is None or stem.ndim != 4 or not any(k.startswith("layer4.") for k in state):
        shown = ", ".join(sorted(state)[:6])
        raise InputError(f"{str(path)!r} is not the state_dict of a timm ResNet (found keys such as {shown}).")
    kwargs = {"num_classes": int(fc.shape[0]) if fc is not None else 0, "in_chans": int(stem.shape[1])}
    try:
        model = timm.create_model(name, pretrained=False, **kwargs)
    except RuntimeError as e:
        raise InputError(f"timm cannot build {name!r} ({e}).") from None
    return _load_weights(model, state, stem, path, f"timm's {name}")


@dataclass
class LoadedData:
    """A dataset ready for purenn, its integer labels, class names and a description."""

    dataset: Any
    labels: np.ndarray
    class_names: list[str]
    description: str
    coarse: np.ndarray | None = None
    coarse_names: list[str] | None = None


class _CheckedFolder:
    """ImageFolder items with unreadable files reported as a DataError that names the file."""

    def __init__(self, folder: Any, indices: np.ndarray) -> None:
        self.folder, self.indices = folder, indices

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> Any:
        j = int(self.indices[i])
        try:
            return self.folder[j]
        except Exception as e:
            raise DataError(f"cannot read image {self.folder.samples[j][0]!r}: {e}") from None


def _evenly(n: int, limit: int | None) -> np.ndarray:
    if limit is None or limit >= n:
        return np.arange(n)
    return np.unique(np.linspace(0, n - 1, limit).round().astype(np.int64))


def load_data(
    *,
    folder: str | None = None,
    fashion_mnist: str | None = None,
    split: str = "train",
    in_channels: int = 3,
    image_size: int | None = None,
    limit: int | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
) -> LoadedData:
    """Load an image folder (torchvision ImageFolder: one sub-folder per class) or Fashion-MNIST IDX files.

    Args:
        folder: the image folder.
        fashion_mnist: the directory of Fashion-MNIST's IDX files, ``""`` for the default search
            (``$PURENN_FASHION_MNIST``, the Debian package ``dataset-fashion-mnist``).
        split: Fashion-MNIST split, ``"train"`` or ``"test"``.
        in_channels: input channels of the model (images are converted to match).
        image_size: side of the (square, centre-cropped) images; default 224 for a folder, 28 for
            Fashion-MNIST.
        limit: keep this many samples (evenly spaced over a folder, the first ones of Fashion-MNIST);
            the same options always give the same samples in the same order.
        mean: per-channel normalisation mean of a folder (default ImageNet's).
        std: per-channel normalisation standard deviation of a folder (default ImageNet's).

    Example:
        >>> data = load_data(folder="images/", image_size=64)             # doctest: +SKIP
        >>> len(data.dataset), data.class_names                            # doctest: +SKIP
        (120, ['cat', 'dog'])
    """
    if (folder is None) == (fashion_mnist is None):
        raise InputError("give exactly one data source: an image folder (--data DIR) or Fashion-MNIST "
                         "(--fashion-mnist [DIR]).")
    if limit is not None and limit < 1:
        raise InputError(f"limit must be a positive number of samples, got {limit}.")
    if in_channels not in (1, 3):
        raise UnsupportedModelError(f"models with {in_channels} input channels need your own data loading (API).")
    if folder is not None:
        return _load_folder(Path(folder), in_channels, image_size or 224, limit, mean, std)
    return _load_fashion(fashion_mnist or None, split, in_channels, image_size, limit)


def _to_rgb(image: Any) -> Any:
    return image.convert("RGB")


def _load_folder(root: Path, in_channels: int, size: int, limit: int | None, mean: Any, std: Any) -> LoadedData:
    import torchvision
    from torchvision import transforms

    if not root.exists():
        raise InputError(f"data folder {str(root)!r} does not exist.")
    if not root.is_dir():
        raise InputError(f"data folder {str(root)!r} is a file; it must be a folder with one sub-folder per class "
                         "(root/cat/001.jpg, root/dog/002.png, ...). For Fashion-MNIST IDX files use --fashion-mnist "
                         "DIR.")
    if mean is None or std is None:
        m, s = _IMAGENET_STATS
        mean, std = (m, s) if in_channels == 3 else ((sum(m) / 3,), (sum(s) / 3,))
    if len(mean) != in_channels or len(std) != in_channels:
        raise InputError(f"mean and std need {in_channels} value(s) each, one per input channel.")
    steps = [transforms.Grayscale(1)] if in_channels == 1 else [transforms.Lambda(_to_rgb)]
    steps += [transforms.Resize(size), transforms.CenterCrop(size), transforms.ToTensor(),
              transforms.Normalize(list(mean), list(std))]
    try:
        ds = torchvision.datasets.ImageFolder(str(root), transform=transforms.Compose(steps))
    except (FileNotFoundError, OSError) as e:
        raise InputError(
            f"cannot read the image folder {str(root)!r}: {str(e).rstrip('.')}. It needs one sub-folder per class "
            "holding images (.jpg, .png, ...), e.g. root/cat/001.jpg."
        ) from None
    idx = _evenly(len(ds), limit)
    labels = np.asarray(ds.targets)[idx]
    desc = f"image folder {str(root)!r}: {len(idx)} of {len(ds)} images, {len(ds.classes)} classes, {size}x{size}"
    return LoadedData(_CheckedFolder(ds, idx), labels, list(ds.classes), desc)


def _load_fashion(root: str | None, split: str, in_channels: int, size: int | None, limit: int | None) -> LoadedData:
    import torch.nn.functional as F

    from purenn.cli.datasets import ConceptDataset, fashion_mnist

    if root is not None and not Path(root).is_dir():
        raise InputError(f"Fashion-MNIST directory {root!r} does not exist; it must hold "
                         "train-images-idx3-ubyte[.gz] and the other three IDX files.")
    ds = fashion_mnist(split, root=root, limit=limit)
    x = ds.images
    if in_channels == 3:
        x = x.expand(-1, 3, -1, -1)
    if size is not None and size != x.shape[-1]:
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    x = x.contiguous()
    out = ConceptDataset(x, ds.fine, pairs=ds.pairs, class_names=ds.class_names, source=ds.source)
    desc = f"Fashion-MNIST {split}: {len(out)} images, {tuple(x.shape[1:])}"
    return LoadedData(out, ds.fine.numpy(), list(ds.class_names), desc, out.coarse.numpy(), out.superclass_names())
