"""Figures of virtual neurons: a neuron's reference images per virtual neuron and its circuits in 2-D.

:func:`neuron_figure` draws, for one purified neuron ``k``, the strongest reference samples of each
virtual neuron ``k.0, k.1, ...`` (one row each) next to a 2-D embedding (PCA or t-SNE) of the
circuit vectors of all its reference samples, coloured by the cluster k-means gave them, with the
centroids marked: the picture of PURE's Figure 1. The circuits are recomputed from the data with
:func:`purenn.circuit_relevance`, so the data must be the one the model was purified on (the
reference samples are stored as indices into it).

matplotlib is an optional dependency: ``pip install "purenn[viz]"``. Figures are built with
:class:`matplotlib.figure.Figure` directly, so no GUI backend is needed.

Example:
    >>> import torch, torchvision, purenn
    >>> from purenn.analysis.viz import neuron_figure
    >>> model = torchvision.models.resnet18(num_classes=3).eval()
    >>> data = torch.rand(24, 3, 32, 32)
    >>> pm = purenn.purify_model(model, ["layer4"], data, n_refs=8, neurons={"layer4": [5]}, progress=False)
    >>> fig = neuron_figure(pm, "layer4", 5, data, n_images=4)
    >>> fig.savefig("neuron.png")                                   # doctest: +SKIP
"""

from __future__ import annotations

import importlib
from typing import Any

import numpy as np
import torch
from torch import Tensor

from purenn.attribution.relevance import circuit_relevance
from purenn.common.checks import check_int
from purenn.common.choices import CONCEPT_SCORE, MAX_DPI
from purenn.errors import ConfigError, DataError, PurennError
from purenn.fit.data import DataSource
from purenn.fit.refcheck import check_references
from purenn.io.files import as_path, atomic_write, resolve_target

__all__ = ["MissingExtraError", "EMBEDDINGS", "MAX_DPI", "neuron_figure", "neuron_circuits", "embed_2d",
           "save_neuron_figure"]

EMBEDDINGS = ("pca", "tsne")
#: colours of clusters 0, 1, 2, ... (matplotlib's tab10)
_COLOURS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f")


class MissingExtraError(PurennError, ImportError):
    """An optional dependency is not installed; the message names the extra that provides it."""


def _matplotlib() -> Any:
    try:
        importlib.import_module("matplotlib")
        return importlib.import_module("matplotlib.figure")
    except ImportError:
        raise MissingExtraError(
            "figures need matplotlib, which is not installed: pip install \"purenn[viz]\" (or pip install matplotlib)."
        ) from None


def _position(pm: Any, layer: str, channel: int) -> int:
    pl = pm.pure_layer(layer)
    chans = pl.neurons.tolist()
    if isinstance(channel, bool) or not isinstance(channel, (int, np.integer)) or int(channel) not in chans:
        shown = ", ".join(map(str, chans[:12])) + (", ..." if len(chans) > 12 else "")
        raise ConfigError(f"channel {channel!r} of {layer!r} is not purified; purified channels: {shown}.")
    return chans.index(int(channel))


def neuron_circuits(pm: Any, layer: str, channel: int, data: Any, *, batch_size: int = 64) -> dict[str, Any]:
    """The reference samples of one purified neuron and their circuit vectors.

    Args:
        pm: a :class:`~purenn.PurifiedModel`.
        layer: a purified layer, e.g. ``"layer4"``.
        channel: a purified channel of that layer.
        data: the data the model was purified on (Tensor, map-style Dataset or unshuffled DataLoader).
        batch_size: samples per relevance pass.

    Returns:
        ``{"indices": (n,) data indices, "clusters": (n,) cluster of each, "images": (n, C, H, W)
        Tensor, "circuits": (n, C_U) numpy array, "centroids": (c, C_U) numpy array}``.

    Raises:
        ConfigError: the channel is not purified. DataError: the data is not the purification data
            (too short) or the file holds no reference indices.

    Example:
        >>> out = neuron_circuits(pm, "layer4", 5, data)      # doctest: +SKIP
        >>> out["circuits"].shape                              # doctest: +SKIP
        (8, 256)
    """
    pl = pm.pure_layer(layer)
    k = _position(pm, layer, channel)
    idx = pl.ref_indices[k].cpu()
    if idx.numel() == 0:
        raise DataError(f"the model holds no reference samples for {layer!r}; purify it again to draw figures.")
    clusters = pl.ref_clusters[k].cpu()
    check_references(pm, data, batch_size=batch_size)
    source = DataSource.from_data(data, batch_size)
    if int(idx.max()) >= len(source):
        raise DataError(
            f"the references of {layer}:{channel} point to sample {int(idx.max())}, but the data has {len(source)} "
            "samples; pass the same data (and --limit) the model was purified on."
        )
    images = source.fetch(idx)
    device = next(pm.base_model.parameters()).device
    parts = []
    for s in range(0, len(idx), batch_size):
        x = images[s : s + batch_size].to(device)
        with torch.no_grad():
            r = circuit_relevance(
                pm.base_model, x, layer, [int(channel)], upstream=pl.upstream, skip_aware=pl.skip_aware,
                max_memory=pm.max_memory,
            )
        parts.append(r[:, 0].float().cpu())
    n_cl = int(pl.n_clusters[k])
    return {
        "indices": idx.numpy(),
        "clusters": clusters.numpy(),
        "images": images.cpu(),
        "circuits": torch.cat(parts).numpy(),
        "centroids": pl.centroids[k, :n_cl].float().cpu().numpy() if pl.gate == "circuit" else None,
    }


