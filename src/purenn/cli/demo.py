"""``python -m purenn.cli.demo``: train a small ResNet, purify it and explain what came out, in about a minute.

Trains a small ResNet on five superclasses, each the union of two unrelated fine classes (Fashion-
MNIST from the Debian package ``dataset-fashion-mnist`` when present, else the built-in synthetic
concept images; it says which), purifies the most polysemantic ``layer4`` neurons, checks that the
logits are unchanged, and shows which fine classes each virtual neuron's references hold: the
superclass neurons split along the fine classes that training merged, although purification
never saw a fine label. It writes the model, the purified model and a figure to ``--out-dir``
(default ``purenn-demo``) and prints the ``purenn`` commands that continue from them. Trained
weights are cached (``$PURENN_CACHE`` or ``~/.cache/purenn``).

Example:
    >>> from purenn.cli.demo import main
    >>> main(["--synthetic", "--neurons", "2"])            # doctest: +SKIP
"""

from __future__ import annotations

import argparse
import shlex
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch

from purenn.cli.datasets import cached_classifier, concept_data, planted_concepts, small_image_resnet
from purenn.common.choices import DEFAULT_SCORE
from purenn.fit.pipeline import purify_model

__all__ = ["main", "DEMO_SETTINGS"]

#: what the demo trains and purifies (the printed commands repeat these)
DEMO_SETTINGS = {"blocks": [1, 1, 1, 1], "stem_stride": 2, "epochs": 1, "fit_images": 2000, "n_refs": 40,
                 "score": DEFAULT_SCORE}

_EXPLAIN = """\
What the words mean:
  neuron          one channel of layer4. It is polysemantic when it fires for unrelated things; here training
                  merged two fine classes into each superclass, so a neuron can fire for both, say, trousers
                  and shirts.
  references      the {n_refs} images (of {fit} seen) on which a neuron fires most strongly.
  circuit         for one reference: how much each layer3 channel contributed to the neuron's activation
                  (PURE's circuit relevance). References that fire the neuron for different reasons have
                  different circuits.
  virtual neuron  one group of a neuron's references with similar circuits (k-means, here 2 groups). The purified
                  model routes the neuron's whole activation to the virtual neuron whose circuit the input's is
                  nearest, and the next layer adds them up again, so the logits stay the same.
  score           {score}: how balanced and how different the two groups of circuits are (0: one group, or
                  parallel circuits; 1: two equal groups with unrelated circuits), times the same for the
                  references' pooled layer3 activations. The {n} neurons with the highest score are purified.
"""


def _composition(labels: np.ndarray, names: tuple[str, ...] | list[str], top: int = 3) -> str:
    counts = np.bincount(labels, minlength=len(names))
    order = np.argsort(-counts, kind="stable")[:top]
    return ", ".join(f"{names[i]} {counts[i] / len(labels):.0%}" for i in order if counts[i])


