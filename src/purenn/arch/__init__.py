"""Architecture support: recognise a ResNet, name its layers, run it block by block.

Block recognition lives per model family side by side, each turning its blocks into the same
description (:class:`Block`): :mod:`purenn.arch.torchvision` (torchvision's ResNet) and
:mod:`purenn.arch.timm` (timm's ResNet, imported only for a model whose class comes from timm).
:mod:`purenn.arch.attention` holds the channel attentions (SE, ECA) and the pooled downsample with
their exact backward steps; :mod:`purenn.arch.core` the description, :mod:`purenn.arch.spec` :class:`ResNetSpec`, the
exact block-by-block replay every other module uses.

Example:
    >>> import torchvision
    >>> spec = ResNetSpec(torchvision.models.resnet18())
    >>> spec.position("layer4"), spec.position("layer4.0"), spec.default_upstream("layer4")
    (8, 7, 'layer3')
"""

from purenn.arch.core import STAGES, STEM_NAMES, Block, BlockRecord, ConvBN, batch_norm_eval, input_conv, run_eval
from purenn.arch.spec import ResNetSpec, family_of

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
    "family_of",
]