def embed_2d(
    vectors: np.ndarray, *, method: str = "pca", seed: int = 0, extra: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray | None]:
    """2-D embedding of row vectors with scikit-learn (``"pca"`` or ``"tsne"``).

    ``extra`` rows (e.g. centroids) are placed in the same plane: projected for PCA, at the mean of
    their nearest vectors' positions for t-SNE (which has no out-of-sample transform).

    Example:
        >>> pts, _ = embed_2d(np.random.default_rng(0).normal(size=(10, 5)))
        >>> pts.shape
        (10, 2)
    """
    if method not in EMBEDDINGS:
        raise ConfigError(f"embedding must be one of {EMBEDDINGS}, got {method!r}.")
    v = np.asarray(vectors, dtype=np.float64)
    n = len(v)
    if n < 2 or v.shape[1] < 2:
        pts = np.zeros((n, 2))
        pts[:, 0] = v[:, 0] if v.shape[1] else 0
        return pts, None if extra is None else np.zeros((len(extra), 2))
    if method == "pca":
        from sklearn.decomposition import PCA

        pca = PCA(n_components=2, random_state=seed).fit(v)
        return pca.transform(v), None if extra is None else pca.transform(np.asarray(extra, dtype=np.float64))
    from sklearn.manifold import TSNE

    perplexity = float(max(1.0, min(30.0, (n - 1) / 3)))
    method = "exact" if n <= 500 else "barnes_hut"  # exact is faster for a neuron's ~100 references
    pts = TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=seed, method=method).fit_transform(v)
    if extra is None:
        return pts, None
    near = ((np.asarray(extra)[:, None, :] - v[None]) ** 2).sum(-1).argmin(axis=0)
    placed = np.stack([pts[near == c].mean(0) if (near == c).any() else pts.mean(0) for c in range(len(extra))])
    return pts, placed


def _as_image(x: Tensor) -> tuple[np.ndarray, str | None]:
    """A displayable image (H, W) or (H, W, 3) scaled to [0, 1], and its colour map."""
    a = x.detach().float().cpu().numpy()
    if a.ndim == 2:
        a = a[None]
    a = a[:3] if a.shape[0] >= 3 else a[:1]
    lo, hi = float(a.min()), float(a.max())
    a = (a - lo) / (hi - lo) if hi > lo else np.zeros_like(a)
    return (a[0], "gray") if a.shape[0] == 1 else (a.transpose(1, 2, 0), None)


