"""ONNX export parity and size: ONNX Runtime vs PyTorch for purified ResNets, and save/load timing.

For each model (random weights, BatchNorm statistics calibrated on random images so that
activations have realistic magnitudes) this purifies ``layer4`` and ``layer3.1``, suppresses one
virtual neuron, saves and reloads the safetensors file (checking bit-identical logits), exports to
ONNX and prints the verification report: max |Δ| of logits and pure features (and relative to the
largest magnitude), gate agreement, file sizes and times.

    python benchmarks/bench_export.py                          # 4 models, 3x97x131, 8 + 3 neurons
    python benchmarks/bench_export.py --size 224 224 --neurons 64
    python benchmarks/bench_export.py --smoke                  # resnet18 only, seconds
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

import purenn

sys.path.insert(0, str(Path(__file__).parent))
from _common import calibrated  # noqa: E402

MODELS = ("resnet18", "resnet50", "resnext50_32x4d", "adapted_stem")


def main() -> None:
    fmt = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=fmt)
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    parser.add_argument("--size", nargs=2, type=int, default=[97, 131], metavar=("H", "W"))
    parser.add_argument("--neurons", type=int, default=8, help="purified neurons of layer4 (layer3.1 gets 3)")
    parser.add_argument("--batch-sizes", nargs="+", type=int, default=[1, 7])
    parser.add_argument("--opset", type=int, default=purenn.io.onnx.DEFAULT_OPSET)
    parser.add_argument("--smoke", action="store_true", help="resnet18 at 64x64 only")
    args = parser.parse_args()
    if args.smoke:
        args.models, args.size, args.batch_sizes = ["resnet18"], [64, 64], [1, 2]
    size = tuple(args.size)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models:
            model = calibrated(name, size)
            data = torch.rand(10, 3, *size, generator=torch.Generator().manual_seed(3))
            neurons = {"layer4": list(range(0, 8 * args.neurons, 8)), "layer3.1": [1, 2, 3]}
            pm = purenn.purify_model(model, ["layer4", "layer3.1"], data, n_refs=4, neurons=neurons,
                                     progress=False)
            pm.suppress("layer4", [pm.virtual_index("layer4", 8, 1)])
            st = Path(tmp) / f"{name}.safetensors"
            t0 = time.perf_counter()
            pm.save(st)
            t1 = time.perf_counter()
            pm2 = purenn.load_purified(st)
            t2 = time.perf_counter()
            x = torch.rand(2, 3, *size)
            with torch.no_grad():
                same = torch.equal(pm(x), pm2(x))
            onnx_path = Path(tmp) / f"{name}.onnx"
            t3 = time.perf_counter()
            report = purenn.export_onnx(pm, onnx_path, input_shape=(3, *size), batch_sizes=args.batch_sizes,
                                        opset=args.opset, strict=False)
            t4 = time.perf_counter()
            print(report.summary())
            print(f"  safetensors {st.stat().st_size / 2**20:.1f} MiB, save {t1 - t0:.2f} s, "
                  f"load {t2 - t1:.2f} s, reloaded logits bit-identical: {same}; "
                  f"export + verification {t4 - t3:.1f} s\n")
            rows.append((name, report, st.stat().st_size, same))
    print(f"{'model':18} {'max|dlogits|':>12} {'max|dfeat|':>11} {'gates equal':>12} {'onnx MiB':>9} "
          f"{'st MiB':>7}  ok")
    for name, r, st_bytes, same in rows:
        feat = max(r.max_abs_features.values())
        gates = min(r.gate_agreement.values())
        print(f"{name:18} {r.max_abs_logits:12.2e} {feat:11.2e} {gates:12.4f} {r.file_bytes / 2**20:9.1f} "
              f"{st_bytes / 2**20:7.1f}  {r.ok and same}")


if __name__ == "__main__":
    main()
