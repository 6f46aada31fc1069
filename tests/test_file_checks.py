"""Files are checked, not trusted: every value of a loaded file is validated, content hashes catch
edits and damage, and export refuses non-finite weights."""

from __future__ import annotations

import copy
import json
import struct
import warnings

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import purenn
import purenn.io.format as pio
from purenn.errors import ConfigError, ExportError, FileFormatError

from conftest import tiny_resnet

NEURONS = {"layer3": [0, 3, 6], "layer4.1": [1, 2, 5]}  # layer3: downsample in between; layer4.1: identity


def images(n: int, seed: int) -> torch.Tensor:
    return torch.rand(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    model = tiny_resnet()
    pm = purenn.purify_model(model, list(NEURONS), images(12, seed=1), n_refs=4, neurons=NEURONS, progress=False)
    pm.suppress("layer4.1", [pm.virtual_index("layer4.1", 2, 1)])
    path = pm.save(tmp_path_factory.mktemp("saved") / "pm.safetensors")
    return pm, path


def read_raw(path):
    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})


def rewrite(src, path, tensors=None, config=None, metadata=None):
    """A copy of ``src`` with some tensors, the config or the metadata replaced (written by safetensors)."""
    src_tensors, src_meta = read_raw(src)
    meta = dict(src_meta if metadata is None else metadata)
    if config is not None:
        meta["purenn"] = json.dumps(config)
    save_file({**src_tensors, **(tensors or {})}, str(path), metadata=meta)
    return path


def config_of(path):
    return json.loads(read_raw(path)[1]["purenn"])


def load_both_ways(path, message, **kwargs):
    """The file is refused with and without hash verification (the value itself is impossible)."""
    for verify in (True, False):
        with pytest.raises(FileFormatError, match=message):
            purenn.load_purified(path, verify=verify, **kwargs)


def edited(src, key, fn):
    return {key: fn(read_raw(src)[0][key].clone())}


def set_first(value):
    def fn(t):
        t.view(-1)[0] = value
        return t
    return fn


# ------------------------------------------------------------------------------------------ round trip with hashes


def test_saved_file_carries_content_hashes_and_loads(saved):
    pm, path = saved
    tensors, metadata = read_raw(path)
    hashes = json.loads(metadata[pio.HASH_KEY])
    assert hashes == pio.content_hashes(tensors, metadata["purenn"])
    assert sorted(hashes["tensors"]) == sorted(tensors)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        pm2 = purenn.load_purified(path)
    x = images(3, seed=2)
    with torch.no_grad():
        assert torch.equal(pm2(x), pm(x))


# ------------------------------------------------------------------------------------------ impossible values


@pytest.mark.parametrize("key, fn, message", [
    ("purenn.layer3.centroids", set_first(float("nan")), r"purenn.layer3.centroids' .* NaN"),
    ("purenn.layer3.centroids", set_first(float("inf")), r"purenn.layer3.centroids' .* infinite"),
    ("purenn.layer4.1.merge_weight", lambda t: t * 7.5, r"merge_weight' .* holds 7.5; merge weights are 0"),
    ("purenn.layer4.1.merge_weight", set_first(0.5), r"merge_weight' .* holds 0.5"),
    ("purenn.layer3.scores", set_first(float("inf")), r"purenn.layer3.scores' .* NaN or infinite"),
    ("purenn.layer3.n_clusters", set_first(0), r"n_clusters' .* outside 1..2"),
    ("purenn.layer3.n_clusters", set_first(3), r"n_clusters' .* outside 1..2"),
    ("purenn.layer3.ref_counts", set_first(-1), r"ref_counts' .* negative"),
    ("purenn.layer3.ref_counts", set_first(99), r"ref_counts' .* disagrees with the clusters"),
    ("purenn.layer3.ref_indices", set_first(-4), r"ref_indices' .* negative data indices"),
    ("purenn.layer3.ref_clusters", set_first(2), r"ref_clusters' .* outside 0..n_clusters-1"),
    ("purenn.layer3.neurons", lambda t: t.to(torch.int32), r"neurons' .* torch.int32, expected torch.int64"),
    ("purenn.layer3.centroids", lambda t: t.double(), r"centroids' .* torch.float64, expected torch.float32"),
    ("purenn.layer3.merge_weight", lambda t: t.to(torch.int64), r"merge_weight' .* torch.int64, expected"),
    ("purenn.layer3.ref_indices", lambda t: t.flatten(), r"ref_indices' .* 1 dimensions, expected 2"),
    ("purenn.layer3.centroids", lambda t: t.flatten(), r"centroids' .* 1 dimensions, expected 3"),
    ("purenn.layer3.scores", lambda t: t[:-1].contiguous(), r"scores' .* shape \(2,\), expected \(3,\)"),
    ("base_model.layer1.0.conv1.weight", set_first(float("nan")), r"'base_model.layer1.0.conv1.weight' .* NaN"),
    ("base_model.bn1.running_mean", set_first(float("-inf")), r"'base_model.bn1.running_mean' .* infinite"),
    ("base_model.layer2.0.bn1.running_var", set_first(-1.0), r"running_var' .* negative BatchNorm variances"),
])
def test_impossible_tensor_values_are_refused(saved, tmp_path, key, fn, message):
    path = rewrite(saved[1], tmp_path / "bad.safetensors", tensors=edited(saved[1], key, fn))
    load_both_ways(path, message)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.safetensors"]