def neuron_figure(
    pm: Any,
    layer: str,
    channel: int,
    data: Any,
    *,
    n_images: int = 6,
    embedding: str = "pca",
    seed: int = 0,
    class_names: Any = None,
    labels: Any = None,
) -> Any:
    """A matplotlib Figure of one purified neuron: reference images per virtual neuron, circuits in 2-D.

    Args:
        pm: a :class:`~purenn.PurifiedModel`.
        layer: a purified layer.
        channel: a purified channel of that layer.
        data: the data the model was purified on.
        n_images: reference images shown per virtual neuron (strongest first).
        embedding: ``"pca"`` or ``"tsne"``.
        seed: seed of the embedding.
        class_names: optional names, indexed by ``labels``, written under the images.
        labels: optional ``(N,)`` label of every data sample, to caption the images.

    Returns:
        :class:`matplotlib.figure.Figure`.

    Raises:
        MissingExtraError: matplotlib is not installed (``pip install "purenn[viz]"``).

    Example:
        >>> fig = neuron_figure(pm, "layer4", 5, data)       # doctest: +SKIP
        >>> fig.savefig("layer4_5.png", dpi=120)              # doctest: +SKIP
    """
    mfig = _matplotlib()
    n_images = check_int("n_images", n_images, 1)
    if embedding not in EMBEDDINGS:
        raise ConfigError(f"embedding must be one of {EMBEDDINGS}, got {embedding!r}.")
    pl = pm.pure_layer(layer)
    k = _position(pm, layer, channel)
    info = neuron_circuits(pm, layer, channel, data)
    n_cl = int(pl.n_clusters[k])
    clusters = info["clusters"]
    pts, cpts = embed_2d(info["circuits"], method=embedding, seed=seed, extra=info["centroids"])
    counts = pl.ref_counts[k].tolist()
    score = float(pl.scores[k])

    rows = max(n_cl, 1)
    fig = mfig.Figure(figsize=(1.25 * n_images + 4.2, max(1.45 * rows + 0.7, 3.2)), layout="constrained")
    grid = fig.add_gridspec(rows, n_images + 3)
    for c in range(rows):
        colour = _COLOURS[c % len(_COLOURS)]
        members = np.flatnonzero(clusters == c)[:n_images]
        v = pm.virtual_index(layer, int(channel), c)
        for j in range(n_images):
            ax = fig.add_subplot(grid[c, j])
            ax.set_xticks([])
            ax.set_yticks([])
            for side in ax.spines.values():
                side.set_color(colour)
                side.set_linewidth(2)
            if j < len(members):
                img, cmap = _as_image(info["images"][members[j]])
                ax.imshow(img, cmap=cmap, interpolation="nearest")
                sample = int(info["indices"][members[j]])
                if labels is not None:
                    lab = int(labels[sample])
                    name = class_names[lab] if class_names is not None and lab < len(class_names) else str(lab)
                    ax.set_xlabel(str(name), fontsize=7)
            else:
                ax.axis("off")
            if j == 0:
                ax.set_ylabel(f"{channel}.{c}\nv{v}, {counts[c]} refs", fontsize=8, color=colour)
    ax = fig.add_subplot(grid[:, n_images:])
    for c in range(rows):
        sel = clusters == c
        ax.scatter(pts[sel, 0], pts[sel, 1], s=14, color=_COLOURS[c % len(_COLOURS)], label=f"{channel}.{c}",
                   alpha=0.8, edgecolors="none", zorder=3)
    if cpts is not None:
        for c in range(n_cl):
            ax.scatter(cpts[c, 0], cpts[c, 1], marker="X", s=130, color=_COLOURS[c % len(_COLOURS)],
                       edgecolors="black", linewidths=1, alpha=0.55, zorder=2)
    ax.set_title(f"circuits ({embedding.upper() if embedding == 'pca' else 't-SNE'})", fontsize=9)
    ax.set_xticks([])
    ax.set_yticks([])
    ax.legend(fontsize=7, loc="best", frameon=False)
    what = "concept effect" if pl.score_kind == CONCEPT_SCORE else "score"
    fig.suptitle(f"{layer} neuron {channel}: {n_cl} virtual neurons, {what} {score:.3f}, upstream {pl.upstream}",
                 fontsize=10)
    return fig


def save_neuron_figure(pm: Any, layer: str, channel: int, data: Any, path: str, *, dpi: int = 110, **kwargs) -> str:
    """Draw :func:`neuron_figure` and write it to ``path`` (format from the suffix, e.g. ``.png``;
    ``dpi`` in 1..MAX_DPI). Written like every purenn file (:mod:`purenn.io.files`): atomically, with a
    normal file's mode, through a symbolic link.

    Example:
        >>> save_neuron_figure(pm, "layer4", 5, data, "neuron.png")     # doctest: +SKIP
        'neuron.png'
    """
    dpi = check_int("dpi", dpi, 1, MAX_DPI)
    fmt = as_path(path, "path").suffix[1:].lower() or "png"
    resolve_target(path, "figure file name such as 'neuron.png'")  # before drawing: a missing directory, ...
    fig = neuron_figure(pm, layer, channel, data, **kwargs)
    try:
        with atomic_write(path, "figure file name such as 'neuron.png'") as tmp:
            fig.savefig(tmp, dpi=dpi, format=fmt)
    except OSError as e:
        raise DataError(f"cannot write the figure to {path!r}: {e.strerror or e}.") from None
    except ValueError as e:  # matplotlib: an unknown format
        raise ConfigError(f"cannot write the figure to {path!r}: {e}") from None
    return str(path)
