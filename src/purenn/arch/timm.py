"""Recognising timm ResNets: :class:`timm.models.resnet.ResNet` with timm's ``BasicBlock`` and
``Bottleneck`` (resnet18-200, the ``c``/``d``/``s``/``t`` deep stems and average-pool downsamples,
ResNeXt and wide variants, SE and ECA attention: ``seresnet*``, ``seresnext*``, ``ecaresnet*``,
``resnetrs*``, ``senet154``).

In eval mode drop path and DropBlock are identities, and so is an anti-aliasing slot left empty
(``nn.Identity``); purenn replays them as such. Anything else in a block (another activation or
normalisation, another attention such as CBAM or a gather-excite, an anti-aliasing pool as in
``resnetaa*``/``resnetblur*``) or a forward that is not timm's own is refused by name before any
work. timm is never imported here unless the model's class comes from it.

Example:
    >>> import timm                                                      # doctest: +SKIP
    >>> from purenn.arch import ResNetSpec                               # doctest: +SKIP
    >>> spec = ResNetSpec(timm.create_model("seresnet50", pretrained=False))   # doctest: +SKIP
    >>> type(spec.blocks[0].attn).__name__                                # doctest: +SKIP
    'SqueezeExcite'
"""

from __future__ import annotations

import sys
from typing import Any

from torch import Tensor, nn

from purenn.arch.attention import AvgPoolDown, EfficientChannelAttention, SqueezeExcite
from purenn.arch.core import STAGES, Block, ConvBN, check_bn, check_conv, main_path, run_eval
from purenn.errors import UnsupportedModelError

__all__ = ["TIMM", "TimmFamily", "is_timm_resnet"]

_SUPPORTED = ("timm's ResNet family (resnet*, resnet*d/t/s/c, resnext*, wide_resnet*, seresnet*, seresnext*, "
              "ecaresnet*, resnetrs*, senet154) with its BasicBlock/Bottleneck blocks")


def _resnet_module() -> Any:
    import timm.models.resnet  # the model's class comes from timm, so it is imported already

    return timm.models.resnet


def is_timm_resnet(model: Any) -> bool:
    """True when ``model`` is a :class:`timm.models.resnet.ResNet` (never imports timm itself)."""
    module = sys.modules.get("timm.models.resnet")
    return module is not None and isinstance(model, module.ResNet)


def _is(obj: Any, module: str, name: str) -> bool:
    """``obj`` is an instance of the timm class ``module.name`` (by its class, no subclass)."""
    return type(obj).__name__ == name and type(obj).__module__ == module


def _is_sigmoid(m: Any) -> bool:
    return type(m) is nn.Sigmoid or _is(m, "timm.layers.activations", "Sigmoid")


def _is_relu(m: Any) -> bool:
    return type(m) is nn.ReLU


def _eval_identity(m: Any) -> bool:
    """Modules that are identities in eval mode: nothing, nn.Identity, DropPath, DropBlock2d."""
    return m is None or type(m) is nn.Identity or _is(m, "timm.layers.drop", "DropPath") or _is(
        m, "timm.layers.drop", "DropBlock2d")


def _attention(name: str, m: Any) -> SqueezeExcite | EfficientChannelAttention | None:
    if m is None:
        return None
    where = f"{name}.se"
    if _is(m, "timm.layers.squeeze_excite", "SEModule"):
        ok = (not m.add_maxpool and type(m.bn) is nn.Identity and _is_relu(m.act) and _is_sigmoid(m.gate)
              and isinstance(m.fc1, nn.Conv2d) and isinstance(m.fc2, nn.Conv2d)
              and m.fc1.kernel_size == (1, 1) and m.fc2.kernel_size == (1, 1) and m.fc1.groups == 1
              and m.fc2.groups == 1)
        if not ok:
            raise UnsupportedModelError(
                f"{where} is an SEModule with a configuration purenn does not support (it needs mean pooling "
                "only, no norm, a ReLU and a sigmoid gate)."
            )
        return SqueezeExcite(m.fc1, m.act, m.fc2, m.gate)
    if _is(m, "timm.layers.eca", "EcaModule"):
        c = m.conv
        ok = (m.conv2 is None and _is_sigmoid(m.gate) and isinstance(c, nn.Conv1d) and c.bias is None
              and c.in_channels == c.out_channels == 1 and c.stride == (1,) and c.dilation == (1,)
              and c.groups == 1 and c.padding_mode == "zeros" and not isinstance(c.padding, str)
              and c.padding[0] <= c.kernel_size[0] - 1)
        if not ok:
            raise UnsupportedModelError(
                f"{where} is an EcaModule with a configuration purenn does not support (it needs one "
                "zero-padded 1-D convolution without bias or MLP, and a sigmoid gate)."
            )
        return EfficientChannelAttention(c, m.gate)
    raise UnsupportedModelError(
        f"{where} is a {type(m).__name__}; purenn supports the channel attentions SEModule and EcaModule "
        "of timm in ResNet blocks."
    )


