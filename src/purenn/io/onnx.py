"""Export a :class:`~purenn.PurifiedModel` to ONNX and verify it in ONNX Runtime.

The graph has one input ``input`` ``(batch, C, H, W)`` (the batch axis is dynamic, the image
size fixed) and, by default (``outputs=("logits", "pure", "gate")``), the outputs

- ``logits`` ``(batch, num_classes)``;
- ``pure.<layer>`` per purified layer: pooled pure features ``(batch, V)`` (``pool="mean"`` or
  ``"max"``), or maps ``(batch, V, h, w)`` with ``pool=None``;
- ``gate.<layer>`` per purified layer: ``(batch, K)`` int64, the chosen cluster of every purified
  neuron in ascending channel order.

The circuit relevance and the nearest-centroid gate are part of the graph (plain convolutions,
transposed convolutions, masks, an ArgMin), and suppressed virtual neurons are baked in as zero
merge weights. With ``"pure"`` or ``"gate"`` among the outputs every split neuron is gated. With
``outputs=("logits",)`` (an unlearned model that only has to classify) the graph gates only the
neurons whose virtual neurons have unequal merge weights, i.e. those with a suppression that changes
the logits, exactly as ``pm(x)`` does; with nothing suppressed it costs what the base model costs.
``onnx.checker`` (full check) runs on the file, then ONNX Runtime is compared with PyTorch (on the
outputs the graph has) on random inputs of several batch sizes, an all-zero batch and any inputs
you give.

Exporter: the TorchScript-based exporter (``torch.onnx.export(..., dynamo=False)``), opset 17 by
default. The purified forward decides in Python, from its own buffers (cluster counts, merge
weights), which neurons to gate; tracing records those decisions as constants, whereas
``torch.export`` (``dynamo=True``) treats buffers as data and fails on them. The dynamo path's
default graph optimizer also folds the ``+ 1e-12`` of the relevance normalisation away as
"adding zero", which turns an all-zero circuit (a dead neuron) into 0/0 = NaN and a wrong gate.

Example:
    >>> report = purenn.export_onnx(pm, "pure.onnx", input_shape=(3, 224, 224))   # doctest: +SKIP
    >>> report.ok, report.max_abs_logits                                            # doctest: +SKIP
    (True, 3.1e-06)
    >>> handle = pm.suppress("layer4", [pm.virtual_index("layer4", 7, 1)])          # doctest: +SKIP
    >>> purenn.export_onnx(pm, "unlearned.onnx", (3, 224, 224), outputs=("logits",)).outputs  # doctest: +SKIP
    ('logits',)
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from purenn._version import __version__
from purenn.arch import ResNetSpec, input_conv
from purenn.common.checks import as_int, check_memory, check_number
from purenn.common.distributed import writes_on_rank_zero
from purenn.errors import ConfigError, ExportError
from purenn.io.files import as_path, begin_write
from purenn.model.gates import gate_feature_chunks
from purenn.model.pure_layer import POOLS
from purenn.model.purified import PurifiedModel

__all__ = ["EXPORTERS", "OUTPUTS", "DEFAULT_OPSET", "ParityCheck", "ExportReport", "export_onnx",
           "default_providers", "output_names", "check_outputs"]

EXPORTERS = ("torchscript",)
#: the kinds of output a graph can have, in graph order; ``"logits"`` is always among them
OUTPUTS = ("logits", "pure", "gate")
DEFAULT_OPSET = 17
_MIN_OPSET, _MAX_OPSET = 13, 20  # ArgMin/ReduceSum semantics used here; the TorchScript exporter's maximum
INPUT_NAME = "input"


def check_outputs(outputs: Any) -> tuple[str, ...]:
    """Validate an ``outputs`` choice of :func:`export_onnx` and return it in graph order.

    ``outputs`` is a tuple or list of distinct names from :data:`OUTPUTS` that contains
    ``"logits"``; anything else raises :class:`~purenn.errors.ConfigError`.

    Example:
        >>> check_outputs(["gate", "logits"])
        ('logits', 'gate')
    """
    allowed = ", ".join(repr(o) for o in OUTPUTS)
    if not isinstance(outputs, (tuple, list)) or not all(isinstance(o, str) for o in outputs):
        raise ConfigError(
            f"outputs must be a tuple or list of names from {allowed} that contains 'logits', such as "
            f"('logits',), got {outputs!r}."
        )
    unknown = [o for o in outputs if o not in OUTPUTS]
    if unknown:
        raise ConfigError(f"unknown outputs {unknown}; allowed: {allowed} (with 'logits' always among them).")
    if len(set(outputs)) != len(outputs):
        raise ConfigError(f"outputs {list(outputs)} names an output twice; allowed: {allowed}.")
    if "logits" not in outputs:
        raise ConfigError(f"outputs must contain 'logits', got {list(outputs)}; allowed: {allowed}.")
    return tuple(o for o in OUTPUTS if o in outputs)


def output_names(pm: PurifiedModel, outputs: Sequence[str] = OUTPUTS) -> list[str]:
    """Output names of the exported graph, in order: ``logits``, ``pure.<layer>``..., ``gate.<layer>``...
    (only the kinds in ``outputs``)."""
    kinds = check_outputs(outputs)
    return ["logits", *[f"{kind}.{name}" for kind in kinds[1:] for name in pm.layers]]


def default_providers() -> list[str]:
    """``["CUDAExecutionProvider", "CPUExecutionProvider"]`` when onnxruntime-gpu offers CUDA
    (``pip install "purenn[gpu]"``), else ``["CPUExecutionProvider"]``.

    Warns when both onnxruntime and onnxruntime-gpu are installed but CUDA is missing: the two
    share one import name, and the CPU package then hides the GPU one.
    """
    import onnxruntime as ort

    available = ort.get_available_providers()
    if "CUDAExecutionProvider" in available:
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    try:
        metadata.version("onnxruntime")
        metadata.version("onnxruntime-gpu")
    except metadata.PackageNotFoundError:
        pass
    else:
        warnings.warn(
            "onnxruntime and onnxruntime-gpu are both installed and the CPU package hides the CUDA "
            "execution provider; keep only the GPU one: pip uninstall -y onnxruntime onnxruntime-gpu && "
            "pip install onnxruntime-gpu",
            stacklevel=2,
        )
    return ["CPUExecutionProvider"]


def _verification_providers(providers: Sequence[str | tuple[str, dict]]) -> list[str | tuple[str, dict]]:
    """Providers for the parity check: CUDA without TF32, so that it measures the graph, not TF32."""
    return [("CUDAExecutionProvider", {"use_tf32": "0"}) if p == "CUDAExecutionProvider" else p
            for p in providers]


@contextlib.contextmanager
def _ieee_fp32(device: torch.device) -> Iterator[None]:
    """Full-precision float32 convolutions and matmuls in PyTorch on CUDA (no TF32) for the reference."""
    if device.type != "cuda":
        yield
        return
    conv = getattr(torch.backends.cudnn, "conv", None)
    matmul = getattr(torch.backends.cuda, "matmul", None)
    if conv is not None and hasattr(conv, "fp32_precision") and hasattr(matmul, "fp32_precision"):
        old = conv.fp32_precision, matmul.fp32_precision
        conv.fp32_precision, matmul.fp32_precision = "ieee", "ieee"
        try:
            yield
        finally:
            conv.fp32_precision, matmul.fp32_precision = old
    else:
        old = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
        torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
        try:
            yield
        finally:
            torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = old


class _Exported(nn.Module):
    """``x -> (logits, pure features..., gates...)`` (the kinds in ``outputs``): with pure features or
    gates, the purified forward with every gate computed; logits alone, the forward of ``pm(x)``,
    which gates only the neurons whose suppression depends on the gate."""

    def __init__(self, pm: PurifiedModel, pool: str | None, outputs: tuple[str, ...] = OUTPUTS) -> None:
        super().__init__()
        self.pm = pm
        self.pool = pool
        self.outputs = outputs

    def forward(self, x: Tensor) -> tuple[Tensor, ...]:
        return _forward(self.pm, x, self.outputs, self.pool)

    def train(self, mode: bool = True) -> _Exported:  # the exporter restores the mode it found
        return super().train(False)


def _forward(pm: PurifiedModel, x: Tensor, outputs: tuple[str, ...], pool: str | None) -> tuple[Tensor, ...]:
    """The graph's outputs in PyTorch (what is traced)."""
    if outputs == ("logits",):
        return (pm._run(x, all_gates=False)[0],)
    logits, gates, feats = pm._run(x, all_gates=True, pool=pool if "pure" in outputs else False)
    out = [logits]
    if "pure" in outputs:
        out += [feats[n] for n in pm.layers]
    if "gate" in outputs:
        out += [gates[n] for n in pm.layers]
    return tuple(out)


