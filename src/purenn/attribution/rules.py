"""Relevance rules: PURE's gradient and zennit's LRP rules, each as its backward step in plain ops.

A rule says how relevance crosses a convolution (BatchNorm merged into it) and the residual sum
of a block. :func:`purenn.attribution.relevance.segment_backward` runs the same loop for every rule; a rule
only supplies, per convolution, its *terms*: pairs ``(weight W_j, factor d_j)`` such that the
relevance at the convolution's input is ::

    R_in = x * sum_j conv_transpose(W_j, R_out * d_j)

where ``x`` is the convolution's input and ``d_j`` (shape of the output, one per sample) comes
from the one forward pass. zennit's rules have exactly this form (``BasicHook``: modified
inputs, parameters and a stabilised division, reduced as input x gradient). Inside a ResNet
segment every convolution input is a ReLU output, hence non-negative, so the terms of zennit's
rules that act on the negative part of the input vanish and are left out.

The residual sum ``z = main + skip`` splits relevance in proportion to its inputs, as zennit's
``Norm`` rule on the ``Sum`` module of its ``ResNetCanonizer`` does:
``R_main = main * R / stab(z)``, ``R_skip = skip * R / stab(z)``. ReLUs pass relevance unchanged
(zennit's ``Pass``). The gradient rule is the special case without stabilised division: its
factors are the ReLU masks and the circuit is gradient x activation.

timm blocks (:mod:`purenn.arch.timm`) add two steps. The average pooling in front of a ``-d``
model's downsample convolution (``AvgPool2d``, kernel = stride 2, ``ceil_mode``, border windows
averaging what they cover) splits relevance in proportion to its inputs, zennit's ``Norm`` rule
(which zennit's composites put on ``AvgPool2d``): ``R_in = x * pool^T(R / stab(pool(x)))``. A
channel attention (SE, ECA: ``y = z * s``, the sigmoid gate ``s`` computed from the pooled ``z``)
is crossed with the gate held constant, all relevance going through the signal ``z`` and none
into the gate branch, ``R_z = R_y`` ("signal takes all", the standard LRP treatment of
multiplicative gates: Arras et al. 2017 for LSTM gates, Ali et al. 2022 for attention), so
relevance stays conserved. The gradient rule differentiates through the gate (the exact
gradient, with the pooled path's term, :mod:`purenn.arch.attention`). Both are checked against
zennit with a small timm canonizer in ``tests/test_rules.py``.

Rules (zennit defaults): ``"gradient"`` (PURE's), ``"epsilon"`` (:class:`Epsilon`, eps 1e-6),
``"zplus"`` (:class:`ZPlus`), ``"alpha2beta1"`` (:class:`AlphaBeta`, alpha 2, beta 1),
``"gamma"`` (:class:`Gamma`, gamma 0.25). A new rule is a subclass with ``conv_weights`` and ``conv_factors``.

Example:
    >>> rule = get_rule("epsilon")
    >>> rule.name, rule.config()
    ('epsilon', 'epsilon')
    >>> get_rule(Epsilon(epsilon=0.25)).config()
    {'name': 'epsilon', 'epsilon': 0.25}
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

from purenn.arch import Block, BlockRecord, ConvBN
from purenn.arch.attention import AvgPoolDown, EfficientChannelAttention, SqueezeExcite
from purenn.common.choices import RULES as RULE_NAMES
from purenn.errors import ConfigError

__all__ = [
    "RULES",
    "Rule",
    "Gradient",
    "Epsilon",
    "ZPlus",
    "AlphaBeta",
    "Gamma",
    "get_rule",
    "rule_from_config",
    "stabilize",
    "folded_bias",
    "block_factors",
    "rule_text",
]


def stabilize(z: Tensor, epsilon: float) -> Tensor:
    """zennit's stabiliser: ``z + epsilon * sign(z)``, with sign +1 at 0, so it is never zero."""
    return z + ((z == 0).to(z.dtype) + z.sign()) * epsilon


def folded_bias(cb: ConvBN) -> Tensor:
    """The bias of the convolution with its BatchNorm merged (as zennit's ``MergeBatchNorm``)."""
    bn = cb.bn
    scale = torch.rsqrt(bn.running_var + bn.eps)
    if bn.weight is not None:
        scale = scale * bn.weight
    b = -bn.running_mean if cb.conv.bias is None else cb.conv.bias - bn.running_mean
    b = b * scale
    return b if bn.bias is None else b + bn.bias


