"""Inference latency of an unlearned model by gate kind, against the base model, in PyTorch and in ONNX Runtime.

An unlearned model (``purify_concept`` + suppressing the concept parts) gates the ``M`` suppressed
channels on every input. How much that costs depends on the gate:

- ``circuit`` (PURE's, per channel): one backward pass through the segment per channel;
- ``joint-circuit``: one backward pass for all ``M`` channels together (the circuit of their joint unit);
- ``map``, ``activation``, ``upstream``: forward activations only;
- with ``--block-upstream``, the circuit gates again with the last block of ``layer4`` as the segment
  (``GATE@block``: upstream ``layer4.(n-2)`` instead of ``layer3``).

The model is a Fashion-MNIST-sized ResNet (``--blocks``, 28x28 single-channel input, stem stride 2,
10 classes; random weights with BatchNorm statistics from random images: latency does not depend on
training), purified at ``layer4`` on random "concept" examples (a bright 4x4 patch) against the
same images without it. For each ``M`` and gate it times ``pm(x)`` and the base model in eager
PyTorch (``torch.no_grad``), and the logits-only ONNX export (``outputs=("logits",)``, verified)
and the base model's export in ONNX Runtime (CPU provider), at each batch size, alternating all
variants round by round in one process so that all see the same machine load. Ratios are medians
over the rounds, against the base model timed in the same rounds.

    python benchmarks/bench_unlearn_gates.py                       # blocks 1,1,1,1 and 2,2,2,2; M = 8, 32, 128
    python benchmarks/bench_unlearn_gates.py --smoke               # seconds; used by CI
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

import purenn
from purenn.cli.datasets import small_image_resnet
from purenn.fit.concept import concept_virtual_indices, purify_concept

sys.path.insert(0, str(Path(__file__).parent))
from _common import alternate, count_flops, log, ort_session  # noqa: E402

HERE = Path(__file__).resolve().parent






def model_for(blocks: list[int], seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = small_image_resnet(blocks=blocks, stem_stride=2, num_classes=10)
    model.train()
    with torch.no_grad():  # BatchNorm statistics from random images keep activations in a realistic range
        for _ in range(3):
            model(torch.rand(64, 1, 28, 28))
    return model.eval()


def stamp(x: torch.Tensor) -> torch.Tensor:
    x = x.clone()
    x[..., 1:5, 1:5] = 1.0
    return x


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--blocks", default="1,1,1,1;2,2,2,2", help="block layouts, separated by ';'")
    p.add_argument("--channels", default="8,32,128", help="suppressed channels M")
    p.add_argument("--gates", default="circuit,joint-circuit,map")
    p.add_argument("--batches", default="1,8,64")
    p.add_argument("--repeat", type=int, default=9, help="timing rounds")
    p.add_argument("--no-onnx", action="store_true")
    p.add_argument("--block-upstream", action="store_true",
                   help="also time a one-block segment (upstream layer4.(n-2)) where layer4 has two blocks or more")
    p.add_argument("--out", default=None, help="results directory (default benchmarks/results/unlearn_gates)")
    p.add_argument("--smoke", action="store_true", help="one layout, M = 4, batches 1 and 4, 2 rounds")
    a = p.parse_args(argv)
    if a.smoke:
        a.blocks, a.channels, a.batches, a.repeat = "1,1,1,1", "4", "1,4", 2
    out_dir = Path(a.out) if a.out else HERE / "results" / ("unlearn_gates_smoke" if a.smoke else "unlearn_gates")
    out_dir.mkdir(parents=True, exist_ok=True)
    gates = a.gates.split(",")
    batches = [int(b) for b in a.batches.split(",")]
    t_start = time.perf_counter()
    g = torch.Generator().manual_seed(1)
    clean = torch.rand(40, 1, 28, 28, generator=g)
    rows = []
    for layout in a.blocks.split(";"):
        blocks = [int(b) for b in layout.split(",")]
        model = model_for(blocks)
        xs = {b: torch.rand(b, 1, 28, 28, generator=g) for b in batches}
        nxs = {b: x.numpy() for b, x in xs.items()}
        with tempfile.TemporaryDirectory() as tmp:
            base_path = Path(tmp) / "base.onnx"
            if not a.no_onnx:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    torch.onnx.export(model, (xs[batches[0]],), str(base_path), dynamo=False, input_names=["input"],
                                      output_names=["logits"],
                                      dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}})
            for m in [int(c) for c in a.channels.split(",")]:
                fns: dict[str, dict[int, object]] = {b: {} for b in batches}
                onnx_fns: dict[int, dict[str, object]] = {b: {} for b in batches}
                base_sess = None if a.no_onnx else ort_session(base_path)
                for b in batches:
                    fns[b]["base"] = lambda x=xs[b], f=model: f(x)
                    if base_sess is not None:
                        onnx_fns[b]["base"] = lambda s=base_sess, x=nxs[b]: s.run(None, {"input": x})
                flops: dict[str, float] = {}
                with torch.no_grad():
                    f_base = count_flops(lambda f=model, x=xs[batches[-1]]: f(x))
                variants = [(gate, None) for gate in gates]
                if a.block_upstream and blocks[3] >= 2:
                    variants += [(f"{gate}@block", f"layer4.{blocks[3] - 2}") for gate in gates if "circuit" in gate]
                for gate, upstream in variants:
                    pm = purify_concept(model, "layer4", stamp(clean), clean, neurons={"layer4": list(range(m))},
                                        gate=gate.split("@")[0], upstream=None if upstream is None else
                                        {"layer4": upstream})
                    pm.suppress("layer4", concept_virtual_indices(pm, "layer4"))
                    with torch.no_grad():
                        flops[gate] = count_flops(lambda pm=pm, x=xs[batches[-1]]: pm(x)) / f_base
                    for b in batches:
                        fns[b][gate] = lambda x=xs[b], pm=pm: pm(x)
                    if not a.no_onnx:
                        path = Path(tmp) / f"{gate}-{m}.onnx"
                        with warnings.catch_warnings():
                            warnings.simplefilter("ignore")
                            rep = purenn.export_onnx(pm, path, (1, 28, 28), outputs=("logits",), batch_sizes=(1,),
                                                     inputs=clean[:8])
                        if not rep.ok:
                            raise SystemExit(f"the {gate} export at M={m} failed its check: {rep}")
                        sess = ort_session(path)
                        for b in batches:
                            onnx_fns[b][gate] = lambda s=sess, x=nxs[b]: s.run(None, {"input": x})
                with torch.no_grad():
                    for b in batches:
                        med = {n: statistics.median(t) for n, t in alternate(fns[b], a.repeat).items()}
                        ort_med = ({n: statistics.median(t) for n, t in alternate(onnx_fns[b], a.repeat).items()}
                                   if onnx_fns[b] else {})
                        for gate, _ in variants:
                            row = {"blocks": layout, "M": m, "gate": gate, "batch": b, "flops_x": flops[gate],
                                   "eager_ms": 1e3 * med[gate], "eager_base_ms": 1e3 * med["base"],
                                   "eager_x": med[gate] / med["base"]}
                            if ort_med:
                                row.update(onnx_ms=1e3 * ort_med[gate], onnx_base_ms=1e3 * ort_med["base"],
                                           onnx_x=ort_med[gate] / ort_med["base"])
                            rows.append(row)
                            log(f"blocks {layout} M={m:3d} {gate:13} batch {b:2d}: eager {row['eager_x']:6.2f}x "
                                f"({row['eager_ms']:.1f} ms vs {row['eager_base_ms']:.1f})"
                                + (f", ONNX Runtime {row['onnx_x']:6.2f}x ({row['onnx_ms']:.1f} ms vs "
                                   f"{row['onnx_base_ms']:.1f})" if ort_med else ""))
    lines = ["| blocks | M | gate | FLOPs x base | " + " | ".join(f"eager x base, batch {b}" for b in batches)
             + ("" if a.no_onnx else " | " + " | ".join(f"ONNX Runtime x base, batch {b}" for b in batches)) + " |"]
    lines.append("|---|---|---|---|" + "---|" * (len(batches) * (1 if a.no_onnx else 2)))
    for layout in a.blocks.split(";"):
        for m in [int(c) for c in a.channels.split(",")]:
            for gate in dict.fromkeys(r["gate"] for r in rows if r["blocks"] == layout and r["M"] == m):
                sel = {r["batch"]: r for r in rows if r["blocks"] == layout and r["M"] == m and r["gate"] == gate}
                cells = [f"{sel[b]['eager_x']:.2f}" for b in batches]
                if not a.no_onnx:
                    cells += [f"{sel[b]['onnx_x']:.2f}" for b in batches]
                flop = sel[batches[0]]["flops_x"]
                lines.append(f"| {layout} | {m} | {gate} | {flop:.2f} | " + " | ".join(cells) + " |")
    table = "\n".join(lines)
    print(table)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; median of {a.repeat} alternating rounds; "
          f"total {time.perf_counter() - t_start:.0f} s")
    (out_dir / "summary.md").write_text(table + "\n")
    (out_dir / "rows.json").write_text(json.dumps({"args": vars(a), "rows": rows}, indent=1))
    return {"rows": rows}


if __name__ == "__main__":
    main()
