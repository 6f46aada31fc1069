"""The module paths of purenn before its layer sub-packages, kept working with a :class:`DeprecationWarning`.

``import purenn.concept`` (or ``from purenn.surgery import PurifiedModel``) gives a module that looks
each name up in the new home(s) listed in :data:`MOVED`, so code written for the flat layout runs
unchanged while it is ported. ``purenn.io`` and ``purenn.cli`` are packages now and re-export what
their old modules offered.

Example:
    >>> import warnings
    >>> with warnings.catch_warnings(record=True) as caught:
    ...     warnings.simplefilter("always")
    ...     from purenn.concept import purify_concept
    >>> purify_concept.__module__, caught[0].category.__name__
    ('purenn.fit.concept', 'DeprecationWarning')
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import sys
import types
import warnings
from typing import Any

__all__ = ["MOVED"]

#: old module under ``purenn`` -> the modules its names live in now (the first is its main home)
MOVED: dict[str, tuple[str, ...]] = {
    "_choices": ("common.choices",),
    "_validate": ("common.checks",),
    "progress": ("common.progress",),
    "distributed": ("common.distributed", "fit.cluster"),
    "rules": ("attribution.rules",),
    "relevance": ("attribution.relevance",),
    "precision": ("attribution.precision",),
    "surgery": ("model.purified", "model.pure_layer", "arch.core"),
    "gating": ("model.gates", "fit.gate_features"),
    "export": ("io.onnx",),
    "_files": ("io.files",),
    "refdata": ("io.refdata", "fit.refcheck"),
    "data": ("fit.data",),
    "collect": ("fit.collect",),
    "fitting": ("fit.circuits",),
    "cluster": ("fit.cluster",),
    "purify": ("fit.pipeline", "fit.plan", "fit.stages"),
    "concept": ("fit.concept",),
    "resume": ("fit.resume",),
    "probe": ("analysis.probe",),
    "metrics": ("analysis.metrics",),
    "unlearn": ("analysis.unlearn",),
    "viz": ("analysis.viz",),
    "report": ("analysis.report",),
    "cli_report": ("cli.report",),
    "cli_unlearn": ("cli.unlearn",),
    "loaders": ("cli.loaders",),
    "datasets": ("cli.datasets",),
    "demo": ("cli.demo",),
}


class _MovedModule(types.ModuleType):
    """Stands at an old path; each attribute comes from the first new module that defines it."""

    __purenn_targets__: tuple[str, ...] = ()

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        for target in self.__purenn_targets__:
            module = importlib.import_module(f"purenn.{target}")
            if hasattr(module, name):
                return getattr(module, name)
        raise AttributeError(f"module {self.__name__!r} (now {self.__purenn_targets__[0]!r}) has no attribute {name!r}")

    def __dir__(self) -> list[str]:
        names: set[str] = set()
        for target in self.__purenn_targets__:
            names |= set(dir(importlib.import_module(f"purenn.{target}")))
        return sorted(names)


class _Finder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, fullname: str, path: Any, target: Any = None) -> importlib.machinery.ModuleSpec | None:
        prefix, _, old = fullname.partition(".")
        if prefix != "purenn" or old not in MOVED:
            return None
        return importlib.util.spec_from_loader(fullname, self)

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> types.ModuleType:
        old = spec.name.partition(".")[2]
        new = MOVED[old]
        warnings.warn(f"{spec.name} is now purenn.{new[0]}; the old path will be removed in a later release.",
                      DeprecationWarning, stacklevel=3)
        module = _MovedModule(spec.name, f"Moved to :mod:`purenn.{new[0]}`.")
        module.__purenn_targets__ = new
        return module

    def exec_module(self, module: types.ModuleType) -> None:
        return None

    def get_code(self, fullname: str) -> Any:
        """The new module's code, so ``python -m purenn.demo`` still runs the demo."""
        new = f"purenn.{MOVED[fullname.partition('.')[2]][0]}"
        spec = importlib.util.find_spec(new)
        return spec.loader.get_code(new) if spec is not None and spec.loader is not None else None


if not any(isinstance(f, _Finder) for f in sys.meta_path):
    sys.meta_path.append(_Finder())
