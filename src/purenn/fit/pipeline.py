"""``purify_model``: plan, collect references, compute circuits, cluster, build the purified model.

The function runs the named stages of :mod:`purenn.fit.stages` on the validated plan of
:func:`purenn.fit.plan.make_plan`; its keyword options are the ``purenn purify`` command's.

Everything is validated before any heavy work starts, and the caller's model is never modified:
not its weights, not its mode (it runs in inference form whatever its mode), not its device (with
``device=`` elsewhere, purenn works on a copy moved there).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from purenn.attribution.relevance import DEFAULT_MAX_MEMORY
from purenn.attribution.rules import Rule
from purenn.common.choices import DEFAULT_SCORE
from purenn.fit.plan import DEFAULT_CACHE_MEMORY, LayerPlan, make_plan
from purenn.fit.stages import build_stage, cluster_stage, collect_stage, features_stage
from purenn.model.purified import PurifiedModel

__all__ = ["purify_model", "LayerPlan", "DEFAULT_CACHE_MEMORY"]


def purify_model(
    model: nn.Module,
    layers: Sequence[str] = ("layer4",),
    data: Any = None,
    *,
    n_refs: int = 100,
    n_clusters: int | str = 2,
    neurons: int | Mapping[str, Sequence[int] | int] | None = None,
    upstream: Mapping[str, str] | None = None,
    skip_aware: bool | str = "auto",
    max_clusters: int = 4,
    gate: str = "circuit",
    gate_weight: float = 0.5,
    score: str = DEFAULT_SCORE,
    batch_size: int = 64,
    device: torch.device | str | None = None,
    progress: bool = True,
    seed: int = 0,
    max_memory: int = DEFAULT_MAX_MEMORY,
    cache_memory: int = DEFAULT_CACHE_MEMORY,
    precision: str = "float32",
    workers: int | None = None,
    checkpoint_dir: str | os.PathLike | None = None,
    rule: str | Rule = "gradient",
) -> PurifiedModel:
    """Split neurons of a trained ResNet into pure virtual neurons (PURE).

    For each neuron of each layer: find its ``n_refs`` most activating samples in ``data``,
    compute their circuit relevance on the upstream layer, cluster the circuits with k-means into
    ``n_clusters`` centroids, and install a gate that routes the neuron's activation to the
    virtual neuron of the nearest centroid.

    Args:
        model: a trained torchvision or timm ResNet (any supported variant, see :mod:`purenn.arch`).
            It is never modified: purenn computes in inference form (BatchNorm with its running
            statistics) whatever its mode, leaves its mode, weights and device as they are, and the
            purified model shares its modules. A
            float16 or bfloat16 model is purified in float32 on a private copy, which the purified
            model then holds (``pm.half()`` converts it back if wanted).
        layers: target layers by module name: ``"layer4"`` (stage output), ``"layer3.1"`` (block).
        data: a map-style Dataset (items ``x`` or ``(x, y, ...)``), an unshuffled DataLoader over
            one, or a Tensor ``(N, C, H, W)``.
        n_refs: reference samples per neuron.
        n_clusters: virtual neurons per purified neuron (2 <= n_clusters <= n_refs), or ``"auto"``:
            per neuron, the count in ``2..max_clusters`` whose k-means split stands out most from a
            unimodal null, or 1 (the neuron stays whole) when none does (see
            :class:`~purenn.fit.cluster.CircuitKMeans`).
        neurons: ``{layer: [channels]}`` to purify only those; an integer ``N`` (for every layer, or
            ``{layer: N}``) purifies the ``N`` most polysemantic neurons by the score (every
            channel is fitted and scored first); default every channel.
        upstream: ``{layer: upstream_layer}`` to override the default upstream (previous stage
            output for a stage, previous block output for a block).
        skip_aware: leave out the neuron's own upstream channel when clustering and gating.
            ``"auto"`` (default) does so exactly when an identity skip carries that channel from the
            upstream to the target layer (no downsample in between), where it otherwise dominates
            the normalised circuit; ``False`` is PURE unchanged.
        max_clusters: largest count ``n_clusters="auto"`` considers.
        gate: ``"circuit"`` (PURE) or a forward-only baseline gate of :mod:`purenn.model.gates`:
            ``"activation"`` (k-means on the target layer's spatially mean-pooled activation vector
            over the references, PURE's evaluation baseline), ``"upstream"`` (the upstream layer's
            pooled activations) or ``"map"`` (the neuron's own activation map); or ``"circuit+map"``:
            the circuit and the neuron's own activation map, each scaled to unit length, the map
            weighted by ``gate_weight``.
        gate_weight: weight of the activation map in a ``"circuit+map"`` gate.
        score: the polysemanticity score stored per neuron and used by ``neurons=N``:
            ``"contrast+upstream"`` (default: the contrast of the circuit split times that of the
            references' pooled upstream activations; one more forward pass over the references),
            ``"contrast"`` or ``"silhouette"``, see :class:`~purenn.fit.cluster.CircuitKMeans`.
        batch_size: samples per forward pass.
        device: where to compute (default: the model's device). When the model is elsewhere, purenn
            works on a copy moved there, and the purified model holds that copy (the caller's model
            stays where it was); ``"meta"`` and unavailable devices are refused.
        progress: show progress bars.
        seed: k-means seed; the same seed gives the same centroids and gates.
        max_memory: bytes of intermediate tensors per relevance chunk.
        cache_memory: bytes the streaming pass may spend keeping the upstream activations of the
            reference candidates, so fitting need not run the network again (0 disables it; when
            the candidates need more, fitting recomputes their forward pass instead).
        precision: arithmetic of the per-pair relevance backward: ``"float32"`` (default: the
            model's dtype), ``"tf32"`` (CUDA only) or ``"bf16"`` (autocast); forwards stay in the
            model's dtype. See :mod:`purenn.attribution.precision`.
        workers: data loading processes (a ``DataLoader``'s ``num_workers``; default: the given
            DataLoader's, else 0). On a CUDA device batches are loaded into pinned memory.
        checkpoint_dir: a folder where the run keeps its state (the reference pass's running
            top-n tables, every finished relevance chunk), written atomically as it goes; running
            again with the same arguments, model and data continues where an interrupted run
            stopped and gives the same result. Other arguments or data are refused with a
            :class:`ConfigError`. See :mod:`purenn.fit.resume`.
        rule: relevance rule of the circuits: ``"gradient"`` (PURE's gradient x activation, the
            default) or one of zennit's LRP rules ``"epsilon"``, ``"zplus"``, ``"alpha2beta1"``,
            ``"gamma"`` (zennit's default parameters), or a :class:`purenn.attribution.rules.Rule` such as
            ``purenn.attribution.rules.Epsilon(epsilon=0.01)``. Stored in the purified layers and the file, and
            used by the gates and the exported graph.

    Under torch.distributed (a default process group is initialised, e.g. by ``torchrun``) the
    work is split across ranks and every rank returns the same model, equal to the single-process
    result (see :mod:`purenn.common.distributed`); ``data`` must then be map-style (indexable), which it
    must be anyway, and each rank should compute on its own device (``torch.cuda.set_device``).

    Returns:
        The :class:`PurifiedModel`.

    Example:
        >>> import torch, torchvision, purenn
        >>> model = torchvision.models.resnet18(num_classes=4).eval()
        >>> pm = purenn.purify_model(model, ["layer4"], torch.rand(16, 3, 32, 32), n_refs=4,
        ...                          neurons={"layer4": [3, 7]}, progress=False)
        >>> pm.gates(torch.rand(2, 3, 32, 32))["layer4"].shape
        torch.Size([2, 2])
    """
    plan = make_plan(
        model, layers, data, n_refs=n_refs, n_clusters=n_clusters, neurons=neurons, upstream=upstream,
        skip_aware=skip_aware, max_clusters=max_clusters, gate=gate, gate_weight=gate_weight, score=score,
        batch_size=batch_size, device=device, progress=progress, seed=seed, max_memory=max_memory,
        cache_memory=cache_memory, precision=precision, workers=workers, checkpoint_dir=checkpoint_dir, rule=rule,
    )
    collected = collect_stage(plan)
    features = features_stage(plan, collected)
    fits = cluster_stage(plan, collected, features)
    del features
    return build_stage(plan, collected, fits)
