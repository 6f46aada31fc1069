"""Unlearning with virtual neurons: find the virtual neurons of a concept and switch them off.

A concept is given by labelled examples. :func:`concept_shares` measures, for every virtual neuron
of a purified layer, how much of it each label holds:

- ``by="mass"``: the share of the virtual neuron's gated activation mass (mean pooled pure feature
  per label, so labels count equally whatever their sample counts);
- ``by="refs"``: the share of the virtual neuron's own reference samples (from purification) that
  carry the label; this needs the labels of the data the model was purified on.

:func:`find_concept_neurons` keeps the virtual neurons where the concept's share reaches a
threshold, :func:`suppress_concept` switches them off (``pm.suppress``: a merge weight of 0, kept by
save and export), and :func:`unlearning_report` measures per-group accuracy before, after
suppressing the concept's virtual neurons, and after suppressing the whole original neurons they
come from.

Example:
    >>> found = find_concept_neurons(pm, "layer4", test_x, fine_test, concept=0)     # doctest: +SKIP
    >>> with pm.suppress("layer4", found.indices):                                    # doctest: +SKIP
    ...     logits = pm(x)
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from purenn.analysis.probe import extract_features
from purenn.common.checks import check_int
from purenn.errors import ConfigError, DataError
from purenn.fit.data import DataSource
from purenn.model.purified import SuppressionHandle

__all__ = [
    "SHARE_METHODS",
    "ConceptNeurons",
    "UnlearningReport",
    "concept_shares",
    "find_concept_neurons",
    "suppress_concept",
    "group_accuracy",
    "unlearning_report",
    "shortcut_metrics",
    "ShortcutReport",
    "shortcut_report",
]

SHARE_METHODS = ("mass", "refs")


def _labels(labels: Any, n: int | None = None) -> np.ndarray:
    y = np.asarray(labels.cpu() if isinstance(labels, torch.Tensor) else labels)
    if y.ndim != 1 or (n is not None and len(y) != n) or not np.issubdtype(y.dtype, np.integer):
        raise DataError(f"labels must be 1-D integers, one per sample ({n}), got {y.shape} {y.dtype}.")
    if len(y) and y.min() < 0:
        raise DataError("labels must be non-negative integers.")
    return y


def concept_shares(
    pm: Any,
    layer: str,
    data: Any = None,
    labels: Any = None,
    *,
    by: str = "mass",
    n_labels: int | None = None,
    batch_size: int = 128,
) -> np.ndarray:
    """``(L, V)`` share of each label in each virtual neuron of ``layer`` (columns sum to 1, or 0).

    Args:
        pm: a :class:`~purenn.PurifiedModel`.
        layer: a purified layer.
        data: labelled examples (``by="mass"``); unused for ``by="refs"``.
        labels: ``(N,)`` labels of ``data`` (``by="mass"``), or of the data the model was purified
            on, indexed by the stored reference indices (``by="refs"``).
        by: ``"mass"`` or ``"refs"`` (see the module docstring). With ``"refs"``, virtual neurons of
            channels that were not purified have no references and get 0.
        n_labels: number of labels (default ``max(labels) + 1``).
        batch_size: samples per forward pass.
    """
    if by not in SHARE_METHODS:
        raise ConfigError(f"by must be one of {SHARE_METHODS}, got {by!r}.")
    pl = pm.pure_layer(layer)
    if labels is None:
        raise DataError("concept_shares needs labels.")
    if by == "mass":
        if data is None:
            raise DataError("by='mass' needs labelled data.")
        n = len(DataSource.from_data(data, batch_size))
        y = _labels(labels, n)
        n_labels = int(y.max()) + 1 if n_labels is None else n_labels
        f = extract_features(pm, data, layer=layer, kind="pure", batch_size=batch_size)
        mean = np.zeros((n_labels, f.shape[1]))
        for c in range(n_labels):
            if (y == c).any():
                mean[c] = f[y == c].mean(axis=0)
    else:
        y = _labels(labels)
        if pl.ref_indices.shape[1] == 0:
            raise DataError(f"the PureLayer of {layer!r} stores no reference indices; use by='mass'.")
        if int(pl.ref_indices.max()) >= len(y):
            raise DataError(
                f"reference index {int(pl.ref_indices.max())} is past the {len(y)} labels; by='refs' needs the "
                "labels of the data the model was purified on."
            )
        n_labels = int(y.max()) + 1 if n_labels is None else n_labels
        mean = np.zeros((n_labels, pl.n_virtual))
        ref_y = y[pl.ref_indices.cpu().numpy()]  # (K, n)
        clusters = pl.ref_clusters.cpu().numpy()
        kpos, vclus = pl.v_kpos.tolist(), pl.v_cluster.tolist()
        for v in range(pl.n_virtual):
            if kpos[v] < len(pl.neurons):
                sel = ref_y[kpos[v]][clusters[kpos[v]] == vclus[v]]
                if len(sel):
                    mean[:, v] = np.bincount(sel, minlength=n_labels)[:n_labels]
    total = mean.sum(axis=0, keepdims=True)
    return np.divide(mean, total, out=np.zeros_like(mean), where=total > 0)


@dataclass
class ConceptNeurons:
    """Virtual neurons found for a concept: ``indices`` (virtual indices in ``layer``) and the
    concept's ``share`` of each of them; ``shares`` holds the concept's share of every virtual neuron."""

    layer: str
    concept: int
    indices: list[int]
    share: list[float]
    channels: list[int]
    shares: np.ndarray = field(repr=False)
    by: str = "mass"


def find_concept_neurons(
    pm: Any,
    layer: str,
    data: Any = None,
    labels: Any = None,
    concept: int = 0,
    *,
    by: str = "mass",
    threshold: float = 0.5,
    split_only: bool = False,
    top: int | None = None,
    batch_size: int = 128,
) -> ConceptNeurons:
    """The virtual neurons of ``layer`` where ``concept`` holds at least ``threshold`` of the share.

    Args:
        pm: a :class:`~purenn.PurifiedModel`.
        layer: a purified layer.
        data: labelled examples (see :func:`concept_shares`).
        labels: their labels (or, for ``by="refs"``, the labels of the purification data).
        concept: the label of the concept.
        by: ``"mass"`` or ``"refs"``.
        threshold: the share a virtual neuron needs (chance is 1 / number of labels).
        split_only: keep only virtual neurons of split channels (more than one virtual neuron).
        top: keep at most the ``top`` highest shares.
        batch_size: samples per forward pass.

    Example:
        >>> found = find_concept_neurons(pm, "layer4", test_x, fine_test, concept=3)   # doctest: +SKIP
        >>> found.indices[:5], found.share[:5]                                        # doctest: +SKIP
    """
    if not isinstance(threshold, (int, float)) or isinstance(threshold, bool) or not 0 < threshold <= 1:
        raise ConfigError(f"threshold must be in (0, 1], got {threshold!r}.")
    if top is not None:
        top = check_int("top", top, 1)
    shares = concept_shares(pm, layer, data, labels, by=by, batch_size=batch_size)
    if isinstance(concept, bool) or not isinstance(concept, (int, np.integer)) or not 0 <= concept < len(shares):
        raise ConfigError(f"concept must be a label in 0..{len(shares) - 1}, got {concept!r}.")
    s = shares[int(concept)]
    pl = pm.pure_layer(layer)
    ok = s >= threshold
    if split_only:
        counts = torch.ones(pl.channels, dtype=torch.long)
        counts[pl.neurons.cpu()] = pl.n_clusters.cpu()
        ok &= (counts[pl.v_channel.cpu()] > 1).numpy()
    idx = np.flatnonzero(ok)
    idx = idx[np.argsort(-s[idx], kind="stable")]
    if top is not None:
        idx = idx[:top]
    chan = pl.v_channel.cpu().numpy()
    return ConceptNeurons(
        layer, int(concept), idx.tolist(), s[idx].tolist(), sorted(set(chan[idx].tolist())), s, by
    )


def suppress_concept(
    pm: Any, layer: str, data: Any = None, labels: Any = None, concept: int = 0, **kwargs: Any
) -> tuple[SuppressionHandle, ConceptNeurons]:
    """Find the virtual neurons of ``concept`` (:func:`find_concept_neurons`, same arguments) and
    suppress them. Returns the suppression handle (``remove()`` undoes it) and what was found.

    Raises:
        DataError: no virtual neuron reaches the threshold.
    """
    found = find_concept_neurons(pm, layer, data, labels, concept, **kwargs)
    if not found.indices:
        raise DataError(
            f"no virtual neuron of {layer!r} holds a share >= the threshold of concept {concept}; "
            f"the largest share is {float(found.shares.max()):.3f}. Lower threshold= or purify more neurons."
        )
    return pm.suppress(layer, found.indices), found


def _predictions(model: Any, source: DataSource) -> np.ndarray:
    """``(N,)`` argmax of ``model``'s logits over ``source``."""
    p = next(model.parameters())
    preds = []
    with torch.no_grad():
        for _, x in source.batches():
            preds.append(model(x.to(device=p.device, dtype=p.dtype)).argmax(dim=1).cpu().numpy())
    return np.concatenate(preds) if preds else np.zeros(0, dtype=np.int64)


