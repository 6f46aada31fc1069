"""torch.distributed support: shards, exact merges and rank-0 writes.

When the default process group is initialised (``torchrun --nproc_per_node=N ...`` or the caller's
own ``torch.distributed.init_process_group``), :func:`purenn.purify_model` splits its work:

- collection: rank ``r`` streams a contiguous block of whole batches (the same batches a single
  process streams, so every sample's activation is computed in the same batch); the per-neuron
  top-``n`` tables are gathered and merged with the rule every run uses (larger value first, equal
  values by smaller data index), so the references do not depend on the number of ranks;
- relevance: the (sample, neuron) pairs, grouped by sample in chunks, are split across ranks and
  the rows are summed into one table on every rank (each row is computed by exactly one rank);
- clustering: split by neuron, each neuron fitted by one rank with the seed it gets in a single
  process, and the fits gathered (k-means per neuron is independent and deterministic, so the
  split changes nothing; it is cheap, about 35 ms per neuron of 100 references on one CPU core, but
  not free: a minute for 2048 neurons, divided by the ranks);
- forward-only baseline gates (``gate="activation"`` etc.) compute their features on every rank
  alike (one forward per reference sample, small next to the reference pass);
- files: only rank 0 writes (:func:`rank_zero_write`); the other ranks wait for it and raise if it
  failed.

The result equals the single-process one: the same references and integer tensors, float tensors
within 1e-5 relative, bit-identical when every sample's arithmetic is the same. It is whenever the
relevance stage recomputes its forwards (``cache_memory=0``, or a checkpoint folder): chunks are
then the single process's chunks dealt round-robin. With the activation cache a rank works on the
reference samples of its own shard (whose activations it kept), grouped in other chunks than one
process groups them, and the segment forward can differ in the last bits (5e-7 relative seen).

Without a process group every function here is the identity of a single process (rank 0 of 1).

Example:
    >>> rank, world = world_info()
    >>> (rank, world)
    (0, 1)
    >>> shard_range(10, 4, rank=1, world=2)   # batches [0,4) [4,8) [8,10): rank 1 gets the last two
    (4, 10)
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from typing import Any, TypeVar

import torch
from torch import Tensor

__all__ = ["world_info", "is_distributed", "shard_range", "merge_top", "all_reduce_sum", "broadcast_object",
           "rank_zero_write", "writes_on_rank_zero", "barrier", "init_from_env"]

T = TypeVar("T")
_PAD_INDEX = torch.iinfo(torch.int64).max


def is_distributed() -> bool:
    """True when a default process group with more than one rank is initialised."""
    return world_info()[1] > 1


def world_info() -> tuple[int, int]:
    """``(rank, world_size)`` of the default process group, ``(0, 1)`` without one."""
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def shard_range(n: int, batch_size: int, *, rank: int, world: int) -> tuple[int, int]:
    """The samples ``[lo, hi)`` of rank ``rank``: a contiguous block of whole batches of size
    ``batch_size`` (``lo`` is a multiple of it), blocks as equal as the batch count allows."""
    n_batches = -(-n // batch_size)
    b0, b1 = rank * n_batches // world, (rank + 1) * n_batches // world
    return min(b0 * batch_size, n), min(b1 * batch_size, n)


def merge_top(values: Tensor, indices: Tensor, n: int) -> tuple[Tensor, Tensor]:
    """The top ``n`` rows per column of ``(M, C)`` candidates: larger value first, equal values by
    smaller index. The rule of :class:`~purenn.fit.collect.TopK`, of the cross-rank merge, and of
    every run, so references do not depend on batch or rank boundaries.

    Example:
        >>> v, i = merge_top(torch.tensor([[1.0], [2.0], [2.0]]), torch.tensor([[0], [9], [4]]), 2)
        >>> i.ravel().tolist()
        [4, 9]
    """
    values = values + 0.0  # -0.0 -> +0.0: equal values must sort as equal on every backend
    by_index = torch.argsort(indices, dim=0, stable=True)
    values, indices = values.gather(0, by_index), indices.gather(0, by_index)
    order = torch.argsort(values, dim=0, descending=True, stable=True)[:n]
    return values.gather(0, order), indices.gather(0, order)


def _comm_device(t: Tensor) -> torch.device:
    """Where a collective on ``t`` must run: the current CUDA device under NCCL, else ``t``'s device."""
    if torch.distributed.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return t.device if t.device.type == "cpu" else torch.device("cpu")


