"""``purify_model``: validate, collect references, compute circuits, cluster, build the purified model.

Everything is validated before any heavy work starts, and the caller's model is never modified:
not its weights, not its mode (it runs in inference form whatever its mode), not its device (with
``device=`` elsewhere, purenn works on a copy moved there).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import IterableDataset

from ._choices import DEFAULT_SCORE
from ._validate import as_int, check_int, check_memory
from .arch import Block, ResNetSpec, input_conv
from .cluster import SCORES, CircuitKMeans
from .collect import ActivationCache, collect_references
from .data import DataSource
from .distributed import all_gather_object, fit_by_neuron, is_distributed, world_info
from .errors import ConfigError, DataError, LayerError, UnsupportedModelError
from .fitting import fit_circuits
from .gating import (
    CIRCUIT_GATES,
    check_gate,
    check_gate_weight,
    combine_features,
    fit_gate_features,
    gate_features,
)
from .precision import check_precision
from .refdata import fingerprint_references
from .relevance import DEFAULT_MAX_MEMORY, check_input, compute_dtype, has_identity_path, resolve_neurons
from .resume import Checkpoint, run_fingerprint
from .rules import Gradient, Rule, get_rule
from .surgery import PureLayer, PurifiedModel, _copy_module

__all__ = ["purify_model", "LayerPlan", "DEFAULT_CACHE_MEMORY"]

DEFAULT_CACHE_MEMORY = 1 << 30  # bytes of cached upstream activations during the streaming pass


@dataclass(frozen=True)
class LayerPlan:
    """A validated request to purify one layer."""

    layer: str
    upstream: str
    position: int
    up_position: int
    neurons: tuple[int, ...]
    skip_aware: bool
    rule: Rule = Gradient()

    def blocks(self, spec: ResNetSpec) -> tuple[Block, ...]:
        return spec.segment(self.up_position, self.position)


def _check_int(name: str, value: Any, low: int) -> int:
    """``value`` as an ``int >= low`` (NumPy and 0-d tensor integers too), else a :class:`ConfigError`."""
    return check_int(name, value, low)


def _plan_layers(
    spec: ResNetSpec,
    layers: Sequence[str],
    neurons: Mapping[str, Sequence[int]] | None,
    upstream: Mapping[str, str] | None,
    skip_aware: bool | str,
) -> list[LayerPlan]:
    if isinstance(layers, str):
        layers = [layers]
    if not isinstance(layers, Sequence) or len(layers) == 0:
        raise LayerError("layers must be a non-empty list of layer names such as ['layer4'].")
    if skip_aware not in (True, False, "auto"):
        raise ConfigError(f"skip_aware must be True, False or 'auto', got {skip_aware!r}.")
    for mapping, what in ((neurons, "neurons"), (upstream, "upstream")):
        if mapping is not None:
            if not isinstance(mapping, Mapping):
                raise ConfigError(f"{what} must be a dict {{layer: ...}} or None, got {type(mapping).__name__}.")
            extra = sorted(set(mapping) - set(layers))
            if extra:
                raise LayerError(f"{what} names layers that are not being purified: {extra}; layers={list(layers)}.")
    plans: list[LayerPlan] = []
    seen: dict[int, str] = {}
    for name in layers:
        pos = spec.position(name)
        if pos == 0:
            raise LayerError("the stem ('maxpool') cannot be purified: it has no upstream residual block.")
        if pos in seen:
            raise LayerError(f"{name!r} and {seen[pos]!r} name the same layer output; purify it once.")
        seen[pos] = name
        up = (upstream or {}).get(name) or spec.default_upstream(name)
        up_pos = spec.position(up)
        if up_pos >= pos:
            raise LayerError(
                f"upstream {up!r} is not before {name!r}; choose an earlier stage or block output "
                f"(default for {name!r}: {spec.default_upstream(name)!r})."
            )
        idx = resolve_neurons((neurons or {}).get(name), spec.channels(pos), name)
        identity = has_identity_path(spec.segment(up_pos, pos))
        if skip_aware is True and not identity:
            raise ConfigError(f"skip_aware=True needs an identity skip from {up!r} to {name!r}; use 'auto' or False.")
        plans.append(LayerPlan(name, up, pos, up_pos, tuple(idx), identity if skip_aware == "auto" else skip_aware))
    return sorted(plans, key=lambda p: p.position)


def _split_neuron_request(
    spec: ResNetSpec, layers: Sequence[str], neurons: Any
) -> tuple[Any, dict[str, int]]:
    """Separate ``neurons`` into explicit channel lists (for :func:`_plan_layers`) and top-N counts."""

    def is_count(v: Any) -> bool:
        return as_int(v) is not None

    names = [layers] if isinstance(layers, str) else list(layers) if isinstance(layers, Sequence) else []
    if is_count(neurons):
        lists, top = None, {name: as_int(neurons) for name in names}
    elif isinstance(neurons, Mapping):
        lists = {k: v for k, v in neurons.items() if not is_count(v)}
        top = {k: as_int(v) for k, v in neurons.items() if is_count(v)}
    else:
        return neurons, {}
    for name, n in top.items():
        if name not in names:
            raise LayerError(f"neurons names layers that are not being purified: [{name!r}]; layers={names}.")
        channels = spec.channels(spec.position(name))
        if not 1 <= n <= channels:
            raise ConfigError(f"neurons={n} for {name!r} must be between 1 and its {channels} channels.")
    return lists, top


def _model_device(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def _check_device(device: Any) -> torch.device:
    """``device`` as a :class:`torch.device` that can hold data here, else a :class:`ConfigError`."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise ConfigError(
            f"device must be a torch.device or a name such as 'cpu' or 'cuda:0', got {device!r}."
        ) from None
    if dev.type == "meta":
        raise ConfigError("device='meta' holds no data; give the device to compute on, such as 'cpu' or 'cuda'.")
    backend = getattr(torch, dev.type, None)
    available = getattr(backend, "is_available", None)
    if dev.type != "cpu" and callable(available) and not available():
        raise ConfigError(f"device {str(dev)!r} is not available on this machine.")
    count = getattr(backend, "device_count", None)
    if dev.type != "cpu" and dev.index is not None and callable(count) and dev.index >= count():
        raise ConfigError(f"device {str(dev)!r} does not exist: this machine has {count()} {dev.type} device(s).")
    return dev


