"""Exceptions raised by purenn.

Every error purenn raises on bad input derives from :class:`PurennError`, and also from the
builtin exception a caller would expect (``ValueError`` or ``TypeError``), so both
``except purenn.PurennError`` and ``except ValueError`` work.
"""

from __future__ import annotations

__all__ = [
    "PurennError",
    "UnsupportedModelError",
    "LayerError",
    "ConfigError",
    "DataError",
    "NotFittedError",
    "FileFormatError",
    "ExportError",
]


class PurennError(Exception):
    """Base class of every purenn error."""


class UnsupportedModelError(PurennError, TypeError):
    """The model is not an architecture purenn can rewrite (see ``purenn.arch``)."""


class LayerError(PurennError, ValueError):
    """A layer name is unknown, or an upstream layer is not before its target layer."""


class ConfigError(PurennError, ValueError):
    """An option has a value outside its allowed range."""


class DataError(PurennError, ValueError):
    """The data cannot be used: too few samples, no stable indices, NaN values, wrong shape."""


class NotFittedError(PurennError, ValueError):
    """A fitted quantity was asked for before fitting."""


class FileFormatError(PurennError, ValueError):
    """A saved purenn file cannot be loaded: not a safetensors file, truncated, bad or newer config,
    missing, extra or misshapen tensors, values a purified model cannot hold, contents that differ from
    their saved hashes, or a base-model skeleton of another architecture."""


class ExportError(PurennError, RuntimeError):
    """Export to ONNX failed or was refused (NaN or infinite weights or buffers), or the exported
    graph does not reproduce the PyTorch model."""
