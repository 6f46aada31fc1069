"""Hostile inputs and faults: every case gets a purenn error of the exact class (or the correct result),
nothing of the caller's changes, and no file is left behind.

Areas: purify_model arguments (models, layers, options, data), runtime use of a purified model (inputs,
empty batches, scalars, suppression, threads, dtype moves), circuit_relevance, files (saving, loading
damaged, edited and foreign files, kills during save), ONNX export arguments, and every CLI command.
"""

from __future__ import annotations

import copy
import json
import os
import pickle
import signal
import subprocess
import sys
import threading
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image
from safetensors.torch import save_file
from torch import nn
from torch.utils.data import DataLoader, IterableDataset, TensorDataset
from torchvision.models.resnet import BasicBlock

import purenn
from purenn.cli.app import main
from purenn.errors import (
    ConfigError,
    DataError,
    ExportError,
    FileFormatError,
    LayerError,
    PurennError,
    UnsupportedModelError,
)
from purenn.io import files as _files

from conftest import calibrate_bn

SIZE = 16
NEURONS = {"layer4": [0, 1, 2], "layer3": [0, 1]}
ROOT = Path(__file__).resolve().parents[1]


# ============================================================================================ fixtures
def tiny_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = torchvision.models.ResNet(BasicBlock, [1, 1, 1, 1], num_classes=3)
    return calibrate_bn(model, torch.rand(8, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(seed + 1)))


def images(n: int, seed: int = 0, c: int = 3, size: int = SIZE) -> torch.Tensor:
    return torch.rand(n, c, size, size, generator=torch.Generator().manual_seed(seed))


def snapshot(model: nn.Module) -> dict:
    """Everything of a model a call could change: tensors (values, dtype, device) and train/eval modes."""
    return {"state": {k: v.detach().clone() for k, v in model.state_dict().items()},
            "modes": [m.training for m in model.modules()]}


def assert_unchanged(model: nn.Module, snap: dict) -> None:
    state = model.state_dict()
    assert state.keys() == snap["state"].keys()
    for k, v in snap["state"].items():
        assert state[k].dtype == v.dtype and state[k].device == v.device, k
        assert torch.equal(state[k], v), k
    assert [m.training for m in model.modules()] == snap["modes"]


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in Path(folder).rglob("*") if _files.TEMP_TAG in p.name or p.name.startswith(".tmp"))


@pytest.fixture(scope="module")
def tiny():
    """(caller's model, its data, the purified model, a snapshot of the model)."""
    model = tiny_model()
    data = images(12, seed=3)
    pm = purenn.purify_model(model, list(NEURONS), data, n_refs=4, neurons=NEURONS, progress=False)
    return model, data, pm, snapshot(model)


@pytest.fixture(scope="module")
def saved(tiny, tmp_path_factory) -> Path:
    return tiny[2].save(tmp_path_factory.mktemp("saved") / "pm.safetensors")


@pytest.fixture
def guard(tiny):
    """Checks after the test that the caller's model, data and the purified model did not change."""
    model, data, pm, snap = tiny
    data0 = data.clone()
    weights = {name: pm.pure_layer(name).merge_weight.clone() for name in pm.layers}
    yield
    assert_unchanged(model, snap)
    assert torch.equal(data, data0)
    for name in pm.layers:
        assert torch.equal(pm.pure_layer(name).merge_weight, weights[name])


# ============================================================================================ purify_model
class _Stream(IterableDataset):
    def __iter__(self):
        return iter(images(12))


class _CustomForward(torchvision.models.ResNet):
    def forward(self, x):
        return super().forward(x) * 2


def _custom_forward_model() -> nn.Module:
    torch.manual_seed(0)
    return _CustomForward(BasicBlock, [1, 1, 1, 1], num_classes=3).eval()


def _pil(n: int = 12) -> list:
    return [Image.new("RGB", (SIZE, SIZE), color=(i * 20, 0, 0)) for i in range(n)]


