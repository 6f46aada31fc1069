"""Bad input to purify_model gets a purenn error that names the problem, before any heavy work."""

import pytest
import torch
import torchvision
from torch import nn
from torch.utils.data import DataLoader, IterableDataset, TensorDataset

import purenn
from purenn.errors import ConfigError, DataError, LayerError, PurennError, UnsupportedModelError

from conftest import tiny_resnet


@pytest.fixture(scope="module")
def model():
    return tiny_resnet()


@pytest.fixture(scope="module")
def data():
    return torch.rand(12, 3, 32, 32)


def purify(model, data, **kw):
    kw.setdefault("n_refs", 4)
    kw.setdefault("progress", False)
    kw.setdefault("layers", ["layer4"])
    return purenn.purify_model(model, data=data, **kw)


def test_non_resnet(data):
    with pytest.raises(UnsupportedModelError, match="not a torchvision ResNet"):
        purify(torchvision.models.mobilenet_v3_small(), data)


def test_custom_forward_is_detected(data):
    class Odd(torchvision.models.ResNet):
        def forward(self, x):
            return super().forward(x) * 2

    m = Odd(torchvision.models.resnet.BasicBlock, [1, 1, 1, 1]).eval()
    with pytest.raises(UnsupportedModelError, match="forward"):
        purify(m, data)


@pytest.mark.parametrize(
    "kw,err,match",
    [
        (dict(layers=["layer7"]), LayerError, "unknown layer"),
        (dict(layers=[]), LayerError, "non-empty"),
        (dict(layers=["maxpool"]), LayerError, "stem"),
        (dict(layers=["layer4", "layer4.1"]), LayerError, "same layer"),
        (dict(upstream={"layer4": "layer4.1"}), LayerError, "not before"),
        (dict(upstream={"layer4": "layer4"}), LayerError, "not before"),
        (dict(upstream={"layer3": "layer2"}), LayerError, "not being purified"),
        (dict(n_clusters=1), ConfigError, "n_clusters"),
        (dict(n_clusters=5, n_refs=4), ConfigError, "exceeds n_refs"),
        (dict(n_clusters=2.5), ConfigError, "n_clusters"),
        (dict(n_refs=0), ConfigError, "n_refs"),
        (dict(n_refs=13), DataError, "fewer than n_refs"),
        (dict(neurons={"layer4": []}), ConfigError, "empty"),
        (dict(neurons={"layer4": [512]}), ConfigError, "out of range"),
        (dict(neurons={"layer4": [-1]}), ConfigError, "out of range"),
        (dict(neurons={"layer4": [1, 1]}), ConfigError, "duplicates"),
        (dict(neurons={"layer4": ["a"]}), ConfigError, "integers"),
        (dict(neurons=[1, 2]), ConfigError, "dict"),
        (dict(batch_size=0), ConfigError, "batch_size"),
        (dict(skip_aware="yes"), ConfigError, "skip_aware"),
        (dict(skip_aware=True), ConfigError, "identity skip"),
        (dict(max_memory=0), ConfigError, "max_memory"),
        (dict(seed=-1), ConfigError, "seed"),
    ],
)
def test_bad_options(model, data, kw, err, match):
    with pytest.raises(err, match=match):
        purify(model, data, **kw)


def test_errors_are_also_builtin_types(model, data):
    with pytest.raises(ValueError):
        purify(model, data, n_clusters=0)
    with pytest.raises(PurennError):
        purify(model, data, layers=["nope"])


def test_shuffled_dataloader(model, data):
    loader = DataLoader(TensorDataset(data), batch_size=4, shuffle=True)
    with pytest.raises(DataError, match="shuffle"):
        purify(model, loader)


def test_iterable_data_without_indices(model, data):
    class Stream(IterableDataset):
        def __iter__(self):
            yield from data

    with pytest.raises(DataError, match="stable"):
        purify(model, Stream())
    with pytest.raises(DataError, match="stable"):
        purify(model, DataLoader(Stream(), batch_size=4))
    with pytest.raises(DataError, match="stable"):
        purify(model, (x for x in data))
    with pytest.raises(DataError):
        purify(model, None)


def test_nan_inputs(model, data):
    bad = data.clone()
    bad[7, 0, 3, 3] = float("nan")
    with pytest.raises(DataError, match="NaN"):
        purify(model, bad)
    bad = data.clone()
    bad[0] = float("inf")
    with pytest.raises(DataError, match="NaN or infinite"):
        purify(model, bad)


def test_non_tensor_samples(model):
    class Pil(torch.utils.data.Dataset):
        def __len__(self):
            return 8

        def __getitem__(self, i):
            return "an image", 0

    with pytest.raises(DataError, match="ToTensor"):
        purify(model, Pil())


def test_wrong_data_shape(model):
    with pytest.raises(DataError, match="shape"):
        purify(model, torch.rand(12, 32, 32))


def test_model_is_not_modified_by_a_failed_call(model, data):
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ConfigError):
        purify(model, data, neurons={"layer4": [9999]})
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())


def test_accepted_data_forms_agree(model, data):
    labels = torch.arange(12)
    kw = dict(neurons={"layer4": [0, 1, 2]}, n_refs=4, seed=1)
    a = purify(model, data, **kw)
    b = purify(model, TensorDataset(data, labels), **kw)
    c = purify(model, DataLoader(TensorDataset(data, labels), batch_size=5), **kw)
    ca = a.pure_layer("layer4").centroids
    assert torch.equal(ca, b.pure_layer("layer4").centroids)
    assert torch.equal(ca, c.pure_layer("layer4").centroids)


def test_module_without_parameters_is_refused(data):
    with pytest.raises(UnsupportedModelError):
        purify(nn.Identity(), data)
