"""Disentanglement metrics: does a neuron's gate split its references along known concepts?

- :func:`held_out_references` finds each channel's top-``n`` samples in held-out data (by the spatial
  maximum of its activation, the way purification chooses references).
- :func:`disentanglement` gates each chosen neuron on its held-out references with the purified
  model and compares the chosen virtual neurons with labels: adjusted Rand index (scikit-learn) and
  purity, per neuron, plus each neuron's label mix (:func:`mixed_neurons` marks neurons whose
  references mix two labels).
- :func:`score_auroc` validates a polysemanticity score against such ground truth, and
  :func:`paired_test` compares two methods neuron by neuron (one-sided Wilcoxon signed-rank test).
- :func:`embedding_distances` is PURE's evaluation: mean distance between embeddings of references
  in the same virtual neuron (intra) and in different ones (inter), for any embedding function
  (CLIP or DINOv2 when available, or anything mapping images to vectors).
- :func:`embedding_polysemanticity` is SemanticLens' polysemanticity score: how far apart the two
  k-means groups of a neuron's reference embeddings lie in an embedder's space. It needs an
  embedder (CLIP in SemanticLens); unlike the circuit scores of :mod:`purenn.fit.cluster` it judges the
  references by what another model sees in them, and it is only as label-free as that embedder.

Example:
    >>> gate_agreement([0, 0, 1, 1], [5, 5, 7, 7])
    {'ari': 1.0, 'purity': 1.0}
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from sklearn.metrics import adjusted_rand_score, roc_auc_score
from sklearn.metrics.cluster import contingency_matrix

from purenn.arch import ResNetSpec
from purenn.common.checks import check_int
from purenn.errors import ConfigError, DataError
from purenn.fit.cluster import contrast_score
from purenn.fit.collect import References, collect_references
from purenn.fit.data import DataSource
from purenn.model.gates import ACTIVATION_GATES

__all__ = [
    "purity",
    "gate_agreement",
    "label_mix",
    "mixed_neurons",
    "held_out_references",
    "NeuronAgreement",
    "DisentanglementReport",
    "disentanglement",
    "score_auroc",
    "paired_test",
    "embedding_distances",
    "embedding_polysemanticity",
    "reference_embeddings",
]


def purity(labels_true: Sequence[int] | np.ndarray, labels_pred: Sequence[int] | np.ndarray) -> float:
    """Share of samples whose predicted cluster's majority label is their own label.

    Example:
        >>> purity([0, 0, 1, 1, 1], [0, 0, 0, 1, 1])
        0.8
    """
    t, p = np.asarray(labels_true), np.asarray(labels_pred)
    if t.shape != p.shape or t.ndim != 1 or len(t) == 0:
        raise DataError(f"labels must be two non-empty 1-D arrays of equal length, got {t.shape} and {p.shape}.")
    m = contingency_matrix(t, p)
    return float(m.max(axis=0).sum() / m.sum())


def gate_agreement(assignments: Sequence[int] | np.ndarray, labels: Sequence[int] | np.ndarray) -> dict[str, float]:
    """Adjusted Rand index and purity of gate assignments against labels (one neuron)."""
    a, y = np.asarray(assignments), np.asarray(labels)
    p = purity(y, a)
    return {"ari": float(adjusted_rand_score(y, a)), "purity": p}


def label_mix(ref_labels: np.ndarray, n_labels: int | None = None) -> np.ndarray:
    """``(K, L)`` share of each label among each neuron's references (``ref_labels`` is ``(K, n)``)."""
    r = np.asarray(ref_labels)
    if r.ndim != 2 or r.shape[1] == 0:
        raise DataError(f"ref_labels must have shape (neurons, references), got {r.shape}.")
    n_labels = int(r.max()) + 1 if n_labels is None else n_labels
    counts = np.stack([np.bincount(row, minlength=n_labels) for row in r])
    return counts / r.shape[1]