# ---------------------------------------------------------------------------------------- report
@dataclass(frozen=True)
class ParityCheck:
    """ONNX Runtime vs PyTorch on one input batch.

    ``max_abs_*`` are the largest absolute differences, ``rel_*`` the same divided by the output's
    largest magnitude. Pure features of a neuron whose gates differ by a tie are left out of the
    feature comparison (without a gate output: of a neuron whose gate could differ by a tie, when
    the features differ). ``gate_ties`` counts gate differences where the two chosen centroids are
    equally near (within ``tie_rtol``); ``gate_errors`` counts the others. The feature and gate
    dictionaries hold the purified layers when the graph has that output, else nothing.
    """

    name: str
    batch: int
    max_abs_logits: float
    rel_logits: float
    max_abs_features: dict[str, float]
    rel_features: dict[str, float]
    gate_count: dict[str, int]
    gate_mismatches: dict[str, int]
    gate_ties: dict[str, int]
    gate_errors: dict[str, int]
    finite: bool
    passed: bool

    def gate_agreement(self, layer: str) -> float:
        n = self.gate_count[layer]
        return 1.0 if n == 0 else 1.0 - self.gate_mismatches[layer] / n


@dataclass(frozen=True)
class ExportReport:
    """What :func:`export_onnx` wrote and how ONNX Runtime compared with PyTorch.

    ``ok`` is ``True`` when every check passed (logits and pure features within ``rtol`` of the
    largest magnitude, gates equal except ties, everything finite), ``None`` without verification.
    ``outputs`` holds the graph's output names (see :func:`output_names`); the checks compare those.
    """

    path: Path
    exporter: str
    opset: int
    input_shape: tuple[int, int, int]
    pool: str | None
    outputs: tuple[str, ...]
    providers: tuple[str, ...]
    file_bytes: int
    rtol: float
    tie_rtol: float
    checks: tuple[ParityCheck, ...] = field(default_factory=tuple)

    @property
    def ok(self) -> bool | None:
        return None if not self.checks else all(c.passed for c in self.checks)

    @property
    def max_abs_logits(self) -> float:
        return max((c.max_abs_logits for c in self.checks), default=math.nan)

    @property
    def max_abs_features(self) -> dict[str, float]:
        layers = self.checks[0].max_abs_features if self.checks else {}
        return {n: max(c.max_abs_features[n] for c in self.checks) for n in layers}

    @property
    def gate_agreement(self) -> dict[str, float]:
        """Fraction of (sample, neuron) gates equal in ONNX Runtime and PyTorch, over all checks."""
        layers = self.checks[0].gate_count if self.checks else {}
        out = {}
        for n in layers:
            total = sum(c.gate_count[n] for c in self.checks)
            out[n] = 1.0 if total == 0 else 1.0 - sum(c.gate_mismatches[n] for c in self.checks) / total
        return out

    def summary(self) -> str:
        """A plain-text table of the checks."""
        kinds = sorted({o.split(".")[0] for o in self.outputs}, key=OUTPUTS.index)
        lines = [
            f"{self.path} ({self.file_bytes / 2**20:.1f} MiB): exporter={self.exporter}, opset={self.opset}, "
            f"input=(batch, {', '.join(map(str, self.input_shape))}), outputs={','.join(kinds)}, "
            f"pool={self.pool}, providers={list(self.providers)}",
        ]
        if self.checks:
            what = "|dlogits|" + (", |dfeatures|" if self.checks[0].max_abs_features else "")
            lines.append(f"  one row per input batch; {what}: the largest |ONNX Runtime - PyTorch| difference (rel: "
                         f"relative to the\n  largest magnitude, ok below {self.rtol:.0e})"
                         + ("; gates equal: share of (sample, purified neuron) gates that agree"
                            if self.checks[0].gate_count else ""))
        for c in self.checks:
            parts = [f"|dlogits| {c.max_abs_logits:.2e} (rel {c.rel_logits:.1e})"]
            if c.max_abs_features:
                parts.append("|dfeatures| " + ", ".join(
                    f"{n} {c.max_abs_features[n]:.2e} (rel {c.rel_features[n]:.1e})" for n in c.max_abs_features
                ))
            if c.gate_count:
                parts.append("gates equal " + ", ".join(
                    f"{n} {c.gate_agreement(n):.4f}" + (f" ({c.gate_ties[n]} ties)" if c.gate_ties[n] else "")
                    for n in c.gate_count
                ))
            lines.append(
                f"  {'ok  ' if c.passed else 'FAIL'} {c.name}: " + "; ".join(parts)
                + ("" if c.finite else "; NON-FINITE values")
            )
        if not self.checks:
            lines.append("  not verified")
        return "\n".join(lines)


