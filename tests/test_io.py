"""Save/load as safetensors: bit-exact round trips, the file layout, and a clear error for every bad file."""

from __future__ import annotations

import functools
import json
import pickle

import pytest
import torch
import torchvision
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

import purenn
import purenn.io.format as pio
from purenn.errors import FileFormatError
from purenn.io import files as _files
from purified_cases import CASE_PARAMS, SUPPRESSED, images, purified

from conftest import adapted_stem_resnet, tiny_resnet

# ------------------------------------------------------------------------------------------ helpers


def outputs(pm, x):
    with torch.no_grad():
        return pm(x), pm.gates(x), pm.pure_features(x, pool=None)


def assert_identical(pm_a, pm_b, x):
    """Bit-identical logits, gates and pure feature maps (pooled features are their means)."""
    logits_a, gates_a, maps_a = outputs(pm_a, x)
    logits_b, gates_b, maps_b = outputs(pm_b, x)
    assert torch.equal(logits_a, logits_b)
    assert gates_a.keys() == gates_b.keys() == maps_a.keys() == maps_b.keys()
    for layer in gates_a:
        assert torch.equal(gates_a[layer], gates_b[layer])
        assert torch.equal(maps_a[layer], maps_b[layer])


def read_raw(path):
    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})


def rewrite(path, tensors, metadata, config=None):
    """Write a modified copy with safetensors itself (independent of purenn.io)."""
    metadata = dict(metadata)
    if config is not None:
        metadata["purenn"] = json.dumps(config)
    save_file(tensors, str(path), metadata=metadata)
    return path


# ------------------------------------------------------------------------------------------ round trips


@pytest.mark.parametrize("name", CASE_PARAMS)
def test_roundtrip_is_bit_exact(name, tmp_path):
    model, pm = purified(name)
    path = pm.save(tmp_path / "pure.safetensors")
    assert path == tmp_path / "pure.safetensors" and path.is_file()
    pm2 = purenn.load_purified(path)
    assert pm2.base_model is not model and not pm2.training
    x = torch.cat([images(2, seed=21), torch.zeros(1, 3, 97, 131)])
    assert_identical(pm, pm2, x)
    # suppression survives: the suppressed virtual neuron is still off and still changes the logits
    suppressed = [(v.layer, v.channel, v.cluster) for v in pm2.virtual_neurons if v.suppressed]
    assert suppressed == [("layer4", c, k) for c, k in SUPPRESSED]
    assert pm2.virtual_neurons == pm.virtual_neurons
    with torch.no_grad():
        assert not torch.equal(pm2(x), model(x))
    pm2.restore()
    with torch.no_grad():
        assert torch.equal(pm2(x), model(x))
    sd, sd2 = model.state_dict(), pm2.base_model.state_dict()
    assert sd.keys() == sd2.keys() and all(torch.equal(sd[k], sd2[k]) for k in sd)


def test_file_layout(tmp_path):
    model, pm = purified("resnet50")
    path = pm.save(tmp_path / "r50.safetensors")
    tensors, metadata = read_raw(path)
    base_keys = {k for k in tensors if k.startswith("base_model.")}
    assert base_keys == {"base_model." + k for k in model.state_dict()}
    for layer in ("layer4", "layer3.1"):
        pl = pm.pure_layer(layer)
        for key in ("neurons", "centroids", "n_clusters", "scores", "merge_weight", "ref_counts"):
            assert torch.equal(tensors[f"purenn.{layer}.{key}"], getattr(pl, key))
    assert set(tensors) - base_keys == {f"purenn.{ly}.{k}" for ly in ("layer4", "layer3.1") for k in
                                        (*purenn.PureLayer.TENSOR_KEYS, "merge_weight")}
    config = json.loads(metadata["purenn"])
    assert config["format_version"] == pio.FORMAT_VERSION and config["purenn_version"] == purenn.__version__
    arch = config["architecture"]
    assert (arch["builder"], arch["block"], arch["layers"], arch["num_classes"], arch["in_channels"]) == (
        "resnet50", "Bottleneck", [3, 4, 6, 3], 7, 3)
    assert arch["stem"]["maxpool"] == {"kernel_size": 3, "stride": 2, "padding": 1}
    by_layer = {e["config"]["layer"]: e for e in config["layers"]}
    assert list(by_layer) == ["layer3.1", "layer4"]
    l4, l31 = by_layer["layer4"], by_layer["layer3.1"]
    assert l4["config"]["upstream"] == "layer3" and l31["config"]["upstream"] == "layer3.0"
    assert l4["config"]["rule"] == "gradient"
    assert l4["n_clusters"] == [2] * 8 and l4["neurons"] == list(range(0, 64, 8))
    assert by_layer["layer4"]["suppressed"] == [pm.virtual_index("layer4", c, k) for c, k in SUPPRESSED]
    assert by_layer["layer3.1"]["suppressed"] == []
    assert len(by_layer["layer4"]["scores"]) == 8
    # the base weights load into a plain torchvision model without purenn
    plain = torchvision.models.resnet50(num_classes=7).eval()
    plain.load_state_dict({k[len("base_model."):]: v for k, v in tensors.items() if k in base_keys})
    x = images(2, seed=5)
    with torch.no_grad():
        assert torch.equal(plain(x), model(x))
    assert pio.read_config(path) == config


