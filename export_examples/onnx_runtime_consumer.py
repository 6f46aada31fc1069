"""Use an exported purified model with ONNX Runtime, NumPy and scikit-learn only (no torch, no purenn).

What an exported file gives a consumer:

- outputs ``logits``, ``pure.<layer>`` (pooled virtual-neuron activations) and ``gate.<layer>``
  (which virtual neuron each purified neuron chose), with a dynamic batch axis;
- metadata ``purenn`` (JSON): the input shape, and per layer the purified channels, their cluster
  counts and the source channel of every virtual neuron.

This script reads them, reports the classifier's accuracy, shows for the most-split neuron which
classes go to which of its virtual neurons, and fits linear probes (scikit-learn) on the pure
features and on the original channels (each the sum of its virtual neurons).

    python export_examples/onnx_runtime_consumer.py model.onnx --npz test_data.npz
    python export_examples/onnx_runtime_consumer.py model.onnx --fashion-mnist /usr/share/datasets/fashion-mnist
    python export_examples/onnx_runtime_consumer.py --fast --work-dir /tmp/fm   # CI: makes the file first

``--npz`` takes arrays ``x`` (N, C, H, W) float32, already normalised as in training, and integer
labels ``fine`` (and optionally ``coarse``, ``class_names``), as ``fashion_mnist_end_to_end.py``
writes them. ``--fashion-mnist`` reads the IDX test files and normalises them with that example's
statistics (mean 0.2860, std 0.3530). On a machine with onnxruntime-gpu the CUDA provider is used.
"""

from __future__ import annotations

import argparse
import gzip
import json
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import train_test_split
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

FASHION_STATS = (0.2860, 0.3530)
HERE = Path(__file__).resolve().parent


def read_idx(path: Path) -> np.ndarray:
    """An IDX file (MNIST format, gzip or raw) as a numpy array."""
    raw = (gzip.open if path.suffix == ".gz" else open)(path, "rb").read()
    ndim = raw[3]
    shape = struct.unpack(f">{ndim}I", raw[4 : 4 + 4 * ndim])
    return np.frombuffer(raw[4 + 4 * ndim :], dtype=np.uint8).reshape(shape)


def fashion_mnist_test(root: Path, limit: int) -> tuple[np.ndarray, np.ndarray]:
    def find(stem: str) -> Path:
        for p in (root / f"{stem}.gz", root / stem):
            if p.is_file():
                return p
        raise SystemExit(f"error: {stem}[.gz] not found in {root}")

    images = read_idx(find("t10k-images-idx3-ubyte"))[:limit].astype(np.float32) / 255.0
    labels = read_idx(find("t10k-labels-idx1-ubyte"))[:limit].astype(np.int64)
    mean, std = FASHION_STATS
    return ((images - mean) / std)[:, None], labels


def run_all(session: ort.InferenceSession, x: np.ndarray, batch: int = 256) -> dict[str, np.ndarray]:
    """Every output over ``x``, in batches (the batch axis is dynamic)."""
    name = session.get_inputs()[0].name
    outs = [o.name for o in session.get_outputs()]
    parts: dict[str, list] = {o: [] for o in outs}
    for s in range(0, len(x), batch):
        for o, v in zip(outs, session.run(None, {name: np.ascontiguousarray(x[s : s + batch], dtype=np.float32)})):
            parts[o].append(v)
    return {o: np.concatenate(v) for o, v in parts.items()}


def probe(features: np.ndarray, labels: np.ndarray, seed: int = 0) -> float:
    """Held-out accuracy of a standardised multinomial logistic regression."""
    counts = np.bincount(labels)
    strat = labels if counts[counts > 0].min() >= 2 else None
    tr, te = train_test_split(np.arange(len(labels)), test_size=0.3, random_state=seed, stratify=strat)
    est = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000))
    est.fit(features[tr], labels[tr])
    return float(est.score(features[te], labels[te]))