# ---------------------------------------------------------------------------------------- helpers
def _check_args(pm: Any, input_shape: Any, pool: Any, exporter: Any, opset: Any) -> tuple[int, int, int]:
    if not isinstance(pm, PurifiedModel):
        raise ConfigError(f"export_onnx needs a PurifiedModel, got {type(pm).__name__}.")
    pm._check_base()  # a base model converted behind pm's back, or a model on the meta device
    shape = tuple(input_shape) if isinstance(input_shape, Sequence) else ()
    if len(shape) != 3 or not all((as_int(s) or 0) > 0 for s in shape):
        raise ConfigError(
            f"input_shape must be (channels, height, width) of positive ints, got {input_shape!r}."
        )
    shape = tuple(as_int(s) for s in shape)
    in_ch = input_conv(pm.base_model).in_channels
    if shape[0] != in_ch:
        raise ConfigError(f"input_shape has {shape[0]} channels but the model's conv1 takes {in_ch}.")
    if pool not in POOLS:
        raise ConfigError(f"pool must be one of {POOLS}, got {pool!r}.")
    if exporter not in EXPORTERS:
        raise ConfigError(
            f"exporter must be one of {EXPORTERS}, got {exporter!r}. The torch.export-based exporter "
            "(dynamo=True) cannot trace the purified forward, whose gating plan is read from its buffers."
        )
    if not _MIN_OPSET <= (as_int(opset) or -1) <= _MAX_OPSET:
        raise ConfigError(f"opset must be an int in {_MIN_OPSET}..{_MAX_OPSET}, got {opset!r}.")
    dtype = next(pm.parameters()).dtype
    if dtype != torch.float32:
        raise ConfigError(f"ONNX export needs a float32 model, got {dtype}; convert it with pm.float().")
    for name, t in (*pm.named_parameters(), *pm.named_buffers()):
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise ExportError(
                f"cannot export: {name} holds NaN or infinite values, which the graph would carry into every "
                "output (gates included); load or purify the model again."
            )
    return shape  # type: ignore[return-value]


