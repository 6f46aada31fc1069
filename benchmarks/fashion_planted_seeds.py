"""Planted polysemanticity on Fashion-MNIST over several trained models (seeds).

One trained model decides little: the margins between gates in ``fashion_planted.py`` moved from
one training to the next. This script trains (or loads from the cache) the same ResNet-18 with
several seeds and, for each, runs the disentanglement section of ``fashion_planted.py`` (every gate
at ``layer4`` and at block level ``layer4.1``, on held-out test references) and the score AUROC.
It then reports, per gate, the planted-pair ARI of every model, its mean and standard deviation
over models, and a one-sided Wilcoxon signed-rank test on the planted neurons of all models
pooled, against each activation baseline (the largest p is reported as "p vs best baseline").

    python benchmarks/fashion_planted_seeds.py --seeds 0,1,2,3,4   # per model ~8 min training + ~25 min (2 CPU cores)
    python benchmarks/fashion_planted_seeds.py --smoke --seeds 0,1 # tiny models and data, < 2 min
    python benchmarks/fashion_planted_seeds.py --from-runs DIR/runs.json  # aggregate finished models

Options not listed here are those of ``fashion_planted.py`` (``--n-refs``, ``--min-share``, ...).
Results go to ``--out`` (default ``benchmarks/results/fashion_planted_seeds[_smoke]``).
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

from purenn.analysis.metrics import paired_test

HERE = Path(__file__).resolve().parent


def parse_args(argv: list[str] | None = None):
    own = argparse.ArgumentParser(add_help=False)
    own.add_argument("--seeds", default="0,1,2", help="comma-separated training seeds (at least two)")
    own.add_argument("--from-runs", default=None,
                     help="aggregate the finished models of an earlier (possibly stopped) run's runs.json")
    mine, rest = own.parse_known_args(argv)
    try:
        seed_list = [int(s) for s in mine.seeds.split(",") if s.strip()]
    except ValueError:
        raise SystemExit(f"--seeds must be comma-separated integers, got {mine.seeds!r}") from None
    if len(seed_list) < 2 or len(set(seed_list)) != len(seed_list):
        raise SystemExit(f"--seeds needs at least two distinct seeds, got {mine.seeds!r}")
    a = fp.parse_args(rest)
    if "--out" not in rest:
        suffix = "" if a.rule == "gradient" else f"_{a.rule}"
        a.out = HERE / "results" / (("fashion_planted_seeds_smoke" if a.smoke else "fashion_planted_seeds") + suffix)
    a.seeds, a.from_runs = seed_list, mine.from_runs
    return a


def run_seed(a, train, test) -> dict | None:
    """The disentanglement and score sections of ``fashion_planted.py`` for one trained model
    (``None`` when it has no mixed neurons)."""
    st = fp.prepare(a, train, test)
    if st is None:
        return None
    scores = fp.score_validation(st.model, st.fit, st.refs_fit, st.mixed_fit, a)
    results, _ = fp.disentangle(st.model, st.fit_sub, test, st.refs_test, st.channels, st.planted_ch, a)
    summary = fp.summarise(results, st.planted_ch)
    for s in scores.values():
        for v in s.values():
            v.pop("scores")
    return {"seed": a.seed, "accuracy": st.acc, "planted": st.planted_ch, "summary": summary, "scores": scores,
            "per_neuron": results}


def planted_values(run: dict, key: str, metric: str = "ari_pair") -> np.ndarray:
    r = run["per_neuron"][key]
    sel = np.isin(r["channels"], run["planted"])
    return np.asarray(r[metric], dtype=float)[sel]


def aggregate(runs: list[dict]) -> dict:
    """Per gate: planted-pair ARI per model, mean/sd over models, pooled paired tests vs baselines."""
    keys = list(runs[0]["per_neuron"])
    out = {}
    for key in keys:
        level = key.split(" | ")[0]
        per_model = [float(np.nanmean(planted_values(r, key))) for r in runs]
        row = {"per_model": per_model, "mean": float(np.mean(per_model)), "sd": float(np.std(per_model, ddof=1)),
               "n_planted": int(sum(len(planted_values(r, key)) for r in runs))}
        if "circuit" in key:
            pooled = np.concatenate([planted_values(r, key) for r in runs])
            tests, wins = {}, {}
            for b in fp.BASELINES:
                bk = f"{level} | {b}"
                if bk not in runs[0]["per_neuron"]:
                    continue
                base = np.concatenate([planted_values(r, bk) for r in runs])
                ok = np.isfinite(pooled) & np.isfinite(base)  # a neuron without a score is left out of the pair
                tests[b] = paired_test(pooled[ok], base[ok])
                wins[b] = int(sum(m > np.nanmean(planted_values(r, bk)) for m, r in zip(per_model, runs)))
            row["p_pooled"] = tests
            row["models_above"] = wins
        out[key] = row
    auroc = {}
    for level in ("layer4", "layer4.1"):
        for score in ("silhouette", "contrast"):
            v = [r["scores"][level][score]["auroc"] for r in runs]
            auroc[f"{level} | {score}"] = {"per_model": v, "mean": float(np.mean(v)), "sd": float(np.std(v, ddof=1))}
    return {"gates": out, "auroc": auroc}


def table(runs: list[dict], agg: dict) -> str:
    seeds = [r["seed"] for r in runs]
    acc = ", ".join(f"{r['accuracy']:.1%}" for r in runs)
    planted = ", ".join(str(len(r["planted"])) for r in runs)
    lines = [f"Seeds {seeds}: superclass test accuracy {acc}; planted neurons {planted}.", ""]
    lines.append("| target | gate | ARI planted (pair), per model | mean ± sd | p vs best baseline (pooled) "
                 "| models above best baseline |")
    lines.append("|---|---|---|---|---|---|")
    for key, r in agg["gates"].items():
        level, name = key.split(" | ")
        per = " / ".join(f"{v:.3f}" for v in r["per_model"])
        p = f"{max(r['p_pooled'].values()):.2g}" if r.get("p_pooled") else ""
        above = ""
        if r.get("p_pooled"):
            best = max(r["p_pooled"], key=r["p_pooled"].get)  # the baseline hardest to beat
            above = f"{r['models_above'][best]} of {len(runs)} (vs {best})"
        lines.append(f"| {level} | {name} | {per} | {r['mean']:.3f} ± {r['sd']:.3f} | {p} | {above} |")
    lines += ["", "| score AUROC | per model | mean ± sd |", "|---|---|---|"]
    for key, r in agg["auroc"].items():
        lines.append(f"| {key} | {' / '.join(f'{v:.3f}' for v in r['per_model'])} | {r['mean']:.3f} ± {r['sd']:.3f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    torch.set_grad_enabled(False)
    a.out.mkdir(parents=True, exist_ok=True)
    if a.from_runs:
        if not Path(a.from_runs).is_file():
            raise SystemExit(f"--from-runs: no file {a.from_runs} (the runs.json an earlier run wrote to its --out)")
        runs = json.loads(Path(a.from_runs).read_text())
        a.seeds = [r["seed"] for r in runs]
        if len(runs) < 2:
            raise SystemExit(f"{a.from_runs} holds {len(runs)} finished model(s); at least two are needed")
    else:
        train, test = fp.load_data(a)
        fp.log(f"data: {train.source}, {len(train)} train / {len(test)} test; seeds {a.seeds}")
        runs = []
        for seed in a.seeds:
            a.seed = seed
            torch.manual_seed(seed)
            t = time.time()
            run = run_seed(a, train, test)
            if run is None:
                return 1
            runs.append(run)
            fp.log(f"seed {seed} done ({time.time() - t:.0f}s)")
            # keep what is done: a long run that stops early still leaves its finished models
            (a.out / "runs.json").write_text(json.dumps(runs, indent=1, default=float))
    if any(not r["planted"] for r in runs):
        fp.log("a model has no planted neurons: nothing to compare")
        return 1
    agg = aggregate(runs)
    md = table(runs, agg)
    print(md)
    cmd = "python benchmarks/fashion_planted_seeds.py" + (" --smoke" if a.smoke else "") + \
        f" --seeds {','.join(map(str, a.seeds))}"
    fp.write_results(a, cmd, md, {"aggregate": agg})
    return 0


if __name__ == "__main__":
    sys.exit(main())