def _downsample(name: str, down: Any) -> tuple[ConvBN | None, AvgPoolDown | None]:
    if down is None:
        return None, None
    where = f"{name}.downsample"
    if not (type(down) is nn.Sequential and len(down) in (2, 3)):
        raise UnsupportedModelError(
            f"{where} is a {type(down).__name__}; purenn supports timm's downsample paths "
            "nn.Sequential(conv, BatchNorm2d) and nn.Sequential(AvgPool2d, conv1x1, BatchNorm2d)."
        )
    pool = None
    if len(down) == 3:
        p = down[0]
        if type(p) is nn.AvgPool2d:
            k = (p.kernel_size, p.kernel_size) if isinstance(p.kernel_size, int) else tuple(p.kernel_size)
            s = (p.stride, p.stride) if isinstance(p.stride, int) else tuple(p.stride)
            pad = (p.padding, p.padding) if isinstance(p.padding, int) else tuple(p.padding)
            if k != s or pad != (0, 0) or p.divisor_override is not None:
                raise UnsupportedModelError(
                    f"{where}.0 is an AvgPool2d with kernel {k}, stride {s}, padding {pad}; purenn supports "
                    "non-overlapping average pooling without padding (kernel = stride) in a downsample."
                )
            pool = AvgPoolDown(p)
        elif type(p) is not nn.Identity:
            raise UnsupportedModelError(
                f"{where}.0 is a {type(p).__name__}; purenn supports nn.AvgPool2d (or nn.Identity) in front of "
                "a downsample convolution."
            )
    conv, bn = down[-2], down[-1]
    check_conv(conv, f"{where}.{len(down) - 2}")
    check_bn(bn, f"{where}.{len(down) - 1}")
    if pool is not None and conv.stride != (1, 1):
        raise UnsupportedModelError(f"{where}: a strided convolution after the average pooling is not supported.")
    return ConvBN(conv, bn), pool


_STEM_TYPES = (nn.Conv2d, nn.BatchNorm2d, nn.ReLU, nn.MaxPool2d, nn.AvgPool2d, nn.Identity)


def _check_stem(model: nn.Module) -> None:
    for part in ("conv1", "bn1", "act1", "maxpool"):
        m = getattr(model, part, None)
        mods = [(f"{part}.{n}" if n else part, c) for n, c in m.named_modules()] if isinstance(m, nn.Module) else []
        if not mods:
            raise UnsupportedModelError(f"{type(model).__name__} has no module {part!r}; it is not a timm ResNet.")
        for where, c in mods:
            if type(c) is nn.Sequential:
                continue
            if type(c) not in _STEM_TYPES:
                raise UnsupportedModelError(
                    f"the stem module {where} is a {type(c).__name__}; purenn supports convolutions, BatchNorm, "
                    "ReLU and pooling in a timm ResNet's stem."
                )
            if isinstance(c, nn.BatchNorm2d):
                check_bn(c, where)


