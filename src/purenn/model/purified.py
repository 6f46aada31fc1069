"""Surgery: :class:`PurifiedModel`, the original ResNet with a :class:`~purenn.model.pure_layer.PureLayer`
after each purified layer.

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

import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from purenn.arch import Block, BlockRecord, ResNetSpec, input_conv
from purenn.arch.core import converts, copy_module
from purenn.attribution.relevance import DEFAULT_MAX_MEMORY, check_input
from purenn.common.checks import as_int, check_int, check_memory
from purenn.errors import ConfigError, LayerError
from purenn.model.gates import CIRCUIT_GATES, gate_dim
from purenn.model.pure_layer import POOLS, SUPPRESSION_LOCK, PureLayer, VirtualNeuron, is_exporting, module_key

__all__ = ["PurifiedModel", "SuppressionHandle"]


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
        with SUPPRESSION_LOCK:
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
        self.pure = nn.ModuleDict({module_key(pl.layer): pl for pl in layers})
        self._plan = self._make_plan(spec, layers)
        self.base_model = base_model
        self.max_memory = check_memory("max_memory", max_memory)
        self._spec = spec
        self._owns_base = False  # True once base_model is purenn's own (a copy, or rebuilt by load_purified)
        #: which data the reference indices point into (:mod:`purenn.io.refdata`); kept by save and load
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
        if recurse and not self._owns_base and converts(self.base_model, fn):
            self._adopt_base(copy_module(self.base_model, fn))
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
        key = module_key(layer) if isinstance(layer, str) else None
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
        if not is_exporting():
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
        with SUPPRESSION_LOCK:
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
        from purenn.io.format import save_purified

        return save_purified(self, path)
