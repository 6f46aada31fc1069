"""Which relevance rule purifies best? Planted polysemanticity on Fashion-MNIST, per rule.

Over several trained models (seeds) of ``fashion_planted.py``'s superclass ResNet-18, this compares
purenn's relevance rules (``rule=``: ``gradient``, ``epsilon``, ``zplus``, ``alpha2beta1``,
``gamma``) on the planted neurons' held-out test references:

- planted-pair ARI of the PURE circuit gate at ``layer4`` (upstream ``layer3``);
- planted-pair ARI of the circuit gate at block level ``layer4.1`` (upstream ``layer4.0``), both
  skip-aware and plain (does the identity skip still dominate under rules that split the residual
  sum?);
- the contrast (and silhouette) score's AUROC for neurons whose fit references mix two fine classes;
- once per model (they do not depend on the rule), the activation baselines; p is a one-sided
  Wilcoxon test on the planted neurons of all models pooled against each baseline (largest p shown).

It reuses ``fashion_planted.py`` (model, references, neuron sets, score AUROC) and
``fashion_planted_seeds.py`` (aggregation over models, pooled tests).

    python benchmarks/fashion_rules.py --seeds 0,1 --n-train 10000 --n-fit 3000 --n-test 3000 --n-refs 30 \
        --max-neurons 40                                              # 21 min on 2 CPU cores (README)
    python benchmarks/fashion_rules.py --smoke                        # tiny models and data, < 1 min
    python benchmarks/fashion_rules.py --from-runs A/runs.json B/runs.json   # aggregate finished models/rules

Options not listed here are those of ``fashion_planted.py``. Results are written after every rule
of every model (``runs.json``), so a stopped run keeps what finished.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
import fashion_planted as fp  # noqa: E402
import fashion_planted_seeds as fs  # noqa: E402

import purenn  # noqa: E402
from purenn.analysis.metrics import disentanglement, paired_test, score_auroc
from purenn.attribution.rules import get_rule
from purenn.fit.circuits import fit_circuits
from purenn.fit.cluster import CircuitKMeans
from purenn.fit.data import DataSource
from purenn.fit.plan import LayerPlan

HERE = Path(__file__).resolve().parent
ALL_RULES = ("gradient", "epsilon", "zplus", "alpha2beta1", "gamma")
# per rule: (level, target layer, purify_model keywords)
RULE_GATES = {
    "layer4 | PURE circuit": ("layer4", {"gate": "circuit"}),
    "layer4.1 | circuit, skip-aware": ("layer4.1", {"gate": "circuit", "skip_aware": True}),
    "layer4.1 | PURE circuit (plain)": ("layer4.1", {"gate": "circuit", "skip_aware": False}),
}
BASE_GATES = {
    "layer4 | activation (target pooled)": ("layer4", {"gate": "activation"}),
    "layer4 | upstream pooled": ("layer4", {"gate": "upstream"}),
    "layer4 | own activation map": ("layer4", {"gate": "map"}),
    "layer4.1 | upstream pooled": ("layer4.1", {"gate": "upstream"}),
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    own = argparse.ArgumentParser(add_help=False)
    own.add_argument("--seeds", default="0,1", help="comma-separated training seeds (at least two)")
    own.add_argument("--rules", default=",".join(ALL_RULES), help="comma-separated rules")
    own.add_argument("--from-runs", default=None, nargs="+",
                     help="aggregate earlier (possibly stopped) runs' runs.json files (models of distinct seeds)")
    own.add_argument("--block-scores", action="store_true", help="also the score AUROC at layer4.1 (slower)")
    mine, rest = own.parse_known_args(argv)
    seeds = [int(s) for s in mine.seeds.split(",") if s.strip()]
    rules = [r.strip() for r in mine.rules.split(",") if r.strip()]
    if len(seeds) < 2 or len(set(seeds)) != len(seeds):
        raise SystemExit(f"--seeds needs at least two distinct seeds, got {mine.seeds!r}")
    if bad := [r for r in rules if r not in ALL_RULES]:
        raise SystemExit(f"unknown rule(s) {bad}; choose among {ALL_RULES}")
    a = fp.parse_args(rest)
    if "--out" not in rest:
        a.out = HERE / "results" / ("fashion_rules_smoke" if a.smoke else "fashion_rules")
    if a.smoke:  # under a minute: two rules, few neurons and references
        rules = rules if "--rules" in (argv if argv is not None else sys.argv[1:]) else ["gradient", "zplus"]
        a.n_refs, a.max_neurons = 8, min(a.max_neurons or 6, 6)
    a.seeds, a.rules, a.from_runs, a.block_scores = seeds, rules, mine.from_runs, mine.block_scores
    a.argv = list(argv if argv is not None else sys.argv[1:])
    return a


def evaluate(st: fp.Prepared, test, gates: dict, a, rule: str) -> dict:
    """Disentanglement of each gate on the held-out references (per neuron, as ``fp.disentangle``)."""
    out = {}
    for key, (layer, kw) in gates.items():
        t = time.time()
        pm = purenn.purify_model(st.model, [layer], st.fit_sub, n_refs=a.n_refs, neurons={layer: st.channels},
                                 progress=False, seed=a.seed, rule=rule, **kw)
        rep = disentanglement(pm, layer, test, test.fine, channels=st.channels, refs=st.refs_test,
                              min_share=a.min_share)
        per = {n.channel: n for n in rep.neurons}
        out[key] = {"channels": st.channels, **{m: [getattr(per[c], m) for c in st.channels]
                                                for m in ("ari", "ari_pair", "purity", "purity_pair")}}
        sel = np.isin(st.channels, st.planted_ch)
        v = np.array(out[key]["ari_pair"], dtype=float)[sel]
        fp.log(f"{rule:11s} {key:40s} planted ARI pair {np.nanmean(v) if len(v) else float('nan'):.3f} "
               f"({time.time() - t:.0f}s)")
    return out


def layer4_scores(st: fp.Prepared, a, rule: str) -> dict:
    """Score AUROC at ``layer4`` only (``fp.score_validation`` also does ``layer4.1``; ``--block-scores``)."""
    if a.block_scores:
        return fp.score_validation(st.model, st.fit, st.refs_fit, st.mixed_fit, a)
    spec = purenn.ResNetSpec(st.model)
    pos, up_pos = spec.position("layer4"), spec.position("layer3")
    plan = LayerPlan("layer4", "layer3", pos, up_pos, tuple(range(spec.channels(pos))), False, get_rule(rule))
    circ = fit_circuits(spec, DataSource.from_data(st.fit, 256), [plan], {"layer4": st.refs_fit}, a.n_refs,
                        batch_size=256, device=None, max_memory=512 * 2**20, progress=False)["layer4"].numpy()
    res = {s: {"auroc": score_auroc(CircuitKMeans(2, score=s, random_state=a.seed).fit(circ).scores_, st.mixed_fit)}
           for s in ("silhouette", "contrast")}
    fp.log(f"{rule:11s} score AUROC layer4: silhouette {res['silhouette']['auroc']:.3f}, "
           f"contrast {res['contrast']['auroc']:.3f}")
    nan = {s: {"auroc": float("nan")} for s in res}
    return {"layer4": res, "layer4.1": nan}


def prepare_model(a, train, test, runs: list[dict]) -> fp.Prepared | None:
    st = fp.prepare(a, train, test)
    if st is None:
        return None
    base = evaluate(st, test, BASE_GATES, a, "gradient")
    # the target layer's own activations do not depend on the upstream layer (as in fp.disentangle)
    for name in ("activation (target pooled)", "own activation map"):
        base[f"layer4.1 | {name}"] = base[f"layer4 | {name}"]
    runs.append({"seed": a.seed, "accuracy": st.acc, "planted": st.planted_ch, "n_mixed": len(st.channels),
                 "baselines": base, "rules": {}})
    return st


def run_rule(a, st: fp.Prepared, test, run: dict, rule: str, path: Path, runs: list[dict]) -> None:
    t = time.time()
    a.rule, a.seed = rule, run["seed"]
    scores = layer4_scores(st, a, rule)
    for s in scores.values():
        for v in s.values():
            v.pop("scores", None)
    run["rules"][rule] = {"per_neuron": evaluate(st, test, RULE_GATES, a, rule), "scores": scores,
                          "seconds": time.time() - t}
    path.write_text(json.dumps(runs, indent=1, default=float))  # keep what is done
    fp.log(f"seed {run['seed']} rule {rule} done ({time.time() - t:.0f}s)")


def per_rule_runs(runs: list[dict], rule: str) -> list[dict]:
    """The models that finished ``rule``, in ``fashion_planted_seeds``'s run format."""
    return [{"seed": r["seed"], "accuracy": r["accuracy"], "planted": r["planted"],
             "per_neuron": {**r["baselines"], **r["rules"][rule]["per_neuron"]}, "scores": r["rules"][rule]["scores"]}
            for r in runs if rule in r["rules"]]


