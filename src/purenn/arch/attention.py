"""Channel attention and pooled downsample paths: their forward with a record, and their exact
backward step in plain forward ops (no autograd, so it traces into ONNX).

A channel attention rescales a block's main path before the residual sum::

    y = z * s,    s = sigmoid(u),    u = f(m),    m[c] = mean_p z[c, p]

with ``f`` two 1x1 convolutions around a ReLU (:class:`SqueezeExcite`, SE) or a 1-D convolution
across channels (:class:`EfficientChannelAttention`, ECA). The gate ``s`` depends on ``z`` itself, so
the gradient has two terms, and the backward step keeps both::

    dL/dz[c, p] = g[c, p] * s[c]  +  (1 / HW) * (J_f^T (sum_p g * z) * s * (1 - s))[c]

(``g = dL/dy``): the direct term through the multiplication, and the term through the pooled path
(the spatial mean, ``f`` and the sigmoid), which reaches every channel. The forward records ``z``,
``s`` and the ReLU state of ``f`` per sample; :func:`purenn.attribution.relevance.segment_backward` calls
:meth:`backward` with them laid out like its ReLU masks, ``(N, G or 1, ...)``.

:class:`AvgPoolDown` is the average pooling in front of timm's ``avg_down`` downsample convolution
(kernel = stride, no padding; ``ceil_mode`` windows at odd sizes average only what they cover).

Example:
    >>> import torch
    >>> from torch import nn
    >>> se = SqueezeExcite(nn.Conv2d(8, 2, 1), nn.ReLU(), nn.Conv2d(2, 8, 1), nn.Sigmoid())
    >>> z = torch.rand(3, 8, 5, 5)
    >>> y, state = se.forward(z)
    >>> g = se.backward(torch.ones(3, 1, 8, 5, 5), tuple(t[:, None] for t in state))
    >>> g.shape
    torch.Size([3, 1, 8, 5, 5])
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["SqueezeExcite", "EfficientChannelAttention", "AvgPoolDown", "gate_backward"]


def gate_backward(g: Tensor, z: Tensor, s: Tensor) -> tuple[Tensor, Tensor]:
    """The two pieces of ``y = z * s`` with a per-channel sigmoid gate ``s`` (shape ``(..., C)``):
    the direct term ``g * s`` and ``dL/du = (sum_p g * z) * s * (1 - s)`` (shape ``(..., C)``),
    the gradient at the gate's pre-activation."""
    direct = g * s[..., None, None]
    du = (g * z).sum(dim=(-2, -1)) * (s * (1 - s))
    return direct, du


def _select(t: Tensor, neurons: Tensor) -> Tensor:
    """``t[n, g, neurons[g]]`` of ``t`` shaped ``(N, G or 1, C, ...)``: ``(N, G, ...)``."""
    n, g = t.shape[0], neurons.shape[0]
    idx = neurons.reshape(1, g, 1, *([1] * (t.ndim - 3))).expand(n, g, 1, *t.shape[3:])
    return t.expand(n, g, *t.shape[2:]).gather(2, idx)[:, :, 0]


def _onehot_pieces(a_sel: Tensor, neurons: Tensor, z: Tensor, s: Tensor) -> tuple[Tensor, Tensor]:
    """For ``g = e_k * a_sel`` (one channel per neuron): the direct term's map ``a_sel * s_k``
    ``(N, G, H, W)`` and ``dL/du_k`` ``(N, G)``."""
    s_k = _select(s, neurons)
    du_k = (a_sel * _select(z, neurons)).sum(dim=(-2, -1)) * (s_k * (1 - s_k))
    return a_sel * s_k[..., None, None], du_k


def _spread(direct: Tensor, dm: Tensor) -> Tensor:
    """``direct + dm / HW`` broadcast over space: the gradient through the spatial mean."""
    hw = direct.shape[-2] * direct.shape[-1]
    return direct + (dm / hw)[..., None, None]


@dataclass(frozen=True, eq=False)
class SqueezeExcite:
    """Squeeze-and-excitation: ``u = fc2(relu(fc1(mean(z))))`` (1x1 convolutions with bias),
    ``y = z * gate(u)`` with a sigmoid gate. The modules are the model's own."""

    fc1: nn.Conv2d
    act: nn.Module
    fc2: nn.Conv2d
    gate: nn.Module

    def forward(self, z: Tensor) -> tuple[Tensor, tuple[Tensor, ...]]:
        """``(y, state)`` with state ``(z, s, hidden)``: ``s`` the gate ``(B, C)``, ``hidden`` the
        ReLU output of the squeeze ``(B, R)``."""
        hidden = self.act(self.fc1(z.mean((2, 3), keepdim=True)))
        s = self.gate(self.fc2(hidden))
        return z * s, (z, s[:, :, 0, 0], hidden[:, :, 0, 0])

    def backward(self, g: Tensor, state: tuple[Tensor, ...]) -> Tensor:
        """``dL/dz`` from ``g = dL/dy`` (``(N, G, C, H, W)``), state laid out ``(N, G or 1, ...)``."""
        z, s, hidden = state
        direct, du = gate_backward(g, z, s)
        w2 = self.fc2.weight[:, :, 0, 0]  # (C, R)
        w1 = self.fc1.weight[:, :, 0, 0]  # (R, C)
        dh = torch.matmul(du, w2) * (hidden > 0).to(du.dtype)
        return _spread(direct, torch.matmul(dh, w1))

    def backward_onehot(self, a_sel: Tensor, neurons: Tensor, state: tuple[Tensor, ...]) -> tuple[Tensor, Tensor]:
        """The backward step from ``g = e_k * a_sel`` (``(N, G, H, W)``, neuron ``k = neurons[g]``):
        ``dL/dz = e_k * direct + pooled`` with ``direct`` ``(N, G, H, W)`` and the spatially
        constant ``pooled`` ``(N, G, C)``, returned as ``(direct, pooled)``."""
        z, s, hidden = state
        direct, du_k = _onehot_pieces(a_sel, neurons, z, s)
        w2 = self.fc2.weight[:, :, 0, 0][neurons]  # (G, R): row k of fc2
        dh = du_k[..., None] * w2 * (hidden > 0).to(du_k.dtype)
        return direct, torch.matmul(dh, self.fc1.weight[:, :, 0, 0]) / (a_sel.shape[-2] * a_sel.shape[-1])


