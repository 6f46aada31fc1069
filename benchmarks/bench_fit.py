"""Fitting speed: purenn's batched circuit relevance vs the per-neuron reference approach.

Two forms of the reference run, per neuron, on the neuron's reference samples:

* ``to_upstream``: a full model forward, then autograd from the target layer (initial gradient
  ``e_k * clamp(a_k, 0)``) to the upstream layer only, then gradient x activation. The cheapest
  per-neuron form; the headline ratio uses it.
* ``crp``: what zennit-crp's ``CondAttribution`` does with ``start_layer`` (PURE's code): a full
  forward, then a backward from the target layer all the way to the input (it returns the input
  heatmap), reading the upstream gradient on the way. Written with plain autograd (zennit-crp pins
  zennit<=0.4.6, which conflicts with purenn's zennit), parameters frozen as crp freezes them.

Everything runs in one process on the same model, neurons and reference samples; the script checks
that both references give purenn's relevance vectors, times ``purify_model`` by stage (reference
collection, relevance, clustering), counts FLOPs of both sides (``torch.utils.flop_counter``), and
reports peak memory: the process's peak RSS and the part of it the fit added. The relevance ratio
compares the reference with purenn's relevance stage; the total-fit ratio adds to the reference
the reference collection and clustering that both approaches need.

    python benchmarks/bench_fit.py                          # resnet50 layer4, 16 neurons x 16 refs, 112x112
    python benchmarks/bench_fit.py --neurons 2048 --refs 100 --data 1000 --reference-neurons 16 --no-flops
    python benchmarks/bench_fit.py --smoke                  # seconds; used by CI

With ``--rule epsilon,gamma`` (LRP rules of :mod:`purenn.attribution.rules`) the script instead times
``purify_model`` with the gradient rule and each named rule in alternating rounds on the same
setting and reports the relevance-stage and whole-fit times per rule and their ratios to the
gradient's (the per-neuron reference is the gradient's and is skipped):

    python benchmarks/bench_fit.py --rule epsilon,zplus,alpha2beta1,gamma --rounds 3

With ``--score contrast+upstream`` it times the whole ``purify_model`` with that score against
the contrast score in alternating rounds (the extra forward pass over the references):

    python benchmarks/bench_fit.py --score contrast+upstream --neurons 512 --refs 50 --data 2000 --rounds 3
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

import purenn
import purenn.fit.stages as purify_module
from purenn.arch import ResNetSpec
from purenn.attribution.relevance import DEFAULT_MAX_MEMORY

sys.path.insert(0, str(Path(__file__).parent))
from _common import calibrated, count_flops  # noqa: E402


def rss_mb() -> float:
    """Current resident set size in MiB (Linux), else the peak."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * resource.getpagesize() / 2**20
    except OSError:
        return peak_rss_mb()


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def reference_relevance(model, data, layer, upstream, neurons, ref_idx, to_input: bool):
    """Per neuron: full forward on its references, autograd backward from ``layer`` to ``upstream``
    (or on to the input, as zennit-crp does), gradient x activation, L1-normalised."""
    mods = dict(model.named_modules())
    out = []
    for j, k in enumerate(neurons):
        store = {}

        def keep_up(m, i, o, store=store):
            if to_input:
                o.retain_grad()
            store["up"] = o

        def keep_l(m, i, o, store=store):
            store["l"] = o

        h1 = mods[upstream].register_forward_hook(keep_up)
        h2 = mods[layer].register_forward_hook(keep_l)
        x = data[ref_idx[j]].requires_grad_(True)  # crp requires it; it also makes the stem differentiable
        try:
            model(x)
        finally:
            h1.remove()
            h2.remove()
        a_l, a_up = store["l"], store["up"]
        go = torch.zeros_like(a_l)
        go[:, k] = a_l[:, k].detach().clamp(min=0)
        if to_input:
            torch.autograd.backward(a_l, go)  # fills x.grad (crp's heatmap) and a_up.grad
            g = a_up.grad
        else:
            (g,) = torch.autograd.grad(a_l, a_up, go)
        r = (g * a_up).sum(dim=(2, 3)).detach()
        out.append(r / (r.abs().sum(-1, keepdim=True) + 1e-12))
    return torch.stack(out)  # (K, n, C_U)


class StageTimer:
    """Wraps purify_model's stage functions to time them (or count their FLOPs) and keep their results."""

    STAGES = {"collect": "collect_references", "relevance": "fit_circuits"}

    def __init__(self, flops: bool = False):
        self.flops = flops
        self.seconds: dict[str, float] = {}
        self.gflops: dict[str, float] = {}
        self.results: dict[str, object] = {}
        self._saved = {}

    def __enter__(self):
        for stage, name in self.STAGES.items():
            fn = getattr(purify_module, name)
            self._saved[name] = fn

            def wrapped(*args, _fn=fn, _stage=stage, **kwargs):
                t0 = time.perf_counter()
                if self.flops:
                    with FlopCounterMode(display=False) as counter:
                        res = _fn(*args, **kwargs)
                    self.gflops[_stage] = self.gflops.get(_stage, 0.0) + counter.get_total_flops() / 1e9
                else:
                    res = _fn(*args, **kwargs)
                self.seconds[_stage] = self.seconds.get(_stage, 0.0) + time.perf_counter() - t0
                self.results[_stage] = res
                return res

            setattr(purify_module, name, wrapped)
        return self

    def __exit__(self, *exc):
        for name, fn in self._saved.items():
            setattr(purify_module, name, fn)


