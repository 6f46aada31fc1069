"""A static HTML report of a purified model and its data: ``index.html`` with PNG images beside it.

:func:`write_report` writes one folder that any browser opens offline (no server, no network, no
script from elsewhere): the base model and its purified layers; a table of the purified neurons
(those split into two or more virtual neurons), sortable by any column with a small inline script;
and, per neuron, the strongest reference images of each virtual neuron, the 2-D embedding of its
circuits (the embedding of :mod:`purenn.analysis.viz`, drawn as inline SVG), the class shares of each virtual
neuron's references when labels are given, and which virtual neurons are suppressed. The reference
samples are stored as indices into the purification data, so ``data`` must be that data.

The folder is built next to the target and renamed into place: a report appears complete or not at
all, and an earlier report at the same path is replaced only once the new one is written.

Example:
    >>> import torch, torchvision, purenn
    >>> from purenn.analysis.report import write_report
    >>> model = torchvision.models.resnet18(num_classes=3).eval()
    >>> data = torch.rand(24, 3, 32, 32)
    >>> pm = purenn.purify_model(model, ["layer4"], data, n_refs=8, neurons={"layer4": [5, 9]}, progress=False)
    >>> write_report(pm, data, "report", progress=False)            # doctest: +SKIP
    PosixPath('report/index.html')
"""

from __future__ import annotations

import datetime
import html
import os
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from purenn._version import __version__
from purenn.common.choices import score_text
from purenn.errors import ConfigError, DataError

__all__ = ["write_report", "report_neurons", "GENERATOR"]

#: content of the page's ``<meta name="generator">``; a folder whose index.html has it may be replaced
GENERATOR = "purenn report"
#: colours of clusters 0, 1, 2, ... (as in purenn.analysis.viz)
_CLUSTER_COLOURS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f")
#: colours of classes in the concept-share bars (matplotlib's tab20, dark shades first)
_CLASS_COLOURS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
                  "#bcbd22", "#17becf", "#aec7e8", "#ffbb78", "#98df8a", "#ff9896", "#c5b0d5", "#c49c94",
                  "#f7b6d2", "#c7c7c7", "#dbdb8d", "#9edae5")
_THUMB = 128  # longest side of a reference image file, in pixels
_REPORT_FILES = {"index.html", "img"}


def _e(value: Any) -> str:
    """``value`` as text escaped for HTML content and quoted attributes."""
    return html.escape(str(value), quote=True)


@dataclass
class _Virtual:
    name: str
    index: int
    n_refs: int
    suppressed: bool
    samples: list[int]  # data indices of the references shown, strongest first
    shares: list[tuple[int, int]] = field(default_factory=list)  # (label, count), most frequent first


@dataclass
class _Neuron:
    layer: str
    channel: int
    score: float
    upstream: str
    virtual: list[_Virtual]
    points: np.ndarray
    clusters: np.ndarray
    centroids: np.ndarray | None

    @property
    def anchor(self) -> str:
        return f"n-{self.layer}-{self.channel}"


def report_neurons(pm: Any, layers: Sequence[str] | None = None, top: int | None = None) -> list[tuple[str, int]]:
    """The purified neurons a report shows: ``(layer, channel)`` of every neuron split into two or more
    virtual neurons, highest score first (ties: layer order, then channel), at most ``top`` of them.

    Example:
        >>> report_neurons(pm, top=2)                                  # doctest: +SKIP
        [('layer4', 5), ('layer4', 9)]
    """
    names = list(pm.layers) if layers is None else list(layers)
    rows = []
    for li, name in enumerate(names):
        pl = pm.pure_layer(name)
        for ch, score, n_cl in zip(pl.neurons.tolist(), pl.scores.tolist(), pl.n_clusters.tolist()):
            if n_cl > 1:
                rows.append((-float(score), li, ch, name))
    rows.sort()
    return [(name, ch) for _, _, ch, name in rows[:top]]


