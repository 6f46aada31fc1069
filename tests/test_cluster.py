import numpy as np
import pytest

from purenn import CircuitKMeans
from purenn.errors import ConfigError, NotFittedError

from conftest import contrast_by_hand


def _planted(seed=0, n=30, d=6, sep=1.0):
    rng = np.random.default_rng(seed)
    a = rng.normal(0, 0.05, (n, d))
    a[:, 0] += sep
    b = rng.normal(0, 0.05, (n, d))
    b[:, 1] += sep
    one_blob = rng.normal(0, 0.05, (2 * n, d))
    return np.stack([np.concatenate([a, b]), one_blob]), np.r_[np.zeros(n), np.ones(n)]


def test_planted_split_is_found_and_scored():
    x, truth = _planted()
    km = CircuitKMeans(2, random_state=0, score="silhouette").fit(x)  # thresholds below are the silhouette's
    assert km.centroids_.shape == (2, 2, 6)
    lab = km.labels_[0]
    assert (lab == truth).all() or (lab == 1 - truth).all()
    assert km.scores_[0] > 0.8 > 0.5 > km.scores_[1]
    assert km.counts_[0].tolist() == [30, 30]
    pred = km.predict(x.transpose(1, 0, 2))
    np.testing.assert_array_equal(pred.T, km.labels_)


def test_same_seed_same_result():
    x, _ = _planted(seed=3)
    a = CircuitKMeans(3, random_state=7).fit(x)
    b = CircuitKMeans(3, random_state=7).fit(x)
    np.testing.assert_array_equal(a.centroids_, b.centroids_)


def test_identical_points_score_zero():
    x = np.zeros((1, 10, 4))
    km = CircuitKMeans(2).fit(x)
    assert km.scores_[0] == 0 and np.isfinite(km.centroids_).all()


def test_errors():
    with pytest.raises(NotFittedError):
        CircuitKMeans().predict(np.zeros((1, 1, 2)))
    with pytest.raises(ConfigError, match="n_clusters"):
        CircuitKMeans(1).fit(np.zeros((1, 5, 2)))
    with pytest.raises(ConfigError, match="exceeds"):
        CircuitKMeans(6).fit(np.zeros((1, 5, 2)))
    with pytest.raises(ConfigError, match="shape"):
        CircuitKMeans(2).fit(np.zeros((5, 2)))


def test_auto_never_keeps_a_cluster_without_references():
    from purenn.fit.cluster import drop_empty_clusters

    centres, labels = drop_empty_clusters(np.array([[0.0, 0], [1, 1], [2, 2]]), np.array([0, 2, 2, 0]))
    assert centres.tolist() == [[0, 0], [2, 2]] and labels.tolist() == [0, 1, 1, 0]
    # two distinct points repeated: k-means with 3 or 4 clusters has empty ones; "auto" must drop them
    x = np.repeat(np.array([[1.0, 0, 0], [0, 1.0, 0]]), 6, axis=0)[None]
    km = CircuitKMeans("auto", max_clusters=4, random_state=0).fit(np.concatenate([x, x[:, ::-1]]))
    assert (km.counts_ > 0).sum(1).tolist() == km.n_clusters_.tolist() == [2, 2]


def test_contrast_upstream_multiplies_the_circuit_split_by_the_upstream_split():
    x, truth = _planted()  # neuron 0: two circuit blobs, neuron 1: one blob
    rng = np.random.default_rng(5)
    up = np.abs(rng.normal(0, 0.05, (2, 60, 5)))
    up[0, truth == 0, 2] += 1  # neuron 0's references also split upstream, along the circuit split
    up[1, :, 3] += 1           # neuron 1's do not
    km = CircuitKMeans(2, random_state=0, score="contrast+upstream").fit(x, up)
    plain = CircuitKMeans(2, random_state=0, score="contrast").fit(x)
    expected_up = [contrast_by_hand(up[i]) for i in range(2)]
    np.testing.assert_allclose(km.upstream_scores_, expected_up, rtol=1e-6, atol=1e-10)
    np.testing.assert_allclose(km.scores_, plain.scores_ * np.array(expected_up), rtol=1e-6, atol=1e-10)
    assert km.scores_[0] > 0.5 > 0.05 > km.scores_[1]
    # the clusters (what the gates use) are the circuit split's, whatever the score
    np.testing.assert_array_equal(km.centroids_, plain.centroids_)
    np.testing.assert_array_equal(km.labels_, plain.labels_)
    assert (plain.upstream_scores_ == 1).all()


def test_contrast_upstream_dead_neuron_scores_zero():
    km = CircuitKMeans(2, score="contrast+upstream").fit(np.zeros((1, 10, 4)), np.zeros((1, 10, 3)))
    assert km.scores_.tolist() == [0.0] and np.isfinite(km.upstream_scores_).all()


def test_contrast_upstream_bad_input():
    x = np.random.default_rng(0).normal(size=(2, 6, 3))
    with pytest.raises(ConfigError, match="needs the references' pooled upstream"):
        CircuitKMeans(2, score="contrast+upstream").fit(x)
    with pytest.raises(ConfigError, match=r"upstream must have shape \(2, 6, channels\)"):
        CircuitKMeans(2, score="contrast+upstream").fit(x, np.zeros((2, 5, 3)))
    with pytest.raises(ConfigError, match="NaN"):
        CircuitKMeans(2, score="contrast+upstream").fit(x, np.full((2, 6, 3), np.nan))
    with pytest.raises(ConfigError, match="read only by score='contrast\\+upstream'"):
        CircuitKMeans(2, score="contrast").fit(x, np.zeros((2, 6, 3)))