def purify(model, data, a, neurons, upstream, rule="gradient", score="contrast"):
    return purenn.purify_model(
        model, [a.layer], data, n_refs=a.refs, neurons={a.layer: neurons}, upstream={a.layer: upstream},
        skip_aware=False, batch_size=a.batch_size, progress=False, max_memory=a.max_memory_mb * 2**20,
        cache_memory=a.cache_memory_mb * 2**20, rule=rule, score=score,
    )


def compare_scores(model, data, a, neurons, upstream, scores: list[str]) -> dict:
    """Median whole-fit time per polysemanticity score over alternating rounds, with ratios to the
    contrast score's (``contrast+upstream`` adds a forward pass over the references)."""
    scores = ["contrast", *[s for s in scores if s != "contrast"]]
    tot: dict[str, list[float]] = {s: [] for s in scores}
    purify(model, data, a, neurons, upstream)  # warm-up
    for _ in range(a.rounds):
        for score in scores:
            t0 = time.perf_counter()
            purify(model, data, a, neurons, upstream, score=score)
            tot[score].append(time.perf_counter() - t0)
    res = {"model": a.model, "layer": a.layer, "upstream": upstream, "neurons": a.neurons, "refs": a.refs,
           "size": a.size, "data": a.data, "rounds": a.rounds, "torch_threads": torch.get_num_threads()}
    base = statistics.median(tot["contrast"])
    for score in scores:
        t = statistics.median(tot[score])
        res[score] = {"total_fit_s": round(t, 3), "total_fit_over_contrast": round(t / base, 3)}
    return res