def mixed_neurons(ref_labels: np.ndarray, *, min_share: float = 0.2, n_labels: int | None = None) -> np.ndarray:
    """``(K,)`` bool: the neuron's references mix two labels (the second most common label holds at
    least ``min_share`` of them).

    Example:
        >>> mixed_neurons(np.array([[0] * 9 + [1], [0] * 6 + [1] * 4])).tolist()
        [False, True]
    """
    if not 0 < min_share <= 0.5:
        raise ConfigError(f"min_share must be in (0, 0.5], got {min_share!r}.")
    mix = np.sort(label_mix(ref_labels, n_labels), axis=1)
    if mix.shape[1] < 2:
        return np.zeros(len(mix), dtype=bool)
    return mix[:, -2] >= min_share


def held_out_references(
    model: Any, data: Any, layer: str, n_refs: int = 100, *, batch_size: int = 128
) -> References:
    """Top-``n_refs`` samples of every channel of ``layer`` in ``data`` (ranked by the spatial max of
    the channel's activation), from a ResNet or a PurifiedModel (its base model)."""
    base = getattr(model, "base_model", model)
    spec = ResNetSpec(base)
    source = DataSource.from_data(data, batch_size)
    n_refs = check_int("n_refs", n_refs, 1, len(source))
    device = next(base.parameters()).device
    return collect_references(spec, source, {layer: spec.position(layer)}, n_refs, device=device)[layer]


@dataclass
class NeuronAgreement:
    """Gate agreement of one neuron on its held-out references.

    ``ari``/``purity`` use all references; ``ari_pair``/``purity_pair`` only those whose label is
    one of the two most common (``pair``), so a few references of other labels, which no split
    into two can place, do not cap the score.
    """

    channel: int
    n_clusters: int
    ari: float
    purity: float
    ari_pair: float
    purity_pair: float
    pair: tuple[int, int]
    mix: np.ndarray  # share of each label among the references
    mixed: bool
    assignments: np.ndarray
    labels: np.ndarray


@dataclass
class DisentanglementReport:
    """:func:`disentanglement` result: one :class:`NeuronAgreement` per evaluated neuron."""

    layer: str
    neurons: list[NeuronAgreement]

    def ari(self, mixed_only: bool = True, pair: bool = False) -> np.ndarray:
        """Per-neuron ARI (of the mixed neurons by default; ``pair``: on the two main labels' references)."""
        return np.array([n.ari_pair if pair else n.ari for n in self.neurons if n.mixed or not mixed_only])

    def purity(self, mixed_only: bool = True, pair: bool = False) -> np.ndarray:
        """Per-neuron purity, selected like :meth:`ari`."""
        return np.array([n.purity_pair if pair else n.purity for n in self.neurons if n.mixed or not mixed_only])

    def channels(self, mixed_only: bool = True) -> list[int]:
        return [n.channel for n in self.neurons if n.mixed or not mixed_only]


