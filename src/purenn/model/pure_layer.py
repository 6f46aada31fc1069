"""Gate and virtual neurons of one purified layer: :class:`PureLayer` (relevance -> gate -> virtual
neurons -> merge) and :class:`VirtualNeuron`, a row of the table of virtual neurons.

A purified neuron ``k`` becomes virtual neurons ``k.0 ... k.(c-1)``; for each input exactly one of
them, the one whose centroid is nearest to the input's gate features, carries ``a_k``. The merge adds
the virtual neurons back into channel ``k`` (weighted by the suppression mask), so with nothing
suppressed the layer's output equals its input. :class:`~purenn.model.purified.PurifiedModel` holds
one per purified layer.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from purenn.arch import Block, BlockRecord
from purenn.attribution.relevance import DEFAULT_MAX_MEMORY
from purenn.attribution.rules import Rule, rule_from_config
from purenn.common.choices import is_score_kind
from purenn.errors import ConfigError
from purenn.model.gates import (
    ACTIVATION_GATES,
    check_gate,
    check_gate_weight,
    gate_feature_chunks,
    gate_features,
    joint_circuit,
    nearest_centroid,
)

POOLS = ("mean", "max", None)

__all__ = ["VirtualNeuron", "PureLayer", "POOLS"]


# guards the suppression bookkeeping of every PureLayer (a module-level lock keeps layers deep-copyable)
SUPPRESSION_LOCK = threading.RLock()


class VirtualNeuron(NamedTuple):
    """One row of :attr:`PurifiedModel.virtual_neurons`.

    ``index`` is the virtual index within the layer, ``channel`` the source channel, ``cluster``
    the centroid it stands for (0 for an unsplit channel), ``n_refs`` the reference samples in
    its cluster (0 for an unsplit channel), ``score`` the source neuron's polysemanticity score
    (``None`` for an unsplit channel), ``suppressed`` whether it is switched off.
    """

    layer: str
    index: int
    channel: int
    cluster: int
    n_refs: int
    score: float | None
    suppressed: bool


def module_key(layer: str) -> str:
    return layer.replace(".", "_")


def is_exporting() -> bool:
    compiling = getattr(getattr(torch, "compiler", None), "is_compiling", lambda: False)
    return bool(torch.jit.is_tracing() or compiling() or torch.onnx.is_in_onnx_export())


class PureLayer(nn.Module):
    """Gate and virtual neurons of one purified layer.

    Args:
        layer: target layer name (``"layer4"``, ``"layer3.1"``).
        upstream: upstream layer name.
        channels: channels of the target layer.
        neurons: purified channel indices, ascending.
        centroids: ``(K, c_max, C_U)`` centroids; rows past a neuron's cluster count are ignored.
        n_clusters: ``(K,)`` cluster count per neuron.
        scores: ``(K,)`` polysemanticity scores.
        ref_counts: ``(K, c_max)`` reference samples per cluster.
        ref_indices: ``(K, n)`` data indices of each neuron's reference samples, strongest first.
        ref_clusters: ``(K, n)`` cluster of each reference sample.
        skip_aware: gate on relevance with the neuron's own upstream channel left out.
        gate: what the gate compares with the centroids: ``"circuit"`` (PURE, the default),
            ``"circuit+map"`` (the circuit and the neuron's own activation map combined) or a
            forward-only baseline of :mod:`purenn.model.gates` (``"activation"``: the target layer's
            pooled activations, PURE's evaluation baseline; ``"upstream"``; ``"map"``).
        gate_weight: weight of the activation map in a ``"circuit+map"`` gate.
        score_kind: what ``scores`` measure: a polysemanticity score's name (``"contrast"``,
            ``"silhouette"``), ``"concept"`` (:func:`purenn.fit.concept.purify_concept`: the concept's
            effect) or ``None`` (not recorded); shown by ``inspect``, ``report`` and figures.
        rule: relevance rule: a name (``"gradient"``, PURE's, or zennit's ``"epsilon"``, ``"zplus"``,
            ``"alpha2beta1"``, ``"gamma"``), a :class:`purenn.attribution.rules.Rule` or its saved config;
            stored as a :class:`~purenn.attribution.rules.Rule` and used by the gate.

    Buffers saved in ``state_dict``: ``neurons``, ``centroids``, ``n_clusters``, ``scores``,
    ``ref_counts``, ``ref_indices``, ``ref_clusters`` and ``merge_weight`` (one weight per virtual
    neuron: 1 on, 0 suppressed).
    """

    def __init__(
        self,
        *,
        layer: str,
        upstream: str,
        channels: int,
        neurons: Sequence[int] | Tensor,
        centroids: Tensor,
        n_clusters: Sequence[int] | Tensor,
        scores: Sequence[float] | Tensor,
        ref_counts: Tensor,
        ref_indices: Tensor | None = None,
        ref_clusters: Tensor | None = None,
        skip_aware: bool = False,
        rule: str | Rule | Mapping[str, Any] = "gradient",
        gate: str = "circuit",
        gate_weight: float = 0.5,
        score_kind: str | None = None,
    ) -> None:
        super().__init__()
        self.gate = check_gate(gate)
        if not is_score_kind(score_kind):
            raise ConfigError(f"score_kind must be None or a short lower-case name ('contrast'), got {score_kind!r}.")
        self.score_kind = score_kind
        self.gate_weight = check_gate_weight(gate_weight)
        self.layer, self.upstream, self.channels = layer, upstream, int(channels)
        self.skip_aware, self.rule = bool(skip_aware), rule_from_config(rule)
        neurons = torch.as_tensor(neurons, dtype=torch.long)
        n_clusters = torch.as_tensor(n_clusters, dtype=torch.long)
        k, c_max = centroids.shape[:2]
        if neurons.shape != (k,) or n_clusters.shape != (k,) or ref_counts.shape != (k, c_max):
            raise ConfigError("neurons, n_clusters, ref_counts and centroids disagree on the number of neurons.")
        if k and (neurons.min() < 0 or neurons.max() >= channels or not bool((neurons[1:] > neurons[:-1]).all())):
            raise ConfigError("neurons must be unique channel indices in ascending order.")
        self.register_buffer("neurons", neurons)
        self.register_buffer("centroids", centroids.detach().clone())
        self.register_buffer("n_clusters", n_clusters)
        self.register_buffer("scores", torch.as_tensor(scores, dtype=torch.float32))
        self.register_buffer("ref_counts", ref_counts.to(torch.long))
        empty = torch.zeros(k, 0, dtype=torch.long)
        ref_indices = empty if ref_indices is None else torch.as_tensor(ref_indices, dtype=torch.long)
        ref_clusters = torch.zeros_like(ref_indices) if ref_clusters is None else torch.as_tensor(ref_clusters)
        if ref_indices.shape[0] != k or ref_clusters.shape != ref_indices.shape:
            raise ConfigError("ref_indices and ref_clusters must both have shape (neurons, n_refs).")
        self.register_buffer("ref_indices", ref_indices)
        self.register_buffer("ref_clusters", ref_clusters.to(torch.long))
        self._build_tables()
        self.register_buffer("merge_weight", torch.ones(self.n_virtual, dtype=centroids.dtype))
        # suppression bookkeeping (not saved): virtual index -> [active handles, weight before the first]
        self._held: dict[int, list] = {}
        self._held_epoch = 0

    def _build_tables(self) -> None:
        """Virtual-neuron index tables (derived, not saved)."""
        c_max = self.centroids.shape[1]
        count = torch.ones(self.channels, dtype=torch.long)
        count[self.neurons] = self.n_clusters
        kpos = torch.full((self.channels,), len(self.neurons), dtype=torch.long)
        kpos[self.neurons] = torch.arange(len(self.neurons))
        v_channel = torch.repeat_interleave(torch.arange(self.channels), count)
        first = torch.cumsum(count, 0) - count
        v_cluster = torch.arange(len(v_channel)) - first[v_channel]
        pad = torch.full((self.channels, max(c_max, 1)), len(v_channel), dtype=torch.long)
        for c in range(pad.shape[1]):
            ok = c < count
            pad[ok, c] = first[ok] + c
        self.register_buffer("v_channel", v_channel, persistent=False)
        self.register_buffer("v_cluster", v_cluster, persistent=False)
        self.register_buffer("v_kpos", kpos[v_channel], persistent=False)
        self.register_buffer("channel_slots", pad, persistent=False)

    #: constructor arguments that are plain values (the rest are the saved buffers)
    CONFIG_KEYS = ("layer", "upstream", "channels", "skip_aware", "rule", "gate", "gate_weight", "score_kind")
    #: buffers saved in ``state_dict`` and given to the constructor by name
    TENSOR_KEYS = ("neurons", "centroids", "n_clusters", "scores", "ref_counts", "ref_indices", "ref_clusters")

    def config(self) -> dict:
        """JSON-serialisable constructor arguments (everything except the tensors)."""
        out = {key: getattr(self, key) for key in self.CONFIG_KEYS}
        out["rule"] = self.rule.config()
        return out

    @classmethod
    def from_config(cls, config: dict, tensors: dict[str, Tensor]) -> PureLayer:
        """Rebuild from :meth:`config` and the tensors of ``state_dict`` (``merge_weight`` optional)."""
        optional = {"gate": "circuit", "gate_weight": 0.5, "score_kind": None}  # keys added after the first format
        plain = {k: config.get(k, optional.get(k)) if k in optional else config[k] for k in cls.CONFIG_KEYS}
        layer = cls(**plain, **{k: tensors[k] for k in cls.TENSOR_KEYS})
        if "merge_weight" in tensors:
            w = tensors["merge_weight"]
            if w.shape != layer.merge_weight.shape:
                raise ConfigError(
                    f"merge_weight of {config['layer']!r} has shape {tuple(w.shape)}, "
                    f"expected {tuple(layer.merge_weight.shape)}."
                )
            with torch.no_grad():
                layer.merge_weight.copy_(w)
        return layer

    # ---------------------------------------------------------------- suppression bookkeeping
    def _hold(self, indices: Sequence[int]) -> int:
        """Suppress ``indices`` for one more handle; returns the bookkeeping epoch the handle belongs to."""
        with SUPPRESSION_LOCK, torch.no_grad():
            for i in indices:
                entry = self._held.get(i)
                if entry is None:
                    self._held[i] = [1, self.merge_weight[i].clone()]
                else:
                    entry[0] += 1
            self.merge_weight[list(indices)] = 0
            return self._held_epoch

    def _release(self, indices: Sequence[int], epoch: int) -> None:
        """End one handle's hold; a virtual neuron no handle holds any more gets its weight from before."""
        with SUPPRESSION_LOCK, torch.no_grad():
            if epoch != self._held_epoch:
                return  # restore() ended every suppression since
            for i in indices:
                entry = self._held.get(i)
                if entry is None:
                    continue
                entry[0] -= 1
                if entry[0] <= 0:
                    self.merge_weight[i] = entry[1]
                    del self._held[i]

    def _release_all(self) -> None:
        """Switch every virtual neuron on and forget every hold (handles from before do nothing)."""
        with SUPPRESSION_LOCK, torch.no_grad():
            self.merge_weight.fill_(1)
            self._held.clear()
            self._held_epoch += 1

    def extra_repr(self) -> str:
        return (
            f"layer={self.layer!r}, upstream={self.upstream!r}, neurons={len(self.neurons)}/{self.channels}, "
            f"virtual={self.n_virtual}, skip_aware={self.skip_aware}, gate={self.gate!r}"
        )

    @property
    def n_virtual(self) -> int:
        return int(self.v_channel.shape[0])

    def summary(self) -> str:
        """One line in purenn's vocabulary: *channels* of the layer, *purified neurons* (channels split
        in two or more) and *virtual neurons* (what the layer has after the split: the purified
        neurons' parts plus one per channel left whole).

        Example:
            >>> pl.summary()                                           # doctest: +SKIP
            '8 of 512 channels purified into 16 virtual neurons; the layer has 520 virtual neurons'
        """
        split = self.n_clusters > 1
        parts = int(self.n_clusters[split].sum())
        return (f"{int(split.sum())} of {self.channels} channels purified into {parts} virtual neurons; "
                f"the layer has {self.n_virtual} virtual neurons")

    def gated_neurons(self, subset_only: bool) -> Tensor:
        """Positions (into ``neurons``) whose gate matters: all split neurons (a neuron left whole,
        with one cluster, always gates to 0), or only those whose virtual neurons have unequal merge
        weights (gates cannot change the merged output of the rest)."""
        if not subset_only:
            return torch.nonzero(self.n_clusters > 1).flatten()
        w = self.merge_weight[self.channel_slots[self.neurons].clamp(max=self.n_virtual - 1)]
        valid = torch.arange(w.shape[1], device=w.device)[None] < self.n_clusters[:, None]
        w_valid = torch.where(valid, w, w[:, :1])
        return torch.nonzero((w_valid != w_valid[:, :1]).any(dim=1)).flatten()

    def compute_gates(
        self,
        blocks: Sequence[Block],
        recs: Sequence[BlockRecord],
        a_up: Tensor,
        a_target: Tensor,
        positions: Tensor | None = None,
        max_memory: int = DEFAULT_MAX_MEMORY,
    ) -> Tensor:
        """Nearest-centroid gate ``(B, K)`` (int64) of the neurons at ``positions`` (default all)."""
        if positions is None:
            neurons, centroids, n_cl = self.neurons, self.centroids, self.n_clusters
        else:
            neurons, centroids, n_cl = self.neurons[positions], self.centroids[positions], self.n_clusters[positions]
        if self.gate in ACTIVATION_GATES:
            return nearest_centroid(gate_features(self.gate, a_up, a_target, neurons), centroids, n_cl)
        if self.gate == "joint-circuit":  # the joint unit is every purified neuron, whichever are gated
            feat = joint_circuit(blocks, recs, a_up, a_target, self.neurons, rule=self.rule, skip_aware=self.skip_aware)
            return nearest_centroid(feat, centroids, n_cl)
        valid = torch.arange(centroids.shape[1], device=n_cl.device)[None] < n_cl[:, None]
        out = []
        for s, e, feat in gate_feature_chunks(self.gate, blocks, recs, a_up, a_target, neurons, rule=self.rule,
                                              skip_aware=self.skip_aware, gate_weight=self.gate_weight,
                                              max_memory=max_memory):
            dist = ((feat[:, :, None, :] - centroids[None, s:e]) ** 2).sum(dim=-1)
            dist = torch.where(valid[None, s:e], dist, torch.full_like(dist, float("inf")))
            out.append(dist.argmin(dim=-1))
        return out[0] if len(out) == 1 else torch.cat(out, dim=1)

    def selection(self, gates: Tensor) -> Tensor:
        """``(B, V)`` weight of each virtual neuron: merge weight if its cluster is the gate, else 0."""
        ext = torch.cat([gates, torch.zeros_like(gates[:, :1])], dim=1)
        chosen = ext[:, self.v_kpos] == self.v_cluster[None]
        return chosen.to(self.merge_weight.dtype) * self.merge_weight[None]

    def merge(self, a: Tensor, gates: Tensor | None) -> Tensor:
        """The merged activation the rest of the network sees: ``sum_c w_{k.c} * virtual_{k.c}``."""
        if gates is None:
            w = self.merge_weight[self.channel_slots[:, 0]][None]
        else:
            sel = self.selection(gates)
            sel = torch.cat([sel, torch.zeros_like(sel[:, :1])], dim=1)
            w = sel[:, self.channel_slots].sum(dim=-1)
        return a * w.to(a.dtype)[:, :, None, None]

    def features(self, a: Tensor, gates: Tensor, pool: str | None = "mean") -> Tensor:
        """Pure features: ``(B, V)`` pooled (``"mean"``/``"max"``) or ``(B, V, H, W)`` maps (``None``)."""
        sel = self.selection(gates).to(a.dtype)
        if pool is None:
            return a[:, self.v_channel] * sel[:, :, None, None]
        pooled = a.mean(dim=(-2, -1)) if pool == "mean" else a.amax(dim=(-2, -1))
        return pooled[:, self.v_channel] * sel
