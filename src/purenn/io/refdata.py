"""The reference-data record: which data a purified model's reference samples point into.

A purified layer remembers its reference samples as indices into the data it was purified on, so
anything that draws or re-reads references (``purenn show``, :func:`purenn.analysis.viz.neuron_figure`)
needs that same data again. :func:`purenn.fit.refcheck.fingerprint_references` records it: the number of samples and a
SHA-256 of up to 64 of the reference images (evenly spaced over the sorted reference indices of
every layer); :func:`purify_model` stores it as ``pm.reference_data`` and the saved file keeps it.
The ``purenn`` command adds the data options it was given (``options``, e.g.
``--fashion-mnist --split train --limit 5000``). :func:`purenn.fit.refcheck.check_references` refuses other data with
a :class:`~purenn.errors.DataError` that says which data was used. This module validates and
describes the record as read from a file.

Example:
    >>> pm = purenn.purify_model(model, ["layer4"], data)            # doctest: +SKIP
    >>> pm.reference_data["n_samples"], len(pm.reference_data["ids"])  # doctest: +SKIP
    (500, 64)
    >>> describe_record(pm.reference_data)                          # doctest: +SKIP
    '500 samples'
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from purenn.errors import FileFormatError

__all__ = ["validate_record", "describe_record", "reference_ids", "digest_images", "MAX_HASHED"]

#: reference images hashed per model (evenly spaced over the sorted reference indices)
MAX_HASHED = 64


def reference_ids(pm: Any, n: int = MAX_HASHED) -> list[int]:
    ids = [pm.pure_layer(name).ref_indices.flatten().cpu() for name in pm.layers]
    ids = [t for t in ids if t.numel()]
    if not ids:
        return []
    unique = torch.unique(torch.cat(ids)).tolist()
    if len(unique) <= n:
        return [int(i) for i in unique]
    pick = np.unique(np.linspace(0, len(unique) - 1, n).round().astype(np.int64))
    return [int(unique[i]) for i in pick]


def digest_images(images: torch.Tensor) -> str:
    x = images.detach().to("cpu", torch.float32).contiguous()
    h = hashlib.sha256(str(list(x.shape)).encode())
    h.update(x.reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()


def validate_record(record: Any, where: str) -> dict[str, Any] | None:
    """``record`` as a reference-data record, or a :class:`FileFormatError` naming ``where``."""
    if record is None:
        return None
    ok = (isinstance(record, Mapping) and isinstance(record.get("n_samples"), int) and record["n_samples"] >= 0
          and isinstance(record.get("ids"), list) and all(isinstance(i, int) and i >= 0 for i in record["ids"])
          and (record.get("sha256") is None or isinstance(record.get("sha256"), str))
          and isinstance(record.get("options", {}), Mapping))
    if not ok:
        raise FileFormatError(f"{where}: the reference-data record is malformed: {str(record)[:200]}.")
    return dict(record)


def describe_record(record: Mapping[str, Any]) -> str:
    """How the reference data was given, in words: the command-line options when known."""
    options = record.get("options") or {}
    text = f"{record['n_samples']} samples"
    if options.get("flags"):
        text = f"{options['flags']} ({options.get('description') or text})"
    return text


