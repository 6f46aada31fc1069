"""Forward-only gate features at the reference samples (``"activation"``, ``"upstream"``, ``"map"``),
for fitting: each distinct reference sample is run forward once. The features themselves are
:func:`purenn.model.gates.gate_features`, the same function the gate evaluates.
"""

from __future__ import annotations

import torch
from torch import Tensor
from tqdm.auto import tqdm

from purenn.arch import ResNetSpec
from purenn.fit.collect import References
from purenn.fit.data import DataSource
from purenn.model.gates import gate_features

__all__ = ["fit_gate_features"]


def fit_gate_features(
    spec: ResNetSpec,
    source: DataSource,
    gate: str,
    layer_position: int,
    up_position: int,
    neurons: list[int],
    refs: References,
    *,
    batch_size: int,
    device: torch.device | None,
    progress: bool = False,
) -> Tensor:
    """Forward-only gate features ``(K, n_refs, D)`` of ``neurons`` on their reference samples.

    Each distinct reference sample is run forward once.
    """
    ref_idx = refs.indices[neurons]  # (K, n)
    ids, inv = torch.unique(ref_idx.flatten(), return_inverse=True)
    inv = inv.reshape(ref_idx.shape)
    nt = torch.tensor(neurons, dtype=torch.long)
    out: Tensor | None = None
    shared: list[Tensor] = []
    bar = tqdm(total=len(ids), desc=f"{gate} features", unit="img", disable=not progress, leave=False)
    with torch.no_grad():
        for s in range(0, len(ids), batch_size):
            x = source.fetch(ids[s : s + batch_size])
            x = x.to(device) if device is not None else x
            acts, _ = spec.run_until(x, {layer_position, up_position})
            f = gate_features(gate, acts[up_position], acts[layer_position], nt.to(x.device)).cpu()
            if f.ndim == 2:
                shared.append(f)
            else:
                if out is None:
                    out = torch.zeros(*ref_idx.shape, f.shape[-1], dtype=f.dtype)
                kk, jj = torch.nonzero((inv >= s) & (inv < s + len(x)), as_tuple=True)
                out[kk, jj] = f[inv[kk, jj] - s, kk]
            bar.update(len(x))
    bar.close()
    if shared:
        return torch.cat(shared)[inv]
    return out
