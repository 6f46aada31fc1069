"""Shared fixtures and independent reference implementations for the purenn tests."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torchvision
from torch import nn

BUILDERS = [
    "resnet18",
    "resnet34",
    "resnet50",
    "resnet101",
    "resnet152",
    "wide_resnet50_2",
    "wide_resnet101_2",
    "resnext50_32x4d",
    "resnext101_32x8d",
    "resnext101_64x4d",
]


def randomize_bn_affine(model: nn.Module, g: torch.Generator) -> nn.Module:
    """Random BatchNorm scales (0.3..1) and shifts (sd 0.1), in place: timm zero-initialises each block's
    last BatchNorm, which would cut every residual branch."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.3, 1.0, generator=g)
                m.bias.normal_(0.0, 0.1, generator=g)
    return model


def calibrate_bn(model: nn.Module, x: torch.Tensor, steps: int = 2) -> nn.Module:
    """Set BatchNorm running statistics from data (cumulative average), then switch to eval.

    Random-init deep ResNets otherwise have activations that grow by orders of magnitude.
    """
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.reset_running_stats()
            m.momentum = None
    model.train()
    with torch.no_grad():
        for _ in range(steps):
            model(x)
    return model.eval()


def make_model(name: str, seed: int = 0, dtype=torch.float32, size=(64, 64), in_ch: int = 3, **kwargs) -> nn.Module:
    """A torchvision ResNet with random weights and BatchNorm statistics calibrated on random images."""
    torch.manual_seed(seed)
    model = getattr(torchvision.models, name)(num_classes=kwargs.pop("num_classes", 7), **kwargs)
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.rand(8, in_ch, *size, generator=g)
    model = calibrate_bn(model, x)
    return model.to(dtype)


def adapted_stem_resnet(seed: int = 0, dtype=torch.float32, in_ch: int = 1, num_classes: int = 10) -> nn.Module:
    """resnet18 with a 3x3 stride-1 stem, no max-pool, 1 input channel: the small-image variant."""
    torch.manual_seed(seed)
    model = torchvision.models.resnet18(num_classes=num_classes)
    model.conv1 = nn.Conv2d(in_ch, 64, 3, 1, 1, bias=False)
    model.maxpool = nn.Identity()
    g = torch.Generator().manual_seed(seed + 1)
    model = calibrate_bn(model, torch.rand(8, in_ch, 28, 28, generator=g))
    return model.to(dtype)


def tiny_resnet(block: str = "basic", seed: int = 0, dtype=torch.float32, num_classes: int = 3, groups: int = 1,
                width: int = 64) -> nn.Module:
    """A one-block-per-stage ResNet (fast)."""
    torch.manual_seed(seed)
    blk = torchvision.models.resnet.BasicBlock if block == "basic" else torchvision.models.resnet.Bottleneck
    model = torchvision.models.ResNet(blk, [1, 2, 1, 2], num_classes=num_classes, groups=groups,
                                      width_per_group=width)
    g = torch.Generator().manual_seed(seed + 1)
    model = calibrate_bn(model, torch.rand(8, 3, 32, 32, generator=g))
    return model.to(dtype)


def block_list(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(f"{s}.{i}", b) for s in ("layer1", "layer2", "layer3", "layer4") for i, b in enumerate(getattr(model, s))]


def _output_of(model: nn.Module, name: str, x: torch.Tensor) -> torch.Tensor:
    if name == "stem":
        name = "maxpool"
    module = dict(model.named_modules())[name]
    store = {}
    h = module.register_forward_hook(lambda m, i, o: store.__setitem__("o", o.detach().clone()))
    try:
        with torch.no_grad():
            model(x)
    finally:
        h.remove()
    return store["o"]


def _segment(model: nn.Module, upstream: str, layer: str) -> list[nn.Module]:
    blocks = block_list(model)
    names = [n for n, _ in blocks]

    def end(name):  # index (exclusive) of the last block whose output the name denotes
        if name in ("maxpool", "stem"):
            return 0
        if "." in name:
            return names.index(name) + 1
        return max(i for i, n in enumerate(names) if n.startswith(name + ".")) + 1

    return [b for _, b in blocks[end(upstream):end(layer)]]


