"""Data sources with stable sample indices: a Tensor, a map-style Dataset, or an unshuffled DataLoader.

Reference samples are remembered by their index in the data, then fetched again for fitting, so
the data must give the same sample for the same index every time. Shuffled loaders and iterable
datasets cannot, and are refused with a :class:`~purenn.errors.DataError`.

Example:
    >>> import torch
    >>> src = DataSource.from_data(torch.rand(10, 3, 8, 8), batch_size=4)
    >>> len(src), src.fetch([0, 9]).shape
    (10, torch.Size([2, 3, 8, 8]))
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, IterableDataset, SequentialSampler, Subset
from torch.utils.data.dataloader import default_collate

from .errors import ConfigError, DataError

__all__ = ["DataSource"]

_DICT_KEYS = ("image", "pixel_values", "input", "x")


def _inputs(batch: Any) -> Tensor:
    """The input tensor of a collated batch: the batch itself, its first element, or a known dict key."""
    if isinstance(batch, Tensor):
        x = batch
    elif isinstance(batch, (tuple, list)) and len(batch) > 0:
        x = batch[0]
    elif isinstance(batch, dict):
        key = next((k for k in _DICT_KEYS if k in batch), None)
        if key is None:
            raise DataError(
                f"cannot find the inputs in a dict batch with keys {sorted(batch)}; use one of {_DICT_KEYS}."
            )
        x = batch[key]
    else:
        x = batch
    if not isinstance(x, Tensor):
        raise DataError(
            f"samples must be tensors (or tuples whose first element is a tensor), got {type(x).__name__}; "
            "add a transform such as torchvision.transforms.ToTensor() to the dataset."
        )
    return x


class DataSource:
    """Uniform access to the data: iterate in order, fetch by index.

    Use :meth:`from_data`; the constructor takes an already validated map-style dataset.
    """

    def __init__(self, dataset: Any, batch_size: int, collate_fn: Callable | None = None, num_workers: int = 0):
        self.dataset = dataset
        self.batch_size = batch_size
        self.collate_fn = collate_fn or default_collate
        self.num_workers = num_workers
        self.pin_memory = False  # set by purify_model when it computes on a CUDA device

    @classmethod
    def from_data(cls, data: Any, batch_size: int = 64) -> DataSource:
        """Validate ``data`` and wrap it.

        Raises:
            DataError: an iterable-style dataset, a shuffled or custom-sampled DataLoader, or an
                object without ``__len__`` and ``__getitem__``.
        """
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ConfigError(f"batch_size must be a positive integer, got {batch_size!r}.")
        if isinstance(data, Tensor):
            if data.ndim != 4:
                raise DataError(f"a data tensor must have shape (N, C, H, W), got {tuple(data.shape)}.")
            return _TensorSource(data, batch_size)
        if isinstance(data, DataLoader):
            if isinstance(data.dataset, IterableDataset):
                raise DataError(
                    "the DataLoader wraps an IterableDataset, which has no stable sample indices; "
                    "purenn needs a map-style dataset so it can fetch reference samples again."
                )
            if not isinstance(data.sampler, SequentialSampler) or data.batch_sampler is None:
                raise DataError(
                    "the DataLoader is shuffled or uses a custom sampler, so sample indices are not stable; "
                    "pass the dataset itself or a DataLoader with shuffle=False."
                )
            return cls(data.dataset, batch_size, data.collate_fn, data.num_workers)
        if isinstance(data, IterableDataset) or not (hasattr(data, "__len__") and hasattr(data, "__getitem__")):
            raise DataError(
                f"{type(data).__name__} has no stable sample indices (it needs __len__ and __getitem__); "
                "pass a Tensor, a map-style Dataset or an unshuffled DataLoader."
            )
        if isinstance(data, (str, bytes, dict)):
            raise DataError(f"cannot use a {type(data).__name__} as data; pass a Tensor or a Dataset.")
        return cls(data, batch_size)

    def __len__(self) -> int:
        return len(self.dataset)

    def _loader(self, dataset: Dataset | Sequence) -> DataLoader:
        return DataLoader(
            dataset, batch_size=self.batch_size, shuffle=False, collate_fn=self.collate_fn,
            num_workers=self.num_workers, pin_memory=self.pin_memory,
        )

    def batches(self, start: int = 0, stop: int | None = None) -> Iterator[tuple[int, Tensor]]:
        """Yield ``(start_index, inputs)`` over samples ``[start, stop)`` (default all) in order.

        With ``start`` a multiple of ``batch_size`` the batches are the same ones the whole pass
        yields (a shard or a resumed pass computes every sample in the same batch).
        """
        stop = len(self.dataset) if stop is None else stop
        data = self.dataset if (start, stop) == (0, len(self.dataset)) else Subset(self.dataset, range(start, stop))
        for batch in self._loader(data):
            x = _inputs(batch)
            yield start, x
            start += len(x)

    def fetch(self, indices: Sequence[int] | Tensor) -> Tensor:
        """The inputs of the given sample indices, stacked in that order."""
        idx = [int(i) for i in (indices.tolist() if isinstance(indices, Tensor) else indices)]
        parts = [_inputs(b) for b in self._loader(Subset(self.dataset, idx))]
        return torch.cat(parts) if len(parts) > 1 else parts[0]


class _TensorSource(DataSource):
    def __init__(self, data: Tensor, batch_size: int):
        super().__init__(data, batch_size)

    def batches(self, start: int = 0, stop: int | None = None) -> Iterator[tuple[int, Tensor]]:
        stop = len(self.dataset) if stop is None else stop
        for s in range(start, stop, self.batch_size):
            yield s, self.dataset[s : min(s + self.batch_size, stop)]

    def fetch(self, indices: Sequence[int] | Tensor) -> Tensor:
        idx = indices if isinstance(indices, Tensor) else torch.as_tensor(list(indices), dtype=torch.long)
        return self.dataset[idx.to(self.dataset.device)]
