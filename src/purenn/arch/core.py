"""The family-neutral description of a ResNet and its exact block-by-block replay.

purenn never edits the model it is given. :class:`ResNetSpec` reads the structure of a ResNet
through the recogniser of its model family (:mod:`purenn.arch.torchvision` for torchvision's
:class:`~torchvision.models.ResNet`, :mod:`purenn.arch.timm` for timm's
:class:`timm.models.resnet.ResNet`), which turns every residual block into the same description
(:class:`Block`: conv/BatchNorm pairs, an optional channel attention, an identity or downsample
path, optionally average-pooled). It then replays the forward pass block by block with the model's
own modules, so every activation is bit-identical to ``model(x)`` in eval mode. The replay always
runs BatchNorm in inference form (with its running statistics), whatever mode the caller's model is
in, and never updates those statistics. While replaying, it can record the activations after each
ReLU of a block and the state of its attention: what the explicit backward pass in
:mod:`purenn.relevance` needs. Relevance, gating and export never ask which family a block came from.

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

import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import LayerError, UnsupportedModelError

__all__ = [
    "ConvBN",
    "Block",
    "BlockRecord",
    "ResNetSpec",
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


class Family(Protocol):
    """What a model family's recogniser provides (:mod:`purenn.arch.torchvision`, :mod:`purenn.arch.timm`)."""

    name: str

    def check_model(self, model: nn.Module) -> None: ...

    def parse_block(self, name: str, module: nn.Module) -> Block: ...

    def stem(self, model: nn.Module, x: Tensor) -> Tensor: ...

    def head(self, model: nn.Module, h: Tensor) -> Tensor: ...


def family_of(model: nn.Module) -> Family:
    """The recogniser for a model's family: timm when its class comes from timm, else torchvision
    (timm is never imported unless the model's class comes from it)."""
    timm_resnet = sys.modules.get("timm.models.resnet")  # loaded whenever a timm model exists
    if type(model).__module__.split(".")[0] == "timm" or (
            timm_resnet is not None and isinstance(model, timm_resnet.ResNet)):
        from .timm import TIMM

        return TIMM
    from .torchvision import TORCHVISION

    return TORCHVISION