def aggregate(runs: list[dict], rules: list[str]) -> dict:
    out = {}
    for rule in rules:
        rr = per_rule_runs(runs, rule)
        if len(rr) >= 2:
            out[rule] = fs.aggregate(rr)
        elif rr:  # one model: values only, no sd or pooled test over models
            r = rr[0]
            out[rule] = {"gates": {k: {"per_model": [float(np.nanmean(fs.planted_values(r, k)))]}
                                   for k in r["per_neuron"]},
                         "auroc": {f"{lv} | {s}": {"per_model": [r["scores"][lv][s]["auroc"]]}
                                   for lv in ("layer4", "layer4.1") for s in ("silhouette", "contrast")}}
    return out


def skip_gain(runs: list[dict], rule: str) -> dict | None:
    """Skip-aware minus plain planted-pair ARI at ``layer4.1`` under ``rule``, planted neurons of all
    models pooled: mean gain, share of neurons with a gain, one-sided paired test."""
    rr = per_rule_runs(runs, rule)
    if not rr:
        return None
    aware = np.concatenate([fs.planted_values(r, "layer4.1 | circuit, skip-aware") for r in rr])
    plain = np.concatenate([fs.planted_values(r, "layer4.1 | PURE circuit (plain)") for r in rr])
    ok = np.isfinite(aware) & np.isfinite(plain)
    d = aware[ok] - plain[ok]
    return {"n": int(ok.sum()), "gain": float(d.mean()), "share_better": float((d > 0).mean()),
            "p": paired_test(aware[ok], plain[ok])}


