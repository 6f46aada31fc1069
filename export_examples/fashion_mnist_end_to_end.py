"""Fashion-MNIST end to end: train, purify, save, export, run in ONNX Runtime, probe, suppress.

A small ResNet learns five *superclasses*, each the union of two unrelated Fashion-MNIST classes
(T-shirt + Ankle boot, Pullover + Sandal, ...), so its late neurons tend to serve two fine classes
at once. purenn splits them into virtual neurons; the fine labels then show what the split did.

Steps:
 1. train the ResNet (weights cached in --out-dir), or load it;
 2. purify ``layer4`` and save ``purified.safetensors``;
 3. load it back and export ``model.onnx`` (verified against PyTorch);
 4. run ``model.onnx`` in ONNX Runtime: accuracy and gates;
 5. linear probes on fine classes: original channels vs pure virtual neurons (ONNX Runtime features);
 6. suppress the virtual neurons of one fine class, export ``model_suppressed.onnx`` and measure
    per-class accuracy in ONNX Runtime before and after;
 7. write ``test_data.npz`` (normalised test images and labels) for ``onnx_runtime_consumer.py``.

Data: Fashion-MNIST from the Debian package ``dataset-fashion-mnist`` (or ``--fashion-mnist DIR``,
``$PURENN_FASHION_MNIST``); without it, a built-in synthetic concept dataset with the same
superclass structure. The script says which it used.

    python export_examples/fashion_mnist_end_to_end.py --out-dir runs/fmnist          # about 10 min on 2 CPU cores
    python export_examples/fashion_mnist_end_to_end.py --fast --out-dir /tmp/fm        # about 30 s: tiny, for CI
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

import purenn
from purenn.analysis.probe import fit_probe
from purenn.analysis.unlearn import find_concept_neurons
from purenn.cli.datasets import cached_classifier, fashion_mnist, planted_concepts, small_image_resnet
from purenn.errors import DataError

FULL = {"train": 12000, "test": 3000, "epochs": 2, "batch_size": 128, "blocks": [1, 1, 1, 1], "stem_stride": 2,
        "n_refs": 100, "neurons": 32, "purify_on": 6000}
FAST = {"train": 400, "test": 200, "epochs": 1, "batch_size": 40, "blocks": [1, 1, 1, 1], "stem_stride": 2,
        "n_refs": 16, "neurons": 6, "purify_on": 200}


def load_data(cfg: dict, root: str | None):
    """Train and test sets: Fashion-MNIST when found, else the synthetic concept dataset."""
    try:
        train = fashion_mnist("train", root=root, limit=cfg["train"])
        test = fashion_mnist("test", root=root, limit=cfg["test"])
    except DataError as e:
        if root is not None:
            raise
        print(f"[data] Fashion-MNIST not found ({str(e).split(':')[0]}); using the built-in synthetic concepts")
        train = planted_concepts(cfg["train"], seed=0)
        test = planted_concepts(cfg["test"], seed=1)
    print(f"[data] {train.source}: {len(train)} train / {len(test)} test images, superclasses "
          f"{', '.join(train.superclass_names())}")
    return train, test


def strongest_channels(model: torch.nn.Module, images: torch.Tensor, n: int) -> list[int]:
    """The ``n`` layer4 channels with the largest mean activation: a cheap pick for fast runs
    (``neurons=<int>`` instead scores every channel and keeps the most polysemantic)."""
    store = {}
    hook = model.layer4.register_forward_hook(lambda m, i, o: store.__setitem__("a", o))
    with torch.no_grad():
        model(images)
    hook.remove()
    return sorted(store["a"].mean(dim=(0, 2, 3)).argsort(descending=True)[:n].tolist())


def onnx_predict(session, x: np.ndarray, batch: int = 256) -> dict[str, np.ndarray]:
    """Every output of an ONNX Runtime session over ``x``, batched."""
    names = [o.name for o in session.get_outputs()]
    parts = {n: [] for n in names}
    for s in range(0, len(x), batch):
        for n, v in zip(names, session.run(None, {"input": x[s : s + batch]})):
            parts[n].append(v)
    return {n: np.concatenate(v) for n, v in parts.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--fast", action="store_true", help="tiny model and data (CI)")
    parser.add_argument("--out-dir", default="runs/fashion_mnist", help="where files are written")
    parser.add_argument("--fashion-mnist", default=None, metavar="DIR", help="directory of the IDX files")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    cfg = FAST if args.fast else FULL
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    progress = not args.quiet
    t0 = time.perf_counter()
    torch.manual_seed(0)

    def took() -> str:
        return f"[{time.perf_counter() - t0:5.1f} s]"

    # 1. data and the trained classifier (cached by its config and data)
    train, test = load_data(cfg, args.fashion_mnist)
    model, weights, cached = cached_classifier(
        "fmnist-example", lambda: small_image_resnet(blocks=cfg["blocks"], stem_stride=cfg["stem_stride"]), train,
        config={"blocks": cfg["blocks"], "stem_stride": cfg["stem_stride"]}, directory=out, progress=progress,
        epochs=cfg["epochs"], batch_size=cfg["batch_size"], target="coarse",
    )
    with torch.no_grad():
        acc = (model(test.images).argmax(1) == test.coarse).float().mean().item()
    print(f"{took()} [train] {'loaded' if cached else 'trained'} {weights.name}: superclass test accuracy {acc:.3f}")

    # 2. purify layer4 and save
    purify_on = train.head(cfg["purify_on"])
    neurons = ({"layer4": strongest_channels(model, purify_on.images[:256], cfg["neurons"])} if args.fast
               else cfg["neurons"])
    pm = purenn.purify_model(model, ["layer4"], purify_on, n_refs=cfg["n_refs"], n_clusters=2, neurons=neurons,
                             progress=progress)
    pm.save(out / "purified.safetensors")
    pl = pm.pure_layer("layer4")
    print(f"{took()} [purify] layer4: {pl.summary()}; saved {out / 'purified.safetensors'}")

    # 3. load it back and export (export_onnx verifies ONNX Runtime against PyTorch)
    pm = purenn.load_purified(out / "purified.safetensors")
    report = purenn.export_onnx(pm, out / "model.onnx", input_shape=(1, 28, 28), inputs=test.images[:16])
    print(f"{took()} [export] {report.summary()}")

    # 4. the ONNX file in ONNX Runtime
    import onnxruntime as ort

    session = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    x_test = test.images.numpy()
    res = onnx_predict(session, x_test)
    onnx_acc = float((res["logits"].argmax(1) == test.coarse.numpy()).mean())
    with torch.no_grad():
        gates_torch = pm.gates(test.images[:64])["layer4"].numpy()
    agree = float((res["gate.layer4"][:64] == gates_torch).mean())
    print(f"{took()} [onnxruntime] superclass accuracy {onnx_acc:.3f} (PyTorch {acc:.3f}); gates equal to PyTorch on "
          f"{agree:.1%} of (sample, neuron) pairs")

    # 5. linear probes on fine classes, on the pure features ONNX Runtime returned, against the original
    #    channels (the sum of each channel's virtual neurons); purenn.analysis.probe.compare_probes(session, ...)
    #    does the same from a session or a PurifiedModel
    pure = res["pure.layer4"]
    original = np.zeros((len(pure), pl.channels), dtype=pure.dtype)
    np.add.at(original, (slice(None), pl.v_channel.numpy()), pure)
    fine, half = test.fine.numpy(), len(test) // 2
    probes = {name: fit_probe(f[:half], fine[:half], f[half:], fine[half:]) for name, f in
              (("original", original), ("pure", pure))}
    print(f"{took()} [probe] fine-class linear probe on layer4: original channels {probes['original'].accuracy:.3f}, "
          f"pure virtual neurons {probes['pure'].accuracy:.3f}")

    # 6. suppress the virtual neurons of one fine class, export, compare per-class accuracy
    concept, partner = train.pairs[0]
    found = find_concept_neurons(pm, "layer4", test, test.fine, concept=concept, threshold=0.3, split_only=True,
                                 top=2)
    indices = found.indices
    if not indices:  # no split virtual neuron reaches the threshold (tiny runs): take the largest share
        split = np.isin(pl.v_channel.numpy(), pl.neurons.numpy())
        indices = [int(np.flatnonzero(split)[np.argmax(found.shares[split])])]
    pm.suppress("layer4", indices)
    pm.save(out / "purified_suppressed.safetensors")
    purenn.export_onnx(pm, out / "model_suppressed.onnx", input_shape=(1, 28, 28))
    off = ort.InferenceSession(str(out / "model_suppressed.onnx"), providers=["CPUExecutionProvider"])
    res_off = onnx_predict(off, x_test)
    names = test.class_names
    for cls in (concept, partner):
        sel = test.fine.numpy() == cls
        before = float((res["logits"][sel].argmax(1) == test.coarse.numpy()[sel]).mean())
        after = float((res_off["logits"][sel].argmax(1) == test.coarse.numpy()[sel]).mean())
        print(f"{took()} [suppress] {names[cls]!r}: accuracy {before:.3f} -> {after:.3f}")
    print(f"[suppress] switched off virtual neurons {indices} of layer4 (class {names[concept]!r}); "
          f"saved and exported to {out / 'model_suppressed.onnx'}")

    # 7. data for the torch-free consumer example
    np.savez_compressed(out / "test_data.npz", x=x_test.astype(np.float32), fine=test.fine.numpy(),
                        coarse=test.coarse.numpy(), class_names=np.array(names))
    print(f"[done] {time.perf_counter() - t0:.1f} s; files in {out}: "
          f"{', '.join(sorted(p.name for p in out.iterdir() if not p.name.startswith('.')))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
