"""ONNX Runtime latency of an unlearned model exported with logits only, against the base model and the
full export.

An unlearned model suppresses a few virtual neurons. Its logits depend on the gate only for the
neurons whose virtual neurons have unequal merge weights, so
``purenn.export_onnx(pm, ..., outputs=("logits",))`` gates only those; the full export (logits, pure
features and gates) gates every purified neuron. Gating a neuron costs one backward pass through its
segment, so the FLOP estimate of a graph that gates K neurons is ``1 + K x FLOPs(segment) / FLOPs(model)``
times the base model.

This script purifies ``--neurons`` neurons of ``--layer`` (random weights, BatchNorm statistics from
random images), suppresses for the first ``--suppressed`` of them the virtual neuron that the gate
picks most often on the timed batch, and exports

- ``base``: the base ResNet (``torch.onnx.export(..., dynamo=False)``, dynamic batch axis);
- ``unlearned``: the suppressed model with ``outputs=("logits",)`` (verified);
- ``full``: the suppressed model with every output (verified);
- ``restored``: the model with nothing suppressed, ``outputs=("logits",)`` (no gate at all).

It then times all four in ONNX Runtime (CPU provider, as many intra-op threads as torch uses, no
spin-waiting) on one batch, alternating them round by round in one process so that all see the same
machine load, and prints median latencies, ratios, graph node counts and the FLOP estimates.

    python benchmarks/bench_unlearned_export.py            # resnet50, 112x112, batch 8, 32 neurons, 4 suppressed
    python benchmarks/bench_unlearned_export.py --smoke    # seconds; used by CI
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
import warnings
from collections import Counter
from pathlib import Path

import numpy as np
import torch

import purenn
from purenn.arch import ResNetSpec

sys.path.insert(0, str(Path(__file__).parent))
from _common import alternate, calibrated, count_flops, ort_session  # noqa: E402

VARIANTS = ("base", "unlearned", "full", "restored")






def ops(path: Path) -> Counter:
    import onnx

    return Counter(node.op_type for node in onnx.load(str(path)).graph.node)


def main(argv: list[str] | None = None) -> dict[str, float]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="resnet50")
    p.add_argument("--layer", default="layer4")
    p.add_argument("--neurons", type=int, default=32, help="purified neurons (every 8th channel)")
    p.add_argument("--suppressed", type=int, default=4, help="neurons with a suppressed virtual neuron")
    p.add_argument("--size", type=int, default=112)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--repeat", type=int, default=15, help="timing rounds")
    p.add_argument("--smoke", action="store_true", help="resnet18, 48x48, batch 2, 4 neurons, 1 suppressed")
    a = p.parse_args(argv)
    if a.smoke:
        a.model, a.size, a.batch, a.neurons, a.suppressed, a.repeat = "resnet18", 48, 2, 4, 1, 3
    if not 0 <= a.suppressed <= a.neurons:
        p.error("--suppressed must be between 0 and --neurons")

    t_start = time.perf_counter()
    model = calibrated(a.model, a.size)
    shape = (3, a.size, a.size)
    data = torch.rand(24, *shape, generator=torch.Generator().manual_seed(2))
    x = torch.rand(a.batch, *shape, generator=torch.Generator().manual_seed(3))
    neurons = list(range(0, 8 * a.neurons, 8))
    pm = purenn.purify_model(model, [a.layer], data, n_refs=4, neurons={a.layer: neurons}, progress=False)
    pl = pm.pure_layer(a.layer)
    with torch.no_grad():
        gates = pm.gates(x)[a.layer]
    split = [k for k, n in enumerate(pl.n_clusters.tolist()) if n > 1][: a.suppressed]
    # per suppressed neuron, the virtual neuron its gate picks most often on x (so the logits change)
    suppressed = [pm.virtual_index(a.layer, int(pl.neurons[k]), int(gates[:, k].mode().values)) for k in split]

    spec = ResNetSpec(model)
    pos, up = spec.position(a.layer), spec.position(pl.upstream)
    acts, _ = spec.run_until(x, {up})
    blocks = spec.segment(up, pos)

    def segment() -> torch.Tensor:
        h = acts[up]
        for b in blocks:
            h = b.module(h)
        return h

    with torch.no_grad():
        f_model, f_seg = count_flops(lambda: model(x)), count_flops(segment)

    with tempfile.TemporaryDirectory() as tmp:
        paths = {v: Path(tmp) / f"{v}.onnx" for v in VARIANTS}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with torch.no_grad():
                torch.onnx.export(model, (x[:2],), str(paths["base"]), dynamo=False, input_names=["input"],
                                  output_names=["logits"], dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}})
            reports = {"restored": purenn.export_onnx(pm, paths["restored"], shape, outputs=("logits",),
                                                      batch_sizes=(1,), inputs=x)}
            if suppressed:
                pm.suppress(a.layer, suppressed)
            reports["unlearned"] = purenn.export_onnx(pm, paths["unlearned"], shape, outputs=("logits",),
                                                      batch_sizes=(1,), inputs=x)
            reports["full"] = purenn.export_onnx(pm, paths["full"], shape, batch_sizes=(1,), inputs=x)
        gated = {"base": 0, "restored": 0, "unlearned": len(pl.gated_neurons(subset_only=True)),
                 "full": len(pl.gated_neurons(subset_only=False))}
        counts = {v: ops(paths[v]) for v in VARIANTS}
        sizes = {v: paths[v].stat().st_size for v in VARIANTS}
        sessions = {v: ort_session(paths[v]) for v in VARIANTS}
    feed = {"input": x.numpy()}
    outs = {v: sessions[v].run(None, feed)[0] for v in VARIANTS}
    with torch.no_grad():
        want, base_logits = pm(x).numpy(), model(x).numpy()
    times = alternate({v: (lambda s=sessions[v]: s.run(None, feed)) for v in VARIANTS}, a.repeat)
    med = {v: statistics.median(times[v]) for v in VARIANTS}

    print(f"{a.model}, input (batch {a.batch}, {', '.join(map(str, shape))}), {a.layer} (upstream {pl.upstream}): "
          f"{len(neurons)} purified neurons, {len(suppressed)} with a suppressed virtual neuron; "
          f"ONNX Runtime {__import__('onnxruntime').__version__}, CPU provider, {torch.get_num_threads()} threads, "
          f"{a.repeat} alternating rounds")
    print(f"FLOPs (torch.utils.flop_counter, batch {a.batch}): model {f_model / 1e9:.2f} G, "
          f"segment {f_seg / 1e9:.3f} G")
    for v in ("restored", "unlearned", "full"):
        r = reports[v]
        print(f"export {v:9}: verified {r.ok}, max |dlogits| {r.max_abs_logits:.2e}, outputs {list(r.outputs)[:3]}"
              + (" ..." if len(r.outputs) > 3 else ""))
    print()
    header = (f"{'graph':10} {'gated':>5} {'median ms':>9} {'min ms':>8} {'x base':>7} {'x full':>7} "
              f"{'FLOP est. x base':>16} {'nodes':>6} {'Conv':>5} {'ConvT':>5} {'ArgMin':>6} {'MiB':>6}")
    print(header)
    for v in VARIANTS:
        est = 1 + gated[v] * f_seg / f_model
        c = counts[v]
        print(f"{v:10} {gated[v]:5d} {1e3 * med[v]:9.1f} {1e3 * min(times[v]):8.1f} {med[v] / med['base']:7.2f} "
              f"{med[v] / med['full']:7.3f} {est:16.2f} {sum(c.values()):6d} {c['Conv']:5d} "
              f"{c['ConvTranspose']:5d} {c['ArgMin']:6d} {sizes[v] / 2**20:6.1f}")
    scale = float(np.abs(want).max())
    print()
    print(f"unlearned ONNX logits vs pm(x): max |d| {np.abs(outs['unlearned'] - want).max():.2e} "
          f"(largest |logit| {scale:.2f}); full ONNX logits vs pm(x): {np.abs(outs['full'] - want).max():.2e}; "
          f"unlearned vs base logits: {np.abs(outs['unlearned'] - base_logits).max():.2e} (the suppression); "
          f"restored vs base logits: {np.abs(outs['restored'] - base_logits).max():.2e}")
    print(f"speed-up of the logits-only export over the full export: {med['full'] / med['unlearned']:.2f}x "
          f"(FLOP estimate {(1 + gated['full'] * f_seg / f_model) / (1 + gated['unlearned'] * f_seg / f_model):.2f}x)")
    print(f"total {time.perf_counter() - t_start:.0f} s")
    return {v: med[v] for v in VARIANTS}


if __name__ == "__main__":
    main()
