"""The named stages of :func:`~purenn.fit.pipeline.purify_model`, each a function with typed inputs
and outputs that can be called on its own.

1. :func:`~purenn.fit.plan.make_plan`: validate the options into a :class:`~purenn.fit.plan.PurifyPlan`;
2. :func:`collect_stage`: one streaming pass over the data keeps each neuron's top-n reference samples
   (and, within ``cache_memory``, their upstream activations);
3. :func:`features_stage`: the gate's features at every (reference, neuron) pair: circuit relevance,
   optionally combined with the activation map, or forward-only features;
4. :func:`cluster_stage`: k-means and a polysemanticity score per neuron, then the ``N`` highest scores
   where ``neurons=N`` asked for them;
5. :func:`build_stage`: the :class:`~purenn.model.pure_layer.PureLayer` of each layer and the
   :class:`~purenn.model.purified.PurifiedModel` with its reference-data record.

Example:
    >>> import torch, torchvision
    >>> from purenn.fit.plan import make_plan
    >>> model = torchvision.models.resnet18(num_classes=3).eval()
    >>> plan = make_plan(model, ["layer4"], torch.rand(8, 3, 32, 32), n_refs=4, neurons={"layer4": [0, 5]},
    ...                  progress=False)
    >>> collected = collect_stage(plan)
    >>> features = features_stage(plan, collected)
    >>> features["layer4"].shape  # (neurons, references, upstream channels)
    torch.Size([2, 4, 256])
    >>> pm = build_stage(plan, collected, cluster_stage(plan, collected, features))
    >>> pm.gates(torch.rand(1, 3, 32, 32))["layer4"].shape
    torch.Size([1, 2])
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from purenn.fit.circuits import fit_circuits
from purenn.fit.cluster import CircuitKMeans, fit_by_neuron
from purenn.fit.collect import ActivationCache, References, collect_references
from purenn.fit.gate_features import fit_gate_features
from purenn.fit.plan import LayerPlan, PurifyPlan
from purenn.fit.refcheck import fingerprint_references
from purenn.fit.resume import Checkpoint, run_fingerprint
from purenn.model.gates import combine_features, gate_features
from purenn.model.pure_layer import PureLayer
from purenn.model.purified import PurifiedModel

__all__ = ["Collected", "LayerFit", "collect_stage", "features_stage", "cluster_stage",
           "build_stage"]

@dataclass
class Collected:
    """What the reference pass found: ``refs[layer]`` (top-n sample ids and activations per channel),
    the ``cache`` of upstream activations at the candidates, and the resume ``checkpoint`` (or None)."""

    refs: dict[str, References]
    cache: ActivationCache
    checkpoint: Checkpoint | None


@dataclass
class LayerFit:
    """One layer's clustering: the fitted :class:`~purenn.fit.cluster.CircuitKMeans` over all planned
    neurons and ``keep``, the positions (into ``plan.neurons``) of the neurons that get split."""

    plan: LayerPlan
    kmeans: CircuitKMeans
    keep: np.ndarray


def collect_stage(plan: PurifyPlan) -> Collected:
    """Stage 2: one streaming pass over the data (sharded by rank) that keeps every planned neuron's
    ``n_refs`` most activating samples. With a ``checkpoint_dir`` the pass resumes from, and writes,
    its running tables; there is then no activation cache, so a resumed run computes what an
    uninterrupted one does."""
    checkpoint, cache_memory = None, plan.cache_memory
    if plan.checkpoint_dir is not None:
        checkpoint = Checkpoint(plan.checkpoint_dir, run_fingerprint(plan.arguments, plan.model, plan.source,
                                                                     plan.world), rank=plan.rank)
        cache_memory = 0
    cache = ActivationCache({p.up_position for p in plan.layers}, cache_memory)
    refs = collect_references(
        plan.spec, plan.source, {p.layer: p.position for p in plan.layers}, plan.n_refs, device=plan.device,
        progress=plan.progress, cache=cache, channels={p.layer: list(p.neurons) for p in plan.layers},
        checkpoint=checkpoint,
    )
    return Collected(refs, cache, checkpoint)


def _forward_features(plan: PurifyPlan, collected: Collected, gate: str, p: LayerPlan) -> Tensor:
    return fit_gate_features(
        plan.spec, plan.source, gate, p.position, p.up_position, list(p.neurons), collected.refs[p.layer],
        batch_size=plan.batch_size, device=plan.device, progress=plan.shows_progress,
    )


def features_stage(plan: PurifyPlan, collected: Collected) -> dict[str, Tensor]:
    """Stage 3: per layer, the gate's features ``(K, n_refs, D)`` at each neuron's references, on the
    CPU: what :func:`cluster_stage` clusters and what the gate compares with the centroids."""
    if not plan.circuit_gate:
        return {p.layer: _forward_features(plan, collected, plan.gate, p) for p in plan.layers}
    features = fit_circuits(
        plan.spec, plan.source, list(plan.layers), collected.refs, plan.n_refs, batch_size=plan.batch_size,
        device=plan.device, max_memory=plan.max_memory, progress=plan.shows_progress, cache=collected.cache,
        precision=plan.precision, checkpoint=collected.checkpoint,
    )
    if plan.gate == "circuit+map":
        for p in plan.layers:
            maps = _forward_features(plan, collected, "map", p)
            features[p.layer] = combine_features(features[p.layer], maps.to(features[p.layer].dtype),
                                                 plan.gate_weight)
    return features


def _pooled_upstream(plan: PurifyPlan, collected: Collected, p: LayerPlan) -> np.ndarray:
    """``(K, n, C)`` spatially pooled upstream activations at each neuron's references, for the
    ``"contrast+upstream"`` score: from the activation cache of the reference pass when it holds every
    reference (one process), else one forward pass over the distinct references."""
    ref_idx = collected.refs[p.layer].indices[list(p.neurons)]
    ids, inv = torch.unique(ref_idx.flatten(), return_inverse=True)
    if plan.world == 1 and collected.cache.holds({p.up_position}, ids.tolist()):
        pooled = []
        for s in range(0, len(ids), plan.batch_size):
            a_up = collected.cache.get(p.up_position, ids[s : s + plan.batch_size].tolist())
            pooled.append(gate_features("upstream", a_up, a_up, torch.empty(0, dtype=torch.long)).float().cpu())
        return torch.cat(pooled)[inv.reshape(ref_idx.shape)].numpy()
    return _forward_features(plan, collected, "upstream", p).float().numpy()


def cluster_stage(plan: PurifyPlan, collected: Collected, features: dict[str, Tensor]) -> dict[str, LayerFit]:
    """Stage 4: per layer, :class:`~purenn.fit.cluster.CircuitKMeans` on every neuron's features (split
    over ranks by neuron), and the neurons to keep: all, or the ``N`` highest scores (ties to the lower
    channel) in channel order where ``neurons=N``."""
    fits = {}
    for p in plan.layers:
        up = None
        if plan.score == "contrast+upstream":  # an "upstream" gate's features are these already
            up = (features[p.layer].float().numpy() if plan.gate == "upstream" else
                  _pooled_upstream(plan, collected, p))
        km = CircuitKMeans(plan.n_clusters, max_clusters=plan.max_clusters, score=plan.score, random_state=plan.seed,
                           progress=plan.shows_progress)
        km = fit_by_neuron(km, features[p.layer].numpy(), up)
        keep = np.arange(len(p.neurons))
        if p.layer in plan.top:
            keep = np.sort(np.argsort(-km.scores_, kind="stable")[: plan.top[p.layer]])
        fits[p.layer] = LayerFit(p, km, keep)
    return fits


def build_stage(plan: PurifyPlan, collected: Collected, fits: dict[str, LayerFit]) -> PurifiedModel:
    """Stage 5: a :class:`~purenn.model.pure_layer.PureLayer` per layer from its fit, the
    :class:`~purenn.model.purified.PurifiedModel` around ``plan.model``, and its reference-data record."""
    pure_layers = []
    for p in plan.layers:
        km, keep = fits[p.layer].kmeans, fits[p.layer].keep
        counts = km.n_clusters_[keep]
        c_max = int(counts.max())
        chosen = [p.neurons[i] for i in keep]
        pure_layers.append(
            PureLayer(
                layer=p.layer,
                upstream=p.upstream,
                channels=plan.spec.channels(p.position),
                neurons=chosen,
                centroids=torch.as_tensor(km.centroids_[keep, :c_max], dtype=plan.dtype),
                n_clusters=torch.as_tensor(counts),
                scores=torch.as_tensor(km.scores_[keep], dtype=torch.float32),
                ref_counts=torch.as_tensor(km.counts_[keep, :c_max]),
                ref_indices=collected.refs[p.layer].indices[chosen],
                ref_clusters=torch.as_tensor(km.labels_[keep]),
                skip_aware=p.skip_aware and plan.circuit_gate,
                rule=plan.rule,
                gate=plan.gate,
                gate_weight=plan.gate_weight,
                score_kind=plan.score,
            ).to(plan.device)
        )
    pm = PurifiedModel(plan.model, pure_layers, max_memory=plan.max_memory)
    pm._owns_base = plan.owned
    pm.reference_data = fingerprint_references(pm, plan.data, batch_size=plan.batch_size)
    return pm
