"""Checks of scalar options shared by every public function (one helper per concern).

An integer option accepts a Python ``int``, a NumPy integer, or a 0-d integer tensor or array (not a
``bool``); a number option accepts those and floats, and must be finite. Anything else raises the
given purenn error (:class:`~purenn.errors.ConfigError` by default) naming the option and the value.

This module does not import torch (the ``purenn`` command uses it before torch is needed): a value
can only be a tensor once torch has been imported.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

import math
import sys
from typing import Any

import numpy as np

from purenn.errors import ConfigError, PurennError

__all__ = ["as_int", "as_number", "check_int", "check_number", "check_memory", "check_device"]


def _is_tensor(value: Any) -> bool:
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(value, torch.Tensor)


def as_int(value: Any) -> int | None:
    """``value`` as a Python ``int`` when it is an integer scalar (``int``, NumPy integer, 0-d integer
    tensor or array; never a ``bool``), else ``None``."""
    if isinstance(value, (bool, np.bool_)):
        return None
    if isinstance(value, (int, np.integer)):
        return int(value)
    if _is_tensor(value) and value.ndim == 0:
        if not value.is_floating_point() and not value.is_complex() and value.dtype != sys.modules["torch"].bool:
            return int(value.item())
    if isinstance(value, np.ndarray) and value.ndim == 0 and np.issubdtype(value.dtype, np.integer):
        return int(value.item())
    return None


def as_number(value: Any) -> float | None:
    """``value`` as a finite Python ``float`` when it is a real scalar (integer or floating, Python,
    NumPy or 0-d tensor; never a ``bool``), else ``None`` (also for NaN and infinities)."""
    n = as_int(value)
    if n is not None:
        return float(n)
    if isinstance(value, (float, np.floating)):
        out = float(value)
    elif _is_tensor(value) and value.ndim == 0 and value.is_floating_point():
        out = float(value.item())
    elif isinstance(value, np.ndarray) and value.ndim == 0 and np.issubdtype(value.dtype, np.floating):
        out = float(value.item())
    else:
        return None
    return out if math.isfinite(out) else None


def check_int(
    name: str, value: Any, low: int | None = None, high: int | None = None, error: type[PurennError] = ConfigError
) -> int:
    """``value`` as an ``int`` in ``low..high`` (either bound optional), else ``error`` naming ``name``."""
    n = as_int(value)
    if n is None or (low is not None and n < low) or (high is not None and n > high):
        if low is not None and high is not None:
            want = f"an integer in {low}..{high}"
        elif low is not None:
            want = f"an integer >= {low}"
        elif high is not None:
            want = f"an integer <= {high}"
        else:
            want = "an integer"
        raise error(f"{name} must be {want}, got {value!r}.")
    return n


def check_number(
    name: str,
    value: Any,
    low: float | None = None,
    high: float | None = None,
    *,
    low_open: bool = False,
    error: type[PurennError] = ConfigError,
) -> float:
    """``value`` as a finite ``float`` with ``low <= value <= high`` (``low < value`` with
    ``low_open``), else ``error`` naming ``name``. NaN and infinities are always refused."""
    x = as_number(value)
    bad = x is None or (low is not None and (x <= low if low_open else x < low)) or (high is not None and x > high)
    if bad:
        parts = []
        if low is not None:
            parts.append(f"{'>' if low_open else '>='} {low:g}")
        if high is not None:
            parts.append(f"<= {high:g}")
        want = "a finite number" + (" " + " and ".join(parts) if parts else "")
        raise error(f"{name} must be {want}, got {value!r}.")
    return x  # type: ignore[return-value]


def check_memory(name: str, value: Any) -> int:
    """A memory budget in bytes: a finite number > 0 (at least one byte), returned as an ``int``."""
    x = as_number(value)
    if x is None or x < 1:
        raise ConfigError(f"{name} must be a positive (finite) number of bytes, got {value!r}.")
    return int(x)


def check_device(device: Any) -> torch.device:
    """``device`` as a :class:`torch.device` that can hold data here, else a :class:`ConfigError`."""
    import torch  # here, not at the top: the command line imports this module and starts without torch

    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise ConfigError(
            f"device must be a torch.device or a name such as 'cpu' or 'cuda:0', got {device!r}."
        ) from None
    if dev.type == "meta":
        raise ConfigError("device='meta' holds no data; give the device to compute on, such as 'cpu' or 'cuda'.")
    backend = getattr(torch, dev.type, None)
    available = getattr(backend, "is_available", None)
    if dev.type != "cpu" and callable(available) and not available():
        raise ConfigError(f"device {str(dev)!r} is not available on this machine.")
    count = getattr(backend, "device_count", None)
    if dev.type != "cpu" and dev.index is not None and callable(count) and dev.index >= count():
        raise ConfigError(f"device {str(dev)!r} does not exist: this machine has {count()} {dev.type} device(s).")
    return dev