def disentanglement(
    pm: Any,
    layer: str,
    data: Any,
    labels: Sequence[int] | np.ndarray | torch.Tensor,
    *,
    channels: Sequence[int] | None = None,
    refs: References | None = None,
    n_refs: int = 100,
    min_share: float = 0.2,
    mixed_only: bool = False,
    batch_size: int = 128,
) -> DisentanglementReport:
    """Agreement of each purified neuron's gate with ``labels`` on its held-out references.

    Args:
        pm: a :class:`~purenn.PurifiedModel`.
        layer: a purified layer.
        data: held-out data (not the data the model was purified on).
        labels: ``(N,)`` label of every sample of ``data`` (e.g. fine classes).
        channels: purified channels to evaluate (default all purified channels of the layer).
        refs: precomputed :func:`held_out_references` (to share them between several models).
        n_refs: held-out references per neuron when ``refs`` is not given.
        min_share: the share of the second most common label that makes a neuron "mixed".
        mixed_only: gate and score only the mixed neurons (the others get NaN scores).
        batch_size: samples per forward pass.

    Example:
        >>> rep = disentanglement(pm, "layer4", test_x, fine_test)     # doctest: +SKIP
        >>> rep.ari().mean(), rep.purity().mean()                      # doctest: +SKIP
    """
    pl = pm.pure_layer(layer)
    y = np.asarray(labels.cpu() if isinstance(labels, torch.Tensor) else labels)
    source = DataSource.from_data(data, batch_size)
    if y.ndim != 1 or len(y) != len(source):
        raise DataError(f"labels must be one per sample ({len(source)}), got shape {y.shape}.")
    purified = pl.neurons.tolist()
    chans = purified if channels is None else [int(c) for c in channels]
    bad = sorted(set(chans) - set(purified))
    if bad or not chans:
        raise ConfigError(f"channels {bad or chans} are not purified channels of {layer!r}.")
    if refs is None:
        refs = held_out_references(pm, data, layer, n_refs, batch_size=batch_size)
    n_labels = int(y.max()) + 1
    k_of = {c: i for i, c in enumerate(purified)}
    device, dtype = pl.centroids.device, next(pm.base_model.parameters()).dtype
    todo = []
    for c in chans:
        ref_y = y[refs.indices[c].numpy()]
        if not mixed_only or mixed_neurons(ref_y[None], min_share=min_share, n_labels=n_labels)[0]:
            todo.append(c)
    gates = _held_out_gates(pm, layer, source, refs, todo, device, dtype, batch_size)
    nan = float("nan")
    out = []
    for c in chans:
        ref_y = y[refs.indices[c].numpy()]
        mix = label_mix(ref_y[None], n_labels)[0]
        mixed = bool(mixed_neurons(ref_y[None], min_share=min_share, n_labels=n_labels)[0])
        pair = tuple(int(v) for v in np.argsort(-mix, kind="stable")[:2])
        n_cl = int(pl.n_clusters[k_of[c]])
        if c not in gates:
            out.append(NeuronAgreement(c, n_cl, nan, nan, nan, nan, pair, mix, mixed, np.zeros(0), ref_y))
            continue
        g = gates[c]
        agree = gate_agreement(g, ref_y)
        sel = np.isin(ref_y, pair)
        two = gate_agreement(g[sel], ref_y[sel])
        out.append(NeuronAgreement(c, n_cl, agree["ari"], agree["purity"], two["ari"], two["purity"], pair, mix,
                                   mixed, g, ref_y))
    return DisentanglementReport(layer, out)


def _held_out_gates(
    pm: Any, layer: str, source: DataSource, refs: References, channels: list[int], device: Any, dtype: Any,
    batch_size: int,
) -> dict[int, np.ndarray]:
    """Gate of each channel on its own references. A forward-only gate is computed for all channels
    on the union of their references at once; a circuit gate one channel at a time (it costs one
    relevance pass per (sample, neuron) pair)."""
    if not channels:
        return {}
    if pm.pure_layer(layer).gate in ACTIVATION_GATES:
        ids, inv = torch.unique(refs.indices[channels], return_inverse=True)
        parts = []
        with torch.no_grad():
            for s in range(0, len(ids), batch_size):
                x = source.fetch(ids[s : s + batch_size]).to(device=device, dtype=dtype)
                parts.append(pm.gates(x, neurons={layer: channels})[layer].cpu())
        g = torch.cat(parts)  # (U, len(channels))
        return {c: g[inv[i], i].numpy() for i, c in enumerate(channels)}
    out = {}
    for c in channels:
        x = source.fetch(refs.indices[c]).to(device=device, dtype=dtype)
        with torch.no_grad():
            out[c] = torch.cat([pm.gates(x[s : s + batch_size], neurons={layer: [c]})[layer][:, 0]
                                for s in range(0, len(x), batch_size)]).cpu().numpy()
    return out


def score_auroc(scores: Sequence[float] | np.ndarray, truth: Sequence[bool] | np.ndarray) -> float:
    """Area under the ROC curve of a polysemanticity score against ground truth (``True`` =
    polysemantic), with scikit-learn's ``roc_auc_score``.

    Example:
        >>> score_auroc([0.1, 0.2, 0.8, 0.9], [False, False, True, True])
        1.0
    """
    s, t = np.asarray(scores, dtype=np.float64), np.asarray(truth, dtype=bool)
    if s.shape != t.shape or s.ndim != 1:
        raise DataError(f"scores and truth must be 1-D of equal length, got {s.shape} and {t.shape}.")
    if t.all() or not t.any():
        raise DataError("the ground truth needs both polysemantic and monosemantic neurons for an AUROC.")
    return float(roc_auc_score(t, s))