def _conv(cb: ConvBN, x: Tensor, w: Tensor, b: Tensor | None) -> Tensor:
    c = cb.conv
    return F.conv2d(x, w, b, c.stride, c.padding, c.dilation, c.groups)


def _positive_part(cb: ConvBN, x: Tensor) -> Tensor:
    """``W+ x + b+``: the convolution with the positive parts of the merged weight and bias."""
    return _conv(cb, x, cb.folded_weight().clamp(min=0), folded_bias(cb).clamp(min=0))


@dataclass(frozen=True)
class Rule:
    """A relevance rule: how relevance crosses a convolution and the residual sum.

    Subclasses set ``name`` and implement :meth:`conv_weights` and :meth:`conv_factors`. ``sum_stabilizer`` is the
    stabiliser of the proportional splits of zennit's ``Norm`` rule: the residual sum (zennit's ``Sum``)
    and the average pooling of a ``-d`` downsample.
    """

    name: ClassVar[str] = ""
    #: False only for the gradient: no relevance split, masks instead of stabilised ratios
    is_lrp: ClassVar[bool] = True

    def conv_factors(self, cb: ConvBN, x: Tensor, z: Tensor, before_relu: bool) -> list[Tensor]:
        """The factors ``d_j`` of a convolution with input ``x`` (``>= 0``) and merged output ``z``,
        one per weight of :meth:`conv_weights` (in that order).

        With ``before_relu`` the convolution feeds a ReLU, whose output multiplies every factor, so
        the factors only matter where ``z > 0`` (``z`` may be the ReLU output), and trailing terms
        that vanish there may be left out.
        """
        raise NotImplementedError

    def conv_weights(self, cb: ConvBN) -> list[Tensor]:
        """The (modified) weights ``W_j`` of the terms, BatchNorm merged."""
        raise NotImplementedError

    @property
    def sum_stabilizer(self) -> float:
        return 1e-6

    def config(self) -> str | dict[str, Any]:
        """The rule's name when it has its default parameters, else ``{"name": ..., **parameters}``."""
        params = {f.name: getattr(self, f.name) for f in fields(self)}
        defaults = {f.name: f.default for f in fields(self)}
        return self.name if params == defaults else {"name": self.name, **params}


@dataclass(frozen=True)
class Gradient(Rule):
    """PURE's rule: the plain gradient (ReLU masks), the circuit is gradient x activation."""

    name: ClassVar[str] = "gradient"
    is_lrp: ClassVar[bool] = False

    def conv_weights(self, cb: ConvBN) -> list[Tensor]:
        return [cb.folded_weight()]


@dataclass(frozen=True)
class Epsilon(Rule):
    """zennit's ``Epsilon``: ``R_in = x * W^T (R / stab(z))``, ``stab(z) = z + epsilon sign(z)``."""

    epsilon: float = 1e-6
    name: ClassVar[str] = "epsilon"

    def conv_weights(self, cb: ConvBN) -> list[Tensor]:
        return [cb.folded_weight()]

    def conv_factors(self, cb: ConvBN, x: Tensor, z: Tensor, before_relu: bool) -> list[Tensor]:
        return [1 / stabilize(z, self.epsilon)]


@dataclass(frozen=True)
class ZPlus(Rule):
    """zennit's ``ZPlus``: positive weights and bias, ``R_in = x * W+^T (R / stab(W+ x + b+))``."""

    stabilizer: float = 1e-6
    name: ClassVar[str] = "zplus"

    def conv_weights(self, cb: ConvBN) -> list[Tensor]:
        return [cb.folded_weight().clamp(min=0)]

    def conv_factors(self, cb: ConvBN, x: Tensor, z: Tensor, before_relu: bool) -> list[Tensor]:
        return [1 / stabilize(_positive_part(cb, x), self.stabilizer)]


@dataclass(frozen=True)
class AlphaBeta(Rule):
    """zennit's ``AlphaBeta``: ``alpha`` times the positive, minus ``beta`` times the negative
    contributions, each normalised by its own stabilised sum (bias split by sign)."""

    alpha: float = 2.0
    beta: float = 1.0
    stabilizer: float = 1e-6
    name: ClassVar[str] = "alpha2beta1"

    def __post_init__(self) -> None:
        if self.alpha < 0 or self.beta < 0 or abs(self.alpha - self.beta - 1) > 1e-12:
            raise ConfigError(f"AlphaBeta needs alpha, beta >= 0 and alpha - beta = 1, got {self.alpha}, {self.beta}.")

    def conv_weights(self, cb: ConvBN) -> list[Tensor]:
        w = cb.folded_weight()
        return [w.clamp(min=0), w.clamp(max=0)]

    def conv_factors(self, cb: ConvBN, x: Tensor, z: Tensor, before_relu: bool) -> list[Tensor]:
        zp = _positive_part(cb, x)
        zn = z - zp  # W- x + b- (x >= 0): one modified convolution instead of two
        return [self.alpha / stabilize(zp, self.stabilizer), -self.beta / stabilize(zn, self.stabilizer)]


