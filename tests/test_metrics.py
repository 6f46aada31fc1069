import numpy as np
import pytest
import torch

import purenn
from purenn.analysis.metrics import (
    disentanglement,
    embedding_distances,
    embedding_polysemanticity,
    gate_agreement,
    held_out_references,
    label_mix,
    mixed_neurons,
    paired_test,
    purity,
    reference_embeddings,
    score_auroc,
)
from purenn.errors import ConfigError, DataError, LayerError
from purenn.fit.collect import References


def test_purity_and_agreement_known_values():
    assert purity([0, 0, 1, 1], [1, 1, 0, 0]) == 1.0
    assert purity([0, 0, 0, 1], [0, 0, 0, 0]) == 0.75
    assert purity([0, 1, 0, 1], [0, 0, 1, 1]) == 0.5
    perfect = gate_agreement([1, 1, 0, 0, 2], [7, 7, 3, 3, 5])
    assert perfect == {"ari": 1.0, "purity": 1.0}
    rng = np.random.default_rng(0)
    y = np.repeat([0, 1], 500)
    assert abs(gate_agreement(rng.integers(0, 2, 1000), y)["ari"]) < 0.02
    with pytest.raises(DataError):
        purity([0, 1], [0])
    with pytest.raises(DataError):
        purity([], [])


def test_label_mix_and_mixed_neurons():
    refs = np.array([[0] * 10, [0] * 7 + [1] * 3, [0] * 5 + [1] * 4 + [2], [2] * 8 + [1, 0]])
    mix = label_mix(refs, 3)
    np.testing.assert_allclose(mix.sum(1), 1)
    np.testing.assert_allclose(mix[2], [0.5, 0.4, 0.1])
    assert mixed_neurons(refs).tolist() == [False, True, True, False]
    assert mixed_neurons(refs, min_share=0.35).tolist() == [False, False, True, False]
    with pytest.raises(ConfigError):
        mixed_neurons(refs, min_share=0.7)
    with pytest.raises(DataError):
        label_mix(np.zeros(5, dtype=int))


def test_score_auroc_and_paired_test():
    assert score_auroc([0.1, 0.4, 0.35, 0.8], [False, False, True, True]) == 0.75
    assert score_auroc([3, 2, 1], [True, False, False]) == 1.0
    with pytest.raises(DataError, match="both"):
        score_auroc([1, 2], [True, True])
    with pytest.raises(DataError):
        score_auroc([1, 2, 3], [True, False])
    rng = np.random.default_rng(0)
    b = rng.uniform(0, 1, 30)
    assert paired_test(b + 0.1, b) < 1e-5
    assert paired_test(b, b + 0.1) > 0.99
    assert paired_test(b, b) == 1.0
    with pytest.raises(DataError):
        paired_test([1.0], [0.0])


def test_embedding_distances_pure_formula():
    e = np.array([[0.0, 0], [0, 2], [10, 0], [10, 2]])
    intra, inter = embedding_distances(e, [0, 0, 1, 1])
    assert intra == pytest.approx(2.0)
    assert inter == pytest.approx((10 + 10 + 2 * np.sqrt(104)) / 4)
    # a split that cuts across the groups is worse: larger intra, smaller inter
    bad_intra, bad_inter = embedding_distances(e, [0, 1, 0, 1])
    assert bad_intra > intra and bad_inter < inter
    # one cluster: both are the mean pairwise distance
    one = embedding_distances(e, [0, 0, 0, 0])
    assert one[0] == one[1]
    # an embedding function is applied to the images
    imgs = torch.tensor(e, dtype=torch.float32)[:, None, :, None]
    assert embedding_distances(lambda x: x.flatten(1), [0, 0, 1, 1], imgs) == pytest.approx((intra, inter))
    with pytest.raises(ConfigError, match="images"):
        embedding_distances(lambda x: x, [0, 1])
    with pytest.raises(DataError):
        embedding_distances(e, [0, 1])


