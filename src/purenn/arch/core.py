"""The family-neutral description of a ResNet (the replay itself is :mod:`purenn.arch.spec`).

purenn never edits the model it is given. :class:`~purenn.arch.spec.ResNetSpec` reads the structure of a ResNet
through the recogniser of its model family (:mod:`purenn.arch.torchvision` for torchvision's
:class:`~torchvision.models.ResNet`, :mod:`purenn.arch.timm` for timm's
:class:`timm.models.resnet.ResNet`), which turns every residual block into the same description
(:class:`Block`: conv/BatchNorm pairs, an optional channel attention, an identity or downsample
path, optionally average-pooled). It then replays the forward pass block by block with the model's
own modules, so every activation is bit-identical to ``model(x)`` in eval mode. The replay always
runs BatchNorm in inference form (with its running statistics), whatever mode the caller's model is
in, and never updates those statistics. While replaying, it can record the activations after each
ReLU of a block and the state of its attention: what the explicit backward pass in
:mod:`purenn.attribution.relevance` needs. Relevance, gating and export never ask which family a block came from.

Layer positions: position 0 is the stem output (module ``maxpool``, alias ``stem``); position
``j >= 1`` is the output of the ``j``-th residual block counted over all stages. A stage name
(``layer3``) denotes the output of its last block, a block name (``layer3.1``) that block's output.

Example:
    >>> import torchvision
    >>> spec = ResNetSpec(torchvision.models.resnet18())
    >>> spec.position("layer4"), spec.position("layer4.0"), spec.default_upstream("layer4")
    (8, 7, 'layer3')
"""

from __future__ import annotations

import copy
import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from purenn.errors import UnsupportedModelError

__all__ = [
    "ConvBN",
    "Block",
    "BlockRecord",

    "STEM_NAMES",
    "STAGES",
    "batch_norm_eval",
    "run_eval",
    "input_conv",
    "check_bn",
    "check_conv",
    "main_path",
]

STEM_NAMES = ("maxpool", "stem")
STAGES = ("layer1", "layer2", "layer3", "layer4")
_STAGES = STAGES


@dataclass(frozen=True, eq=False)
class ConvBN:
    """A convolution followed by BatchNorm, as seen by the backward pass (BatchNorm folded)."""

    conv: nn.Conv2d
    bn: nn.Module

    def folded_weight(self) -> Tensor:
        """The convolution weight scaled by BatchNorm's eval-mode factor ``gamma / sqrt(var + eps)``.

        Computed on each call from the live modules, so it always matches the model and folds to
        a constant in an exported graph.
        """
        bn = self.bn
        scale = torch.rsqrt(bn.running_var + bn.eps)
        if bn.weight is not None:
            scale = scale * bn.weight
        return self.conv.weight * scale.reshape(-1, 1, 1, 1)

    @property
    def is_pointwise(self) -> bool:
        c = self.conv
        return c.kernel_size == (1, 1) and c.stride == (1, 1) and c.padding == (0, 0)

    def output_padding(self, in_hw: tuple[int, int], out_hw: tuple[int, int]) -> tuple[int, int]:
        """The ``output_padding`` that makes ``conv_transpose2d`` return the forward input size."""
        c = self.conv
        pads = []
        for i in range(2):
            full = (out_hw[i] - 1) * c.stride[i] - 2 * c.padding[i] + c.dilation[i] * (c.kernel_size[i] - 1) + 1
            pads.append(int(in_hw[i]) - int(full))
        return pads[0], pads[1]


class Attention(Protocol):
    """A channel attention inside a block's main path (see :mod:`purenn.arch.attention`)."""

    def forward(self, z: Tensor) -> tuple[Tensor, tuple[Tensor, ...]]: ...

    def backward(self, g: Tensor, state: tuple[Tensor, ...]) -> Tensor: ...

    def backward_onehot(self, a_sel: Tensor, neurons: Tensor, state: tuple[Tensor, ...]) -> tuple[Tensor, Tensor]: ...


class DownsamplePool(Protocol):
    """A pooling in front of the downsample convolution (see :mod:`purenn.arch.attention`)."""

    def forward(self, x: Tensor) -> Tensor: ...

    def backward(self, g: Tensor, in_hw: tuple[int, int]) -> Tensor: ...


@dataclass(frozen=True, eq=False)
class Block:
    """One residual block: its name, module, the conv/BN pairs of its main path in order, an optional
    channel attention after the last pair (SE, ECA), and the downsample path (``None``: identity),
    optionally behind a pooling (``down_pool``, timm's average-pool downsample)."""

    name: str
    module: nn.Module
    main: tuple[ConvBN, ...]
    downsample: ConvBN | None
    attn: Attention | None = None
    down_pool: DownsamplePool | None = None

    @property
    def in_channels(self) -> int:
        return self.main[0].conv.in_channels

    @property
    def out_channels(self) -> int:
        return self.main[-1].conv.out_channels


@dataclass(eq=False)
class BlockRecord:
    """Activations recorded while replaying one block.

    ``inp`` is the block input, ``acts`` the outputs of the ReLUs inside the main path (one for a
    BasicBlock, two for a Bottleneck), ``out`` the block output (after the final ReLU), ``attn`` the
    state the block's attention needs for its backward step (per-sample tensors, batch first; empty
    without attention).
    """

    inp: Tensor
    acts: list[Tensor] = field(default_factory=list)
    out: Tensor | None = None
    attn: tuple[Tensor, ...] = ()


