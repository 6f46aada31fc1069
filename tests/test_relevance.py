import pytest
import torch

from purenn import circuit_relevance
from purenn.errors import ConfigError, DataError, LayerError

from conftest import adapted_stem_resnet, autograd_relevance, make_model, tiny_resnet, zennit_relevance

# (model, layer, upstream, what it covers)
CASES = [
    ("resnet18", "layer4", "layer3", "stage, BasicBlock, downsample"),
    ("resnet18", "layer4.1", "layer4.0", "block, BasicBlock, identity skip"),
    ("resnet18", "layer4.0", "layer3", "block, BasicBlock, downsample"),
    ("resnet18", "layer1", "maxpool", "stage from the stem, no downsample"),
    ("resnet18", "layer4", "layer2.1", "two stages, overridden upstream"),
    ("resnet50", "layer2", "layer1", "stage, Bottleneck, downsample"),
    ("resnet50", "layer3.2", "layer3.1", "block, Bottleneck, identity skip"),
    ("resnet50", "layer1.0", "maxpool", "block, Bottleneck, stride-1 downsample"),
    ("resnext50_32x4d", "layer3", "layer2", "stage, grouped convolutions"),
    ("resnext50_32x4d", "layer4.1", "layer4.0", "block, grouped convolutions, identity"),
]


@pytest.fixture(scope="module")
def models64():
    return {name: make_model(name, dtype=torch.float64, size=(65, 49)) for name in {c[0] for c in CASES}}


@pytest.mark.parametrize("name,layer,upstream,what", CASES)
def test_relevance_equals_autograd(models64, name, layer, upstream, what):
    model = models64[name]
    x = torch.rand(3, 3, 97, 131, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    neurons = [0, 3, 17, 40]
    ours = circuit_relevance(model, x, layer, neurons, upstream=upstream)
    ref = autograd_relevance(model, x, layer, upstream, neurons)
    assert ours.shape == ref.shape
    assert ref.abs().sum() > 0  # the comparison is not between zeros
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-9)


@pytest.mark.parametrize("name,layer,upstream,what", CASES[::2] + CASES[1:2] + CASES[8:9])
def test_relevance_equals_zennit(name, layer, upstream, what):
    model = make_model(name, dtype=torch.float64, size=(65, 49))
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.eps = 0.0  # see zennit_relevance
    x = torch.rand(2, 3, 71, 57, dtype=torch.float64, generator=torch.Generator().manual_seed(6))
    neurons = [1, 30]
    ours = circuit_relevance(model, x, layer, neurons, upstream=upstream)
    ref = zennit_relevance(model, x, layer, upstream, neurons)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-9)


def test_relevance_float32_realistic_activations():
    model = make_model("resnet50", size=(97, 131))
    x = torch.rand(2, 3, 97, 131, generator=torch.Generator().manual_seed(1))
    ours = circuit_relevance(model, x, "layer4", [2, 9])
    ref = autograd_relevance(model, x, "layer4", "layer3", [2, 9])
    assert torch.isfinite(ours).all()
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-6)


def test_adapted_stem_relevance():
    model = adapted_stem_resnet(dtype=torch.float64)
    x = torch.rand(2, 1, 28, 28, dtype=torch.float64)
    for layer, up in (("layer1", "maxpool"), ("layer4.1", "layer4.0")):
        torch.testing.assert_close(
            circuit_relevance(model, x, layer, [0, 5], upstream=up),
            autograd_relevance(model, x, layer, up, [0, 5]),
            rtol=1e-5,
            atol=1e-9,
        )


def test_chunking_does_not_change_relevance():
    model = tiny_resnet("bottleneck", dtype=torch.float64)
    x = torch.rand(3, 3, 40, 40, dtype=torch.float64)
    full = circuit_relevance(model, x, "layer4", list(range(20)))
    tiny = circuit_relevance(model, x, "layer4", list(range(20)), max_memory=1)
    torch.testing.assert_close(full, tiny, rtol=1e-12, atol=1e-15)