def compare_rules(model, data, a, neurons, upstream, rules: list[str]) -> dict:
    """Median relevance-stage and whole-fit times per rule over alternating rounds, with ratios to
    the gradient rule's (same model, data, neurons and references)."""
    rules = ["gradient", *[r for r in rules if r != "gradient"]]
    rel: dict[str, list[float]] = {r: [] for r in rules}
    tot: dict[str, list[float]] = {r: [] for r in rules}
    purify(model, data, a, neurons, upstream)  # warm-up
    for _ in range(a.rounds):
        for rule in rules:
            with StageTimer() as timer:
                t0 = time.perf_counter()
                purify(model, data, a, neurons, upstream, rule)
                tot[rule].append(time.perf_counter() - t0)
            rel[rule].append(timer.seconds["relevance"])
    res = {"model": a.model, "layer": a.layer, "upstream": upstream, "neurons": a.neurons, "refs": a.refs,
           "size": a.size, "data": a.data, "rounds": a.rounds, "torch_threads": torch.get_num_threads()}
    g_rel, g_tot = statistics.median(rel["gradient"]), statistics.median(tot["gradient"])
    for rule in rules:
        r_rel, r_tot = statistics.median(rel[rule]), statistics.median(tot[rule])
        res[rule] = {"relevance_s": round(r_rel, 3), "total_fit_s": round(r_tot, 3),
                     "relevance_over_gradient": round(r_rel / g_rel, 3),
                     "total_fit_over_gradient": round(r_tot / g_tot, 3)}
    return res


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="resnet50")
    p.add_argument("--layer", default="layer4")
    p.add_argument("--upstream", default=None)
    p.add_argument("--neurons", type=int, default=16, help="first N channels of the layer")
    p.add_argument("--refs", type=int, default=16, help="reference samples per neuron")
    p.add_argument("--data", type=int, default=64, help="dataset size the references are drawn from")
    p.add_argument("--size", type=int, default=112)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--max-memory-mb", type=int, default=DEFAULT_MAX_MEMORY // 2**20)
    p.add_argument("--cache-memory-mb", type=int, default=1024, help="0 disables the activation cache")
    p.add_argument("--skip-reference", action="store_true", help="time purenn only")
    p.add_argument(
        "--reference-neurons", type=int, default=None,
        help="time the reference on the first M neurons only and scale its time by neurons / M (it is a "
        "loop whose iterations all cost the same)",
    )
    p.add_argument("--no-flops", action="store_true", help="skip the FLOP counts (they rerun the relevance stage)")
    p.add_argument("--rule", default="gradient", help="comma-separated relevance rules to time against the "
                   "gradient rule (see purenn.attribution.rules); 'gradient' alone runs the reference comparison")
    p.add_argument("--rounds", type=int, default=3, help="alternating rounds per rule with --rule or --score")
    p.add_argument("--score", default="contrast", help="comma-separated polysemanticity scores to time against "
                   "'contrast' (whole fit, gradient rule); 'contrast' alone runs the reference comparison")
    p.add_argument("--smoke", action="store_true", help="tiny settings for CI")
    p.add_argument("--json", default=None, help="write the results here")
    a = p.parse_args(argv)
    if a.smoke:
        a.model, a.neurons, a.refs, a.data, a.size = "resnet18", 4, 4, 8, 48

    torch.manual_seed(0)
    model = calibrated(a.model, a.size)
    data = torch.rand(a.data, 3, a.size, a.size, generator=torch.Generator().manual_seed(1))
    spec = ResNetSpec(model)
    upstream = a.upstream or spec.default_upstream(a.layer)
    neurons = list(range(a.neurons))
    rules = [r for r in a.rule.split(",") if r]
    scores = [s for s in a.score.split(",") if s]
    if rules != ["gradient"] or scores != ["contrast"]:
        if a.smoke:
            a.rounds = 1
        res = (compare_rules(model, data, a, neurons, upstream, rules) if rules != ["gradient"]
               else compare_scores(model, data, a, neurons, upstream, scores))
        print(json.dumps(res, indent=2))
        if a.json:
            with open(a.json, "w") as f:
                json.dump(res, f, indent=2)
        return res
    rss_before = rss_mb()

    with StageTimer() as timer:
        t0 = time.perf_counter()
        pm = purify(model, data, a, neurons, upstream)
        t_total = time.perf_counter() - t0
    assert len(pm.pure_layer(a.layer).neurons) == a.neurons
    peak = peak_rss_mb()
    refs = timer.results["collect"][a.layer]
    ours = timer.results["relevance"][a.layer]
    t_rel = timer.seconds["relevance"]
    res = {
        "model": a.model, "layer": a.layer, "upstream": upstream, "neurons": a.neurons, "refs": a.refs,
        "size": a.size, "data": a.data, "distinct_ref_samples": int(torch.unique(refs.indices[neurons]).numel()),
        "purenn_collect_s": round(timer.seconds["collect"], 3), "purenn_relevance_s": round(t_rel, 3),
        "purenn_cluster_etc_s": round(t_total - sum(timer.seconds.values()), 3),
        "purenn_total_fit_s": round(t_total, 3),
        "peak_rss_mb": round(peak), "fit_added_rss_mb": round(peak - rss_before),
        "circuit_features_mb": round(ours.numel() * ours.element_size() / 2**20),
        "max_memory_mb": a.max_memory_mb, "cache_memory_mb": a.cache_memory_mb,
        "torch_threads": torch.get_num_threads(),
    }

    if not a.skip_reference:
        m = a.neurons if a.reference_neurons is None else max(1, min(a.neurons, a.reference_neurons))
        ref_idx = refs.indices[neurons[:m]]
        model.requires_grad_(False)  # as crp's CondAttribution does (no_param_grad=True)
        for form, to_input in (("to_upstream", False), ("crp", True)):
            t0 = time.perf_counter()
            theirs = reference_relevance(model, data, a.layer, upstream, neurons[:m], ref_idx, to_input)
            t_ref = (time.perf_counter() - t0) * a.neurons / m
            res[f"reference_{form}_s"] = round(t_ref, 3)
            res[f"speedup_relevance_vs_{form}"] = round(t_ref / t_rel, 2)
            # the reference approach needs the same reference collection and clustering around it
            res[f"speedup_total_fit_vs_{form}"] = round((t_ref + t_total - t_rel) / t_total, 2)
            res[f"max_abs_diff_{form}"] = float((ours[:m] - theirs).abs().max())
        res["max_abs_relevance"] = float(theirs.abs().max())
        res["relevance_equal"] = all(
            res[f"max_abs_diff_{form}"] <= 1e-4 * res["max_abs_relevance"] + 1e-7 for form in ("to_upstream", "crp")
        )
        if m < a.neurons:
            res["reference_timed_on_neurons"] = m
        if not a.no_flops:  # separate, untimed runs
            with StageTimer(flops=True) as counted:
                purify(model, data, a, neurons, upstream)
            res["gflops_purenn_collect"] = round(counted.gflops["collect"], 1)
            res["gflops_purenn_relevance"] = round(counted.gflops["relevance"], 1)
            for form, to_input in (("to_upstream", False), ("crp", True)):
                one = count_flops(
                    lambda to_input=to_input: reference_relevance(
                        model, data, a.layer, upstream, neurons[:1], ref_idx[:1], to_input
                    )
                )
                res[f"gflops_reference_{form}"] = round(one * a.neurons / 1e9, 1)
                res[f"flop_ratio_relevance_vs_{form}"] = round(one * a.neurons / 1e9 / counted.gflops["relevance"], 2)
        model.requires_grad_(True)
    print(json.dumps(res, indent=2))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(res, f, indent=2)
    return res


def _ok(res: dict) -> bool:
    return bool(res.get("relevance_equal", True))


if __name__ == "__main__":
    sys.exit(0 if _ok(main()) else 1)