def test_embedding_polysemanticity_semanticlens_formula():
    rng = np.random.default_rng(1)
    one = rng.normal([1, 1, 0], 0.02, (30, 3))  # one group: centres nearly parallel
    right = np.concatenate([rng.normal([1, 0, 0], 0.02, (15, 3)), rng.normal([0, 1, 0], 0.02, (15, 3))])  # 90 deg
    opposite = np.concatenate([rng.normal([1, 0, 0], 0.02, (15, 3)), rng.normal([-1, 0, 0], 0.02, (15, 3))])
    s = embedding_polysemanticity(np.stack([one, right, opposite]), score="semanticlens")
    assert s[0] < 0.01
    assert abs(s[1] - 1) < 0.05  # 1 - cos(90 deg)
    assert abs(s[2] - 2) < 0.05  # 1 - cos(180 deg)
    # the score of a split is 1 - cos of its k-means centres, checked by hand
    from sklearn.cluster import KMeans

    km = KMeans(2, n_init=10, random_state=0).fit(right)
    c = km.cluster_centers_
    assert s[1] == pytest.approx(1 - c[0] @ c[1] / np.linalg.norm(c[0]) / np.linalg.norm(c[1]))
    # identical references: 0, no NaN; a one-reference cluster uses the lopsided fallback (finite)
    same = np.ones((1, 10, 3))
    assert embedding_polysemanticity(same, score="semanticlens").tolist() == [0.0]
    outlier = np.concatenate([np.ones((9, 3)), [[-5.0, 1, 1]]])[None]
    v = embedding_polysemanticity(outlier, score="semanticlens")
    assert np.isfinite(v).all() and 0 < v[0] < 1
    with pytest.raises(DataError):
        embedding_polysemanticity(np.zeros((4, 3)))
    with pytest.raises(ConfigError):
        embedding_polysemanticity(right[None], n_clusters=1)


def test_embedding_polysemanticity_contrast_weighs_the_balance():
    """The default score is the separation of the k-means centres times the balance of the split:
    a split cutting off two odd references scores far lower than a half/half one, which SemanticLens'
    formula does not tell apart; checked by hand against scikit-learn's k-means."""
    from sklearn.cluster import KMeans

    rng = np.random.default_rng(2)
    half = np.concatenate([rng.normal([1, 0, 0], 0.02, (15, 3)), rng.normal([0, 1, 0], 0.02, (15, 3))])
    odd = np.concatenate([rng.normal([1, 0, 0], 0.02, (28, 3)), rng.normal([0, 1, 0], 0.02, (2, 3))])
    s = embedding_polysemanticity(np.stack([half, odd]))
    sl = embedding_polysemanticity(np.stack([half, odd]), score="semanticlens")
    for i, x in enumerate((half, odd)):
        km = KMeans(2, n_init=10, random_state=0).fit(x)
        c, counts = km.cluster_centers_, np.bincount(km.labels_, minlength=2)
        by_hand = 2 * counts.min() / 30 * (1 - c[0] @ c[1] / np.linalg.norm(c[0]) / np.linalg.norm(c[1]))
        assert s[i] == pytest.approx(by_hand)
    assert s[0] > 0.9 > 0.2 > s[1] and abs(sl[0] - sl[1]) < 0.1
    assert embedding_polysemanticity(np.ones((1, 10, 3))).tolist() == [0.0]
    with pytest.raises(ConfigError, match="score must be"):
        embedding_polysemanticity(half[None], score="clarity")


def test_reference_embeddings_embeds_each_sample_once():
    data = torch.arange(12, dtype=torch.float32).reshape(6, 1, 1, 2)
    refs = References(indices=torch.tensor([[0, 3, 5], [5, 1, 0], [2, 2, 4]]), values=torch.zeros(3, 3))
    seen = []

    def embed(x):
        seen.append(len(x))
        return x.flatten(1) * 2

    e = reference_embeddings(embed, data, refs, channels=[0, 1], batch_size=2)
    assert e.shape == (2, 3, 2)
    assert sum(seen) == 4  # samples 0, 1, 3, 5 once each
    np.testing.assert_allclose(e[1, 0], data[5].flatten() * 2)
    np.testing.assert_allclose(e[0, 1], data[3].flatten() * 2)
    with pytest.raises(ConfigError):
        reference_embeddings("clip", data, refs)
    with pytest.raises(DataError):
        reference_embeddings(lambda x: x.flatten()[:1], data, refs)


