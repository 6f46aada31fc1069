"""Clustering of circuit relevance vectors: k-means per neuron and a polysemanticity score.

:class:`CircuitKMeans` follows scikit-learn's estimator contract: ``__init__`` stores options,
``fit`` learns and returns ``self``, learned attributes end in ``_``.

Example:
    >>> import numpy as np
    >>> rng = np.random.default_rng(0)
    >>> a, b = rng.normal(0, .1, (1, 20, 4)), rng.normal(0, .1, (1, 20, 4))
    >>> r = np.concatenate([a + [1, 0, 0, 0], b + [0, 1, 0, 0]], axis=1)
    >>> km = CircuitKMeans(n_clusters=2, random_state=0).fit(r)
    >>> km.centroids_.shape, bool(km.scores_[0] > 0.5)
    ((1, 2, 4), True)
"""

from __future__ import annotations

import copy
import warnings
from typing import Any

import numpy as np
from sklearn.cluster import KMeans
from sklearn.exceptions import ConvergenceWarning
from sklearn.metrics import silhouette_score
from threadpoolctl import threadpool_limits
from tqdm.auto import tqdm

from purenn.common.choices import SCORES
from purenn.common.distributed import all_gather_object, world_info
from purenn.errors import ConfigError, NotFittedError

__all__ = ["CircuitKMeans", "SCORES", "contrast_score", "drop_empty_clusters"]


def contrast_score(centres: np.ndarray, labels: np.ndarray) -> float:
    """Balance times separation of a split: ``c * min_j n_j / n`` (1 for equal clusters) times the
    mean cosine distance ``1 - cos(mu_i, mu_j)`` between the centroids (0 for parallel centroids).

    A neuron whose references fall into two similar-sized groups driven by different upstream
    channels scores high; a lopsided split or one into near-parallel circuits scores low.

    Example:
        >>> contrast_score(np.array([[1., 0], [0, 1]]), np.array([0, 0, 1, 1]))
        1.0
    """
    c = len(centres)
    counts = np.bincount(labels, minlength=c)
    if c < 2 or counts.min() == 0:
        return 0.0
    unit = centres / (np.linalg.norm(centres, axis=1, keepdims=True) + 1e-12)
    cos = unit @ unit.T
    sep = float((1 - cos[np.triu_indices(c, 1)]).mean())
    return float(c * counts.min() / counts.sum() * sep)


