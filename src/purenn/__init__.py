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

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from ._version import __version__
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

if TYPE_CHECKING:
    from .arch import ResNetSpec
    from .cluster import CircuitKMeans
    from .export import ExportReport, ParityCheck, export_onnx
    from .io import load_purified
    from .purify import purify_model
    from .relevance import circuit_relevance
    from .surgery import PureLayer, PurifiedModel, SuppressionHandle, VirtualNeuron

#: public name -> submodule that defines it; imported on first use (PEP 562), so that ``import purenn``
#: and the ``purenn`` command start without importing torch, torchvision or scikit-learn
_LAZY = {
    "ResNetSpec": "arch",
    "CircuitKMeans": "cluster",
    "ExportReport": "export",
    "ParityCheck": "export",
    "export_onnx": "export",
    "load_purified": "io",
    "purify_model": "purify",
    "circuit_relevance": "relevance",
    "PureLayer": "surgery",
    "PurifiedModel": "surgery",
    "SuppressionHandle": "surgery",
    "VirtualNeuron": "surgery",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value
        return value
    if not name.startswith("__"):  # a submodule, e.g. purenn.export after ``import purenn``
        try:
            return importlib.import_module(f".{name}", __name__)
        except ModuleNotFoundError as e:
            if e.name != f"{__name__}.{name}":
                raise
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


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
