"""Architecture support: recognise a torchvision ResNet, name its layers, run it block by block.

purenn never edits the model it is given. :class:`ResNetSpec` reads the structure of a
torchvision :class:`~torchvision.models.ResNet` (any depth, width or group count, any stem) and
replays its forward pass block by block with the model's own modules, so every activation is
bit-identical to ``model(x)`` in eval mode. The replay always runs BatchNorm in inference form
(with its running statistics), whatever mode the caller's model is in, and never updates those
statistics. While replaying, it can record the activations after each ReLU of a block: the masks
the explicit backward pass in :mod:`purenn.relevance` needs.

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
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models.resnet import BasicBlock, Bottleneck, ResNet
from torchvision.ops.misc import FrozenBatchNorm2d

from .errors import LayerError, UnsupportedModelError

__all__ = ["ConvBN", "Block", "BlockRecord", "ResNetSpec", "STEM_NAMES", "batch_norm_eval"]

STEM_NAMES = ("maxpool", "stem")
_STAGES = ("layer1", "layer2", "layer3", "layer4")
_BN_TYPES = (nn.BatchNorm2d, FrozenBatchNorm2d)


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


@dataclass(frozen=True, eq=False)
class Block:
    """One residual block: its name, module and the conv/BN pairs of its main path, in order."""

    name: str
    module: nn.Module
    main: tuple[ConvBN, ...]
    downsample: ConvBN | None

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
    BasicBlock, two for a Bottleneck), ``out`` the block output (after the final ReLU).
    """

    inp: Tensor
    acts: list[Tensor] = field(default_factory=list)
    out: Tensor | None = None


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


def _check_bn(bn: nn.Module, where: str) -> None:
    if not isinstance(bn, _BN_TYPES):
        raise UnsupportedModelError(
            f"{where} is a {type(bn).__name__}; purenn folds BatchNorm2d/FrozenBatchNorm2d into the "
            "convolutions and supports no other normalisation layer."
        )
    if getattr(bn, "running_var", None) is None:
        raise UnsupportedModelError(
            f"{where} has no running statistics (track_running_stats=False); purenn needs eval-mode "
            "BatchNorm statistics. Build the model with track_running_stats=True."
        )


def _check_conv(conv: nn.Module, where: str) -> None:
    if not isinstance(conv, nn.Conv2d):
        raise UnsupportedModelError(f"{where} is a {type(conv).__name__}, expected nn.Conv2d.")
    if conv.padding_mode != "zeros" or isinstance(conv.padding, str):
        raise UnsupportedModelError(
            f"{where} uses padding {conv.padding!r}/{conv.padding_mode!r}; only numeric zero padding is supported."
        )


def _parse_block(name: str, module: nn.Module) -> Block:
    if isinstance(module, Bottleneck) or hasattr(module, "conv3"):
        pairs = (("conv1", "bn1"), ("conv2", "bn2"), ("conv3", "bn3"))
    elif isinstance(module, BasicBlock) or (hasattr(module, "conv2") and hasattr(module, "bn2")):
        pairs = (("conv1", "bn1"), ("conv2", "bn2"))
    else:
        raise UnsupportedModelError(
            f"block {name} is a {type(module).__name__}; purenn supports torchvision's BasicBlock and "
            "Bottleneck residual blocks."
        )
    main = []
    for conv_name, bn_name in pairs:
        conv, bn = getattr(module, conv_name, None), getattr(module, bn_name, None)
        _check_conv(conv, f"{name}.{conv_name}")
        _check_bn(bn, f"{name}.{bn_name}")
        main.append(ConvBN(conv, bn))
    if not isinstance(getattr(module, "relu", None), nn.ReLU):
        raise UnsupportedModelError(f"block {name} has no nn.ReLU named 'relu'; other activations are not supported.")
    down = getattr(module, "downsample", None)
    ds = None
    if down is not None:
        if not (isinstance(down, nn.Sequential) and len(down) == 2):
            raise UnsupportedModelError(
                f"{name}.downsample must be nn.Sequential(conv1x1, BatchNorm2d) as in torchvision, "
                f"got {type(down).__name__}."
            )
        _check_conv(down[0], f"{name}.downsample.0")
        _check_bn(down[1], f"{name}.downsample.1")
        ds = ConvBN(down[0], down[1])
    block = Block(name, module, tuple(main), ds)
    if ds is None and block.in_channels != block.out_channels:
        raise UnsupportedModelError(f"block {name} changes channels without a downsample path.")
    return block


class ResNetSpec:
    """The structure of a torchvision ResNet and an exact block-by-block replay of its forward.

    Args:
        model: any :class:`torchvision.models.ResNet` (resnet18-152, wide_resnet, resnext, adapted
            stems). Its modules are used as they are; nothing is copied or changed.

    Raises:
        UnsupportedModelError: the model is not a torchvision-style ResNet.
    """

    def __init__(self, model: nn.Module) -> None:
        required = ("conv1", "bn1", "relu", "maxpool", *_STAGES, "avgpool", "fc")
        missing = [n for n in required if not hasattr(model, n)]
        if not isinstance(model, ResNet) and missing:
            raise UnsupportedModelError(
                f"{type(model).__name__} is not a torchvision ResNet (missing {', '.join(missing)}). "
                "purenn supports torchvision.models.ResNet and its variants (resnet18-152, "
                "wide_resnet50_2/101_2, resnext50_32x4d/101_32x8d/101_64x4d, adapted stems)."
            )
        self.model = model
        blocks: list[Block] = []
        self._stage_last: dict[str, int] = {}
        for stage in _STAGES:
            seq = getattr(model, stage)
            if not isinstance(seq, nn.Sequential) or len(seq) == 0:
                raise UnsupportedModelError(f"model.{stage} must be a non-empty nn.Sequential of residual blocks.")
            for b, module in enumerate(seq):
                blocks.append(_parse_block(f"{stage}.{b}", module))
            self._stage_last[stage] = len(blocks)
        self.blocks: tuple[Block, ...] = tuple(blocks)
        self._by_name = {blk.name: i + 1 for i, blk in enumerate(self.blocks)}

    # ------------------------------------------------------------------ naming
    @property
    def n_positions(self) -> int:
        return len(self.blocks) + 1

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
        m = self.model
        return m.maxpool(m.relu(batch_norm_eval(m.bn1, m.conv1(x))))

    def head(self, h: Tensor) -> Tensor:
        m = self.model
        return m.fc(torch.flatten(m.avgpool(h), 1))

    @staticmethod
    def block_forward(block: Block, x: Tensor, record: bool = False) -> tuple[Tensor, BlockRecord | None]:
        """Run one block exactly as torchvision does, optionally recording its ReLU outputs."""
        rec = BlockRecord(x) if record else None
        h = x
        last = len(block.main) - 1
        for i, cb in enumerate(block.main):
            h = batch_norm_eval(cb.bn, cb.conv(h))
            if i < last:
                h = torch.relu(h)
                if rec is not None:
                    rec.acts.append(h)
        identity = x if block.downsample is None else batch_norm_eval(block.downsample.bn, block.downsample.conv(x))
        out = torch.relu(h + identity)
        if rec is not None:
            rec.out = out
        return out, rec

    def forward(self, x: Tensor) -> Tensor:
        """Replay the whole model; equals ``model(x)`` bit for bit for a torchvision ResNet."""
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