def main(argv: list[str] | None = None) -> int:
    """Run the demo; returns the process exit code."""
    p = argparse.ArgumentParser(prog="python -m purenn.cli.demo", description=__doc__.split("\n")[0])
    p.add_argument("--synthetic", action="store_true", help="use the synthetic concepts even if Fashion-MNIST is there")
    p.add_argument("--root", default=None, help="directory with the Fashion-MNIST IDX files")
    p.add_argument("--neurons", type=int, default=6, help="how many of the most polysemantic neurons to purify")
    p.add_argument("--train", type=int, default=5000, help="training images")
    p.add_argument("--out-dir", default="purenn-demo", help="where to write the model, the purified model and the "
                   "figure (default purenn-demo)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    args = p.parse_args(argv)
    cfg = DEMO_SETTINGS
    t0 = time.time()
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if args.synthetic:
        train, test = planted_concepts(args.train, seed=0), planted_concepts(1000, seed=1)
    else:
        train, test = concept_data("train", root=args.root, limit=args.train), concept_data("test", root=args.root,
                                                                                          limit=1000)
    fashion = train.source == "fashion-mnist"
    if fashion:
        print(f"data: Fashion-MNIST ({len(train)} training images)")
    else:
        print(f"data: synthetic concept images ({len(train)} training images); for Fashion-MNIST "
              "apt-get install dataset-fashion-mnist or pass --root")
    print("superclasses (fine classes merged by training):", ", ".join(train.superclass_names()))

    print(f"training a small ResNet on the superclasses ({cfg['epochs']} epoch; cached after the first run) ...",
          flush=True)

    def build() -> torch.nn.Module:
        return small_image_resnet(blocks=cfg["blocks"], stem_stride=cfg["stem_stride"],
                                  num_classes=train.n_superclasses)

    model, cached, hit = cached_classifier(
        f"demo-{train.source}", build, train, config={"blocks": cfg["blocks"], "stem_stride": cfg["stem_stride"]},
        epochs=cfg["epochs"], batch_size=64, lr=3e-3, seed=0, progress=not args.quiet)
    checkpoint = out / "model.safetensors"
    shutil.copyfile(cached, checkpoint)  # records its architecture (stem stride, blocks, channels)
    with torch.no_grad():
        acc = (model(test.images).argmax(1) == test.coarse).float().mean().item()
    print(f"model: ResNet with 1 block per stage, {'loaded from cache' if hit else 'trained'}; superclass test "
          f"accuracy {acc:.1%} (chance 20%)  [{time.time() - t0:.0f}s]")

    fit = train.head(cfg["fit_images"])
    print(f"purifying layer4: references, circuits and k-means for each of its 512 neurons on {len(fit)} images ...",
          flush=True)
    pm = purify_model(model, ["layer4"], fit, n_refs=cfg["n_refs"], neurons=args.neurons, score=cfg["score"],
                      progress=not args.quiet)
    with torch.no_grad():
        delta = (pm(test.images) - model(test.images)).abs().max().item()
    pl = pm.pure_layer("layer4")
    if fashion:  # the data options that give these images to the purenn command (its show/probe check them)
        pm.reference_data = {**(pm.reference_data or {}), "options": {
            "flags": _fit_flags(args), "description": f"Fashion-MNIST train: {len(fit)} images, (1, 28, 28)",
            "source": "fashion-mnist", "input_shape": [1, 28, 28], "mean": None, "std": None}}
    purified = out / "purified.safetensors"
    pm.save(purified)
    print(f"purified layer4: {pl.summary()}; largest change of any logit: {delta:.1e}  [{time.time() - t0:.0f}s]")
    print()
    print(_EXPLAIN.format(n_refs=cfg["n_refs"], fit=len(fit), score=cfg["score"], n=len(pl.neurons)))
    names = train.class_names
    fine = fit.fine.numpy()
    order = torch.argsort(pl.scores, descending=True).tolist()
    print("The purified neurons, highest score first, and the fine classes (never shown to purenn) of each virtual "
          "neuron's references:")
    for k in order:
        c = int(pl.neurons[k])
        idx, clus = pl.ref_indices[k].numpy(), pl.ref_clusters[k].numpy()
        print(f"  neuron {c:3d} (score {float(pl.scores[k]):.2f}): all {len(idx)} references: "
              f"{_composition(fine[idx], names)}")
        for j in range(int(pl.n_clusters[k])):
            members = idx[clus == j]
            if len(members):
                mix = _composition(fine[members], names)
                print(f"      virtual neuron {c}.{j}: {len(members):3d} references: {mix}")

    best = int(pl.neurons[order[0]])
    figure = out / f"neuron{best}.png"
    try:
        from purenn.analysis.viz import save_neuron_figure

        save_neuron_figure(pm, "layer4", best, fit, str(figure), labels=fine, class_names=list(names))
        print(f"\nfigure: {figure} (neuron {best}: its strongest references per virtual neuron, left; the circuits "
              "of all its references in 2-D, coloured by virtual neuron, with the centroids marked, right)")
    except ImportError:
        figure = None
        print('\nno figure: matplotlib is missing (pip install "purenn[viz]")')
    _next_steps(out, checkpoint, purified, fashion, args, best)
    print(f"\ndone in {time.time() - t0:.0f}s.")
    return 0


def _fit_flags(args: argparse.Namespace) -> str:
    """The ``purenn`` data options that load the images the demo purified on."""
    data = "--fashion-mnist" + (f" {shlex.quote(args.root)}" if args.root else "")
    return f"{data} --split train --limit {DEMO_SETTINGS['fit_images']}"


def _command() -> str:
    """How to call the purenn command from here: ``purenn``, or the path of this virtual environment's
    script when that environment is not on PATH (``make demo`` runs in ``.venv`` without activating it)."""
    import os

    script = Path(sys.executable).parent / "purenn"
    on_path = shutil.which("purenn")
    if sys.prefix != sys.base_prefix and script.is_file() and (on_path is None or Path(on_path) != script):
        rel = os.path.relpath(script)
        return rel if not rel.startswith("..") else str(script)
    return "purenn"


def _next_steps(out: Path, checkpoint: Path, purified: Path, fashion: bool, args: argparse.Namespace,
                best: int) -> None:
    cfg = DEMO_SETTINGS
    q = shlex.quote
    cmd = _command()
    data = "--fashion-mnist" + (f" {q(args.root)}" if args.root else "")
    fit = _fit_flags(args)
    blocks = ",".join(map(str, cfg["blocks"]))
    print(f"\nContinue with the purenn command (files in {out}/):")
    print(f"  {cmd} inspect {q(str(purified))}                    # layers and the most polysemantic neurons")
    print(f"  {cmd} export {q(str(purified))} {q(str(out / 'purified.onnx'))} --input-shape 1,28,28"
          "   # ONNX, checked in ONNX Runtime")
    if fashion:
        print(f"  {cmd} show {q(str(purified))} {fit} --neuron {best} --out {q(str(out / 'show.png'))}"
              "   # the same data options as the purification")
        print(f"  {cmd} probe {q(str(purified))} {data} --split test --limit 2000 --labels fine"
              "   # linear probes: channels vs virtual neurons")
        print(f"  {cmd} purify resnet18 --checkpoint {q(str(checkpoint))} --blocks {blocks} {fit} --neurons "
              f"{args.neurons} --n-refs {cfg['n_refs']} --out {q(str(out / 'again.safetensors'))}"
              f"   # purify again (the checkpoint records its stem stride {cfg['stem_stride']})")
    else:
        print("  (show, probe and purify read Fashion-MNIST or an image folder; the synthetic images exist only in "
              "Python: install dataset-fashion-mnist to get those commands)")


if __name__ == "__main__":
    sys.exit(main())
