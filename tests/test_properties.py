"""Property-based tests (hypothesis) of purenn's invariants over random small ResNets, layers, neurons
and inputs: the purified model computes the original logits, exactly one virtual neuron of each
purified neuron carries its activation map, a save/load round trip changes nothing, and suppress then
restore (handles removed in any order) returns to the original."""

from __future__ import annotations

import functools
import tempfile
from pathlib import Path

import pytest
import torch
import torchvision
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn
from torchvision.models.resnet import BasicBlock, Bottleneck

import purenn

from conftest import calibrate_bn

SPECS = (("basic", (1, 1, 1, 1)), ("basic", (2, 1, 1, 2)), ("bottleneck", (1, 1, 1, 1)), ("basic", (1, 2, 2, 1)))
SETTINGS = settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@functools.cache
def base(spec: tuple[str, tuple[int, ...]]) -> nn.Module:
    block, layers = spec
    torch.manual_seed(len(layers) + sum(layers))
    model = torchvision.models.ResNet(BasicBlock if block == "basic" else Bottleneck, list(layers), num_classes=4)
    return calibrate_bn(model, torch.rand(8, 3, 32, 32, generator=torch.Generator().manual_seed(1)))


def channels(spec, stage: int) -> int:
    return 64 * 2 ** (stage - 1) * (1 if spec[0] == "basic" else 4)


@st.composite
def cases(draw):
    """(spec, target layer, neurons, fit size, input batch)."""
    spec = draw(st.sampled_from(SPECS))
    stage = draw(st.integers(1, 4))
    names = [f"layer{stage}"] + [f"layer{stage}.{i}" for i in range(1, spec[1][stage - 1])]
    layer = draw(st.sampled_from(names))
    neurons = draw(st.lists(st.integers(0, channels(spec, stage) - 1), min_size=1, max_size=3, unique=True))
    batch = draw(st.integers(1, 3))
    size = draw(st.integers(12, 40))
    seed = draw(st.integers(0, 2**16))
    x = torch.rand(batch, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 0.5
    return spec, layer, neurons, x


def purify(spec, layer, neurons) -> tuple[nn.Module, purenn.PurifiedModel]:
    model = base(spec)
    data = torch.rand(8, 3, 24, 24, generator=torch.Generator().manual_seed(7))
    pm = purenn.purify_model(model, [layer], data, n_refs=4, neurons={layer: neurons}, progress=False)
    return model, pm


def layer_output(model: nn.Module, layer: str, x: torch.Tensor) -> torch.Tensor:
    out = {}
    handle = dict(model.named_modules())[layer].register_forward_hook(lambda m, i, o: out.setdefault("a", o))
    try:
        with torch.no_grad():
            model(x)
    finally:
        handle.remove()
    return out["a"]


@SETTINGS
@given(cases())
def test_same_logits(case):
    spec, layer, neurons, x = case
    model, pm = purify(spec, layer, neurons)
    with torch.no_grad():
        torch.testing.assert_close(pm(x), model(x), rtol=1e-5, atol=1e-5)


@SETTINGS
@given(cases())
def test_exactly_one_virtual_neuron_carries_each_purified_neuron(case):
    spec, layer, neurons, x = case
    model, pm = purify(spec, layer, neurons)
    pl = pm.pure_layer(layer)
    maps = pm.pure_features(x, pool=None)[layer]
    gates = pm.gates(x)[layer]
    act = layer_output(model, layer, x)
    assert maps.shape[1] == pl.n_virtual == pl.channels + int((pl.n_clusters - 1).sum())
    for k, channel in enumerate(pl.neurons.tolist()):
        virtual = [pm.virtual_index(layer, channel, c) for c in range(int(pl.n_clusters[k]))]
        for b in range(x.shape[0]):
            chosen = int(gates[b, k])
            assert 0 <= chosen < len(virtual)
            for c, v in enumerate(virtual):
                if c == chosen:
                    torch.testing.assert_close(maps[b, v], act[b, channel], rtol=0, atol=0)
                else:
                    assert (maps[b, v] == 0).all()
        torch.testing.assert_close(maps[:, virtual].sum(1), act[:, channel], rtol=0, atol=0)


@SETTINGS
@given(cases(), st.booleans())
def test_save_load_round_trip(case, suppress):
    spec, layer, neurons, x = case
    _, pm = purify(spec, layer, neurons)
    if suppress:
        pm.suppress(layer, [pm.virtual_index(layer, neurons[0], 0)])
    with tempfile.TemporaryDirectory() as tmp:
        path = pm.save(Path(tmp) / "pm.safetensors")
        pm2 = purenn.load_purified(path)
        assert sorted(p.name for p in Path(tmp).iterdir()) == ["pm.safetensors"]
    assert torch.equal(pm2(x), pm(x))
    g1, g2 = pm.gates(x), pm2.gates(x)
    assert g1.keys() == g2.keys() and all(torch.equal(g1[k], g2[k]) for k in g1)
    assert torch.equal(pm2.pure_features(x)[layer], pm.pure_features(x)[layer])
    assert [v.suppressed for v in pm2.virtual_neurons] == [v.suppressed for v in pm.virtual_neurons]


@SETTINGS
@given(cases(), st.data())
def test_suppress_then_restore_returns_to_the_original(case, data):
    spec, layer, neurons, x = case
    _, pm = purify(spec, layer, neurons)
    n_virtual = pm.pure_layer(layer).n_virtual
    before_logits, before = pm(x), pm.pure_features(x)[layer]
    groups = data.draw(st.lists(st.lists(st.integers(0, n_virtual - 1), min_size=1, max_size=4), min_size=1,
                                max_size=4))
    handles = [pm.suppress(layer, g) for g in groups]
    off = sorted({i for g in groups for i in g})
    feats = pm.pure_features(x)[layer]
    assert (feats[:, off] == 0).all()
    order = data.draw(st.permutations(range(len(handles))))
    for i in order:
        handles[i].remove()
    assert (pm.pure_layer(layer).merge_weight == 1).all()
    assert torch.equal(pm(x), before_logits) and torch.equal(pm.pure_features(x)[layer], before)
    with pm.suppress(layer, off):
        pass
    pm.suppress(layer, off)
    pm.restore(layer)
    assert torch.equal(pm.pure_features(x)[layer], before)


@pytest.mark.parametrize("spec", SPECS, ids=[f"{b}-{''.join(map(str, layers))}" for b, layers in SPECS])
def test_strategy_models_are_resnets(spec):
    """The models the properties draw from are ResNets purenn recognises (a guard on the strategy)."""
    purenn.arch.ResNetSpec(base(spec))