def _cell(row: dict, bold: bool = False) -> str:
    per = " / ".join(f"{v:.3f}" for v in row["per_model"])
    if "sd" in row:
        m = f"{row['mean']:.3f} ± {row['sd']:.3f}"
        return f"{per} ({'**' + m + '**' if bold else m})"
    return per


def _p(row: dict) -> str:
    return f"{max(row['p_pooled'].values()):.2g}" if row.get("p_pooled") else ""


def table(runs: list[dict], agg: dict) -> str:
    seeds = [r["seed"] for r in runs]
    acc = ", ".join(f"{r['accuracy']:.1%}" for r in runs)
    planted = ", ".join(str(len(r["planted"])) for r in runs)
    mixed = ", ".join(str(r["n_mixed"]) for r in runs)
    lines = [f"Seeds {seeds}: superclass test accuracy {acc}; planted neurons {planted}; mixed (evaluated) {mixed}.",
             "",
             "Cells: per model (seeds in order) and, in brackets, mean ± sd over models. p: one-sided Wilcoxon, "
             "planted neurons of all models pooled, against the strongest activation baseline.", ""]
    keys = [("layer4 | PURE circuit", "layer4 circuit ARI"), ("layer4.1 | circuit, skip-aware",
            "layer4.1 skip-aware ARI"), ("layer4.1 | PURE circuit (plain)", "layer4.1 plain ARI")]
    best = {k: max((g["gates"][k].get("mean", g["gates"][k]["per_model"][0]) for g in agg.values()), default=0)
            for k, _ in keys}
    block_auroc = any(np.isfinite(v) for g in agg.values() for v in g["auroc"]["layer4.1 | contrast"]["per_model"])
    lines.append("| rule | " + " | ".join(f"{h}" for _, h in keys[:2]) + " | p layer4 | p layer4.1 | "
                 + keys[2][1] + " | contrast AUROC layer4 |" + (" contrast AUROC layer4.1 |" if block_auroc else ""))
    lines.append("|---" * (8 if block_auroc else 7) + "|")
    for rule, g in agg.items():
        c = [_cell(g["gates"][k], g["gates"][k].get("mean") == best[k]) for k, _ in keys]
        p4, p41 = _p(g["gates"][keys[0][0]]), _p(g["gates"][keys[1][0]])
        au4, au41 = _cell(g["auroc"]["layer4 | contrast"]), _cell(g["auroc"]["layer4.1 | contrast"])
        tail = f" {au41} |" if block_auroc else ""
        lines.append(f"| `{rule}` | {c[0]} | {c[1]} | {p4} | {p41} | {c[2]} | {au4} |{tail}")
    gains = {rule: skip_gain(runs, rule) for rule in agg}
    lines += ["", "Skip-awareness at `layer4.1` (skip-aware minus plain planted-pair ARI, planted neurons of all "
              "models pooled, one-sided Wilcoxon):", "", "| rule | neurons | mean gain | share with a gain | p |",
              "|---|---|---|---|---|"]
    lines += [f"| `{rule}` | {g['n']} | {g['gain']:+.3f} | {g['share_better']:.2f} | {g['p']:.2g} |"
              for rule, g in gains.items() if g is not None]
    if agg:
        g = next(iter(agg.values()))["gates"]
        lines += ["", "Activation baselines (rule-independent), planted-pair ARI:", "",
                  "| target | baseline | per model (mean ± sd) |", "|---|---|---|"]
        for b in fp.BASELINES:
            for level in ("layer4", "layer4.1"):
                k = f"{level} | {b}"
                if k in g:
                    lines.append(f"| {level} | {b} | {_cell(g[k])} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    torch.set_grad_enabled(False)
    a.out.mkdir(parents=True, exist_ok=True)
    path = a.out / "runs.json"
    if a.from_runs:
        runs = [run for f in a.from_runs for run in json.loads(Path(f).read_text())]
        if len({run["seed"] for run in runs}) != len(runs):
            raise SystemExit(f"--from-runs: the files hold models of the same seed: {[r['seed'] for r in runs]}")
    else:
        train, test = fp.load_data(a)
        fp.log(f"data: {train.source}, {len(train)} train / {len(test)} test; seeds {a.seeds}; rules {a.rules}")
        runs, states = [], []
        for seed in a.seeds:  # models first, then rules over all models: a stopped run keeps whole rules
            a.seed = seed
            torch.manual_seed(seed)
            t = time.time()
            st = prepare_model(a, train, test, runs)
            if st is None:
                return 1
            states.append(st)
            fp.log(f"seed {seed} prepared ({time.time() - t:.0f}s)")
        path.write_text(json.dumps(runs, indent=1, default=float))
        for rule in a.rules:
            for st, run in zip(states, runs):
                run_rule(a, st, test, run, rule, path, runs)
    rules = [r for r in ALL_RULES if any(r in run["rules"] for run in runs)]
    agg = aggregate(runs, rules)
    md = table(runs, agg)
    print(md)
    cmd = "python benchmarks/fashion_rules.py " + " ".join(a.argv)
    if a.from_runs:  # keep the commands that ran the models, where their results.md says them
        firsts = [Path(f).with_name("results.md").read_text().splitlines()[0].strip("`")
                  for f in a.from_runs if Path(f).with_name("results.md").is_file()]
        if firsts and len(firsts) == len(a.from_runs) and not any("--from-runs" in f for f in firsts):
            cmd = "; ".join(firsts)
    fp.write_results(a, cmd.strip(), md, {"aggregate": agg})
    return 0


if __name__ == "__main__":
    sys.exit(main())
