"""Shared helpers of the benchmark scripts."""

from __future__ import annotations

import time

import torch
import torchvision
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

T0 = time.time()  # when the benchmark started (first import of this module)


def log(msg: str) -> None:
    """Print ``msg`` with the seconds since the benchmark started."""
    print(f"[{time.time() - T0:7.1f}s] {msg}", flush=True)


def calibrated(name: str, size: int | tuple[int, int], seed: int = 0) -> nn.Module:
    """Random-weight ResNet with BatchNorm statistics from random images (realistic activation
    magnitudes); ``adapted_stem`` is resnet18 with a 3x3 stride-1 stem and no max-pool."""
    hw = (size, size) if isinstance(size, int) else tuple(size)
    torch.manual_seed(seed)
    if name == "adapted_stem":
        model = torchvision.models.resnet18(num_classes=10)
        model.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
        model.maxpool = nn.Identity()
    else:
        model = getattr(torchvision.models, name)(num_classes=10)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.momentum = None
    model.train()
    with torch.no_grad():
        model(torch.rand(8, 3, *hw, generator=torch.Generator().manual_seed(seed + 1)))
    return model.eval()


def count_flops(fn) -> int:
    """FLOPs of one call of ``fn`` as ``torch.utils.flop_counter`` counts them."""
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()
