"""``python -m purenn.demo``: purify a freshly trained ResNet in a minute or two on a laptop CPU.

Trains a small ResNet on five superclasses, each the union of two unrelated fine classes (Fashion-
MNIST from the Debian package ``dataset-fashion-mnist`` when present, else the built-in synthetic
concept images; it says which), purifies the most polysemantic ``layer4`` neurons, checks that the
logits are unchanged, and shows which fine classes each virtual neuron's references hold: the
superclass neurons split along the fine classes that training merged, although purification
never saw a fine label. Trained weights are cached (``$PURENN_CACHE`` or ``~/.cache/purenn``).

Example:
    >>> from purenn.demo import main
    >>> main(["--synthetic", "--neurons", "2"])            # doctest: +SKIP
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np
import torch

from .datasets import cached_classifier, concept_data, planted_concepts, small_image_resnet
from .purify import purify_model

__all__ = ["main"]


def _composition(labels: np.ndarray, names: tuple[str, ...], top: int = 3) -> str:
    counts = np.bincount(labels, minlength=len(names))
    order = np.argsort(-counts, kind="stable")[:top]
    return ", ".join(f"{names[i]} {counts[i] / len(labels):.0%}" for i in order if counts[i])


def main(argv: list[str] | None = None) -> int:
    """Run the demo; returns the process exit code."""
    p = argparse.ArgumentParser(prog="python -m purenn.demo", description=__doc__.split("\n")[0])
    p.add_argument("--synthetic", action="store_true", help="use the synthetic concepts even if Fashion-MNIST is there")
    p.add_argument("--root", default=None, help="directory with the Fashion-MNIST IDX files")
    p.add_argument("--neurons", type=int, default=6, help="how many of the most polysemantic neurons to purify")
    p.add_argument("--train", type=int, default=5000, help="training images")
    args = p.parse_args(argv)
    t0 = time.time()
    if args.synthetic:
        train, test = planted_concepts(args.train, seed=0), planted_concepts(1000, seed=1)
    else:
        train, test = concept_data("train", root=args.root, limit=args.train), concept_data("test", root=args.root,
                                                                                          limit=1000)
    if train.source == "fashion-mnist":
        print(f"data: Fashion-MNIST ({len(train)} training images)")
    else:
        print(f"data: synthetic concept images ({len(train)} training images); for Fashion-MNIST "
              "apt-get install dataset-fashion-mnist or pass --root")
    print("superclasses (fine classes merged by training):", ", ".join(train.superclass_names()))

    print("training a small ResNet on the superclasses (cached after the first run) ...", flush=True)

    def build() -> torch.nn.Module:
        return small_image_resnet(blocks=[1, 1, 1, 1], stem_stride=2, num_classes=train.n_superclasses)

    model, path, hit = cached_classifier(f"demo-{train.source}", build, train, config={"blocks": [1, 1, 1, 1]},
                                         epochs=2, batch_size=64, lr=3e-3, seed=0, progress=False)
    with torch.no_grad():
        acc = (model(test.images).argmax(1) == test.coarse).float().mean().item()
    print(f"model: ResNet with 1 block per stage, {'loaded from cache' if hit else 'trained'} "
          f"({path.name}); superclass test accuracy {acc:.1%}  [{time.time() - t0:.0f}s]")

    fit = train.head(3000)
    pm = purify_model(model, ["layer4"], fit, n_refs=40, neurons=args.neurons, score="contrast", progress=False)
    with torch.no_grad():
        delta = (pm(test.images) - model(test.images)).abs().max().item()
    pl = pm.pure_layer("layer4")
    n_split = pl.n_virtual - pl.channels + len(pl.neurons)
    print(f"purified layer4: {len(pl.neurons)} of {pl.channels} neurons split into {n_split} virtual neurons; "
          f"max |logits change| = {delta:.2e}  [{time.time() - t0:.0f}s]")
    names = train.class_names
    fine = fit.fine.numpy()
    order = torch.argsort(pl.scores, descending=True).tolist()
    print("\nmost polysemantic neurons (score = contrast of the circuit split) and the fine classes of the "
          "references of each virtual neuron:")
    for k in order:
        c = int(pl.neurons[k])
        idx, clus = pl.ref_indices[k].numpy(), pl.ref_clusters[k].numpy()
        print(f"  neuron {c:3d} (score {float(pl.scores[k]):.2f}): all references: {_composition(fine[idx], names)}")
        for j in range(int(pl.n_clusters[k])):
            members = idx[clus == j]
            if len(members):
                print(f"      {c}.{j}  {len(members):3d} refs: {_composition(fine[members], names)}")
    print(f"\ndone in {time.time() - t0:.0f}s. Next: benchmarks/fashion_planted.py measures this on held-out images.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
