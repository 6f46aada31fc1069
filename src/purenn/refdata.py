"""Which data a purified model's reference samples point into, and a check that other data is the same.

A purified layer remembers its reference samples as indices into the data it was purified on, so
anything that draws or re-reads references (``purenn show``, :func:`purenn.viz.neuron_figure`)
needs that same data again. :func:`fingerprint_references` records it: the number of samples and a
SHA-256 of up to 64 of the reference images (evenly spaced over the sorted reference indices of
every layer); :func:`purify_model` stores it as ``pm.reference_data`` and the saved file keeps it.
The ``purenn`` command adds the data options it was given (``options``, e.g.
``--fashion-mnist --split train --limit 5000``). :func:`check_references` refuses other data with
a :class:`~purenn.errors.DataError` that says which data was used.

Example:
    >>> pm = purenn.purify_model(model, ["layer4"], data)            # doctest: +SKIP
    >>> pm.reference_data["n_samples"], len(pm.reference_data["ids"])  # doctest: +SKIP
    (500, 64)
    >>> check_references(pm, data[:100])                            # doctest: +SKIP
    Traceback (most recent call last):
    purenn.errors.DataError: the reference samples ... were purified on 500 samples; this data has 100 ...
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from .data import DataSource
from .errors import DataError, FileFormatError

__all__ = ["fingerprint_references", "check_references", "validate_record", "MAX_HASHED"]

#: reference images hashed per model (evenly spaced over the sorted reference indices)
MAX_HASHED = 64


def _reference_ids(pm: Any, n: int = MAX_HASHED) -> list[int]:
    ids = [pm.pure_layer(name).ref_indices.flatten().cpu() for name in pm.layers]
    ids = [t for t in ids if t.numel()]
    if not ids:
        return []
    unique = torch.unique(torch.cat(ids)).tolist()
    if len(unique) <= n:
        return [int(i) for i in unique]
    pick = np.unique(np.linspace(0, len(unique) - 1, n).round().astype(np.int64))
    return [int(unique[i]) for i in pick]


def _digest(images: torch.Tensor) -> str:
    x = images.detach().to("cpu", torch.float32).contiguous()
    h = hashlib.sha256(str(list(x.shape)).encode())
    h.update(x.reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()


def fingerprint_references(pm: Any, data: Any, *, batch_size: int = 64) -> dict[str, Any]:
    """``{"n_samples", "ids", "sha256"}``: the size of ``data`` and a SHA-256 of the reference images
    at ``ids`` (up to :data:`MAX_HASHED` of the model's reference indices, as float32)."""
    source = DataSource.from_data(data, batch_size)
    ids = _reference_ids(pm)
    record: dict[str, Any] = {"n_samples": len(source), "ids": ids, "sha256": None}
    if ids and max(ids) < len(source):
        record["sha256"] = _digest(source.fetch(ids))
    return record


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


def check_references(pm: Any, data: Any, *, given: str | None = None, batch_size: int = 64) -> None:
    """Refuse ``data`` unless it is the data ``pm`` was purified on (same size, same reference images).

    Models without a record (purified before records existed, or built by hand) pass unchecked.

    Args:
        pm: a :class:`~purenn.PurifiedModel` with ``reference_data``.
        data: the data offered now (Tensor, map-style Dataset or unshuffled DataLoader).
        given: how the data was given now, for the message (e.g. ``"--fashion-mnist --split test"``).
        batch_size: samples per read.

    Raises:
        DataError: the data differs; the message says which data the model was purified on.
    """
    record = getattr(pm, "reference_data", None)
    if not record:
        return
    source = DataSource.from_data(data, batch_size)
    used = describe_record(record)
    now = f" ({given})" if given else ""
    fix = "pass the same data options as to purify" if (record.get("options") or {}).get("flags") else \
        "pass the data the model was purified on"
    if len(source) != record["n_samples"]:
        raise DataError(f"the reference samples were taken from other data: the model was purified on {used}, "
                        f"this data has {len(source)} samples{now}; {fix}.")
    if record.get("sha256") and _digest(source.fetch(record["ids"])) != record["sha256"]:
        raise DataError(f"the reference images differ from those the model was purified on ({used}): same number "
                        f"of samples, other images{now}; {fix}.")