def drop_empty_clusters(centres: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Remove centres that no label uses (k-means leaves them when there are fewer distinct points
    than clusters) and renumber the labels; a virtual neuron without references is never wanted.

    Example:
        >>> c, lab = drop_empty_clusters(np.array([[0.0], [5.0], [9.0]]), np.array([2, 0, 2]))
        >>> c.ravel().tolist(), lab.tolist()
        ([0.0, 9.0], [1, 0, 1])
    """
    used = np.unique(labels)
    if len(used) == len(centres):
        return centres, labels
    return centres[used], np.searchsorted(used, labels)


class CircuitKMeans:
    """k-means on the reference circuits of each neuron.

    Args:
        n_clusters: virtual neurons per neuron (>= 2), or ``"auto"``: per neuron, the count ``c`` in
            ``2..max_clusters`` whose silhouette most exceeds the silhouette of the same k-means on
            a Gaussian sample with the references' mean and covariance (a unimodal null, so the
            criterion does not depend on the dimension), or 1 (leave the neuron unsplit) when that
            excess is below ``min_gap``.
        max_clusters: largest count ``"auto"`` considers.
        min_gap: silhouette excess over the null a split needs under ``"auto"``.
        n_init: k-means restarts (scikit-learn's ``n_init``).
        random_state: seed; the same seed gives the same centroids.
        score: what ``scores_`` holds: ``"contrast"`` (:func:`contrast_score` of the circuit split,
            default), ``"silhouette"``, or ``"contrast+upstream"``: the contrast of the circuit split
            times the contrast of a two-cluster k-means split of the references' pooled upstream
            activations (``upstream`` of :meth:`fit`), so a neuron scores high when its references
            divide both by the circuits that drive it and by what the upstream layer sees.
        progress: show a progress bar over neurons.

    Attributes:
        centroids_: ``(K, c_max, D)`` float64 cluster centres per neuron (``c_max`` the largest
            count; rows past a neuron's count are zero).
        n_clusters_: ``(K,)`` clusters per neuron.
        labels_: ``(K, n)`` cluster of each reference.
        counts_: ``(K, c_max)`` references per cluster.
        scores_: ``(K,)`` polysemanticity score (``score``): the silhouette or the
            :func:`contrast_score` of the split (of the chosen count
            under ``"auto"``; 0 when the references do not separate, e.g. a dead neuron whose
            circuits are all zero).
        gaps_: ``(K,)`` under ``"auto"``: the silhouette excess over the null of the chosen count.
        upstream_scores_: ``(K,)`` under ``"contrast+upstream"``: the contrast of the upstream split
            (the factor ``scores_`` was multiplied by); ones otherwise.

    Example:
        >>> rng = np.random.default_rng(0)
        >>> blobs = np.concatenate([rng.normal(0, .05, (1, 15, 3)) + np.eye(3)[i] for i in range(3)], 1)
        >>> km = CircuitKMeans("auto", max_clusters=4).fit(np.concatenate([blobs, rng.normal(0, .05, (1, 45, 3))]))
        >>> km.n_clusters_.tolist()
        [3, 1]
    """

    def __init__(
        self,
        n_clusters: int | str = 2,
        *,
        max_clusters: int = 4,
        min_gap: float = 0.05,
        n_init: int = 10,
        random_state: int = 0,
        score: str = "contrast",
        progress: bool = False,
    ):
        self.score = score
        self.n_clusters = n_clusters
        self.max_clusters = max_clusters
        self.min_gap = min_gap
        self.n_init = n_init
        self.random_state = random_state
        self.progress = progress
        self._first_index = 0  # index of circuits[0] among all neurons (seeds the null); see purenn.common.distributed

    def _kmeans(self, x: np.ndarray, c: int) -> KMeans:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            return KMeans(n_clusters=c, n_init=self.n_init, random_state=self.random_state).fit(x)

    def _split(self, x: np.ndarray, c: int) -> tuple[np.ndarray, np.ndarray, float, float]:
        """k-means with ``c`` clusters on ``(n, D)``: centres, labels, score, silhouette (0 if undefined)."""
        km = self._kmeans(x, c)
        n_labels = len(np.unique(km.labels_))
        score = 0.0
        if 2 <= n_labels <= len(x) - 1 and np.ptp(x, axis=0).max() > 0:
            score = float(silhouette_score(x, km.labels_))
        return km.cluster_centers_, km.labels_, score, score

    def _null_sample(self, x: np.ndarray, i: int) -> np.ndarray:
        """A Gaussian sample of the same size with the mean and covariance of ``x`` (``(n, D)``)."""
        rng = np.random.default_rng([int(self.random_state), i])
        mu = x.mean(axis=0, keepdims=True)
        z = rng.standard_normal((len(x), len(x)))
        return mu + z @ (x - mu) / np.sqrt(max(len(x) - 1, 1))

    def _fit_all(self, x: np.ndarray, c: int | str, candidates: list[int], up: np.ndarray | None) -> list:
        fits = []
        for i in tqdm(range(len(x)), desc="cluster circuits", unit="neuron", disable=not self.progress, leave=False):
            xi = np.asarray(x[i], dtype=np.float64)  # one neuron at a time: no float64 copy of all circuits
            if up is not None:
                km = self._kmeans(np.asarray(up[i], dtype=np.float64), 2)  # the contrast only: no silhouette
                self.upstream_scores_[i] = contrast_score(km.cluster_centers_, km.labels_)
            tries = [self._split(xi, cc) for cc in candidates]
            if self.score in ("contrast", "contrast+upstream"):
                tries = [(cen, lab, contrast_score(cen, lab), sil) for cen, lab, _, sil in tries]
            if c != "auto":
                fits.append(tries[0][:3])
                continue
            null = self._null_sample(xi, self._first_index + i)
            gaps = [t[3] - self._split(null, cc)[2] for t, cc in zip(tries, candidates)]
            best = int(np.argmax(gaps))  # first of equal gaps: fewest clusters
            centres, labels, score = tries[best][:3]
            self.gaps_[i] = gaps[best]
            if gaps[best] < self.min_gap:
                centres, labels = xi.mean(axis=0, keepdims=True), np.zeros(x.shape[1], dtype=np.int64)
            else:
                centres, labels = drop_empty_clusters(centres, labels)
            fits.append((centres, labels, score))
        return fits

    def fit(self, circuits: np.ndarray, upstream: np.ndarray | None = None) -> CircuitKMeans:
        """Fit on ``circuits`` of shape ``(K, n, D)``: ``n`` reference circuits for each of ``K`` neurons.

        ``upstream`` ``(K, n, C)``: the spatially pooled upstream activations at the same references,
        needed by (and only by) ``score="contrast+upstream"``.
        """
        x = np.asarray(circuits)
        if not np.issubdtype(x.dtype, np.floating):
            x = x.astype(np.float64)
        if x.ndim != 3:
            raise ConfigError(f"circuits must have shape (neurons, references, features), got {x.shape}.")
        k, n, d = x.shape
        if self.score not in SCORES:
            raise ConfigError(f"score must be one of {SCORES}, got {self.score!r}.")
        up = None
        if self.score == "contrast+upstream":
            if upstream is None:
                raise ConfigError("score='contrast+upstream' needs the references' pooled upstream activations: "
                                  "fit(circuits, upstream) with upstream of shape (neurons, references, channels).")
            up = np.asarray(upstream)
            if up.ndim != 3 or up.shape[:2] != (k, n):
                raise ConfigError(f"upstream must have shape ({k}, {n}, channels) like circuits, got {up.shape}.")
            if not np.isfinite(up).all():
                raise ConfigError("upstream contains NaN or infinite values.")
            if n < 2:
                raise ConfigError(f"score='contrast+upstream' needs at least 2 references per neuron, got {n}.")
        elif upstream is not None:
            raise ConfigError(f"upstream is read only by score='contrast+upstream', not by score={self.score!r}.")
        c = self.n_clusters
        if c == "auto":
            m = self.max_clusters
            if isinstance(m, bool) or not isinstance(m, (int, np.integer)) or m < 2:
                raise ConfigError(f"max_clusters must be an integer >= 2, got {m!r}.")
            if isinstance(self.min_gap, bool) or not isinstance(self.min_gap, (int, float)):
                raise ConfigError(f"min_gap must be a number, got {self.min_gap!r}.")
            if n < 3:
                raise ConfigError(f"n_clusters='auto' needs at least 3 references per neuron, got {n}.")
            candidates = list(range(2, min(int(m), n - 1) + 1))
        else:
            if isinstance(c, bool) or not isinstance(c, (int, np.integer)) or c < 2:
                raise ConfigError(f"n_clusters must be an integer >= 2 or 'auto', got {c!r}.")
            if c > n:
                raise ConfigError(f"n_clusters={c} exceeds the {n} references per neuron.")
            candidates = [int(c)]
        self.gaps_ = np.zeros(k)
        self.upstream_scores_ = np.ones(k)
        # many tiny problems: one BLAS/OpenMP thread is several times faster than a thread pool
        with threadpool_limits(1):
            fits = self._fit_all(x, c, candidates, up)
        self.n_clusters_ = np.array([len(f[0]) for f in fits], dtype=np.int64).reshape(k)
        c_max = int(self.n_clusters_.max()) if k else (candidates[0] if c != "auto" else 1)
        self.centroids_ = np.zeros((k, c_max, d))
        self.labels_ = np.zeros((k, n), dtype=np.int64)
        self.counts_ = np.zeros((k, c_max), dtype=np.int64)
        self.scores_ = np.zeros(k)
        for i, (centres, labels, score) in enumerate(fits):
            self.centroids_[i, : len(centres)] = centres
            self.labels_[i] = labels
            self.counts_[i] = np.bincount(labels, minlength=c_max)
            self.scores_[i] = score * self.upstream_scores_[i]
        return self

    def predict(self, circuits: np.ndarray) -> np.ndarray:
        """Nearest centroid for circuits of shape ``(B, K, D)``, returns ``(B, K)``."""
        if not hasattr(self, "centroids_"):
            raise NotFittedError("CircuitKMeans is not fitted; call fit() first.")
        x = np.asarray(circuits, dtype=np.float64)
        d = ((x[:, :, None, :] - self.centroids_[None]) ** 2).sum(-1)
        d[:, np.arange(self.centroids_.shape[1])[None] >= self.n_clusters_[:, None]] = np.inf
        return d.argmin(-1)


_FITTED = ("n_clusters_", "centroids_", "labels_", "counts_", "scores_", "gaps_", "upstream_scores_")


def fit_by_neuron(km: Any, circuits: np.ndarray, upstream: np.ndarray | None = None) -> Any:
    """``km.fit(circuits, upstream)`` for a :class:`~purenn.fit.cluster.CircuitKMeans`, split by neuron across ranks.

    Rank ``r`` fits a contiguous block of neurons (each with the seeds it gets in a single process)
    and the fitted attributes are gathered, so every rank ends with the single-process fit. ``km``
    itself is not changed; a fitted copy is returned.
    """
    rank, world = world_info()
    km = copy.copy(km)
    if world == 1:
        return km.fit(circuits, upstream)
    k = len(circuits)
    lo, hi = rank * k // world, (rank + 1) * k // world
    part = copy.copy(km)
    part._first_index = lo
    part.fit(circuits[lo:hi], None if upstream is None else upstream[lo:hi])
    parts = all_gather_object({name: getattr(part, name) for name in _FITTED})
    counts = np.concatenate([p["n_clusters_"] for p in parts])
    c_max = int(counts.max()) if k else parts[0]["centroids_"].shape[1]

    def pad(a: np.ndarray) -> np.ndarray:
        return np.concatenate([a, np.zeros((a.shape[0], c_max - a.shape[1], *a.shape[2:]), a.dtype)], axis=1)

    km.n_clusters_ = counts
    km.centroids_ = np.concatenate([pad(p["centroids_"]) for p in parts])
    km.counts_ = np.concatenate([pad(p["counts_"]) for p in parts])
    for name in ("labels_", "scores_", "gaps_", "upstream_scores_"):
        setattr(km, name, np.concatenate([p[name] for p in parts]))
    return km