def autograd_relevance(model, x, layer, upstream, neurons, drop_self=False, eps=1e-12):
    """PURE's circuit relevance with plain autograd through torchvision's own block modules."""
    a_up = _output_of(model, upstream, x).requires_grad_(True)
    h = a_up
    for blk in _segment(model, upstream, layer):
        h = blk(h)
    out = []
    for k in neurons:
        go = torch.zeros_like(h)
        go[:, k] = h[:, k].detach().clamp(min=0)
        (g,) = torch.autograd.grad(h, a_up, go, retain_graph=True)
        r = (g * a_up).sum(dim=(2, 3)).detach()
        if drop_self:
            r[:, k] = 0
        out.append(r / (r.abs().sum(-1, keepdim=True) + eps))
    return torch.stack(out, dim=1)


def zennit_relevance(model, x, layer, upstream, neurons, eps=1e-12):
    """The same relevance from zennit's Gradient attributor with its ResNet canonizer.

    zennit neutralises a merged BatchNorm by setting its statistics to (0, 1) but keeps ``eps``, so
    each BatchNorm scales by 1/sqrt(1 + eps) after merging; callers set ``eps = 0`` on the model to
    compare exactly.
    """
    from zennit.attribution import Gradient
    from zennit.core import Composite
    from zennit.torchvision import ResNetCanonizer

    a_up = _output_of(model, upstream, x)
    seg = nn.Sequential(*_segment(model, upstream, layer))
    out = []
    for k in neurons:
        def attr_out(o, k=k):
            t = torch.zeros_like(o)
            t[:, k] = o[:, k].clamp(min=0)
            return t

        with Gradient(seg, Composite(canonizers=[ResNetCanonizer()])) as attributor:
            _, grad = attributor(a_up, attr_out)
        r = (grad * a_up).sum(dim=(2, 3)).detach()
        out.append(r / (r.abs().sum(-1, keepdim=True) + eps))
    return torch.stack(out, dim=1)


# ------------------------------------------------------------------ a tiny model with planted concepts
#: fine classes (planted concept ids) and their superclasses: {h-stripes, disk} and {v-stripes, ring}
PLANTED_CLASSES = [0, 2, 1, 3]


@pytest.fixture(scope="session")
def planted_model():
    """A small ResNet trained in seconds on two superclasses, each the union of two planted concepts.

    Returns ``(model, train, test)``; fine labels 0..3, superclasses ``{0, 1} -> 0``, ``{2, 3} -> 1``.
    """
    from purenn.cli.datasets import planted_concepts, small_image_resnet, train_classifier

    train = planted_concepts(320, classes=PLANTED_CLASSES, size=16, seed=0)
    test = planted_concepts(160, classes=PLANTED_CLASSES, size=16, seed=1)
    torch.manual_seed(0)
    model = small_image_resnet(blocks=[1, 1, 1, 1], stem_stride=2, num_classes=2)
    model = train_classifier(model, train, epochs=2, batch_size=32, lr=3e-3, progress=False)
    return model, train, test


@pytest.fixture(scope="session")
def planted_pm(planted_model):
    """``planted_model`` with 16 of its ``layer4`` neurons split in two."""
    import purenn

    model, train, _ = planted_model
    return purenn.purify_model(model, ["layer4"], train, n_refs=20, neurons={"layer4": list(range(0, 512, 32))},
                               progress=False)



@pytest.fixture(scope="module")
def one_thread():
    """Run a module's in-process computation on one thread, as the subprocesses it compares with do
    (``OMP_NUM_THREADS=1``): float reductions can round differently with another thread count.
    Use it as an autouse module fixture so that it is set up before the module's other fixtures."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def contrast_by_hand(x: np.ndarray, seed: int = 0) -> float:
    """2-means split of (n, D) points with scikit-learn, then balance x (1 - cosine of the centres)."""
    from sklearn.cluster import KMeans

    km = KMeans(2, n_init=10, random_state=seed).fit(x)
    counts = np.bincount(km.labels_, minlength=2)
    a, b = km.cluster_centers_
    cos = a @ b / (np.linalg.norm(a) * np.linalg.norm(b))
    return 2 * counts.min() / counts.sum() * (1 - cos)