def paired_test(a: Sequence[float] | np.ndarray, b: Sequence[float] | np.ndarray) -> float:
    """One-sided p-value that ``a`` exceeds ``b`` neuron by neuron (Wilcoxon signed-rank, scipy).

    Example:
        >>> paired_test(np.linspace(.5, 1, 20), np.linspace(.4, .9, 20) - .05) < 0.01
        True
    """
    from scipy.stats import wilcoxon

    x, z = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if x.shape != z.shape or x.ndim != 1 or len(x) < 2:
        raise DataError(f"paired scores must be 1-D of equal length >= 2, got {x.shape} and {z.shape}.")
    if np.all(x == z):
        return 1.0
    return float(wilcoxon(x, z, alternative="greater").pvalue)


def embedding_distances(
    embeddings: np.ndarray | torch.Tensor | Callable[[torch.Tensor], Any],
    assignments: Sequence[int] | np.ndarray,
    images: torch.Tensor | None = None,
) -> tuple[float, float]:
    """PURE's intra/inter-cluster embedding distances for one neuron.

    Mean Euclidean distance between the embeddings of references assigned to the same virtual
    neuron (intra, each pair once, no self-pairs) and to different ones (inter). Purer virtual
    neurons have smaller intra and larger inter distances.

    Args:
        embeddings: ``(n, D)`` embeddings of the references, or a function mapping an image
            batch to ``(n, D)`` embeddings (a CLIP or DINOv2 image encoder), applied to ``images``.
        assignments: ``(n,)`` virtual neuron of each reference.
        images: the references, when ``embeddings`` is a function.

    Returns:
        ``(intra, inter)``; with one cluster only, both are the mean pairwise distance.

    Example:
        >>> e = np.array([[0., 0], [0, 1], [5, 0], [5, 1]])
        >>> intra, inter = embedding_distances(e, [0, 0, 1, 1])
        >>> round(intra, 2), round(inter, 2)
        (1.0, 5.05)
    """
    if callable(embeddings):
        if images is None:
            raise ConfigError("an embedding function needs the reference images (images=...).")
        with torch.no_grad():
            embeddings = embeddings(images)
    e = np.asarray(embeddings.detach().cpu() if isinstance(embeddings, torch.Tensor) else embeddings, dtype=np.float64)
    a = np.asarray(assignments)
    if e.ndim != 2 or a.shape != (len(e),) or len(e) < 2:
        raise DataError(f"need (n, D) embeddings with n >= 2 and one assignment each, got {e.shape} and {a.shape}.")
    d = np.sqrt(((e[:, None] - e[None]) ** 2).sum(-1))
    same = a[:, None] == a[None]
    off = ~np.eye(len(e), dtype=bool)
    intra, inter = d[same & off], d[~same]
    if len(inter) == 0:
        inter = intra
    if len(intra) == 0:
        intra = inter
    return float(intra.mean()), float(inter.mean())