@dataclass(frozen=True, eq=False)
class EfficientChannelAttention:
    """ECA: ``u = conv1d(mean(z))`` across channels (one filter, zero padding, no bias),
    ``y = z * gate(u)`` with a sigmoid gate."""

    conv: nn.Conv1d
    gate: nn.Module

    def forward(self, z: Tensor) -> tuple[Tensor, tuple[Tensor, ...]]:
        """``(y, state)`` with state ``(z, s)``, ``s`` the gate ``(B, C)``."""
        b = z.shape[0]
        u = self.conv(z.mean((2, 3)).view(b, 1, -1))
        s = self.gate(u).view(b, -1, 1, 1)
        return z * s.expand_as(z), (z, s[:, :, 0, 0])

    def backward(self, g: Tensor, state: tuple[Tensor, ...]) -> Tensor:
        """``dL/dz`` from ``g = dL/dy`` (``(N, G, C, H, W)``), state laid out ``(N, G or 1, ...)``."""
        z, s = state
        direct, du = gate_backward(g, z, s)
        c = du.shape[-1]
        k, p = self.conv.kernel_size[0], self.conv.padding[0]
        # the transposed 1-D convolution, as a convolution with the flipped filter
        dm = F.conv1d(du.reshape(-1, 1, c), self.conv.weight.flip(-1), None, 1, k - 1 - p)
        return _spread(direct, dm.reshape(du.shape))

    def backward_onehot(self, a_sel: Tensor, neurons: Tensor, state: tuple[Tensor, ...]) -> tuple[Tensor, Tensor]:
        """As :meth:`SqueezeExcite.backward_onehot`: ``(direct, pooled)``."""
        z, s = state
        direct, du_k = _onehot_pieces(a_sel, neurons, z, s)
        c = z.shape[2]
        du = du_k[..., None] * F.one_hot(neurons, c).to(du_k.dtype)
        k, p = self.conv.kernel_size[0], self.conv.padding[0]
        dm = F.conv1d(du.reshape(-1, 1, c), self.conv.weight.flip(-1), None, 1, k - 1 - p).reshape(du.shape)
        return direct, dm / (a_sel.shape[-2] * a_sel.shape[-1])


@dataclass(frozen=True, eq=False)
class AvgPoolDown:
    """The average pooling in front of a downsample convolution: kernel = stride, no padding."""

    pool: nn.AvgPool2d

    @property
    def stride(self) -> tuple[int, int]:
        s = self.pool.stride
        return (s, s) if isinstance(s, int) else (int(s[0]), int(s[1]))

    def forward(self, x: Tensor) -> Tensor:
        return self.pool(x)

    def backward(self, g: Tensor, in_hw: tuple[int, int]) -> Tensor:
        """Spread each output gradient ``(..., Ho, Wo)`` evenly over its window of the input
        ``(..., *in_hw)``; a window cut by the border (``ceil_mode``) divides by what it covers."""
        (sh, sw), (h, w) = self.stride, in_hw
        ho, wo = int(g.shape[-2]), int(g.shape[-1])
        rows = [min(sh, h - i * sh) for i in range(ho)]
        cols = [min(sw, w - j * sw) for j in range(wo)]
        if len(set(rows)) == 1 and len(set(cols)) == 1:
            g = g / float(rows[0] * cols[0])
        else:
            count = torch.tensor(rows, dtype=g.dtype, device=g.device)[:, None] * torch.tensor(
                cols, dtype=g.dtype, device=g.device)[None, :]
            g = g / count
        lead = g.shape[:-2]
        up = g[..., :, None, :, None].expand(*lead, ho, sh, wo, sw).reshape(*lead, ho * sh, wo * sw)
        up = up[..., :h, :w]
        if up.shape[-2] < h or up.shape[-1] < w:  # floor mode: the last rows/columns are not pooled
            up = F.pad(up, (0, w - up.shape[-1], 0, h - up.shape[-2]))
        return up