# (id, model factory or None for the tiny model, overrides of purify_model's arguments, error class)
PURIFY_BAD = [
    ("model-none", lambda: None, {}, UnsupportedModelError),
    ("model-string", lambda: "resnet18", {}, UnsupportedModelError),
    ("model-linear", lambda: nn.Linear(3, 3), {}, UnsupportedModelError),
    ("model-sequential", lambda: nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU()), {}, UnsupportedModelError),
    ("model-custom-forward", _custom_forward_model, {}, UnsupportedModelError),
    ("layers-empty", None, {"layers": []}, LayerError),
    ("layers-unknown", None, {"layers": ["layer5"]}, LayerError),
    ("layers-empty-name", None, {"layers": [""]}, LayerError),
    ("layers-stem", None, {"layers": ["maxpool"]}, LayerError),
    ("layers-fc", None, {"layers": ["fc"]}, LayerError),
    ("layers-block-out-of-range", None, {"layers": ["layer4.9"]}, LayerError),
    ("layers-twice", None, {"layers": ["layer4", "layer4"]}, LayerError),
    ("layers-same-output", None, {"layers": ["layer4", "layer4.0"]}, LayerError),
    ("layers-int", None, {"layers": [4]}, LayerError),
    ("layers-none", None, {"layers": None}, LayerError),
    ("upstream-after", None, {"layers": ["layer3"], "upstream": {"layer3": "layer4"}}, LayerError),
    ("upstream-self", None, {"upstream": {"layer4": "layer4"}}, LayerError),
    ("upstream-unknown", None, {"upstream": {"layer4": "layer9"}}, LayerError),
    ("upstream-other-layer", None, {"upstream": {"layer2": "layer1"}}, LayerError),
    ("upstream-not-mapping", None, {"upstream": "layer3"}, ConfigError),
    ("neurons-empty", None, {"neurons": {"layer4": []}}, ConfigError),
    ("neurons-out-of-range", None, {"neurons": {"layer4": [512]}}, ConfigError),
    ("neurons-negative", None, {"neurons": {"layer4": [-1]}}, ConfigError),
    ("neurons-duplicate", None, {"neurons": {"layer4": [1, 1]}}, ConfigError),
    ("neurons-float", None, {"neurons": {"layer4": [0.5]}}, ConfigError),
    ("neurons-bool", None, {"neurons": {"layer4": [True]}}, ConfigError),
    ("neurons-string", None, {"neurons": {"layer4": "0"}}, ConfigError),
    ("neurons-other-layer", None, {"neurons": {"layer2": [0]}}, LayerError),
    ("neurons-count-zero", None, {"neurons": 0}, ConfigError),
    ("neurons-count-too-many", None, {"neurons": 10**6}, ConfigError),
    ("neurons-not-mapping", None, {"neurons": "all"}, ConfigError),
    ("neurons-2d-tensor", None, {"neurons": {"layer4": torch.zeros(2, 2, dtype=torch.long)}}, ConfigError),
    ("n_refs-zero", None, {"n_refs": 0}, ConfigError),
    ("n_refs-negative", None, {"n_refs": -3}, ConfigError),
    ("n_refs-float", None, {"n_refs": 4.0}, ConfigError),
    ("n_refs-string", None, {"n_refs": "4"}, ConfigError),
    ("n_refs-bool", None, {"n_refs": True}, ConfigError),
    ("n_refs-nan", None, {"n_refs": float("nan")}, ConfigError),
    ("n_refs-float-tensor", None, {"n_refs": torch.tensor(4.0)}, ConfigError),
    ("n_refs-more-than-data", None, {"n_refs": 13}, DataError),
    ("n_clusters-one", None, {"n_clusters": 1}, ConfigError),
    ("n_clusters-above-refs", None, {"n_clusters": 5}, ConfigError),
    ("n_clusters-word", None, {"n_clusters": "two"}, ConfigError),
    ("n_clusters-inf", None, {"n_clusters": float("inf")}, ConfigError),
    ("n_clusters-auto-few-refs", None, {"n_clusters": "auto", "n_refs": 2}, ConfigError),
    ("max_clusters-one", None, {"max_clusters": 1}, ConfigError),
    ("gate-unknown", None, {"gate": "oracle"}, ConfigError),
    ("gate-none", None, {"gate": None}, ConfigError),
    ("gate_weight-nan", None, {"gate_weight": float("nan")}, ConfigError),
    ("gate_weight-inf", None, {"gate_weight": float("inf")}, ConfigError),
    ("gate_weight-negative", None, {"gate_weight": -0.5}, ConfigError),
    ("gate_weight-string", None, {"gate_weight": "0.5"}, ConfigError),
    ("score-unknown", None, {"score": "entropy"}, ConfigError),
    ("skip_aware-string", None, {"skip_aware": "yes"}, ConfigError),
    ("skip_aware-without-identity", None, {"layers": ["layer3"], "skip_aware": True}, ConfigError),
    ("batch_size-zero", None, {"batch_size": 0}, ConfigError),
    ("batch_size-float", None, {"batch_size": 2.5}, ConfigError),
    ("batch_size-nan", None, {"batch_size": float("nan")}, ConfigError),
    ("device-meta", None, {"device": "meta"}, ConfigError),
    ("device-nonsense", None, {"device": "gpu please"}, ConfigError),
    ("device-int-list", None, {"device": [0]}, ConfigError),
    ("seed-negative", None, {"seed": -1}, ConfigError),
    ("seed-too-large", None, {"seed": 2**40}, ConfigError),
    ("seed-float", None, {"seed": 0.5}, ConfigError),
    ("max_memory-nan", None, {"max_memory": float("nan")}, ConfigError),
    ("max_memory-inf", None, {"max_memory": float("inf")}, ConfigError),
    ("max_memory-zero", None, {"max_memory": 0}, ConfigError),
    ("max_memory-negative", None, {"max_memory": -1024}, ConfigError),
    ("max_memory-string", None, {"max_memory": "1GB"}, ConfigError),
    ("max_memory-half-byte", None, {"max_memory": 0.5}, ConfigError),
    ("cache_memory-negative", None, {"cache_memory": -1}, ConfigError),
    ("cache_memory-nan", None, {"cache_memory": float("nan")}, ConfigError),
    ("data-none", None, {"data": None}, DataError),
    ("data-empty-list", None, {"data": []}, DataError),
    ("data-3d-tensor", None, {"data": images(12)[0]}, DataError),
    ("data-5d-tensor", None, {"data": images(12)[None]}, DataError),
    ("data-uint8", None, {"data": (images(12) * 255).to(torch.uint8)}, DataError),
    ("data-int64", None, {"data": (images(12) * 255).long()}, DataError),
    ("data-bool", None, {"data": images(12) > 0.5}, DataError),
    ("data-nan", None, {"data": images(12).index_fill(0, torch.tensor([0]), float("nan"))}, DataError),
    ("data-inf", None, {"data": images(12).index_fill(0, torch.tensor([1]), float("inf"))}, DataError),
    ("data-nan-late", None, {"data": images(12).index_fill(0, torch.tensor([10]), float("nan"))}, DataError),
    ("data-pil-list", None, {"data": _pil()}, DataError),
    ("data-pil-labelled", None, {"data": [(im, 0) for im in _pil()]}, DataError),
    ("data-pil-image", None, {"data": _pil(1)[0]}, DataError),
    ("data-string", None, {"data": "images/"}, DataError),
    ("data-dict", None, {"data": {"x": images(12)}}, DataError),
    ("data-iterable", None, {"data": _Stream()}, DataError),
    ("data-shuffled-loader", None, {"data": DataLoader(TensorDataset(images(12)), shuffle=True)}, DataError),
    ("data-uint8-dataset", None, {"data": TensorDataset((images(12) * 255).to(torch.uint8))}, DataError),
    ("data-too-few", None, {"data": images(3)}, DataError),
    ("data-one-channel", None, {"data": images(12, c=1)}, DataError),
    ("data-generator", None, {"data": (x for x in images(12))}, DataError),
]


@pytest.mark.parametrize("name, factory, overrides, error", PURIFY_BAD, ids=[c[0] for c in PURIFY_BAD])
def test_purify_refuses(tiny, name, factory, overrides, error):
    model = tiny[0] if factory is None else factory()
    snap = snapshot(model) if isinstance(model, nn.Module) else None
    data = overrides.get("data", tiny[1])
    data0 = data.clone() if isinstance(data, torch.Tensor) else None
    kwargs = {"layers": ["layer4"], "data": tiny[1], "n_refs": 4, "neurons": {"layer4": [0, 1]}, "progress": False}
    if "neurons" in overrides or "layers" in overrides or "upstream" in overrides:
        kwargs.pop("neurons")
    kwargs.update(overrides)
    with pytest.raises(error) as info:
        purenn.purify_model(model, **kwargs)
    assert isinstance(info.value, PurennError)
    if snap is not None:
        assert_unchanged(model, snap)
    if data0 is not None:
        assert torch.equal(data.nan_to_num(), data0.nan_to_num()) and torch.equal(data.isnan(), data0.isnan())


def _gates_agree(pm_a, pm_b, x):
    ga, gb = pm_a.gates(x), pm_b.gates(x)
    return all(torch.equal(ga[k], gb[k]) for k in ga)


# (id, overrides) that purify_model accepts with the result of the plain call
PURIFY_ACCEPTS = [
    ("n_refs-numpy", {"n_refs": np.int64(4)}),
    ("n_clusters-tensor", {"n_clusters": torch.tensor(2)}),
    ("n_clusters-numpy", {"n_clusters": np.int32(2)}),
    ("neurons-numpy-scalars", {"neurons": {"layer4": [np.int64(0), np.int64(1)]}}),
    ("neurons-tensor-scalars", {"neurons": {"layer4": [torch.tensor(0), torch.tensor(1)]}}),
    ("neurons-1d-tensor", {"neurons": {"layer4": torch.tensor([1, 0])}}),
    ("neurons-numpy-array", {"neurons": {"layer4": np.array([0, 1])}}),
    ("seed-numpy", {"seed": np.int64(0)}),
    ("batch_size-numpy", {"batch_size": np.int16(5)}),
    ("max_memory-float", {"max_memory": 2.0**20}),
    ("data-float64", {"data": "float64"}),
    ("data-float16", {"data": "float16"}),
    ("data-unshuffled-loader", {"data": "loader"}),
    ("data-dataset", {"data": "dataset"}),
]


@pytest.fixture(scope="module")
def reference_pm(tiny):
    model, data = tiny[0], tiny[1]
    return purenn.purify_model(model, ["layer4"], data, n_refs=4, neurons={"layer4": [0, 1]}, progress=False)


@pytest.mark.parametrize("name, overrides", PURIFY_ACCEPTS, ids=[c[0] for c in PURIFY_ACCEPTS])
def test_purify_accepts_equivalent_values(tiny, reference_pm, name, overrides):
    model, data = tiny[0], tiny[1]
    snap = snapshot(model)
    overrides = dict(overrides)
    kind = overrides.get("data")
    if kind == "float64":
        overrides["data"] = data.double()
    elif kind == "float16":
        overrides["data"] = data.half().float().half()
    elif kind == "loader":
        overrides["data"] = DataLoader(TensorDataset(data), batch_size=5)
    elif kind == "dataset":
        overrides["data"] = TensorDataset(data, torch.zeros(len(data)))
    kwargs = {"layers": ["layer4"], "data": data, "n_refs": 4, "neurons": {"layer4": [0, 1]}, "progress": False}
    kwargs.update(overrides)
    pm = purenn.purify_model(model, **kwargs)
    x = images(4, seed=9)
    torch.testing.assert_close(pm(x), model(x))
    assert pm.pure_layer("layer4").neurons.tolist() == [0, 1]
    if kind != "float16":  # float16 data rounds the inputs, so the references may differ
        assert _gates_agree(pm, reference_pm, x)
        torch.testing.assert_close(pm.pure_layer("layer4").centroids, reference_pm.pure_layer("layer4").centroids)
    assert_unchanged(model, snap)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["float16", "bfloat16"])
