import pytest
import torch
import torchvision
from torch import nn

from purenn import ResNetSpec, UnsupportedModelError
from purenn.errors import LayerError

from conftest import BUILDERS, adapted_stem_resnet, tiny_resnet


@pytest.mark.parametrize("name", BUILDERS)
def test_replay_is_bit_identical_for_every_builder(name):
    torch.manual_seed(0)
    model = getattr(torchvision.models, name)(num_classes=3).eval()
    spec = ResNetSpec(model)
    x = torch.rand(2, 3, 33, 45)
    with torch.no_grad():
        assert torch.equal(spec.forward(x), model(x))


def test_replay_adapted_stem():
    model = adapted_stem_resnet()
    x = torch.rand(3, 1, 28, 28)
    with torch.no_grad():
        assert torch.equal(ResNetSpec(model).forward(x), model(x))


def test_layer_names_positions_and_default_upstreams():
    spec = ResNetSpec(torchvision.models.resnet50())  # blocks 3, 4, 6, 3
    assert spec.position("maxpool") == spec.position("stem") == 0
    assert spec.position("layer1") == 3 and spec.position("layer1.2") == 3
    assert spec.position("layer4") == 16 and spec.position("layer4.0") == 14
    assert spec.default_upstream("layer1") == "maxpool"
    assert spec.default_upstream("layer4") == "layer3"
    assert spec.default_upstream("layer4.2") == "layer4.1"
    assert spec.default_upstream("layer4.0") == "layer3"
    assert spec.default_upstream("layer1.0") == "maxpool"
    assert spec.channels(0) == 64 and spec.channels(16) == 2048
    assert [b.name for b in spec.segment(13, 16)] == ["layer4.0", "layer4.1", "layer4.2"]
    names = {n for n, _ in torchvision.models.resnet50().named_modules()}
    assert set(spec.layer_names()) <= names


@pytest.mark.parametrize("bad", ["layer5", "layer4.3", "fc", "", "layer1.x"])
def test_unknown_layer_names(bad):
    spec = ResNetSpec(torchvision.models.resnet50())
    with pytest.raises(LayerError, match="unknown layer"):
        spec.position(bad)


def test_non_resnet_is_refused():
    with pytest.raises(UnsupportedModelError, match="not a torchvision ResNet"):
        ResNetSpec(torchvision.models.vgg11())
    with pytest.raises(UnsupportedModelError):
        ResNetSpec(nn.Linear(3, 3))


def test_unsupported_normalisation_is_refused():
    model = torchvision.models.resnet18(norm_layer=lambda c: nn.GroupNorm(1, c))
    with pytest.raises(UnsupportedModelError, match="GroupNorm"):
        ResNetSpec(model)


def test_batchnorm_without_running_stats_is_refused():
    model = torchvision.models.resnet18(norm_layer=lambda c: nn.BatchNorm2d(c, track_running_stats=False))
    with pytest.raises(UnsupportedModelError, match="running statistics"):
        ResNetSpec(model)


def test_frozen_batchnorm_is_supported():
    from torchvision.ops.misc import FrozenBatchNorm2d

    model = torchvision.models.resnet18(norm_layer=FrozenBatchNorm2d).eval()
    x = torch.rand(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(ResNetSpec(model).forward(x), model(x))


def test_output_padding_restores_odd_sizes():
    model = tiny_resnet()
    spec = ResNetSpec(model)
    cb = spec.blocks[spec.position("layer2.0") - 1].main[0]  # conv1, stride 2
    assert cb.conv.stride == (2, 2)
    for size in (7, 8, 13):
        x = torch.rand(1, cb.conv.in_channels, size, size)
        y = cb.conv(x)
        op = cb.output_padding((size, size), tuple(y.shape[-2:]))
        back = torch.nn.functional.conv_transpose2d(y, cb.conv.weight, None, 2, 1, op)
        assert back.shape[-2:] == x.shape[-2:]
