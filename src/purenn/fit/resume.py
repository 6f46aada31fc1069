"""Resumable fits: ``purify_model(..., checkpoint_dir=...)`` (``purenn purify --checkpoint-dir``).

The folder holds:

- ``run.json``: the run's fingerprint: the arguments that decide the result, the number of ranks,
  a SHA-256 of the model's weights and of 16 evenly spaced samples of the data, and the data's
  length. A run pointed at a folder with another fingerprint is refused with a
  :class:`~purenn.errors.ConfigError` naming what differs (use a new folder, or delete it).
- ``collect.rank<R>.pt``: the reference pass of rank ``R``: its running top-``n`` tables and the
  first sample it has not seen, written at most every ``PURENN_CHECKPOINT_INTERVAL`` seconds
  (environment variable, default 60) and when the pass ends.
- ``relevance/chunk<J>.pt``: the circuits of relevance chunk ``J`` (a group of reference samples),
  written as soon as it is finished.

Every file is written atomically (a temporary file, fsync, rename), so a run killed at any moment
leaves only complete files. Started again with the same arguments, model and data, the run skips
the samples and chunks already done and produces the same result as an uninterrupted run: with a
checkpoint folder the streaming pass keeps no activation cache (``cache_memory`` is not used), so
each reference's forward pass is computed the same way whether or not the run was interrupted. A
finished run's folder can be removed; kept, it makes the same call fast (only clustering reruns).

For tests only, ``PURENN_TEST_KILL_AFTER="collect:N"`` or ``"relevance:N"`` makes the process
kill itself (SIGKILL, no clean-up) right after its ``N``-th checkpoint write of that stage.

Example:
    >>> import tempfile
    >>> ck = Checkpoint(tempfile.mkdtemp(), {"args": "n_refs=4"})
    >>> ck.load_chunk(0) is None
    True
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import time
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from purenn._version import __version__
from purenn.errors import ConfigError

__all__ = ["Checkpoint", "run_fingerprint", "model_hash", "data_hash"]

_FORMAT = 1


def _tensor_bytes(t: Tensor) -> bytes:
    return t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def model_hash(model: nn.Module) -> str:
    """SHA-256 over the names, dtypes, shapes and bytes of ``model``'s ``state_dict``."""
    h = hashlib.sha256()
    for name, t in model.state_dict().items():
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        h.update(_tensor_bytes(t))
    return h.hexdigest()


def data_hash(source: Any, n_samples: int = 16) -> str:
    """SHA-256 of ``n_samples`` evenly spaced inputs of a :class:`~purenn.fit.data.DataSource` (not of
    the whole data, which can be ImageNet; a change in length is caught by the fingerprint)."""
    n = len(source)
    idx = np.unique(np.linspace(0, n - 1, min(n, n_samples)).round().astype(int)).tolist()
    x = source.fetch(idx)
    return hashlib.sha256(f"{x.dtype}:{tuple(x.shape)};".encode() + _tensor_bytes(x)).hexdigest()


def run_fingerprint(args: str, model: nn.Module, source: Any, world: int) -> dict[str, Any]:
    """What a checkpoint folder must agree with: ``args`` (canonical text of the arguments), the
    number of ranks, the model's and the data's hashes, the data's length and purenn's version."""
    return {
        "format": _FORMAT,
        "purenn_version": __version__,
        "arguments": args,
        "world_size": world,
        "model_sha256": model_hash(model),
        "data_length": len(source),
        "data_sha256": data_hash(source),
    }


def _atomic_save(obj: Any, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _load(path: Path) -> Any:
    return torch.load(path, map_location="cpu", weights_only=True)


class Checkpoint:
    """A run's checkpoint folder (see the module docstring); used by :func:`purenn.purify_model`.

    Args:
        folder: the folder (created if missing).
        fingerprint: :func:`run_fingerprint` of this run; must equal the stored one if the folder
            already holds a run.
        rank: this process's rank (it writes ``collect.rank<rank>.pt``).

    Raises:
        ConfigError: the folder holds a run with another fingerprint, or is not a folder.
    """

    def __init__(self, folder: str | os.PathLike, fingerprint: Mapping[str, Any], *, rank: int = 0):
        self.folder = Path(folder)
        if self.folder.exists() and not self.folder.is_dir():
            raise ConfigError(f"checkpoint_dir {str(self.folder)!r} exists and is not a folder.")
        (self.folder / "relevance").mkdir(parents=True, exist_ok=True)
        self.rank = rank
        self.interval = float(os.environ.get("PURENN_CHECKPOINT_INTERVAL", "60"))
        self._last = time.monotonic()
        self._writes = {"collect": 0, "relevance": 0}
        kill = os.environ.get("PURENN_TEST_KILL_AFTER", "")
        self._kill = (kill.partition(":")[0], int(kill.partition(":")[2])) if kill else None
        manifest = self.folder / "run.json"
        fingerprint = dict(fingerprint)
        if manifest.exists():
            stored = json.loads(manifest.read_text())
            differ = sorted(k for k in set(stored) | set(fingerprint) if stored.get(k) != fingerprint.get(k))
            if differ:
                raise ConfigError(
                    f"checkpoint_dir {str(self.folder)!r} holds a run with other {', '.join(differ)}; resuming "
                    "needs the same arguments, model and data. Use a new folder, or delete this one to start over."
                )
        else:
            tmp = manifest.with_name(f".run.json.{uuid.uuid4().hex}.tmp")
            tmp.write_text(json.dumps(fingerprint, indent=1, sort_keys=True))
            os.replace(tmp, manifest)

    def _wrote(self, stage: str) -> None:
        self._writes[stage] += 1
        if self._kill is not None and self._kill == (stage, self._writes[stage]):
            os.kill(os.getpid(), signal.SIGKILL)

    # ------------------------------------------------------------------ reference pass
    def _collect_path(self) -> Path:
        return self.folder / f"collect.rank{self.rank}.pt"

    def load_collect(self) -> dict[str, Any] | None:
        """The saved pass of this rank: ``{"next": first unseen sample, "values": {layer: (k, C)},
        "indices": {layer: (k, C)}}``, or ``None``."""
        path = self._collect_path()
        return _load(path) if path.exists() else None

    def save_collect(self, next_sample: int, tops: Mapping[str, Any], *, done: bool = False) -> None:
        """Save the running top-``n`` tables (objects with ``values``/``indices``) after the samples
        before ``next_sample``; only when the interval has passed since the last write, or ``done``."""
        if not done and time.monotonic() - self._last < self.interval:
            return
        state = {
            "next": int(next_sample),
            "values": {k: t.values.cpu() for k, t in tops.items()},
            "indices": {k: t.indices.cpu() for k, t in tops.items()},
        }
        _atomic_save(state, self._collect_path())
        self._last = time.monotonic()
        self._wrote("collect")

    # ------------------------------------------------------------------ relevance stage
    def _chunk_path(self, key: int) -> Path:
        return self.folder / "relevance" / f"chunk{int(key)}.pt"

    def load_chunk(self, key: int) -> dict[str, Tensor] | None:
        """The saved circuits ``{layer: (pairs, C_U)}`` of chunk ``key``, or ``None``."""
        path = self._chunk_path(key)
        return _load(path) if path.exists() else None

    def save_chunk(self, key: int, rows: Mapping[str, Tensor]) -> None:
        """Save the circuits of finished chunk ``key``."""
        _atomic_save({k: v.detach().cpu() for k, v in rows.items()}, self._chunk_path(key))
        self._wrote("relevance")