class ResNetSpec:
    """The structure of a ResNet and an exact block-by-block replay of its forward.

    Args:
        model: any torchvision :class:`~torchvision.models.ResNet` (resnet18-152, wide_resnet,
            resnext, adapted stems) or timm :class:`timm.models.resnet.ResNet` (resnet18-200,
            ``c``/``d``/``s``/``t`` stems and average-pool downsamples, SE and ECA blocks, ResNeXt,
            wide). Its modules are used as they are; nothing is copied or changed.

    Raises:
        UnsupportedModelError: the model is not a ResNet purenn can replay exactly; the message
            names the module that is not supported.
    """

    def __init__(self, model: nn.Module) -> None:
        self.family = family_of(model)
        self.family.check_model(model)
        self.model = model
        blocks: list[Block] = []
        self._stage_last: dict[str, int] = {}
        for stage in _STAGES:
            seq = getattr(model, stage)
            if not isinstance(seq, nn.Sequential) or len(seq) == 0:
                raise UnsupportedModelError(f"model.{stage} must be a non-empty nn.Sequential of residual blocks.")
            for b, module in enumerate(seq):
                blocks.append(self.family.parse_block(f"{stage}.{b}", module))
            self._stage_last[stage] = len(blocks)
        self.blocks: tuple[Block, ...] = tuple(blocks)
        self._by_name = {blk.name: i + 1 for i, blk in enumerate(self.blocks)}

    # ------------------------------------------------------------------ naming
    @property
    def n_positions(self) -> int:
        return len(self.blocks) + 1

    @property
    def in_channels(self) -> int:
        """Channels of the input image."""
        return int(input_conv(self.model).in_channels)

    def layer_names(self) -> list[str]:
        """Every accepted layer name: the stem, the stages and the blocks."""
        return ["maxpool", *_STAGES, *self._by_name]

    def position(self, name: str) -> int:
        """Position of a layer name (0 = stem output, j = output of block j)."""
        if not isinstance(name, str):
            raise LayerError(f"layer names are strings such as 'layer4' or 'layer3.1', got {name!r}.")
        if name in STEM_NAMES:
            return 0
        if name in self._stage_last:
            return self._stage_last[name]
        if name in self._by_name:
            return self._by_name[name]
        hint = ""
        m = re.fullmatch(r"(layer[1-4])\.(\d+)", name)
        if m:
            n = len(getattr(self.model, m.group(1)))
            hint = f" {m.group(1)} has blocks 0..{n - 1}."
        raise LayerError(
            f"unknown layer {name!r}.{hint} Use a stage output ('layer1'..'layer4'), a block output "
            f"such as '{self.blocks[-1].name}', or 'maxpool' (the stem) as named by model.named_modules()."
        )

    def canonical_name(self, position: int) -> str:
        """The block name of a position ('maxpool' for the stem)."""
        return "maxpool" if position == 0 else self.blocks[position - 1].name

    def default_upstream(self, name: str) -> str:
        """Default upstream layer: previous stage output for a stage, previous block output for a block."""
        pos = self.position(name)
        if pos == 0:
            raise LayerError("the stem ('maxpool') has no upstream residual block and cannot be purified.")
        if name in self._stage_last:
            idx = _STAGES.index(name)
            return "maxpool" if idx == 0 else _STAGES[idx - 1]
        stage, b = name.split(".")
        if int(b) > 0:
            return f"{stage}.{int(b) - 1}"
        idx = _STAGES.index(stage)
        return "maxpool" if idx == 0 else _STAGES[idx - 1]

    def channels(self, position: int) -> int:
        """Number of channels at a position."""
        if position == 0:
            return self.blocks[0].in_channels
        return self.blocks[position - 1].out_channels

    def segment(self, upstream: int, target: int) -> tuple[Block, ...]:
        """The blocks between an upstream position (exclusive) and a target position (inclusive)."""
        return self.blocks[upstream:target]

    # ------------------------------------------------------------------ forward replay
    def stem(self, x: Tensor) -> Tensor:
        """The stem's output (position 0) in inference form."""
        return self.family.stem(self.model, x)

    def head(self, h: Tensor) -> Tensor:
        """The logits from the last block's output (global pooling and classifier)."""
        return self.family.head(self.model, h)

    @staticmethod
    def block_forward(block: Block, x: Tensor, record: bool = False) -> tuple[Tensor, BlockRecord | None]:
        """Run one block exactly as its own forward does, optionally recording its ReLU outputs and
        its attention's state."""
        rec = BlockRecord(x) if record else None
        h = x
        last = len(block.main) - 1
        for i, cb in enumerate(block.main):
            h = batch_norm_eval(cb.bn, cb.conv(h))
            if i < last:
                h = torch.relu(h)
                if rec is not None:
                    rec.acts.append(h)
        if block.attn is not None:
            h, state = block.attn.forward(h)
            if rec is not None:
                rec.attn = state
        if block.downsample is None:
            identity = x
        else:
            skip = x if block.down_pool is None else block.down_pool.forward(x)
            identity = batch_norm_eval(block.downsample.bn, block.downsample.conv(skip))
        out = torch.relu(h + identity)
        if rec is not None:
            rec.out = out
        return out, rec

    def forward(self, x: Tensor) -> Tensor:
        """Replay the whole model; equals ``model(x)`` bit for bit for a supported ResNet."""
        h = self.stem(x)
        for blk in self.blocks:
            h, _ = self.block_forward(blk, h)
        return self.head(h)

    def run_until(
        self,
        x: Tensor,
        positions: set[int],
        record_blocks: set[int] | frozenset[int] = frozenset(),
        *,
        start: int | None = None,
    ) -> tuple[dict[int, Tensor], dict[int, BlockRecord]]:
        """Run up to the deepest requested position.

        Returns the activations at ``positions`` and the records of the blocks (1-based
        positions) in ``record_blocks``. With ``start=j``, ``x`` is the activation at position
        ``j`` and the run begins there instead of at the input image.
        """
        last = max(positions | set(record_blocks)) if positions or record_blocks else 0
        acts: dict[int, Tensor] = {}
        recs: dict[int, BlockRecord] = {}
        first = 0 if start is None else start
        h = self.stem(x) if start is None else x
        if first in positions:
            acts[first] = h
        for j in range(first + 1, last + 1):
            h, rec = self.block_forward(self.blocks[j - 1], h, record=j in record_blocks)
            if rec is not None:
                recs[j] = rec
            if j in positions:
                acts[j] = h
        return acts, recs
