"""Surgery: :class:`PureLayer` (relevance -> gate -> virtual neurons -> merge) and :class:`PurifiedModel`.

The purified model wraps the original ResNet without changing it. Its forward pass replays the
ResNet block by block (:class:`~purenn.arch.ResNetSpec`), always in inference form (BatchNorm with
its running statistics, whatever mode the base model is in), and, after each purified layer, hands
the activation to that layer's :class:`PureLayer`. A purified neuron ``k`` becomes virtual neurons
``k.0 ... k.(c-1)``; for each input exactly one of them, the one whose centroid is nearest to the
input's circuit relevance, carries ``a_k``. The merge adds the virtual neurons back into channel
``k`` (weighted by the suppression mask), so with nothing suppressed the logits equal the original.

Example:
    >>> import torch, torchvision, purenn
    >>> model = torchvision.models.resnet18(num_classes=3).eval()
    >>> pm = purenn.purify_model(model, ["layer4"], torch.rand(24, 3, 32, 32), n_refs=6,
    ...                          neurons={"layer4": [0, 1]}, progress=False)
    >>> torch.equal(pm(torch.ones(1, 3, 32, 32)), model(torch.ones(1, 3, 32, 32)))
    True
"""

from __future__ import annotations

import copy
import itertools
import os
import threading
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import Tensor, nn

from ._choices import is_score_kind
from ._validate import as_int, check_int, check_memory
from .arch import Block, BlockRecord, ResNetSpec, input_conv
from .errors import ConfigError, LayerError
from .gating import (
    ACTIVATION_GATES,
    CIRCUIT_GATES,
    check_gate,
    check_gate_weight,
    gate_dim,
    gate_feature_chunks,
    gate_features,
    nearest_centroid,
)
from .relevance import DEFAULT_MAX_MEMORY, check_input
from .rules import Rule, rule_from_config

__all__ = ["VirtualNeuron", "PureLayer", "PurifiedModel", "SuppressionHandle", "POOLS"]

POOLS = ("mean", "max", None)

# guards the suppression bookkeeping of every PureLayer (a module-level lock keeps layers deep-copyable)
_SUPPRESSION_LOCK = threading.RLock()


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


def _module_key(layer: str) -> str:
    return layer.replace(".", "_")


def _is_exporting() -> bool:
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
            forward-only baseline of :mod:`purenn.gating` (``"activation"``: the target layer's
            pooled activations, PURE's evaluation baseline; ``"upstream"``; ``"map"``).
        gate_weight: weight of the activation map in a ``"circuit+map"`` gate.
        score_kind: what ``scores`` measure: a polysemanticity score's name (``"contrast"``,
            ``"silhouette"``), ``"concept"`` (:func:`purenn.concept.purify_concept`: the concept's
            effect) or ``None`` (not recorded); shown by ``inspect``, ``report`` and figures.
        rule: relevance rule: a name (``"gradient"``, PURE's, or zennit's ``"epsilon"``, ``"zplus"``,
            ``"alpha2beta1"``, ``"gamma"``), a :class:`purenn.rules.Rule` or its saved config;
            stored as a :class:`~purenn.rules.Rule` and used by the gate.

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
        with _SUPPRESSION_LOCK, torch.no_grad():
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
        with _SUPPRESSION_LOCK, torch.no_grad():
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
        with _SUPPRESSION_LOCK, torch.no_grad():
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


class SuppressionHandle:
    """Returned by :meth:`PurifiedModel.suppress`; ``remove()`` (or leaving a ``with`` block) ends that
    suppression.

    A virtual neuron stays suppressed while any handle that covers it is active; when the last one is
    removed it gets back the merge weight it had before the first (so a neuron that was suppressed
    when the model was loaded stays suppressed). Handles may be removed in any order, and removing
    one twice does nothing. :meth:`PurifiedModel.restore` ends every suppression of its layers; the
    handles from before it then do nothing.

    Args:
        layer: the :class:`PureLayer` the suppression applies to.
        indices: virtual indices held by this handle.
        previous: their merge weights just before the call (for information).

    Example:
        >>> h1 = pm.suppress("layer4", [3])                 # doctest: +SKIP
        >>> h2 = pm.suppress("layer4", [3, 4])              # doctest: +SKIP
        >>> h1.remove()    # 3 stays off: h2 still holds it  # doctest: +SKIP
        >>> h2.remove()    # 3 and 4 are back on             # doctest: +SKIP
    """

    def __init__(self, layer: PureLayer, indices: Tensor, previous: Tensor) -> None:
        self._layer, self._indices, self.previous = layer, indices, previous
        self._list = [int(i) for i in indices.tolist()]
        self._epoch: int | None = None  # set once the hold is taken (by PurifiedModel.suppress)

    def _take(self) -> SuppressionHandle:
        self._epoch = self._layer._hold(self._list)
        return self

    @property
    def active(self) -> bool:
        """Whether this handle still holds its virtual neurons suppressed."""
        return self._epoch is not None and self._epoch == self._layer._held_epoch

    def remove(self) -> None:
        """End this suppression (see the class docstring); safe to call more than once."""
        with _SUPPRESSION_LOCK:
            epoch, self._epoch = self._epoch, None
            if epoch is not None:
                self._layer._release(self._list, epoch)

    def __enter__(self) -> SuppressionHandle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()


