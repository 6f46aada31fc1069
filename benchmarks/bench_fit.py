"""Fitting speed: purenn's batched circuit relevance vs the per-neuron reference approach.

The reference approach is what PURE's code does through zennit-crp: for each neuron, a full model
forward on the neuron's reference samples, then a backward pass from the target layer (initial
gradient ``e_k * clamp(a_k, 0)``) to the upstream layer, then gradient x activation. Here it is
written with plain autograd (zennit-crp pins zennit<=0.4.6, which conflicts with purenn's zennit).
Both run in the same process on the same model, neurons and reference samples; the script checks
that they give the same relevance vectors and prints times and ratios.

    python benchmarks/bench_fit.py                          # resnet50 layer4, 16 neurons x 16 refs, 112x112
    python benchmarks/bench_fit.py --neurons 2048 --refs 100 --size 224 --skip-reference
    python benchmarks/bench_fit.py --smoke                  # seconds; used by CI
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time

import torch
import torchvision
from torch import nn

import purenn
from purenn.arch import ResNetSpec
from purenn.collect import ActivationCache, collect_references
from purenn.data import DataSource
from purenn.fitting import fit_circuits
from purenn.purify import _plan_layers
from purenn.relevance import DEFAULT_MAX_MEMORY


def calibrated(name: str, size: int, seed: int = 0) -> nn.Module:
    """Random-weight ResNet with BatchNorm statistics from random images (realistic magnitudes)."""
    torch.manual_seed(seed)
    model = getattr(torchvision.models, name)(num_classes=10)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.momentum = None
    model.train()
    with torch.no_grad():
        model(torch.rand(16, 3, size, size))
    return model.eval()


def reference_relevance(model, data, layer, upstream, neurons, ref_idx):
    """Per neuron: full forward on its references, autograd backward from layer to upstream."""
    mods = dict(model.named_modules())
    out = []
    for j, k in enumerate(neurons):
        store = {}

        def keep_up(m, i, o, store=store):
            store["up"] = o

        def keep_l(m, i, o, store=store):
            store["l"] = o

        h1 = mods[upstream].register_forward_hook(keep_up)
        h2 = mods[layer].register_forward_hook(keep_l)
        x = data[ref_idx[j]].requires_grad_(True)  # so the stem output takes part in autograd
        try:
            model(x)
        finally:
            h1.remove()
            h2.remove()
        a_l, a_up = store["l"], store["up"]
        go = torch.zeros_like(a_l)
        go[:, k] = a_l[:, k].detach().clamp(min=0)
        (g,) = torch.autograd.grad(a_l, a_up, go)
        r = (g * a_up).sum(dim=(2, 3)).detach()
        out.append(r / (r.abs().sum(-1, keepdim=True) + 1e-12))
    return torch.stack(out)  # (K, n, C_U)


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
    plans = _plan_layers(spec, [a.layer], {a.layer: neurons}, {a.layer: upstream}, False)
    source = DataSource.from_data(data, a.batch_size)

    cache = ActivationCache({plans[0].up_position}, a.cache_memory_mb * 2**20)
    t0 = time.perf_counter()
    refs = collect_references(
        spec, source, {a.layer: plans[0].position}, a.refs, cache=cache, channels={a.layer: neurons}
    )
    t_collect = time.perf_counter() - t0
    t0 = time.perf_counter()
    ours = fit_circuits(
        spec, source, plans, refs, a.refs, batch_size=a.batch_size, device=None,
        max_memory=a.max_memory_mb * 2**20, progress=False, cache=cache,
    )[a.layer]
    t_rel = time.perf_counter() - t0
    peak_rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    res = {
        "model": a.model, "layer": a.layer, "upstream": upstream, "neurons": a.neurons, "refs": a.refs,
        "size": a.size, "distinct_ref_samples": int(torch.unique(refs[a.layer].indices[neurons]).numel()),
        "activation_cache_used": cache.complete, "purenn_collect_s": round(t_collect, 3),
        "purenn_relevance_s": round(t_rel, 3),
        "peak_rss_mb": round(peak_rss_mb), "max_memory_mb": a.max_memory_mb, "torch_threads": torch.get_num_threads(),
    }
    t0 = time.perf_counter()
    pm = purenn.purify_model(
        model, [a.layer], data, n_refs=a.refs, neurons={a.layer: neurons}, upstream={a.layer: upstream},
        skip_aware=False, batch_size=a.batch_size, progress=False, max_memory=a.max_memory_mb * 2**20,
        cache_memory=a.cache_memory_mb * 2**20,
    )
    res["purenn_total_fit_s"] = round(time.perf_counter() - t0, 3)
    assert len(pm.pure_layer(a.layer).neurons) == a.neurons

    if not a.skip_reference:
        ref_idx = refs[a.layer].indices[neurons]
        t0 = time.perf_counter()
        theirs = reference_relevance(model, data, a.layer, upstream, neurons, ref_idx)
        t_ref = time.perf_counter() - t0
        res["reference_s"] = round(t_ref, 3)
        res["speedup_relevance"] = round(t_ref / t_rel, 2)
        res["speedup_total_fit"] = round(t_ref / res["purenn_total_fit_s"], 2)
        res["max_abs_diff_relevance"] = float((ours - theirs).abs().max())
        res["max_abs_relevance"] = float(theirs.abs().max())
    print(json.dumps(res, indent=2))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(res, f, indent=2)
    return res


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
