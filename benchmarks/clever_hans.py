"""Clever Hans on Fashion-MNIST: remove a learned shortcut, keep what the model knows.

Small ResNets (fixed seeds) are trained on the ten Fashion-MNIST classes with an artifact stamped
on most training images of one class (``--artifact-class``, default T-shirt/top): a small bright
patch in the top-left corner, or a thin vertical line near the right edge. The model learns to use
it. On the test split (never used for fitting anything):

- *artifact reliance*: share of stamped test images of the other classes predicted as the artifact
  class, minus that share without the stamp; "removed" is the fraction of it a method takes away;
- clean accuracy (overall and of the artifact class) on unstamped test images; "cost" is the drop.

Every method sees the same ``--n-pairs`` training images (not used to train the model) with and
without the stamp, so at most 2 x 50 = 100 labelled examples, and acts at the same layer:

- ``purenn:GATE``: :func:`purenn.fit.concept.purify_concept` splits the ``M`` channels most relevant to
  the artifact (the stamp's effect on their gradient x activation for the artifact class's logit
  margin, :func:`purenn.fit.concept.rank_concept_channels` with ``target=``) into a concept and a rest
  virtual neuron (centroids of the gate's features on stamped and clean examples; three k-means
  centroids for the clean ones, ``--rest-clusters``) and suppresses the concept parts; knob ``M``;
  one method per gate of ``--gates``: ``joint-circuit`` (the default of purify_concept: one circuit
  for the M channels together), ``circuit`` (PURE's, one per channel), ``map`` (forward only);
- ``ablate``: sets the same ``M`` whole channels to zero;
- ``ablate_act``: sets the ``M`` channels the stamp raises most (activation difference) to zero;
- ``pclarc``: P-ClArC (Anders et al. 2022): a linear CAV (scikit-learn logistic regression on the
  layer's flattened activations, stamped vs clean) and the projection
  ``h - alpha * (v.(h - mean_clean)) v`` of every activation; knob ``alpha`` (1 is P-ClArC);
- ``rrclarc``: RR-ClArC (Dreyer et al., AAAI 2024): a copy of the model fine-tuned (``--rr-epochs`` on
  ``--rr-images`` of the poisoned training images, Adam, BatchNorm statistics fixed) with cross-entropy
  plus ``lambda`` times the squared gradient of the artifact class's logit along the same CAV;
  knob ``lambda``; its fine-tuning time is in the rows (``fit_s``).

    python benchmarks/clever_hans.py                   # 3 seeds x 2 artifacts
    python benchmarks/clever_hans.py --smoke           # tiny data, one model, < 2 min (CI)
    python benchmarks/clever_hans.py --only rrclarc --out runs/rr   # one baseline, to add to saved runs:
    python benchmarks/clever_hans.py --from-runs runs/a/runs.json runs/rr/runs.json   # later rows replace earlier

Results (JSON with every point, a Markdown summary, the trade-off figure) go to ``--out``
(default ``benchmarks/results/clever_hans[_smoke]``); trained weights are cached in
``$PURENN_CACHE`` or ``~/.cache/purenn``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from _common import log
from sklearn.linear_model import LogisticRegression

from purenn.analysis.unlearn import shortcut_metrics
from purenn.cli.datasets import ConceptDataset, cached_classifier, concept_data, small_image_resnet
from purenn.fit.concept import concept_virtual_indices, purify_concept, rank_concept_channels

HERE = Path(__file__).resolve().parent
ARTIFACTS = ("patch", "line")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--smoke", action="store_true", help="tiny data and one model (CI)")
    p.add_argument("--root", default=None, help="directory with the Fashion-MNIST IDX files")
    p.add_argument("--out", default=None, help="results directory")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--artifacts", default=",".join(ARTIFACTS))
    p.add_argument("--artifact-class", type=int, default=0)
    p.add_argument("--stamp-fraction", type=float, default=0.5)
    p.add_argument("--n-train", type=int, default=12000)
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--n-pairs", type=int, default=50, help="images shown with and without the artifact")
    p.add_argument("--n-test", type=int, default=1000)
    p.add_argument("--layer", default="layer4")
    p.add_argument("--only", default=None, metavar="METHODS",
                   help="run only these methods (comma-separated among purenn, ablate, pclarc, rrclarc), e.g. to add "
                   "a baseline to saved runs and combine them with --from-runs")
    p.add_argument("--gates", default="joint-circuit,circuit,map",
                   help="purify_concept gates to compare (comma-separated); each is a method purenn:GATE")
    p.add_argument("--rest-clusters", type=int, default=3, help="purify_concept's centroids for the clean examples")
    p.add_argument("--channels", default="8,32,64,128", help="knob M of purenn and ablate")
    p.add_argument("--alphas", default="0.25,0.5,0.75,1,1.5,2", help="knob alpha of P-ClArC")
    p.add_argument("--lambdas", default="10,100,1000,10000", help="knob lambda of RR-ClArC (empty: leave it out)")
    p.add_argument("--rr-images", type=int, default=3000, help="RR-ClArC: training images it fine-tunes on")
    p.add_argument("--rr-epochs", type=int, default=2, help="RR-ClArC: fine-tuning epochs")
    p.add_argument("--target", type=float, default=0.9, help="reliance removed at which costs are compared")
    p.add_argument("--stop", type=float, default=0.98, help="stop raising M once every channel method removes this")
    p.add_argument("--no-figure", action="store_true")
    p.add_argument("--from-runs", nargs="+", metavar="RUNS.JSON", help="summarise saved runs.json files instead")
    a = p.parse_args(argv)
    if a.smoke:
        a.seeds, a.artifacts, a.n_train, a.n_test, a.n_pairs = "0", "patch", 1500, 600, 20
        a.lambdas, a.rr_images, a.rr_epochs = "10", 256, 1
        a.channels, a.alphas = "8,32", "1"
    return a


def ints(text: str) -> list[int]:
    return [int(t) for t in text.split(",") if t.strip()]


# ----------------------------------------------------------------------------------------- data
def stamp(x: torch.Tensor, kind: str, value: float) -> torch.Tensor:
    """A copy of ``x`` ``(N, 1, 28, 28)`` with the artifact drawn in ``value`` (the brightest pixel)."""
    x = x.clone()
    if kind == "patch":
        x[..., 1:5, 1:5] = value
    elif kind == "line":
        x[..., 3:25, 25] = value
    else:
        raise ValueError(f"unknown artifact {kind!r}")
    return x


def poisoned(train: ConceptDataset, kind: str, cls: int, fraction: float, seed: int) -> ConceptDataset:
    """The training set with ``fraction`` of class ``cls`` stamped."""
    rng = np.random.default_rng(1000 + seed)
    idx = np.flatnonzero(train.fine.numpy() == cls)
    chosen = torch.from_numpy(np.sort(rng.choice(idx, size=int(round(fraction * len(idx))), replace=False)))
    images = train.images.clone()
    images[chosen] = stamp(images[chosen], kind, float(train.images.max()))
    return ConceptDataset(images, train.fine, pairs=train.pairs, class_names=train.class_names, source=train.source)


# ----------------------------------------------------------------------------------------- metrics
class Evaluator:
    """purenn.analysis.unlearn.shortcut_metrics on the test images and the stamped test images of the other classes."""

    def __init__(self, test: ConceptDataset, kind: str, cls: int, value: float) -> None:
        self.x, self.y, self.cls = test.images, test.fine.numpy(), cls
        other = self.y != cls
        self.stamped, self.y_stamped = stamp(self.x[torch.from_numpy(other)], kind, value), self.y[other]

    def __call__(self, model: torch.nn.Module) -> dict[str, float]:
        m = shortcut_metrics(model, self.x, self.y, self.stamped, self.y_stamped, self.cls, batch_size=500)
        return {"reliance": m["reliance"], "acc": m["acc"], "acc_cls": m["acc_target"]}


# ----------------------------------------------------------------------------------------- baselines
class Hooked(torch.nn.Module):
    """``model`` with ``hook`` applied to the output of its module ``layer`` (removed after each call)."""

    def __init__(self, model: torch.nn.Module, layer: str, hook: Callable) -> None:
        super().__init__()
        self.model, self.layer, self.hook = model, layer, hook

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.model.get_submodule(self.layer).register_forward_hook(lambda m, i, o: self.hook(o))
        try:
            return self.model(x)
        finally:
            h.remove()


def layer_acts(model: torch.nn.Module, layer: str, x: torch.Tensor) -> torch.Tensor:
    store = []
    with torch.no_grad():
        Hooked(model, layer, lambda o: store.append(o.detach()))(x)
    return store[0]


def cav(model, layer, concept, other, seed: int) -> torch.Tensor:
    """The artifact's CAV at ``layer``: unit normal of a logistic regression on the flattened activations."""
    a_c, a_o = layer_acts(model, layer, concept).flatten(1), layer_acts(model, layer, other).flatten(1)
    x = torch.cat([a_c, a_o]).double().numpy()
    y = np.r_[np.ones(len(a_c)), np.zeros(len(a_o))]
    clf = LogisticRegression(C=1.0, max_iter=5000, random_state=seed).fit(x, y)
    return torch.from_numpy(clf.coef_[0] / np.linalg.norm(clf.coef_[0])).float()