def _bn_types() -> tuple[type, ...]:
    from torchvision.ops.misc import FrozenBatchNorm2d

    return (nn.BatchNorm2d, FrozenBatchNorm2d)


def batch_norm_eval(bn: nn.Module, x: Tensor) -> Tensor:
    """``bn(x)`` as in eval mode, whatever ``bn.training`` is: normalised with the running statistics,
    which are neither used from the batch nor updated (bit-identical to ``bn.eval()(x)``).

    Example:
        >>> bn = nn.BatchNorm2d(2).train()
        >>> x = torch.rand(3, 2, 4, 4)
        >>> torch.equal(batch_norm_eval(bn, x), bn.eval()(x))
        True
    """
    if isinstance(bn, nn.BatchNorm2d) and type(bn).forward is nn.BatchNorm2d.forward:
        return F.batch_norm(x, bn.running_mean, bn.running_var, bn.weight, bn.bias, False, 0.0, bn.eps)
    return bn(x)  # FrozenBatchNorm2d (always inference form) or a subclass with its own forward


def run_eval(module: nn.Module, x: Tensor) -> Tensor:
    """``module(x)`` in inference form: an ``nn.Sequential`` runs child by child, BatchNorm through
    :func:`batch_norm_eval`; other modules are called as they are (callers admit only modules whose
    output does not depend on their mode)."""
    if type(module) is nn.Sequential:
        for child in module:
            x = run_eval(child, x)
        return x
    if isinstance(module, nn.BatchNorm2d):
        return batch_norm_eval(module, x)
    return module(x)


def input_conv(model: nn.Module) -> nn.Conv2d:
    """The model's first convolution (``conv1``, or the first of a deep stem ``conv1`` sequence).

    Example:
        >>> import torchvision
        >>> input_conv(torchvision.models.resnet18()).in_channels
        3
    """
    conv = getattr(model, "conv1", None)
    while isinstance(conv, nn.Sequential) and len(conv):
        conv = conv[0]
    if not isinstance(conv, nn.Conv2d):
        raise UnsupportedModelError(f"{type(model).__name__} has no nn.Conv2d 'conv1' as its first layer.")
    return conv


def check_bn(bn: Any, where: str) -> None:
    """Refuse anything but a BatchNorm2d/FrozenBatchNorm2d with running statistics."""
    if not isinstance(bn, _bn_types()):
        raise UnsupportedModelError(
            f"{where} is a {type(bn).__name__}; purenn folds BatchNorm2d/FrozenBatchNorm2d into the "
            "convolutions and supports no other normalisation layer."
        )
    if getattr(bn, "running_var", None) is None:
        raise UnsupportedModelError(
            f"{where} has no running statistics (track_running_stats=False); purenn needs eval-mode "
            "BatchNorm statistics. Build the model with track_running_stats=True."
        )


def check_conv(conv: Any, where: str) -> None:
    """Refuse anything but an ``nn.Conv2d`` with numeric zero padding."""
    if not isinstance(conv, nn.Conv2d):
        raise UnsupportedModelError(f"{where} is a {type(conv).__name__}, expected nn.Conv2d.")
    if conv.padding_mode != "zeros" or isinstance(conv.padding, str):
        raise UnsupportedModelError(
            f"{where} uses padding {conv.padding!r}/{conv.padding_mode!r}; only numeric zero padding is supported."
        )


def main_path(module: nn.Module, name: str, pairs: Sequence[tuple[str, str]]) -> tuple[ConvBN, ...]:
    """The checked conv/BatchNorm pairs of a block's main path, named ``(conv, bn)`` in ``pairs``."""
    main = []
    for conv_name, bn_name in pairs:
        conv, bn = getattr(module, conv_name, None), getattr(module, bn_name, None)
        check_conv(conv, f"{name}.{conv_name}")
        check_bn(bn, f"{name}.{bn_name}")
        main.append(ConvBN(conv, bn))
    return tuple(main)


def copy_module(module: nn.Module, fn: Callable[[Tensor], Tensor]) -> nn.Module:
    """A deep copy of ``module`` whose parameters and buffers are ``fn`` of the originals (converted
    straight into the copy, so the original's memory is not duplicated first); the original is not
    changed and shares no storage with the copy."""
    memo: dict[int, object] = {}
    with torch.no_grad():
        for t in itertools.chain(module.parameters(), module.buffers()):
            new = fn(t.detach())
            if new.numel() and t.numel() and new.device == t.device and new.data_ptr() == t.data_ptr():
                new = new.clone()
            if isinstance(t, nn.Parameter):
                new = nn.Parameter(new, requires_grad=t.requires_grad)
            memo[id(t)] = new
    return copy.deepcopy(module, memo)


def converts(module: nn.Module, fn: Callable[[Tensor], Tensor]) -> bool:
    """Whether applying ``fn`` (a conversion of :meth:`nn.Module._apply`) would change any tensor."""
    with torch.no_grad():
        return any(fn(t) is not t for t in itertools.chain(module.parameters(), module.buffers()))