@dataclass(frozen=True)
class Gamma(Rule):
    """zennit's generalised ``Gamma``: where the output ``z > 0``, weights ``W + gamma W+`` (bias
    ``b + gamma b+``); where ``z < 0``, ``W + gamma W-`` (bias ``b + gamma b-``)."""

    gamma: float = 0.25
    stabilizer: float = 1e-6
    name: ClassVar[str] = "gamma"

    def conv_weights(self, cb: ConvBN) -> list[Tensor]:
        w = cb.folded_weight()
        return [w + self.gamma * w.clamp(min=0), w + self.gamma * w.clamp(max=0)]

    def conv_factors(self, cb: ConvBN, x: Tensor, z: Tensor, before_relu: bool) -> list[Tensor]:
        zp = _positive_part(cb, x)  # W+ x + b+; (W + gamma W+) x + b + gamma b+ = z + gamma zp
        pos = (z > 0).to(z.dtype) / stabilize(z + self.gamma * zp, self.stabilizer)
        if before_relu:  # the z < 0 term is zero wherever the ReLU lets relevance through
            return [pos]
        zn = z + self.gamma * (z - zp)  # (W + gamma W-) x + b + gamma b-, as W- x + b- = z - zp
        return [pos, (z < 0).to(z.dtype) / stabilize(zn, self.stabilizer)]


#: rule name -> class; ``get_rule(name)`` builds it with zennit's default parameters
RULES: dict[str, type[Rule]] = {r.name: r for r in (Gradient, Epsilon, ZPlus, AlphaBeta, Gamma)}
assert tuple(RULES) == RULE_NAMES, "purenn.common.choices.RULES must list the rules (the CLI reads it)"


def get_rule(rule: str | Rule) -> Rule:
    """A :class:`Rule` from a name in :data:`RULES` or a rule object (returned as it is).

    Raises:
        ConfigError: an unknown name or type, listing the choices.
    """
    if isinstance(rule, Rule):
        return rule
    if isinstance(rule, str) and rule in RULES:
        return RULES[rule]()
    raise ConfigError(
        f"unknown relevance rule {rule!r}; choose one of {', '.join(repr(n) for n in RULES)} "
        "or pass a purenn.attribution.rules.Rule object such as purenn.attribution.rules.Epsilon(epsilon=0.01)."
    )


def rule_text(config: str | Mapping[str, Any]) -> str:
    """A rule's saved config as text: its name, with its parameters when they are not zennit's defaults.

    Example:
        >>> rule_text("epsilon"), rule_text({"name": "epsilon", "epsilon": 0.01})
        ('epsilon', 'epsilon(epsilon=0.01)')
    """
    if isinstance(config, Mapping):
        return str(config["name"]) + "(" + ", ".join(f"{k}={v}" for k, v in config.items() if k != "name") + ")"
    return str(config)


def rule_from_config(config: str | Mapping[str, Any]) -> Rule:
    """Inverse of :meth:`Rule.config` (raises :class:`ConfigError` on anything else)."""
    if isinstance(config, Mapping):
        name = config.get("name")
        cls = RULES.get(name) if isinstance(name, str) else None
        params = {k: v for k, v in config.items() if k != "name"}
        allowed = {f.name for f in fields(cls)} if cls is not None else set()
        if cls is None or not set(params) <= allowed or not all(
            isinstance(v, (int, float)) and not isinstance(v, bool) and v == v and abs(v) != float("inf")
            for v in params.values()
        ):
            raise ConfigError(f"bad relevance rule config {dict(config)!r}; names: {', '.join(RULES)}.")
        return cls(**{k: float(v) for k, v in params.items()})
    return get_rule(config)