def _layer(config, name):
    return next(e for e in config["layers"] if e["config"]["layer"] == name)


@pytest.mark.parametrize("edit, message", [
    (lambda c: _layer(c, "layer3")["config"].update(skip_aware=True),
     "layer3.* skip_aware, which is impossible here: no identity skip carries channels from 'layer2'"),
    (lambda c: _layer(c, "layer4.1")["config"].update(skip_aware="yes"), "'skip_aware' is 'yes'; it must be true or"),
    (lambda c: _layer(c, "layer4.1")["config"].update(skip_aware=1), "'skip_aware' is 1"),
    (lambda c: _layer(c, "layer3")["config"].update(gate_weight=float("nan")), "'gate_weight' is nan"),
    (lambda c: _layer(c, "layer3")["config"].update(gate_weight=-1), "'gate_weight' is -1"),
    (lambda c: _layer(c, "layer3")["config"].update(rule="lrp"), "'rule' is 'lrp'; it must be one of 'gradient'"),
    (lambda c: _layer(c, "layer3")["config"].update(channels="256"), "'channels' is '256'; it must be a positive"),
    (lambda c: _layer(c, "layer3")["config"].update(channels=128), "merge_weight of 'layer3' has shape"),
    (lambda c: _layer(c, "layer3")["config"].update(upstream="layer3"), "upstream 'layer3' is not before"),
    (lambda c: _layer(c, "layer3")["config"].update(upstream=7), "'upstream' is 7; it must be a layer name"),
    (lambda c: _layer(c, "layer3")["config"].update(gate="psychic"), "gate"),
    (lambda c: _layer(c, "layer3")["config"].update(score_kind="<b>x</b>"), "'score_kind' is '<b>x</b>'; it must be"),
    (lambda c: _layer(c, "layer3")["config"].update(score_kind=3), "'score_kind' is 3; it must be null or a short"),
    (lambda c: _layer(c, "layer4.1").update(suppressed=[]), "'suppressed' disagrees with the stored merge weights"),
    (lambda c: _layer(c, "layer3").update(scores=[0.5, 0.5, 0.5]), "'scores' disagrees"),
    (lambda c: c.update(max_memory=-1), "max_memory -1; it must be a positive integer"),
    (lambda c: c.update(max_memory=True), "max_memory True"),
    (lambda c: c["architecture"].update(dtype="int64"), "dtype 'int64'; a purified model's weights are floating"),
    (lambda c: c["architecture"].update(dtype="float64"), r"dtype torch.float32, expected torch.float64"),
])
def test_impossible_config_values_are_refused(saved, tmp_path, edit, message):
    config = config_of(saved[1])
    edit(config)
    path = rewrite(saved[1], tmp_path / "bad.safetensors", config=config)
    load_both_ways(path, message)


def test_a_skip_aware_flip_that_the_architecture_allows_needs_verify_false(saved, tmp_path):
    config = config_of(saved[1])
    assert _layer(config, "layer4.1")["config"]["skip_aware"] is True
    _layer(config, "layer4.1")["config"]["skip_aware"] = False
    path = rewrite(saved[1], tmp_path / "edited.safetensors", config=config)
    with pytest.raises(FileFormatError, match="config in .* differs from the one saved.*verify=False"):
        purenn.load_purified(path)
    pm2 = purenn.load_purified(path, verify=False)
    assert pm2.pure_layer("layer4.1").skip_aware is False


