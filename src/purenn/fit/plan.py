"""The plan of a purification: every option of :func:`~purenn.fit.pipeline.purify_model` validated
into one frozen :class:`PurifyPlan`, before any heavy work starts.

:func:`make_plan` is the first stage of the pipeline (:mod:`purenn.fit.stages` holds the others). It
checks the options, plans each target layer (:class:`LayerPlan`: upstream, positions, channels,
skip-awareness, rule), chooses the device, copies the model only where it must (another device, a
half-precision model), checks that the model's ``forward`` is the standard one, and fingerprints
the arguments for the cross-rank and resume checks. The helpers that :func:`~purenn.fit.concept.purify_concept`
shares (:func:`plan_layers`, :func:`check_forward`, :class:`inference_form`) live here too.

Example:
    >>> import torch, torchvision
    >>> plan = make_plan(torchvision.models.resnet18(num_classes=3).eval(), ["layer4"], torch.rand(8, 3, 32, 32),
    ...                  n_refs=4, neurons={"layer4": [0, 5]}, progress=False)
    >>> plan.layers[0].layer, plan.layers[0].neurons, plan.layers[0].upstream
    ('layer4', (0, 5), 'layer3')
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

from purenn.arch import Block, ResNetSpec, input_conv
from purenn.arch.core import copy_module
from purenn.attribution.precision import check_precision
from purenn.attribution.relevance import (
    DEFAULT_MAX_MEMORY,
    check_input,
    compute_dtype,
    has_identity_path,
    resolve_neurons,
)
from purenn.attribution.rules import Gradient, Rule, get_rule
from purenn.common.checks import as_int, check_device, check_int, check_memory
from purenn.common.choices import DEFAULT_SCORE
from purenn.common.distributed import all_gather_object, is_distributed, world_info
from purenn.errors import ConfigError, DataError, LayerError, UnsupportedModelError
from purenn.fit.cluster import SCORES
from purenn.fit.data import DataSource
from purenn.model.gates import CIRCUIT_GATES, check_gate, check_gate_weight


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


#: bytes of cached upstream activations during the streaming pass
DEFAULT_CACHE_MEMORY = 1 << 30


@dataclass(frozen=True, eq=False)
class PurifyPlan:
    """Everything :func:`~purenn.fit.pipeline.purify_model` was asked to do, validated: what travels
    between the stages of :mod:`purenn.fit.stages`.

    ``model`` is the model the stages compute on: the caller's, or a private copy on ``device`` in
    ``dtype`` when ``owned``. ``layers`` are in network order; ``top`` maps a layer to its ``N`` when
    ``neurons=N`` asks for the ``N`` highest-scoring channels (every channel of it is fitted first).
    ``arguments`` is the canonical text of the options that decide the result (for the cross-rank
    and resume checks); ``data`` is what the caller gave, kept for the reference-data record.
    """

    model: nn.Module
    spec: ResNetSpec
    source: Any  # purenn.fit.data.DataSource
    data: Any
    layers: tuple[LayerPlan, ...]
    top: Mapping[str, int]
    n_refs: int
    n_clusters: int | str
    max_clusters: int
    gate: str
    gate_weight: float
    score: str
    rule: Rule
    batch_size: int
    device: torch.device
    dtype: torch.dtype
    precision: str
    seed: int
    max_memory: int
    cache_memory: int
    progress: bool
    owned: bool
    arguments: str
    checkpoint_dir: str | os.PathLike | None = None
    rank: int = 0
    world: int = 1

    @property
    def circuit_gate(self) -> bool:
        """Whether the gate reads circuits (one backward pass per neuron), not forward activations only."""
        return self.gate in CIRCUIT_GATES

    @property
    def shows_progress(self) -> bool:
        """Whether this process shows the progress bars of the stages after collection (rank 0 only)."""
        return self.progress and self.rank == 0




def plan_layers(
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


def split_neuron_request(
    spec: ResNetSpec, layers: Sequence[str], neurons: Any
) -> tuple[Any, dict[str, int]]:
    """Separate ``neurons`` into explicit channel lists (for :func:`plan_layers`) and top-N counts."""

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


def model_device(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def resolve_device(model: nn.Module, device: torch.device) -> tuple[torch.device, bool]:
    """The device to compute on (``"cuda"`` means the model's own CUDA device when it is on one) and
    whether every tensor of the model is already there."""
    here = {t.device for t in (*model.parameters(), *model.buffers())}
    if device.index is None and len(here) == 1 and next(iter(here)).type == device.type:
        device = next(iter(here))
    return device, all(d == device for d in here)


class inference_form:
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


def check_forward(spec: ResNetSpec, model: nn.Module, x: Tensor) -> None:
    """Refuse a model whose ``forward`` does not compute what purenn's replay computes. ``model(x)``
    runs in eval mode; a model in training mode is put back in it (its statistics are not updated)."""
    with torch.no_grad():
        if any(m.training for m in model.modules()):
            with inference_form(model):
                ref, ours = model(x), spec.forward(x)
        else:
            ref, ours = model(x), spec.forward(x)
    if ref.shape != ours.shape or not torch.allclose(ref, ours, rtol=1e-4, atol=1e-5):
        raise UnsupportedModelError(
            f"{type(model).__name__}.forward does not compute what a {spec.family.name} ResNet computes from its "
            "modules (a customised forward?); purenn can only rewrite the standard forward pass."
        )


def run_arguments(**kwargs: Any) -> str:
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


def check_same_run(model: nn.Module, n: int, args: str) -> None:
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


def check_shared_options(
    *, gate: Any, gate_weight: Any, batch_size: Any, seed: Any, max_memory: Any, rule: Any
) -> tuple[str, float, int, int, int, Rule]:
    """The options :func:`~purenn.fit.pipeline.purify_model` and :func:`~purenn.fit.concept.purify_concept`
    share, checked one way for both: ``(gate, gate_weight, batch_size, seed, max_memory, rule)``."""
    return (
        check_gate(gate),
        check_gate_weight(gate_weight),
        check_int("batch_size", batch_size, 1),
        check_int("seed", seed, 0, 2**32 - 1),  # scikit-learn's random_state range
        check_memory("max_memory", max_memory),
        get_rule(rule),
    )


def make_plan(
    model: nn.Module,
    layers: Sequence[str] = ("layer4",),
    data: Any = None,
    *,
    n_refs: int = 100,
    n_clusters: int | str = 2,
    neurons: Any = None,
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
) -> PurifyPlan:
    """Stage 1: validate every option of :func:`~purenn.fit.pipeline.purify_model` (same names, defaults
    and meanings) into a :class:`PurifyPlan`. Raises a :class:`~purenn.errors.PurennError` on the first
    problem; reads only the first two samples of ``data`` (to check the forward pass)."""
    spec = ResNetSpec(model)
    n_refs = check_int("n_refs", n_refs, 1)
    max_clusters = check_int("max_clusters", max_clusters, 2)
    if n_clusters == "auto":
        if n_refs < 3:
            raise ConfigError(f"n_clusters='auto' needs n_refs >= 3, got {n_refs}.")
    else:
        n_clusters = check_int("n_clusters", n_clusters, 2)
        if n_clusters > n_refs:
            raise ConfigError(
                f"n_clusters={n_clusters} exceeds n_refs={n_refs}; each cluster needs reference samples."
            )
    gate, gate_weight, batch_size, seed, max_memory, rule = check_shared_options(
        gate=gate, gate_weight=gate_weight, batch_size=batch_size, seed=seed, max_memory=max_memory, rule=rule)
    if score not in SCORES:
        raise ConfigError(f"score must be one of {SCORES}, got {score!r}.")
    if gate == "joint-circuit":
        raise ConfigError("gate='joint-circuit' (one circuit for a concept's channels together) is purify_concept's; "
                          "purify_model splits each neuron by its own circuit: use gate='circuit'.")
    cache_memory = check_int("cache_memory", cache_memory, 0)
    neurons, top = split_neuron_request(spec, layers, neurons)
    plans = [replace(p, rule=rule) for p in plan_layers(spec, layers, neurons, upstream, skip_aware)]
    if data is None:
        raise DataError("purify_model needs data to find each neuron's reference samples.")
    if is_distributed() and isinstance(getattr(data, "dataset", data), IterableDataset):
        raise DataError(
            "under torch.distributed purenn gives each rank a disjoint shard of the data by sample index, so it "
            "needs a map-style dataset (with __len__ and __getitem__), not an IterableDataset."
        )
    source = DataSource.from_data(data, batch_size)
    if workers is not None:
        source.num_workers = check_int("workers", workers, 0)
    if len(source) < n_refs:
        raise DataError(f"the data has {len(source)} samples, fewer than n_refs={n_refs}; lower n_refs or add data.")
    device, there = resolve_device(model, model_device(model) if device is None else check_device(device))
    precision = check_precision(precision, device)
    source.pin_memory = device.type == "cuda"  # page-locked batches: host-to-device copies overlap compute
    rank, world = world_info()
    arguments = run_arguments(
        layers=layers, n_refs=n_refs, n_clusters=n_clusters, neurons=neurons, top=top, upstream=upstream,
        skip_aware=skip_aware, max_clusters=max_clusters, gate=gate, gate_weight=gate_weight, score=score,
        batch_size=batch_size, seed=seed, precision=precision, max_memory=max_memory, device=device.type,
        dtype=str(next(model.parameters()).dtype), rule=rule.config(),
    )
    if world > 1:
        check_same_run(model, len(source), arguments)
    dtype = compute_dtype(model)
    owned = not there or dtype != next(model.parameters()).dtype
    if owned:  # work on a copy there (in float32 for a half-precision model); the caller's model stays as it is
        model = copy_module(model, lambda t: t.to(device, dtype) if t.is_floating_point() else t.to(device))
        spec = ResNetSpec(model)
    source.dtype = dtype

    probe = source.fetch(list(range(min(2, len(source))))).to(device)
    if not bool(torch.isfinite(probe).all()):
        raise DataError("the first samples contain NaN or infinite values.")
    check_input(probe, "the data", channels=input_conv(model).in_channels)
    check_forward(spec, model, probe)
    return PurifyPlan(
        model=model, spec=spec, source=source, data=data, layers=tuple(plans), top=top, n_refs=n_refs,
        n_clusters=n_clusters, max_clusters=max_clusters, gate=gate, gate_weight=gate_weight, score=score, rule=rule,
        batch_size=batch_size, device=device, dtype=dtype, precision=precision, seed=seed, max_memory=int(max_memory),
        cache_memory=cache_memory, progress=progress, owned=owned, arguments=arguments,
        checkpoint_dir=checkpoint_dir, rank=rank, world=world,
    )
