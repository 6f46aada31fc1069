"""Concept-driven purification: split the neurons that carry a concept into a concept part and the rest.

PURE splits a neuron by clustering the circuits of its top references, without knowing which
concept a user cares about. To remove a concept (for example a Clever-Hans artifact such as a
watermark) the split should instead separate *that* concept from what else the neuron does.
Given a few labelled examples, images with the concept (``concept``) and without it (``other``),
ideally the same images with and without an artifact:

1. :func:`rank_concept_channels` ranks a layer's channels by how much the concept raises their
   mean activation (the concept's effect);
2. :func:`purify_concept` splits the chosen channels into two virtual neurons each, ``k.0`` (the
   rest; or ``k.0 ... k.(R-1)`` with ``rest_clusters=R``) and the last one, the concept, with the
   centroids fitted on the gate features (circuit
   relevance by default) of the ``other`` and ``concept`` examples: the activation-weighted mean
   of each group, so examples on which the neuron is silent do not pull the centroids;
3. :func:`concept_virtual_indices` lists the concept virtual neurons; suppressing them
   (``pm.suppress``) removes the concept's path through those channels on inputs whose circuit
   looks like the concept's, and leaves every other input untouched.

The result is an ordinary :class:`~purenn.PurifiedModel`: it saves, loads and exports like any
other, with the suppression baked in.

Example:
    >>> import torch, torchvision, purenn
    >>> from purenn.fit.concept import purify_concept, concept_virtual_indices
    >>> model = torchvision.models.resnet18(num_classes=3).eval()
    >>> clean = torch.rand(8, 3, 32, 32)
    >>> stamped = clean.clone(); stamped[:, :, :6, :6] = 3.0
    >>> pm = purify_concept(model, "layer4", stamped, clean, neurons=4)
    >>> handle = pm.suppress("layer4", concept_virtual_indices(pm, "layer4"))
    >>> pm(clean).shape
    torch.Size([8, 3])
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from purenn.arch import ResNetSpec
from purenn.attribution.relevance import DEFAULT_MAX_MEMORY
from purenn.attribution.rules import Rule
from purenn.common.checks import check_int
from purenn.common.choices import CONCEPT_SCORE, DEFAULT_CONCEPT_GATE
from purenn.errors import ConfigError, DataError, LayerError
from purenn.fit.data import DataSource
from purenn.fit.plan import check_forward, check_shared_options, inference_form, model_device, plan_layers
from purenn.model.gates import CIRCUIT_GATES, gate_feature_chunks
from purenn.model.pure_layer import PureLayer
from purenn.model.purified import PurifiedModel

__all__ = [
    "ConceptChannels",
    "rank_concept_channels",
    "concept_gate_features",
    "purify_concept",
    "concept_virtual_indices",
]

def _base(model: nn.Module) -> nn.Module:
    return model.base_model if isinstance(model, PurifiedModel) else model


def _images(data: Any, what: str, batch_size: int) -> DataSource:
    if data is None:
        raise DataError(f"{what} examples are required: a Tensor (N, C, H, W), a Dataset or a DataLoader.")
    source = DataSource.from_data(data, batch_size)
    if len(source) == 0:
        raise DataError(f"{what} holds no examples.")
    return source


def _pooled(spec: ResNetSpec, source: DataSource, position: int, device: torch.device) -> Tensor:
    """``(N, C)`` spatially mean-pooled activations at ``position``."""
    out = []
    with torch.no_grad():
        for _, x in source.batches():
            acts, _ = spec.run_until(x.to(device), {position})
            out.append(acts[position].mean(dim=(-2, -1)).double().cpu())
    return torch.cat(out)


@dataclass
class ConceptChannels:
    """Channels of ``layer`` ranked by the concept's effect on their mean activation.

    ``channels`` are sorted by decreasing ``effect``; ``effect[c]`` is the mean pooled activation of
    channel ``c`` on the concept examples minus that on the other examples (for every channel, in
    channel order); ``relative[c]`` divides it by the channel's mean over both groups.
    """

    layer: str
    channels: list[int]
    effect: np.ndarray = field(repr=False)
    relative: np.ndarray = field(repr=False)

    def top(self, n: int) -> list[int]:
        """The ``n`` channels with the largest positive effect, in ascending channel order."""
        n = check_int("n", n, 1)
        pos = [c for c in self.channels if self.effect[c] > 0][:n]
        return sorted(pos)


def rank_concept_channels(
    model: nn.Module,
    layer: str,
    concept: Any,
    other: Any,
    *,
    target: int | None = None,
    batch_size: int = 64,
    device: torch.device | str | None = None,
) -> ConceptChannels:
    """Rank the channels of ``layer`` by how much ``concept`` examples raise their mean activation
    over ``other`` examples, or, with ``target``, their contribution to that class's logit.

    With ``target`` (the class a shortcut points to), a channel's effect is the difference between
    the two groups of its gradient x activation relevance for the target's logit margin
    ``z_target - mean_j z_j`` (summed over space, averaged over examples): channels that the concept
    raises *and* that push the prediction towards the target come first. After the last stage
    (pooling and a linear classifier) this is exact: ``(w_target,c - mean_j w_j,c)`` times the
    change of the channel's mean activation.

    Args:
        model: a torchvision or timm ResNet or a :class:`~purenn.PurifiedModel` (its base model is used).
        layer: a stage or block output, e.g. ``"layer4"``.
        concept: images with the concept (Tensor ``(N, C, H, W)``, Dataset or DataLoader).
        other: images without it (ideally the same images without the concept).
        target: rank by relevance to this class's logit margin instead of by activation.
        batch_size: images per forward pass.
        device: where to compute (default: the model's device).

    Example:
        >>> ranked = rank_concept_channels(model, "layer4", stamped, clean)   # doctest: +SKIP
        >>> ranked.top(16)                                                      # doctest: +SKIP
    """
    base = _base(model)
    spec = ResNetSpec(base)
    pos = spec.position(layer)
    if pos == 0:
        raise LayerError("rank the channels of a stage or block output, not of the stem.")
    device = _device(base, device)
    with inference_form(base):
        return _rank(spec, layer, pos, _images(concept, "concept", batch_size), _images(other, "other", batch_size),
                     device, target)


def _margin_relevance(spec: ResNetSpec, source: DataSource, position: int, target: int,
                      device: torch.device) -> Tensor:
    """``(N, C)`` gradient x activation of each channel at ``position`` for ``z_target - mean_j z_j``."""
    out = []
    for _, x in source.batches():
        with torch.no_grad():
            acts, _ = spec.run_until(x.to(device), {position})
        h = acts[position].detach().requires_grad_(True)
        with torch.enable_grad():
            z = h
            for blk in spec.blocks[position:]:
                z, _ = spec.block_forward(blk, z)
            logits = spec.head(z)
            if not 0 <= target < logits.shape[1]:
                raise ConfigError(f"target must be a class index in 0..{logits.shape[1] - 1}, got {target}.")
            margin = logits[:, target] - logits.mean(dim=1)
            (g,) = torch.autograd.grad(margin.sum(), h)
        out.append((g * h).detach().sum(dim=(-2, -1)).double().cpu())
    return torch.cat(out)


def _rank(
    spec: ResNetSpec, layer: str, pos: int, concept: DataSource, other: DataSource, device: torch.device,
    target: int | None = None,
) -> ConceptChannels:
    if target is not None:
        if isinstance(target, bool) or not isinstance(target, (int, np.integer)):
            raise ConfigError(f"target must be a class index, got {target!r}.")
        a = _margin_relevance(spec, concept, pos, int(target), device).mean(dim=0)
        b = _margin_relevance(spec, other, pos, int(target), device).mean(dim=0)
    else:
        a = _pooled(spec, concept, pos, device).mean(dim=0)
        b = _pooled(spec, other, pos, device).mean(dim=0)
    effect = (a - b).numpy()
    relative = effect / np.maximum((a + b).numpy() / 2, 1e-12)
    order = np.argsort(-effect, kind="stable")
    return ConceptChannels(layer, order.tolist(), effect, relative)


def _device(model: nn.Module, device: torch.device | str | None) -> torch.device:
    here = model_device(model)
    if device is not None and torch.device(device) != here:
        raise ConfigError(
            f"the model is on {here} but device={device!r}; move the model first (purenn does not move "
            "a model it was given)."
        )
    return here


def concept_gate_features(
    model: nn.Module,
    x: Tensor,
    layer: str,
    neurons: Sequence[int],
    *,
    upstream: str | None = None,
    gate: str = DEFAULT_CONCEPT_GATE,
    gate_weight: float = 0.5,
    skip_aware: bool = False,
    max_memory: int = DEFAULT_MAX_MEMORY,
    rule: str | Rule = "gradient",
) -> tuple[Tensor, Tensor]:
    """Gate features ``(B, K, D)`` of ``neurons`` on ``x`` and their activation mass ``(B, K)``.

    The features are what a :class:`~purenn.PureLayer` with this ``gate`` compares with its
    centroids (the normalised circuit relevance for ``"circuit"``, of the neurons' joint unit for
    ``"joint-circuit"``); the mass is the spatial sum of
    each neuron's positive activation.
    """
    base = _base(model)
    spec = ResNetSpec(base)
    pos = spec.position(layer)
    up = spec.position(upstream if upstream is not None else spec.default_upstream(layer))
    nt = torch.as_tensor(list(neurons), dtype=torch.long, device=x.device)
    circuit = gate in CIRCUIT_GATES
    with torch.no_grad():
        acts, recs = spec.run_until(x, {up, pos}, set(range(up + 1, pos + 1)) if circuit else set())
        a_t = acts[pos]
        mass = a_t[:, nt].clamp(min=0).sum(dim=(-2, -1))
        chunks = gate_feature_chunks(gate, spec.segment(up, pos), [recs[j] for j in range(up + 1, pos + 1)]
                                     if circuit else [], acts[up], a_t, nt, rule=rule, skip_aware=skip_aware,
                                     gate_weight=gate_weight, max_memory=max_memory)
        feat = torch.cat([f for _, _, f in chunks], dim=1)
    return feat, mass


def _rest_centroids(feat: Tensor, mass: Tensor, n: int, seed: int) -> Tensor:
    """``(K, n, D)``: per neuron, ``n`` centroids of the examples without the concept: k-means
    (scikit-learn, weighted by activation mass) for ``n > 1``, the weighted mean for ``n = 1``."""
    if n == 1:
        return _weighted_mean(feat, mass)[:, None]
    from sklearn.cluster import KMeans

    out = []
    for j in range(feat.shape[1]):
        x, w = feat[:, j].double().numpy(), mass[:, j].double().numpy()
        if not (w > 0).sum() >= n:  # too few active examples to cluster: repeat the mean
            out.append(_weighted_mean(feat[:, j : j + 1], mass[:, j : j + 1]).expand(n, -1))
            continue
        km = KMeans(n_clusters=n, n_init=4, random_state=seed).fit(x, sample_weight=np.maximum(w, 0))
        out.append(torch.from_numpy(km.cluster_centers_))
    return torch.stack(out)


def _weighted_mean(feat: Tensor, mass: Tensor) -> Tensor:
    """``(K, D)`` mass-weighted mean of ``(N, K, D)`` features; plain mean where the mass is zero."""
    w = mass.double()
    total = w.sum(dim=0)
    plain = feat.double().mean(dim=0)
    weighted = (feat.double() * w[:, :, None]).sum(dim=0) / total.clamp(min=1e-30)[:, None]
    return torch.where((total > 0)[:, None], weighted, plain)


def _features_of(
    base: nn.Module, source: DataSource, plan: Any, gate: str, gate_weight: float, device: torch.device,
    max_memory: int,
) -> tuple[Tensor, Tensor]:
    feats, masses = [], []
    for _, x in source.batches():
        f, m = concept_gate_features(
            base, x.to(device), plan.layer, plan.neurons, upstream=plan.upstream, gate=gate, gate_weight=gate_weight,
            skip_aware=plan.skip_aware and gate in CIRCUIT_GATES, max_memory=max_memory, rule=plan.rule,
        )
        feats.append(f.cpu())
        masses.append(m.cpu())
    return torch.cat(feats), torch.cat(masses)


def purify_concept(
    model: nn.Module,
    layers: str | Sequence[str],
    concept: Any,
    other: Any,
    *,
    neurons: int | Mapping[str, Sequence[int] | int] = 32,
    target: int | None = None,
    rest_clusters: int = 3,
    upstream: Mapping[str, str] | None = None,
    gate: str = DEFAULT_CONCEPT_GATE,
    gate_weight: float = 0.5,
    skip_aware: bool | str = "auto",
    batch_size: int = 64,
    device: torch.device | str | None = None,
    max_memory: int = DEFAULT_MAX_MEMORY,
    seed: int = 0,
    rule: str | Rule = "gradient",
) -> PurifiedModel:
    """Split the neurons that carry a concept into a concept virtual neuron and the rest.

    Each chosen neuron ``k`` gets virtual neurons for the rest and one for the concept. With
    ``rest_clusters=1``: ``k.0`` with the centroid of the ``other`` examples' gate features and
    ``k.1`` (the concept part) with that of the ``concept`` examples, each the mean weighted by the
    neuron's activation mass on the example. With ``rest_clusters=R`` the rest has ``R`` centroids
    ``k.0 ... k.(R-1)`` and the concept is ``k.R``. At inference the nearest centroid decides, as
    for any purified neuron; the logits stay equal to the original's until the concept part is
    suppressed (:func:`concept_virtual_indices`).

    Args:
        model: a trained torchvision or timm ResNet in eval mode (never modified).
        layers: target layer(s), e.g. ``"layer4"`` or ``["layer3", "layer4"]``.
        concept: examples with the concept (Tensor ``(N, C, H, W)``, Dataset or DataLoader).
        other: examples without it; the same images without the concept work best.
        neurons: an integer ``N`` (per layer) takes the ``N`` channels the concept raises most, or
            with ``target`` the ``N`` most relevant to it (:func:`rank_concept_channels`);
            ``{layer: [channels]}`` or ``{layer: N}`` per layer.
        target: with a count in ``neurons``, rank channels by their relevance to this class (the
            class a shortcut points to) instead of by activation (see :func:`rank_concept_channels`).
        rest_clusters: centroids for the examples without the concept (k-means weighted by
            activation mass when more than 1, default 3): more of them describe the rest more
            closely, so that fewer inputs without the concept land nearest to the concept's
            centroid (see the Clever-Hans benchmark in the README).
        upstream: ``{layer: upstream_layer}`` to override the default upstream.
        gate: what the gate compares: ``"joint-circuit"`` (default: the circuit relevance of the chosen
            channels taken together, one backward pass per input for all of them, each channel with its
            own centroids), ``"circuit"`` (PURE's: each channel's own circuit, one backward pass per
            channel), ``"circuit+map"``, or a forward-only gate of :mod:`purenn.model.gates`.
        gate_weight: weight of the activation map in a ``"circuit+map"`` gate.
        skip_aware: as in :func:`purenn.purify_model`.
        batch_size: images per forward pass.
        device: must be the model's device if given (the model is not moved).
        max_memory: bytes of intermediate tensors per relevance chunk.
        seed: k-means seed for ``rest_clusters > 1``.
        rule: relevance rule of the circuit gate, as in :func:`purenn.purify_model`.

    Returns:
        A :class:`~purenn.PurifiedModel` whose purified neurons each have the virtual neurons
        ``k.0 ... k.(R-1)`` (the rest, ``R = rest_clusters``) and ``k.R``, the last (the concept);
        their ``scores`` are the concept's effect on the neuron's activation mass (spatial sum of
        its positive activation, concept minus other examples, averaged), and
        ``ref_counts`` how many of the given examples the gate sends to each.

    Example:
        >>> pm = purify_concept(model, "layer4", stamped, clean, neurons=16)         # doctest: +SKIP
        >>> pm.suppress("layer4", concept_virtual_indices(pm, "layer4"))            # doctest: +SKIP
    """
    base = model
    if isinstance(model, PurifiedModel):
        raise ConfigError("purify_concept takes the original model; pass pm.unload().")
    spec = ResNetSpec(base)
    gate, gate_weight, batch_size, seed, max_memory, rule = check_shared_options(
        gate=gate, gate_weight=gate_weight, batch_size=batch_size, seed=seed, max_memory=max_memory, rule=rule)
    rest_clusters = check_int("rest_clusters", rest_clusters, 1)
    names = [layers] if isinstance(layers, str) else list(layers)
    if isinstance(neurons, Mapping):
        extra = sorted(set(neurons) - set(names))
        if extra:
            raise LayerError(f"neurons names layers that are not being purified: {extra}; layers={names}.")
        request = {n: neurons.get(n, 32) for n in names}
    else:
        request = {n: neurons for n in names}
    for n, v in request.items():
        if isinstance(v, bool) or not isinstance(v, (int, np.integer, Sequence)) or isinstance(v, str):
            raise ConfigError(f"neurons for {n!r} must be a count or a list of channels, got {v!r}.")
    plans = plan_layers(spec, names, {n: list(range(spec.channels(spec.position(n)))) for n in names},
                         upstream, skip_aware)
    plans = [replace(p, rule=rule) for p in plans]
    c_src = _images(concept, "concept", batch_size)
    o_src = _images(other, "other", batch_size)
    device = _device(base, device)
    dtype = next(base.parameters()).dtype
    with inference_form(base):
        check_forward(spec, base, c_src.fetch([0]).to(device))
        layers_out = []
        for p in plans:
            want = request[p.layer]
            if isinstance(want, (int, np.integer)):
                count = check_int(f"neurons for {p.layer!r}", want, 1)
                ranked = _rank(spec, p.layer, p.position, c_src, o_src, device, target)
                chosen = ranked.top(min(count, spec.channels(p.position)))
                if not chosen:
                    raise DataError(f"the concept raises no channel of {p.layer!r}; check the examples.")
            else:
                chosen = sorted({int(c) for c in want})
                if not chosen or chosen[0] < 0 or chosen[-1] >= spec.channels(p.position):
                    raise ConfigError(f"channels of {p.layer!r} must be in 0..{spec.channels(p.position) - 1}.")
            p = replace(p, neurons=tuple(chosen))
            fc, mc = _features_of(base, c_src, p, gate, gate_weight, device, int(max_memory))
            fo, mo = _features_of(base, o_src, p, gate, gate_weight, device, int(max_memory))
            rest = _rest_centroids(fo, mo, rest_clusters, seed)  # (K, R, D)
            centroids = torch.cat([rest, _weighted_mean(fc, mc)[:, None]], dim=1)  # (K, R + 1, D)
            n_cl = centroids.shape[1]
            effect = mc.double().mean(dim=0) - mo.double().mean(dim=0)
            feats = torch.cat([fo, fc]).double()
            d = ((feats[:, :, None, :] - centroids[None]) ** 2).sum(dim=-1)
            assigned = d.argmin(dim=-1)  # (N, K)
            counts = torch.stack([(assigned == c).sum(dim=0) for c in range(n_cl)], dim=1)
            k = len(chosen)
            layers_out.append(
                PureLayer(
                    layer=p.layer, upstream=p.upstream, channels=spec.channels(p.position), neurons=list(chosen),
                    centroids=centroids.to(dtype), n_clusters=torch.full((k,), n_cl, dtype=torch.long),
                    scores=effect.float(), ref_counts=counts, skip_aware=p.skip_aware and gate in CIRCUIT_GATES,
                    rule=p.rule, gate=gate, gate_weight=gate_weight, score_kind=CONCEPT_SCORE,
                ).to(device)
            )
    return PurifiedModel(base, layers_out, max_memory=int(max_memory))


def concept_virtual_indices(pm: PurifiedModel, layer: str) -> list[int]:
    """Virtual indices of the concept parts (the last virtual neuron) of every split neuron of ``layer``.

    Example:
        >>> handle = pm.suppress("layer4", concept_virtual_indices(pm, "layer4"))   # doctest: +SKIP
    """
    pl = pm.pure_layer(layer)
    return [pm.virtual_index(layer, c, n - 1) for c, n in zip(pl.neurons.tolist(), pl.n_clusters.tolist()) if n > 1]