def test_half_precision_model_is_purified_in_float32_on_a_copy(tiny, dtype):
    model = copy.deepcopy(tiny[0]).to(dtype)
    with torch.no_grad():  # a dead neuron: an all-zero channel of layer4 (no NaN anywhere)
        for bn in (model.layer4[0].bn2, model.layer4[0].downsample[1]):
            bn.weight[1] = 0
            bn.bias[1] = -100
    snap = snapshot(model)
    data = tiny[1].to(dtype)
    pm = purenn.purify_model(model, ["layer4"], data, n_refs=4, neurons={"layer4": [0, 1]}, progress=False)
    assert_unchanged(model, snap)
    assert pm.pure_layer("layer4").centroids.dtype == torch.float32
    assert pm.base_model is not model and pm.base_model.conv1.weight.dtype == torch.float32
    assert torch.isfinite(pm.pure_layer("layer4").centroids).all()
    x = images(3, seed=5).to(dtype)
    assert (layer4_of(pm.base_model, x.float())[:, 1] == 0).all()
    torch.testing.assert_close(pm(x), pm(x.float()))
    r = purenn.circuit_relevance(model, x, "layer4", [0, 1])
    assert r.dtype == torch.float32 and torch.isfinite(r).all()
    assert_unchanged(model, snap)


def layer4_of(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    out = {}
    handle = model.layer4.register_forward_hook(lambda m, i, o: out.setdefault("a", o))
    with torch.no_grad():
        model(x)
    handle.remove()
    return out["a"]


# ============================================================================================ runtime
def _np_image(n=2):
    return images(n).numpy()


RUN_BAD = [
    ("none", lambda: None, DataError),
    ("list-of-tensors", lambda: [images(1)[0]], DataError),
    ("numpy-array", _np_image, DataError),
    ("3d", lambda: images(1)[0], DataError),
    ("5d", lambda: images(2)[None], DataError),
    ("2d", lambda: images(1)[0, 0], DataError),
    ("uint8", lambda: (images(2) * 255).to(torch.uint8), DataError),
    ("int64", lambda: (images(2) * 255).long(), DataError),
    ("bool", lambda: images(2) > 0.5, DataError),
    ("complex", lambda: images(2).to(torch.complex64), DataError),
    ("nan", lambda: images(2).index_fill(0, torch.tensor([1]), float("nan")), DataError),
    ("inf", lambda: images(2).index_fill(0, torch.tensor([0]), float("inf")), DataError),
    ("float16-overflow", lambda: (images(2) * 1e6).double(), DataError),
    ("pil-image", lambda: _pil(1)[0], DataError),
    ("pil-list", lambda: _pil(2), DataError),
    ("meta", lambda: torch.empty(2, 3, SIZE, SIZE, device="meta"), DataError),
    ("one-channel", lambda: images(2, c=1), DataError),
    ("four-channels", lambda: images(2, c=4), DataError),
    ("channels-last-layout", lambda: images(2).permute(0, 2, 3, 1), DataError),
]


@pytest.mark.parametrize("call", ["forward", "gates", "pure_features", "circuit_relevance"])
@pytest.mark.parametrize("name, make, error", RUN_BAD, ids=[c[0] for c in RUN_BAD])
def test_runtime_refuses_bad_inputs(tiny, guard, call, name, make, error):
    pm = tiny[2]
    x = make()
    if name == "float16-overflow":
        if call == "circuit_relevance":  # computed in float32 (a half model's private copy): no overflow
            r = purenn.circuit_relevance(copy.deepcopy(pm).half(), x, "layer4", [0, 1])
            assert r.dtype == torch.float32 and torch.isfinite(r).all()
            return
        pm = copy.deepcopy(pm).half()  # 1e6 overflows float16: refused as infinite, not run
    fn = {"forward": pm, "gates": pm.gates, "pure_features": pm.pure_features,
          "circuit_relevance": lambda x: purenn.circuit_relevance(pm, x, "layer4", [0, 1])}[call]
    with pytest.raises(error):
        fn(x)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64], ids=str)
def test_float_images_of_another_dtype_are_converted(tiny, guard, dtype):
    pm = tiny[2]
    x = images(3, seed=4).to(dtype)
    ref = x.float()
    torch.testing.assert_close(pm(x), pm(ref))
    assert all(torch.equal(a, b) for a, b in zip(pm.gates(x).values(), pm.gates(ref).values()))
    torch.testing.assert_close(purenn.circuit_relevance(pm, x, "layer4", [0]),
                               purenn.circuit_relevance(pm, ref, "layer4", [0]))
    assert x.dtype == dtype  # the caller's tensor is not converted in place


EMPTY_CALLS = {
    "forward": lambda model, pm, x: pm(x),
    "gates": lambda model, pm, x: pm.gates(x),
    "gates-subset": lambda model, pm, x: pm.gates(x, neurons={"layer4": [2]}),
    "pure_features-mean": lambda model, pm, x: pm.pure_features(x),
    "pure_features-max": lambda model, pm, x: pm.pure_features(x, "max"),
    "pure_features-maps": lambda model, pm, x: pm.pure_features(x, None),
    "circuit_relevance-purified": lambda model, pm, x: purenn.circuit_relevance(pm, x, "layer4", [0, 1]),
    "circuit_relevance-block": lambda model, pm, x: purenn.circuit_relevance(model, x, "layer3.0", [0, 1, 2]),
    "circuit_relevance-skip-aware": lambda model, pm, x: purenn.circuit_relevance(model, x, "layer1", [5],
                                                                                  skip_aware=True),
}


@pytest.mark.parametrize("call", list(EMPTY_CALLS))
@pytest.mark.parametrize("size", [SIZE, 33])
def test_empty_batch_gives_empty_results(tiny, guard, call, size):
    """An empty batch gives results of the shapes (and dtypes) a one-sample batch gives, with 0 rows."""
    model, _, pm, _ = tiny
    fn = EMPTY_CALLS[call]
    empty = fn(model, pm, torch.zeros(0, 3, size, size))
    one = fn(model, pm, torch.zeros(1, 3, size, size))
    if isinstance(one, dict):
        assert empty.keys() == one.keys()
        pairs = [(empty[k], one[k]) for k in one]
    else:
        pairs = [(empty, one)]
    for e, o in pairs:
        assert e.shape == (0, *o.shape[1:]) and e.dtype == o.dtype


