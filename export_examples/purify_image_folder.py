"""Purify any torchvision ResNet on an image folder and export it to ONNX.

    python export_examples/purify_image_folder.py --arch resnet50 --checkpoint resnet50.pt --data val_images/ \\
        --layers layer4 --neurons 16 --out-dir runs/resnet50
    python export_examples/purify_image_folder.py --arch resnet50 --weights DEFAULT --data val_images/   # torchvision
    python export_examples/purify_image_folder.py --fast --out-dir /tmp/folder                         # CI, ~20 s

The image folder has one sub-folder per class (``val_images/cat/001.jpg``); images are resized
and centre-cropped to ``--image-size`` and normalised with ImageNet's statistics. The checkpoint
is a ``state_dict`` (``.pt`` loaded with ``weights_only=True``, or ``.safetensors``); the number of
classes and an adapted stem are read from it. The script writes ``purified.safetensors`` and
``purified.onnx`` (verified against PyTorch in ONNX Runtime) and prints the most polysemantic
neurons. ``--fast`` makes a small synthetic image folder and a resnet18 checkpoint first.

The same with the command line: ``purenn purify``, ``purenn export``, ``purenn inspect``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

import purenn
from purenn.cli.loaders import load_checkpoint_model, load_data, save_checkpoint, torchvision_model


def make_fast_inputs(root: Path, arch: str) -> tuple[Path, Path]:
    """A synthetic image folder (3 classes of coloured shapes) and a checkpoint of ``arch`` whose
    BatchNorm statistics are calibrated on it (random weights stand in for a trained model)."""
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(0)
    folder = root / "images"
    for c, (name, colour) in enumerate((("red_disks", (220, 40, 40)), ("green_bars", (40, 200, 60)),
                                         ("blue_boxes", (40, 80, 220)))):
        (folder / name).mkdir(parents=True, exist_ok=True)
        for i in range(10):
            img = Image.fromarray((rng.random((72, 72, 3)) * 80).astype(np.uint8))
            draw = ImageDraw.Draw(img)
            x, y, r = rng.integers(16, 56), rng.integers(16, 56), rng.integers(8, 16)
            [draw.ellipse, draw.rectangle, draw.rectangle][c](
                (x - r, y - r, x + r, y + (r // 3 if c == 1 else r)), fill=colour)
            img.save(folder / name / f"{i:03d}.png")
    torch.manual_seed(0)
    model = getattr(__import__("torchvision").models, arch)(num_classes=3)
    data = load_data(folder=str(folder), image_size=64)
    x = torch.stack([data.dataset[i][0] for i in range(len(data.dataset))])
    for m in model.modules():  # BatchNorm statistics from the images keep activations realistic
        if isinstance(m, torch.nn.BatchNorm2d):
            m.reset_running_stats()
            m.momentum = None
    with torch.no_grad():
        model.train()(x)
    checkpoint = root / f"{arch}.pt"
    save_checkpoint(model.eval(), checkpoint)  # the weights and the architecture that rebuilds them
    return folder, checkpoint


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--arch", default="resnet50", help="torchvision ResNet builder name (default resnet50)")
    weights = parser.add_mutually_exclusive_group()
    weights.add_argument("--checkpoint", help="state_dict file (.pt/.pth/.safetensors)")
    weights.add_argument("--weights", help="torchvision pretrained weights, e.g. DEFAULT (downloads them)")
    parser.add_argument("--data", help="image folder, one sub-folder per class")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--limit", type=int, default=None, help="use this many images (evenly spaced)")
    parser.add_argument("--layers", nargs="+", default=["layer4"])
    parser.add_argument("--neurons", type=int, default=16, help="purify the N most polysemantic neurons per layer")
    parser.add_argument("--n-refs", type=int, default=100)
    parser.add_argument("--out-dir", default="runs/image_folder")
    parser.add_argument("--device", default=None)
    parser.add_argument("--fast", action="store_true", help="CI: tiny synthetic folder and resnet18")
    args = parser.parse_args(argv)
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()

    neurons: int | dict = args.neurons
    if args.fast:
        args.arch, args.image_size, args.n_refs = "resnet18", 64, 8
        args.data, args.checkpoint = map(str, make_fast_inputs(out, args.arch))
        neurons = {layer: [0, 1, 2, 3] for layer in args.layers}  # a few channels: fitting all takes longer
    if not args.data or not (args.checkpoint or args.weights):
        parser.error("give --data and --checkpoint or --weights (or --fast)")

    model = (torchvision_model(args.arch, args.weights) if args.weights
             else load_checkpoint_model(args.arch, args.checkpoint))
    data = load_data(folder=args.data, image_size=args.image_size, limit=args.limit,
                     in_channels=model.conv1.in_channels)
    print(f"[data] {data.description}")

    pm = purenn.purify_model(model, args.layers, data.dataset, n_refs=args.n_refs, neurons=neurons,
                             device=args.device, progress=not args.fast)
    pm.to("cpu").save(out / "purified.safetensors")
    rows = sorted((r for r in pm.virtual_neurons if r.score is not None), key=lambda r: -r.score)
    print(f"[purify] {len(rows)} virtual neurons from split neurons; most polysemantic:")
    for r in rows[:6]:
        print(f"    {r.layer} {r.channel}.{r.cluster} (virtual index {r.index}): {r.n_refs} references, "
              f"score {r.score:.3f}")

    c = model.conv1.in_channels
    report = purenn.export_onnx(pm, out / "purified.onnx", input_shape=(c, args.image_size, args.image_size))
    print(report.summary())
    print(f"[done] {time.perf_counter() - t0:.1f} s: {out / 'purified.safetensors'}, {out / 'purified.onnx'} "
          f"(ONNX Runtime matches PyTorch: {report.ok})")
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
