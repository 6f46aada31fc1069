"""Circuit relevance of every neuron on its reference samples: the input to clustering.

Pairs (reference sample, neuron) are grouped by sample, so each distinct sample's forward pass is
computed once and shared by all neurons (of all layers) that use it. When the streaming pass kept
the upstream activations of the reference candidates (:class:`~purenn.fit.collect.ActivationCache`),
only the blocks between the upstream and the target layer are run again.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

import torch
from torch import Tensor

from purenn.arch import Block, ResNetSpec
from purenn.attribution.precision import relevance_precision
from purenn.attribution.relevance import normalize_relevance, pair_relevance
from purenn.attribution.rules import Rule
from purenn.common.distributed import all_gather_object, all_reduce_sum, shard_range, world_info
from purenn.common.progress import stage_bar
from purenn.fit.collect import ActivationCache, References
from purenn.fit.data import DataSource

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


def _chunks(
    all_ids: Tensor, batch_size: int, owned: tuple[int, int] | None, rank: int, world: int
) -> list[tuple[int, Tensor]]:
    """This rank's chunks of sample ids as ``(key, ids)``: with ``owned = (lo, hi)`` the ids in its
    own data shard (whose activations it cached), else every ``world``-th chunk of all ids."""
    if owned is not None:
        mine = all_ids[(all_ids >= owned[0]) & (all_ids < owned[1])]
        return [(j, mine[s : s + batch_size]) for j, s in enumerate(range(0, len(mine), batch_size))]
    starts = range(0, len(all_ids), batch_size)
    return [(j, all_ids[s : s + batch_size]) for j, s in enumerate(starts) if j % world == rank]


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
    precision: str = "float32",
    checkpoint: Any = None,
) -> dict[str, Tensor]:
    """Circuit features ``(K, n_refs, C_U)`` of each layer's neurons on their reference samples.

    The features are exactly what the gate computes for those samples (same functions,
    :func:`~purenn.attribution.relevance.segment_backward` and
    :func:`~purenn.attribution.relevance.normalize_relevance`).
    Under torch.distributed the chunks of samples are split across ranks and every rank returns
    the whole table. ``precision`` (:func:`~purenn.attribution.precision.relevance_precision`) applies to the
    segment backward; ``checkpoint`` (:class:`purenn.fit.resume.Checkpoint`) stores every finished chunk
    and reuses the chunks an interrupted run finished.
    """
    ref_idx = {p.layer: refs[p.layer].indices[list(p.neurons)][:, :n_refs] for p in plans}
    all_ids = torch.unique(torch.cat([r.flatten() for r in ref_idx.values()]))
    rank, world = world_info()
    owned = shard_range(len(source), source.batch_size, rank=rank, world=world)
    mine = all_ids[(all_ids >= owned[0]) & (all_ids < owned[1])]
    use_cache = checkpoint is None and cache is not None and cache.holds({p.up_position for p in plans}, mine.tolist())
    use_cache = all(all_gather_object(use_cache))  # every rank must take the same branch
    chunks = _chunks(all_ids, batch_size, owned if use_cache else None, rank, world)
    positions = {p.position for p in plans} | {p.up_position for p in plans}
    record = {j for p in plans for j in range(p.up_position + 1, p.position + 1)}
    pairs = {p.layer: _sorted_pairs(ref_idx[p.layer]) for p in plans}
    neuron_t = {p.layer: torch.tensor(p.neurons, dtype=torch.long) for p in plans}
    dtype = next(spec.model.parameters()).dtype
    store = device if device is not None and torch.device(device).type == "cuda" else torch.device("cpu")
    # each chunk's relevance goes straight to its rows; rows another rank computes stay zero until the sum
    out = {
        p.layer: torch.zeros(len(p.neurons) * n_refs, spec.channels(p.up_position), dtype=dtype, device=store)
        for p in plans
    }

    def span(p: _Plan, ids: Tensor) -> tuple[int, int]:
        sid = pairs[p.layer][0]
        return int(torch.searchsorted(sid, int(ids[0]))), int(torch.searchsorted(sid, int(ids[-1]), right=True))

    n_pairs = sum(b - a for _, ids in chunks for p in plans for a, b in [span(p, ids)])
    bar = stage_bar("circuit relevance", n_pairs, "pair", progress and rank == 0, world=world)
    with torch.no_grad():
        for key, ids in chunks:
            done = checkpoint.load_chunk(key) if checkpoint is not None else None
            if done is None and not use_cache:
                x = source.fetch(ids)
                x = x.to(device, non_blocking=True) if device is not None else x
                acts, recs = spec.run_until(x, positions, record)
            rows: dict[str, Tensor] = {}
            for p in plans:
                sid, nid, order = pairs[p.layer]
                a, b = span(p, ids)
                if a == b:
                    continue
                if done is not None:
                    out[p.layer][order[a:b].to(store)] = done[p.layer].to(store, dtype)
                    bar.update(b - a)
                    continue
                if use_cache:
                    a_up = cache.get(p.up_position, ids.tolist())
                    seg = set(range(p.up_position + 1, p.position + 1))
                    acts, recs = spec.run_until(a_up, {p.up_position, p.position}, seg, start=p.up_position)
                dev = acts[p.position].device
                local = torch.searchsorted(ids, sid[a:b]).to(dev)
                neurons = neuron_t[p.layer][nid[a:b]].to(dev)
                with relevance_precision(precision, dev):  # the per-pair backward; forwards stay exact
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
                r = normalize_relevance(r.to(dtype), neurons, drop_self=p.skip_aware)
                out[p.layer][order[a:b].to(store)] = r.to(store)
                rows[p.layer] = r
                bar.update(b - a)
            if checkpoint is not None and done is None:
                checkpoint.save_chunk(key, rows)
    bar.close()
    for t in out.values():
        all_reduce_sum(t)
    return {p.layer: out[p.layer].cpu().reshape(len(p.neurons), n_refs, -1) for p in plans}