# (id, call on pm, error class)
CALL_BAD = [
    ("gates-neurons-empty-dict", lambda pm, x: pm.gates(x, neurons={}), ConfigError),
    ("gates-neurons-list", lambda pm, x: pm.gates(x, neurons=[0]), ConfigError),
    ("gates-neurons-unknown-layer", lambda pm, x: pm.gates(x, neurons={"layer2": [0]}), LayerError),
    ("gates-neurons-not-purified", lambda pm, x: pm.gates(x, neurons={"layer4": [7]}), ConfigError),
    ("gates-neurons-bool", lambda pm, x: pm.gates(x, neurons={"layer4": [True]}), ConfigError),
    ("gates-neurons-float", lambda pm, x: pm.gates(x, neurons={"layer4": [1.0]}), ConfigError),
    ("gates-neurons-string", lambda pm, x: pm.gates(x, neurons={"layer4": "1"}), ConfigError),
    ("gates-neurons-empty-list", lambda pm, x: pm.gates(x, neurons={"layer4": []}), ConfigError),
    ("pure_features-pool-sum", lambda pm, x: pm.pure_features(x, "sum"), ConfigError),
    ("pure_features-pool-true", lambda pm, x: pm.pure_features(x, True), ConfigError),
    ("suppress-unknown-layer", lambda pm, x: pm.suppress("layer2", [0]), LayerError),
    ("suppress-layer-int", lambda pm, x: pm.suppress(4, [0]), LayerError),
    ("suppress-empty", lambda pm, x: pm.suppress("layer4", []), ConfigError),
    ("suppress-negative", lambda pm, x: pm.suppress("layer4", [-1]), ConfigError),
    ("suppress-too-large", lambda pm, x: pm.suppress("layer4", [10**6]), ConfigError),
    ("suppress-float", lambda pm, x: pm.suppress("layer4", [1.5]), ConfigError),
    ("suppress-string", lambda pm, x: pm.suppress("layer4", ["0"]), ConfigError),
    ("suppress-bool", lambda pm, x: pm.suppress("layer4", [True]), ConfigError),
    ("suppress-none", lambda pm, x: pm.suppress("layer4", None), ConfigError),
    ("suppress-float-tensor", lambda pm, x: pm.suppress("layer4", torch.tensor([0.0])), ConfigError),
    ("suppress-2d-array", lambda pm, x: pm.suppress("layer4", np.zeros((1, 1), dtype=int)), ConfigError),
    ("virtual_index-channel-range", lambda pm, x: pm.virtual_index("layer4", 512), ConfigError),
    ("virtual_index-cluster-range", lambda pm, x: pm.virtual_index("layer4", 0, 5), ConfigError),
    ("virtual_index-unsplit-cluster", lambda pm, x: pm.virtual_index("layer4", 9, 1), ConfigError),
    ("virtual_index-float", lambda pm, x: pm.virtual_index("layer4", 1.0), ConfigError),
    ("restore-unknown-layer", lambda pm, x: pm.restore("layer1"), LayerError),
    ("pure_layer-unknown", lambda pm, x: pm.pure_layer("layer4.0"), LayerError),
    ("train-mode", lambda pm, x: pm.train(), ConfigError),
    ("cr-layer-unknown", lambda pm, x: purenn.circuit_relevance(pm, x, "layer9", [0]), LayerError),
    ("cr-neurons-range", lambda pm, x: purenn.circuit_relevance(pm, x, "layer4", [512]), ConfigError),
    ("cr-upstream-after", lambda pm, x: purenn.circuit_relevance(pm, x, "layer3", [0], upstream="layer4"), LayerError),
    ("cr-max_memory-nan", lambda pm, x: purenn.circuit_relevance(pm, x, "layer4", [0], max_memory=float("nan")),
     ConfigError),
    ("cr-max_memory-zero", lambda pm, x: purenn.circuit_relevance(pm, x, "layer4", [0], max_memory=0), ConfigError),
    ("cr-skip-aware-downsample", lambda pm, x: purenn.circuit_relevance(pm, x, "layer4", [0], skip_aware=True),
     ConfigError),
    ("cr-model-linear", lambda pm, x: purenn.circuit_relevance(nn.Linear(2, 2), x, "layer4", [0]),
     UnsupportedModelError),
]


@pytest.mark.parametrize("name, call, error", CALL_BAD, ids=[c[0] for c in CALL_BAD])
def test_runtime_refuses_bad_arguments(tiny, guard, name, call, error):
    with pytest.raises(error):
        call(tiny[2], images(2, seed=1))


@pytest.mark.parametrize("index", [np.int64(3), np.int32(3), torch.tensor(3), np.array(3), [np.int64(3)],
                                   torch.tensor([3]), np.array([3]), (3,), range(3, 4)],
                         ids=["np.int64", "np.int32", "tensor-0d", "ndarray-0d", "list-np", "tensor-1d",
                              "ndarray-1d", "tuple", "range"])
def test_integer_scalars_are_accepted_as_virtual_indices(tiny, guard, index):
    pm = tiny[2]
    x = images(2, seed=6)
    with pm.suppress("layer4", [3]):
        want = pm.pure_features(x)["layer4"]
    with pm.suppress("layer4", index):
        got = pm.pure_features(x)["layer4"]
    assert torch.equal(got, want) and (got[:, 3] == 0).all()
    assert pm.virtual_index("layer4", np.int64(1), torch.tensor(1)) == pm.virtual_index("layer4", 1, 1)
    g = pm.gates(x, neurons={"layer4": [np.int64(2), torch.tensor(0)]})["layer4"]
    assert torch.equal(g, pm.gates(x)["layer4"][:, [2, 0]])


def test_nested_suppression_in_any_order_returns_to_the_original(tiny, guard):
    pm = tiny[2]
    x = images(3, seed=7)
    before = pm.pure_features(x)["layer4"]
    a = pm.suppress("layer4", [0, 1])
    b = pm.suppress("layer4", [1, 2])
    c = pm.suppress("layer4", [1])
    a.remove()
    feats = pm.pure_features(x)["layer4"]
    assert (feats[:, [1, 2]] == 0).all() and torch.equal(feats[:, 0], before[:, 0])
    c.remove()
    c.remove()  # twice: nothing more happens
    assert (pm.pure_features(x)["layer4"][:, [1, 2]] == 0).all()
    b.remove()
    assert torch.equal(pm.pure_features(x)["layer4"], before)
    with pm.suppress("layer4", [4]), pm.suppress("layer4", [4]):
        pass
    assert torch.equal(pm.pure_features(x)["layer4"], before)


def test_threads_compute_what_one_thread_computes(tiny, guard):
    pm = tiny[2]
    xs = [images(2, seed=20 + i) for i in range(4)]
    want = [(pm(x), pm.gates(x)) for x in xs]
    got: list = [None] * 4
    errors: list = []

    def work(i):
        try:
            for _ in range(3):
                got[i] = (pm(xs[i]), pm.gates(xs[i]))
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    for (lw, gw), (lg, gg) in zip(want, got):
        assert torch.equal(lw, lg) and all(torch.equal(gw[k], gg[k]) for k in gw)


def test_threads_suppressing_concurrently_leave_nothing_suppressed(tiny, guard):
    pm = tiny[2]
    errors: list = []

    def work(i):
        try:
            for _ in range(20):
                with pm.suppress("layer4", [i % 3, 3]):
                    pass
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert (pm.pure_layer("layer4").merge_weight == 1).all()


@pytest.mark.parametrize("convert", ["double", "half", "to-float64", "float-after-double"])
def test_dtype_moves_of_the_purified_model_leave_the_callers_model(tiny, guard, convert):
    model, _, pm, _ = tiny
    pm2 = copy.deepcopy(pm)
    pm2.base_model = model  # share the caller's model again, as purify_model does
    pm2._owns_base = False
    x = images(2, seed=8)
    if convert == "double":
        pm2.double()
    elif convert == "half":
        pm2.half()
    elif convert == "to-float64":
        pm2.to(torch.float64)
    else:
        pm2.double().float()
    assert pm2.base_model is not model
    out = pm2(x)  # inputs follow the model's dtype
    torch.testing.assert_close(out.float(), pm(x), rtol=0.05, atol=0.05)


