import numpy as np
import pytest
import torch

import purenn
from purenn import circuit_relevance
from purenn.errors import ConfigError, LayerError

from conftest import adapted_stem_resnet, autograd_relevance, make_model, tiny_resnet


def _data(n, c=3, h=32, w=32, seed=0, dtype=torch.float32):
    return torch.rand(n, c, h, w, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def _layer_output(model, name, x):
    store = {}
    mod = dict(model.named_modules())[name]
    handle = mod.register_forward_hook(lambda m, i, o: store.__setitem__("o", o.detach().clone()))
    with torch.no_grad():
        model(x)
    handle.remove()
    return store["o"]


@pytest.fixture(scope="module")
def tiny_pm():
    model = tiny_resnet("basic", dtype=torch.float64)
    pm = purenn.purify_model(
        model, ["layer3", "layer4.1"], _data(48, dtype=torch.float64), n_refs=10, progress=False,
        neurons={"layer3": list(range(0, 64, 3))},
    )
    return model, pm


LOGIT_CASES = {
    "resnet18": lambda: make_model("resnet18", size=(97, 131)),
    "resnet50": lambda: make_model("resnet50", size=(97, 131)),
    "resnext50_32x4d": lambda: make_model("resnext50_32x4d", size=(97, 131)),
    "adapted_stem": lambda: adapted_stem_resnet(in_ch=3),
}


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n in ("resnext50_32x4d", "adapted_stem")
                                  else n for n in LOGIT_CASES])
def test_purified_logits_equal_original(name):
    model = LOGIT_CASES[name]()
    data = _data(10, h=97, w=131, seed=3)
    pm = purenn.purify_model(
        model, ["layer4", "layer3.1"], data, n_refs=4, progress=False,
        neurons={"layer4": list(range(0, 64, 8)), "layer3.1": [1, 2, 3]},
    )
    for b in (1, 5):
        x = _data(b, h=97, w=131, seed=10 + b)
        with torch.no_grad():
            ref = model(x)
            torch.testing.assert_close(pm(x), ref, rtol=1e-5, atol=0)
            gates = pm.gates(x)
            feats = pm.pure_features(x)
        assert gates["layer4"].shape == (b, 8) and gates["layer4"].dtype == torch.int64
        assert feats["layer4"].shape == (b, model.fc.in_features + 8)
        assert all(torch.isfinite(f).all() for f in feats.values())


def test_gates_partition_the_activation(tiny_pm):
    model, pm = tiny_pm
    x = _data(6, seed=11, dtype=torch.float64)
    for layer in pm.layers:
        pl = pm.pure_layer(layer)
        a = _layer_output(model, layer, x)
        maps = pm.pure_features(x, pool=None)[layer]
        assert maps.shape == (6, pl.n_virtual, *a.shape[-2:])
        channel = pl.v_channel
        merged = torch.zeros_like(a).index_add_(1, channel, maps)
        assert torch.equal(merged, a)  # virtual neurons sum to a_k exactly
        for k in pl.neurons.tolist():
            vs = (channel == k).nonzero().flatten()
            carrying = (maps[:, vs].flatten(2).abs().sum(-1) > 0).sum(1)
            live = a[:, k].flatten(1).abs().sum(-1) > 0
            assert torch.equal(carrying, live.long())  # exactly one virtual neuron carries a live a_k
        pooled = pm.pure_features(x, pool="mean")[layer]
        torch.testing.assert_close(pooled, maps.mean(dim=(-2, -1)))
        pooled_max = pm.pure_features(x, pool="max")[layer]
        torch.testing.assert_close(pooled_max, maps.amax(dim=(-2, -1)))


