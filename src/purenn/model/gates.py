"""Gate signals: what a purified neuron's virtual neurons are chosen by.

``"circuit"`` is PURE: the neuron's normalised circuit relevance on the upstream layer (computed
by :mod:`purenn.attribution.relevance`, one backward pass through the segment per neuron). ``"circuit+map"``
combines two signals: the circuit and the neuron's own activation map, each scaled to unit length,
the map weighted by ``gate_weight`` (:func:`combine_features`). ``"joint-circuit"`` is the circuit of
the layer's purified neurons taken together (:func:`joint_circuit`): one backward pass per input
for all of them, each neuron comparing it with its own centroids; it is the gate of
:func:`~purenn.fit.concept.purify_concept`'s concept splits, where every channel asks the same
question. The others are baselines computed
from forward activations only, so they cost nothing beyond the forward pass and export to ONNX as
a few reductions and a nearest-centroid search:

- ``"activation"``: the target layer's spatially mean-pooled activation vector (all of its
  channels), the baseline of PURE's evaluation;
- ``"upstream"``: the upstream layer's spatially mean-pooled activation vector;
- ``"map"``: the neuron's own activation map, flattened (tied to the input resolution).

Fitting and gating call the same :func:`gate_features`, so centroids are fitted on exactly what
the gate evaluates.

Example:
    >>> import torch
    >>> a_up, a_t = torch.rand(2, 8, 4, 4), torch.rand(2, 16, 2, 2)
    >>> gate_features("activation", a_up, a_t, torch.tensor([3, 5])).shape
    torch.Size([2, 16])
    >>> gate_features("map", a_up, a_t, torch.tensor([3, 5])).shape
    torch.Size([2, 2, 4])
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
from torch import Tensor

from purenn.arch import Block, BlockRecord
from purenn.attribution.relevance import (
    DEFAULT_MAX_MEMORY,
    EPS,
    iter_grid_relevance,
    joint_relevance,
    normalize_relevance,
)
from purenn.attribution.rules import Rule
from purenn.common.checks import check_number
from purenn.common.choices import GATES
from purenn.errors import ConfigError

__all__ = ["GATES", "CIRCUIT_GATES", "ACTIVATION_GATES", "check_gate", "gate_features", "gate_dim",
           "nearest_centroid", "combine_features", "gate_feature_chunks", "joint_circuit"]

CIRCUIT_GATES = GATES[:3]
ACTIVATION_GATES = GATES[3:]


def check_gate(gate: object) -> str:
    """Validate a gate name."""
    if gate not in GATES:
        raise ConfigError(f"gate must be one of {GATES}, got {gate!r}.")
    return gate  # type: ignore[return-value]


def gate_features(gate: str, a_up: Tensor, a_target: Tensor, neurons: Tensor) -> Tensor:
    """Forward-only gate features: ``(B, D)`` shared by all neurons (``"activation"``,
    ``"upstream"``) or ``(B, K, D)`` per neuron (``"map"``)."""
    if gate == "activation":
        return a_target.clamp(min=0).mean(dim=(-2, -1))
    if gate == "upstream":
        return a_up.clamp(min=0).mean(dim=(-2, -1))
    if gate == "map":
        return a_target[:, neurons].clamp(min=0).flatten(2)
    raise ConfigError(f"gate {gate!r} has no forward-only features; supported: {ACTIVATION_GATES}.")


def combine_features(circuit: Tensor, extra: Tensor, weight: float, eps: float = 1e-12) -> Tensor:
    """``[circuit / |circuit|, weight * extra / |extra|]`` along the last axis (Euclidean norms), so
    neither signal dominates by its scale; an all-zero part stays zero.

    Example:
        >>> combine_features(torch.tensor([[3., 4.]]), torch.tensor([[0., 2.]]), 0.5)
        tensor([[0.6000, 0.8000, 0.0000, 0.5000]])
    """
    c = circuit / (circuit.norm(dim=-1, keepdim=True) + eps)
    e = extra / (extra.norm(dim=-1, keepdim=True) + eps)
    return torch.cat([c, weight * e], dim=-1)


def gate_feature_chunks(
    gate: str,
    blocks: Sequence[Block],
    recs: Sequence[BlockRecord],
    a_up: Tensor,
    a_target: Tensor,
    neurons: Tensor,
    *,
    rule: str | Rule = "gradient",
    skip_aware: bool = False,
    gate_weight: float = 0.5,
    max_memory: int = DEFAULT_MAX_MEMORY,
) -> Iterator[tuple[int, int, Tensor]]:
    """The features ``gate`` compares with the centroids: ``(start, stop, (B, stop - start, D))`` for
    ``neurons[start:stop]``, chunk by chunk within ``max_memory``.

    The one definition that gating, concept centroids and the export check share: for the circuit
    gates the L1-normalised circuit relevance of the segment ``blocks`` under ``rule`` (the neuron's
    own channel dropped when ``skip_aware``), for ``"circuit+map"`` combined with the neuron's map
    (:func:`combine_features`); for the forward-only gates :func:`gate_features`, broadcast to every
    neuron, in one chunk.
    """
    if gate in ACTIVATION_GATES:
        feat = gate_features(gate, a_up, a_target, neurons)
        yield 0, len(neurons), feat[:, None].expand(-1, len(neurons), -1) if feat.ndim == 2 else feat
        return
    if gate == "joint-circuit":  # one vector for the joint unit of all ``neurons``
        feat = joint_circuit(blocks, recs, a_up, a_target, neurons, rule=rule, skip_aware=skip_aware)
        yield 0, len(neurons), feat[:, None].expand(-1, len(neurons), -1)
        return
    extra = gate_features("map", a_up, a_target, neurons) if gate == "circuit+map" else None
    for s, e, raw in iter_grid_relevance(blocks, recs, a_up, a_target, neurons, max_memory, rule):
        feat = normalize_relevance(raw, neurons[s:e], drop_self=skip_aware)
        if extra is not None:
            feat = combine_features(feat, extra[:, s:e], gate_weight)
        yield s, e, feat


def joint_circuit(
    blocks: Sequence[Block],
    recs: Sequence[BlockRecord],
    a_up: Tensor,
    a_target: Tensor,
    neurons: Tensor,
    *,
    rule: str | Rule = "gradient",
    skip_aware: bool = False,
    eps: float = EPS,
) -> Tensor:
    """The ``"joint-circuit"`` gate's features ``(B, C_U)``: the L1-normalised circuit of the joint
    unit of ``neurons`` (:func:`~purenn.attribution.relevance.joint_relevance`, one backward pass for
    all of them), with the neurons' own upstream channels left out when ``skip_aware``.

    Every purified neuron of the layer compares this one vector with its own centroids: a concept's
    channels all ask the same question (is the concept's circuit there?), so one relevance pass
    answers it for all of them.
    """
    raw = joint_relevance(blocks, recs, a_up, a_target, neurons, rule)
    if skip_aware:  # an identity skip carries each neuron's own channel straight through
        channels = torch.arange(raw.shape[-1], device=raw.device)
        own = (channels[:, None] == neurons[None]).to(raw.dtype).sum(dim=1).clamp(max=1)
        raw = raw * (1 - own)
    return raw / (raw.abs().sum(dim=-1, keepdim=True) + eps)


def check_gate_weight(weight: object) -> float:
    """Validate the weight of the second signal of a combined gate."""
    return check_number("gate_weight", weight, 0)


def gate_dim(gate: str, up_channels: int, channels: int) -> int | None:
    """Feature size of a gate (``None`` for ``"map"`` and ``"circuit+map"``, which depend on the
    target map's ``H*W``)."""
    return {"circuit": up_channels, "joint-circuit": up_channels, "upstream": up_channels,
            "activation": channels}.get(gate)


def nearest_centroid(feat: Tensor, centroids: Tensor, n_clusters: Tensor) -> Tensor:
    """``(B, K)`` index of the nearest valid centroid.

    ``feat`` is ``(B, D)`` (shared) or ``(B, K, D)``; ``centroids`` ``(K, c_max, D)``; centroid rows
    at or past a neuron's ``n_clusters`` are never chosen.
    """
    valid = torch.arange(centroids.shape[1], device=n_clusters.device)[None] < n_clusters[:, None]
    if feat.ndim == 2:
        cross = torch.einsum("bd,kcd->bkc", feat, centroids)
        f2 = (feat * feat).sum(dim=-1)[:, None, None]
    else:
        cross = torch.einsum("bkd,kcd->bkc", feat, centroids)
        f2 = (feat * feat).sum(dim=-1)[:, :, None]
    dist = f2 - 2 * cross + (centroids * centroids).sum(dim=-1)[None]
    dist = torch.where(valid[None], dist, torch.full_like(dist, float("inf")))
    return dist.argmin(dim=-1)