@pytest.mark.parametrize("use", [
    lambda pm, tmp: pm(images(1)),
    lambda pm, tmp: pm.gates(images(1)),
    lambda pm, tmp: pm.pure_features(images(1)),
    lambda pm, tmp: pm.save(tmp / "pm.safetensors"),
    lambda pm, tmp: purenn.export_onnx(pm, tmp / "pm.onnx", input_shape=(3, SIZE, SIZE), verify=False),
], ids=["forward", "gates", "pure_features", "save", "export"])
def test_a_purified_model_moved_to_meta_refuses_to_compute_or_write(tiny, guard, tmp_path, use):
    """``pm.to("meta")`` moves a private copy (the caller's model stays); using it is a ConfigError."""
    model, _, pm, _ = tiny
    pm_meta = copy.deepcopy(pm)
    pm_meta.base_model, pm_meta._owns_base = model, False  # share the caller's model, as purify_model does
    pm_meta.to("meta")
    assert pm_meta.base_model is not model
    with pytest.raises(ConfigError, match="meta"):
        use(pm_meta, tmp_path)
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("size", [1, 2, 7, 33])
def test_small_and_odd_images_give_the_models_logits(tiny, guard, size):
    model, _, pm, _ = tiny
    x = images(2, seed=size, size=size)
    with torch.no_grad():
        torch.testing.assert_close(pm(x), model(x))
    assert {k: tuple(v.shape) for k, v in pm.gates(x).items()} == {"layer3": (2, 2), "layer4": (2, 3)}


def test_callers_model_in_training_mode_changes_nothing(tiny, guard):
    model, _, pm, _ = tiny
    x = images(4, seed=11)
    logits, gates = pm(x), pm.gates(x)
    model.train()
    try:
        assert torch.equal(pm(x), logits)
        assert all(torch.equal(a, b) for a, b in zip(pm.gates(x).values(), gates.values()))
        assert not pm.training
    finally:
        model.eval()  # the guard then checks the BatchNorm statistics did not move


def test_callers_model_converted_afterwards_is_refused(tiny, guard):
    model, data, _, _ = tiny
    mine = copy.deepcopy(model)
    pm = purenn.purify_model(mine, ["layer4"], data, n_refs=4, neurons={"layer4": [0, 1]}, progress=False)
    mine.double()
    with pytest.raises(ConfigError):
        pm(images(1))
    with pytest.raises(ConfigError):
        pm.gates(images(1))


def test_input_on_another_device_is_refused(tiny, guard):
    pm = tiny[2]
    with pytest.raises(DataError, match="move it"):
        pm(torch.empty(1, 3, SIZE, SIZE, device="meta"))


# ============================================================================================ files: saving
def _save_targets(tmp: Path, suffix: str) -> dict:
    (tmp / f"dir{suffix}").mkdir()
    return {"missing-dir": tmp / "nope" / f"pm{suffix}", "is-dir": tmp / f"dir{suffix}",
            "file-as-dir": tmp / "afile" / f"pm{suffix}", "dangling-link-dir": tmp / "link" / f"pm{suffix}",
            "not-a-path": 42, "empty-path": ""}


@pytest.mark.parametrize("case", ["missing-dir", "is-dir", "file-as-dir", "dangling-link-dir", "not-a-path",
                                  "empty-path"])
@pytest.mark.parametrize("writer", ["save", "export", "figure"])
def test_unwritable_targets_are_refused_by_name(tiny, guard, tmp_path, case, writer):
    (tmp_path / "afile").write_text("x")
    (tmp_path / "link").symlink_to(tmp_path / "gone")
    path = _save_targets(tmp_path, {"save": ".safetensors", "export": ".onnx", "figure": ".png"}[writer])[case]
    before = sorted(p.name for p in tmp_path.rglob("*"))
    pm = tiny[2]
    with pytest.raises(ConfigError) as info:
        if writer == "save":
            pm.save(path)
        elif writer == "export":
            purenn.export_onnx(pm, path, input_shape=(3, SIZE, SIZE), verify=False)
        else:
            from purenn.analysis.viz import save_neuron_figure

            save_neuron_figure(pm, "layer4", 0, tiny[1], path)
    if isinstance(path, Path):
        assert str(path.parent if case != "is-dir" else path) in str(info.value)
    assert ".tmp" not in str(info.value)
    assert sorted(p.name for p in tmp_path.rglob("*")) == before


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_saved_files_get_a_normal_files_mode(tiny, guard, tmp_path, umask):
    old = os.umask(umask)
    try:
        path = tiny[2].save(tmp_path / "pm.safetensors")
    finally:
        os.umask(old)
    assert (path.stat().st_mode & 0o777) == 0o666 & ~umask
    os.chmod(path, 0o640)  # an existing file keeps its mode, as with open(path, "w")
    tiny[2].save(path)
    assert (path.stat().st_mode & 0o777) == 0o640
    assert leftovers(tmp_path) == []


def test_saving_onto_a_symlink_writes_the_file_it_points_to(tiny, guard, tmp_path):
    real = tmp_path / "real" / "pm.safetensors"
    real.parent.mkdir()
    real.write_bytes(b"old")
    link = tmp_path / "link.safetensors"
    link.symlink_to(real)
    assert tiny[2].save(link) == link
    assert link.is_symlink() and os.readlink(link) == str(real)
    pm2 = purenn.load_purified(real)
    x = images(2)
    assert torch.equal(pm2(x), tiny[2](x))
    assert leftovers(tmp_path) == []


def test_a_failed_save_keeps_the_old_file_and_leaves_no_temporary(tiny, guard, tmp_path, monkeypatch):
    path = tmp_path / "pm.safetensors"
    path.write_bytes(b"previous contents")

    def boom(tmp, written):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(_files, "_write_hook", boom)
    with pytest.raises(OSError):
        tiny[2].save(path)
    assert path.read_bytes() == b"previous contents"
    assert leftovers(tmp_path) == []


_KILLED_SAVE = """
import sys, time, torch, torchvision
from torchvision.models.resnet import BasicBlock
import purenn
from purenn.io import files as _files
torch.manual_seed(0)
model = torchvision.models.ResNet(BasicBlock, [1, 1, 1, 1], num_classes=3).eval()
pm = purenn.purify_model(model, ["layer4"], torch.rand(6, 3, 16, 16), n_refs=3, neurons={"layer4": [0]},
                         progress=False)
def hang(tmp, written):
    print("WRITING", tmp, flush=True)
    time.sleep(120)
_files._write_hook = hang
pm.save(sys.argv[1])
"""


def test_a_save_killed_with_sigkill_leaves_a_temporary_the_next_save_removes(tiny, guard, tmp_path):
    target = tmp_path / "pm.safetensors"
    other = tmp_path / "other.safetensors"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT / "tests")]),
           "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-c", _KILLED_SAVE, str(target)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)
    try:
        line = proc.stdout.readline()
        assert line.startswith("WRITING"), proc.stderr.read()
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    stale = Path(line.split(maxsplit=1)[1].strip())
    assert stale.exists() and stale.parent == tmp_path and stale.stat().st_size > 0
    assert stale.name.startswith(f".{target.name}{_files.TEMP_TAG}{proc.pid}-")
    assert not target.exists()
    # files the next save must not touch: another target's stale temporary, a live process's
    # temporary, and a file whose name only resembles purenn's
    foreign = tmp_path / f".{other.name}{_files.TEMP_TAG}{proc.pid}-{'0' * 16}"
    live = tmp_path / f".{target.name}{_files.TEMP_TAG}{os.getppid()}-{'1' * 16}"
    similar = tmp_path / f".{target.name}{_files.TEMP_TAG}{proc.pid}-notmine"
    for p in (foreign, live, similar):
        p.write_bytes(b"x")
    tiny[2].save(target)
    assert not stale.exists()
    assert foreign.exists() and live.exists() and similar.exists()
    assert purenn.load_purified(target).layers == tiny[2].layers


