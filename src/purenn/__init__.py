"""purenn: split polysemantic ResNet neurons into pure virtual neurons (PURE), as a real model.

Example:
    >>> import torch, torchvision, purenn
    >>> model = torchvision.models.resnet18(num_classes=4).eval()
    >>> pm = purenn.purify_model(model, ["layer4"], torch.rand(16, 3, 32, 32), n_refs=4,
    ...                          neurons={"layer4": [0, 1]}, progress=False)
    >>> x = torch.rand(2, 3, 32, 32)
    >>> torch.equal(pm(x), model(x))
    True
"""

from ._version import __version__
from .arch import ResNetSpec
from .cluster import CircuitKMeans
from .errors import (
    ConfigError,
    DataError,
    ExportError,
    FileFormatError,
    LayerError,
    NotFittedError,
    PurennError,
    UnsupportedModelError,
)
from .export import ExportReport, ParityCheck, export_onnx
from .io import load_purified
from .purify import purify_model
from .relevance import circuit_relevance
from .surgery import PureLayer, PurifiedModel, SuppressionHandle, VirtualNeuron

__all__ = [
    "__version__",
    "purify_model",
    "circuit_relevance",
    "PurifiedModel",
    "PureLayer",
    "VirtualNeuron",
    "SuppressionHandle",
    "ResNetSpec",
    "CircuitKMeans",
    "PurennError",
    "UnsupportedModelError",
    "LayerError",
    "ConfigError",
    "DataError",
    "NotFittedError",
    "FileFormatError",
    "ExportError",
    "load_purified",
    "export_onnx",
    "ExportReport",
    "ParityCheck",
]
