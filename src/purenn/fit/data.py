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

from purenn.common.checks import check_int
from purenn.errors import DataError

__all__ = ["DataSource"]

_DICT_KEYS = ("image", "pixel_values", "input", "x")


_PIL_HINT = (
    "samples are PIL images; purenn takes float tensors prepared as for the model: add a transform such as "
    "torchvision.transforms.Compose([ToTensor(), Normalize(mean, std)]) to the dataset, or pass "
    "torch.stack([transform(im) for im in images])."
)


def _is_pil(x: Any) -> bool:
    return type(x).__module__.split(".")[0] == "PIL"


def cast_inputs(x: Tensor, dtype: torch.dtype | None, what: str = "the data") -> Tensor:
    """``x`` in ``dtype`` (floating inputs are converted to the model's dtype); integer inputs (such as
    uint8 images) are refused with a :class:`DataError` saying what to pass."""
    if not x.is_floating_point():
        raise DataError(
            f"{what} has dtype {x.dtype}; purenn takes floating-point images prepared as for the model, "
            "e.g. x.float() / 255 followed by the model's normalisation."
        )
    return x if dtype is None or x.dtype == dtype else x.to(dtype)


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
    if _is_pil(x):
        raise DataError(_PIL_HINT)
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
        #: the dtype inputs are converted to (the model's), or None to keep theirs
        self.dtype: torch.dtype | None = None
        self.pin_memory = False  # set by purify_model when it computes on a CUDA device

    @classmethod
    def from_data(cls, data: Any, batch_size: int = 64) -> DataSource:
        """Validate ``data`` and wrap it.

        Raises:
            DataError: an iterable-style dataset, a shuffled or custom-sampled DataLoader, or an
                object without ``__len__`` and ``__getitem__``.
        """
        batch_size = check_int("batch_size", batch_size, 1)
        if isinstance(data, Tensor):
            if data.ndim != 4:
                raise DataError(f"a data tensor must have shape (N, C, H, W), got {tuple(data.shape)}.")
            cast_inputs(data[:0], None, "the data tensor")
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
        first = data[0] if len(data) else None
        if _is_pil(first) or (isinstance(first, (tuple, list)) and len(first) and _is_pil(first[0])):
            raise DataError(_PIL_HINT)
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
            x = cast_inputs(_inputs(batch), self.dtype)
            yield start, x
            start += len(x)

    def fetch(self, indices: Sequence[int] | Tensor) -> Tensor:
        """The inputs of the given sample indices, stacked in that order."""
        idx = [int(i) for i in (indices.tolist() if isinstance(indices, Tensor) else indices)]
        parts = [_inputs(b) for b in self._loader(Subset(self.dataset, idx))]
        return cast_inputs(torch.cat(parts) if len(parts) > 1 else parts[0], self.dtype)


class _TensorSource(DataSource):
    def __init__(self, data: Tensor, batch_size: int):
        super().__init__(data, batch_size)

    def batches(self, start: int = 0, stop: int | None = None) -> Iterator[tuple[int, Tensor]]:
        stop = len(self.dataset) if stop is None else stop
        for s in range(start, stop, self.batch_size):
            yield s, cast_inputs(self.dataset[s : min(s + self.batch_size, stop)], self.dtype)

    def fetch(self, indices: Sequence[int] | Tensor) -> Tensor:
        idx = indices if isinstance(indices, Tensor) else torch.as_tensor(list(indices), dtype=torch.long)
        return cast_inputs(self.dataset[idx.to(self.dataset.device)], self.dtype)