def test_gates_are_nearest_centroid_of_circuit_relevance(tiny_pm):
    model, pm = tiny_pm
    x = _data(7, seed=12, dtype=torch.float64)
    gates = pm.gates(x)
    for layer in pm.layers:
        pl = pm.pure_layer(layer)
        neurons = pl.neurons.tolist()
        # independent: autograd relevance, numpy distances
        r = autograd_relevance(model, x, layer, pl.upstream, neurons, drop_self=pl.skip_aware).numpy()
        mu = pl.centroids.numpy()
        expected = ((r[:, :, None, :] - mu[None]) ** 2).sum(-1).argmin(-1)
        np.testing.assert_array_equal(gates[layer].numpy(), expected)
        torch.testing.assert_close(
            circuit_relevance(pm, x, layer, neurons, skip_aware=pl.skip_aware), torch.from_numpy(r)
        )
    assert pm.pure_layer("layer4.1").skip_aware and not pm.pure_layer("layer3").skip_aware


def test_centroids_fit_the_reference_circuits(tiny_pm):
    model, pm = tiny_pm
    data = _data(48, dtype=torch.float64)
    pl = pm.pure_layer("layer3")
    j = 2
    k = int(pl.neurons[j])
    refs = pl.ref_indices[j]
    r = autograd_relevance(model, data[refs], "layer3", "layer2", [k])[:, 0].numpy()
    labels = pl.ref_clusters[j].numpy()
    for c in range(2):
        np.testing.assert_allclose(pl.centroids[j, c].numpy(), r[labels == c].mean(0), rtol=1e-6, atol=1e-9)
    # references are the top activating samples of the neuron
    acts = _layer_output(model, "layer3", data)[:, k].amax(dim=(-2, -1))
    top = torch.topk(acts, 10).values
    torch.testing.assert_close(acts[refs], top)


def test_same_seed_same_centroids_and_gates():
    model = tiny_resnet()
    data = _data(30, seed=2)
    kw = dict(n_refs=8, progress=False, neurons={"layer4": list(range(16))}, seed=3)
    a = purenn.purify_model(model, ["layer4"], data, **kw)
    b = purenn.purify_model(model, ["layer4"], data, **kw)
    assert torch.equal(a.pure_layer("layer4").centroids, b.pure_layer("layer4").centroids)
    x = _data(5, seed=9)
    assert torch.equal(a.gates(x)["layer4"], b.gates(x)["layer4"])


def test_suppress_acts_only_through_the_suppressed_virtual_neuron(tiny_pm):
    model, pm = tiny_pm
    x = _data(8, seed=13, dtype=torch.float64)
    pl = pm.pure_layer("layer3")
    k = int(pl.neurons[4])
    gates = pm.gates(x)["layer3"][:, 4]
    c = int(gates[0])
    v = pm.virtual_index("layer3", k, c)
    with torch.no_grad():
        before = pm(x)
        handle = pm.suppress("layer3", [v])
        after = pm(x)

        def hook(m, i, o):
            o = o.clone()
            o[gates == c, k] = 0
            return o

        h = model.layer3.register_forward_hook(hook)
        expected = model(x)
        h.remove()
    torch.testing.assert_close(after, expected, rtol=1e-10, atol=1e-12)
    assert not torch.equal(after[gates == c], before[gates == c])
    assert torch.equal(after[gates != c], before[gates != c])
    assert [r.suppressed for r in pm.virtual_neurons if r.layer == "layer3" and r.index == v] == [True]
    handle.remove()
    with torch.no_grad():
        assert torch.equal(pm(x), before)
        with pm.suppress("layer3", [v]):
            assert torch.equal(pm(x), after)
        assert torch.equal(pm(x), before)
        pm.suppress("layer3", [v, v + 1])
        pm.restore("layer3")
        assert torch.equal(pm(x), before)


def test_suppress_whole_neuron_and_unsplit_channel(tiny_pm):
    model, pm = tiny_pm
    x = _data(4, seed=14, dtype=torch.float64)
    unsplit = 1  # layer3 purifies channels 0, 3, 6, ...
    v = pm.virtual_index("layer3", unsplit)
    with torch.no_grad(), pm.suppress("layer3", [v]):
        out = pm(x)
        h = model.layer3.register_forward_hook(lambda m, i, o: o * (torch.arange(o.shape[1]) != unsplit)[:, None, None])
        ref = model(x)
        h.remove()
    torch.testing.assert_close(out, ref)