class TimmFamily:
    """Block recognition, stem and head of timm's ResNet."""

    name = "timm"

    def check_model(self, model: nn.Module) -> None:
        if not is_timm_resnet(model):
            raise UnsupportedModelError(
                f"{type(model).__name__} (from {type(model).__module__}) is not a timm ResNet; purenn supports "
                f"{_SUPPORTED} and torchvision's ResNet."
            )
        r = _resnet_module()
        for method in ("forward", "forward_features", "forward_head"):
            if getattr(type(model), method) is not getattr(r.ResNet, method):
                raise UnsupportedModelError(
                    f"{type(model).__name__}.{method} is not timm's ResNet.{method} (a customised forward); "
                    "purenn can only rewrite the standard forward pass."
                )
        _check_stem(model)
        pool = getattr(model, "global_pool", None)
        if not _is(pool, "timm.layers.adaptive_avgmax_pool", "SelectAdaptivePool2d"):
            raise UnsupportedModelError(
                f"{type(model).__name__}.global_pool is a {type(pool).__name__}; purenn supports timm's "
                "SelectAdaptivePool2d head."
            )
        if not isinstance(getattr(model, "fc", None), (nn.Linear, nn.Identity)):
            raise UnsupportedModelError(
                f"{type(model).__name__}.fc is a {type(model.fc).__name__}; purenn supports an nn.Linear "
                "classifier (or nn.Identity)."
            )
        for stage in STAGES:
            if not isinstance(getattr(model, stage, None), nn.Sequential):
                raise UnsupportedModelError(f"model.{stage} must be a non-empty nn.Sequential of residual blocks.")

    def parse_block(self, name: str, module: nn.Module) -> Block:
        r = _resnet_module()
        if type(module) is r.Bottleneck or (isinstance(module, r.Bottleneck)
                                           and type(module).forward is r.Bottleneck.forward):
            pairs, acts = (("conv1", "bn1"), ("conv2", "bn2"), ("conv3", "bn3")), ("act1", "act2", "act3")
        elif type(module) is r.BasicBlock or (isinstance(module, r.BasicBlock)
                                             and type(module).forward is r.BasicBlock.forward):
            pairs, acts = (("conv1", "bn1"), ("conv2", "bn2")), ("act1", "act2")
        elif isinstance(module, (r.BasicBlock, r.Bottleneck)):
            raise UnsupportedModelError(
                f"block {name} is a {type(module).__name__} with its own forward (a customised forward); purenn "
                "can only rewrite timm's BasicBlock and Bottleneck forward."
            )
        else:
            raise UnsupportedModelError(
                f"block {name} is a {type(module).__name__}; purenn supports timm's BasicBlock and Bottleneck "
                "residual blocks."
            )
        main = main_path(module, name, pairs)
        for act in acts:
            m = getattr(module, act, None)
            if not _is_relu(m):
                raise UnsupportedModelError(
                    f"{name}.{act} is a {type(m).__name__}; purenn supports nn.ReLU activations only."
                )
        for part in ("drop_block", "drop_path"):
            m = getattr(module, part, None)
            if not _eval_identity(m):
                raise UnsupportedModelError(
                    f"{name}.{part} is a {type(m).__name__}; purenn supports timm's DropPath and DropBlock2d "
                    "(identities in eval mode) there."
                )
        aa = getattr(module, "aa", None)
        if aa is not None and type(aa) is not nn.Identity:
            raise UnsupportedModelError(
                f"{name}.aa is a {type(aa).__name__} (anti-aliasing); purenn supports timm ResNets without "
                "anti-aliasing layers (not resnetaa*/resnetblur*)."
            )
        ds, pool = _downsample(name, getattr(module, "downsample", None))
        block = Block(name, module, main, ds, _attention(name, getattr(module, "se", None)), pool)
        if ds is None and block.in_channels != block.out_channels:
            raise UnsupportedModelError(f"block {name} changes channels without a downsample path.")
        return block

    def stem(self, model: nn.Module, x: Tensor) -> Tensor:
        return run_eval(model.maxpool, model.act1(run_eval(model.bn1, run_eval(model.conv1, x))))

    def head(self, model: nn.Module, h: Tensor) -> Tensor:
        return model.fc(model.global_pool(h))  # timm's dropout before fc is an identity in eval mode


TIMM = TimmFamily()
