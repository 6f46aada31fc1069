"""Linear probing of pure features: do virtual neurons carry finer concepts than the original ones?

:func:`extract_features` reads pooled features of a purified layer over a dataset, either from a
:class:`~purenn.PurifiedModel` or from an ONNX Runtime session of its export (the ``"pure.<layer>"``
output; this path runs no torch model). :func:`fit_probe` fits a scikit-learn linear probe
(standardisation + multinomial logistic regression) and :func:`compare_probes` reports the held-out
accuracy of the original channels against the pure virtual neurons.

Example:
    >>> import numpy as np
    >>> rng = np.random.default_rng(0)
    >>> y = np.arange(200) % 2
    >>> x = rng.normal(size=(200, 5)) + 3 * y[:, None]
    >>> res = fit_probe(x[:100], y[:100], x[100:], y[100:])
    >>> res.accuracy > 0.9
    True
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from purenn.common.checks import check_int
from purenn.errors import ConfigError, DataError

__all__ = ["POOLED", "ProbeResult", "ProbeComparison", "extract_features", "fit_probe", "compare_probes"]

POOLED = ("mean", "max")


@dataclass
class ProbeResult:
    """Held-out result of one linear probe.

    Attributes:
        accuracy: accuracy on the test features.
        per_class: accuracy of each label present in the test set.
        n_features: feature dimension the probe saw.
        estimator: the fitted scikit-learn pipeline.
    """

    accuracy: float
    per_class: dict[int, float]
    n_features: int
    estimator: Any = field(repr=False, default=None)


@dataclass
class ProbeComparison:
    """Probes on the original channels and on the pure virtual neurons of one layer."""

    layer: str
    original: ProbeResult
    pure: ProbeResult

    @property
    def gain(self) -> float:
        """Accuracy of the pure-feature probe minus that of the original-feature probe."""
        return self.pure.accuracy - self.original.accuracy


def _is_session(source: Any) -> bool:
    return hasattr(source, "run") and hasattr(source, "get_inputs") and hasattr(source, "get_outputs")


def _numpy_batches(data: Any, batch_size: int) -> Iterator[np.ndarray]:
    """Batches of inputs as float32 numpy arrays from an array, a Tensor or a Dataset."""
    if isinstance(data, np.ndarray):
        if data.ndim != 4:
            raise DataError(f"a data array must have shape (N, C, H, W), got {data.shape}.")
        for s in range(0, len(data), batch_size):
            yield np.ascontiguousarray(data[s : s + batch_size], dtype=np.float32)
        return
    from purenn.fit.data import DataSource

    for _, x in DataSource.from_data(data, batch_size).batches():
        yield x.detach().cpu().numpy().astype(np.float32, copy=False)


def _session(source: Any) -> Any:
    if isinstance(source, (str, os.PathLike)):
        try:
            import onnxruntime as ort
        except ImportError:  # pragma: no cover - depends on the environment
            raise ConfigError("reading an ONNX file needs onnxruntime: pip install onnxruntime") from None
        return ort.InferenceSession(os.fspath(source), providers=["CPUExecutionProvider"])
    return source


def _bar(data: Any, progress: bool, desc: str) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=len(data), desc=desc, unit="img", disable=not progress, leave=False)


def _onnx_features(
    session: Any, data: Any, layer: str, kind: str, batch_size: int, virtual_channels: Sequence[int] | None,
    progress: bool = False, desc: str = "features",
) -> np.ndarray:
    names = [o.name for o in session.get_outputs()]
    out_name = f"pure.{layer}"
    if out_name not in names:
        raise ConfigError(f"the ONNX session has no output {out_name!r}; its outputs: {names}.")
    if kind == "original":
        if virtual_channels is None:
            raise ConfigError(
                "kind='original' from an ONNX session needs virtual_channels (the source channel of each "
                "virtual neuron, e.g. pm.pure_layer(layer).v_channel.tolist()) to sum virtual neurons back."
            )
        vc = np.asarray(virtual_channels, dtype=np.int64)
    input_name = session.get_inputs()[0].name
    parts = []
    bar = _bar(data, progress, desc)
    for x in _numpy_batches(data, batch_size):
        bar.update(len(x))
        f = np.asarray(session.run([out_name], {input_name: x})[0])
        if kind == "original":
            if f.shape[1] != len(vc):
                raise ConfigError(f"virtual_channels has {len(vc)} entries but {out_name!r} has {f.shape[1]}.")
            merged = np.zeros((len(f), int(vc.max()) + 1), dtype=f.dtype)
            np.add.at(merged, (slice(None), vc), f)
            f = merged
        parts.append(f)
    bar.close()
    return np.concatenate(parts)


def extract_features(
    source: Any,
    data: Any,
    *,
    layer: str,
    kind: str = "pure",
    pool: str = "mean",
    batch_size: int = 128,
    virtual_channels: Sequence[int] | None = None,
    progress: bool = False,
    desc: str = "features",
) -> np.ndarray:
    """Pooled features ``(N, D)`` of one purified layer over ``data``.

    Args:
        source: a :class:`~purenn.PurifiedModel`, an ``onnxruntime.InferenceSession`` of its
            export, or the path of the ``.onnx`` file.
        data: a Tensor or numpy array ``(N, C, H, W)``, a map-style Dataset (items ``x`` or
            ``(x, y, ...)``) or an unshuffled DataLoader.
        layer: a purified layer, e.g. ``"layer4"``.
        kind: ``"pure"`` (one column per virtual neuron) or ``"original"`` (one per channel: the
            layer's own pooled activation, which is the sum of its virtual neurons).
        pool: ``"mean"`` or ``"max"`` spatial pooling (PyTorch source only; an ONNX session gives
            what its ``"pure.<layer>"`` output holds).
        batch_size: samples per forward pass.
        virtual_channels: for ``kind="original"`` from ONNX, the source channel of each virtual
            neuron (``pm.pure_layer(layer).v_channel.tolist()``).
        progress: show a progress bar (stderr) labelled ``desc``.
        desc: the bar's label.

    Example:
        >>> feats = extract_features(pm, test_images, layer="layer4")          # doctest: +SKIP
        >>> feats_onnx = extract_features("model.onnx", test_images.numpy(), layer="layer4")  # doctest: +SKIP
    """
    if kind not in ("pure", "original"):
        raise ConfigError(f"kind must be 'pure' or 'original', got {kind!r}.")
    if pool not in POOLED:
        raise ConfigError(f"pool must be one of {POOLED}, got {pool!r}.")
    batch_size = check_int("batch_size", batch_size, 1)
    if isinstance(source, (str, os.PathLike)) or _is_session(source):
        return _onnx_features(_session(source), data, layer, kind, batch_size, virtual_channels, progress, desc)
    return _torch_features(source, data, layer, kind, pool, batch_size, progress, desc)


def _torch_features(pm: Any, data: Any, layer: str, kind: str, pool: str, batch_size: int, progress: bool = False,
                    desc: str = "features") -> np.ndarray:
    import torch

    from purenn.arch import ResNetSpec
    from purenn.fit.data import DataSource
    from purenn.model.purified import PurifiedModel

    if not isinstance(pm, PurifiedModel):
        raise ConfigError(
            "source must be a PurifiedModel, an onnxruntime InferenceSession or an .onnx path, "
            f"got {type(pm).__name__}."
        )
    pm.pure_layer(layer)  # raises LayerError for a layer that is not purified
    if isinstance(data, np.ndarray):
        data = torch.from_numpy(np.ascontiguousarray(data, dtype=np.float32))
    spec = ResNetSpec(pm.base_model)
    pos = spec.position(layer)
    device = next(pm.base_model.parameters()).device
    dtype = next(pm.base_model.parameters()).dtype
    parts = []
    bar = _bar(data, progress, desc)
    with torch.no_grad():
        for _, x in DataSource.from_data(data, batch_size).batches():
            bar.update(len(x))
            x = x.to(device=device, dtype=dtype)
            if kind == "pure":
                f = pm.pure_features(x, pool=pool)[layer]
            else:
                a = spec.run_until(x, {pos})[0][pos]
                f = a.mean(dim=(-2, -1)) if pool == "mean" else a.amax(dim=(-2, -1))
            parts.append(f.cpu().numpy())
    bar.close()
    return np.concatenate(parts)


def fit_probe(
    train_features: np.ndarray,
    train_labels: Sequence[int] | np.ndarray,
    test_features: np.ndarray,
    test_labels: Sequence[int] | np.ndarray,
    *,
    C: float = 1.0,
    max_iter: int = 2000,
) -> ProbeResult:
    """Fit a linear probe (``StandardScaler`` + ``LogisticRegression``) and score it on held-out data.

    Args:
        train_features: ``(N, D)`` features to fit on.
        train_labels: ``(N,)`` integer labels.
        test_features: ``(M, D)`` held-out features.
        test_labels: ``(M,)`` held-out labels.
        C: inverse L2 regularisation strength.
        max_iter: solver iterations.
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    xtr, xte = np.asarray(train_features, dtype=np.float64), np.asarray(test_features, dtype=np.float64)
    ytr, yte = np.asarray(train_labels), np.asarray(test_labels)
    if xtr.ndim != 2 or xte.ndim != 2 or xtr.shape[1] != xte.shape[1]:
        raise DataError(f"features must be 2-D with the same width, got {xtr.shape} and {xte.shape}.")
    if len(xtr) != len(ytr) or len(xte) != len(yte):
        raise DataError(f"{len(xtr)}/{len(xte)} feature rows but {len(ytr)}/{len(yte)} labels.")
    if not (np.isfinite(xtr).all() and np.isfinite(xte).all()):
        raise DataError("features contain NaN or infinite values.")
    if len(np.unique(ytr)) < 2:
        raise DataError("the training labels hold a single class; a probe needs at least two.")
    if not isinstance(C, (int, float)) or isinstance(C, bool) or C <= 0:
        raise ConfigError(f"C must be a positive number, got {C!r}.")
    est = make_pipeline(StandardScaler(), LogisticRegression(C=C, max_iter=max_iter))
    est.fit(xtr, ytr)
    pred = est.predict(xte)
    per_class = {int(c): float((pred[yte == c] == c).mean()) for c in np.unique(yte)}
    return ProbeResult(float((pred == yte).mean()), per_class, xtr.shape[1], est)


def compare_probes(
    source: Any,
    train_data: Any,
    train_labels: Sequence[int] | np.ndarray,
    test_data: Any,
    test_labels: Sequence[int] | np.ndarray,
    *,
    layer: str,
    pool: str = "mean",
    C: float = 1.0,
    batch_size: int = 128,
    virtual_channels: Sequence[int] | None = None,
    progress: bool = False,
) -> ProbeComparison:
    """Held-out accuracy of linear probes on the original channels vs the pure virtual neurons.

    Args:
        source: a :class:`~purenn.PurifiedModel`, an ONNX Runtime session or an ``.onnx`` path.
        train_data: data to fit the probes on (see :func:`extract_features`).
        train_labels: labels of ``train_data`` (e.g. fine classes).
        test_data: held-out data.
        test_labels: labels of ``test_data``.
        layer: the purified layer to probe.
        pool: spatial pooling of the features.
        C: inverse L2 regularisation strength of the probes.
        batch_size: samples per forward pass.
        virtual_channels: needed for an ONNX source (see :func:`extract_features`).
        progress: show progress bars (stderr) for the four feature passes.

    Example:
        >>> cmp = compare_probes(pm, train_x, fine_train, test_x, fine_test, layer="layer4")   # doctest: +SKIP
        >>> cmp.original.accuracy, cmp.pure.accuracy, cmp.gain                               # doctest: +SKIP
    """
    kw = {"layer": layer, "pool": pool, "batch_size": batch_size, "virtual_channels": virtual_channels,
          "progress": progress}
    pure = (
        extract_features(source, train_data, kind="pure", desc="pure features, train", **kw),
        extract_features(source, test_data, kind="pure", desc="pure features, test", **kw),
    )
    orig = (
        extract_features(source, train_data, kind="original", desc="channels, train", **kw),
        extract_features(source, test_data, kind="original", desc="channels, test", **kw),
    )
    return ProbeComparison(
        layer=layer,
        original=fit_probe(orig[0], train_labels, orig[1], test_labels, C=C),
        pure=fit_probe(pure[0], train_labels, pure[1], test_labels, C=C),
    )