def group_accuracy(
    model: Any,
    data: Any,
    targets: Any,
    groups: Any,
    *,
    n_groups: int | None = None,
    batch_size: int = 256,
) -> np.ndarray:
    """``(G,)`` accuracy of ``model`` (argmax of its logits vs ``targets``) within each group.

    Groups are e.g. fine classes while the model predicts superclasses. NaN for an empty group.
    """
    source = DataSource.from_data(data, batch_size)
    t, g = _labels(targets, len(source)), _labels(groups, len(source))
    n_groups = int(g.max()) + 1 if n_groups is None else n_groups
    correct = _predictions(model, source) == t
    return np.array([correct[g == i].mean() if (g == i).any() else np.nan for i in range(n_groups)])


@dataclass
class UnlearningReport:
    """Per-group accuracy before and after suppression.

    ``after_virtual``: with the concept's virtual neurons suppressed; ``after_whole``: with every
    virtual neuron of the same channels suppressed (switching off the original neurons).
    """

    concept: int
    partner: int | None
    before: np.ndarray
    after_virtual: np.ndarray
    after_whole: np.ndarray
    found: ConceptNeurons

    def drop(self, group: int, whole: bool = False) -> float:
        """Accuracy drop of ``group`` (before minus after)."""
        after = self.after_whole if whole else self.after_virtual
        return float(self.before[group] - after[group])

    def selectivity(self, whole: bool = False, floor: float = 1e-3) -> float:
        """Drop of the concept over the drop of its partner (the partner's drop floored at ``floor``)."""
        if self.partner is None:
            raise ConfigError("selectivity needs a partner group.")
        return self.drop(self.concept, whole) / max(self.drop(self.partner, whole), floor)