def all_gather_top(values: Tensor, indices: Tensor, n: int) -> tuple[Tensor, Tensor]:
    """Merge every rank's ``(k, C)`` top table into the global top ``n`` (same on every rank).

    Tables shorter than ``n`` (a shard with fewer samples) are padded with ``-inf`` values and the
    largest index, which sort last.
    """
    rank, world = world_info()
    if world == 1:
        return merge_top(values, indices, n)
    dev = _comm_device(values)
    pad = n - values.shape[0]
    v = torch.cat([values, values.new_full((pad, values.shape[1]), -torch.inf)]).to(dev)
    i = torch.cat([indices, indices.new_full((pad, indices.shape[1]), _PAD_INDEX)]).to(dev)
    vs, is_ = [torch.empty_like(v) for _ in range(world)], [torch.empty_like(i) for _ in range(world)]
    torch.distributed.all_gather(vs, v)
    torch.distributed.all_gather(is_, i)
    mv, mi = merge_top(torch.cat(vs), torch.cat(is_), n)
    rows = int((mi[:, 0] != _PAD_INDEX).sum()) if mi.shape[1] else mi.shape[0]  # fewer samples than n in all
    return mv[:rows].to(values.device), mi[:rows].to(indices.device)


def all_reduce_sum(t: Tensor, chunk_bytes: int = 1 << 28) -> Tensor:
    """Sum ``t`` over ranks in place (in pieces of at most ``chunk_bytes``); returns ``t``."""
    if not is_distributed() or t.numel() == 0:
        return t
    dev = _comm_device(t)
    flat = t.view(-1)
    step = max(1, chunk_bytes // t.element_size())
    for s in range(0, flat.numel(), step):
        piece = flat[s : s + step]
        buf = piece.to(dev) if dev != t.device else piece
        torch.distributed.all_reduce(buf)
        if buf is not piece:
            piece.copy_(buf)
    return t


def broadcast_object(obj: T, src: int = 0) -> T:
    """``obj`` of rank ``src`` on every rank (picklable objects only)."""
    if not is_distributed():
        return obj
    box = [obj]
    dev = torch.device("cuda", torch.cuda.current_device()) if torch.distributed.get_backend() == "nccl" else None
    torch.distributed.broadcast_object_list(box, src=src, device=dev)
    return box[0]


def all_gather_object(obj: Any) -> list[Any]:
    """Every rank's ``obj``, in rank order (``[obj]`` in a single process)."""
    rank, world = world_info()
    if world == 1:
        return [obj]
    out: list[Any] = [None] * world
    torch.distributed.all_gather_object(out, obj)
    return out


def barrier() -> None:
    """Wait for every rank (nothing in a single process)."""
    if is_distributed():
        torch.distributed.barrier()


def rank_zero_write(write: Callable[[], T]) -> T:
    """Run ``write`` on rank 0 only; every rank returns its result.

    The other ranks wait until rank 0 has finished, write nothing, and raise a ``RuntimeError``
    naming rank 0's error if it failed (so no rank waits forever). In a single process this is
    ``write()``.
    """
    if not is_distributed():
        return write()
    rank, _ = world_info()
    result: Any = None
    error: str | None = None
    if rank == 0:
        try:
            result = write()
        except BaseException as exc:  # tell the other ranks, then raise here
            error = f"{type(exc).__name__}: {exc}"
            broadcast_object((None, error))
            raise
    result, error = broadcast_object((result, error))
    if error is not None:
        raise RuntimeError(f"rank 0 failed to write: {error}")
    return result


def writes_on_rank_zero(fn: Callable[..., T]) -> Callable[..., T]:
    """Decorator: the function runs on rank 0 only, through :func:`rank_zero_write`."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> T:
        return rank_zero_write(lambda: fn(*args, **kwargs))

    return wrapper


def init_from_env(device: str | None) -> tuple[str | None, bool]:
    """Start the default process group when launched by ``torchrun`` with several processes.

    Reads torchrun's environment (``WORLD_SIZE``, ``LOCAL_RANK``, ...); uses NCCL with one GPU per
    process (``cuda:LOCAL_RANK``) when ``device`` names CUDA, Gloo otherwise. Returns the device
    this process should use and whether a group was started here (then call
    ``torch.distributed.destroy_process_group()`` at the end). Without torchrun, or with a group
    already initialised, nothing happens.
    """
    dist = torch.distributed
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or not dist.is_available() or dist.is_initialized():
        return device, False
    cuda = device is not None and torch.device(device).type == "cuda"
    if cuda:
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        device = f"cuda:{local}"
    dist.init_process_group(backend="nccl" if cuda else "gloo")
    return device, True
