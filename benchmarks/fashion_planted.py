"""Planted polysemanticity on Fashion-MNIST: does purification separate what training merged?

A ResNet-18 with a small-image stem is trained (fixed seed, one epoch on 30k images) on five
superclasses, each the union of two unrelated fine classes (``purenn.cli.datasets.SUPERCLASS_PAIRS``:
T-shirt+Ankle boot, Pullover+Sandal, Dress+Bag, Coat+Sneaker, Shirt+Trouser). Late neurons that
serve a superclass then respond to both of its fine classes: polysemantic in a known way. The
fine labels are never used for training or purification, only to evaluate on the held-out test
split:

- disentanglement: each neuron's top-100 test images ("held-out references") are gated by the
  purified model; adjusted Rand index (ARI) and purity of the gate against the fine labels, for
  PURE, the combined circuit+map gate and the activation baselines (target-layer pooled activations
  as in PURE's evaluation, upstream pooled activations, the neuron's own activation map), with a
  one-sided Wilcoxon signed-rank test per baseline. "Planted" neurons are those whose references
  mix the two fine classes of one superclass (the second holds >= 20%); "mixed" neurons mix any two.
  ARI "pair" counts only the references of the two mixed classes;
- the polysemanticity score's AUROC for neurons whose (fit) references mix two fine classes;
- linear probes on fine labels: original vs pure features of ``layer4``;
- unlearning: suppressing a fine class's virtual neurons vs suppressing the whole neurons.
Both a stage-level target (``layer4`` <- ``layer3``) and a block-level one (``layer4.1`` <-
``layer4.0``, where the identity skip calls for skip-aware circuits) are evaluated.

    python benchmarks/fashion_planted.py               # full run: ~1-2 h on 2 CPU cores (weights cached)
    python benchmarks/fashion_planted.py --smoke       # tiny model and data, < 2 min; used by CI
    python benchmarks/fashion_planted.py --root DIR    # Fashion-MNIST IDX files in DIR

Weights are cached in ``$PURENN_CACHE`` or ``~/.cache/purenn``; results (JSON, a Markdown table)
and figures go to ``--out`` (default ``benchmarks/results/fashion_planted[_smoke]``).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from _common import T0, log

import purenn
from purenn.analysis.metrics import disentanglement, held_out_references, label_mix, paired_test, score_auroc
from purenn.analysis.probe import extract_features, fit_probe
from purenn.analysis.unlearn import find_concept_neurons, unlearning_report
from purenn.attribution.rules import RULES, get_rule
from purenn.cli.datasets import (
    SUPERCLASS_PAIRS,
    ConceptDataset,
    cached_classifier,
    concept_data,
    fashion_mnist,
    small_image_resnet,
)
from purenn.fit.circuits import fit_circuits
from purenn.fit.cluster import CircuitKMeans
from purenn.fit.collect import References
from purenn.fit.data import DataSource
from purenn.fit.plan import LayerPlan

HERE = Path(__file__).resolve().parent


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--smoke", action="store_true", help="tiny model and data (CI)")
    p.add_argument("--root", default=None, help="directory with the Fashion-MNIST IDX files")
    p.add_argument("--out", default=None, help="results directory")
    p.add_argument("--n-train", type=int, default=30000)
    p.add_argument("--n-fit", type=int, default=10000, help="training images the references are drawn from")
    p.add_argument("--n-test", type=int, default=10000)
    p.add_argument("--n-refs", type=int, default=100)
    p.add_argument("--min-share", type=float, default=0.2)
    p.add_argument("--probe-neurons", type=int, default=64, help="neurons split for the probe (top by score)")
    p.add_argument("--probe-train", type=int, default=2000)
    p.add_argument("--probe-test", type=int, default=2000)
    p.add_argument("--unlearn-test", type=int, default=4000)
    p.add_argument("--concepts", default="0,3", help="fine classes to unlearn (partner: the other of the pair)")
    p.add_argument("--threshold", type=float, default=0.6, help="concept share of a virtual neuron's references")
    p.add_argument("--max-neurons", type=int, default=None, help="evaluate at most this many mixed neurons")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-figures", action="store_true")
    p.add_argument("--rule", default="gradient", choices=tuple(RULES),
                   help="relevance rule of the circuits (purenn.attribution.rules; default gradient, PURE's)")
    a = p.parse_args(argv)
    if a.smoke:
        a.n_train, a.n_fit, a.n_test, a.n_refs = 1500, 600, 600, 16
        a.probe_neurons, a.probe_train, a.probe_test, a.unlearn_test = 16, 300, 300, 300
        a.max_neurons = a.max_neurons or 12
    suffix = "" if a.rule == "gradient" else f"_{a.rule}"
    a.out = Path(a.out) if a.out else HERE / "results" / (("fashion_planted_smoke" if a.smoke else "fashion_planted")
                                                          + suffix)
    return a


# ----------------------------------------------------------------------------------------- setup
def load_data(a: argparse.Namespace) -> tuple[ConceptDataset, ConceptDataset]:
    if a.smoke:
        train, test = concept_data("train", root=a.root, limit=a.n_train), concept_data("test", root=a.root)
    else:
        train, test = fashion_mnist("train", root=a.root, limit=a.n_train), fashion_mnist("test", root=a.root)
    return train.head(a.n_train), test.head(a.n_test)


def load_model(a: argparse.Namespace, train: ConceptDataset) -> torch.nn.Module:
    if a.smoke:
        def build():
            return small_image_resnet(blocks=[1, 1, 1, 2], stem_stride=2, num_classes=train.n_superclasses)

        name, config = f"{train.source}-smoke-resnet", {"blocks": [1, 1, 1, 2], "stem_stride": 2}
    else:
        def build():
            return small_image_resnet("resnet18", num_classes=train.n_superclasses, in_channels=1)

        name, config = "fashion-resnet18-super", {"arch": "resnet18", "stem": "3x3s1"}
    model, path, hit = cached_classifier(name, build, train, config=config, epochs=1, batch_size=128, lr=2e-3,
                                         seed=a.seed, progress=not a.smoke)
    log(f"model {'loaded from' if hit else 'trained, saved to'} {path}")
    return model


def accuracy(model: torch.nn.Module, ds: ConceptDataset) -> float:
    with torch.no_grad():
        pred = torch.cat([model(ds.images[s : s + 500]).argmax(1) for s in range(0, len(ds), 500)])
    return float((pred == ds.coarse).float().mean())


def neuron_sets(ref_labels: np.ndarray, superclass_of: np.ndarray, min_share: float) -> tuple[np.ndarray, np.ndarray]:
    """(mixed, planted) masks over channels from the fine labels of their references."""
    mix = label_mix(ref_labels, len(superclass_of))
    order = np.argsort(-mix, axis=1, kind="stable")
    first, second = order[:, 0], order[:, 1]
    mixed = mix[np.arange(len(mix)), second] >= min_share
    planted = mixed & (superclass_of[first] == superclass_of[second])
    return mixed, planted


@dataclass
class Prepared:
    """A trained model with the references and neuron sets every section works on."""

    model: torch.nn.Module
    acc: float
    fit: ConceptDataset
    fit_sub: ConceptDataset  # the images among the evaluated neurons' fit references
    refs_fit: References
    refs_test: References
    mixed_fit: np.ndarray
    channels: list[int]  # the evaluated (mixed) neurons, ascending
    planted_ch: list[int]


def prepare(a: argparse.Namespace, train: ConceptDataset, test: ConceptDataset) -> Prepared | None:
    """Train or load the model (``a.seed``), collect fit and test references and pick the mixed and
    planted neurons; ``None`` when no neuron is mixed."""
    with torch.enable_grad():
        model = load_model(a, train)
    acc = accuracy(model, test)
    log(f"superclass test accuracy {acc:.4f}")
    fit = train.head(a.n_fit)
    sup = train.superclass_of.numpy()
    refs_fit = held_out_references(model, fit, "layer4", a.n_refs, batch_size=256)
    refs_test = held_out_references(model, test, "layer4", a.n_refs, batch_size=256)
    mixed_fit, _ = neuron_sets(fit.fine.numpy()[refs_fit.indices.numpy()], sup, a.min_share)
    mixed_test, planted_test = neuron_sets(test.fine.numpy()[refs_test.indices.numpy()], sup, a.min_share)
    log(f"references collected; mixed neurons: fit {mixed_fit.sum()}, test {mixed_test.sum()}; "
        f"planted (test) {planted_test.sum()}")
    # planted neurons first, so a --max-neurons cut keeps them
    channels = sorted(np.flatnonzero(mixed_test).tolist(), key=lambda c: (not planted_test[c], c))[: a.max_neurons]
    planted_ch = [c for c in channels if planted_test[c]]
    channels = sorted(channels)
    if not channels:
        log("no mixed neurons: nothing to evaluate")
        return None
    # references of the evaluated neurons all lie in this subset, so purifying on it finds the same
    # references as purifying on all of `fit`, with a shorter streaming pass
    fit_sub = fit.subset(torch.unique(refs_fit.indices[channels]).tolist())
    return Prepared(model, acc, fit, fit_sub, refs_fit, refs_test, mixed_fit, channels, planted_ch)


# ------------------------------------------------------------------------------------- sections
def score_validation(model, fit, refs_fit, mixed_fit, a) -> dict:
    """AUROC of the polysemanticity scores (silhouette, contrast) for neurons whose references mix two
    fine classes: circuits of every ``layer4`` channel, as ``purify_model`` computes them."""
    spec = purenn.ResNetSpec(model)
    out = {}
    for key, layer, up, skip in (("layer4", "layer4", "layer3", False), ("layer4.1", "layer4.1", "layer4.0", True)):
        pos, up_pos = spec.position(layer), spec.position(up)
        plan = LayerPlan(layer, up, pos, up_pos, tuple(range(spec.channels(pos))), skip, get_rule(a.rule))
        t = time.time()
        circ = fit_circuits(spec, DataSource.from_data(fit, 256), [plan], {layer: refs_fit}, a.n_refs, batch_size=256,
                            device=None, max_memory=512 * 2**20, progress=False)[layer].numpy()
        res = {}
        for score in ("silhouette", "contrast"):
            s = CircuitKMeans(2, score=score, random_state=a.seed).fit(circ).scores_
            res[score] = {"auroc": score_auroc(s, mixed_fit), "scores": s.tolist()}
        out[key] = res
        log(f"scores {key}: AUROC silhouette {res['silhouette']['auroc']:.3f}, contrast {res['contrast']['auroc']:.3f}"
            f" ({time.time() - t:.0f}s)")
    return out


STAGE_METHODS = {
    "PURE circuit": {"gate": "circuit"},
    "circuit+map": {"gate": "circuit+map"},
    "activation (target pooled)": {"gate": "activation"},
    "upstream pooled": {"gate": "upstream"},
    "own activation map": {"gate": "map"},
}
BLOCK_METHODS = {
    "PURE circuit (plain)": {"gate": "circuit", "skip_aware": False},
    "circuit, skip-aware": {"gate": "circuit", "skip_aware": True},
    "circuit+map, skip-aware": {"gate": "circuit+map", "skip_aware": True},
    "upstream pooled": {"gate": "upstream"},
}
BASELINES = ("activation (target pooled)", "upstream pooled", "own activation map")


def disentangle(model, fit_sub, test, refs_test, channels, planted_ch, a) -> tuple[dict, dict]:
    """Per-method disentanglement on held-out references; returns (summary, purified models)."""
    results, models = {}, {}
    for level, layer, methods in (("layer4", "layer4", STAGE_METHODS), ("layer4.1", "layer4.1", BLOCK_METHODS)):
        for name, kw in methods.items():
            key = f"{level} | {name}"
            t = time.time()
            pm = purenn.purify_model(model, [layer], fit_sub, n_refs=a.n_refs, neurons={layer: channels},
                                     progress=False, seed=a.seed, rule=a.rule, **kw)
            rep = disentanglement(pm, layer, test, test.fine, channels=channels, refs=refs_test,
                                  min_share=a.min_share)
            per = {n.channel: n for n in rep.neurons}
            results[key] = {
                "channels": channels,
                "ari": [per[c].ari for c in channels],
                "ari_pair": [per[c].ari_pair for c in channels],
                "purity": [per[c].purity for c in channels],
                "purity_pair": [per[c].purity_pair for c in channels],
            }
            models[key] = pm
            sel = np.isin(channels, planted_ch)
            r = results[key]
            log(f"{key:45s} planted ARI pair {np.mean(np.array(r['ari_pair'])[sel]) if sel.any() else float('nan'):.3f}"
                f"  all-refs {np.mean(np.array(r['ari'])[sel]) if sel.any() else float('nan'):.3f}"
                f"  | mixed ARI pair {np.mean(r['ari_pair']):.3f} ({time.time() - t:.0f}s)")
    # the target layer's own activations do not depend on the upstream layer: share them at block level
    for name in ("activation (target pooled)", "own activation map"):
        results[f"layer4.1 | {name}"] = results[f"layer4 | {name}"]
    return results, models


def summarise(results: dict, planted_ch: list[int]) -> dict:
    summary = {}
    for key, r in results.items():
        ch = np.array(r["channels"])
        sel = np.isin(ch, planted_ch)
        row = {"n_mixed": len(ch), "n_planted": int(sel.sum())}
        for m in ("ari", "ari_pair", "purity", "purity_pair"):
            v = np.array(r[m], dtype=float)
            row[f"{m}_mixed"] = float(np.nanmean(v)) if len(v) else float("nan")
            row[f"{m}_planted"] = float(np.nanmean(v[sel])) if sel.any() else float("nan")
        summary[key] = row
    for level in ("layer4", "layer4.1"):
        for key in [k for k in results if k.startswith(level) and "circuit" in k]:
            tests = {}
            for b in BASELINES:
                bk = f"{level} | {b}" if f"{level} | {b}" in results else None
                if bk is None:
                    continue
                sel = np.isin(results[key]["channels"], planted_ch)
                for m in ("ari_pair", "ari"):
                    x, y = np.array(results[key][m])[sel], np.array(results[bk][m])[sel]
                    tests[f"{b} ({m})"] = paired_test(x, y) if sel.sum() >= 2 else float("nan")
            summary[key]["p_vs_baselines_planted"] = tests
    return summary


def probe(model, fit, train, test, top, a) -> dict:
    pm = purenn.purify_model(model, ["layer4"], fit, n_refs=a.n_refs, neurons={"layer4": top}, progress=False,
                             seed=a.seed, rule=a.rule)
    ptr = train.subset(range(a.n_fit, min(len(train), a.n_fit + a.probe_train)))
    pte = test.head(a.probe_test)
    t = time.time()
    f = {}
    for name, ds in (("train", ptr), ("test", pte)):
        f[name, "pure"] = extract_features(pm, ds, layer="layer4", batch_size=100)
        f[name, "orig"] = extract_features(pm, ds, layer="layer4", kind="original", batch_size=250)
    log(f"probe features ({time.time() - t:.0f}s)")
    vc = pm.pure_layer("layer4").v_channel.numpy()
    split = np.isin(vc, top)
    out = {"neurons": len(top), "train": len(ptr), "test": len(pte)}
    for tag, cols_o, cols_p in (("all channels", slice(None), slice(None)), ("split channels only", top, split)):
        o = fit_probe(f["train", "orig"][:, cols_o], ptr.fine, f["test", "orig"][:, cols_o], pte.fine)
        p = fit_probe(f["train", "pure"][:, cols_p], ptr.fine, f["test", "pure"][:, cols_p], pte.fine)
        out[tag] = {"original": o.accuracy, "pure": p.accuracy, "n_original": o.n_features, "n_pure": p.n_features}
        log(f"probe {tag}: original {o.accuracy:.3f} ({o.n_features}) vs pure {p.accuracy:.3f} ({p.n_features})")
    return out


def unlearn(models: dict, fit_sub, test, a) -> dict:
    partner_of = {f: g for p in SUPERCLASS_PAIRS for f, g in (p, p[::-1])}
    ute = test.head(a.unlearn_test)
    out = {}
    for key in ("layer4 | PURE circuit", "layer4 | circuit+map"):
        pm = models[key]
        for concept in [int(c) for c in a.concepts.split(",") if c.strip()]:
            partner = partner_of[concept]
            found = find_concept_neurons(pm, "layer4", labels=fit_sub.fine, concept=concept, by="refs",
                                         threshold=a.threshold)
            if not found.indices:
                log(f"unlearn {key} concept {concept}: no virtual neuron reaches the threshold")
                continue
            t = time.time()
            rep = unlearning_report(pm, found, ute, ute.coarse, ute.fine, partner=partner)
            floor = 1.0 / max(1, int((ute.fine == partner).sum()))
            res = {
                "concept": concept, "partner": partner, "virtual_neurons": len(found.indices),
                "channels": len(found.channels),
                "before": rep.before.tolist(), "after_virtual": rep.after_virtual.tolist(),
                "after_whole": rep.after_whole.tolist(),
                "drop_concept": rep.drop(concept), "drop_partner": rep.drop(partner),
                "drop_concept_whole": rep.drop(concept, whole=True),
                "drop_partner_whole": rep.drop(partner, whole=True),
                # a partner drop below one image is not measurable: floor it at one image
                "selectivity": rep.selectivity(floor=floor),
                "selectivity_whole": rep.selectivity(whole=True, floor=floor),
            }
            out[f"{key} | {concept}"] = res
            log(f"unlearn {key} {test.class_names[concept]} (partner {test.class_names[partner]}): "
                f"{len(found.indices)} virtual neurons; drop {res['drop_concept']:.3f} vs {res['drop_partner']:.3f} "
                f"(whole neurons {res['drop_concept_whole']:.3f} vs {res['drop_partner_whole']:.3f}) "
                f"({time.time() - t:.0f}s)")
    return out


def figures(pm, layer, fit_sub, channels, out: Path, n_images: int = 8) -> list[str]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log("matplotlib missing (pip install 'purenn[viz]'): no figures")
        return []
    pl = pm.pure_layer(layer)
    names = fit_sub.class_names
    files = []
    for c in channels:
        k = pl.neurons.tolist().index(c)
        n_cl = int(pl.n_clusters[k])
        fig, axes = plt.subplots(n_cl, n_images, figsize=(1.3 * n_images, 1.5 * n_cl + 0.4), squeeze=False)
        idx, clus = pl.ref_indices[k].numpy(), pl.ref_clusters[k].numpy()
        for j in range(n_cl):
            members = idx[clus == j][:n_images]
            share = label_mix(fit_sub.fine.numpy()[idx[clus == j]][None], len(names))[0]
            top = np.argsort(-share)[:2]
            axes[j, 0].set_title(f"{c}.{j}: " + ", ".join(f"{names[t]} {share[t]:.0%}" for t in top if share[t] > 0),
                                 loc="left", fontsize=8)
            for i in range(n_images):
                ax = axes[j, i]
                ax.axis("off")
                if i < len(members):
                    ax.imshow(fit_sub.images[members[i], 0].numpy(), cmap="gray")
        fig.suptitle(f"{layer} neuron {c}: top references per virtual neuron (score {float(pl.scores[k]):.2f})",
                     fontsize=9)
        fig.tight_layout()
        path = out / f"{layer}_neuron{c}.png"
        fig.savefig(path, dpi=80)
        plt.close(fig)
        files.append(str(path))
    return files


def table(summary: dict, scores: dict, probe_res: dict, unlearn_res: dict, acc: float) -> str:
    lines = [f"Superclass test accuracy: {acc:.1%}", ""]
    lines.append("| target | gate | ARI planted (pair) | ARI planted (all refs) | purity planted (pair) "
                 "| ARI mixed (pair) | p vs best baseline (planted, pair) |")
    lines.append("|---|---|---|---|---|---|---|")
    for key, r in summary.items():
        level, name = key.split(" | ")
        ps = r.get("p_vs_baselines_planted", {})
        pair_ps = [v for k, v in ps.items() if k.endswith("(ari_pair)")]
        p = f"{max(pair_ps):.2g}" if pair_ps else ""
        lines.append(f"| {level} | {name} | {r['ari_pair_planted']:.3f} | {r['ari_planted']:.3f} | "
                     f"{r['purity_pair_planted']:.3f} | {r['ari_pair_mixed']:.3f} | {p} |")
    first = next(iter(summary.values()))
    lines += ["", f"Neurons: {first['n_planted']} planted, {first['n_mixed']} mixed (of 512).", ""]
    lines.append("| score | AUROC layer4 | AUROC layer4.1 (skip-aware) |")
    lines.append("|---|---|---|")
    for s in ("silhouette", "contrast"):
        lines.append(f"| {s} | {scores['layer4'][s]['auroc']:.3f} | {scores['layer4.1'][s]['auroc']:.3f} |")
    lines += ["", "| probe (fine labels) | original | pure |", "|---|---|---|"]
    for tag in ("all channels", "split channels only"):
        r = probe_res[tag]
        lines.append(f"| {tag} | {r['original']:.3f} ({r['n_original']}) | {r['pure']:.3f} ({r['n_pure']}) |")
    lines += ["", "| unlearn | concept | virtual neurons | drop concept | drop partner | selectivity | "
              "whole neurons: drop concept / partner |", "|---|---|---|---|---|---|---|"]
    for key, r in unlearn_res.items():
        lines.append(f"| {key.rsplit(' | ', 1)[0]} | {r['concept']} vs {r['partner']} | {r['virtual_neurons']} | "
                     f"{r['drop_concept']:.3f} | {r['drop_partner']:.3f} | {r['selectivity']:.1f} | "
                     f"{r['drop_concept_whole']:.3f} / {r['drop_partner_whole']:.3f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    torch.manual_seed(a.seed)
    torch.set_grad_enabled(False)
    a.out.mkdir(parents=True, exist_ok=True)
    train, test = load_data(a)
    log(f"data: {train.source}, {len(train)} train / {len(test)} test; superclasses {train.superclass_names()}")
    st = prepare(a, train, test)
    if st is None:
        return 1
    model, acc, fit, fit_sub, channels, planted_ch = st.model, st.acc, st.fit, st.fit_sub, st.channels, st.planted_ch
    scores = score_validation(model, fit, st.refs_fit, st.mixed_fit, a)
    results, models = disentangle(model, fit_sub, test, st.refs_test, channels, planted_ch, a)
    summary = summarise(results, planted_ch)
    contrast = np.array(scores["layer4"]["contrast"]["scores"])
    top = np.sort(np.argsort(-contrast, kind="stable")[: a.probe_neurons]).tolist()
    probe_res = probe(model, fit, train, test, top, a)
    unlearn_res = unlearn(models, fit_sub, test, a)
    figs = []
    if not a.no_figures:
        pure = models["layer4 | PURE circuit"]
        ranked = sorted(planted_ch or channels, key=lambda c: -contrast[c])[:4]
        figs = figures(pure, "layer4", fit_sub, ranked, a.out)
    md = table(summary, scores, probe_res, unlearn_res, acc)
    print(md)
    cmd = "python benchmarks/fashion_planted.py" + (" --smoke" if a.smoke else "")
    for s in scores.values():
        for v in s.values():
            v.pop("scores")
    write_results(a, cmd, md, {"source": train.source, "superclass_accuracy": acc, "summary": summary,
                               "scores": scores, "probe": probe_res, "unlearn": unlearn_res, "figures": figs,
                               "per_neuron": results})
    return 0


def write_results(a, cmd: str, md: str, payload: dict) -> None:
    """``results.md`` (the command, then ``md``) and ``results.json`` (the arguments, ``payload`` and the
    seconds since the start) in ``a.out``; used by this script and the ones built on it."""
    (a.out / "results.md").write_text(f"`{cmd}`\n\n{md}\n")
    (a.out / "results.json").write_text(json.dumps({
        "args": {k: str(v) for k, v in vars(a).items()}, **payload, "seconds": time.time() - T0,
    }, indent=1, default=float))
    log(f"done; results in {a.out}")


if __name__ == "__main__":
    sys.exit(main())