def _onnx_metadata(pm: PurifiedModel, pool: str | None, shape: tuple[int, int, int],
                   outputs: tuple[str, ...] = OUTPUTS) -> str:
    """The ``purenn`` metadata entry: version, pool, input shape, output names and per layer its neurons,
    cluster counts, virtual channels, suppressed virtual neurons and the channels gated in the graph."""
    layers = []
    for name in pm.layers:
        pl = pm.pure_layer(name)
        gated = pl.neurons[pl.gated_neurons(subset_only=outputs == ("logits",))]
        layers.append({
            "layer": name, "upstream": pl.upstream, "rule": pl.rule.config(), "neurons": pl.neurons.tolist(),
            "n_clusters": pl.n_clusters.tolist(), "virtual_channels": pl.v_channel.tolist(),
            "suppressed": torch.nonzero(pl.merge_weight == 0).flatten().tolist(),
            "gated": gated.tolist(),
        })
    return json.dumps({"purenn_version": __version__, "pool": pool, "input_shape": list(shape),
                       "outputs": output_names(pm, outputs), "layers": layers},
                      separators=(",", ":"))


def _gate_distances(pm: PurifiedModel, x: Tensor, layer: str) -> Tensor:
    """``(B, K, c_max)`` squared distances of each neuron's gate feature to its centroids, computed
    from the upstream activation the purified model sees (``inf`` for unused centroid rows)."""
    pl = pm.pure_layer(layer)
    spec = ResNetSpec(pm.base_model)
    pos, up = spec.position(pl.layer), spec.position(pl.upstream)
    blocks = spec.segment(up, pos)
    store: dict[str, Tensor] = {}
    hook = blocks[0].main[0].conv.register_forward_pre_hook(lambda m, args: store.setdefault("a_up", args[0]))
    try:
        with torch.no_grad():
            pm._run(x, all_gates=True)
    finally:
        hook.remove()
    a_up = store["a_up"]
    with torch.no_grad():
        h, recs = a_up, []
        for blk in blocks:
            h, rec = spec.block_forward(blk, h, record=True)
            recs.append(rec)
        chunks = gate_feature_chunks(pl.gate, blocks, recs, a_up, h, pl.neurons, rule=pl.rule,
                                     skip_aware=pl.skip_aware, gate_weight=pl.gate_weight, max_memory=pm.max_memory)
        feat = torch.cat([f for _, _, f in chunks], dim=1)
        dist = ((feat[:, :, None, :].double() - pl.centroids[None].double()) ** 2).sum(dim=-1)
        valid = torch.arange(dist.shape[-1], device=dist.device)[None] < pl.n_clusters[:, None]
        return torch.where(valid[None], dist, torch.full_like(dist, math.inf)).cpu()


