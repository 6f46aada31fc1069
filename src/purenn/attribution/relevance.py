"""Circuit relevance as plain forward ops, batched over (sample, neuron) pairs.

PURE's "gradient" rule is described here; zennit's LRP rules (:mod:`purenn.attribution.rules`) run through
the same :func:`segment_backward` with their own factors and modified weights.

For a neuron ``k`` of a target layer L and an upstream layer U, PURE starts a backward pass at L
with the initial gradient ``e_k * clamp(a_k, min=0)``, propagates it through the residual blocks
between U and L, multiplies the result by ``a_U`` and sums over space::

    R_i = sum_p a_U[i, p] * g_U[i, p],        r = R / (sum_i |R_i| + eps)

Here the backward pass is written out with forward operations only (BatchNorm folded into the
convolution weights, ``conv_transpose2d`` with the output padding taken from the forward shapes,
ReLU masks, the residual and downsample paths, grouped convolutions), so it runs without autograd
and traces into an ONNX graph. The first step from a one-hot channel is taken as the outer product
(or single-channel transposed convolution) it is, never as a dense transposed convolution.

Layout: a gradient tensor has shape ``(N, G, C, H, W)``: ``G`` neurons (static, so exported graphs
keep a dynamic batch axis) for each of ``N`` rows. Masks and upstream activations have shape
``(N, G or 1, C, H, W)``. Gating uses ``N = batch, G = neurons`` with masks shared across neurons;
fitting uses ``N = 1, G = pairs`` with masks gathered per pair. Both run :func:`segment_backward`,
so centroids are fitted on exactly the function the gate evaluates.

Example:
    >>> import torch, torchvision
    >>> model = torchvision.models.resnet18(num_classes=10).eval()
    >>> r = circuit_relevance(model, torch.rand(2, 3, 64, 64), layer="layer4", neurons=[0, 5])
    >>> r.shape
    torch.Size([2, 2, 256])
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from purenn.arch import Block, BlockRecord, ConvBN, ResNetSpec, input_conv
from purenn.attribution.rules import Rule, block_factors, get_rule
from purenn.common.checks import as_int, check_memory
from purenn.errors import ConfigError, DataError, LayerError

__all__ = [
    "joint_relevance",
    "EPS",
    "DEFAULT_MAX_MEMORY",
    "SegmentMasks",
    "segment_backward",
    "normalize_relevance",
    "grid_relevance",
    "iter_grid_relevance",
    "pair_relevance",
    "circuit_relevance",
    "has_identity_path",
]

EPS = 1e-12
DEFAULT_MAX_MEMORY = 512 * 2**20  # bytes of intermediate tensors per relevance chunk


@dataclass(eq=False)
class SegmentMasks:
    """Per-sample tensors of one block, each shaped ``(N, G or 1, C, H, W)``, that the backward pass
    multiplies in (from :func:`purenn.attribution.rules.block_factors`), and the spatial sizes the transposed
    convolutions must restore.

    ``main[i][j]`` multiplies what enters term ``j`` of main convolution ``i`` (the gradient rule:
    the ReLU mask after convolution ``i``, none for the last), ``skip[j]`` what enters the skip
    path at the residual sum, ``out`` the gradient arriving at the block output (the gradient rule:
    its ReLU mask; LRP rules: the block output, turning gradient-like values into relevance, folded
    into ``main[-1]`` and ``skip`` except in the target block), ``pool`` what the skip path's
    gradient-like values at the output of an average pooling in front of the downsample convolution
    are multiplied by before the pooling's backward step (LRP rules: zennit's ``Norm`` ratio; else
    ``None``). ``None`` stands for 1. ``attn`` is the attention's recorded state, which only the
    gradient rule reads (LRP rules hold the gate constant and leave it empty).
    """

    main: list[list[Tensor | None]]
    skip: list[Tensor | None]
    out: Tensor | None
    in_hw: tuple[int, int]
    act_hw: list[tuple[int, int]]
    attn: tuple[Tensor, ...] = ()  # the block attention's recorded state (purenn.arch.attention)
    pool: Tensor | None = None
    out_hw: tuple[int, int] | None = None  # the block output's size (the downsample input behind a pooling)

    def map(self, fn: Callable[[Tensor], Tensor]) -> SegmentMasks:
        """The same masks with ``fn`` applied to every tensor (adds or gathers the pair axis)."""
        return SegmentMasks(
            main=[[None if t is None else fn(t) for t in ts] for ts in self.main],
            skip=[None if t is None else fn(t) for t in self.skip],
            out=None if self.out is None else fn(self.out),
            in_hw=self.in_hw,
            act_hw=self.act_hw,
            attn=tuple(fn(t) for t in self.attn),
            pool=None if self.pool is None else fn(self.pool),
            out_hw=self.out_hw,
        )

    def tensors(self) -> list[Tensor]:
        every = (*(t for ts in self.main for t in ts), *self.skip, self.out, *self.attn, self.pool)
        return [t for t in every if t is not None]


def _hw(t: Tensor) -> tuple[int, int]:
    return int(t.shape[-2]), int(t.shape[-1])


def _conv_back(cb: ConvBN, g: Tensor, in_hw: tuple[int, int], weight: Tensor | None = None) -> Tensor:
    """Backward of conv+BN for a dense gradient ``(N, G, C_out, H, W)`` -> ``(N, G, C_in, H_in, W_in)``.

    ``weight`` replaces the folded weight (a rule's modified weight).

    A strided 1x1 convolution (a downsample path) runs as a 1x1 convolution at the output
    resolution followed by zero insertion, which CPU kernels compute about 1.4x faster than the
    equivalent strided ``conv_transpose2d``. In an ONNX export, stride-1 convolutions become
    ``Conv`` with the transposed, flipped weight, which ONNX Runtime runs faster than
    ``ConvTranspose``. Everything else is ``conv_transpose2d``.
    """
    conv = cb.conv
    n_groups = g.shape[1]
    x = g.reshape(-1, g.shape[2], g.shape[3], g.shape[4])
    w = cb.folded_weight() if weight is None else weight
    kh, kw = conv.kernel_size
    plain = conv.groups == 1 and conv.dilation == (1, 1) and not isinstance(conv.padding, str)
    exporting = torch.onnx.is_in_onnx_export()
    if exporting and plain and conv.stride == (1, 1) and conv.padding[0] < kh and conv.padding[1] < kw:
        # ONNX Runtime's Conv kernels are several times faster than its ConvTranspose
        wt = w.transpose(0, 1).flip(2, 3)
        out = F.conv2d(x, wt, None, 1, (kh - 1 - conv.padding[0], kw - 1 - conv.padding[1]))
    elif plain and (kh, kw) == (1, 1) and conv.stride != (1, 1) and conv.padding == (0, 0):
        out = _zero_insert(F.conv2d(x, w.transpose(0, 1).contiguous()), conv.stride, in_hw)
    else:
        out = F.conv_transpose2d(
            x, w, None, conv.stride, conv.padding, cb.output_padding(in_hw, _hw(g)), conv.groups, conv.dilation
        )
    return out.reshape(-1, n_groups, out.shape[1], out.shape[2], out.shape[3])


def _zero_insert(y: Tensor, stride: tuple[int, int], out_hw: tuple[int, int]) -> Tensor:
    """Place ``y[..., i, j]`` at ``[..., i * s_h, j * s_w]`` of a zero tensor of spatial size ``out_hw``."""
    n, c, h, w = y.shape
    sh, sw = stride
    if torch.onnx.is_in_onnx_export():  # ONNX Runtime concatenates zeros faster than it pads
        if sh > 1:
            y = torch.cat([y[:, :, :, None, :], y.new_zeros(n, c, h, sh - 1, w)], dim=3).reshape(n, c, h * sh, w)
        if sw > 1:
            z = y.new_zeros(n, c, y.shape[2], w, sw - 1)
            y = torch.cat([y[..., None], z], dim=4).reshape(n, c, y.shape[2], w * sw)
    else:
        if sh > 1:
            y = F.pad(y[:, :, :, None, :], (0, 0, 0, sh - 1)).reshape(n, c, h * sh, w)
        if sw > 1:
            y = F.pad(y[..., None], (0, sw - 1)).reshape(n, c, y.shape[2], w * sw)
    return y[:, :, : out_hw[0], : out_hw[1]]


def _onehot(neurons: Tensor, channels: int, dtype: torch.dtype) -> Tensor:
    return F.one_hot(neurons, channels).to(dtype)


def _conv_back_onehot(
    cb: ConvBN, a_sel: Tensor, neurons: Tensor, in_hw: tuple[int, int], weight: Tensor | None = None
) -> Tensor:
    """Backward of conv+BN for the one-hot gradient ``e_k * a_sel``: an outer product for a 1x1
    convolution, a single-channel transposed convolution per neuron otherwise."""
    conv = cb.conv
    if conv.groups != 1:
        dense = a_sel[:, :, None] * _onehot(neurons, conv.out_channels, a_sel.dtype)[None, :, :, None, None]
        return _conv_back(cb, dense, in_hw, weight)
    w = (cb.folded_weight() if weight is None else weight)[neurons]  # (G, C_in, kh, kw)
    if cb.is_pointwise:
        return a_sel[:, :, None] * w[None, :, :, 0, 0, None, None]
    n_groups = w.shape[0]
    out = F.conv_transpose2d(
        a_sel,
        w,
        None,
        conv.stride,
        conv.padding,
        cb.output_padding(in_hw, _hw(a_sel)),
        n_groups,
        conv.dilation,
    )
    return out.reshape(-1, n_groups, w.shape[1], out.shape[2], out.shape[3])


def _take(f: Tensor, neurons: Tensor) -> Tensor:
    """Channel ``neurons[g]`` of ``f`` ``(N, G or 1, C, H, W)`` for each neuron: ``(N, G, H, W)``
    (a 4-D ``f`` has been taken already)."""
    if f.ndim == 4:
        return f
    if f.shape[1] == 1:
        return f[:, 0, neurons]
    idx = neurons[None, :, None, None, None].expand(f.shape[0], -1, 1, f.shape[3], f.shape[4])
    return f.gather(2, idx)[:, :, 0]


def _rule_back(
    cb: ConvBN,
    weights: Sequence[Tensor],
    factors: Sequence[Tensor | None],
    g: Tensor,
    in_hw: tuple[int, int],
    onehot: Tensor | None = None,
) -> Tensor:
    """``sum_j conv_transpose(W_j, g * factor_j)``; with ``onehot`` (the neuron indices), ``g`` is the
    ``(N, G, H, W)`` map of channel ``onehot[g]`` and the factors are taken at that channel."""
    out = None
    for w, f in zip(weights, factors):
        if onehot is None:
            term = _conv_back(cb, g if f is None else g * f, in_hw, w)
        else:
            term = _conv_back_onehot(cb, g if f is None else g * _take(f, onehot), onehot, in_hw, w)
        out = term if out is None else out + term
    return out


def _rule_back_joint(
    cb: ConvBN,
    weights: Sequence[Tensor],
    factors: Sequence[Tensor | None],
    g_sel: Tensor,
    neurons: Tensor,
    in_hw: tuple[int, int],
) -> Tensor:
    """:func:`_rule_back` for a gradient that is zero outside the channels ``neurons``: ``g_sel``
    ``(N, G, M, H, W)`` holds those channels only, and each step reads only their rows of the weights
    (the transposed convolution of ``M`` channels instead of all ``C_out``). Needs ``groups == 1``."""
    out = None
    for w, f in zip(weights, factors):
        gf = g_sel if f is None else g_sel * f.index_select(2, neurons)
        term = _conv_back(cb, gf, in_hw, w.index_select(0, neurons))
        out = term if out is None else out + term
    return out


def _spread(g_sel: Tensor, neurons: Tensor, channels: int) -> Tensor:
    """``(N, G, M, H, W)`` maps of the channels ``neurons`` placed into ``(N, G, channels, H, W)`` (zeros
    elsewhere), as a product with a one-hot matrix (no index writes: it exports to ONNX as one MatMul)."""
    return torch.einsum("ngmhw,mc->ngchw", g_sel, _onehot(neurons, channels, g_sel.dtype))


def _attn_back_onehot(blk: Block, m: SegmentMasks, a_sel: Tensor, neurons: Tensor,
                      in_hw: tuple[int, int]) -> Tensor:
    """Backward of a block's channel attention and its last conv+BN for the one-hot gradient
    ``e_k * a_sel``: the direct term stays one-hot; the pooled path adds a spatially constant
    gradient on every channel, which a 1x1 convolution maps to a constant (a matrix product)."""
    direct, pooled = blk.attn.backward_onehot(a_sel, neurons, m.attn)
    cb = blk.main[-1]
    if cb.is_pointwise and cb.conv.groups == 1:
        const = torch.matmul(pooled, cb.folded_weight()[:, :, 0, 0])
        return _conv_back_onehot(cb, direct, neurons, in_hw) + const[..., None, None]
    dense = direct[:, :, None] * _onehot(neurons, blk.out_channels, a_sel.dtype)[None, :, :, None, None]
    return _conv_back(cb, dense + pooled[..., None, None], in_hw)


def segment_backward(
    blocks: Sequence[Block],
    masks: Sequence[SegmentMasks],
    a_sel: Tensor,
    neurons: Tensor,
    a_up: Tensor,
    rule: str | Rule = "gradient",
    joint: bool = False,
) -> Tensor:
    """Raw circuit relevance ``R`` of the upstream channels, shape ``(N, G, C_U)``.

    The pass carries a gradient-like tensor ``g`` whose product with an activation is relevance;
    for the gradient rule ``g`` is the gradient and the masks are the ReLU masks, for an LRP rule
    the masks are the rule's stabilised ratios (:mod:`purenn.attribution.rules`), and a channel attention's gate
    is a constant whose factor the masks hold (only the gradient differentiates through the gate).

    Args:
        blocks: the residual blocks from the upstream layer (exclusive) to the target (inclusive).
        masks: one :class:`SegmentMasks` per block, built for ``rule``.
        a_sel: ``(N, G, H, W)``, the selected neurons' activation maps at the target, clamped at 0;
            with ``joint``, ``(N, 1, M, H, W)``: the maps of the ``M`` channels ``neurons`` of one unit.
        neurons: ``(G,)`` channel index of each of the ``G`` neurons (with ``joint``: the unit's ``M``
            channels).
        a_up: ``(N, G or 1, C_U, H_U, W_U)`` upstream activations.
        rule: the relevance rule the masks were built for.
        joint: one unit made of all of ``neurons`` (``sum_k e_k * a_k``) instead of one unit per neuron;
            its first step reads only those channels' weights.
    """
    rule = get_rule(rule)
    g = None
    last = len(blocks) - 1
    for bi in range(last, -1, -1):
        blk, m = blocks[bi], masks[bi]
        n_main = len(blk.main)
        top_in_hw = m.act_hw[-1]
        w_last = rule.conv_weights(blk.main[-1])
        # a downsample behind a pooling (timm's avg_down) convolves at the output resolution
        ds_hw = m.in_hw if blk.down_pool is None else m.out_hw
        # LRP rules hold an attention's gate constant ("signal takes all"): its factor is in the masks
        attn = None if rule.is_lrp else blk.attn
        if bi == last and joint:  # one unit of several channels: only their weights are read
            if attn is None and blk.main[-1].conv.groups == 1:
                gm = _rule_back_joint(blk.main[-1], w_last, m.main[-1], a_sel, neurons, top_in_hw)
            else:  # a channel attention's pooled path (or a grouped conv) mixes every channel: go dense
                dense = _spread(a_sel, neurons, blk.out_channels)
                gs = dense if attn is None else attn.backward(dense, m.attn)
                gm = _rule_back(blk.main[-1], w_last, m.main[-1], gs, top_in_hw)
            if blk.downsample is None:
                f = m.skip[0]
                skip = _spread(a_sel if f is None else a_sel * f.index_select(2, neurons), neurons, blk.out_channels)
            elif blk.downsample.conv.groups == 1:
                skip = _rule_back_joint(blk.downsample, rule.conv_weights(blk.downsample), m.skip, a_sel, neurons,
                                        ds_hw)
            else:
                skip = _rule_back(blk.downsample, rule.conv_weights(blk.downsample), m.skip,
                                  _spread(a_sel, neurons, blk.out_channels), ds_hw)
        elif bi == last:
            # the relevance (gradient) at the pre-ReLU sum is e_k * a_k (a_k = relu(.) carries its own mask)
            if attn is None:
                gm = _rule_back(blk.main[-1], w_last, m.main[-1], a_sel, top_in_hw, onehot=neurons)
            else:  # channel attention (purenn.arch.attention): its pooled path reaches every channel
                gm = _attn_back_onehot(blk, m, a_sel, neurons, top_in_hw)
            if blk.downsample is None:
                f = m.skip[0]
                s_sel = a_sel if f is None else a_sel * _take(f, neurons)
                skip = s_sel[:, :, None] * _onehot(neurons, blk.out_channels, a_sel.dtype)[None, :, :, None, None]
            else:
                w_ds = rule.conv_weights(blk.downsample)
                skip = _rule_back(blk.downsample, w_ds, m.skip, a_sel, ds_hw, onehot=neurons)
        else:
            gs = g if m.out is None else g * m.out
            gm = _rule_back(blk.main[-1], w_last, m.main[-1], gs if attn is None else attn.backward(gs, m.attn),
                            top_in_hw)
            if blk.downsample is None:
                skip = gs if m.skip[0] is None else gs * m.skip[0]
            else:
                skip = _rule_back(blk.downsample, rule.conv_weights(blk.downsample), m.skip, gs, ds_hw)
        if blk.down_pool is not None:
            skip = blk.down_pool.backward(skip if m.pool is None else skip * m.pool, m.in_hw)
        for i in range(n_main - 2, -1, -1):
            cb = blk.main[i]
            gm = _rule_back(cb, rule.conv_weights(cb), m.main[i], gm, m.in_hw if i == 0 else m.act_hw[i - 1])
        g = gm + skip
    return (g * a_up).sum(dim=(-2, -1))


def joint_relevance(
    blocks: Sequence[Block],
    recs: Sequence[BlockRecord],
    a_up: Tensor,
    a_target: Tensor,
    neurons: Tensor,
    rule: str | Rule = "gradient",
) -> Tensor:
    """Raw circuit relevance ``(B, C_U)`` of the *joint unit* of ``neurons``: one backward pass from
    ``sum_k e_k * clamp(a_k, min=0)`` over the neurons together.

    Every rule's backward step is linear in the relevance it carries (the masks and ratios come from
    the forward pass), so this equals the sum of the neurons' own circuits (:func:`grid_relevance`
    summed over its neuron axis) at the cost of one neuron's.

    Example:
        >>> import torch, torchvision
        >>> from purenn.arch import ResNetSpec
        >>> spec = ResNetSpec(torchvision.models.resnet18().eval())
        >>> acts, recs = spec.run_until(torch.rand(2, 3, 64, 64), {7, 8}, {8})
        >>> ks = torch.tensor([3, 9])
        >>> joint = joint_relevance(spec.segment(7, 8), [recs[8]], acts[7], acts[8], ks)
        >>> each = grid_relevance(spec.segment(7, 8), [recs[8]], acts[7], acts[8], ks)
        >>> joint.shape, torch.allclose(joint, each.sum(dim=1), rtol=1e-4, atol=1e-5)
        (torch.Size([2, 512]), True)
    """
    rule = get_rule(rule)
    masks = [m.map(lambda t: t[:, None]) for m in block_masks(blocks, recs, rule, a_up.dtype)]
    a_sel = a_target.index_select(1, neurons).clamp(min=0)[:, None]  # (B, 1, M, H, W)
    return segment_backward(blocks, masks, a_sel, neurons, a_up[:, None], rule, joint=True)[:, 0]


def normalize_relevance(r: Tensor, neurons: Tensor | None = None, drop_self: bool = False, eps: float = EPS) -> Tensor:
    """L1-normalise raw relevance over its last axis: ``r / (sum |r| + eps)``.

    With ``drop_self``, the upstream channel with the neuron's own index (the one the identity skip
    carries straight through) is zeroed first; ``neurons`` gives the index for each entry of the
    second-to-last axis. An all-zero row stays all-zero (no NaN).
    """
    if drop_self:
        if neurons is None:
            raise ConfigError("drop_self=True needs the neuron indices.")
        r = r * (1 - _onehot(neurons, r.shape[-1], r.dtype))
    return r / (r.abs().sum(dim=-1, keepdim=True) + eps)


def has_identity_path(blocks: Sequence[Block]) -> bool:
    """True when an identity skip connects upstream channel k to target channel k."""
    return all(b.downsample is None for b in blocks)


def block_masks(
    blocks: Sequence[Block],
    recs: Sequence[BlockRecord],
    rule: str | Rule = "gradient",
    dtype: torch.dtype | None = None,
) -> list[SegmentMasks]:
    """The :class:`SegmentMasks` of a segment for a batch, tensors shaped ``(B, C, H, W)`` (no pair
    axis yet), computed once from the recorded forward pass."""
    rule = get_rule(rule)
    out = []
    for i, (blk, r) in enumerate(zip(blocks, recs)):
        f = block_factors(rule, blk, r, r.inp.dtype if dtype is None else dtype, top=i == len(blocks) - 1)
        attn = () if rule.is_lrp else tuple(r.attn)  # an LRP rule's gate is constant: its state is not read
        out.append(SegmentMasks(f["main"], f["skip"], f["out"], _hw(r.inp), [_hw(a) for a in r.acts], attn,
                                f["pool"], _hw(r.out)))
    return out


def _pair_bytes(masks: Sequence[SegmentMasks], recs: Sequence[BlockRecord], a_up: Tensor) -> int:
    """Bytes per (sample, neuron) pair: gathered masks plus a few gradient buffers."""
    elems = [a_up[0].numel()]
    for m, r in zip(masks, recs):
        elems += [r.inp[0].numel(), *(t[0].numel() for t in m.tensors())]
    return a_up.element_size() * (sum(elems) + 4 * max(elems))


def _chunk(total_bytes_per_item: int, max_memory: int, n: int) -> int:
    """Items per chunk: within ``max_memory``, with the ``n`` items split into chunks of equal size."""
    limit = max(1, int(max_memory // max(1, total_bytes_per_item)))
    n_chunks = -(-max(1, n) // limit)
    return -(-max(1, n) // n_chunks)


def iter_grid_relevance(
    blocks: Sequence[Block],
    recs: Sequence[BlockRecord],
    a_up: Tensor,
    a_target: Tensor,
    neurons: Tensor,
    max_memory: int = DEFAULT_MAX_MEMORY,
    rule: str | Rule = "gradient",
) -> Iterator[tuple[int, int, Tensor]]:
    """Yield ``(start, stop, raw)`` with raw relevance ``(B, stop - start, C_U)`` for neuron chunks.

    Chunks hold as many neurons as keep ``B * chunk`` pairs within ``max_memory`` bytes; the
    boundaries depend only on static sizes, so the loop unrolls in an exported graph.
    """
    rule = get_rule(rule)
    flat = block_masks(blocks, recs, rule, a_up.dtype)
    masks = [m.map(lambda t: t[:, None]) for m in flat]
    a_up5 = a_up[:, None]
    n = int(neurons.shape[0])
    chunk = _chunk(_pair_bytes(flat, recs, a_up) * max(1, int(a_up.shape[0])), max_memory, n)
    for s in range(0, n, chunk):
        nk = neurons[s : s + chunk]
        a_sel = a_target[:, nk].clamp(min=0)
        yield s, min(n, s + chunk), segment_backward(blocks, masks, a_sel, nk, a_up5, rule)


def grid_relevance(
    blocks: Sequence[Block],
    recs: Sequence[BlockRecord],
    a_up: Tensor,
    a_target: Tensor,
    neurons: Tensor,
    max_memory: int = DEFAULT_MAX_MEMORY,
    rule: str | Rule = "gradient",
) -> Tensor:
    """Raw relevance for every (sample, neuron) pair of a batch: ``(B, K, C_U)``."""
    out = [r for _, _, r in iter_grid_relevance(blocks, recs, a_up, a_target, neurons, max_memory, rule)]
    return out[0] if len(out) == 1 else torch.cat(out, dim=1)


def pair_relevance(
    blocks: Sequence[Block],
    recs: Sequence[BlockRecord],
    a_up: Tensor,
    a_target: Tensor,
    sample_idx: Tensor,
    neuron_idx: Tensor,
    max_memory: int = DEFAULT_MAX_MEMORY,
    rule: str | Rule = "gradient",
) -> Tensor:
    """Raw relevance for arbitrary (sample, neuron) pairs of one batch: ``(P, C_U)``.

    ``sample_idx`` indexes the batch dimension of ``a_up``/``a_target``/``recs``.
    """
    rule = get_rule(rule)
    n = int(sample_idx.shape[0])
    # masks once per batch, gathered per pair below
    flat = block_masks(blocks, recs, rule, a_up.dtype)
    chunk = _chunk(_pair_bytes(flat, recs, a_up), max_memory, n)
    out = []
    for s in range(0, n, chunk):
        si, ni = sample_idx[s : s + chunk], neuron_idx[s : s + chunk]
        masks = [m.map(lambda t, si=si: t[si][None]) for m in flat[:-1]]
        top = flat[-1]  # the target block's sum factors are only read at each pair's own channel
        masks.append(
            SegmentMasks(
                main=[*([None if t is None else t[si][None] for t in ts] for ts in top.main[:-1]),
                      [None if t is None else t[si, ni][None] for t in top.main[-1]]],
                skip=[None if t is None else t[si, ni][None] for t in top.skip],
                out=None if top.out is None else top.out[si][None],
                in_hw=top.in_hw,
                act_hw=top.act_hw,
                attn=tuple(t[si][None] for t in top.attn),
                pool=None if top.pool is None else top.pool[si][None],
                out_hw=top.out_hw,
            )
        )
        a_sel = a_target[si, ni].clamp(min=0)[None]
        out.append(segment_backward(blocks, masks, a_sel, ni, a_up[si][None], rule)[0])
    return torch.cat(out, dim=0)


def resolve_neurons(neurons: Sequence[int] | Tensor | None, channels: int, layer: str) -> list[int]:
    """Validate a neuron list: non-empty, integer, in range, no duplicates; returned sorted."""
    if neurons is None:
        return list(range(channels))
    if isinstance(neurons, (Tensor, np.ndarray)):
        neurons = neurons.tolist()
    if isinstance(neurons, (int, str)) or not isinstance(neurons, Sequence):
        raise ConfigError(f"neurons for {layer!r} must be a list of channel indices, got {neurons!r}.")
    if len(neurons) == 0:
        raise ConfigError(f"the neuron list for {layer!r} is empty; pass at least one channel index or None for all.")
    out = []
    for item in neurons:
        n = as_int(item)
        if n is None:
            raise ConfigError(f"neuron indices must be integers, got {item!r} for {layer!r}.")
        if not 0 <= n < channels:
            raise ConfigError(f"channel {n} is out of range for {layer!r}, which has channels 0..{channels - 1}.")
        out.append(n)
    if len(set(out)) != len(out):
        raise ConfigError(f"the neuron list for {layer!r} has duplicates: {sorted(out)}.")
    return sorted(out)


def compute_dtype(model: nn.Module) -> torch.dtype:
    """The dtype purenn computes a model in: its own, except float32 for float16 and bfloat16 models
    (k-means and the normalised circuits need the range and precision; such models are computed on a
    private float32 copy)."""
    p = next(model.parameters(), None)
    dtype = p.dtype if p is not None else torch.float32
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def check_input(x: object, name: str = "x", like: Tensor | None = None, channels: int | None = None) -> Tensor:
    """A 4-D floating-point image batch without NaN or inf, else a :class:`DataError`.

    With ``like`` (a tensor of the model), a floating-point batch of another dtype is converted to
    ``like``'s dtype (float16 images for a float32 model, ...), and a batch on another device is
    refused. Integer images (uint8, ...) and PIL images are refused with a message saying what to
    pass, since only the caller knows the model's normalisation. With ``channels``, a batch with
    another number of channels is refused.
    """
    if not isinstance(x, Tensor):
        if type(x).__module__.split(".")[0] == "PIL" or (
            isinstance(x, (list, tuple)) and x and type(x[0]).__module__.split(".")[0] == "PIL"
        ):
            raise DataError(
                f"{name} is a PIL image (or a list of them); pass a float tensor (B, C, H, W) prepared as for the "
                "model, e.g. torch.stack([Normalize(mean, std)(to_tensor(im)) for im in images])."
            )
        raise DataError(f"{name} must be a torch.Tensor of shape (B, C, H, W), got {type(x).__name__}.")
    if x.ndim != 4:
        raise DataError(f"{name} must have shape (B, C, H, W), got shape {tuple(x.shape)}.")
    if not x.is_floating_point():
        raise DataError(
            f"{name} must be a floating-point tensor, got dtype {x.dtype}; convert images prepared as for the "
            f"model, e.g. {name}.float() / 255 followed by the model's normalisation."
        )
    if channels is not None and x.shape[1] != channels:
        raise DataError(f"{name} has {x.shape[1]} channels but the model's first convolution takes {channels}.")
    if like is not None:
        if x.device != like.device:
            raise DataError(f"{name} is on {x.device} but the model is on {like.device}; move it with "
                            f"{name}.to({str(like.device)!r}).")
        if x.dtype != like.dtype:
            x = x.to(like.dtype)
    if not bool(torch.isfinite(x).all()):
        raise DataError(f"{name} contains NaN or infinite values; clean or impute the inputs first.")
    return x


def circuit_relevance(
    model: nn.Module,
    x: Tensor,
    layer: str = "layer4",
    neurons: Sequence[int] | None = None,
    upstream: str | None = None,
    *,
    skip_aware: bool = False,
    max_memory: int = DEFAULT_MAX_MEMORY,
    rule: str | Rule | None = None,
) -> Tensor:
    """Normalised circuit relevance ``(B, K, C_U)`` of neurons of ``layer`` on upstream channels.

    Args:
        model: a torchvision or timm ResNet, or a :class:`~purenn.PurifiedModel` (its base model is used;
            for a purified layer its upstream and ``skip_aware`` setting are the defaults). A
            float16 or bfloat16 model is computed in float32 on a private copy (the result is float32).
        x: input batch ``(B, C, H, W)``, floating point (converted to the model's dtype); an empty
            batch gives an empty result ``(0, K, C_U)``.
        layer: target layer, e.g. ``"layer4"`` or ``"layer3.1"``.
        neurons: channel indices (sorted ascending in the output); ``None`` for all channels.
        upstream: upstream layer; default: previous stage (for a stage) or block (for a block).
        skip_aware: zero the upstream channel with the neuron's own index before normalising (the
            quantity a skip-aware gate clusters); ``False`` gives PURE's relevance unchanged.
        max_memory: bytes of intermediate tensors per chunk of (sample, neuron) pairs.
        rule: relevance rule, a name in :data:`purenn.attribution.rules.RULES` (``"gradient"``, PURE's;
            ``"epsilon"``, ``"zplus"``, ``"alpha2beta1"``, ``"gamma"``: zennit's LRP rules) or a
            :class:`purenn.attribution.rules.Rule`; default: the purified layer's rule, else ``"gradient"``.

    Returns:
        ``r`` with ``r[b, j]`` the relevance vector of neuron ``sorted(neurons)[j]`` on sample ``b``.

    Example:
        >>> import torch, torchvision
        >>> m = torchvision.models.resnet18(num_classes=3).eval()
        >>> circuit_relevance(m, torch.rand(1, 3, 32, 32), "layer3.1", [1, 2]).shape
        torch.Size([1, 2, 256])
    """
    if hasattr(model, "pure_layer") and hasattr(model, "base_model"):
        pl = model.pure_layer(layer) if layer in model.layers else None
        if pl is not None and upstream is None:
            upstream = pl.upstream
        if pl is not None and rule is None:
            rule = pl.rule
        model = model.base_model
    rule = get_rule("gradient" if rule is None else rule)
    spec = ResNetSpec(model)
    weight = next(model.parameters())
    if compute_dtype(model) != weight.dtype:  # a half-precision model: computed in float32 on a private copy
        from purenn.arch.core import copy_module

        model = copy_module(model, lambda t: t.float() if t.is_floating_point() else t)
        spec = ResNetSpec(model)
        weight = next(model.parameters())
    x = check_input(x, like=weight, channels=input_conv(model).in_channels)
    pos_l = spec.position(layer)
    up_name = upstream if upstream is not None else spec.default_upstream(layer)
    pos_u = spec.position(up_name)
    if pos_u >= pos_l:
        raise LayerError(f"upstream {up_name!r} is not before {layer!r}; pick an earlier stage or block output.")
    max_memory = check_memory("max_memory", max_memory)
    blocks = spec.segment(pos_u, pos_l)
    idx = resolve_neurons(neurons, spec.channels(pos_l), layer)
    if skip_aware and not has_identity_path(blocks):
        raise ConfigError(
            f"skip_aware=True needs an identity skip from {up_name!r} to {layer!r}, but a block in between "
            "has a downsample path."
        )
    if x.shape[0] == 0:  # an empty batch: an empty result of the right shape
        return x.new_zeros((0, len(idx), spec.channels(pos_u)))
    with torch.no_grad():
        acts, recs = spec.run_until(x, {pos_u, pos_l}, set(range(pos_u + 1, pos_l + 1)))
        nt = torch.tensor(idx, dtype=torch.long, device=x.device)
        seg_recs = [recs[j] for j in range(pos_u + 1, pos_l + 1)]
        raw = grid_relevance(blocks, seg_recs, acts[pos_u], acts[pos_l], nt, max_memory, rule)
        return normalize_relevance(raw, nt, drop_self=skip_aware)
