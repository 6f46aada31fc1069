"""The reference-data record: purify_model fingerprints the data its references point into, the file keeps
it, and what indexes references refuses other data."""

from __future__ import annotations

import pytest
import torch

import purenn
from purenn.analysis.viz import neuron_circuits
from purenn.errors import DataError
from purenn.fit.refcheck import check_references, fingerprint_references
from purenn.io.refdata import MAX_HASHED


def test_purify_model_records_the_reference_data(planted_model, planted_pm):
    _, train, _ = planted_model
    rec = planted_pm.reference_data
    refs = torch.unique(planted_pm.pure_layer("layer4").ref_indices).tolist()
    assert rec["n_samples"] == len(train)
    assert len(rec["ids"]) == min(MAX_HASHED, len(refs)) and set(rec["ids"]) <= set(refs)
    assert rec["sha256"] == fingerprint_references(planted_pm, train.images)["sha256"]  # a Tensor of the same images
    check_references(planted_pm, train)  # the same data passes


def test_other_data_is_refused(planted_model, planted_pm):
    _, train, test = planted_model
    with pytest.raises(DataError, match="purified on 320 samples, this data has 160 samples"):
        check_references(planted_pm, test)
    other = train.images.flip(-1)  # same size, other images
    with pytest.raises(DataError, match="reference images differ.*--split test") as err:
        check_references(planted_pm, other, given="--split test")
    assert "320 samples" in str(err.value)
    with pytest.raises(DataError, match="reference images differ"):
        neuron_circuits(planted_pm, "layer4", int(planted_pm.pure_layer("layer4").neurons[0]), other)


def test_the_record_survives_save_and_load(planted_model, planted_pm, tmp_path):
    _, train, _ = planted_model
    path = planted_pm.save(tmp_path / "pure.safetensors")
    pm = purenn.load_purified(path)
    assert pm.reference_data == planted_pm.reference_data
    assert purenn.io.format.read_config(path)["reference_data"]["sha256"] == planted_pm.reference_data["sha256"]
    with pytest.raises(DataError):
        check_references(pm, train.images[:-1])


def test_a_model_without_a_record_is_not_checked(planted_model, planted_pm):
    _, _, test = planted_model
    saved = planted_pm.reference_data
    try:
        planted_pm.reference_data = None
        check_references(planted_pm, test)
    finally:
        planted_pm.reference_data = saved
