"""Reference collection: one streaming pass, a running top-n merge per neuron, all layers at once.

For each requested layer the pass keeps, per channel, the ``n`` samples with the largest spatial
maximum of the channel's activation map. Memory is ``O(n * channels)`` whatever the data size.

Example:
    >>> import torch, torchvision
    >>> from purenn.arch import ResNetSpec
    >>> from purenn.fit.data import DataSource
    >>> spec = ResNetSpec(torchvision.models.resnet18(num_classes=2).eval())
    >>> refs = collect_references(spec, DataSource.from_data(torch.rand(12, 3, 32, 32)), {"layer4": 8}, 5)
    >>> refs["layer4"].indices.shape
    torch.Size([512, 5])
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from purenn.arch import ResNetSpec
from purenn.common.distributed import all_gather_top, merge_top, shard_range, world_info
from purenn.common.progress import stage_bar
from purenn.errors import DataError
from purenn.fit.data import DataSource

__all__ = ["ActivationCache", "References", "TopK", "collect_references"]


@dataclass
class References:
    """Top-``n`` reference samples of every channel of one layer, strongest first.

    ``indices[c, j]`` is the data index of channel ``c``'s ``j``-th reference, ``values[c, j]`` the
    spatial maximum of its activation there.
    """

    indices: Tensor
    values: Tensor


class TopK:
    """Running top-``n`` over a stream of ``(B, C)`` score batches (larger is better).

    Equal scores are ranked by data index, smaller first (:func:`~purenn.common.distributed.merge_top`), so
    the result depends neither on batch boundaries nor on how the data is split across ranks.
    """

    def __init__(self, n: int):
        self.n = n
        self.values: Tensor | None = None
        self.indices: Tensor | None = None

    def update(self, scores: Tensor, start: int) -> None:
        idx = torch.arange(start, start + scores.shape[0], device=scores.device)[:, None].expand_as(scores)
        if self.values is not None:
            scores = torch.cat([self.values, scores])
            idx = torch.cat([self.indices, idx])
        self.values, self.indices = merge_top(scores, idx, self.n)

    def result(self) -> References:
        return References(indices=self.indices.t().contiguous().cpu(), values=self.values.t().contiguous().cpu())


class ActivationCache:
    """Activations of the current reference candidates, kept during the streaming pass.

    While the pass runs, every sample that is in some neuron's running top-``n`` keeps its
    activation at each cached position; a sample that drops out of every top-``n`` is evicted.
    Fitting then starts from these activations instead of running the network again. If the kept
    activations would exceed ``max_bytes`` the cache gives up (``complete`` becomes ``False``) and
    fitting recomputes the forward pass of the reference samples.
    """

    def __init__(self, positions: set[int], max_bytes: int):
        self.positions = set(positions)
        self.max_bytes = int(max_bytes)
        self.complete = bool(self.positions) and self.max_bytes > 0
        self._store: dict[int, dict[int, Tensor]] = {}
        self._bytes = 0

    def __contains__(self, sample: int) -> bool:
        return sample in self._store

    def __len__(self) -> int:
        return len(self._store)

    @property
    def nbytes(self) -> int:
        return self._bytes

    def holds(self, positions: set[int], samples: Sequence[int]) -> bool:
        """Whether the cache is complete and keeps every one of ``samples`` at all of ``positions``."""
        return self.complete and set(positions) <= self.positions and all(int(s) in self._store for s in samples)

    def get(self, position: int, samples: list[int]) -> Tensor:
        """Stacked activations ``(len(samples), C, H, W)`` at ``position``."""
        return torch.stack([self._store[s][position] for s in samples])

    def _drop(self) -> None:
        self.complete = False
        self._store.clear()
        self._bytes = 0

    def update(self, acts: dict[int, Tensor], start: int, members: Tensor) -> None:
        if not self.complete:
            return
        keep = set(members.tolist())
        for s in [s for s in self._store if s not in keep]:
            self._bytes -= sum(t.numel() * t.element_size() for t in self._store.pop(s).values())
        batch = next(iter(acts.values())).shape[0]
        for b in range(batch):
            s = start + b
            if s in keep and s not in self._store:
                entry = {p: acts[p][b].clone() for p in self.positions}
                self._store[s] = entry
                self._bytes += sum(t.numel() * t.element_size() for t in entry.values())
        if self._bytes > self.max_bytes:
            self._drop()


def collect_references(
    spec: ResNetSpec,
    source: DataSource,
    positions: dict[str, int],
    n_refs: int,
    *,
    device: torch.device | str | None = None,
    progress: bool = False,
    cache: ActivationCache | None = None,
    channels: dict[str, list[int]] | None = None,
    checkpoint: Any = None,
) -> dict[str, References]:
    """Stream the data once and return each layer's per-channel top-``n_refs`` samples.

    The forward pass stops at the deepest requested layer. With ``cache``, the activations of
    the current reference candidates of ``channels`` (default: all channels) are kept for fitting.
    Under torch.distributed each rank streams its own block of batches
    (:func:`~purenn.common.distributed.shard_range`) and the tables are merged exactly, so every rank
    returns the single-process result. ``checkpoint`` (a :class:`purenn.fit.resume.Checkpoint`) saves
    the running tables as the pass goes and continues a pass that was interrupted.

    Raises:
        DataError: a batch has the wrong shape or contains NaN/inf.
    """
    tops = {name: TopK(n_refs) for name in positions}
    wanted = set(positions.values()) | (cache.positions if cache is not None else set())
    rank, world = world_info()
    lo, hi = shard_range(len(source), source.batch_size, rank=rank, world=world)
    begin = lo
    if checkpoint is not None:
        state = checkpoint.load_collect()
        if state is not None:
            begin = state["next"]
            for name, top in tops.items():
                top.values, top.indices = state["values"][name].to(device), state["indices"][name].to(device)
    bar = stage_bar("collect references", hi - lo, "img", progress and rank == 0, world=world)
    bar.update(begin - lo)
    with torch.no_grad():
        for start, x in source.batches(begin, hi):
            if x.ndim != 4 or not x.is_floating_point():
                raise DataError(
                    f"samples {start}..{start + len(x) - 1} collate to {tuple(x.shape)} {x.dtype}; "
                    "expected a float batch (B, C, H, W)."
                )
            if not bool(torch.isfinite(x).all()):
                raise DataError(f"samples {start}..{start + len(x) - 1} contain NaN or infinite values.")
            x = x.to(device, non_blocking=True) if device is not None else x
            acts, _ = spec.run_until(x, wanted)
            for name, pos in positions.items():
                tops[name].update(acts[pos].amax(dim=(-2, -1)), start)
            if cache is not None and cache.complete:
                parts = [
                    (t.indices if channels is None or name not in channels else t.indices[:, channels[name]]).flatten()
                    for name, t in tops.items()
                ]
                members = torch.unique(torch.cat(parts))
                cache.update(acts, start, members.cpu())
            bar.update(len(x))
            if checkpoint is not None:
                checkpoint.save_collect(start + len(x), tops, done=start + len(x) >= hi)
    bar.close()
    out = {}
    for name, top in tops.items():
        if top.values is None:  # an empty shard
            c, dtype = spec.channels(positions[name]), next(spec.model.parameters()).dtype
            top.values = torch.empty(0, c, dtype=dtype, device=device)
            top.indices = torch.empty(0, c, dtype=torch.long, device=device)
        top.values, top.indices = all_gather_top(top.values, top.indices, n_refs)
        out[name] = top.result()
    return out