def block_factors(
    rule: Rule, block: Block, rec: BlockRecord, dtype: torch.dtype, top: bool = True
) -> dict[str, Any]:
    """Per-sample tensors ``(B, C, H, W)`` the backward pass of ``block`` multiplies in, for ``rule``.

    Returns ``{"main": [[factor per term] per main conv], "skip": [factor per term], "out": tensor,
    "pool": tensor or None}``:
    ``main[-1]`` and ``skip`` multiply the relevance at the residual sum, ``main[i]`` (``i`` before
    the last) multiplies the gradient-like quantity at the input of main conv ``i + 1``, ``out``
    the one at the block output. ``None`` means "multiply by 1". A list shorter than the rule's
    weights leaves out the trailing terms. For a block that is not the target (``top=False``) an
    LRP rule's ``out`` is folded into ``main[-1]`` and ``skip`` (and returned as ``None``).

    Relevance only flows where a ReLU output is positive, and there the recorded output *is* the
    pre-activation: so the inner convolutions' outputs are the recorded activations, and the main
    branch before the residual sum is the block output minus the skip branch (elsewhere the
    factors are multiplied by zero). Only the skip branch's convolution (a downsample, behind its
    average pooling if any) and the rules' modified convolutions run again.

    A channel attention (SE, ECA: ``y = z * s`` with the sigmoid gate ``s`` from pooled ``z``)
    is crossed with its gate held constant, all relevance going through the signal ``z`` and none
    into the gate branch ("signal takes all", as LRP treats multiplicative gates: Arras et al. 2017
    for LSTMs, Ali et al. 2022 for attention): ``R_z = R_y``, so conservation holds, and the last
    main convolution's factors are taken at its own output ``z``. An average pooling in front of
    the downsample convolution (timm's ``-d`` models) takes zennit's ``Norm`` rule, as zennit's
    composites map ``AvgPool2d``: ``R_in = x * pool^T(R_pooled / stab(pooled))``; its factor
    ``pooled / stab(pooled)`` is returned as ``"pool"`` (``None`` without one), to multiply the
    gradient-like quantity at the pooling output before the pooling's backward step.
    """
    if not rule.is_lrp:
        acts = [(a > 0).to(dtype) for a in rec.acts]
        return {"main": [[a] for a in acts] + [[None]], "skip": [None], "out": (rec.out > 0).to(dtype), "pool": None}
    for part, kinds in ((block.attn, (SqueezeExcite, EfficientChannelAttention)), (block.down_pool, (AvgPoolDown,))):
        if part is not None and not isinstance(part, kinds):  # the factors below hold for these only
            raise ConfigError(
                f"the {rule.name!r} rule has no LRP step for the {type(part).__name__} of block {block.name}; "
                "it supports SqueezeExcite, EfficientChannelAttention and AvgPoolDown (the 'gradient' rule "
                "differentiates through any of purenn's block parts)."
            )
    xs = [rec.inp, *rec.acts]
    last = len(block.main) - 1
    pool = None
    if block.downsample is None:
        x_skip = rec.inp
    else:
        ds = block.downsample
        x_ds = rec.inp if block.down_pool is None else block.down_pool.forward(rec.inp)
        x_skip = _conv(ds, x_ds, ds.folded_weight(), folded_bias(ds))
        if block.down_pool is not None:  # zennit's Norm rule on the pooling (x_ds >= 0: 0 where it is 0)
            pool = x_ds / stabilize(x_ds, rule.sum_stabilizer)
    x_main = rec.out - x_skip  # exact where the block output is positive, the only place it matters
    # the last main convolution's output: before the attention's gate (recorded first in its state)
    z_last = x_main if block.attn is None else rec.attn[0]
    inv = (rec.out > 0).to(dtype) / stabilize(rec.out, rule.sum_stabilizer)
    main: list[list[Tensor | None]] = []
    for i, cb in enumerate(block.main):
        if i < last:
            a = xs[i + 1]
            main.append([a * d for d in rule.conv_factors(cb, xs[i], a, True)])
        else:  # R_y = x_main * R / stab(out) at the sum; a gate passes it on unchanged (R_z = R_y)
            main.append([x_main * inv * d for d in rule.conv_factors(cb, xs[i], z_last, False)])
    if block.downsample is None:
        skip: list[Tensor | None] = [inv]
    else:
        skip = [x_skip * inv * d for d in rule.conv_factors(block.downsample, x_ds, x_skip, False)]
    if top:
        return {"main": main, "skip": skip, "out": rec.out, "pool": pool}
    main[-1] = [rec.out * f for f in main[-1]]
    return {"main": main, "skip": [rec.out * f for f in skip], "out": None, "pool": pool}
