"""Arithmetic precision of the relevance stage: ``"float32"`` (default), ``"tf32"`` or ``"bf16"``.

- ``"float32"``: the model's own dtype, full precision (float64 models stay float64).
- ``"tf32"``: TensorFloat-32 matrix multiplications and convolutions on CUDA (Ampere or newer);
  refused on other devices, where TF32 does not exist.
- ``"bf16"``: ``torch.autocast`` with bfloat16, on CUDA or CPU (on CPU it runs, mainly so the path
  can be tested; it is rarely faster there).

The setting covers the per-pair segment backward only: the part whose cost grows with
(neurons x references). Every forward pass (the reference pass, the segment forward that gives the
ReLU masks and the upstream activations) stays in the model's dtype, so masks are exact; the
circuits are converted back to the model's dtype before they are normalised and clustered, and
gates at inference (and in ONNX) always compute in the model's dtype. (Running the forward in
bf16 as well flips ReLU masks near zero: on a small resnet18 the circuits then moved by 23 %
(median relative L2) instead of 0.4 % with bf16 in the backward only.) A lower precision changes
circuits slightly, so a few references can land in another cluster; ``benchmarks/bench_scale.py``
reports how many gates change against float32.

Example:
    >>> check_precision("bf16", "cpu")
    'bf16'
    >>> with relevance_precision("float32", "cpu"):
    ...     pass
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch

from purenn.common.choices import PRECISIONS
from purenn.errors import ConfigError

__all__ = ["PRECISIONS", "check_precision", "relevance_precision"]


def check_precision(precision: Any, device: torch.device | str | None) -> str:
    """``precision`` if it is known and possible on ``device`` (default CPU), else a :class:`ConfigError`."""
    if not isinstance(precision, str) or precision not in PRECISIONS:
        raise ConfigError(f"precision must be one of {PRECISIONS}, got {precision!r}.")
    dev = torch.device(device if device is not None else "cpu")
    if precision == "tf32" and dev.type != "cuda":
        raise ConfigError(
            f"precision='tf32' needs a CUDA device (TensorFloat-32 is a GPU arithmetic), but the relevance "
            f"stage runs on {str(dev)!r}; use precision='float32' (or 'bf16')."
        )
    if precision == "bf16" and dev.type not in ("cuda", "cpu"):
        raise ConfigError(f"precision='bf16' runs on CUDA or CPU, not on {str(dev)!r}; use precision='float32'.")
    return precision


@contextlib.contextmanager
def relevance_precision(precision: str, device: torch.device | str | None) -> Iterator[None]:
    """Run the enclosed relevance computation in ``precision`` on ``device``; restores every
    global setting it changes on exit."""
    dev = torch.device(device if device is not None else "cpu")
    check_precision(precision, dev)
    if precision == "float32":
        yield
    elif precision == "tf32":
        old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
        try:
            yield
        finally:
            torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old
    else:
        with torch.autocast(device_type=dev.type, dtype=torch.bfloat16):
            yield