def _diff(a: np.ndarray, ref: np.ndarray, rtol: float, atol: float) -> tuple[float, float, bool]:
    """Largest absolute difference, the same relative to ``ref``'s largest magnitude, and whether it is
    within ``rtol * scale + atol`` (NaN counts as an infinite difference)."""
    if a.size == 0:
        return 0.0, 0.0, True
    d = np.abs(a.astype(np.float64) - ref.astype(np.float64))
    d = np.where(np.isnan(d), np.inf, d)
    scale = float(np.abs(ref).max())
    worst = float(d.max())
    rel = worst / scale if scale > 0 else (0.0 if worst == 0 else math.inf)
    return worst, rel, worst <= rtol * scale + atol


def _near_ties(pm: PurifiedModel, x: Tensor, layer: str, chosen: np.ndarray, tie_rtol: float) -> np.ndarray:
    """``(B, K)`` bool: another valid centroid is as near as the chosen one (within ``tie_rtol``)."""
    dist = _gate_distances(pm, x, layer).numpy()
    d_chosen = np.take_along_axis(dist, chosen[..., None], axis=-1)
    close = np.abs(dist - d_chosen) <= tie_rtol * np.maximum(np.maximum(np.abs(dist), np.abs(d_chosen)), 1e-30)
    others = np.ones(dist.shape, dtype=bool)
    np.put_along_axis(others, chosen[..., None], False, axis=-1)
    return (close & others & np.isfinite(dist)).any(axis=-1)