def test_a_file_without_score_kind_loads_with_none(saved, tmp_path):
    """Files written before the score kind was recorded load; inspect then says the kind is not recorded."""
    config = config_of(saved[1])
    assert {e["config"]["score_kind"] for e in config["layers"]} == {"contrast+upstream"}
    for e in config["layers"]:
        del e["config"]["score_kind"]
    path = rewrite(saved[1], tmp_path / "older.safetensors", config=config)
    pm2 = purenn.load_purified(path, verify=False)
    assert [pm2.pure_layer(n).score_kind for n in pm2.layers] == [None] * len(pm2.layers)


# ------------------------------------------------------------------------------------------ content hashes


def _flip_byte(path, tensor, byte=0):
    """Flip one bit of one byte of a tensor's data, in place in the file (as storage damage would)."""
    raw = bytearray(path.read_bytes())
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    start = 8 + n + header[tensor]["data_offsets"][0]
    raw[start + byte] ^= 0x01
    path.write_bytes(bytes(raw))


@pytest.mark.parametrize("tensor", ["base_model.layer2.0.conv1.weight", "purenn.layer3.centroids",
                                    "base_model.fc.bias", "purenn.layer4.1.scores"])
def test_a_flipped_byte_is_named(saved, tmp_path, tensor):
    _, path = saved
    bad = tmp_path / "flipped.safetensors"
    bad.write_bytes(path.read_bytes())
    _flip_byte(bad, tensor)
    with pytest.raises(FileFormatError, match=f"tensor '{tensor}' in .* differs from what was saved"):
        purenn.load_purified(bad)


def test_the_first_differing_tensor_is_named(saved, tmp_path):
    key_a, key_b = "base_model.fc.weight", "base_model.layer1.0.bn1.weight"
    tensors = {**edited(saved[1], key_a, lambda t: t * 1.001), **edited(saved[1], key_b, lambda t: t * 1.001)}
    path = rewrite(saved[1], tmp_path / "two.safetensors", tensors=tensors)
    with pytest.raises(FileFormatError, match=f"tensor '{key_a}' .* differs"):  # sorted by name
        purenn.load_purified(path)
    pm2 = purenn.load_purified(path, verify=False)  # edited on purpose: loads, values are valid
    assert torch.equal(pm2.base_model.fc.weight, tensors[key_a])


def test_a_file_without_hashes_loads_with_a_warning(saved, tmp_path):
    _, metadata = read_raw(saved[1])
    del metadata[pio.HASH_KEY]
    path = rewrite(saved[1], tmp_path / "old.safetensors", metadata=metadata)
    with pytest.warns(UserWarning, match="no content hashes .* verify=False"):
        purenn.load_purified(path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        purenn.load_purified(path, verify=False)
    assert not [w for w in caught if "content hashes" in str(w.message)]


@pytest.mark.parametrize("value", ["not json", "[]", '{"algorithm": "md5", "config": "", "tensors": {}}'])
def test_malformed_hashes_are_refused(saved, tmp_path, value):
    _, metadata = read_raw(saved[1])
    metadata[pio.HASH_KEY] = value
    path = rewrite(saved[1], tmp_path / "m.safetensors", metadata=metadata)
    with pytest.raises(FileFormatError, match="content hashes .* malformed"):
        purenn.load_purified(path)
    purenn.load_purified(path, verify=False)


def test_verify_must_be_a_bool(saved):
    with pytest.raises(ConfigError, match="verify must be True or False"):
        purenn.load_purified(saved[1], verify="no")


# ------------------------------------------------------------------------------------------ export


@pytest.mark.parametrize("where", ["pure.layer3.centroids", "pure.layer4_1.merge_weight", "base_model.bn1.running_var"])
def test_export_refuses_non_finite_buffers(saved, tmp_path, where):
    pm = copy.deepcopy(saved[0])
    with torch.no_grad():
        pm.get_buffer(where).view(-1)[0] = float("nan")
    with pytest.raises(ExportError, match="holds NaN or infinite values"):
        purenn.export_onnx(pm, tmp_path / "m.onnx", input_shape=(3, 32, 32))
    assert list(tmp_path.iterdir()) == []