def _resolve_device(model: nn.Module, device: torch.device) -> tuple[torch.device, bool]:
    """The device to compute on (``"cuda"`` means the model's own CUDA device when it is on one) and
    whether every tensor of the model is already there."""
    here = {t.device for t in (*model.parameters(), *model.buffers())}
    if device.index is None and len(here) == 1 and next(iter(here)).type == device.type:
        device = next(iter(here))
    return device, all(d == device for d in here)


class _inference_form:
    """Run a module in eval mode and put every submodule's mode back afterwards, even on error."""

    def __init__(self, module: nn.Module) -> None:
        self.module, self.modes = module, []

    def __enter__(self) -> nn.Module:
        self.modes = [(m, m.training) for m in self.module.modules()]
        for m, _ in self.modes:
            m.training = False
        return self.module

    def __exit__(self, *exc: object) -> None:
        for m, mode in self.modes:
            m.training = mode


def _check_forward(spec: ResNetSpec, model: nn.Module, x: Tensor) -> None:
    """Refuse a model whose ``forward`` does not compute what purenn's replay computes. ``model(x)``
    runs in eval mode; a model in training mode is put back in it (its statistics are not updated)."""
    with torch.no_grad():
        if any(m.training for m in model.modules()):
            with _inference_form(model):
                ref, ours = model(x), spec.forward(x)
        else:
            ref, ours = model(x), spec.forward(x)
    if ref.shape != ours.shape or not torch.allclose(ref, ours, rtol=1e-4, atol=1e-5):
        raise UnsupportedModelError(
            f"{type(model).__name__}.forward does not compute what a {spec.family.name} ResNet computes from its "
            "modules (a customised forward?); purenn can only rewrite the standard forward pass."
        )