def unlearning_report(
    pm: Any,
    found: ConceptNeurons,
    data: Any,
    targets: Any,
    groups: Any,
    *,
    partner: int | None = None,
    batch_size: int = 256,
) -> UnlearningReport:
    """Per-group accuracy before, after suppressing ``found``, and after suppressing whole neurons.

    The model is left as it was (suppressions are undone).

    Args:
        pm: a :class:`~purenn.PurifiedModel`.
        found: the concept's virtual neurons (:func:`find_concept_neurons`).
        data: held-out data.
        targets: what the model predicts (e.g. superclasses).
        groups: the group of each sample (e.g. fine classes); ``found.concept`` is one of them.
        partner: a group to compare with (e.g. the concept's partner in its superclass).
        batch_size: samples per forward pass.

    Example:
        >>> rep = unlearning_report(pm, found, test_x, coarse_test, fine_test, partner=9)  # doctest: +SKIP
        >>> rep.drop(0), rep.drop(9), rep.selectivity()                                    # doctest: +SKIP
    """
    if not found.indices:
        raise DataError("found holds no virtual neurons to suppress.")
    pl = pm.pure_layer(found.layer)
    g = _labels(groups)
    n_groups = int(max(g.max(), found.concept, partner if partner is not None else 0)) + 1
    acc = lambda: group_accuracy(pm, data, targets, groups, n_groups=n_groups, batch_size=batch_size)  # noqa: E731
    before = acc()
    with pm.suppress(found.layer, found.indices):
        after_virtual = acc()
    whole = np.flatnonzero(np.isin(pl.v_channel.cpu().numpy(), found.channels)).tolist()
    with pm.suppress(found.layer, whole):
        after_whole = acc()
    return UnlearningReport(found.concept, partner, before, after_virtual, after_whole, found)


# ------------------------------------------------------------------------------ shortcuts (Clever Hans)
def shortcut_metrics(
    model: Any,
    clean: Any,
    clean_labels: Any,
    artifact: Any,
    artifact_labels: Any,
    target: int,
    *,
    batch_size: int = 256,
) -> dict[str, float]:
    """How much ``model`` relies on an artifact that points to class ``target`` (a Clever-Hans shortcut).

    Returns ``reliance``: the share of ``artifact`` images of other classes predicted as ``target``
    minus the share of ``clean`` images of other classes predicted as ``target``; ``acc``: accuracy
    on the clean images; ``acc_target``: accuracy on the clean images of class ``target``.

    Args:
        model: any classifier module (a ResNet, a :class:`~purenn.PurifiedModel`).
        clean: images without the artifact (Tensor, Dataset or DataLoader) and ``clean_labels``.
        clean_labels: their true classes.
        artifact: images with the artifact (e.g. the clean ones stamped) and ``artifact_labels``,
            their true classes.
        artifact_labels: the true classes of the artifact images.
        target: the class the artifact points to.
        batch_size: images per forward pass.

    Example:
        >>> shortcut_metrics(model, x, y, stamp(x), y, target=0)        # doctest: +SKIP
        {'reliance': 0.41, 'acc': 0.87, 'acc_target': 0.86}
    """
    clean_src, artifact_src = DataSource.from_data(clean, batch_size), DataSource.from_data(artifact, batch_size)
    yc = _labels(clean_labels, len(clean_src))
    ya = _labels(artifact_labels, len(artifact_src))
    if isinstance(target, bool) or not isinstance(target, (int, np.integer)) or target < 0:
        raise ConfigError(f"target must be a class index, got {target!r}.")
    if not (yc != target).any() or not (ya != target).any():
        raise DataError(f"both image sets need images of classes other than {target} to measure reliance.")
    pc, pa = _predictions(model, clean_src), _predictions(model, artifact_src)
    own = yc == target
    return {
        "reliance": float((pa[ya != target] == target).mean() - (pc[~own] == target).mean()),
        "acc": float((pc == yc).mean()),
        "acc_target": float((pc[own] == target).mean()) if own.any() else float("nan"),
    }


