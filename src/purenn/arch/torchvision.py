"""Recognising torchvision ResNets: :class:`~torchvision.models.ResNet` with ``BasicBlock`` and
``Bottleneck`` blocks (any depth, width or group count, any stem).

Example:
    >>> import torchvision
    >>> from purenn.arch import ResNetSpec
    >>> ResNetSpec(torchvision.models.resnext50_32x4d()).family.name
    'torchvision'
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from purenn.arch.core import STAGES, Block, ConvBN, batch_norm_eval, check_bn, check_conv, main_path
from purenn.errors import UnsupportedModelError

__all__ = ["TORCHVISION", "TorchvisionFamily"]


class TorchvisionFamily:
    """Block recognition, stem and head of torchvision's ResNet."""

    name = "torchvision"

    def check_model(self, model: nn.Module) -> None:
        from torchvision.models.resnet import ResNet

        required = ("conv1", "bn1", "relu", "maxpool", *STAGES, "avgpool", "fc")
        missing = [n for n in required if not hasattr(model, n)]
        if not isinstance(model, ResNet) and missing:
            raise UnsupportedModelError(
                f"{type(model).__name__} is not a torchvision ResNet (missing {', '.join(missing)}). "
                "purenn supports torchvision.models.ResNet and its variants (resnet18-152, "
                "wide_resnet50_2/101_2, resnext50_32x4d/101_32x8d/101_64x4d, adapted stems) and timm's "
                "timm.models.resnet.ResNet."
            )

    def parse_block(self, name: str, module: nn.Module) -> Block:
        from torchvision.models.resnet import BasicBlock, Bottleneck

        if isinstance(module, Bottleneck) or hasattr(module, "conv3"):
            pairs = (("conv1", "bn1"), ("conv2", "bn2"), ("conv3", "bn3"))
        elif isinstance(module, BasicBlock) or (hasattr(module, "conv2") and hasattr(module, "bn2")):
            pairs = (("conv1", "bn1"), ("conv2", "bn2"))
        else:
            raise UnsupportedModelError(
                f"block {name} is a {type(module).__name__}; purenn supports torchvision's BasicBlock and "
                "Bottleneck residual blocks."
            )
        main = main_path(module, name, pairs)
        if not isinstance(getattr(module, "relu", None), nn.ReLU):
            raise UnsupportedModelError(
                f"block {name} has no nn.ReLU named 'relu'; other activations are not supported."
            )
        down = getattr(module, "downsample", None)
        ds = None
        if down is not None:
            if not (isinstance(down, nn.Sequential) and len(down) == 2):
                raise UnsupportedModelError(
                    f"{name}.downsample must be nn.Sequential(conv1x1, BatchNorm2d) as in torchvision, "
                    f"got {type(down).__name__}."
                )
            check_conv(down[0], f"{name}.downsample.0")
            check_bn(down[1], f"{name}.downsample.1")
            ds = ConvBN(down[0], down[1])
        block = Block(name, module, main, ds)
        if ds is None and block.in_channels != block.out_channels:
            raise UnsupportedModelError(f"block {name} changes channels without a downsample path.")
        return block

    def stem(self, model: nn.Module, x: Tensor) -> Tensor:
        return model.maxpool(model.relu(batch_norm_eval(model.bn1, model.conv1(x))))

    def head(self, model: nn.Module, h: Tensor) -> Tensor:
        return model.fc(torch.flatten(model.avgpool(h), 1))


TORCHVISION = TorchvisionFamily()