def _check_out(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise ConfigError(f"cannot write the report to {str(out)!r}: it is a file; give a folder name.")
    if not out.parent.is_dir():
        raise ConfigError(f"cannot write the report to {str(out)!r}: folder {str(out.parent)!r} does not exist.")
    if out.is_dir():
        entries = {p.name for p in out.iterdir()}
        index = out / "index.html"
        ours = index.is_file() and f'name="generator" content="{GENERATOR}' in index.read_text(errors="replace")[:2000]
        if entries and not (entries <= _REPORT_FILES and ours):
            raise ConfigError(f"cannot write the report to {str(out)!r}: the folder holds other files; give a new or "
                              "empty folder (an earlier purenn report there is replaced).")


def _check_labels(labels: Any, n: int, class_names: Sequence[str] | None) -> np.ndarray | None:
    if labels is None:
        if class_names is not None:
            raise ConfigError("class_names need labels: pass the label of every data sample as well.")
        return None
    try:
        lab = np.array(labels).reshape(-1)
    except Exception:
        raise DataError(f"labels must be a sequence of integers, got {type(labels).__name__}.") from None
    if lab.dtype.kind not in "iub" and not (lab.dtype.kind == "f" and np.all(np.isfinite(lab)) and
                                           np.array_equal(lab, np.round(lab))):
        raise DataError(f"labels must be integers (one class index per data sample), got dtype {lab.dtype}.")
    if len(lab) != n:
        raise DataError(f"labels has {len(lab)} entries but the data has {n} samples; give one label per sample.")
    if len(lab) and lab.min() < 0:
        raise DataError(f"labels must be non-negative class indices, got {int(lab.min())}.")
    return lab.astype(np.int64)


def _class_name(label: int, class_names: Sequence[str] | None) -> str:
    return str(class_names[label]) if class_names is not None and label < len(class_names) else str(label)


def _write_image(x: Any, path: Path) -> None:
    from PIL import Image

    from purenn.analysis.viz import _as_image

    img, _ = _as_image(x)
    pixels = (np.clip(img, 0, 1) * 255).round().astype(np.uint8)
    image = Image.fromarray(pixels)  # (H, W) uint8 -> L, (H, W, 3) -> RGB
    if max(image.size) > _THUMB:
        image.thumbnail((_THUMB, _THUMB))
    image.save(path, format="PNG")


def _collect(pm: Any, layer: str, channel: int, data: Any, labels: np.ndarray | None, n_images: int, embedding: str,
             seed: int, batch_size: int, img_dir: Path, written: set[int]) -> _Neuron:
    from purenn.analysis.viz import embed_2d, neuron_circuits

    pl = pm.pure_layer(layer)
    k = pl.neurons.tolist().index(channel)
    info = neuron_circuits(pm, layer, channel, data, batch_size=batch_size)
    clusters, indices = info["clusters"], info["indices"]
    pts, cpts = embed_2d(info["circuits"], method=embedding, seed=seed, extra=info["centroids"])
    counts, weights = pl.ref_counts[k].tolist(), pl.merge_weight.tolist()
    virtual = []
    for c in range(int(pl.n_clusters[k])):
        members = np.flatnonzero(clusters == c)
        shown = [int(indices[j]) for j in members[:n_images]]
        for j in members[:n_images]:
            sample = int(indices[j])
            if sample not in written:
                _write_image(info["images"][j], img_dir / f"s{sample}.png")
                written.add(sample)
        shares: list[tuple[int, int]] = []
        if labels is not None and len(members):
            values, n = np.unique(labels[indices[members]], return_counts=True)
            order = np.lexsort((values, -n))
            shares = [(int(values[i]), int(n[i])) for i in order]
        v = pm.virtual_index(layer, channel, c)
        virtual.append(_Virtual(f"{channel}.{c}", v, int(counts[c]), weights[v] == 0, shown, shares))
    return _Neuron(layer, channel, float(pl.scores[k]), pl.upstream, virtual, pts, clusters, cpts)


# ---------------------------------------------------------------------------------------------- HTML
_CSS = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:0 auto;max-width:1200px;
padding:0 18px 40px;color:#1d2330;background:#fff}
h1{font-size:22px;margin:20px 0 4px}h2{font-size:18px;margin:28px 0 8px;border-bottom:1px solid #dde}
h3{font-size:15px;margin:0 0 8px}h3 small{font-weight:normal;color:#556}
.meta,.note{color:#556}.note{max-width:900px}
table{border-collapse:collapse;margin:6px 0}th,td{padding:3px 9px;border-bottom:1px solid #e4e6ee;text-align:left;
vertical-align:top}td.num,th.num{text-align:right}
table.sortable th{padding:0}table.sortable th button{all:unset;cursor:pointer;display:block;padding:3px 9px;
font-weight:bold}table.sortable th button:focus-visible{outline:2px solid #1f77b4}
th[aria-sort=ascending] button::after{content:" \\25B2";font-size:10px}
th[aria-sort=descending] button::after{content:" \\25BC";font-size:10px}
tr:hover td{background:#f5f7fc}
.off{display:inline-block;padding:0 5px;border-radius:3px;background:#d62728;color:#fff;font-size:11px}
.neuron{border:1px solid #dde;border-radius:6px;padding:12px 14px;margin:14px 0}
.neuron-body{display:flex;gap:18px;flex-wrap:wrap;align-items:flex-start}
.virtuals{flex:1 1 560px;min-width:0}
.vrow{display:flex;gap:10px;align-items:flex-start;margin:0 0 10px;padding-left:8px;border-left:5px solid}
.vrow.suppressed{opacity:.55}
.vlabel{width:118px;flex:none;font-size:12px}.vlabel b{font-size:14px}
.refs{display:flex;flex-wrap:wrap;gap:4px}
.refs figure{margin:0;width:64px;text-align:center;font-size:10px;color:#445;overflow:hidden}
.refs img{width:64px;height:64px;object-fit:contain;image-rendering:pixelated;background:#000;display:block}
.refs figcaption{white-space:nowrap;overflow:hidden;text-overflow:ellipsis}
.shares{margin-top:4px;font-size:11px;color:#445}
.bar{display:flex;height:9px;width:300px;border-radius:2px;overflow:hidden;background:#eee;margin-bottom:2px}
.embed{margin:0;flex:none;font-size:12px;color:#445}.embed svg{border:1px solid #dde;background:#fcfcfe}
.legend span{display:inline-block;margin-right:10px}.dot{display:inline-block;width:9px;height:9px;border-radius:50%;
margin-right:3px;vertical-align:-1px}
"""

_SCRIPT = """
(function () {
  function key(row, i, numeric) {
    var cell = row.cells[i], v = cell.getAttribute("data-value");
    if (v === null) v = cell.textContent.trim();
    return numeric ? parseFloat(v) : v.toLowerCase();
  }
  document.querySelectorAll("table.sortable").forEach(function (table) {
    var heads = table.tHead.rows[0].cells, body = table.tBodies[0];
    Array.prototype.forEach.call(heads, function (th, i) {
      var button = th.querySelector("button");
      if (!button) return;
      button.addEventListener("click", function () {
        var numeric = th.getAttribute("data-type") === "num";
        var dir = th.getAttribute("aria-sort") === "ascending" ? -1 : 1;
        var rows = Array.prototype.slice.call(body.rows);
        rows.sort(function (a, b) {
          var x = key(a, i, numeric), y = key(b, i, numeric);
          var c = x < y ? -1 : x > y ? 1 : 0;
          return c * dir || (+a.getAttribute("data-order")) - (+b.getAttribute("data-order"));
        });
        rows.forEach(function (r) { body.appendChild(r); });
        Array.prototype.forEach.call(heads, function (h) { h.removeAttribute("aria-sort"); });
        th.setAttribute("aria-sort", dir > 0 ? "ascending" : "descending");
      });
    });
  });
})();
"""


def _svg(neuron: _Neuron, width: int = 280, height: int = 240) -> str:
    pts = np.nan_to_num(np.asarray(neuron.points, dtype=np.float64))
    extra = None if neuron.centroids is None else np.nan_to_num(np.asarray(neuron.centroids, dtype=np.float64))
    allp = pts if extra is None else np.concatenate([pts, extra])
    pad = 14
    lo = allp.min(0) if len(allp) else np.zeros(2)
    span = (allp.max(0) - lo) if len(allp) else np.ones(2)
    scale = min((width - 2 * pad) / span[0] if span[0] > 0 else np.inf,
                (height - 2 * pad) / span[1] if span[1] > 0 else np.inf)
    scale = 1.0 if not np.isfinite(scale) else scale
    centre = lo + span / 2

    def xy(p: np.ndarray) -> tuple[float, float]:
        return width / 2 + (p[0] - centre[0]) * scale, height / 2 - (p[1] - centre[1]) * scale

    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" viewBox="0 0 {width} '
             f'{height}" role="img" aria-label="{_e(f"circuits of {neuron.layer} neuron {neuron.channel}")}">']
    for p, c in zip(pts, neuron.clusters.tolist()):
        x, y = xy(p)
        colour = _CLUSTER_COLOURS[c % len(_CLUSTER_COLOURS)]
        parts.append(f'<circle cx="{x:.1f}" cy="{y:.1f}" r="3.2" fill="{colour}" fill-opacity="0.8">'
                     f"<title>{_e(f'{neuron.channel}.{c}')}</title></circle>")
    if extra is not None:
        for c, p in enumerate(extra):
            x, y = xy(p)
            colour = _CLUSTER_COLOURS[c % len(_CLUSTER_COLOURS)]
            parts.append(f'<path d="M{x - 6:.1f},{y - 6:.1f}L{x + 6:.1f},{y + 6:.1f}M{x - 6:.1f},{y + 6:.1f}'
                         f'L{x + 6:.1f},{y - 6:.1f}" stroke="#000" stroke-width="5" stroke-linecap="round"/>'
                         f'<path d="M{x - 6:.1f},{y - 6:.1f}L{x + 6:.1f},{y + 6:.1f}M{x - 6:.1f},{y + 6:.1f}'
                         f'L{x + 6:.1f},{y - 6:.1f}" stroke="{colour}" stroke-width="3" stroke-linecap="round">'
                         f"<title>{_e(f'centroid of {neuron.channel}.{c}')}</title></path>")
    parts.append("</svg>")
    return "".join(parts)


def _shares_html(v: _Virtual, class_names: Sequence[str] | None) -> str:
    total = sum(n for _, n in v.shares)
    if not total:
        return ""
    segs = "".join(
        f'<span style="width:{100 * n / total:.2f}%;background:{_CLASS_COLOURS[lab % len(_CLASS_COLOURS)]}" '
        f'title="{_e(f"{_class_name(lab, class_names)}: {n} of {total}")}"></span>' for lab, n in v.shares)
    text = ", ".join(f"{_e(_class_name(lab, class_names))} {100 * n / total:.0f}%" for lab, n in v.shares[:3])
    more = f", {len(v.shares) - 3} more" if len(v.shares) > 3 else ""
    return f'<div class="shares"><div class="bar">{segs}</div>classes of the {total} references: {text}{more}</div>'


def _purity(n: _Neuron) -> float | None:
    """Share of the references whose class is the most frequent class of their virtual neuron."""
    total = sum(cnt for v in n.virtual for _, cnt in v.shares)
    return sum(v.shares[0][1] for v in n.virtual if v.shares) / total if total else None


def _neuron_html(n: _Neuron, labels: np.ndarray | None, class_names: Sequence[str] | None) -> str:
    rows = []
    for c, v in enumerate(n.virtual):
        colour = _CLUSTER_COLOURS[c % len(_CLUSTER_COLOURS)]
        figs = []
        for s in v.samples:
            caption = _class_name(int(labels[s]), class_names) if labels is not None else f"#{s}"
            figs.append(f'<figure><img src="img/s{s}.png" alt="{_e(f"sample {s}")}" title="{_e(f"sample {s}")}" '
                        f'loading="eager"><figcaption>{_e(caption)}</figcaption></figure>')
        off = ' <span class="off">suppressed</span>' if v.suppressed else ""
        empty = "" if figs else '<span class="meta">no references</span>'
        rows.append(f'<div class="vrow{" suppressed" if v.suppressed else ""}" style="border-color:{colour}">'
                    f'<div class="vlabel"><b style="color:{colour}">{_e(v.name)}</b>{off}<br>virtual index {v.index}'
                    f'<br>{v.n_refs} reference{"" if v.n_refs == 1 else "s"}</div>'
                    f'<div><div class="refs">{"".join(figs)}{empty}</div>'
                    f"{_shares_html(v, class_names)}</div></div>")
    legend = "".join(f'<span><i class="dot" style="background:{_CLUSTER_COLOURS[c % len(_CLUSTER_COLOURS)]}"></i>'
                     f"{_e(v.name)}</span>" for c, v in enumerate(n.virtual))
    marks = "; &#x2716; centroids" if n.centroids is not None else ""
    return (f'<article class="neuron" id="{_e(n.anchor)}"><h3>{_e(n.layer)} neuron {n.channel} <small>score '
            f"{n.score:.3f} &middot; {len(n.virtual)} virtual neurons &middot; upstream {_e(n.upstream)}</small></h3>"
            f'<div class="neuron-body"><div class="virtuals">{"".join(rows)}</div><figure class="embed">{_svg(n)}'
            f'<figcaption>its {len(n.points)} circuits in 2-D{marks}<div class="legend">{legend}</div></figcaption>'
            "</figure></div></article>")


def _score_note(pm: Any) -> str:
    """The page's sentence on what the scores measure, per kind of score present (``PureLayer.score_kind``)."""
    kinds: dict[Any, list[str]] = {}
    for name in pm.layers:
        kinds.setdefault(pm.pure_layer(name).score_kind, []).append(name)
    if set(kinds) <= {"contrast", "silhouette", "contrast+upstream", None}:
        return ("The <b>score</b> rates how clearly the references' circuits fall into separate groups (higher: more "
                "polysemantic)" + (", times how clearly the upstream layer's pooled activations at the same "
                                   "references do" if "contrast+upstream" in kinds else "") + ".")
    return "The <b>score</b> is, per layer: " + "; ".join(
        f"{_e(', '.join(layers))}: {_e(score_text(kind))}" for kind, layers in kinds.items()) + "."


def _th(label: str, numeric: bool = False, sort: str | None = None, sortable: bool = True, hint: str = "") -> str:
    attrs = ' class="num" data-type="num"' if numeric else ' data-type="text"'
    attrs += f' aria-sort="{sort}"' if sort else ""
    attrs += f' title="{_e(hint)}"' if hint else ""
    inner = f'<button type="button">{_e(label)}</button>' if sortable else _e(label)
    return f"<th{attrs}>{inner}</th>"


def _table_html(neurons: list[_Neuron], class_names: Sequence[str] | None, with_labels: bool) -> str:
    heads = [_th("Layer"), _th("Channel", True), _th("Score", True, "descending"), _th("Virtual neurons", True),
             _th("References per virtual neuron", True, hint="sorts by the smallest virtual neuron's share")]
    if with_labels:
        heads += [_th("Top class per virtual neuron"),
                  _th("Label purity", True, hint="share of references of their virtual neuron's most frequent class")]
    heads.append(_th("Suppressed", True, hint="suppressed virtual neurons"))
    body = []
    for order, n in enumerate(neurons):
        refs = " : ".join(str(v.n_refs) for v in n.virtual)
        off = [v.name for v in n.virtual if v.suppressed]
        balance = min(v.n_refs for v in n.virtual) / max(1, sum(v.n_refs for v in n.virtual))
        cells = [f'<td><a href="#{_e(n.anchor)}">{_e(n.layer)}</a></td>',
                 f'<td class="num"><a href="#{_e(n.anchor)}">{n.channel}</a></td>',
                 f'<td class="num" data-value="{n.score!r}">{n.score:.4f}</td>',
                 f'<td class="num">{len(n.virtual)}</td>',
                 f'<td class="num" data-value="{balance!r}">{refs}</td>']
        if with_labels:
            tops = "; ".join(f"{_e(v.name)} {_e(_class_name(v.shares[0][0], class_names))}" for v in n.virtual
                             if v.shares)
            purity = _purity(n)
            cells += [f"<td>{tops}</td>", f'<td class="num" data-value="{-1.0 if purity is None else purity!r}">'
                      f'{"" if purity is None else f"{100 * purity:.0f}%"}</td>']
        cells.append(f'<td class="num" data-value="{len(off)}">{_e(", ".join(off))}</td>')
        body.append(f'<tr data-order="{order}">{"".join(cells)}</tr>')
    return (f'<table id="neurons-table" class="sortable"><thead><tr>{"".join(heads)}</tr></thead>'
            f'<tbody>{"".join(body)}</tbody></table>')


def _model_html(pm: Any, arch: dict[str, Any], shown: dict[str, int]) -> str:
    from purenn.attribution.rules import rule_text

    stem = arch.get("stem") or {}
    kernel = "x".join(map(str, stem.get("kernel_size", [])))
    pool = "with max-pool" if stem.get("maxpool") else "without max-pool"
    base = (f"{arch.get('builder') or 'custom ResNet'}: {arch.get('block')} blocks {arch.get('layers')}, "
            f"{arch.get('num_classes')} classes, {arch.get('in_channels')} input channel(s), stem {kernel} stride "
            f"{(stem.get('stride') or ['?'])[0]} {pool}")
    rows = []
    for name in pm.layers:
        pl = pm.pure_layer(name)
        values = [pl.upstream, pl.gate, rule_text(pl.rule.config()), "yes" if pl.skip_aware else "no", pl.channels,
                  len(pl.neurons), int((pl.n_clusters > 1).sum()), shown.get(name, 0), pl.n_virtual,
                  int((pl.merge_weight == 0).sum())]
        rows.append(f"<tr><td>{_e(name)}</td>" + "".join(
            f'<td class="num">{_e(v)}</td>' if isinstance(v, int) else f"<td>{_e(v)}</td>" for v in values) + "</tr>")
    heads = "".join(f"<th>{h}</th>" for h in ("layer", "upstream", "gate", "rule", "skip-aware", "channels",
                                             "fitted", "purified", "in this report", "virtual neurons",
                                             "suppressed"))
    return (f"<p><b>Base model:</b> {_e(base)}</p>"
            f'<table id="layers-table"><thead><tr>{heads}</tr></thead><tbody>{"".join(rows)}</tbody></table>')


def _suppressed_html(pm: Any, anchors: set[str]) -> str:
    rows = [v for v in pm.virtual_neurons if v.suppressed]
    if not rows:
        return '<p class="meta" id="suppressed-none">No virtual neuron is suppressed: the model computes the same ' \
               "logits as the base model.</p>"
    body = []
    for v in rows:
        anchor = f"n-{v.layer}-{v.channel}"
        name = f"{v.channel}.{v.cluster}" if v.score is not None else f"{v.channel} (whole channel)"
        link = f'<a href="#{_e(anchor)}">{_e(name)}</a>' if anchor in anchors else _e(name)
        score = "" if v.score is None else f"{v.score:.4f}"
        body.append(f'<tr><td>{_e(v.layer)}</td><td class="num">{v.index}</td><td>{link}</td>'
                    f'<td class="num">{v.n_refs}</td><td class="num">{score}</td></tr>')
    return ('<p class="note">Their merge weight is 0: whatever input selects them, they add nothing to their channel, '
            "so the model no longer uses what they stand for.</p>"
            '<table id="suppressed-table"><thead><tr><th>layer</th><th class="num">virtual index</th>'
            '<th>virtual neuron</th><th class="num">references</th><th class="num">score</th></tr></thead>'
            f'<tbody>{"".join(body)}</tbody></table>')


def _page(pm: Any, neurons: list[_Neuron], labels: np.ndarray | None, class_names: Sequence[str] | None,
          title: str, data_description: str | None, embedding: str, n_split: int) -> str:
    from purenn.io.architecture import describe_architecture

    arch = describe_architecture(pm.base_model)
    shown: dict[str, int] = {}
    for n in neurons:
        shown[n.layer] = shown.get(n.layer, 0) + 1
    anchors = {n.anchor for n in neurons}
    when = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    data = f"<p><b>Data:</b> {_e(data_description)}</p>" if data_description else ""
    method = "PCA" if embedding == "pca" else "t-SNE"
    count = (f"{len(neurons)} purified neurons" if len(neurons) == n_split
             else f"The {len(neurons)} highest-scoring of {n_split} purified neurons")
    table = _table_html(neurons, class_names, labels is not None) if neurons else \
        '<p class="meta">No neuron of these layers is split into two or more virtual neurons.</p>'
    details = "".join(_neuron_html(n, labels, class_names) for n in neurons)
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="generator" content="{GENERATOR} {_e(__version__)}">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{_e(title)}</title>
<style>{_CSS}</style>
</head>
<body>
<header><h1>{_e(title)}</h1><p class="meta">written by purenn {_e(__version__)} on {when}</p></header>
<section id="model"><h2>Model</h2>{data}{_model_html(pm, arch, shown)}
<p class="note">A <b>channel</b> of a layer is one of its neurons. A <b>purified neuron</b> is a channel split into
<b>virtual neurons</b> k.0, k.1, ...: for each input, the virtual neuron whose circuit (the relevance of the upstream
channels to this channel) is nearest to the input's circuit carries the channel's whole activation, the others carry
zero, so their sum is the original channel. <b>References</b> are the inputs that activate the channel most; each is
assigned to one virtual neuron. {_score_note(pm)}</p></section>
<section id="neurons"><h2>Purified neurons</h2>
<p class="meta">{_e(count)}. Click a column header to sort; click a layer or channel to see the neuron.
{"Label purity: the share of references whose class is the most frequent class of their virtual neuron."
 if labels is not None else ""}</p>
{table}</section>
<section id="suppressed"><h2>Suppressed virtual neurons</h2>{_suppressed_html(pm, anchors)}</section>
<section id="details"><h2>Neurons</h2>
<p class="note">Per virtual neuron: its strongest references (most activating first){
", captioned with their class, and the class shares of all its references" if labels is not None else ""}. Right: the
circuit of every reference in 2-D ({method}), coloured by virtual neuron.</p>
{details}</section>
<script>{_SCRIPT}</script>
</body>
</html>
"""


# ---------------------------------------------------------------------------------------------- writing
def _replace_dir(tmp: Path, out: Path) -> None:
    """Move the finished ``tmp`` to ``out``; an earlier report at ``out`` is removed only afterwards."""
    old = None
    if out.exists():
        old = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.old-"))
        os.rmdir(old)
        os.rename(out, old)
    try:
        os.rename(tmp, out)
    except BaseException:
        if old is not None:
            os.rename(old, out)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def write_report(
    pm: Any,
    data: Any,
    out: str | os.PathLike,
    labels: Any = None,
    class_names: Sequence[str] | None = None,
    *,
    layers: Sequence[str] | None = None,
    top: int | None = None,
    n_images: int = 8,
    embedding: str = "pca",
    seed: int = 0,
    title: str | None = None,
    data_description: str | None = None,
    batch_size: int = 64,
    progress: bool = True,
) -> Path:
    """Write a static HTML report of a purified model to the folder ``out`` and return its ``index.html``.

    The folder holds ``index.html`` and ``img/`` with one PNG per reference sample shown; it opens
    offline in any browser. ``pm`` and ``data`` are only read.

    Args:
        pm: a :class:`~purenn.PurifiedModel` (e.g. from :func:`purenn.load_purified`).
        data: the data the model was purified on (Tensor, map-style Dataset or unshuffled DataLoader),
            since reference samples are stored as indices into it.
        out: the report folder; created, or replaced if it holds an earlier purenn report.
        labels: optional ``(N,)`` integer class of every data sample: captions and concept shares.
        class_names: optional names indexed by ``labels``.
        layers: purified layers to report (default: all).
        top: report at most this many purified neurons, the highest scores (default: all).
        n_images: reference images shown per virtual neuron.
        embedding: ``"pca"`` or ``"tsne"``, the 2-D embedding of each neuron's circuits.
        seed: seed of the embedding.
        title: heading of the page (default "purenn report").
        data_description: one line on the data, shown under the model.
        batch_size: samples per relevance pass.
        progress: show a progress bar over the neurons.

    Returns:
        The path of ``index.html``.

    Raises:
        ConfigError: ``pm`` is not a PurifiedModel, an option is out of range, a layer is not purified,
            or ``out`` is a file, lies in a missing folder, or is a folder holding other files.
        DataError: the data is not the purification data (too short), or the labels do not fit it.

    Example:
        >>> index = write_report(pm, data, "report", labels=y, class_names=["cat", "dog"])  # doctest: +SKIP
        >>> index.name                                                                      # doctest: +SKIP
        'index.html'
    """
    from purenn.analysis.viz import EMBEDDINGS
    from purenn.fit.data import DataSource
    from purenn.fit.refcheck import check_references
    from purenn.model.purified import PurifiedModel

    if not isinstance(pm, PurifiedModel):
        raise ConfigError(f"write_report needs a PurifiedModel, got {type(pm).__name__}.")
    if isinstance(n_images, bool) or not isinstance(n_images, int) or n_images < 1:
        raise ConfigError(f"n_images must be a positive integer, got {n_images!r}.")
    if top is not None and (isinstance(top, bool) or not isinstance(top, int) or top < 1):
        raise ConfigError(f"top must be a positive integer or None, got {top!r}.")
    if embedding not in EMBEDDINGS:
        raise ConfigError(f"embedding must be one of {EMBEDDINGS}, got {embedding!r}.")
    names = list(pm.layers) if layers is None else list(dict.fromkeys(layers))
    for name in names:
        pm.pure_layer(name)  # a LayerError names the purified layers
    out = Path(out)
    _check_out(out)
    n_data = len(DataSource.from_data(data, batch_size))
    check_references(pm, data, batch_size=batch_size)  # the data the reference indices point into
    lab = _check_labels(labels, n_data, class_names)
    chosen = report_neurons(pm, names, top)
    for name, channel in chosen:  # all data checks before anything is written
        pl = pm.pure_layer(name)
        idx = pl.ref_indices[pl.neurons.tolist().index(channel)]
        if idx.numel() == 0:
            raise DataError(f"the model holds no reference samples for {name!r}; purify it again to write a report.")
        if int(idx.max()) >= n_data:
            raise DataError(f"the references of {name}:{channel} point to sample {int(idx.max())}, but the data has "
                            f"{n_data} samples; pass the same data (and limit) the model was purified on.")
    n_split = sum(int((pm.pure_layer(name).n_clusters > 1).sum()) for name in names)

    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.tmp-"))
    try:
        (tmp / "img").mkdir()
        written: set[int] = set()
        neurons = []
        steps: Any = chosen
        if progress:
            from tqdm.auto import tqdm

            steps = tqdm(chosen, desc="report", unit="neuron")
        for name, channel in steps:
            neurons.append(_collect(pm, name, channel, data, lab, n_images, embedding, seed, batch_size,
                                    tmp / "img", written))
        page = _page(pm, neurons, lab, class_names, title or "purenn report", data_description, embedding, n_split)
        (tmp / "index.html").write_text(page, encoding="utf-8")
        os.chmod(tmp, 0o755)  # mkdtemp makes the folder private; a report is for reading
        _replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out / "index.html"