def _compare(
    pm: PurifiedModel, session: Any, x: Tensor, name: str, pool: str | None, rtol: float, atol: float,
    tie_rtol: float, outputs: tuple[str, ...] = OUTPUTS,
) -> ParityCheck:
    outs = session.run(None, {INPUT_NAME: x.detach().cpu().numpy()})
    layers = pm.layers
    n = len(layers)
    with torch.no_grad():
        if outputs == ("logits",):  # the graph computes pm(x), gating only what a suppression needs
            logits, gates, feats = pm._run(x, all_gates=False)[0], {}, {}
        else:
            logits, gates, feats = pm._run(x, all_gates=True, pool=pool if "pure" in outputs else False)
    ort_logits, rest = outs[0], list(outs[1:])
    ort_feats = rest[:n] if "pure" in outputs else []
    ort_gates = rest[-n:] if "gate" in outputs else []
    finite = bool(np.isfinite(ort_logits).all() and all(np.isfinite(f).all() for f in ort_feats))
    finite = finite and bool(torch.isfinite(logits).all())

    max_l, rel_l, ok = _diff(ort_logits, logits.cpu().numpy(), rtol, atol)
    max_f, rel_f, count, mism, ties, errs = {}, {}, {}, {}, {}, {}
    for i, layer in enumerate(layers):
        pl = pm.pure_layer(layer)
        tg = gates[layer].cpu().numpy() if gates else None
        bad = None
        if ort_gates:
            og = np.asarray(ort_gates[i])
            if og.shape != tg.shape:
                raise ExportError(f"gate.{layer} has shape {og.shape} in ONNX Runtime, {tg.shape} in PyTorch.")
            bad = og != tg
            n_ties = 0
            if bad.any():
                dist = _gate_distances(pm, x, layer).numpy()
                for b, k in zip(*np.nonzero(bad)):
                    c_max = dist.shape[-1]
                    d_o = dist[b, k, og[b, k]] if 0 <= og[b, k] < c_max else math.inf
                    d_t = dist[b, k, tg[b, k]]
                    if math.isfinite(d_o) and abs(d_o - d_t) <= tie_rtol * max(abs(d_o), abs(d_t), 1e-30):
                        n_ties += 1
            count[layer], mism[layer] = int(tg.size), int(bad.sum())
            ties[layer], errs[layer] = n_ties, int(bad.sum()) - n_ties
            ok = ok and errs[layer] == 0
        if ort_feats:
            of, ref = ort_feats[i], feats[layer].cpu().numpy()
            max_f[layer], rel_f[layer], ok_f = _diff(of, ref, rtol, atol)
            if not ok_f or bad is not None:
                # leave out the virtual neurons of (sample, neuron) pairs whose gates differ (or, without
                # a gate output, could differ by a tie)
                if bad is None:
                    bad = _near_ties(pm, x, layer, tg, tie_rtol)
                kpos = pl.v_kpos.cpu().numpy()
                bad_ext = np.concatenate([bad, np.zeros((bad.shape[0], 1), dtype=bool)], axis=1)
                keep = ~bad_ext[:, kpos]  # (B, V)
                keep = keep.reshape(keep.shape + (1,) * (ref.ndim - 2))
                keep = np.broadcast_to(keep, ref.shape)
                max_f[layer], rel_f[layer], ok_f = _diff(np.where(keep, of, 0), np.where(keep, ref, 0), rtol, atol)
            ok = ok and ok_f
    return ParityCheck(name, int(x.shape[0]), max_l, rel_l, max_f, rel_f, count, mism, ties, errs, finite,
                       bool(ok and finite))


def _verification_inputs(
    inputs: Tensor | np.ndarray | Sequence[Tensor | np.ndarray] | None,
    shape: tuple[int, int, int], batch_sizes: Sequence[int], seed: int, device: torch.device,
) -> list[tuple[str, Tensor]]:
    if isinstance(batch_sizes, (int, str)) or not all((as_int(b) or 0) > 0 for b in batch_sizes):
        raise ConfigError(f"batch_sizes must be a sequence of positive ints, got {batch_sizes!r}.")
    batch_sizes = [as_int(b) for b in batch_sizes]
    g = torch.Generator().manual_seed(seed)
    cases = [(f"random b={b}", torch.rand(b, *shape, generator=g)) for b in batch_sizes]
    if batch_sizes:
        b = max(batch_sizes)
        cases.append((f"zeros b={b}", torch.zeros(b, *shape)))
    if inputs is not None:
        items = [inputs] if isinstance(inputs, (Tensor, np.ndarray)) else list(inputs)
        for i, t in enumerate(items):
            t = torch.as_tensor(t, dtype=torch.float32)
            t = t[None] if t.ndim == 3 else t
            if t.ndim != 4 or tuple(t.shape[1:]) != shape:
                raise ConfigError(
                    f"inputs[{i}] has shape {tuple(t.shape)}; the graph takes "
                    f"(batch, {shape[0]}, {shape[1]}, {shape[2]})."
                )
            if not bool(torch.isfinite(t).all()):
                raise ConfigError(f"inputs[{i}] contains NaN or infinite values.")
            cases.append((f"inputs[{i}] b={t.shape[0]}", t))
    return [(name, t.to(device)) for name, t in cases]