def _run_fingerprint(**kwargs: Any) -> str:
    """The arguments that decide a run's result, as canonical text (for cross-rank and resume checks)."""
    import json

    def plain(v: Any) -> Any:
        if isinstance(v, Mapping):
            return {str(k): plain(x) for k, x in sorted(v.items(), key=lambda kv: str(kv[0]))}
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        if isinstance(v, np.integer):
            return int(v)
        return v

    return json.dumps(plain(kwargs), sort_keys=True, default=str)


def _check_same_run(model: nn.Module, n: int, args: str) -> None:
    """Refuse, on every rank alike, ranks that were given different arguments, data sizes or models."""
    weights = sum(float(t.double().sum()) for t in model.state_dict().values() if t.is_floating_point())
    mine = (args, n, weights)
    every = all_gather_object(mine)
    if any(other != mine for other in every):
        diff = [r for r, other in enumerate(every) if other != every[0]]
        raise ConfigError(
            f"under torch.distributed every rank must call purify_model with the same arguments, model and data; "
            f"rank(s) {diff} differ from rank 0 (arguments, data length or weights)."
        )


def _pooled_upstream(spec: ResNetSpec, source: DataSource, p: Any, refs: Any, cache: ActivationCache, world: int,
                     batch_size: int, device: Any, progress: bool) -> np.ndarray:
    """``(K, n, C)`` spatially pooled upstream activations at each neuron's references, for the
    ``"contrast+upstream"`` score: from the activation cache of the reference pass when it holds every
    reference (one process), else one forward pass over the distinct references."""
    ref_idx = refs.indices[list(p.neurons)]
    ids, inv = torch.unique(ref_idx.flatten(), return_inverse=True)
    if world == 1 and cache.holds({p.up_position}, ids.tolist()):
        pooled = []
        for s in range(0, len(ids), batch_size):
            a_up = cache.get(p.up_position, ids[s : s + batch_size].tolist())
            pooled.append(gate_features("upstream", a_up, a_up, torch.empty(0, dtype=torch.long)).float().cpu())
        return torch.cat(pooled)[inv.reshape(ref_idx.shape)].numpy()
    return fit_gate_features(
        spec, source, "upstream", p.position, p.up_position, list(p.neurons), refs,
        batch_size=batch_size, device=device, progress=progress,
    ).float().numpy()


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
            :class:`~purenn.cluster.CircuitKMeans`).
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
        gate: ``"circuit"`` (PURE) or a forward-only baseline gate of :mod:`purenn.gating`:
            ``"activation"`` (k-means on the target layer's spatially mean-pooled activation vector
            over the references, PURE's evaluation baseline), ``"upstream"`` (the upstream layer's
            pooled activations) or ``"map"`` (the neuron's own activation map); or ``"circuit+map"``:
            the circuit and the neuron's own activation map, each scaled to unit length, the map
            weighted by ``gate_weight``.
        gate_weight: weight of the activation map in a ``"circuit+map"`` gate.
        score: the polysemanticity score stored per neuron and used by ``neurons=N``:
            ``"contrast+upstream"`` (default: the contrast of the circuit split times that of the
            references' pooled upstream activations; one more forward pass over the references),
            ``"contrast"`` or ``"silhouette"``, see :class:`~purenn.cluster.CircuitKMeans`.
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
            model's dtype. See :mod:`purenn.precision`.
        workers: data loading processes (a ``DataLoader``'s ``num_workers``; default: the given
            DataLoader's, else 0). On a CUDA device batches are loaded into pinned memory.
        checkpoint_dir: a folder where the run keeps its state (the reference pass's running
            top-n tables, every finished relevance chunk), written atomically as it goes; running
            again with the same arguments, model and data continues where an interrupted run
            stopped and gives the same result. Other arguments or data are refused with a
            :class:`ConfigError`. See :mod:`purenn.resume`.
        rule: relevance rule of the circuits: ``"gradient"`` (PURE's gradient x activation, the
            default) or one of zennit's LRP rules ``"epsilon"``, ``"zplus"``, ``"alpha2beta1"``,
            ``"gamma"`` (zennit's default parameters), or a :class:`purenn.rules.Rule` such as
            ``purenn.rules.Epsilon(epsilon=0.01)``. Stored in the purified layers and the file, and
            used by the gates and the exported graph.

    Under torch.distributed (a default process group is initialised, e.g. by ``torchrun``) the
    work is split across ranks and every rank returns the same model, equal to the single-process
    result (see :mod:`purenn.distributed`); ``data`` must then be map-style (indexable), which it
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
    spec = ResNetSpec(model)
    n_refs = _check_int("n_refs", n_refs, 1)
    max_clusters = _check_int("max_clusters", max_clusters, 2)
    if n_clusters == "auto":
        if n_refs < 3:
            raise ConfigError(f"n_clusters='auto' needs n_refs >= 3, got {n_refs}.")
    else:
        n_clusters = _check_int("n_clusters", n_clusters, 2)
        if n_clusters > n_refs:
            raise ConfigError(
                f"n_clusters={n_clusters} exceeds n_refs={n_refs}; each cluster needs reference samples."
            )
    gate = check_gate(gate)
    gate_weight = check_gate_weight(gate_weight)
    if score not in SCORES:
        raise ConfigError(f"score must be one of {SCORES}, got {score!r}.")
    seed = check_int("seed", seed, 0, 2**32 - 1)  # scikit-learn's random_state range
    cache_memory = _check_int("cache_memory", cache_memory, 0)
    max_memory = check_memory("max_memory", max_memory)
    neurons, top = _split_neuron_request(spec, layers, neurons)
    rule = get_rule(rule)
    plans = [replace(p, rule=rule) for p in _plan_layers(spec, layers, neurons, upstream, skip_aware)]
    if data is None:
        raise DataError("purify_model needs data to find each neuron's reference samples.")
    if is_distributed() and isinstance(getattr(data, "dataset", data), IterableDataset):
        raise DataError(
            "under torch.distributed purenn gives each rank a disjoint shard of the data by sample index, so it "
            "needs a map-style dataset (with __len__ and __getitem__), not an IterableDataset."
        )
    source = DataSource.from_data(data, batch_size)
    if workers is not None:
        source.num_workers = _check_int("workers", workers, 0)
    if len(source) < n_refs:
        raise DataError(f"the data has {len(source)} samples, fewer than n_refs={n_refs}; lower n_refs or add data.")
    device, there = _resolve_device(model, _model_device(model) if device is None else _check_device(device))
    precision = check_precision(precision, device)
    source.pin_memory = device.type == "cuda"  # page-locked batches: host-to-device copies overlap compute
    rank, world = world_info()
    args_text = _run_fingerprint(
        layers=layers, n_refs=n_refs, n_clusters=n_clusters, neurons=neurons, top=top, upstream=upstream,
        skip_aware=skip_aware, max_clusters=max_clusters, gate=gate, gate_weight=gate_weight, score=score,
        batch_size=batch_size, seed=seed, precision=precision, max_memory=max_memory, device=device.type,
        dtype=str(next(model.parameters()).dtype), rule=rule.config(),
    )
    if world > 1:
        _check_same_run(model, len(source), args_text)
    dtype = compute_dtype(model)
    owned = not there or dtype != next(model.parameters()).dtype
    if owned:  # work on a copy there (in float32 for a half-precision model); the caller's model stays as it is
        model = _copy_module(model, lambda t: t.to(device, dtype) if t.is_floating_point() else t.to(device))
        spec = ResNetSpec(model)
    source.dtype = dtype

    probe = source.fetch(list(range(min(2, len(source))))).to(device)
    if not bool(torch.isfinite(probe).all()):
        raise DataError("the first samples contain NaN or infinite values.")
    check_input(probe, "the data", channels=input_conv(model).in_channels)
    _check_forward(spec, model, probe)

    checkpoint = None
    if checkpoint_dir is not None:  # no activation cache: a resumed run computes what an uninterrupted one does
        checkpoint = Checkpoint(checkpoint_dir, run_fingerprint(args_text, model, source, world), rank=rank)
        cache_memory = 0
    cache = ActivationCache({p.up_position for p in plans}, cache_memory)
    refs = collect_references(
        spec, source, {p.layer: p.position for p in plans}, n_refs, device=device, progress=progress,
        cache=cache, channels={p.layer: list(p.neurons) for p in plans}, checkpoint=checkpoint,
    )
    progress = progress and rank == 0
    if gate in CIRCUIT_GATES:
        features = fit_circuits(
            spec, source, plans, refs, n_refs, batch_size=batch_size, device=device, max_memory=int(max_memory),
            progress=progress, cache=cache, precision=precision, checkpoint=checkpoint,
        )
        if gate == "circuit+map":
            for p in plans:
                maps = fit_gate_features(
                    spec, source, "map", p.position, p.up_position, list(p.neurons), refs[p.layer],
                    batch_size=batch_size, device=device, progress=progress,
                )
                features[p.layer] = combine_features(features[p.layer], maps.to(features[p.layer].dtype), gate_weight)
    else:
        features = {
            p.layer: fit_gate_features(
                spec, source, gate, p.position, p.up_position, list(p.neurons), refs[p.layer],
                batch_size=batch_size, device=device, progress=progress,
            )
            for p in plans
        }
    pure_layers = []
    for p in plans:
        up = None
        if score == "contrast+upstream":  # an "upstream" gate's features are these already
            up = (features[p.layer].float().numpy() if gate == "upstream" else
                  _pooled_upstream(spec, source, p, refs[p.layer], cache, world, batch_size, device, progress))
        km = CircuitKMeans(n_clusters, max_clusters=max_clusters, score=score, random_state=seed, progress=progress)
        km = fit_by_neuron(km, features[p.layer].numpy(), up)
        del up
        keep = np.arange(len(p.neurons))
        if p.layer in top:  # the N highest scores, ties to the lower channel, in channel order
            keep = np.sort(np.argsort(-km.scores_, kind="stable")[: top[p.layer]])
        counts = km.n_clusters_[keep]
        c_max = int(counts.max())
        chosen = [p.neurons[i] for i in keep]
        pure_layers.append(
            PureLayer(
                layer=p.layer,
                upstream=p.upstream,
                channels=spec.channels(p.position),
                neurons=chosen,
                centroids=torch.as_tensor(km.centroids_[keep, :c_max], dtype=dtype),
                n_clusters=torch.as_tensor(counts),
                scores=torch.as_tensor(km.scores_[keep], dtype=torch.float32),
                ref_counts=torch.as_tensor(km.counts_[keep, :c_max]),
                ref_indices=refs[p.layer].indices[chosen],
                ref_clusters=torch.as_tensor(km.labels_[keep]),
                skip_aware=p.skip_aware and gate in CIRCUIT_GATES,
                rule=rule,
                gate=gate,
                gate_weight=gate_weight,
                score_kind=score,
            ).to(device)
        )
    pm = PurifiedModel(model, pure_layers, max_memory=int(max_memory))
    pm._owns_base = owned
    pm.reference_data = fingerprint_references(pm, data, batch_size=batch_size)
    return pm
