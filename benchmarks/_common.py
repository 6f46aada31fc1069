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


def ort_session(path):
    """An ONNX Runtime CPU session with as many intra-op threads as torch uses and no spin-waiting."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = torch.get_num_threads()
    opts.inter_op_num_threads = 1
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def alternate(fns: dict, repeat: int) -> dict[str, list[float]]:
    """Times of each function over ``repeat`` rounds; every round runs all of them, in an order that
    rotates from round to round, after one warm-up call each."""
    names = list(fns)
    for fn in fns.values():
        fn()
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(repeat):
        for n in names[r % len(names):] + names[: r % len(names)]:
            t0 = time.perf_counter()
            fns[n]()
            times[n].append(time.perf_counter() - t0)
    return times
