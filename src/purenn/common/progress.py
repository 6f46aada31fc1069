"""Progress bars of the fitting stages: throughput (images/s, pairs/s) and time left, rank 0 only.

Each stage of :func:`purenn.purify_model` shows one `tqdm <https://tqdm.github.io>`_ bar with its
rate in its own unit and tqdm's estimate of the remaining time. Under torch.distributed only rank 0
draws, and its bar counts rank 0's share (ranks get equal shares, so it tracks the whole run).

Example:
    >>> bar = stage_bar("collect references", 100, "img", enabled=False)
    >>> bar.update(10); bar.close()
"""

from __future__ import annotations

from tqdm.auto import tqdm

__all__ = ["stage_bar"]


def stage_bar(desc: str, total: int, unit: str, enabled: bool, *, world: int = 1) -> tqdm:
    """A bar for one stage: ``total`` items of ``unit`` (``"img"``, ``"pair"``, ``"neuron"``).

    ``enabled=False`` gives a silent bar with the same interface. With ``world > 1`` the
    description says that the bar counts rank 0's share.
    """
    if world > 1:
        desc = f"{desc} (rank 0 of {world})"
    return tqdm(total=total, desc=desc, unit=unit, unit_scale=False, disable=not enabled, leave=False,
                dynamic_ncols=True, smoothing=0.1)