def test_output_is_l1_normalised_and_sorted():
    model = tiny_resnet(dtype=torch.float64)
    x = torch.rand(2, 3, 32, 32, dtype=torch.float64)
    r = circuit_relevance(model, x, "layer3", [9, 2, 5])
    ref = autograd_relevance(model, x, "layer3", "layer2", [2, 5, 9])
    torch.testing.assert_close(r, ref)
    live = r.abs().sum(-1) > 0
    torch.testing.assert_close(r.abs().sum(-1)[live], torch.ones_like(r.abs().sum(-1)[live]))


def test_skip_aware_drops_own_channel():
    model = tiny_resnet(dtype=torch.float64)
    x = torch.rand(2, 3, 32, 32, dtype=torch.float64)
    neurons = [3, 8]
    r = circuit_relevance(model, x, "layer2.1", neurons, skip_aware=True)
    ref = autograd_relevance(model, x, "layer2.1", "layer2.0", neurons, drop_self=True)
    torch.testing.assert_close(r, ref)
    assert (r[:, 0, 3] == 0).all() and (r[:, 1, 8] == 0).all()
    with pytest.raises(ConfigError, match="identity skip"):
        circuit_relevance(model, x, "layer2", [0], skip_aware=True)  # layer2.0 has a downsample


def test_dead_neuron_gives_zero_relevance_without_nan():
    model = tiny_resnet(dtype=torch.float64)
    with torch.no_grad():  # channel 4 of layer3 can never fire: bn2 of the last block kills it
        blk = model.layer3[0]
        blk.bn2.weight[4] = 0
        blk.bn2.bias[4] = -100
        blk.downsample[1].weight[4] = 0
        blk.downsample[1].bias[4] = -100
    x = torch.rand(2, 3, 32, 32, dtype=torch.float64)
    r = circuit_relevance(model, x, "layer3", [4, 5])
    assert torch.isfinite(r).all()
    assert (r[:, 0] == 0).all()
    assert r[:, 1].abs().sum() > 0


def test_bad_arguments():
    model = tiny_resnet()
    x = torch.rand(1, 3, 32, 32)
    with pytest.raises(LayerError, match="not before"):
        circuit_relevance(model, x, "layer2", [0], upstream="layer3")
    with pytest.raises(LayerError, match="unknown layer"):
        circuit_relevance(model, x, "layer9", [0])
    with pytest.raises(ConfigError, match="empty"):
        circuit_relevance(model, x, "layer2", [])
    with pytest.raises(ConfigError, match="out of range"):
        circuit_relevance(model, x, "layer2", [128])
    with pytest.raises(DataError, match="NaN"):
        circuit_relevance(model, torch.full((1, 3, 32, 32), float("nan")), "layer2", [0])
    with pytest.raises(DataError, match="shape"):
        circuit_relevance(model, torch.rand(3, 32, 32), "layer2", [0])


@pytest.mark.parametrize(
    "kernel,stride,padding,size", [(1, 2, 0, 7), (1, 2, 0, 8), (1, 3, 0, 10), (3, 2, 1, 7), (3, 1, 1, 6)]
)
@pytest.mark.parametrize("exporting", [False, True])
def test_conv_backward_forms_equal_autograd(kernel, stride, padding, size, exporting, monkeypatch):
    """Every form the backward of a conv+BN takes (zero insertion after a 1x1 convolution for a
    strided 1x1, a convolution with the flipped weight for stride 1 in an ONNX export, transposed
    convolution otherwise) returns the input gradient autograd computes."""
    from torch import nn

    from purenn.arch import ConvBN
    from purenn.attribution.relevance import _conv_back

    monkeypatch.setattr(torch.onnx, "is_in_onnx_export", lambda: exporting)
    torch.manual_seed(0)
    conv = nn.Conv2d(6, 5, kernel, stride, padding, bias=False).double()
    bn = nn.BatchNorm2d(5).double().eval()
    with torch.no_grad():
        bn.running_var.uniform_(0.5, 2.0)
        bn.weight.uniform_(0.5, 2.0)
    x = torch.randn(3, 6, size, size + 1, dtype=torch.float64, requires_grad=True)
    y = bn(conv(x))
    g = torch.randn_like(y)
    (expected,) = torch.autograd.grad(y, x, g)
    got = _conv_back(ConvBN(conv, bn), g[:, None], (size, size + 1))[:, 0]
    torch.testing.assert_close(got, expected)
