"""Files: the safetensors format (:mod:`~purenn.io.format`), the architecture record that rebuilds a
base model (:mod:`~purenn.io.architecture`), ONNX export (:mod:`~purenn.io.onnx`), the reference-data
record (:mod:`~purenn.io.refdata`) and atomic writes (:mod:`~purenn.io.files`).

``purenn.io.save_purified``, ``purenn.io.load_purified``, ``purenn.io.read_config``, ... (the module
``purenn.io`` of the flat layout) still resolve here.
"""

from __future__ import annotations

import importlib
from typing import Any

#: names the flat layout's ``purenn.io`` offered -> their module now
_FORMER = {name: "format" for name in ("FORMAT_VERSION", "save_purified", "load_purified", "read_config",
                                        "content_hashes")}
_FORMER.update(describe_architecture="architecture", build_base_model="architecture")


def __getattr__(name: str) -> Any:
    if name in _FORMER:
        return getattr(importlib.import_module(f"{__name__}.{_FORMER[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
