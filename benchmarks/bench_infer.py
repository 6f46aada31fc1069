"""Gated inference cost: base model vs purified model with K gated neurons, against the FLOP bound.

Gating neuron k costs one backward pass through the segment between the upstream and the target
layer, and an input-gradient backward through a convolution has the FLOPs of its forward. So the
FLOP-proportional estimate of the gating overhead is ``K x FLOPs(segment forward)`` per sample; in
time, ``t_base x K x FLOPs(segment) / FLOPs(model)``. This script measures, in one run, the base
model, the purified model computing logits + gates + pooled pure features for every purified
neuron (``pm._run(x, all_gates=True, pool="mean")``), the counted FLOPs of both
(torch.utils.flop_counter), and prints overhead / estimate. It also checks that the gates equal
those of a chunk-per-neuron evaluation.

With ``--onnx`` (the default) it exports each purified model (``purenn.export_onnx``, verified) and
times ONNX Runtime (CPU provider, as many intra-op threads as torch uses) against PyTorch eager on
the same batch, both computing logits, gates and pooled pure features, and reports how many gates
agree.

    python benchmarks/bench_infer.py                     # resnet50, 112x112, batch 8, K = 8, 32, 128
    python benchmarks/bench_infer.py --smoke             # seconds; used by CI

With ``--rule epsilon,gamma`` (LRP rules of :mod:`purenn.attribution.rules`) it purifies the same neurons
with the gradient rule and each named rule and times the base model and every purified model in
alternating rounds, reporting per rule the gated time and overhead and their ratios to the
gradient's (no FLOP counts or ONNX timing in this mode):

    python benchmarks/bench_infer.py --rule epsilon,zplus,alpha2beta1,gamma --k 32
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

import purenn
from purenn.arch import ResNetSpec

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from _common import calibrated, count_flops  # noqa: E402


def timeit_pair(base, other, repeat: int) -> tuple[float, float]:
    """Median times of two functions, run alternately so both see the same machine load."""
    base(), other()
    tb, to = [], []
    for _ in range(repeat):
        for fn, out in ((base, tb), (other, to)):
            t0 = time.perf_counter()
            fn()
            out.append(time.perf_counter() - t0)
    return statistics.median(tb), statistics.median(to)


def onnx_vs_eager(pm, x, layer: str, repeat: int) -> dict:
    """Latency of the exported graph in ONNX Runtime vs ``pm`` in PyTorch eager, same outputs.

    ONNX Runtime's threads do not spin-wait between runs (``allow_spinning=0``), so they leave the
    cores to PyTorch in the alternating timing. Gate differences on ``x`` are split by the export
    report into ties (the two nearest centroids equally near within 1e-3) and errors.
    """
    import onnxruntime as ort

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model.onnx"
        report = purenn.export_onnx(pm, path, tuple(x.shape[1:]), inputs=x, batch_sizes=(1,))
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = torch.get_num_threads()
        opts.inter_op_num_threads = 1
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    feed = {sess.get_inputs()[0].name: x.numpy()}
    with torch.no_grad():
        t_eager, t_ort = timeit_pair(
            lambda: pm._run(x, all_gates=True, pool="mean"), lambda: sess.run(None, feed), repeat
        )
    on_x = [c for c in report.checks if c.batch == x.shape[0]]
    return {
        "t_eager_purified_ms": round(1e3 * t_eager, 1), "t_onnxruntime_ms": round(1e3 * t_ort, 1),
        "onnxruntime_over_eager": round(t_ort / t_eager, 3), "export_verified": bool(report.ok),
        "onnx_gate_agreement": min(c.gate_agreement(layer) for c in on_x),
        "onnx_gate_ties": sum(c.gate_ties[layer] for c in on_x),
        "onnx_gate_errors": sum(c.gate_errors[layer] for c in on_x),
    }


def timeit_all(fns: dict, repeat: int) -> dict[str, float]:
    """Median time of each function, all run in turn in every round (same machine load)."""
    for fn in fns.values():
        fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeat):
        for key, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[key].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def compare_rules(model, data, x, layer: str, up: str, k: int, rules: list[str], a) -> dict:
    """Gated inference (logits, gates and pooled pure features of all K neurons) per rule, timed
    against the base model and the gradient rule in alternating rounds."""
    rules = ["gradient", *[r for r in rules if r != "gradient"]]
    pms = {
        r: purenn.purify_model(model, [layer], data, n_refs=4, neurons={layer: list(range(k))}, progress=False,
                               cache_memory=0, rule=r)
        for r in rules
    }
    fns = {"base": lambda: model(x)}
    for r, pm in pms.items():
        fns[r] = lambda pm=pm: pm._run(x, all_gates=True, pool="mean")
    with torch.no_grad():
        t = timeit_all(fns, a.repeat)
    row = {"model": a.model, "layer": layer, "upstream": up, "K": k, "batch": a.batch, "size": a.size,
           "repeat": a.repeat, "t_base_ms": round(1e3 * t["base"], 1)}
    g_pure, g_over = t["gradient"], t["gradient"] - t["base"]
    for r in rules:
        row[r] = {"t_purified_ms": round(1e3 * t[r], 1), "overhead_ms": round(1e3 * (t[r] - t["base"]), 1),
                  "purified_over_gradient": round(t[r] / g_pure, 3),
                  "overhead_over_gradient": round((t[r] - t["base"]) / g_over, 3)}
    return row


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="resnet50")
    p.add_argument("--layers", default="layer4,layer4.1")
    p.add_argument("--k", default="8,32,128")
    p.add_argument("--size", type=int, default=112)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--no-onnx", dest="onnx", action="store_false", help="skip the ONNX Runtime comparison")
    p.add_argument("--rule", default="gradient", help="comma-separated relevance rules to time against the "
                   "gradient rule (see purenn.attribution.rules)")
    p.add_argument("--smoke", action="store_true")
    p.add_argument("--json", default=None)
    a = p.parse_args(argv)
    if a.smoke:
        a.model, a.k, a.size, a.batch, a.repeat = "resnet18", "4", 48, 2, 1

    model = calibrated(a.model, a.size)
    spec = ResNetSpec(model)
    data = torch.rand(24, 3, a.size, a.size, generator=torch.Generator().manual_seed(2))
    x = torch.rand(a.batch, 3, a.size, a.size, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        f_model = count_flops(lambda: model(x))
    rows = []
    for layer in a.layers.split(","):
        up = spec.default_upstream(layer)
        pos, upos = spec.position(layer), spec.position(up)
        acts, _ = spec.run_until(x, {upos})
        blocks = spec.segment(upos, pos)

        def segment(h=acts[upos], blocks=blocks):
            for b in blocks:
                h = b.module(h)
            return h

        rules = [r for r in a.rule.split(",") if r]
        if rules != ["gradient"]:
            for k in [int(v) for v in a.k.split(",")]:
                row = compare_rules(model, data, x, layer, up, k, rules, a)
                print(json.dumps(row))
                rows.append(row)
            continue
        with torch.no_grad():
            f_seg = count_flops(segment)
        for k in [int(v) for v in a.k.split(",")]:
            pm = purenn.purify_model(
                model, [layer], data, n_refs=4, neurons={layer: list(range(k))}, progress=False, cache_memory=0
            )
            with torch.no_grad():
                run = lambda pm=pm: pm._run(x, all_gates=True, pool="mean")  # noqa: E731
                t_base, t_pure = timeit_pair(lambda: model(x), run, a.repeat)
                f_pure = count_flops(run)
                gates = pm.gates(x)[layer]
                budget, pm.max_memory = pm.max_memory, 1  # one neuron per chunk: the plain evaluation order
                same = bool(torch.equal(gates, pm.gates(x)[layer]))
                pm.max_memory = budget
            overhead = t_pure - t_base
            estimate = t_base * k * f_seg / f_model
            row = {
                "model": a.model, "layer": layer, "upstream": up, "K": k, "batch": a.batch, "size": a.size,
                "t_base_ms": round(1e3 * t_base, 1), "t_purified_ms": round(1e3 * t_pure, 1),
                "overhead_over_flop_estimate": round(overhead / estimate, 3),
                "gflops_model": round(f_model / 1e9, 2), "gflops_segment": round(f_seg / 1e9, 3),
                "counted_overhead_flops_over_K_segment": round((f_pure - f_model) / (k * f_seg), 3),
                "gates_equal_per_neuron_evaluation": same,
            }
            if a.onnx:
                row.update(onnx_vs_eager(pm, x, layer, a.repeat))
            print(json.dumps(row))
            rows.append(row)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(rows, f, indent=2)
    return rows


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