def test_held_out_references_rank_by_spatial_max(planted_pm, planted_model):
    model, _, test = planted_model
    refs = held_out_references(planted_pm, test, "layer4", 10, batch_size=64)
    assert refs.indices.shape == (512, 10)
    with torch.no_grad():
        a = model.layer4(model.layer3(model.layer2(model.layer1(model.relu(model.bn1(model.conv1(test.images)))))))
    top = a.amax(dim=(2, 3)).topk(10, dim=0).values.t()
    torch.testing.assert_close(refs.values, top)
    with pytest.raises(ConfigError):
        held_out_references(planted_pm, test, "layer4", 0)


def test_disentanglement_matches_gates(planted_pm, planted_model):
    _, _, test = planted_model
    pl = planted_pm.pure_layer("layer4")
    chans = pl.neurons.tolist()[:3]
    rep = disentanglement(planted_pm, "layer4", test, test.fine, channels=chans, n_refs=16)
    assert [n.channel for n in rep.neurons] == chans
    refs = held_out_references(planted_pm, test, "layer4", 16)
    for n in rep.neurons:
        x = test.images[refs.indices[n.channel]]
        k = pl.neurons.tolist().index(n.channel)
        with torch.no_grad():
            g = planted_pm.gates(x)["layer4"][:, k].numpy()
        np.testing.assert_array_equal(n.assignments, g)
        assert n.ari == pytest.approx(gate_agreement(g, test.fine.numpy()[refs.indices[n.channel]])["ari"])
        assert n.mix.sum() == pytest.approx(1.0) and n.n_clusters == 2
        ref_y = test.fine.numpy()[refs.indices[n.channel]]
        sel = np.isin(ref_y, n.pair)
        assert n.pair[0] == np.bincount(ref_y).argmax() and sel.mean() >= n.mix[list(n.pair)].sum() - 1e-9
        assert n.ari_pair == pytest.approx(gate_agreement(g[sel], ref_y[sel])["ari"])
    # mixed_only skips the rest (NaN), and the summaries select the mixed ones
    rep2 = disentanglement(planted_pm, "layer4", test, test.fine, channels=chans, refs=refs, mixed_only=True)
    for a, b in zip(rep.neurons, rep2.neurons):
        assert a.mixed == b.mixed
        assert (np.isnan(b.ari) and not b.mixed) or b.ari == a.ari
    assert len(rep.ari()) == sum(n.mixed for n in rep.neurons) and len(rep.ari(mixed_only=False)) == 3


def test_planted_structure_is_recovered(planted_pm, planted_model):
    """On the planted data the gates of the purified neurons agree with the fine labels far above chance."""
    _, _, test = planted_model
    rep = disentanglement(planted_pm, "layer4", test, test.fine, n_refs=20)
    aris = rep.ari(mixed_only=False)
    assert np.mean(aris) > 0.3
    assert np.mean(rep.purity(mixed_only=False)) > 0.7


def test_disentanglement_errors(planted_pm, planted_model):
    _, _, test = planted_model
    with pytest.raises(DataError, match="one per sample"):
        disentanglement(planted_pm, "layer4", test, test.fine[:-1])
    with pytest.raises(ConfigError, match="not purified"):
        unpurified = sorted(set(range(512)) - set(planted_pm.pure_layer("layer4").neurons.tolist()))[0]
        disentanglement(planted_pm, "layer4", test, test.fine, channels=[unpurified])
    with pytest.raises(LayerError):
        disentanglement(planted_pm, "layer3", test, test.fine)
    assert isinstance(planted_pm, purenn.PurifiedModel)


def test_forward_only_gates_evaluated_at_once(planted_model):
    """The batched path for forward-only gates gives what gating each neuron on its own references gives."""
    model, train, test = planted_model
    chans = [0, 64, 128, 192]
    pm = purenn.purify_model(model, ["layer4"], train, n_refs=16, neurons={"layer4": chans}, gate="activation",
                             progress=False)
    refs = held_out_references(pm, test, "layer4", 12)
    rep = disentanglement(pm, "layer4", test, test.fine, refs=refs)
    for n in rep.neurons:
        with torch.no_grad():
            g = pm.gates(test.images[refs.indices[n.channel]], neurons={"layer4": [n.channel]})["layer4"][:, 0]
        np.testing.assert_array_equal(n.assignments, g.numpy())
