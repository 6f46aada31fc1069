"""``ResNetSpec``: the structure of a ResNet and its exact block-by-block replay.

:func:`family_of` picks the model family's recogniser (:mod:`purenn.arch.torchvision` or
:mod:`purenn.arch.timm`), which turns each residual block into the family-neutral
:class:`~purenn.arch.core.Block`; :class:`ResNetSpec` names the layer positions, cuts segments and
replays the forward pass with the model's own modules, optionally recording what the explicit
backward pass needs.

Example:
    >>> import torchvision
    >>> spec = ResNetSpec(torchvision.models.resnet18())
    >>> spec.position("layer4"), spec.position("layer4.0"), spec.default_upstream("layer4")
    (8, 7, 'layer3')
"""

from __future__ import annotations

import re
import sys
from typing import Protocol

import torch
from torch import Tensor, nn

from purenn.arch.core import STAGES as _STAGES
from purenn.arch.core import STEM_NAMES, Block, BlockRecord, batch_norm_eval, input_conv
from purenn.errors import LayerError, UnsupportedModelError

__all__ = ["ResNetSpec", "family_of", "Family"]


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
        from purenn.arch.timm import TIMM

        return TIMM
    from purenn.arch.torchvision import TORCHVISION

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