def test_builder_detection():
    for name in ("resnet18", "resnet34", "resnet101", "resnet152", "wide_resnet50_2", "wide_resnet101_2",
                 "resnext101_32x8d", "resnext101_64x4d"):
        with torch.device("meta"):
            model = getattr(torchvision.models, name)(num_classes=5)
        arch = pio.describe_architecture(model)
        assert arch["builder"] == name and arch["rebuildable"], name
        rebuilt = pio.build_base_model(arch, device="meta")
        assert pio.describe_architecture(rebuilt) == arch
    with torch.device("meta"):
        dilated = torchvision.models.resnet50(replace_stride_with_dilation=[False, True, True])
    arch = pio.describe_architecture(dilated)
    assert arch["dilation"] == [False, True, True] and arch["builder"] is None and arch["rebuildable"]


def test_adapted_stem_one_channel(tmp_path):
    model = adapted_stem_resnet(in_ch=1)
    data = images(12, seed=4, c=1, size=(28, 28))
    pm = purenn.purify_model(model, ["layer4"], data, n_refs=4, neurons={"layer4": [0, 5, 9]}, progress=False)
    pm.suppress("layer4", [pm.virtual_index("layer4", 5, 0)])
    path = pm.save(tmp_path / "mnist.safetensors")
    arch = pio.read_config(path)["architecture"]
    assert arch["builder"] is None and arch["in_channels"] == 1 and arch["num_classes"] == 10
    assert arch["stem"] == {"kernel_size": [3, 3], "stride": [1, 1], "padding": [1, 1], "bias": False,
                            "maxpool": None}
    pm2 = purenn.load_purified(path)
    assert isinstance(pm2.base_model.maxpool, nn.Identity) and pm2.base_model.conv1.in_channels == 1
    assert_identical(pm, pm2, images(3, seed=8, c=1, size=(28, 28)))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    model = tiny_resnet()
    pm = purenn.purify_model(model, ["layer4"], images(12, seed=1, size=(32, 32)), n_refs=4,
                             neurons={"layer4": [1, 2, 5]}, progress=False)
    path = pm.save(tmp_path_factory.mktemp("tiny") / "tiny.safetensors")
    return model, pm, path


def test_load_into_skeleton(tiny):
    model, pm, path = tiny
    skeleton = tiny_resnet(seed=5)  # same architecture, other weights
    pm2 = purenn.load_purified(path, model=skeleton)
    assert pm2.base_model is skeleton
    assert_identical(pm, pm2, images(3, seed=2, size=(32, 32)))