@dataclass
class ShortcutReport:
    """:func:`shortcut_metrics` of the original model (``before``), with the suppressions of the
    purified model (``after``) and with every virtual neuron of the suppressed channels switched off
    (``whole``: ablating those channels). ``removed``: the share of the reliance taken away."""

    target: int
    before: dict[str, float]
    after: dict[str, float]
    whole: dict[str, float]

    def removed(self, whole: bool = False) -> float:
        after = self.whole if whole else self.after
        return 1 - after["reliance"] / self.before["reliance"] if self.before["reliance"] > 0 else float("nan")

    def summary(self) -> str:
        """A small table: reliance, reliance removed and accuracy costs per variant (``n/a`` where a
        figure is undefined: no reliance to remove, or no clean image of the target class)."""

        def fmt(v: float, spec: str, width: int) -> str:
            return f"{'n/a':>{width}s}" if math.isnan(v) else f"{v:{width}{spec}}"

        lines = [f"{'':24s} {'reliance':>9s} {'removed':>8s} {'clean acc':>10s} {'acc of target':>14s}"]
        for name, m, rem in (("original", self.before, 0.0), ("suppressed (purenn)", self.after, self.removed()),
                             ("whole channels off", self.whole, self.removed(True))):
            lines.append(f"{name:24s} {m['reliance']:9.3f} {fmt(rem, '.1%', 8)} {m['acc']:10.3f} "
                         f"{fmt(m['acc_target'], '.3f', 14)}")
        if not self.before["reliance"] > 0:
            lines.append("removed: n/a, the original model does not rely on the concept here (reliance <= 0)")
        return "\n".join(lines)


def shortcut_report(
    pm: Any,
    clean: Any,
    clean_labels: Any,
    artifact: Any,
    artifact_labels: Any,
    target: int,
    *,
    batch_size: int = 256,
) -> ShortcutReport:
    """Compare the original model, ``pm`` with its current suppressions, and whole-channel ablation.

    ``pm`` must have at least one suppressed virtual neuron; it is left as it was.

    Example:
        >>> pm.suppress("layer4", concept_virtual_indices(pm, "layer4"))                # doctest: +SKIP
        >>> print(shortcut_report(pm, x, y, stamp(x), y, target=0).summary())           # doctest: +SKIP
    """
    suppressed = {
        name: torch.nonzero(pm.pure_layer(name).merge_weight == 0).flatten().tolist() for name in pm.layers
    }
    if not any(suppressed.values()):
        raise DataError("the purified model has no suppressed virtual neuron; suppress the concept's first.")

    def measure() -> dict[str, float]:
        return shortcut_metrics(pm, clean, clean_labels, artifact, artifact_labels, target, batch_size=batch_size)

    after = measure()
    handles = []
    try:
        for name, idx in suppressed.items():
            if idx:
                pl = pm.pure_layer(name)
                chans = set(pl.v_channel[idx].tolist())
                handles.append(pm.suppress(name, [v for v in range(pl.n_virtual) if int(pl.v_channel[v]) in chans]))
        whole = measure()
    finally:
        for h in reversed(handles):
            h.remove()
    saved = []
    try:
        for name, idx in suppressed.items():
            if idx:
                pl = pm.pure_layer(name)
                saved.append((pl, pl.merge_weight.clone()))
                with torch.no_grad():
                    pl.merge_weight.fill_(1)
        before = measure()
    finally:
        with torch.no_grad():
            for pl, w in saved:
                pl.merge_weight.copy_(w)
    return ShortcutReport(int(target), before, after, whole)
