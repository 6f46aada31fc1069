"""Linear probes on Fashion-MNIST superclass models: what does splitting neurons add?

Small ResNets (``blocks=[1, 1, 1, 1]``, stride-2 stem; seeds 0, 1, 2) are trained for one epoch on
the first 12,000 Fashion-MNIST training images with *superclass* labels, each the union of two
unrelated fine classes (``purenn.cli.datasets.SUPERCLASS_PAIRS``: T-shirt+Ankle boot, Pullover+Sandal,
Dress+Bag, Coat+Sneaker, Shirt+Trouser). ``layer4`` is purified on training images 12,000-21,999:
the ``K`` most polysemantic channels by the ``contrast`` score are split in two virtual neurons each.
Linear probes (:func:`purenn.analysis.probe.fit_probe`, standardisation + logistic regression) then read the
ten FINE labels from spatially mean-pooled features of the Fashion-MNIST test split, which nothing
else touches. A fixed set of ``--probe-test`` test images is the evaluation set of every probe; the
probes train on images drawn from the rest (``--draws`` random draws).

(a) same units: the ``K`` split channels (``K`` features) against their ``2K`` virtual neurons, with
    ``--probe-train`` training images; ten-way accuracy, and per superclass pair the accuracy of a
    probe that tells the pair's two fine classes apart (what the superclass training merged, so
    what a split should add).
(c) controls of (a) with ``2K`` features as well: each channel duplicated (more columns, no new
    information) and each channel split by a random gate with the same share per virtual neuron as
    the real gate (the split's form, without the circuit's information).
(b) few-shot, whole layer: all 512 channels against the whole purified layer (``512 + K`` virtual
    neurons) with 5, 20 and 100 labelled images per fine class.

Each model is reported with its mean over draws, and the models' mean; differences come with a
two-sided Wilcoxon signed-rank test over the pairs (model, draw).

    python benchmarks/fashion_probes.py                 # 3 models, K = 64 (~1 h on 2 busy CPU cores)
    python benchmarks/fashion_probes.py --smoke         # tiny data, one model, K = 8, < 1 min (CI)

Results (``results.json``, ``summary.md``) go to ``--out`` (default
``benchmarks/results/fashion_probes[_smoke]``); trained weights are cached in ``$PURENN_CACHE`` or
``~/.cache/purenn``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from _common import T0, log

import purenn
from purenn.analysis.probe import extract_features, fit_probe
from purenn.cli.datasets import ConceptDataset, cached_classifier, concept_data, fashion_mnist, small_image_resnet

HERE = Path(__file__).resolve().parent
SAME_UNITS = ("channels", "virtual neurons", "channels duplicated", "random gate")
WHOLE = ("channels", "virtual neurons")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--smoke", action="store_true", help="tiny data, one model, K = 8 (CI)")
    p.add_argument("--root", default=None, help="directory with the Fashion-MNIST IDX files")
    p.add_argument("--out", default=None, help="results directory")
    p.add_argument("--seeds", default="0,1,2", help="comma-separated training seeds")
    p.add_argument("--k", type=int, default=64, help="channels of layer4 to split (most polysemantic by score)")
    p.add_argument("--n-train", type=int, default=12000, help="training images of the classifier")
    p.add_argument("--n-fit", type=int, default=10000, help="training images after those, to purify on")
    p.add_argument("--n-refs", type=int, default=100)
    p.add_argument("--probe-train", type=int, default=2000, help="training images of the same-units probes")
    p.add_argument("--probe-test", type=int, default=2000, help="evaluation images of every probe")
    p.add_argument("--shots", default="5,20,100", help="labelled images per fine class, few-shot probes")
    p.add_argument("--draws", type=int, default=10, help="random draws of probe training images")
    p.add_argument("--batch-size", type=int, default=250)
    a = p.parse_args(argv)
    if a.smoke:
        a.seeds, a.k, a.n_train, a.n_fit, a.n_refs = "0", 8, 800, 300, 12
        a.probe_train, a.probe_test, a.shots, a.draws = 200, 200, "3,10", 2
        a.n_test = 500
    else:
        a.n_test = None
    try:
        a.seed_list = [int(s) for s in a.seeds.split(",") if s.strip()]
        a.shot_list = [int(s) for s in a.shots.split(",") if s.strip()]
    except ValueError:
        raise SystemExit(f"--seeds and --shots must be comma-separated integers: {a.seeds!r}, {a.shots!r}") from None
    if not a.seed_list or len(set(a.seed_list)) != len(a.seed_list):
        raise SystemExit(f"--seeds needs distinct seeds, got {a.seeds!r}")
    if a.draws < 2:
        raise SystemExit("--draws must be at least 2")
    a.out = Path(a.out) if a.out else HERE / "results" / ("fashion_probes_smoke" if a.smoke else "fashion_probes")
    return a


# ----------------------------------------------------------------------------------------- setup
def load_data(a: argparse.Namespace) -> tuple[ConceptDataset, ConceptDataset, ConceptDataset]:
    """(classifier training images, purification images, test images)."""
    n = a.n_train + a.n_fit
    if a.smoke:
        train, test = concept_data("train", root=a.root, limit=n), concept_data("test", root=a.root, limit=a.n_test)
    else:
        train, test = fashion_mnist("train", root=a.root, limit=n), fashion_mnist("test", root=a.root)
    if len(train) < n:
        raise SystemExit(f"{len(train)} training images, {n} needed (--n-train + --n-fit)")
    return train.head(a.n_train), train.subset(range(a.n_train, n)), test.head(a.n_test)


def load_model(a: argparse.Namespace, train: ConceptDataset, seed: int) -> torch.nn.Module:
    def build():
        return small_image_resnet(blocks=[1, 1, 1, 1], stem_stride=2, num_classes=train.n_superclasses)

    name = f"{train.source}-probes-resnet1111" + ("-smoke" if a.smoke else "")
    with torch.enable_grad():
        model, path, hit = cached_classifier(name, build, train, config={"blocks": [1, 1, 1, 1], "stem_stride": 2},
                                             target="coarse", epochs=1, batch_size=128, lr=2e-3, seed=seed,
                                             progress=False)
    log(f"seed {seed}: model {'loaded from' if hit else 'trained, saved to'} {path}")
    return model


def superclass_accuracy(model: torch.nn.Module, ds: ConceptDataset) -> float:
    pred = torch.cat([model(ds.images[s : s + 500]).argmax(1) for s in range(0, len(ds), 500)])
    return float((pred == ds.coarse).float().mean())


# ---------------------------------------------------------------------------------------- probes
def pair_confusion(pred: np.ndarray, y: np.ndarray, pairs) -> float:
    """Share of the evaluation images predicted as the other fine class of their own superclass."""
    partner = {f: g for p in pairs for f, g in (p, p[::-1])}
    return float(np.mean([pred[i] == partner[int(y[i])] for i in range(len(y))]))


def probe(xtr, ytr, xte, yte, pairs) -> dict:
    r = fit_probe(xtr, ytr, xte, yte)
    pred = r.estimator.predict(np.asarray(xte, dtype=np.float64))
    return {"accuracy": r.accuracy, "pair_confusion": pair_confusion(pred, yte, pairs)}


def pair_probes(xtr, ytr, xte, yte, pairs) -> list[float]:
    """Per superclass pair: accuracy of telling its two fine classes apart (trained on that pair only)."""
    out = []
    for f, g in pairs:
        mtr, mte = np.isin(ytr, (f, g)), np.isin(yte, (f, g))
        out.append(fit_probe(xtr[mtr], ytr[mtr], xte[mte], yte[mte]).accuracy)
    return out


def random_gate(x: np.ndarray, share: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """``(N, 2K)``: each column of ``x`` routed to one of two columns at random, the first with
    probability ``share`` (per channel), the other one reading 0."""
    first = rng.random(x.shape) < share[None, :]
    out = np.zeros((len(x), 2 * x.shape[1]), dtype=x.dtype)
    out[:, 0::2] = np.where(first, x, 0)
    out[:, 1::2] = np.where(first, 0, x)
    return out


def stratified(pool: np.ndarray, y: np.ndarray, per_class: int, rng: np.random.Generator) -> np.ndarray:
    return np.concatenate([rng.choice(pool[y[pool] == c], per_class, replace=False) for c in np.unique(y[pool])])


def run_seed(a: argparse.Namespace, seed: int, train, fit, test, ev: np.ndarray, pool: np.ndarray) -> dict:
    t = time.time()
    model = load_model(a, train, seed)
    acc = superclass_accuracy(model, test)
    log(f"seed {seed}: superclass test accuracy {acc:.4f}")
    pm = purenn.purify_model(model, ["layer4"], fit, n_refs=a.n_refs, n_clusters=2, neurons={"layer4": a.k},
                             score="contrast", progress=False, seed=seed, batch_size=64)
    pl = pm.pure_layer("layer4")
    top = pl.neurons.tolist()
    vc = pl.v_channel.numpy()
    log(f"seed {seed}: purified layer4, {len(top)} channels split, {pl.n_virtual} virtual neurons "
        f"({time.time() - t:.0f}s)")
    t = time.time()
    pure = extract_features(pm, test, layer="layer4", batch_size=a.batch_size)
    orig = extract_features(pm, test, layer="layer4", kind="original", batch_size=a.batch_size)
    merged = np.zeros_like(orig)
    np.add.at(merged, (slice(None), vc), pure)
    gap = float(np.abs(merged - orig).max())
    log(f"seed {seed}: features of {len(test)} test images ({time.time() - t:.0f}s); "
        f"max |sum of virtual - channel| {gap:.2g}")
    # the K split channels and their 2K virtual neurons, both in the order of `top`
    split_cols = np.concatenate([np.flatnonzero(vc == c) for c in top])
    units = {
        "channels": orig[:, top],
        "virtual neurons": pure[:, split_cols],
        "channels duplicated": np.repeat(orig[:, top], 2, axis=1),
    }
    # share of the test images (channel active) the real gate sends to the first virtual neuron
    first = pure[:, split_cols[0::2]]
    active = orig[:, top] > 0
    share = np.where(active.sum(0) > 0, ((first > 0) & active).sum(0) / np.maximum(active.sum(0), 1), 0.5)
    y = test.fine.numpy()
    pairs = test.pairs
    rng = np.random.default_rng(1000 + seed)
    units["random gate"] = random_gate(orig[:, top], share, rng)

    # each split channel's own pair: the superclass pair both of whose fine classes raise it most
    mean_act = np.stack([orig[pool][y[pool] == c][:, top].mean(0) for c in range(len(test.class_names))])
    own = [int(np.argmax([min(mean_act[f, j], mean_act[g, j]) for f, g in pairs])) for j in range(len(top))]

    t = time.time()
    same = {name: {"accuracy": [], "pair_confusion": [], "pairs": []} for name in SAME_UNITS}
    single = {"channel": [], "virtual neurons": []}
    for _ in range(a.draws):
        tr = rng.choice(pool, a.probe_train, replace=False)
        for name in SAME_UNITS:
            x = units[name]
            r = probe(x[tr], y[tr], x[ev], y[ev], pairs)
            same[name]["accuracy"].append(r["accuracy"])
            same[name]["pair_confusion"].append(r["pair_confusion"])
            same[name]["pairs"].append(pair_probes(x[tr], y[tr], x[ev], y[ev], pairs))
        row = {"channel": [], "virtual neurons": []}
        for j, c in enumerate(top):
            f, g = pairs[own[j]]
            mtr, mte = tr[np.isin(y[tr], (f, g))], ev[np.isin(y[ev], (f, g))]
            for name, x in (("channel", orig[:, [c]]), ("virtual neurons", pure[:, np.flatnonzero(vc == c)])):
                row[name].append(fit_probe(x[mtr], y[mtr], x[mte], y[mte]).accuracy)
        for name in single:
            single[name].append(row[name])
    log(f"seed {seed}: same-units probes ({time.time() - t:.0f}s): " + ", ".join(
        f"{n} {np.mean(same[n]['accuracy']):.3f}" for n in SAME_UNITS) + "; one channel at a time, its own pair: "
        f"channel {np.mean(single['channel']):.3f}, virtual neurons {np.mean(single['virtual neurons']):.3f}")

    t = time.time()
    whole_x = {"channels": orig, "virtual neurons": pure}
    few = {}
    for shots in a.shot_list:
        res = {name: {"accuracy": [], "pair_confusion": []} for name in WHOLE}
        for _ in range(a.draws):
            tr = stratified(pool, y, shots, rng)
            for name in WHOLE:
                x = whole_x[name]
                r = probe(x[tr], y[tr], x[ev], y[ev], pairs)
                res[name]["accuracy"].append(r["accuracy"])
                res[name]["pair_confusion"].append(r["pair_confusion"])
        few[str(shots)] = res
        log(f"seed {seed}: {shots}-shot whole layer: channels {np.mean(res['channels']['accuracy']):.3f}, "
            f"virtual neurons {np.mean(res['virtual neurons']['accuracy']):.3f}")
    log(f"seed {seed}: few-shot probes ({time.time() - t:.0f}s)")
    return {
        "seed": seed, "superclass_accuracy": acc, "split_channels": top, "n_virtual": int(pl.n_virtual),
        "scores": pl.scores.tolist(), "merge_gap": gap, "gate_share_first": share.tolist(),
        "feature_dims": {n: int(x.shape[1]) for n, x in units.items()} | {"whole channels": int(orig.shape[1]),
                                                                           "whole virtual": int(pure.shape[1])},
        "same_units": same, "single": single, "single_pairs": own, "few_shot": few,
    }


# ------------------------------------------------------------------------------------- aggregate
def wilcoxon(x: np.ndarray, z: np.ndarray) -> float:
    """Two-sided Wilcoxon signed-rank p-value of paired values (1 when all pairs are equal)."""
    from scipy.stats import wilcoxon as w

    if len(x) < 2 or np.all(x == z):
        return 1.0
    return float(w(x, z).pvalue)


def compare(runs: list[dict], get_a, get_b) -> dict:
    """Paired comparison of two results over (model, draw): mean difference, per-model mean
    differences, the number of pairs ``a`` wins, and the two-sided Wilcoxon p."""
    xa = np.concatenate([np.asarray(get_a(r), dtype=float) for r in runs])
    xb = np.concatenate([np.asarray(get_b(r), dtype=float) for r in runs])
    per_model = [float(np.mean(np.asarray(get_a(r), float) - np.asarray(get_b(r), float))) for r in runs]
    return {"diff": float(np.mean(xa - xb)), "diff_per_model": per_model, "wins": int((xa > xb).sum()),
            "ties": int((xa == xb).sum()), "n": int(len(xa)), "p": wilcoxon(xa, xb)}


def stats(runs: list[dict], get) -> dict:
    per_model = [float(np.mean(get(r))) for r in runs]
    sd_draws = [float(np.std(get(r), ddof=1)) for r in runs]
    return {"per_model": per_model, "sd_draws_per_model": sd_draws, "mean": float(np.mean(per_model)),
            "sd_models": float(np.std(per_model, ddof=1)) if len(runs) > 1 else 0.0,
            "sd_all": float(np.std(np.concatenate([np.asarray(get(r), float) for r in runs]), ddof=1))}


def aggregate(runs: list[dict], pairs, shots: list[int]) -> dict:
    out: dict = {"same_units": {}, "same_units_pairs": {}, "few_shot": {}}
    for name in SAME_UNITS:
        out["same_units"][name] = {m: stats(runs, lambda r, n=name, m=m: r["same_units"][n][m])
                                   for m in ("accuracy", "pair_confusion")}
        out["same_units_pairs"][name] = [stats(runs, lambda r, n=name, i=i: [d[i] for d in r["same_units"][n]["pairs"]])
                                         for i in range(len(pairs))]
    vs = {}
    for base in ("channels", "channels duplicated", "random gate"):
        vs[base] = {
            "accuracy": compare(runs, lambda r: r["same_units"]["virtual neurons"]["accuracy"],
                                lambda r, b=base: r["same_units"][b]["accuracy"]),
            "pairs": [compare(runs, lambda r, i=i: [d[i] for d in r["same_units"]["virtual neurons"]["pairs"]],
                              lambda r, b=base, i=i: [d[i] for d in r["same_units"][b]["pairs"]])
                      for i in range(len(pairs))],
            "pairs_all": compare(
                runs, lambda r: [v for d in r["same_units"]["virtual neurons"]["pairs"] for v in d],
                lambda r, b=base: [v for d in r["same_units"][b]["pairs"] for v in d]),
        }
    out["same_units_vs"] = vs
    # one channel at a time: per (model, draw) the mean over the split channels
    out["single"] = {n: stats(runs, lambda r, n=n: np.mean(r["single"][n], axis=1))
                     for n in ("channel", "virtual neurons")}
    out["single_vs"] = compare(runs, lambda r: np.mean(r["single"]["virtual neurons"], axis=1),
                               lambda r: np.mean(r["single"]["channel"], axis=1))
    gain = np.concatenate([np.mean(np.asarray(r["single"]["virtual neurons"]) - np.asarray(r["single"]["channel"]), 0)
                           for r in runs])
    out["single_gain_per_channel"] = {"n": int(len(gain)), "at_least_5_points": int((gain >= 0.05).sum()),
                                      "at_least_1_point": int((gain >= 0.01).sum()), "below_0": int((gain < 0).sum()),
                                      "median": float(np.median(gain))}
    for s in shots:
        k = str(s)
        row = {name: {m: stats(runs, lambda r, k=k, n=name, m=m: r["few_shot"][k][n][m])
                      for m in ("accuracy", "pair_confusion")} for name in WHOLE}
        row["vs"] = {m: compare(runs, lambda r, k=k, m=m: r["few_shot"][k]["virtual neurons"][m],
                                lambda r, k=k, m=m: r["few_shot"][k]["channels"][m])
                     for m in ("accuracy", "pair_confusion")}
        out["few_shot"][k] = row
    return out


# ----------------------------------------------------------------------------------------- report
def fmt_p(p: float) -> str:
    return f"{p:.2g}"


def fmt_stat(s: dict, pct: bool = True) -> str:
    f = (lambda v: f"{100 * v:.1f}") if pct else (lambda v: f"{v:.3f}")
    per = " / ".join(f(v) for v in s["per_model"])
    return f"{per} | {f(s['mean'])} ± {f(s['sd_all'])}"


def fmt_diff(c: dict) -> str:
    return f"{100 * c['diff']:+.1f} | {c['wins']}/{c['n']} | {fmt_p(c['p'])}"


def tables(runs: list[dict], agg: dict, a: argparse.Namespace, names: list[str], pairs) -> str:
    k, seeds = a.k, [r["seed"] for r in runs]
    acc = ", ".join(f"{r['superclass_accuracy']:.1%}" for r in runs)
    d = a.draws
    lines = [f"Models (seeds {seeds}): superclass test accuracy {acc}. `layer4` (512 channels), K = {k} channels "
             f"split by the contrast score. Probes read the 10 fine classes; accuracy in %, on {a.probe_test} "
             f"held-out test images; per model the mean over {d} draws of training images, then the mean over "
             f"models ± sd over all (model, draw). Differences: mean over (model, draw), pairs where virtual "
             "neurons win, two-sided Wilcoxon p.", ""]
    lines += [f"**(a) Same units, {a.probe_train} training images.** Pair confusion: share of evaluation images "
              "predicted as the other fine class of their superclass (lower is better).", ""]
    lines.append("| features | dim | 10-class acc, per model | mean ± sd | pair confusion, mean | "
                 "within-pair acc (5 binary probes), mean |")
    lines.append("|---|---|---|---|---|---|")
    for name in SAME_UNITS:
        s = agg["same_units"][name]
        dim = runs[0]["feature_dims"][name]
        pair_mean = np.mean([p["mean"] for p in agg["same_units_pairs"][name]])
        lines.append(f"| {name} | {dim} | {fmt_stat(s['accuracy'])} | {100 * s['pair_confusion']['mean']:.1f} | "
                     f"{100 * pair_mean:.1f} |")
    lines += ["", "| virtual neurons vs | Δ 10-class acc | wins | p | Δ within-pair acc (all 5 pairs) | wins | p |",
              "|---|---|---|---|---|---|---|"]
    for base, c in agg["same_units_vs"].items():
        lines.append(f"| {base} | {fmt_diff(c['accuracy'])} | {fmt_diff(c['pairs_all'])} |")
    lines += ["", "Within-pair accuracy per superclass pair (binary probe on the pair's images only):", "",
              "| pair | " + " | ".join(SAME_UNITS) + " | Δ virtual − channels | p |",
              "|---" * (len(SAME_UNITS) + 3) + "|"]
    for i, (f, g) in enumerate(pairs):
        cells = " | ".join(f"{100 * agg['same_units_pairs'][n][i]['mean']:.1f}" for n in SAME_UNITS)
        c = agg["same_units_vs"]["channels"]["pairs"][i]
        lines.append(f"| {names[f]} / {names[g]} | {cells} | {100 * c['diff']:+.1f} | {fmt_p(c['p'])} |")
    sg, sv, gc = agg["single"], agg["single_vs"], agg["single_gain_per_channel"]
    lines += ["", "**(d) One channel at a time**: each split channel alone (1 feature) vs its 2 virtual neurons, "
              "a binary probe for its own superclass pair (the pair both of whose fine classes raise it most, over the "
              "test images outside the evaluation set); per (model, draw) the mean over channels.", "",
              "| features | acc, per model | mean ± sd | Δ | wins | p | channels with Δ ≥ 5 / ≥ 1 / < 0 points |",
              "|---|---|---|---|---|---|---|",
              f"| channel | {fmt_stat(sg['channel'])} | | | | |",
              f"| virtual neurons | {fmt_stat(sg['virtual neurons'])} | {fmt_diff(sv)} | "
              f"{gc['at_least_5_points']} / {gc['at_least_1_point']} / {gc['below_0']} of {gc['n']} |"]
    lines += ["", f"**(b) Few-shot, whole layer**: 512 channels vs {runs[0]['feature_dims']['whole virtual']} "
              f"virtual neurons.", "",
              "| labels per class | channels, per model | mean ± sd | virtual neurons, per model | mean ± sd "
              "| Δ acc | wins | p | Δ pair confusion |", "|---|---|---|---|---|---|---|---|---|"]
    for s, row in agg["few_shot"].items():
        lines.append(f"| {s} | {fmt_stat(row['channels']['accuracy'])} | {fmt_stat(row['virtual neurons']['accuracy'])}"
                     f" | {fmt_diff(row['vs']['accuracy'])} | {100 * row['vs']['pair_confusion']['diff']:+.1f} |")
    return "\n".join(lines)


def verdict(c: dict, alpha: float = 0.05) -> str:
    if c["p"] < alpha and c["diff"] > 0:
        return "higher"
    if c["p"] < alpha and c["diff"] < 0:
        return "lower"
    return "not significantly different"


def conclusions(agg: dict, names: list[str], pairs, a: argparse.Namespace) -> str:
    """Plain statements generated from the paired tests (alpha 0.05)."""
    vs = agg["same_units_vs"]
    ch, dup, rnd = vs["channels"], vs["channels duplicated"], vs["random gate"]

    def said(c: dict) -> str:
        return f"{verdict(c)} ({100 * c['diff']:+.1f} points, p = {fmt_p(c['p'])})"

    out = [f"- Same units, ten fine classes: accuracy with the {2 * a.k} virtual neurons is {said(ch['accuracy'])} "
           f"compared with their {a.k} channels; {said(dup['accuracy'])} compared with the channels duplicated; "
           f"{said(rnd['accuracy'])} compared with a random gate."]
    gains = [(f"{names[f]} vs {names[g]}", c) for (f, g), c in zip(pairs, ch["pairs"])]
    up = [f"{n} ({100 * c['diff']:+.1f})" for n, c in gains if verdict(c) == "higher"]
    flat = [f"{n} ({100 * c['diff']:+.1f})" for n, c in gains if verdict(c) != "higher"]
    out.append(f"- Telling the two fine classes of a superclass apart (what the training merged), over all five "
               f"pairs: accuracy with the virtual neurons is {said(ch['pairs_all'])} compared with the channels, "
               f"{said(dup['pairs_all'])} compared with the channels duplicated. Higher for: "
               f"{', '.join(up) or 'none'}; not significantly higher for: {', '.join(flat) or 'none'}.")
    sv, gc = agg["single_vs"], agg["single_gain_per_channel"]
    out.append(f"- One split channel at a time, telling apart the two fine classes of its own pair: accuracy with its "
               f"two virtual neurons is {said(sv)} compared with the channel alone; {gc['at_least_5_points']} of "
               f"{gc['n']} channels gain at least 5 points.")
    for s, row in agg["few_shot"].items():
        c = row["vs"]["accuracy"]
        out.append(f"- Whole layer, {s} labels per class: accuracy with the virtual neurons is {said(c)} compared "
                   f"with the 512 channels; higher in {c['wins']} of {c['n']} (model, draw) pairs.")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    torch.set_grad_enabled(False)
    a.out.mkdir(parents=True, exist_ok=True)
    train, fit, test = load_data(a)
    log(f"data: {train.source}, {len(train)} train / {len(fit)} purification / {len(test)} test; seeds {a.seed_list}")
    perm = np.random.default_rng(0).permutation(len(test))
    ev, pool = np.sort(perm[: a.probe_test]), np.sort(perm[a.probe_test :])
    y = test.fine.numpy()
    need = max([a.probe_train] + [10 * s for s in a.shot_list])
    if len(pool) < need or min(np.bincount(y[pool])) < max(a.shot_list):
        raise SystemExit(f"{len(pool)} test images left for probe training: too few for the requested sizes")
    runs = []
    for seed in a.seed_list:
        t = time.time()
        runs.append(run_seed(a, seed, train, fit, test, ev, pool))
        log(f"seed {seed} done ({time.time() - t:.0f}s)")
        (a.out / "runs.json").write_text(json.dumps(runs, indent=1, default=float))
    agg = aggregate(runs, test.pairs, a.shot_list)
    names = list(test.class_names)
    md = tables(runs, agg, a, names, test.pairs)
    text = conclusions(agg, names, test.pairs, a)
    print(md + "\n\n" + text)
    cmd = "python benchmarks/fashion_probes.py" + (" --smoke" if a.smoke else "")
    seconds = time.time() - T0
    (a.out / "summary.md").write_text(
        f"# Linear probes: what splitting adds (`{cmd}`)\n\nData: {train.source}; wall time {seconds / 60:.0f} min."
        f"\n\n{md}\n\n## Reading (paired tests, alpha 0.05)\n\n{text}\n")
    (a.out / "results.json").write_text(json.dumps({
        "args": {k: str(v) for k, v in vars(a).items()}, "source": train.source, "eval_indices": ev.tolist(),
        "aggregate": agg, "runs": runs, "seconds": seconds}, indent=1, default=float))
    (a.out / "runs.json").unlink(missing_ok=True)
    log(f"done; results in {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
