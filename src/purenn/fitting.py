"""Circuit relevance of every neuron on its reference samples: the input to clustering.

Pairs (reference sample, neuron) are grouped by sample, so each distinct sample's forward pass is
computed once and shared by all neurons (of all layers) that use it. When the streaming pass kept
the upstream activations of the reference candidates (:class:`~purenn.collect.ActivationCache`),
only the blocks between the upstream and the target layer are run again.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import torch
from torch import Tensor
from tqdm.auto import tqdm

from .arch import Block, ResNetSpec
from .collect import ActivationCache, References
from .data import DataSource
from .relevance import normalize_relevance, pair_relevance
from .rules import Rule

__all__ = ["fit_circuits"]


class _Plan(Protocol):
    layer: str
    position: int
    up_position: int
    neurons: tuple[int, ...]
    skip_aware: bool
    rule: Rule

    def blocks(self, spec: ResNetSpec) -> tuple[Block, ...]: ...


def _sorted_pairs(ref_idx: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Pairs of a ``(K, n)`` reference table sorted by sample: (sample ids, neuron positions, order)."""
    k, n = ref_idx.shape
    nid = torch.arange(k)[:, None].expand(k, n).flatten()
    sid = ref_idx.flatten()
    order = torch.argsort(sid, stable=True)
    return sid[order], nid[order], order


def fit_circuits(
    spec: ResNetSpec,
    source: DataSource,
    plans: Sequence[_Plan],
    refs: dict[str, References],
    n_refs: int,
    *,
    batch_size: int,
    device: torch.device | None,
    max_memory: int,
    progress: bool,
    cache: ActivationCache | None = None,
) -> dict[str, Tensor]:
    """Circuit features ``(K, n_refs, C_U)`` of each layer's neurons on their reference samples.

    The features are exactly what the gate computes for those samples (same functions,
    :func:`~purenn.relevance.segment_backward` and :func:`~purenn.relevance.normalize_relevance`).
    """
    ref_idx = {p.layer: refs[p.layer].indices[list(p.neurons)][:, :n_refs] for p in plans}
    all_ids = torch.unique(torch.cat([r.flatten() for r in ref_idx.values()]))
    use_cache = (
        cache is not None
        and cache.complete
        and {p.up_position for p in plans} <= cache.positions
        and all(int(i) in cache for i in all_ids)
    )
    positions = {p.position for p in plans} | {p.up_position for p in plans}
    record = {j for p in plans for j in range(p.up_position + 1, p.position + 1)}
    pairs = {p.layer: _sorted_pairs(ref_idx[p.layer]) for p in plans}
    neuron_t = {p.layer: torch.tensor(p.neurons, dtype=torch.long) for p in plans}
    # each chunk's relevance goes straight to its rows: no per-chunk list and no concatenated copy
    out: dict[str, Tensor] = {}
    bar = tqdm(total=len(all_ids), desc="circuit relevance", unit="img", disable=not progress, leave=False)
    with torch.no_grad():
        for s in range(0, len(all_ids), batch_size):
            ids = all_ids[s : s + batch_size]
            if not use_cache:
                x = source.fetch(ids)
                x = x.to(device) if device is not None else x
                acts, recs = spec.run_until(x, positions, record)
            lo, hi = int(ids[0]), int(ids[-1])
            for p in plans:
                sid, nid, order = pairs[p.layer]
                a = int(torch.searchsorted(sid, lo))
                b = int(torch.searchsorted(sid, hi, right=True))
                if a == b:
                    continue
                if use_cache:
                    a_up = cache.get(p.up_position, ids.tolist())
                    seg = set(range(p.up_position + 1, p.position + 1))
                    acts, recs = spec.run_until(a_up, {p.up_position, p.position}, seg, start=p.up_position)
                dev = acts[p.position].device
                local = torch.searchsorted(ids, sid[a:b]).to(dev)
                neurons = neuron_t[p.layer][nid[a:b]].to(dev)
                r = pair_relevance(
                    p.blocks(spec),
                    [recs[j] for j in range(p.up_position + 1, p.position + 1)],
                    acts[p.up_position],
                    acts[p.position],
                    local,
                    neurons,
                    max_memory,
                    p.rule,
                )
                r = normalize_relevance(r, neurons, drop_self=p.skip_aware).cpu()
                if p.layer not in out:
                    out[p.layer] = r.new_empty(len(p.neurons) * n_refs, r.shape[-1])
                out[p.layer][order[a:b]] = r
            bar.update(len(ids))
    bar.close()
    return {p.layer: out[p.layer].reshape(len(p.neurons), n_refs, -1) for p in plans}