def test_customised_resnet_needs_a_skeleton(tmp_path):
    norm = functools.partial(nn.BatchNorm2d, eps=1e-3)
    torch.manual_seed(0)
    model = torchvision.models.ResNet(torchvision.models.resnet.BasicBlock, [1, 1, 1, 1], num_classes=3,
                                      norm_layer=norm).eval()
    pm = purenn.purify_model(model, ["layer4"], images(8, seed=1, size=(32, 32)), n_refs=4,
                             neurons={"layer4": [0, 1]}, progress=False)
    path = pm.save(tmp_path / "custom.safetensors")
    assert pio.read_config(path)["architecture"]["rebuildable"] is False
    with pytest.raises(FileFormatError, match="cannot be rebuilt.*model="):
        purenn.load_purified(path)
    skeleton = torchvision.models.ResNet(torchvision.models.resnet.BasicBlock, [1, 1, 1, 1], num_classes=3,
                                         norm_layer=norm)
    assert_identical(pm, purenn.load_purified(path, model=skeleton), images(2, seed=3, size=(32, 32)))


def test_loading_never_unpickles(tiny, monkeypatch):
    _, pm, path = tiny

    def refuse(*args, **kwargs):
        raise AssertionError("load_purified must not unpickle")

    monkeypatch.setattr(torch, "load", refuse)
    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    assert_identical(pm, purenn.load_purified(path), images(2, seed=3, size=(32, 32)))


# ------------------------------------------------------------------------------------------ bad files


