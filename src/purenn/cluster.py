"""Clustering of circuit relevance vectors: k-means per neuron and a polysemanticity score.

:class:`CircuitKMeans` follows scikit-learn's estimator contract: ``__init__`` stores options,
``fit`` learns and returns ``self``, learned attributes end in ``_``.

Example:
    >>> import numpy as np
    >>> rng = np.random.default_rng(0)
    >>> r = np.concatenate([rng.normal(0, .1, (1, 20, 4)) + [1, 0, 0, 0], rng.normal(0, .1, (1, 20, 4)) + [0, 1, 0, 0]], 1)
    >>> km = CircuitKMeans(n_clusters=2, random_state=0).fit(r)
    >>> km.centroids_.shape, bool(km.scores_[0] > 0.5)
    ((1, 2, 4), True)
"""

from __future__ import annotations

import warnings

import numpy as np
from sklearn.cluster import KMeans
from sklearn.exceptions import ConvergenceWarning
from sklearn.metrics import silhouette_score
from tqdm.auto import tqdm

from .errors import ConfigError, NotFittedError

__all__ = ["CircuitKMeans"]


class CircuitKMeans:
    """k-means on the reference circuits of each neuron.

    Args:
        n_clusters: virtual neurons per neuron (>= 2).
        n_init: k-means restarts (scikit-learn's ``n_init``).
        random_state: seed; the same seed gives the same centroids.
        progress: show a progress bar over neurons.

    Attributes:
        centroids_: ``(K, n_clusters, D)`` float64 cluster centres per neuron.
        labels_: ``(K, n)`` cluster of each reference.
        counts_: ``(K, n_clusters)`` references per cluster.
        scores_: ``(K,)`` polysemanticity score: the silhouette of the split (0 when the references
            do not separate, e.g. a dead neuron whose circuits are all zero).
    """

    def __init__(self, n_clusters: int = 2, *, n_init: int = 10, random_state: int = 0, progress: bool = False):
        self.n_clusters = n_clusters
        self.n_init = n_init
        self.random_state = random_state
        self.progress = progress

    def fit(self, circuits: np.ndarray) -> CircuitKMeans:
        """Fit on ``circuits`` of shape ``(K, n, D)``: ``n`` reference circuits for each of ``K`` neurons."""
        x = np.asarray(circuits, dtype=np.float64)
        if x.ndim != 3:
            raise ConfigError(f"circuits must have shape (neurons, references, features), got {x.shape}.")
        c = self.n_clusters
        if isinstance(c, bool) or not isinstance(c, (int, np.integer)) or c < 2:
            raise ConfigError(f"n_clusters must be an integer >= 2, got {c!r}.")
        if c > x.shape[1]:
            raise ConfigError(f"n_clusters={c} exceeds the {x.shape[1]} references per neuron.")
        k, n, d = x.shape
        self.centroids_ = np.zeros((k, c, d))
        self.labels_ = np.zeros((k, n), dtype=np.int64)
        self.counts_ = np.zeros((k, c), dtype=np.int64)
        self.scores_ = np.zeros(k)
        for i in tqdm(range(k), desc="cluster circuits", unit="neuron", disable=not self.progress, leave=False):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", ConvergenceWarning)
                km = KMeans(n_clusters=c, n_init=self.n_init, random_state=self.random_state).fit(x[i])
            self.centroids_[i] = km.cluster_centers_
            self.labels_[i] = km.labels_
            self.counts_[i] = np.bincount(km.labels_, minlength=c)
            n_labels = len(np.unique(km.labels_))
            if 2 <= n_labels <= n - 1 and np.ptp(x[i], axis=0).max() > 0:
                self.scores_[i] = float(silhouette_score(x[i], km.labels_))
        return self

    def predict(self, circuits: np.ndarray) -> np.ndarray:
        """Nearest centroid for circuits of shape ``(B, K, D)``, returns ``(B, K)``."""
        if not hasattr(self, "centroids_"):
            raise NotFittedError("CircuitKMeans is not fitted; call fit() first.")
        x = np.asarray(circuits, dtype=np.float64)
        d = ((x[:, :, None, :] - self.centroids_[None]) ** 2).sum(-1)
        return d.argmin(-1)
