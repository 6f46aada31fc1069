"""purenn: split polysemantic ResNet neurons into pure virtual neurons (PURE), as a real model.

Where things are (one sub-package per layer; imports point down this list only):

- :mod:`purenn.cli`: the ``purenn`` command, loaders, the demo and its datasets;
- :mod:`purenn.analysis`: probes, metrics, unlearning reports, figures, the HTML report;
- :mod:`purenn.fit`: data sources, the reference pass, circuits at the references, clustering, the
  plan and stages of :func:`purify_model`, :func:`purify_concept`, resume;
- :mod:`purenn.io`: the safetensors format, ONNX export, reference-data records, atomic writes;
- :mod:`purenn.model`: gate signals, :class:`PureLayer`, :class:`PurifiedModel`;
- :mod:`purenn.attribution`: relevance rules, the segment backward, :func:`circuit_relevance`;
- :mod:`purenn.arch`: model families and :class:`ResNetSpec`, the exact block-by-block replay;
- :mod:`purenn.common`, :mod:`purenn.errors`: shared checks and names; the exceptions.

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

from purenn import _legacy
from purenn._version import __version__
from purenn.errors import (
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
    from purenn.arch import ResNetSpec
    from purenn.attribution.relevance import circuit_relevance
    from purenn.fit.cluster import CircuitKMeans
    from purenn.fit.concept import concept_virtual_indices, purify_concept
    from purenn.fit.pipeline import purify_model
    from purenn.io.format import load_purified
    from purenn.io.onnx import ExportReport, ParityCheck, export_onnx
    from purenn.model.pure_layer import PureLayer, VirtualNeuron
    from purenn.model.purified import PurifiedModel, SuppressionHandle

#: public name -> submodule that defines it; imported on first use (PEP 562), so that ``import purenn``
#: and the ``purenn`` command start without importing torch, torchvision or scikit-learn
_LAZY = {
    "ResNetSpec": "arch",
    "CircuitKMeans": "fit.cluster",
    "ExportReport": "io.onnx",
    "ParityCheck": "io.onnx",
    "export_onnx": "io.onnx",
    "load_purified": "io.format",
    "purify_model": "fit.pipeline",
    "purify_concept": "fit.concept",
    "concept_virtual_indices": "fit.concept",
    "circuit_relevance": "attribution.relevance",
    "PureLayer": "model.pure_layer",
    "PurifiedModel": "model.purified",
    "SuppressionHandle": "model.purified",
    "VirtualNeuron": "model.pure_layer",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value
        return value
    if name in _legacy.MOVED:  # a module path of purenn < 0.x, kept working with a DeprecationWarning
        return importlib.import_module(f"{__name__}.{name}")
    if not name.startswith("__"):  # a submodule, e.g. purenn.io.onnx after ``import purenn``
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
    "purify_concept",
    "concept_virtual_indices",
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
