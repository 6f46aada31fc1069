import numpy as np
import pytest
import torch

import purenn
from purenn import CircuitKMeans
from purenn.errors import ConfigError, LayerError


def _blobs(n_blobs, rng, n=60, d=32, sep=2.0, noise=0.1):
    """``n`` points in ``n_blobs`` well separated Gaussian blobs (one blob = unimodal)."""
    centres = sep * np.eye(d)[rng.permutation(d)[:n_blobs]] + rng.normal(0, 0.3, d)
    return centres[np.arange(n) % n_blobs] + rng.normal(0, noise, (n, d))


@pytest.mark.parametrize("d", [4, 32, 256])
def test_auto_finds_planted_cluster_counts(d):
    rng = np.random.default_rng(d)
    x = np.stack([_blobs(b, rng, d=d) for b in (1, 2, 3, 1, 4)])
    km = CircuitKMeans("auto", max_clusters=4, random_state=0).fit(x)
    assert km.n_clusters_.tolist() == [1, 2, 3, 1, 4]
    assert km.centroids_.shape == (5, 4, d)
    # unsplit neurons: one centroid (the mean), all references in it, padding rows zero
    np.testing.assert_allclose(km.centroids_[0, 0], x[0].mean(0))
    assert (km.centroids_[0, 1:] == 0).all() and km.counts_[0].tolist() == [60, 0, 0, 0]
    assert (km.labels_[0] == 0).all()
    # split neurons recover their blobs
    truth = np.arange(60) % 3
    from sklearn.metrics import adjusted_rand_score

    assert adjusted_rand_score(truth, km.labels_[2]) == 1.0
    # a unimodal blob has no silhouette excess over the null; planted splits have a large one
    assert km.gaps_[[1, 2, 4]].min() > 0.15 > 0.05 > km.gaps_[[0, 3]].max()
    # predict never picks padding rows
    pred = km.predict(x.transpose(1, 0, 2))
    assert (pred[:, 0] == 0).all() and (pred[:, 3] == 0).all()
    np.testing.assert_array_equal(pred[:, 2], km.labels_[2])


def test_auto_respects_max_clusters_and_thresholds():
    rng = np.random.default_rng(1)
    x = _blobs(4, rng)[None]
    assert CircuitKMeans("auto", max_clusters=2).fit(x).n_clusters_.tolist() == [2]
    assert CircuitKMeans("auto", max_clusters=3).fit(x).n_clusters_.tolist() == [3]
    # a very high bar keeps every neuron whole
    assert CircuitKMeans("auto", min_gap=0.99).fit(x).n_clusters_.tolist() == [1]
    # at most n - 1 clusters are tried
    assert CircuitKMeans("auto", max_clusters=10).fit(_blobs(2, rng, n=4)[None]).n_clusters_[0] <= 3


def test_auto_errors():
    x = np.zeros((1, 10, 3))
    for bad in ({"max_clusters": 1}, {"max_clusters": 2.5}, {"min_gap": "x"}):
        with pytest.raises(ConfigError):
            CircuitKMeans("auto", **bad).fit(x)
    with pytest.raises(ConfigError, match="at least 3"):
        CircuitKMeans("auto").fit(np.zeros((1, 2, 3)))
    with pytest.raises(ConfigError, match="'auto'"):
        CircuitKMeans("many").fit(x)


def test_dead_neuron_stays_whole():
    km = CircuitKMeans("auto").fit(np.zeros((1, 12, 5)))
    assert km.n_clusters_.tolist() == [1] and np.isfinite(km.centroids_).all()


def test_purify_auto(planted_model):
    model, train, test = planted_model
    chans = list(range(0, 512, 8))
    full = purenn.purify_model(model, ["layer4"], train, n_refs=12, neurons={"layer4": chans}, n_clusters="auto",
                               max_clusters=3, progress=False)
    pl = full.pure_layer("layer4")
    counts = pl.n_clusters.tolist()
    assert set(counts) <= {1, 2, 3} and 1 in counts and max(counts) > 1
    assert pl.n_virtual == 512 + sum(c - 1 for c in counts)
    x = test.images[:12]
    with torch.no_grad():
        torch.testing.assert_close(full(x), model(x), rtol=1e-5, atol=1e-6)
        gates = full.gates(x)["layer4"]
        feats = full.pure_features(x)["layer4"]
    whole = pl.n_clusters == 1
    assert (gates[:, whole] == 0).all()
    assert (gates < pl.n_clusters[None]).all()
    assert feats.shape == (12, pl.n_virtual)
    # the sum of a channel's virtual neurons is the channel
    merged = torch.zeros(12, 512).index_add_(1, pl.v_channel, feats)
    with torch.no_grad():
        a = model.layer4(model.layer3(model.layer2(model.layer1(model.relu(model.bn1(model.conv1(x)))))))
    torch.testing.assert_close(merged, a.mean(dim=(2, 3)), rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_purify_top_n_by_score(planted_model):
    model, train, _ = planted_model
    every = purenn.purify_model(model, ["layer4"], train, n_refs=8, progress=False).pure_layer("layer4")
    expected = np.sort(np.argsort(-every.scores.numpy(), kind="stable")[:5])
    for neurons in (5, {"layer4": 5}):
        top = purenn.purify_model(model, ["layer4"], train, n_refs=8, neurons=neurons, progress=False)
        tl = top.pure_layer("layer4")
        assert tl.neurons.tolist() == expected.tolist()
        torch.testing.assert_close(tl.scores, every.scores[expected])
        torch.testing.assert_close(tl.centroids, every.centroids[expected])
        assert tl.n_clusters.tolist() == [2] * 5


def test_purify_neuron_count_and_auto_validation(planted_model):
    model, train, _ = planted_model
    kw = {"n_refs": 6, "progress": False}
    with pytest.raises(ConfigError, match="between 1 and"):
        purenn.purify_model(model, ["layer4"], train, neurons=0, **kw)
    with pytest.raises(ConfigError, match="between 1 and"):
        purenn.purify_model(model, ["layer4"], train, neurons={"layer4": 513}, **kw)
    with pytest.raises(LayerError, match="not being purified"):
        purenn.purify_model(model, ["layer4"], train, neurons={"layer3": 4}, **kw)
    with pytest.raises(ConfigError, match="max_clusters"):
        purenn.purify_model(model, ["layer4"], train, n_clusters="auto", max_clusters=1, **kw)
    with pytest.raises(ConfigError, match="n_clusters"):
        purenn.purify_model(model, ["layer4"], train, n_clusters="several", **kw)
    with pytest.raises(ConfigError, match="n_refs >= 3"):
        purenn.purify_model(model, ["layer4"], train, n_clusters="auto", n_refs=2, progress=False)