def pclarc(model, layer, concept, other, alpha: float, seed: int) -> Hooked:
    """P-ClArC: project the artifact's CAV out of the layer's activations (towards the clean mean)."""
    v = cav(model, layer, concept, other, seed)
    z = layer_acts(model, layer, other).flatten(1).mean(dim=0)

    def hook(o: torch.Tensor) -> torch.Tensor:
        h = o.flatten(1)
        return (h - alpha * ((h - z) @ v)[:, None] * v[None]).reshape(o.shape)

    return Hooked(model, layer, hook)


def rrclarc(model, layer, v: torch.Tensor, data: ConceptDataset, lam: float, seed: int, *, target: int, n: int,
            epochs: int, lr: float = 1e-4, batch_size: int = 64) -> torch.nn.Module:
    """RR-ClArC (Dreyer et al., AAAI 2024): fine-tune a copy of ``model`` on ``n`` training images with
    cross-entropy plus ``lam`` times the right-reason penalty ``(v . d z_t / d h)^2``: the gradient of
    the logit of ``target`` (the class the artifact points to) with respect to the layer's activations
    ``h``, along the CAV ``v``, on every image, so that moving along the artifact's direction no longer
    moves that logit."""
    import copy

    tuned = copy.deepcopy(model).train()
    for m in tuned.modules():  # keep BatchNorm's statistics: fine-tuning on a small set must not move them
        if isinstance(m, torch.nn.BatchNorm2d):
            m.eval()
    g = torch.Generator().manual_seed(seed)
    idx = torch.randperm(len(data.images), generator=g)[:n]
    x_all, y_all = data.images[idx], data.fine[idx]
    opt = torch.optim.Adam(tuned.parameters(), lr=lr)
    store: dict[str, torch.Tensor] = {}
    handle = tuned.get_submodule(layer).register_forward_hook(lambda m, i, o: store.__setitem__("h", o))
    try:
        for _ in range(epochs):
            order = torch.randperm(n, generator=g)
            for s in range(0, n, batch_size):
                b = order[s : s + batch_size]
                x, y = x_all[b], y_all[b]
                out = tuned(x)
                grad = torch.autograd.grad(out[:, target].sum(), store["h"], create_graph=True)[0]
                penalty = ((grad.flatten(1) @ v) ** 2).mean()
                loss = torch.nn.functional.cross_entropy(out, y) + lam * penalty
                opt.zero_grad()
                loss.backward()
                opt.step()
    finally:
        handle.remove()
    return tuned.eval()