def _int_list(values: object) -> list:
    """``values`` as a list of items to check with :func:`as_int`: a single integer scalar becomes a
    one-item list, a 1-d tensor or array its elements; anything else that is not a sequence a
    :class:`ConfigError`."""
    if as_int(values) is not None:
        return [values]
    if isinstance(values, (torch.Tensor, np.ndarray)):
        if values.ndim != 1:
            raise ConfigError(f"expected a 1-d list of integers, got an array of shape {tuple(values.shape)}.")
        return list(values.tolist())
    if isinstance(values, (str, bytes)) or not isinstance(values, (Sequence, set, frozenset, range)):
        raise ConfigError(f"expected an integer or a list of integers, got {values!r}.")
    return list(values)


def _copy_module(module: nn.Module, fn: Callable[[Tensor], Tensor]) -> nn.Module:
    """A deep copy of ``module`` whose parameters and buffers are ``fn`` of the originals (converted
    straight into the copy, so the original's memory is not duplicated first); the original is not
    changed and shares no storage with the copy."""
    memo: dict[int, object] = {}
    with torch.no_grad():
        for t in itertools.chain(module.parameters(), module.buffers()):
            new = fn(t.detach())
            if new.numel() and t.numel() and new.device == t.device and new.data_ptr() == t.data_ptr():
                new = new.clone()
            if isinstance(t, nn.Parameter):
                new = nn.Parameter(new, requires_grad=t.requires_grad)
            memo[id(t)] = new
    return copy.deepcopy(module, memo)


def _converts(module: nn.Module, fn: Callable[[Tensor], Tensor]) -> bool:
    """Whether applying ``fn`` (a conversion of :meth:`nn.Module._apply`) would change any tensor."""
    with torch.no_grad():
        return any(fn(t) is not t for t in itertools.chain(module.parameters(), module.buffers()))