def embedding_polysemanticity(
    embeddings: np.ndarray | torch.Tensor, *, score: str = "contrast", n_clusters: int = 2, n_init: int = 10,
    random_state: int = 0,
) -> np.ndarray:
    """Polysemanticity of each neuron from the embeddings of its references (SemanticLens).

    Per neuron, k-means (``n_clusters``) on its ``n`` reference embeddings, then:

    - ``score="semanticlens"``: SemanticLens' formula, one minus the "clarity" of the cluster
      centres, their mean pairwise cosine similarity (for two centres, ``1 - cos(mu_1, mu_2)``): 0
      when the references form one group in the embedder's space, higher when they form groups
      pointing in different directions. Dreyer et al., "Mechanistic understanding and validation
      of large AI models with SemanticLens" (Nature Machine Intelligence, 2025) embed the
      references with CLIP; any embedder fits (see :func:`reference_embeddings`). A neuron whose
      k-means leaves a cluster with fewer than two references scores by the centroid of all
      references against single references instead, as SemanticLens does.
    - ``score="contrast"`` (default): the same separation times the balance of the split
      (:func:`purenn.fit.cluster.contrast_score`, the circuits' default score), so that a split that
      cuts off a few odd references does not score as high as a half/half one. On the trained
      Fashion-MNIST models it ranks mixed neurons far better with every embedder tried (README,
      "Score and block-gate variants").

    Args:
        embeddings: ``(K, n, D)`` embeddings of the ``n`` references of each of ``K`` neurons.
        score: ``"contrast"`` or ``"semanticlens"``.
        n_clusters: groups per neuron (SemanticLens: 2).
        n_init: k-means restarts.
        random_state: k-means seed.

    Returns:
        ``(K,)`` scores in ``[0, 2]``.

    Example:
        >>> rng = np.random.default_rng(0)
        >>> one = rng.normal([1, 1, 0, 0], 0.05, (20, 4))
        >>> two = np.concatenate([rng.normal([1, 0, 0, 0], 0.05, (10, 4)), rng.normal([0, 0, 1, 0], 0.05, (10, 4))])
        >>> s = embedding_polysemanticity(np.stack([one, two]))
        >>> bool(s[0] < 0.1 < 0.9 < s[1])
        True
    """
    from sklearn.cluster import KMeans
    from threadpoolctl import threadpool_limits

    e = np.asarray(embeddings.detach().cpu() if isinstance(embeddings, torch.Tensor) else embeddings, dtype=np.float64)
    if e.ndim != 3 or e.shape[1] < 2:
        raise DataError(f"embeddings must be (neurons, references >= 2, features), got {e.shape}.")
    c = check_int("n_clusters", n_clusters, 2, e.shape[1])
    if score not in ("contrast", "semanticlens"):
        raise ConfigError(f"score must be 'contrast' or 'semanticlens', got {score!r}.")
    out = np.zeros(len(e))
    with threadpool_limits(1):
        for i, x in enumerate(e):
            if np.ptp(x, axis=0).max() == 0:
                continue  # all references embed alike: one group
            km = KMeans(n_clusters=c, n_init=n_init, random_state=random_state).fit(x)
            centres = km.cluster_centers_
            if score == "contrast":
                out[i] = contrast_score(centres, km.labels_)
                continue
            if np.bincount(km.labels_, minlength=c).min() < 2:
                centres = None
            out[i] = 1 - _clarity(centres) if centres is not None else _lopsided(x)
    return out


def _clarity(v: np.ndarray) -> float:
    """Mean pairwise cosine similarity of the rows of ``v`` (SemanticLens' clarity), without self-pairs."""
    u = v / (np.linalg.norm(v, axis=-1, keepdims=True) + 1e-12)
    n = len(u)
    return float(((u.mean(0) ** 2).sum() - 1 / n) * n / (n - 1))


def _lopsided(x: np.ndarray, draws: int = 10) -> float:
    """1 - clarity of (mean of all, one reference), averaged over the first ``draws`` references."""
    m = x.mean(0)
    return float(np.mean([1 - _clarity(np.stack([m, x[j]])) for j in range(min(draws, len(x)))]))


def reference_embeddings(
    embed: Callable[[torch.Tensor], Any],
    data: Any,
    refs: References,
    channels: Sequence[int] | None = None,
    *,
    batch_size: int = 128,
) -> np.ndarray:
    """``(K, n, D)`` embeddings of the references of ``channels`` (default all), each distinct
    sample embedded once by ``embed`` (images -> ``(B, D)``, e.g. a CLIP image encoder).

    Example:
        >>> refs = held_out_references(model, data, "layer4")                  # doctest: +SKIP
        >>> e = reference_embeddings(clip.encode_image, data, refs)            # doctest: +SKIP
        >>> embedding_polysemanticity(e)                                       # doctest: +SKIP
    """
    if not callable(embed):
        raise ConfigError(f"embed must map an image batch to vectors, got {type(embed).__name__}.")
    idx = refs.indices if channels is None else refs.indices[[int(c) for c in channels]]
    ids, inv = torch.unique(idx.flatten(), return_inverse=True)
    source = DataSource.from_data(data, batch_size)
    parts = []
    with torch.no_grad():
        for s in range(0, len(ids), batch_size):
            e = embed(source.fetch(ids[s : s + batch_size]))
            parts.append(np.asarray(e.detach().cpu() if isinstance(e, torch.Tensor) else e, dtype=np.float32))
    emb = np.concatenate(parts)
    if emb.ndim != 2 or len(emb) != len(ids):
        raise DataError(f"embed must return one vector per image, got shape {emb.shape} for {len(ids)} images.")
    return emb[inv.reshape(idx.shape).numpy()]
