import numpy as np
import pytest
import torch

from purenn.analysis.probe import extract_features
from purenn.analysis.unlearn import (
    concept_shares,
    find_concept_neurons,
    group_accuracy,
    suppress_concept,
    unlearning_report,
)
from purenn.errors import ConfigError, DataError


def test_concept_shares_mass(planted_pm, planted_model):
    _, _, test = planted_model
    shares = concept_shares(planted_pm, "layer4", test, test.fine)
    v = planted_pm.pure_layer("layer4").n_virtual
    assert shares.shape == (4, v)
    s = shares.sum(0)
    assert np.allclose(s[s > 0], 1)
    # by hand: the per-label mean of each pure feature, normalised over labels
    f = extract_features(planted_pm, test, layer="layer4")
    y = test.fine.numpy()
    mean = np.stack([f[y == c].mean(0) for c in range(4)])
    tot = mean.sum(0)
    np.testing.assert_allclose(shares[:, tot > 0], mean[:, tot > 0] / tot[tot > 0], rtol=1e-5)


def test_concept_shares_refs(planted_pm, planted_model):
    _, train, _ = planted_model
    pl = planted_pm.pure_layer("layer4")
    shares = concept_shares(planted_pm, "layer4", labels=train.fine, by="refs")
    y = train.fine.numpy()
    for k, c in enumerate(pl.neurons.tolist()):
        for j in range(int(pl.n_clusters[k])):
            v = planted_pm.virtual_index("layer4", c, j)
            members = pl.ref_indices[k][pl.ref_clusters[k] == j].numpy()
            expect = np.bincount(y[members], minlength=4) / max(len(members), 1)
            np.testing.assert_allclose(shares[:, v], expect)
    unpurified = sorted(set(range(512)) - set(pl.neurons.tolist()))[0]
    assert (shares[:, planted_pm.virtual_index("layer4", unpurified)] == 0).all()
    with pytest.raises(DataError, match="purified on"):
        concept_shares(planted_pm, "layer4", labels=train.fine[:5], by="refs")


def test_find_and_suppress_concept(planted_pm, planted_model):
    _, _, test = planted_model
    found = find_concept_neurons(planted_pm, "layer4", test, test.fine, concept=1, threshold=0.4)
    assert found.indices and all(s >= 0.4 for s in found.share)
    assert found.share == sorted(found.share, reverse=True)
    assert np.allclose(found.shares[found.indices], found.share)
    vc = planted_pm.pure_layer("layer4").v_channel
    assert found.channels == sorted({int(vc[i]) for i in found.indices})
    split = find_concept_neurons(planted_pm, "layer4", test, test.fine, concept=1, threshold=0.4, split_only=True)
    purified = set(planted_pm.pure_layer("layer4").neurons.tolist())
    assert set(split.channels) <= purified and set(split.indices) <= set(found.indices)
    top = find_concept_neurons(planted_pm, "layer4", test, test.fine, concept=1, threshold=0.4, top=2)
    assert top.indices == found.indices[:2]

    x = test.images[:8]
    with torch.no_grad():
        before = planted_pm(x)
    handle, found2 = suppress_concept(planted_pm, "layer4", test, test.fine, concept=1, threshold=0.4)
    assert found2.indices == found.indices
    rows = planted_pm.virtual_neurons
    assert {r.index for r in rows if r.suppressed} == set(found.indices)
    handle.remove()
    with torch.no_grad():
        assert torch.equal(planted_pm(x), before)


def test_unlearning_report_matches_manual_suppression(planted_pm, planted_model):
    _, _, test = planted_model
    concept, partner = 0, 1  # h-stripes and disk share superclass 0
    found = find_concept_neurons(planted_pm, "layer4", test, test.fine, concept=concept, threshold=0.5)
    rep = unlearning_report(planted_pm, found, test, test.coarse, test.fine, partner=partner)
    assert rep.before.shape == (4,) and (rep.before > 0.9).all()
    np.testing.assert_allclose(rep.before, group_accuracy(planted_pm, test, test.coarse, test.fine))
    with planted_pm.suppress("layer4", found.indices):
        np.testing.assert_allclose(rep.after_virtual, group_accuracy(planted_pm, test, test.coarse, test.fine))
        # what is switched off carries at least as much of the concept's activation mass as of any other label
        f = extract_features(planted_pm, test, layer="layer4")
    y = test.fine.numpy()
    full = extract_features(planted_pm, test, layer="layer4")
    removed = np.array([(full[y == c] - f[y == c]).mean(0).sum() for c in range(4)])
    assert removed[concept] == removed.max() > 0
    pl = planted_pm.pure_layer("layer4")
    whole = [v for v in range(pl.n_virtual) if int(pl.v_channel[v]) in found.channels]
    assert set(found.indices) <= set(whole)
    with planted_pm.suppress("layer4", whole):
        np.testing.assert_allclose(rep.after_whole, group_accuracy(planted_pm, test, test.coarse, test.fine))
    assert rep.drop(concept) == pytest.approx(rep.before[concept] - rep.after_virtual[concept])
    assert rep.selectivity() == pytest.approx(rep.drop(concept) / max(rep.drop(partner), 1e-3))
    # the report leaves the model as it was
    assert not any(r.suppressed for r in planted_pm.virtual_neurons)
    with pytest.raises(ConfigError, match="partner"):
        unlearning_report(planted_pm, found, test, test.coarse, test.fine).selectivity()


def test_group_accuracy(planted_model):
    model, _, test = planted_model
    acc = group_accuracy(model, test, test.coarse, test.fine, n_groups=5)
    with torch.no_grad():
        correct = (model(test.images).argmax(1) == test.coarse).numpy()
    y = test.fine.numpy()
    np.testing.assert_allclose(acc[:4], [correct[y == g].mean() for g in range(4)])
    assert np.isnan(acc[4])
    with pytest.raises(DataError):
        group_accuracy(model, test, test.coarse[:3], test.fine)


def test_unlearn_errors(planted_pm, planted_model):
    _, _, test = planted_model
    with pytest.raises(ConfigError, match="by must"):
        concept_shares(planted_pm, "layer4", test, test.fine, by="votes")
    with pytest.raises(DataError, match="labelled data"):
        concept_shares(planted_pm, "layer4", labels=test.fine)
    with pytest.raises(DataError, match="one per sample"):
        concept_shares(planted_pm, "layer4", test, test.fine[:10])
    with pytest.raises(ConfigError, match="threshold"):
        find_concept_neurons(planted_pm, "layer4", test, test.fine, concept=0, threshold=0)
    with pytest.raises(ConfigError, match="concept"):
        find_concept_neurons(planted_pm, "layer4", test, test.fine, concept=9)
    with pytest.raises(ConfigError, match="top"):
        find_concept_neurons(planted_pm, "layer4", test, test.fine, concept=0, top=0)
    no_zeros = test.fine.clone()
    no_zeros[no_zeros == 0] = 1  # a concept without examples holds no share anywhere
    with pytest.raises(DataError, match="no virtual neuron"):
        suppress_concept(planted_pm, "layer4", test, no_zeros, concept=0)