class PurifiedModel(nn.Module):
    """A ResNet whose purified layers route each neuron's activation to one of its virtual neurons.

    Build it with :func:`purenn.purify_model` (or :func:`purenn.load_purified`). ``pm(x)`` returns
    the logits, equal to ``model(x)`` in eval mode while nothing is suppressed. The model is
    inference-only.

    Ownership: the base model's modules are shared with the caller, never changed. ``pm`` runs them
    in inference form (BatchNorm with its running statistics) whatever their mode, so
    ``model.train()`` changes neither ``pm``'s outputs nor the model's statistics. Converting ``pm``
    (``.to``, ``.cuda``, ``.double``, ``.half``, ...) converts a private copy of the base model, which
    ``pm.base_model`` then is; the caller's model stays as it was. If the caller converts its own
    model afterwards, ``pm`` refuses to run (:class:`~purenn.errors.ConfigError`) instead of mixing
    dtypes or devices.

    Args:
        base_model: the original ResNet (shared; its mode is left as it is).
        layers: the :class:`PureLayer` of each purified layer.
        max_memory: bytes of intermediate tensors per relevance chunk when gating.
    """

    def __init__(
        self, base_model: nn.Module, layers: Sequence[PureLayer], *, max_memory: int = DEFAULT_MAX_MEMORY
    ) -> None:
        super().__init__()
        spec = ResNetSpec(base_model)
        self.pure = nn.ModuleDict({_module_key(pl.layer): pl for pl in layers})
        self._plan = self._make_plan(spec, layers)
        self.base_model = base_model
        self.max_memory = check_memory("max_memory", max_memory)
        self._spec = spec
        self._owns_base = False  # True once base_model is purenn's own (a copy, or rebuilt by load_purified)
        #: which data the reference indices point into (:mod:`purenn.refdata`); kept by save and load
        self.reference_data: dict | None = None
        self.eval()

    @staticmethod
    def _make_plan(
        spec: ResNetSpec, layers: Sequence[PureLayer]
    ) -> dict[int, tuple[PureLayer, int, tuple[Block, ...], range]]:
        plan: dict[int, tuple[PureLayer, int, tuple[Block, ...], range]] = {}
        for pl in layers:
            pos, up = spec.position(pl.layer), spec.position(pl.upstream)
            if pos in plan:
                raise LayerError(f"{pl.layer!r} and {plan[pos][0].layer!r} are the same layer output.")
            if up >= pos:
                raise LayerError(f"upstream {pl.upstream!r} is not before {pl.layer!r}.")
            dim = gate_dim(pl.gate, spec.channels(up), spec.channels(pos))
            if spec.channels(pos) != pl.channels or (dim is not None and dim != pl.centroids.shape[-1]):
                raise LayerError(f"the PureLayer of {pl.layer!r} does not fit this model's channel counts.")
            plan[pos] = (pl, up, spec.segment(up, pos), range(up + 1, pos + 1))
        return plan

    def _adopt_base(self, model: nn.Module) -> None:
        """Make ``model`` (purenn's own, same structure) the base model."""
        spec = ResNetSpec(model)
        self._plan = self._make_plan(spec, [self._plan[p][0] for p in sorted(self._plan)])
        self.base_model = model
        self._spec = spec
        self._owns_base = True

    # ---------------------------------------------------------------- module behaviour
    def train(self, mode: bool = True) -> PurifiedModel:
        """Only ``train(False)``/``eval()`` is allowed; it leaves the base model's own mode as it is
        (the base model always runs in inference form inside ``pm``)."""
        if mode:
            raise ConfigError(
                "PurifiedModel is inference-only: gates rely on eval-mode BatchNorm. Fine-tune the base model "
                "(pm.unload()) and purify it again."
            )
        self.training = False
        self.pure.train(False)
        return self

    def _apply(self, fn: Callable[[Tensor], Tensor], recurse: bool = True) -> PurifiedModel:
        # every conversion (.to, .cuda, .cpu, .double, .half, .float, .to_empty, ...) passes here: one
        # that would change the caller's base model converts a private copy of it instead
        if recurse and not self._owns_base and _converts(self.base_model, fn):
            self._adopt_base(_copy_module(self.base_model, fn))
        return super()._apply(fn, recurse)

    def _check_base(self) -> None:
        """Refuse to run when the shared base model was converted after purification."""
        if not self._plan:
            return
        ref = next(iter(self._plan.values()))[0].centroids
        if ref.device.type == "meta":
            raise ConfigError(
                "the purified model is on the meta device and holds no data; load it again "
                "(purenn.load_purified) or purify again to compute with it."
            )
        m = self.base_model
        for name, t in (("conv1.weight", input_conv(m).weight), ("fc.weight", getattr(m.fc, "weight", None))):
            if t is not None and (t.dtype != ref.dtype or t.device != ref.device):
                raise ConfigError(
                    f"the base model's {name} is {t.dtype} on {t.device} but the purified layers are {ref.dtype} "
                    f"on {ref.device}: the model was converted after purification (pm shares it, it does not "
                    "copy it). Convert the purified model instead (pm.to(...) converts a private copy), or "
                    "purify again."
                )

    @property
    def layers(self) -> list[str]:
        """Purified layer names, in network order."""
        return [self._plan[p][0].layer for p in sorted(self._plan)]

    def pure_layer(self, layer: str) -> PureLayer:
        """The :class:`PureLayer` of a purified layer."""
        key = _module_key(layer) if isinstance(layer, str) else None
        if key not in self.pure:
            raise LayerError(f"{layer!r} is not purified; purified layers: {self.layers}.")
        return self.pure[key]

    # ---------------------------------------------------------------- forward
    def _run(
        self,
        x: Tensor,
        *,
        all_gates: bool,
        pool: str | None | bool = False,
        select: dict[str, Tensor] | None = None,
    ):
        self._check_base()
        if not _is_exporting():
            conv = input_conv(self.base_model)
            x = check_input(x, like=conv.weight, channels=conv.in_channels)
            if x.shape[0] == 0:  # an empty batch: empty results of the right shapes, from one zero sample
                logits, gates, feats = self._run(x.new_zeros((1, *x.shape[1:])), all_gates=all_gates, pool=pool,
                                                 select=select)
                return logits[:0], {k: v[:0] for k, v in gates.items()}, {k: v[:0] for k, v in feats.items()}
        spec = self._spec
        plan = self._plan
        # per layer: None = gate every neuron at once, else the positions (into pl.neurons) to gate
        todo: dict[int, Tensor | None] = {}
        for pos, (pl, _, _, _) in plan.items():
            if select is not None and pl.layer in select:
                todo[pos] = select[pl.layer]
                continue
            every = all_gates and select is None
            sub = pl.gated_neurons(subset_only=not every)
            if every and len(sub) == len(pl.neurons):
                todo[pos] = None
            elif every or len(sub):
                todo[pos] = sub
        record = {j for pos in todo if plan[pos][0].gate in CIRCUIT_GATES for j in plan[pos][3]}
        keep = {plan[pos][1] for pos in todo}
        acts: dict[int, Tensor] = {}
        recs: dict[int, BlockRecord] = {}
        gates: dict[str, Tensor] = {}
        feats: dict[str, Tensor] = {}
        h = spec.stem(x)
        if 0 in keep:
            acts[0] = h
        for j, blk in enumerate(spec.blocks, start=1):
            h, rec = spec.block_forward(blk, h, record=j in record)
            if rec is not None:
                recs[j] = rec
            if j in plan:
                pl, up, blocks, rng = plan[j]
                g = None
                if j in todo:
                    sub = todo[j]
                    seg = [recs[i] for i in rng] if pl.gate in CIRCUIT_GATES else []
                    with torch.no_grad():
                        gs = None
                        if sub is None or len(sub):
                            gs = pl.compute_gates(blocks, seg, acts[up], h, sub, self.max_memory)
                    if sub is None:
                        g = gs
                    else:
                        g = torch.zeros(h.shape[0], len(pl.neurons), dtype=torch.long, device=h.device)
                        if gs is not None:
                            g[:, sub] = gs
                    if select is None:
                        gates[pl.layer] = g
                    elif pl.layer in select:
                        gates[pl.layer] = gs if gs is not None else g[:, :0]
                if pool is not False:
                    feats[pl.layer] = pl.features(h, g, pool)
                h = pl.merge(h, g)
            if j in keep:
                acts[j] = h
        return spec.head(h), gates, feats

    def forward(self, x: Tensor) -> Tensor:
        """Logits; equal to the original model's while no virtual neuron is suppressed."""
        return self._run(x, all_gates=False)[0]

    def gates(self, x: Tensor, neurons: Mapping[str, Sequence[int]] | None = None) -> dict[str, Tensor]:
        """``{layer: (B, K) int64}``: the chosen cluster of every purified neuron, ascending channel order.

        With ``neurons={layer: [channels]}`` only those purified channels of those layers are gated
        (columns in the given order), which costs only their share of the relevance passes.

        Example:
            >>> pm.gates(x, neurons={"layer4": [7, 3]})["layer4"].shape    # doctest: +SKIP
            torch.Size([8, 2])
        """
        if neurons is None:
            return self._run(x, all_gates=True)[1]
        if not isinstance(neurons, Mapping) or not neurons:
            raise ConfigError(f"neurons must be a non-empty dict {{layer: [channels]}}, got {neurons!r}.")
        select = {}
        for layer, channels in neurons.items():
            pl = self.pure_layer(layer)
            pos = {int(c): i for i, c in enumerate(pl.neurons.tolist())}
            chans = _int_list(channels)
            bad = [c for c in chans if as_int(c) not in pos]
            if bad or not chans:
                raise ConfigError(f"channels {bad or chans} of {layer!r} are not purified channels.")
            select[pl.layer] = torch.tensor([pos[as_int(c)] for c in chans], dtype=torch.long,
                                            device=pl.neurons.device)
        return self._run(x, all_gates=True, select=select)[1]

    def pure_features(self, x: Tensor, pool: str | None = "mean") -> dict[str, Tensor]:
        """``{layer: (B, V)}`` pooled virtual-neuron activations (``pool="mean"`` or ``"max"``), or
        ``(B, V, H, W)`` maps with ``pool=None``. Suppressed virtual neurons read 0.

        Example:
            >>> feats = pm.pure_features(x)            # doctest: +SKIP
            >>> feats["layer4"].shape                  # doctest: +SKIP
            torch.Size([8, 1024])
        """
        if pool not in POOLS:
            raise ConfigError(f"pool must be one of {POOLS}, got {pool!r}.")
        return self._run(x, all_gates=True, pool=pool)[2]

    # ---------------------------------------------------------------- tables and suppression
    @property
    def virtual_neurons(self) -> list[VirtualNeuron]:
        """One row per virtual neuron of every purified layer (see :class:`VirtualNeuron`)."""
        rows = []
        for name in self.layers:
            pl = self.pure_layer(name)
            kpos, clus, chan = pl.v_kpos.tolist(), pl.v_cluster.tolist(), pl.v_channel.tolist()
            counts, scores, w = pl.ref_counts.tolist(), pl.scores.tolist(), pl.merge_weight.tolist()
            k = len(pl.neurons)
            for v in range(pl.n_virtual):
                split = kpos[v] < k
                rows.append(
                    VirtualNeuron(
                        layer=name,
                        index=v,
                        channel=chan[v],
                        cluster=clus[v],
                        n_refs=counts[kpos[v]][clus[v]] if split else 0,
                        score=scores[kpos[v]] if split else None,
                        suppressed=w[v] == 0,
                    )
                )
        return rows

    def virtual_index(self, layer: str, channel: int, cluster: int = 0) -> int:
        """Virtual index of ``channel.cluster`` in ``layer``."""
        pl = self.pure_layer(layer)
        channel, cluster = check_int("channel", channel), check_int("cluster", cluster)
        if not 0 <= channel < pl.channels:
            raise ConfigError(f"channel {channel} is out of range for {layer!r} (0..{pl.channels - 1}).")
        v = int(pl.channel_slots[channel, cluster]) if 0 <= cluster < pl.channel_slots.shape[1] else pl.n_virtual
        if v >= pl.n_virtual:
            raise ConfigError(f"channel {channel} of {layer!r} has no virtual neuron {channel}.{cluster}.")
        return v

    def suppress(self, layer: str, indices: Sequence[int]) -> SuppressionHandle:
        """Switch off virtual neurons of ``layer`` (by virtual index): their merge weight becomes 0.

        Kept by ``save`` and ``export_onnx``. Returns a :class:`SuppressionHandle` whose ``remove()``
        ends exactly this call's suppression: a virtual neuron stays off while any handle covering it
        is active, and handles may be removed in any order. ``with pm.suppress(...):`` suppresses for
        the block only.

        Example:
            >>> with pm.suppress("layer4", [pm.virtual_index("layer4", 7, 1)]):   # doctest: +SKIP
            ...     logits = pm(x)
        """
        pl = self.pure_layer(layer)
        items = _int_list(indices)
        if not items:
            raise ConfigError("suppress() got an empty list of virtual indices.")
        idx = []
        for i in items:
            v = as_int(i)
            if v is None:
                raise ConfigError(f"virtual indices must be integers, got {i!r} for {layer!r}.")
            if not 0 <= v < pl.n_virtual:
                raise ConfigError(f"virtual index {v} is out of range for {layer!r} (0..{pl.n_virtual - 1}).")
            idx.append(v)
        t = torch.tensor(sorted(set(idx)), dtype=torch.long, device=pl.merge_weight.device)
        with _SUPPRESSION_LOCK:
            return SuppressionHandle(pl, t, pl.merge_weight[t].clone())._take()

    def restore(self, layer: str | None = None) -> None:
        """Switch every virtual neuron of ``layer`` (default: of all layers) back on, including those
        suppressed in a loaded file; handles from earlier :meth:`suppress` calls then do nothing."""
        names = self.layers if layer is None else [layer]
        pls = [self.pure_layer(name) for name in names]
        for pl in pls:
            pl._release_all()

    def unload(self) -> nn.Module:
        """The base model: the caller's model, untouched (its ``state_dict`` and mode are as before
        purification), or purenn's own copy once one was made (``pm.to(...)`` and other conversions,
        ``purify_model(device=...)`` on another device, a model rebuilt by ``load_purified``)."""
        return self.base_model

    def save(self, path: str | os.PathLike) -> Path:
        """Write the model (base weights, purenn tensors, JSON config) to one safetensors file.

        Atomic: the file appears complete or not at all. Load it with :func:`purenn.load_purified`;
        suppressed virtual neurons stay suppressed. Layout: :mod:`purenn.io`.

        Example:
            >>> pm.save("pure.safetensors")                      # doctest: +SKIP
            >>> pm2 = purenn.load_purified("pure.safetensors")    # doctest: +SKIP
        """
        from .io import save_purified

        return save_purified(self, path)