# ============================================================================================ files: loading
def _truncate(src: Path, dst: Path, keep) -> Path:
    data = src.read_bytes()
    dst.write_bytes(data[: keep(len(data))])
    return dst


def _flip(src: Path, dst: Path, where) -> Path:
    data = bytearray(src.read_bytes())
    data[where(len(data))] ^= 0x10
    dst.write_bytes(bytes(data))
    return dst


def _edit_header(src: Path, dst: Path, edit) -> Path:
    data = src.read_bytes()
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + n])
    edit(header)
    text = json.dumps(header).encode()
    text += b" " * ((8 - len(text) % 8) % 8)
    dst.write_bytes(len(text).to_bytes(8, "little") + text + data[8 + n :])
    return dst


def _edit_config(header, fn):
    config = json.loads(header["__metadata__"]["purenn"])
    fn(config)
    header["__metadata__"]["purenn"] = json.dumps(config)


def _first_layer(config):
    return config["layers"][0]


# (id, how to make the file from the saved one (src, dst), error class)
LOAD_BAD = [
    ("empty", lambda s, d: (d.write_bytes(b""), d)[1], FileFormatError),
    ("eight-bytes", lambda s, d: _truncate(s, d, lambda n: 8), FileFormatError),
    ("truncated-header", lambda s, d: _truncate(s, d, lambda n: 100), FileFormatError),
    ("truncated-10pct", lambda s, d: _truncate(s, d, lambda n: n // 10), FileFormatError),
    ("truncated-half", lambda s, d: _truncate(s, d, lambda n: n // 2), FileFormatError),
    ("truncated-last-byte", lambda s, d: _truncate(s, d, lambda n: n - 1), FileFormatError),
    ("trailing-garbage", lambda s, d: (d.write_bytes(s.read_bytes() + b"junk"), d)[1], FileFormatError),
    ("random-bytes", lambda s, d: (d.write_bytes(os.urandom(4096)), d)[1], FileFormatError),
    ("huge-header-length", lambda s, d: (d.write_bytes((2**62).to_bytes(8, "little") + b"{}"), d)[1],
     FileFormatError),
    ("text-file", lambda s, d: (d.write_text("hello"), d)[1], FileFormatError),
    ("json-file", lambda s, d: (d.write_text(json.dumps({"purenn": 1})), d)[1], FileFormatError),
    ("pickle-file", lambda s, d: (d.write_bytes(pickle.dumps({"a": 1})), d)[1], FileFormatError),
    ("torch-save", lambda s, d: (torch.save({"w": torch.zeros(2)}, d), d)[1], FileFormatError),
    ("plain-safetensors", lambda s, d: (save_file({"w": torch.zeros(2)}, str(d)), d)[1], FileFormatError),
    ("flipped-weight-byte", lambda s, d: _flip(s, d, lambda n: n - 4000), FileFormatError),
    ("flipped-middle-byte", lambda s, d: _flip(s, d, lambda n: n // 2), FileFormatError),
    ("config-not-json", lambda s, d: _edit_header(s, d, lambda h: h["__metadata__"].update(purenn="{")),
     FileFormatError),
    ("config-missing", lambda s, d: _edit_header(s, d, lambda h: h["__metadata__"].pop("purenn")), FileFormatError),
    ("config-newer-format", lambda s, d: _edit_header(
        s, d, lambda h: _edit_config(h, lambda c: c.update(format_version=99))), FileFormatError),
    ("config-no-layers", lambda s, d: _edit_header(
        s, d, lambda h: _edit_config(h, lambda c: c.update(layers=[]))), FileFormatError),
    ("config-skip-aware-impossible", lambda s, d: _edit_header(
        s, d, lambda h: _edit_config(h, lambda c: _first_layer(c).update(skip_aware=True))), FileFormatError),
    ("config-unknown-gate", lambda s, d: _edit_header(
        s, d, lambda h: _edit_config(h, lambda c: _first_layer(c).update(gate="oracle"))), FileFormatError),
    ("config-upstream-after", lambda s, d: _edit_header(
        s, d, lambda h: _edit_config(h, lambda c: _first_layer(c).update(upstream="layer4"))), FileFormatError),
    ("hash-table-garbage", lambda s, d: _edit_header(s, d, lambda h: h["__metadata__"].update(purenn_sha256="[")),
     FileFormatError),
    ("tensor-dtype-lies", lambda s, d: _edit_header(
        s, d, lambda h: h["base_model.fc.bias"].update(dtype="F16")), FileFormatError),
    ("tensor-removed", lambda s, d: _edit_header(s, d, lambda h: h.pop("base_model.fc.bias")), FileFormatError),
]


@pytest.mark.parametrize("name, make, error", LOAD_BAD, ids=[c[0] for c in LOAD_BAD])
def test_damaged_and_foreign_files_are_refused(saved, tmp_path, name, make, error):
    path = make(saved, tmp_path / "bad.safetensors")
    skeleton = tiny_model()
    snap = snapshot(skeleton)
    before = sorted(os.listdir(tmp_path))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(error):
            purenn.load_purified(path)
        with pytest.raises(error):
            purenn.load_purified(path, model=skeleton)
    assert_unchanged(skeleton, snap)
    assert sorted(os.listdir(tmp_path)) == before


def _edit_tensor(src: Path, dst: Path, name_end: str, edit) -> Path:
    from safetensors import safe_open

    with safe_open(str(src), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
        meta = dict(f.metadata())
    name = next(k for k in sorted(tensors) if k.endswith(name_end))
    tensors[name] = edit(tensors[name].clone())
    save_file(tensors, str(dst), metadata=meta)
    return dst


def _set_first(value):
    def edit(t):
        t.view(-1)[0] = value
        return t
    return edit


# (id, tensor name ending, edit): values no purified model can hold
VALUE_EDITS = [
    ("centroids-nan", "layer4.centroids", _set_first(float("nan"))),
    ("centroids-inf", "layer4.centroids", _set_first(float("inf"))),
    ("merge-weight-7.5", "layer4.merge_weight", _set_first(7.5)),
    ("merge-weight-negative", "layer4.merge_weight", _set_first(-1.0)),
    ("n-clusters-zero", "layer4.n_clusters", _set_first(0)),
    ("n-clusters-huge", "layer4.n_clusters", _set_first(99)),
    ("neurons-out-of-range", "layer4.neurons", _set_first(10**6)),
    ("ref-indices-negative", "layer4.ref_indices", _set_first(-5)),
    ("weight-nan", "base_model.conv1.weight", _set_first(float("nan"))),
    ("running-var-negative", "base_model.bn1.running_var", _set_first(-1.0)),
]


@pytest.mark.parametrize("verify", [True, False], ids=["verify", "no-verify"])
@pytest.mark.parametrize("name, tensor, edit", VALUE_EDITS, ids=[c[0] for c in VALUE_EDITS])
def test_impossible_values_are_refused_even_without_verification(saved, tmp_path, name, tensor, edit, verify):
    path = _edit_tensor(saved, tmp_path / "edited.safetensors", tensor, edit)
    skeleton = tiny_model()
    snap = snapshot(skeleton)
    with pytest.raises(FileFormatError):
        purenn.load_purified(path, model=skeleton, verify=verify)
    assert_unchanged(skeleton, snap)


@pytest.mark.parametrize("path, error", [
    (lambda tmp: tmp / "absent.safetensors", FileNotFoundError),  # the builtin, as open() raises
    (lambda tmp: tmp, FileNotFoundError),
    (lambda tmp: 42, ConfigError),
    (lambda tmp: b"pm.safetensors", ConfigError),
    (lambda tmp: "", ConfigError),
], ids=["absent", "directory", "int", "bytes", "empty"])
def test_load_paths_that_are_not_files(tmp_path, path, error):
    with pytest.raises(error):
        purenn.load_purified(path(tmp_path))
    with pytest.raises(error):
        purenn.io.format.read_config(path(tmp_path))


LOAD_ARGS_BAD = [
    ("verify-string", {"verify": "yes"}, ConfigError),
    ("verify-int", {"verify": 1}, ConfigError),
    ("device-meta", {"device": "meta"}, ConfigError),
    ("device-nonsense", {"device": "abacus"}, ConfigError),
    ("model-string", {"model": "resnet18"}, ConfigError),
    ("model-state-dict", {"model": {"conv1.weight": torch.zeros(1)}}, ConfigError),
]


@pytest.mark.parametrize("name, kwargs, error", LOAD_ARGS_BAD, ids=[c[0] for c in LOAD_ARGS_BAD])
def test_load_refuses_bad_arguments(saved, name, kwargs, error):
    with pytest.raises(error):
        purenn.load_purified(saved, **kwargs)


@pytest.mark.parametrize("obj", [lambda t: t[0], lambda t: None, lambda t: {"pm": t[2]}],
                         ids=["plain-model", "none", "dict"])
def test_save_refuses_what_is_not_a_purified_model(tiny, guard, tmp_path, obj):
    with pytest.raises(ConfigError):
        purenn.io.format.save_purified(obj(tiny), tmp_path / "pm.safetensors")
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("skeleton, error", [
    (lambda: torchvision.models.resnet18(num_classes=3), FileFormatError),
    (lambda: torchvision.models.ResNet(BasicBlock, [1, 1, 1, 1], num_classes=5), FileFormatError),
    (lambda: nn.Linear(2, 2), UnsupportedModelError),
])
def test_a_skeleton_that_does_not_fit_is_refused_and_untouched(saved, skeleton, error):
    model = skeleton()
    snap = snapshot(model)
    with pytest.raises(error):
        purenn.load_purified(saved, model=model)
    assert_unchanged(model, snap)


# ============================================================================================ export arguments
EXPORT_BAD = [
    ("input_shape-2d", {"input_shape": (SIZE, SIZE)}, ConfigError),
    ("input_shape-zero", {"input_shape": (3, 0, SIZE)}, ConfigError),
    ("input_shape-channels", {"input_shape": (1, SIZE, SIZE)}, ConfigError),
    ("input_shape-float", {"input_shape": (3, 16.0, SIZE)}, ConfigError),
    ("input_shape-string", {"input_shape": "3,16,16"}, ConfigError),
    ("opset-low", {"opset": 3}, ConfigError),
    ("opset-float", {"opset": 17.0}, ConfigError),
    ("pool-unknown", {"pool": "sum"}, ConfigError),
    ("exporter-unknown", {"exporter": "dynamo"}, ConfigError),
    ("outputs-unknown", {"outputs": ("logits", "probs")}, ConfigError),
    ("outputs-without-logits", {"outputs": ("pure",)}, ConfigError),
    ("rtol-nan", {"rtol": float("nan")}, ConfigError),
    ("atol-negative", {"atol": -1.0}, ConfigError),
    ("tie_rtol-inf", {"tie_rtol": float("inf")}, ConfigError),
    ("max_memory-nan", {"max_memory": float("nan")}, ConfigError),
    ("batch_sizes-zero", {"batch_sizes": (0,)}, ConfigError),
    ("batch_sizes-int", {"batch_sizes": 2}, ConfigError),
    ("inputs-nan", {"inputs": torch.full((1, 3, SIZE, SIZE), float("nan"))}, ConfigError),
    ("not-a-purified-model", {"pm": "model"}, ConfigError),
]


@pytest.mark.parametrize("name, overrides, error", EXPORT_BAD, ids=[c[0] for c in EXPORT_BAD])
def test_export_refuses_bad_arguments(tiny, guard, tmp_path, name, overrides, error):
    kwargs = {"input_shape": (3, SIZE, SIZE), **overrides}
    pm = kwargs.pop("pm", tiny[2])
    if pm == "model":
        pm = tiny[0]
    with pytest.raises(error):
        purenn.export_onnx(pm, tmp_path / "pm.onnx", **kwargs)
    assert os.listdir(tmp_path) == []


def test_export_refuses_non_finite_buffers(tiny, guard, tmp_path):
    pm = copy.deepcopy(tiny[2])
    with torch.no_grad():
        pm.pure_layer("layer4").centroids[0, 0, 0] = float("nan")
    with pytest.raises(ExportError):
        purenn.export_onnx(pm, tmp_path / "pm.onnx", input_shape=(3, SIZE, SIZE), verify=False)
    assert os.listdir(tmp_path) == []


def test_export_writes_through_a_symlink_with_a_normal_mode(tiny, guard, tmp_path):
    real = tmp_path / "real.onnx"
    link = tmp_path / "link.onnx"
    link.symlink_to(real)
    old = os.umask(0o022)
    try:
        purenn.export_onnx(tiny[2], link, input_shape=(3, SIZE, SIZE), verify=False)
    finally:
        os.umask(old)
    assert link.is_symlink() and real.is_file() and real.stat().st_size > 0
    assert (real.stat().st_mode & 0o777) == 0o644
    assert leftovers(tmp_path) == []


# ============================================================================================ CLI
@pytest.fixture(scope="module")
def cli_files(tiny, saved, tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    rng = np.random.default_rng(0)
    for c, name in enumerate(("a", "b")):
        (root / "images" / name).mkdir(parents=True)
        (root / "examples" / ("concept" if c else "other")).mkdir(parents=True)
        for i in range(3):
            img = Image.fromarray((rng.random((SIZE, SIZE, 3)) * 120 + 60 * c).astype(np.uint8))
            img.save(root / "images" / name / f"{i}.png")
            img.save(root / "examples" / ("concept" if c else "other") / f"{i}.png")
    torch.save(tiny[0].state_dict(), root / "model.pt")
    (root / "notes.txt").write_text("not a model")
    return {"root": root, "images": root / "images", "pt": root / "model.pt", "pm": saved,
            "examples": root / "examples", "txt": root / "notes.txt"}


def _argv(files, args):
    return [str(a).format(**{k: str(v) for k, v in files.items()}) for a in args]


_PURIFY = ["purify", "resnet18", "--checkpoint", "{pt}", "--blocks", "1,1,1,1", "--data", "{images}",
           "--out", "{root}/out.safetensors", "-q"]
_SHOW = ["show", "{pm}", "--data", "{images}", "--image-size", "16", "--out", "{root}/fig.png", "-q"]
_UNLEARN = ["unlearn", "resnet18", "--checkpoint", "{pt}", "--blocks", "1,1,1,1", "--examples", "{examples}",
            "--out", "{root}/u.safetensors", "-q"]

# (id, argv, exit code)
CLI_BAD = [
    ("no-command", [], 2),
    ("unknown-command", ["polish"], 2),
    ("purify-image-size-0", _PURIFY + ["--image-size", "0"], 3),
    ("purify-image-size-negative", _PURIFY + ["--image-size", "-16"], 3),
    ("purify-image-size-huge", _PURIFY + ["--image-size", "100000"], 3),
    ("purify-limit-0", _PURIFY + ["--limit", "0"], 3),
    ("purify-n-refs-0", _PURIFY + ["--n-refs", "0"], 3),
    ("purify-max-clusters-1", _PURIFY + ["--max-clusters", "1"], 3),
    ("purify-n-clusters-1", _PURIFY + ["--n-clusters", "1"], 3),
    ("purify-n-clusters-word", _PURIFY + ["--n-clusters", "two"], 2),
    ("purify-batch-size-0", _PURIFY + ["--batch-size", "0"], 3),
    ("purify-workers-negative", _PURIFY + ["--workers", "-1"], 3),
    ("purify-seed-negative", _PURIFY + ["--seed", "-1"], 3),
    ("purify-seed-huge", _PURIFY + ["--seed", str(2**40)], 3),
    ("purify-gate-weight-nan", _PURIFY + ["--gate-weight", "nan"], 3),
    ("purify-gate-weight-negative", _PURIFY + ["--gate-weight", "-1"], 3),
    ("purify-mean-nan", _PURIFY + ["--mean", "nan", "0", "0"], 3),
    ("purify-std-zero", _PURIFY + ["--std", "0", "1", "1"], 3),
    ("purify-std-inf", _PURIFY + ["--std", "inf", "1", "1"], 3),
    ("purify-neurons-0", _PURIFY + ["--neurons", "0"], 3),
    ("purify-neurons-word", _PURIFY + ["--neurons", "many"], 3),
    ("purify-channels-bad", _PURIFY + ["--channels", "layer4:x"], 3),
    ("purify-channels-out-of-range", _PURIFY + ["--channels", "layer4:9999"], 3),
    ("purify-layers-unknown", _PURIFY + ["--layers", "layer9"], 3),
    ("purify-device-bogus", _PURIFY + ["--device", "tpu:9"], 3),
    ("purify-blocks-zero", _PURIFY + ["--blocks", "0,1,1,1"], 2),
    ("purify-out-missing-dir", _PURIFY + ["--out", "{root}/nope/out.safetensors"], 3),
    ("purify-out-wrong-suffix", _PURIFY + ["--out", "{root}/out.pt"], 3),
    ("purify-checkpoint-missing", ["purify", "resnet18", "--checkpoint", "{root}/absent.pt", "--data", "{images}"], 3),
    ("purify-checkpoint-text", ["purify", "resnet18", "--checkpoint", "{txt}", "--data", "{images}"], 3),
    ("purify-arch-unknown", ["purify", "vgg16", "--data", "{images}"], 3),
    ("purify-data-missing", ["purify", "resnet18", "--checkpoint", "{pt}", "--data", "{root}/absent"], 3),
    ("purify-no-data", ["purify", "resnet18", "--checkpoint", "{pt}"], 2),
    ("inspect-top-0", ["inspect", "{pm}", "--top", "0"], 3),
    ("inspect-top-word", ["inspect", "{pm}", "--top", "x"], 2),
    ("inspect-missing", ["inspect", "{root}/absent.safetensors"], 3),
    ("inspect-directory", ["inspect", "{root}"], 3),
    ("inspect-text", ["inspect", "{txt}"], 3),
    ("inspect-checkpoint", ["inspect", "{pt}"], 3),
    ("export-shape-zero", ["export", "{pm}", "{root}/x.onnx", "--input-shape", "3,0,16"], 2),
    ("export-shape-channels", ["export", "{pm}", "{root}/x.onnx", "--input-shape", "1,16,16"], 3),
    ("export-opset-low", ["export", "{pm}", "{root}/x.onnx", "--input-shape", "3,16,16", "--opset", "3"], 3),
    ("export-outputs-bad", ["export", "{pm}", "{root}/x.onnx", "--input-shape", "3,16,16", "--outputs", "probs"], 3),
    ("export-missing-dir", ["export", "{pm}", "{root}/nope/x.onnx", "--input-shape", "3,16,16"], 3),
    ("export-wrong-suffix", ["export", "{pm}", "{root}/x.onx", "--input-shape", "3,16,16"], 3),
    ("export-onnx-as-model", ["export", "{root}/x.onnx", "{root}/y.onnx", "--input-shape", "3,16,16"], 3),
    ("probe-test-fraction-0", ["probe", "{pm}", "--data", "{images}", "--test-fraction", "0"], 3),
    ("probe-test-fraction-1", ["probe", "{pm}", "--data", "{images}", "--test-fraction", "1"], 3),
    ("probe-test-fraction-nan", ["probe", "{pm}", "--data", "{images}", "--test-fraction", "nan"], 3),
    ("probe-seed-negative", ["probe", "{pm}", "--data", "{images}", "--seed", "-5"], 3),
    ("probe-limit-0", ["probe", "{pm}", "--data", "{images}", "--limit", "0"], 3),
    ("probe-missing-model", ["probe", "{root}/absent.safetensors", "--data", "{images}"], 3),
    ("probe-layer-unknown", ["probe", "{pm}", "--data", "{images}", "--layer", "layer1"], 3),
    ("show-dpi-0", _SHOW + ["--dpi", "0"], 3),
    ("show-dpi-huge", _SHOW + ["--dpi", "100000"], 3),
    ("show-n-images-0", _SHOW + ["--n-images", "0"], 3),
    ("show-neuron-negative", _SHOW + ["--neuron", "-1"], 3),
    ("show-neuron-not-purified", _SHOW + ["--neuron", "9"], 3),
    ("show-layer-unknown", _SHOW + ["--layer", "layer1"], 3),
    ("show-out-missing-dir", _SHOW + ["--out", "{root}/nope/fig.png"], 3),
    ("show-image-size-0", ["show", "{pm}", "--data", "{images}", "--image-size", "0"], 3),
    ("unlearn-neurons-0", _UNLEARN + ["--neurons", "0"], 3),
    ("unlearn-rest-clusters-0", _UNLEARN + ["--rest-clusters", "0"], 3),
    ("unlearn-image-size-0", _UNLEARN + ["--image-size", "0"], 3),
    ("unlearn-batch-size-0", _UNLEARN + ["--batch-size", "0"], 3),
    ("unlearn-gate-weight-inf", _UNLEARN + ["--gate-weight", "inf"], 3),
    ("unlearn-examples-missing", ["unlearn", "resnet18", "--checkpoint", "{pt}", "--examples", "{root}/absent"], 3),
    ("unlearn-out-missing-dir", _UNLEARN + ["--out", "{root}/nope/u.safetensors"], 3),
    ("report-top-0", ["report", "{pm}", "--data", "{images}", "--image-size", "16", "--top", "0",
                      "--out", "{root}/rep"], 3),
    ("report-n-images-0", ["report", "{pm}", "--data", "{images}", "--image-size", "16", "--n-images", "0",
                           "--out", "{root}/rep"], 3),
    ("report-out-missing-dir", ["report", "{pm}", "--data", "{images}", "--image-size", "16",
                                "--out", "{root}/nope/rep"], 3),
    ("report-missing-model", ["report", "{root}/absent.safetensors", "--data", "{images}", "--out", "{root}/rep"], 3),
]


@pytest.mark.parametrize("name, args, code", CLI_BAD, ids=[c[0] for c in CLI_BAD])
def test_cli_refuses_with_exit_code_and_one_line(cli_files, capsys, name, args, code):
    root = cli_files["root"]
    before = sorted(str(p.relative_to(root)) for p in root.rglob("*"))
    got = main(_argv(cli_files, args))
    err = capsys.readouterr().err
    assert got == code, err
    if code == 3:  # one line says what is wrong (after any progress notes)
        lines = err.strip().splitlines()
        assert lines[-1].startswith(f"purenn {args[0]}: error:"), err
        assert sum("error" in line for line in lines) == 1, err
    assert sorted(str(p.relative_to(root)) for p in root.rglob("*")) == before


def test_every_cli_command_is_covered():
    from purenn.cli.app import build_parser

    sub = next(a for a in build_parser()._actions if a.dest == "command")
    covered = {c[1][0] for c in CLI_BAD if c[1]}
    assert set(sub.choices) <= covered, set(sub.choices) - covered
