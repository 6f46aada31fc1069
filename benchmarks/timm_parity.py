"""Per timm ResNet architecture: purified logits against the model's, and purenn's circuit relevance
against plain autograd.

For each architecture (random weights, random BatchNorm affine parameters, statistics calibrated
on random images) it

- purifies ``layer4`` (4 neurons, 8 reference images) in float32 and reports the largest
  ``|pm(x) - model(x)|`` over a batch (0 means bit-identical);
- computes the circuit relevance of 8 neurons in float64 for a stage target with a downsample
  (``layer2`` from ``layer1``), a block with an identity skip (``layer3.1`` from ``layer3.0``, or
  the deepest stage with two blocks) and a block with a downsample (``layer4.0`` from ``layer3``),
  each against autograd through timm's own block modules (SE and ECA attention included), and
  reports the largest ``|Δ| / max |r|``.

    python benchmarks/timm_parity.py                     # every architecture below, 64x65, ~5 min
    python benchmarks/timm_parity.py --smoke             # three small ones, seconds
"""

from __future__ import annotations

import argparse
import sys

import torch
from torch import nn

import purenn

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from _common import log  # noqa: E402

ARCHS = ["resnet18", "resnet26", "resnet34", "resnet50", "resnet101", "resnet152", "resnet18d", "resnet50d",
         "resnet10t", "resnet50s", "resnext50_32x4d", "wide_resnet50_2", "seresnet18", "seresnet50",
         "seresnext26d_32x4d", "ecaresnet26t", "ecaresnet50d", "ecaresnetlight", "resnetrs50"]
SMOKE = ["resnet18", "seresnet18", "ecaresnet26t"]



def targets(model: nn.Module) -> list[tuple[str, str]]:
    """A stage with a downsample, a block with an identity skip (in the deepest stage that has two
    blocks), a block with a downsample."""
    deep = [s for s in ("layer3", "layer2", "layer1") if len(getattr(model, s)) >= 2][:1]
    return [("layer2", "layer1"), *((f"{s}.1", f"{s}.0") for s in deep), ("layer4.0", "layer3")]


def timm_model(name: str, size: tuple[int, int], seed: int = 0) -> nn.Module:
    import timm

    torch.manual_seed(seed)
    model = timm.create_model(name, pretrained=False, num_classes=10)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):  # timm zero-initialises the last BatchNorm of each block
                m.weight.uniform_(0.3, 1.0, generator=g)
                m.bias.normal_(0.0, 0.1, generator=g)
                m.reset_running_stats()
                m.momentum = None
        model.train()
        model(torch.rand(8, 3, *size, generator=g))
    return model.eval()


def autograd_relevance(model: nn.Module, x: torch.Tensor, layer: str, upstream: str,
                       neurons: list[int]) -> torch.Tensor:
    """PURE's relevance with autograd through the model's own blocks (``(B, K, C_U)``)."""
    spec = purenn.ResNetSpec(model)
    up, pos = spec.position(upstream), spec.position(layer)
    with torch.no_grad():
        acts, _ = spec.run_until(x, {up})
    a_up = acts[up].clone().requires_grad_(True)
    h = a_up
    for blk in spec.segment(up, pos):
        h = blk.module(h)
    out = []
    for k in neurons:
        go = torch.zeros_like(h)
        go[:, k] = h[:, k].detach().clamp(min=0)
        (g,) = torch.autograd.grad(h, a_up, go, retain_graph=True)
        r = (g * a_up).sum(dim=(2, 3)).detach()
        out.append(r / (r.abs().sum(-1, keepdim=True) + 1e-12))
    return torch.stack(out, dim=1)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--archs", default=None, help="comma-separated timm model names (default: all listed)")
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--smoke", action="store_true")
    args = p.parse_args()
    import timm

    archs = args.archs.split(",") if args.archs else (SMOKE if args.smoke else ARCHS)
    size = (32, 32) if args.smoke else (args.size, args.size + 1)
    g = torch.Generator().manual_seed(7)
    rows = []
    for name in archs:
        model = timm_model(name, size)
        data = torch.rand(8, 3, *size, generator=g)
        pm = purenn.purify_model(model, ["layer4"], data, n_refs=4, neurons={"layer4": [0, 1, 2, 3]}, progress=False)
        x = torch.rand(4, 3, *size, generator=g)
        with torch.no_grad():
            d_logits = float((pm(x) - model(x)).abs().max())
        m64, x64 = model.double(), x.double()
        worst = 0.0
        for layer, up in targets(model):
            neurons = list(range(0, 8 * 5, 5))
            ours = purenn.circuit_relevance(m64, x64, layer, neurons, upstream=up)
            ref = autograd_relevance(m64, x64, layer, up, neurons)
            worst = max(worst, float((ours - ref).abs().max() / ref.abs().max()))
        spec = purenn.ResNetSpec(model)
        attn = sorted({type(b.attn).__name__ for b in spec.blocks if b.attn is not None}) or ["-"]
        down = "avg-pool" if any(b.down_pool is not None for b in spec.blocks) else "conv"
        rows.append((name, ",".join(attn), down, d_logits, worst))
        log(f"{name}: max |dlogits| {d_logits:.2e}, max |drelevance| (relative) {worst:.2e}")
    print(f"\ntimm {timm.__version__}, torch {torch.__version__}, input {size[0]}x{size[1]}; relevance in float64 "
          "against autograd, logits in float32 (pm(x) vs model(x))\n")
    print("| architecture | attention | downsample | max abs dlogits | max rel drelevance |")
    print("|---|---|---|---|---|")
    for name, attn, down, dl, dr in rows:
        print(f"| {name} | {attn} | {down} | {dl:.1e} | {dr:.1e} |")


if __name__ == "__main__":
    main()