def test_unload_returns_untouched_model():
    model = tiny_resnet()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    pm = purenn.purify_model(model, ["layer4"], _data(20), n_refs=5, progress=False, neurons={"layer4": [0, 1]})
    pm.suppress("layer4", [0])
    base = pm.unload()
    assert base is model
    assert state.keys() == base.state_dict().keys()
    assert all(torch.equal(state[k], v) for k, v in base.state_dict().items())


def test_dead_neuron_yields_zero_virtual_neurons_and_no_nan():
    model = tiny_resnet()
    with torch.no_grad():
        blk = model.layer4[1]
        blk.bn2.weight[5] = 0
        blk.bn2.bias[5] = -1e3
    pm = purenn.purify_model(model, ["layer4.1"], _data(20), n_refs=6, progress=False, neurons={"layer4.1": [4, 5]})
    pl = pm.pure_layer("layer4.1")
    assert torch.isfinite(pl.centroids).all() and (pl.centroids[1] == 0).all()
    assert pl.scores[1] == 0
    x = _data(3, seed=5)
    maps = pm.pure_features(x, pool=None)["layer4.1"]
    assert torch.isfinite(maps).all()
    assert (maps[:, (pl.v_channel == 5)] == 0).all()
    assert set(pm.gates(x)["layer4.1"][:, 1].tolist()) <= {0, 1}
    with torch.no_grad():
        torch.testing.assert_close(pm(x), model(x))


def test_virtual_neuron_table(tiny_pm):
    _, pm = tiny_pm
    rows = [r for r in pm.virtual_neurons if r.layer == "layer3"]
    pl = pm.pure_layer("layer3")
    assert pl.channels == 256
    assert len(rows) == 256 + len(pl.neurons) * (2 - 1)
    assert [r.index for r in rows] == list(range(len(rows)))
    assert [r.channel for r in rows] == sorted(r.channel for r in rows)  # channels keep their order, expand in place
    split = [r for r in rows if r.channel == 3]
    assert [r.cluster for r in split] == [0, 1] and sum(r.n_refs for r in split) == 10
    assert split[0].score is not None and -1 <= split[0].score <= 1
    assert [r.score for r in rows if r.channel == 1] == [None]


def test_bad_suppress_and_layer_queries(tiny_pm):
    _, pm = tiny_pm
    with pytest.raises(LayerError, match="not purified"):
        pm.suppress("layer2", [0])
    with pytest.raises(ConfigError, match="out of range"):
        pm.suppress("layer3", [10_000])
    with pytest.raises(ConfigError, match="empty"):
        pm.suppress("layer3", [])
    with pytest.raises(ConfigError, match="no virtual neuron"):
        pm.virtual_index("layer3", 1, 1)
    with pytest.raises(ConfigError, match="pool"):
        pm.pure_features(torch.rand(1, 3, 32, 32, dtype=torch.float64), pool="sum")
    with pytest.raises(ConfigError, match="inference-only"):
        pm.train()
    with pytest.raises(purenn.DataError, match="NaN"):
        pm(torch.full((1, 3, 32, 32), float("nan"), dtype=torch.float64))


def test_overlapping_segments_gate_on_the_same_circuits():
    model = tiny_resnet("bottleneck", dtype=torch.float64)
    data = _data(30, seed=21, dtype=torch.float64)
    pm = purenn.purify_model(
        model, ["layer4.0", "layer4"], data, n_refs=6, progress=False,
        neurons={"layer4.0": [0, 1, 2], "layer4": [3, 4, 5]},
    )
    x = _data(5, seed=22, dtype=torch.float64)
    gates = pm.gates(x)
    with torch.no_grad():
        torch.testing.assert_close(pm(x), model(x), rtol=1e-12, atol=0)
    for layer in ("layer4.0", "layer4"):
        pl = pm.pure_layer(layer)
        r = autograd_relevance(model, x, layer, pl.upstream, pl.neurons.tolist(), drop_self=pl.skip_aware).numpy()
        expected = ((r[:, :, None, :] - pl.centroids.numpy()[None]) ** 2).sum(-1).argmin(-1)
        np.testing.assert_array_equal(gates[layer].numpy(), expected)