def test_truncated_and_garbage_files(tiny, tmp_path):
    _, _, path = tiny
    data = path.read_bytes()
    for name, content in (("half", data[: len(data) // 2]), ("tail_cut", data[:-7]), ("head", data[:6]),
                          ("empty", b""), ("junk", b"this is not a safetensors file at all")):
        bad = tmp_path / f"{name}.safetensors"
        bad.write_bytes(content)
        with pytest.raises(FileFormatError, match="not a readable safetensors file"):
            purenn.load_purified(bad)
    with pytest.raises(FileNotFoundError):
        purenn.load_purified(tmp_path / "absent.safetensors")


def test_not_a_purenn_file(tmp_path):
    path = tmp_path / "plain.safetensors"
    save_file({"w": torch.zeros(2)}, str(path))
    with pytest.raises(FileFormatError, match="not a purenn model"):
        purenn.load_purified(path)


def test_bad_json(tiny, tmp_path):
    _, _, path = tiny
    tensors, metadata = read_raw(path)
    metadata["purenn"] = metadata["purenn"][:-5]
    with pytest.raises(FileFormatError, match="not valid JSON"):
        purenn.load_purified(rewrite(tmp_path / "bad.safetensors", tensors, metadata))
    metadata["purenn"] = "[1, 2]"
    with pytest.raises(FileFormatError, match="must be a JSON object"):
        purenn.load_purified(rewrite(tmp_path / "bad.safetensors", tensors, metadata))


@pytest.mark.parametrize("version, message", [
    (None, "unknown purenn format version None"),
    ("1", "unknown purenn format version '1'"),
    (0, "unknown purenn format version 0"),
    (pio.FORMAT_VERSION + 1, f"format version {pio.FORMAT_VERSION + 1} .*Upgrade purenn"),
])
def test_format_version(tiny, tmp_path, version, message):
    _, _, path = tiny
    tensors, metadata = read_raw(path)
    config = json.loads(metadata["purenn"])
    config["format_version"] = version
    with pytest.raises(FileFormatError, match=message):
        purenn.load_purified(rewrite(tmp_path / "v.safetensors", tensors, metadata, config))


@pytest.mark.parametrize("change, message", [
    ("drop:purenn.layer4.centroids", "missing tensors: purenn.layer4.centroids"),
    ("drop:base_model.fc.bias", "missing tensors: base_model.fc.bias"),
    ("add:purenn.layer4.extra", "unexpected tensors: purenn.layer4.extra"),
    ("shape:base_model.fc.weight", r"'base_model.fc.weight' .* has shape \(3, 511\), expected \(3, 512\)"),
    ("shape:purenn.layer4.centroids", "PureLayer of 'layer4' does not fit this model's channel counts"),
    ("shape:purenn.layer4.n_clusters", "tensors of layer 'layer4' .* do not fit together"),
    ("shape:purenn.layer4.merge_weight", "tensors of layer 'layer4' .* merge_weight"),
    ("dtype:base_model.fc.weight", "'base_model.fc.weight' .* dtype torch.float64, expected torch.float32"),
])
def test_bad_tensors(tiny, tmp_path, change, message):
    _, _, path = tiny
    tensors, metadata = read_raw(path)
    kind, key = change.split(":")
    if kind == "drop":
        del tensors[key]
    elif kind == "add":
        tensors[key] = torch.zeros(3)
    elif kind == "shape":
        tensors[key] = tensors[key][..., :-1].contiguous()
    else:
        tensors[key] = tensors[key].double()
    with pytest.raises(FileFormatError, match=message):
        purenn.load_purified(rewrite(tmp_path / "t.safetensors", tensors, metadata))


def test_config_disagrees_with_tensors(tiny, tmp_path):
    _, _, path = tiny
    tensors, metadata = read_raw(path)
    config = json.loads(metadata["purenn"])
    config["layers"][0]["n_clusters"] = [3, 2, 2]
    with pytest.raises(FileFormatError, match="'n_clusters' disagrees"):
        purenn.load_purified(rewrite(tmp_path / "c.safetensors", tensors, metadata, config))
    config = json.loads(metadata["purenn"])
    del config["layers"][0]["config"]["upstream"]
    with pytest.raises(FileFormatError, match="lacks 'upstream'"):
        purenn.load_purified(rewrite(tmp_path / "c.safetensors", tensors, metadata, config))
    config = json.loads(metadata["purenn"])
    config["layers"][0]["config"]["layer"] = "layer9"
    with pytest.raises(FileFormatError, match="missing tensors: purenn.layer9"):
        purenn.load_purified(rewrite(tmp_path / "c.safetensors", tensors, metadata, config))


def test_unknown_config_key_is_dropped_with_a_warning(tiny, tmp_path):
    _, pm, path = tiny
    tensors, metadata = read_raw(path)
    config = json.loads(metadata["purenn"])
    config["layers"][0]["config"]["future_option"] = 1
    edited = rewrite(tmp_path / "u.safetensors", tensors, metadata, config)
    with pytest.raises(FileFormatError, match="config in .* differs from the one saved"), pytest.warns(UserWarning):
        purenn.load_purified(edited)  # the edit does not match the saved content hash
    with pytest.warns(UserWarning, match=r"ignoring unknown config keys \['future_option'\]"):
        pm2 = purenn.load_purified(edited, verify=False)
    assert_identical(pm, pm2, images(2, seed=3, size=(32, 32)))


def test_skeleton_of_another_architecture(tmp_path):
    _, pm = purified("resnet18")
    path = pm.save(tmp_path / "r18.safetensors")
    message = r"does not fit .*layers: file \[2, 2, 2, 2\], model \[3, 4, 6, 3\]"
    with pytest.raises(FileFormatError, match=message):
        purenn.load_purified(path, model=torchvision.models.resnet34(num_classes=7))
    with pytest.raises(FileFormatError, match="num_classes: file 7, model 1000"):
        purenn.load_purified(path, model=torchvision.models.resnet18())
    with pytest.raises(FileFormatError, match="in_channels: file 3, model 1"):
        purenn.load_purified(path, model=adapted_stem_resnet(in_ch=1, num_classes=7))


# ------------------------------------------------------------------------------------------ atomic writes


def test_failed_write_leaves_no_file(tiny, tmp_path, monkeypatch):
    _, pm, _ = tiny
    def fail_midway(tmp, written):  # after a first chunk: a partial file, as a full disk would leave it
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(_files, "_write_hook", fail_midway)
    target = tmp_path / "out.safetensors"
    with pytest.raises(OSError, match="No space left"):
        pm.save(target)
    assert list(tmp_path.iterdir()) == []
    # an existing file at the target stays as it was
    target.write_bytes(b"previous content")
    with pytest.raises(OSError, match="No space left"):
        pm.save(target)
    assert target.read_bytes() == b"previous content" and list(tmp_path.iterdir()) == [target]
    monkeypatch.setattr(_files, "_write_hook", None)
    pm.save(target)
    assert_identical(pm, purenn.load_purified(target), images(2, seed=3, size=(32, 32)))
    assert list(tmp_path.iterdir()) == [target]