def ablate(model, layer, channels: list[int]) -> Hooked:
    idx = torch.tensor(channels, dtype=torch.long)

    def hook(o: torch.Tensor) -> torch.Tensor:
        o = o.clone()
        o[:, idx] = 0
        return o

    return Hooked(model, layer, hook)


# ----------------------------------------------------------------------------------------- one model
def run_model(a: argparse.Namespace, kind: str, seed: int, train: ConceptDataset, pool: ConceptDataset,
              test: ConceptDataset) -> dict:
    value = float(train.images.max())
    data = poisoned(train, kind, a.artifact_class, a.stamp_fraction, seed)
    blocks = [1, 1, 1, 1]

    def build() -> torch.nn.Module:
        return small_image_resnet(blocks=blocks, stem_stride=2, num_classes=10)

    t = time.time()
    model, path, hit = cached_classifier(
        f"clever-hans-{kind}", build, data, config={"blocks": blocks, "stem_stride": 2}, target="fine",
        epochs=a.epochs, batch_size=128, lr=2e-3, seed=seed, progress=False,
    )
    log(f"{kind} seed {seed}: model {'from cache' if hit else f'trained in {time.time() - t:.0f} s'} ({path.name})")
    ev = Evaluator(test, kind, a.artifact_class, value)
    rng = np.random.default_rng(seed)
    pick = torch.from_numpy(np.sort(rng.choice(len(pool), size=a.n_pairs, replace=False)))
    other = pool.images[pick]
    concept = stamp(other, kind, value)
    base = ev(model)
    log(f"  original: reliance {base['reliance']:.3f}, clean acc {base['acc']:.3f}, class acc {base['acc_cls']:.3f}")
    rows = [{"method": "original", "knob": 0, **base}]
    want = set(a.only.split(",")) if a.only else {"purenn", "ablate", "pclarc", "rrclarc"}
    by_act = rank_concept_channels(model, a.layer, concept, other)
    by_rel = rank_concept_channels(model, a.layer, concept, other, target=a.artifact_class)
    for m in ints(a.channels) if want & {"purenn", "ablate"} else []:
        chans = by_rel.top(m)
        ours = []
        for gate in a.gates.split(",") if "purenn" in want and a.gates else []:
            t = time.time()
            pm = purify_concept(model, a.layer, concept, other, neurons={a.layer: chans}, gate=gate,
                                rest_clusters=a.rest_clusters, seed=seed)
            fit_s = time.time() - t
            with pm.suppress(a.layer, concept_virtual_indices(pm, a.layer)):
                r = ev(pm)
                sub = torch.arange(0, len(ev.x), max(1, len(ev.x) // 500))
                last = pm.pure_layer(a.layer).n_clusters - 1  # the concept part of each neuron
                g_clean = (pm.gates(ev.x[sub])[a.layer] == last).float().mean().item()
                g_st = (pm.gates(ev.stamped[sub[sub < len(ev.stamped)]])[a.layer] == last).float().mean().item()
            rows.append({"method": f"purenn:{gate}", "knob": len(chans), **r, "fit_s": fit_s,
                         "gate_concept_clean": g_clean, "gate_concept_stamped": g_st})
            ours.append(rows[-1])
            log(f"  M={len(chans):3d}: purenn:{gate} {r['reliance']:.3f}/{r['acc']:.3f} (concept gate on clean "
                f"{g_clean:.2f}, stamped {g_st:.2f}; fit {fit_s:.1f} s)")
        if "ablate" in want:
            rows.append({"method": "ablate", "knob": len(chans), **ev(ablate(model, a.layer, chans))})
            rows.append({"method": "ablate_act", "knob": m, **ev(ablate(model, a.layer, by_act.top(m)))})
            ours += rows[-2:]
            log(f"  M={len(chans):3d}: ablate same {rows[-2]['reliance']:.3f}/{rows[-2]['acc']:.3f}; "
                f"ablate by activation {rows[-1]['reliance']:.3f}/{rows[-1]['acc']:.3f}")
        if ours and max(o["reliance"] for o in ours) <= (1 - a.stop) * base["reliance"]:
            break  # every channel method is past --stop: larger M only costs more
    for alpha in [float(t) for t in a.alphas.split(",")] if "pclarc" in want and a.alphas else []:
        rows.append({"method": "pclarc", "knob": alpha, **ev(pclarc(model, a.layer, concept, other, alpha, seed))})
        log(f"  alpha={alpha}: pclarc {rows[-1]['reliance']:.3f}/{rows[-1]['acc']:.3f}")
    if "rrclarc" in want and a.lambdas:
        v = cav(model, a.layer, concept, other, seed)
        for lam in [float(t) for t in a.lambdas.split(",")]:
            t = time.time()
            tuned = rrclarc(model, a.layer, v, data, lam, seed, target=a.artifact_class,
                            n=min(a.rr_images, len(data.images)), epochs=a.rr_epochs)
            rows.append({"method": "rrclarc", "knob": lam, **ev(tuned), "fit_s": time.time() - t})
            log(f"  lambda={lam:g}: rrclarc {rows[-1]['reliance']:.3f}/{rows[-1]['acc']:.3f} "
                f"(fine-tuned {rows[-1]['fit_s']:.0f} s)")
    for r in rows:
        r["removed"] = 1 - r["reliance"] / base["reliance"] if base["reliance"] > 0 else float("nan")
        r["cost"] = base["acc"] - r["acc"]
        r["cost_cls"] = base["acc_cls"] - r["acc_cls"]
    return {"artifact": kind, "seed": seed, "rows": rows}


# ----------------------------------------------------------------------------------------- summary
def cost_at(rows: list[dict], method: str, target: float, key: str) -> float:
    """A method's cost at ``target`` reliance removed, interpolated along its curve (in knob order,
    starting from the original); NaN when the curve never gets there."""
    pts = [(0.0, 0.0)] + [(r["removed"], r[key]) for r in sorted(
        (r for r in rows if r["method"] == method), key=lambda r: r["knob"])]
    for (r0, c0), (r1, c1) in zip(pts, pts[1:]):
        if r0 >= target:
            return float(c0)
        if r1 >= target:
            return float(c0 + (c1 - c0) * (target - r0) / (r1 - r0))
    return float("nan")


def merge_runs(runs: list[dict]) -> list[dict]:
    """One run per (artifact, seed): the rows of later runs of the same model replace those of earlier
    ones method by method (a baseline run with ``--only`` completes or updates a saved run). Runs saved
    before the gates were compared name their one purenn method ``purenn``: the circuit gate."""
    merged: dict[tuple, dict] = {}
    for run in runs:
        for r in run["rows"]:
            r["method"] = "purenn:circuit" if r["method"] == "purenn" else r["method"]
        key = (run["artifact"], run["seed"])
        if key not in merged:
            merged[key] = {**run, "rows": list(run["rows"])}
            continue
        new = {r["method"] for r in run["rows"] if r["method"] != "original"}
        merged[key]["rows"] = [r for r in merged[key]["rows"] if r["method"] not in new] + \
            [r for r in run["rows"] if r["method"] != "original"]
    return list(merged.values())


def methods_of(runs: list[dict]) -> list[str]:
    """The methods in ``runs``: purenn's gates first (in order of appearance), then the baselines."""
    seen = list(dict.fromkeys(r["method"] for run in runs for r in run["rows"] if r["method"] != "original"))
    return [m for m in seen if m.startswith("purenn")] + [m for m in seen if not m.startswith("purenn")]


def summarise(runs: list[dict], target: float) -> str:
    methods = methods_of(runs)
    lines = ["| artifact | seed | original reliance | clean acc | class acc | "
             + " | ".join(methods) + " | P-ClArC (alpha = 1): removed / cost / class cost |",
             "|---|---|---|---|---|" + "---|" * len(methods) + "---|"]
    agg: dict[str, list[tuple[float, float]]] = {m: [] for m in methods}
    for run in runs:
        rows = run["rows"]
        o = rows[0]
        cells = []
        for m in agg:
            c, cc = cost_at(rows, m, target, "cost"), cost_at(rows, m, target, "cost_cls")
            agg[m].append((c, cc))
            cells.append("not reached" if np.isnan(c) else f"{100 * c:.2f} / {100 * cc:.2f}")
        p1 = [r for r in rows if r["method"] == "pclarc" and r["knob"] == 1.0]
        p1s = f"{p1[0]['removed']:.2f} / {100 * p1[0]['cost']:.2f} / {100 * p1[0]['cost_cls']:.2f}" if p1 else "-"
        head = f"| {run['artifact']} | {run['seed']} | {o['reliance']:.3f} | {o['acc']:.3f} | {o['acc_cls']:.3f} | "
        lines.append(head + " | ".join(cells) + f" | {p1s} |")
    mean = []
    for vals in agg.values():
        v = np.array(vals, dtype=float)
        reached = int((~np.isnan(v[:, 0])).sum())
        mean.append(f"{100 * np.nanmean(v[:, 0]):.2f} / {100 * np.nanmean(v[:, 1]):.2f} ({reached}/{len(v)})"
                    if reached else "not reached")
    lines.append("| mean | | | | | " + " | ".join(mean) + " | |")
    lines.append("")
    lines.append(f"Costs in accuracy points (clean test images, all classes / artifact class), interpolated along each "
                 f"method's knob at {target:.0%} of the artifact reliance removed; (n/m): models where reached.")
    return "\n".join(lines)


def figure(runs: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(10, 7), sharex=True, sharey="row")
    methods = methods_of(runs)
    palette = iter(["C0", "C4", "C5", "C6", "C7"])
    fixed = {"ablate": "C1", "ablate_act": "C3", "pclarc": "C2", "rrclarc": "C8"}
    colors = {m: next(palette) if m.startswith("purenn") else fixed[m] for m in methods}
    for col, kind in enumerate(ARTIFACTS):
        for row, (key, what) in enumerate((("cost", "clean accuracy cost (points)"),
                                           ("cost_cls", "artifact class: clean accuracy cost (points)"))):
            ax = axes[row, col]
            for run in (r for r in runs if r["artifact"] == kind):
                for m, c in colors.items():
                    pts = sorted((r for r in run["rows"] if r["method"] == m), key=lambda r: r["knob"])
                    ax.plot([0] + [r["removed"] for r in pts], [0] + [100 * r[key] for r in pts], "o-", color=c,
                            ms=3, alpha=0.7, label=m if run["seed"] == runs[0]["seed"] else None)
            ax.axvline(0.9, color="grey", lw=0.5, ls="--")
            ax.axhline(0.5 if row == 0 else 2, color="grey", lw=0.5, ls="--")
            if row == 0:
                ax.set_title(f"artifact: {kind}")
            else:
                ax.set_xlabel("share of artifact reliance removed")
            if col == 0:
                ax.set_ylabel(what)
    for ax in axes[0]:
        if ax.get_legend_handles_labels()[0]:
            ax.legend()
            break
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    out = Path(a.out) if a.out else HERE / "results" / ("clever_hans_smoke" if a.smoke else "clever_hans")
    out.mkdir(parents=True, exist_ok=True)
    if a.from_runs:
        try:
            saved = [json.loads(Path(f).read_text()) for f in a.from_runs]
            runs = merge_runs([r for d in saved for r in d["runs"]])
        except (OSError, ValueError, KeyError, TypeError) as e:
            print(f"cannot read --from-runs: {e}", file=sys.stderr)
            return 2
        (out / "runs.json").write_text(json.dumps({"args": [d["args"] for d in saved], "runs": runs}, indent=1))
        return report(runs, a, out)
    full = concept_data("train", root=a.root, limit=a.n_train + 5000)
    if a.n_train + a.n_pairs > len(full):
        print(f"not enough training images ({len(full)}) for --n-train {a.n_train} + --n-pairs {a.n_pairs}",
              file=sys.stderr)
        return 2
    train, pool = full.subset(range(a.n_train)), full.subset(range(a.n_train, len(full)))
    test = concept_data("test", root=a.root, limit=a.n_test)
    log(f"data: {full.source}, {len(train)} training images, {len(test)} test images")
    runs = []
    for kind in a.artifacts.split(","):
        for seed in ints(a.seeds):
            runs.append(run_model(a, kind, seed, train, pool, test))
            (out / "runs.json").write_text(json.dumps({"args": vars(a), "runs": runs}, indent=1))
    return report(runs, a, out)


def report(runs: list[dict], a: argparse.Namespace, out: Path) -> int:
    table = summarise(runs, a.target)
    print(table)
    (out / "summary.md").write_text(table + "\n")
    if not a.no_figure:
        figure(runs, out / "tradeoff.png")
        log(f"figure: {out / 'tradeoff.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