# ---------------------------------------------------------------------------------------- export
@writes_on_rank_zero
def export_onnx(
    pm: PurifiedModel,
    path: str | os.PathLike,
    input_shape: Sequence[int] = (3, 224, 224),
    *,
    outputs: Sequence[str] = OUTPUTS,
    pool: str | None = "mean",
    exporter: str = "torchscript",
    opset: int = DEFAULT_OPSET,
    max_memory: int | None = None,
    verify: bool = True,
    inputs: Tensor | np.ndarray | Sequence[Tensor | np.ndarray] | None = None,
    batch_sizes: Sequence[int] = (1, 4),
    seed: int = 0,
    rtol: float = 1e-4,
    atol: float = 1e-6,
    tie_rtol: float = 1e-3,
    providers: Sequence[str | tuple[str, dict]] | None = None,
    strict: bool = True,
) -> ExportReport:
    """Export ``pm`` to an ONNX file with a dynamic batch axis and verify it in ONNX Runtime.

    Args:
        pm: the purified model (float32; suppressed virtual neurons are baked in).
        path: the ``.onnx`` file to write (atomically: it appears only once exported, checked and,
            with ``strict``, verified).
        input_shape: ``(C, H, W)`` of the images; the graph is specialised to this size.
        outputs: which outputs the graph has: a tuple or list of ``"logits"``, ``"pure"`` (pure
            features ``pure.<layer>``) and ``"gate"`` (gates ``gate.<layer>``) that contains
            ``"logits"`` (default all three). With pure features or gates every split neuron is
            gated. ``("logits",)`` gives the graph of ``pm(x)``: only neurons whose virtual neurons
            have unequal merge weights (a suppression the gate decides on) are gated, so an
            unlearned model costs only what its suppressions need, and one with nothing
            suppressed costs what the base model costs.
        pool: ``"mean"`` or ``"max"`` for pooled pure features ``(batch, V)``, ``None`` for maps
            (used with ``"pure"`` in ``outputs``).
        exporter: ``"torchscript"`` (``torch.onnx.export(..., dynamo=False)``); see the module
            docstring for why not ``dynamo=True``.
        opset: ONNX opset (13..20).
        max_memory: bytes of relevance intermediates per sample and chunk in the graph (default
            ``pm.max_memory``); a batch of B uses about B times this. Smaller means more, smaller
            chunks (a larger graph).
        verify: compare ONNX Runtime with PyTorch on the outputs the graph has (else only
            ``onnx.checker`` runs); logits-only graphs are compared with ``pm(x)``.
        inputs: extra verification inputs: a tensor/array ``(B, C, H, W)`` or ``(C, H, W)``, or a list.
        batch_sizes: batch sizes of the random verification inputs (uniform in [0, 1)); an all-zero
            batch of the largest size is checked too.
        seed: seed of the random inputs.
        rtol: allowed max |Δ| of logits and pure features, relative to the output's largest magnitude.
        atol: absolute slack added to that bound (matters only for all-zero outputs).
        tie_rtol: a gate difference counts as a tie when the two centroids' distances differ by at
            most this fraction.
        providers: ONNX Runtime execution providers for the verification (default
            :func:`default_providers`: CUDA when available, else CPU). On CUDA, verification turns
            TF32 off in ONNX Runtime (``use_tf32=0``) and in PyTorch, so it measures the graph.
        strict: raise :class:`~purenn.errors.ExportError` (and write nothing) when verification fails.

    Returns:
        An :class:`ExportReport` (``report.ok``, ``report.summary()``).

    Example:
        >>> report = purenn.export_onnx(pm, "pure.onnx", input_shape=(3, 224, 224))   # doctest: +SKIP
        >>> print(report.summary())                                                     # doctest: +SKIP
        >>> handle = pm.suppress("layer4", [pm.virtual_index("layer4", 7, 1)])          # doctest: +SKIP
        >>> report = purenn.export_onnx(pm, "unlearned.onnx", input_shape=(3, 224, 224),
        ...                             outputs=("logits",))                            # doctest: +SKIP
        >>> report.outputs                                                              # doctest: +SKIP
        ('logits',)
    """
    shape = _check_args(pm, input_shape, pool, exporter, opset)
    opset = as_int(opset)
    kinds = check_outputs(outputs)
    rtol, atol, tie_rtol = (check_number(name, v, 0) for name, v in (("rtol", rtol), ("atol", atol),
                                                                     ("tie_rtol", tie_rtol)))
    budget = check_memory("max_memory", pm.max_memory if max_memory is None else max_memory)
    path = as_path(path)
    if path.is_dir():
        raise ConfigError(f"{str(path)!r} is a directory; give a file name such as 'model.onnx'.")
    device = next(pm.parameters()).device
    if providers is None:
        providers = default_providers()
    checks: list[ParityCheck] = []
    cases = _verification_inputs(inputs, shape, batch_sizes, seed, device) if verify else []

    import onnx

    names = output_names(pm, kinds)
    wrapper = _Exported(pm, pool, kinds).eval()
    trace_batch = 2
    example = torch.rand(trace_batch, *shape, generator=torch.Generator().manual_seed(seed)).to(device)
    pending = begin_write(path, "file name such as 'model.onnx'")
    tmp = pending.tmp
    saved_budget = pm.max_memory
    try:
        # relevance chunks are sized from the traced batch; scale the budget so that each chunk
        # holds max_memory bytes per sample, whatever the batch size at run time
        pm.max_memory = int(budget * trace_batch)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            warnings.filterwarnings("ignore", message=".*legacy TorchScript-based ONNX export.*")
            warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"torch\.onnx.*")
            # torch leaves strided slices (step != 1) unfolded: a note about optimisation, not an error
            warnings.filterwarnings("ignore", message="Constant folding - Only steps=1", category=UserWarning)
            try:
                torch.onnx.export(
                    wrapper, (example,), str(tmp), dynamo=False, export_params=True, opset_version=opset,
                    do_constant_folding=True, input_names=[INPUT_NAME], output_names=names,
                    dynamic_axes={n: {0: "batch"} for n in (INPUT_NAME, *names)},
                )
            except Exception as e:
                raise ExportError(f"torch.onnx.export failed: {type(e).__name__}: {e}") from e
        pm.max_memory = saved_budget
        model = onnx.load(str(tmp))
        entry = model.metadata_props.add()
        entry.key, entry.value = "purenn", _onnx_metadata(pm, pool, shape, kinds)
        onnx.save(model, str(tmp))
        try:
            onnx.checker.check_model(str(tmp), full_check=True)
        except Exception as e:
            raise ExportError(f"onnx.checker rejected the exported graph: {e}") from e
        if verify:
            import onnxruntime as ort

            session = ort.InferenceSession(str(tmp), providers=_verification_providers(providers))
            with _ieee_fp32(device):
                for name, x in cases:
                    checks.append(_compare(pm, session, x, name, pool, rtol, atol, tie_rtol, kinds))
            used = tuple(session.get_providers())
        else:
            used = tuple(p if isinstance(p, str) else p[0] for p in providers)
        report = ExportReport(path, exporter, opset, shape, pool, tuple(names), used, tmp.stat().st_size,
                              float(rtol), float(tie_rtol), tuple(checks))
        if strict and report.ok is False:
            raise ExportError(f"ONNX Runtime does not reproduce the PyTorch model:\n{report.summary()}")
        pending.commit()
    except BaseException:
        pending.discard()
        raise
    finally:
        pm.max_memory = saved_budget
    return report
