"""The reference-data record of a purified model from its data, and the check that other data is the same.

:func:`fingerprint_references` records the size of the data and a SHA-256 of up to 64 reference
images (:mod:`purenn.io.refdata` defines and validates the record); :func:`check_references` refuses
other data with a :class:`~purenn.errors.DataError` that says which data was used.

Example:
    >>> pm = purenn.purify_model(model, ["layer4"], data)            # doctest: +SKIP
    >>> check_references(pm, data[:100])                            # doctest: +SKIP
    Traceback (most recent call last):
    purenn.errors.DataError: the reference samples ... were purified on 500 samples; this data has 100 ...
"""

from __future__ import annotations

from typing import Any

from purenn.errors import DataError
from purenn.fit.data import DataSource
from purenn.io.refdata import describe_record, digest_images, reference_ids

__all__ = ["fingerprint_references", "check_references"]


def fingerprint_references(pm: Any, data: Any, *, batch_size: int = 64) -> dict[str, Any]:
    """``{"n_samples", "ids", "sha256"}``: the size of ``data`` and a SHA-256 of the reference images
    at ``ids`` (up to :data:`MAX_HASHED` of the model's reference indices, as float32)."""
    source = DataSource.from_data(data, batch_size)
    ids = reference_ids(pm)
    record: dict[str, Any] = {"n_samples": len(source), "ids": ids, "sha256": None}
    if ids and max(ids) < len(source):
        record["sha256"] = digest_images(source.fetch(ids))
    return record


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
    if record.get("sha256") and digest_images(source.fetch(record["ids"])) != record["sha256"]:
        raise DataError(f"the reference images differ from those the model was purified on ({used}): same number "
                        f"of samples, other images{now}; {fix}.")