def make_fast_inputs(work: Path) -> tuple[Path, Path]:
    """The ONNX file and test data of the Fashion-MNIST example's fast mode (run in a subprocess:
    this process never imports torch)."""
    onnx_path, npz = work / "model.onnx", work / "test_data.npz"
    if not (onnx_path.is_file() and npz.is_file()):
        cmd = [sys.executable, str(HERE / "fashion_mnist_end_to_end.py"), "--fast", "--quiet", "--out-dir", str(work)]
        print(f"[fast] creating {onnx_path} with: {' '.join(cmd)}")
        subprocess.run(cmd, check=True)
    return onnx_path, npz


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("onnx", nargs="?", help="exported .onnx file")
    src = parser.add_mutually_exclusive_group()
    src.add_argument("--npz", help="arrays x, fine[, coarse, class_names]")
    src.add_argument("--fashion-mnist", metavar="DIR", help="Fashion-MNIST IDX directory (test split)")
    parser.add_argument("--limit", type=int, default=2000, help="samples to use (default 2000)")
    parser.add_argument("--layer", help="purified layer (default: the last)")
    parser.add_argument("--fast", action="store_true", help="CI: build a tiny model with the Fashion-MNIST example")
    parser.add_argument("--work-dir", default="runs/onnx_consumer", help="where --fast puts (or finds) its files")
    args = parser.parse_args(argv)

    if args.fast:
        onnx_path, npz = make_fast_inputs(Path(args.work_dir))
        args.onnx, args.npz = str(onnx_path), str(npz)
    if not args.onnx or not (args.npz or args.fashion_mnist):
        parser.error("give an .onnx file and --npz or --fashion-mnist (or --fast)")

    available = ort.get_available_providers()
    providers = [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]
    session = ort.InferenceSession(args.onnx, providers=providers)
    meta = json.loads(session.get_modelmeta().custom_metadata_map["purenn"])
    layers = {entry["layer"]: entry for entry in meta["layers"]}
    layer = args.layer or meta["layers"][-1]["layer"]
    info = layers[layer]
    print(f"[model] {args.onnx}: input (batch, {', '.join(map(str, meta['input_shape']))}), outputs "
          f"{[o.name for o in session.get_outputs()]}, providers {session.get_providers()}")

    if args.npz:
        data = np.load(args.npz)
        x, labels = data["x"][: args.limit], data["fine"][: args.limit].astype(np.int64)
        coarse = data["coarse"][: args.limit] if "coarse" in data else None
        names = [str(n) for n in data["class_names"]] if "class_names" in data else None
    else:
        x, labels = fashion_mnist_test(Path(args.fashion_mnist), args.limit)
        coarse, names = None, None
    out = run_all(session, x)
    logits, pure, gates = out["logits"], out[f"pure.{layer}"], out[f"gate.{layer}"]
    if coarse is not None:
        print(f"[logits] accuracy on the model's own targets: {(logits.argmax(1) == coarse).mean():.3f} "
              f"({len(x)} samples)")

    # which classes does each virtual neuron of the most-split neuron take?
    neurons, n_clusters = np.asarray(info["neurons"]), np.asarray(info["n_clusters"])
    split = np.flatnonzero(n_clusters > 1)
    if len(split):
        mix = [np.bincount(gates[:, k], minlength=n_clusters[k]).min() for k in split]
        k = int(split[int(np.argmax(mix))])
        print(f"[gates] {layer} neuron {neurons[k]}: samples per virtual neuron and class")
        n_cls = int(labels.max()) + 1
        header = "  ".join(f"{(names[c] if names else str(c))[:8]:>8}" for c in range(n_cls))
        print(f"    {'':>8}  {header}")
        for c in range(int(n_clusters[k])):
            counts = np.bincount(labels[gates[:, k] == c], minlength=n_cls)
            print(f"    {f'{neurons[k]}.{c}':>8}  " + "  ".join(f"{v:>8}" for v in counts))

    # linear probes: pure virtual neurons vs the original channels (sum of each channel's virtual neurons)
    vc = np.asarray(info["virtual_channels"])
    original = np.zeros((len(pure), int(vc.max()) + 1), dtype=pure.dtype)
    np.add.at(original, (slice(None), vc), pure)
    acc_orig, acc_pure = probe(original, labels), probe(pure, labels)
    print(f"[probe] fine-label linear probe on {layer}: original channels ({original.shape[1]}) {acc_orig:.3f}, "
          f"pure virtual neurons ({pure.shape[1]}) {acc_pure:.3f}")
    print(f"[done] torch imported: {'torch' in sys.modules}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
