"""timm ResNets: exact replay, relevance equal to autograd (SE and ECA attention included), purify,
save/load rebuilt from the timm name, ONNX Runtime parity, refusals by name, and ``purenn purify timm:``."""

from __future__ import annotations

import copy
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

timm = pytest.importorskip("timm", reason="timm is not installed (pip install 'purenn[timm]'); CI installs it")

import purenn  # noqa: E402
from purenn import ResNetSpec, UnsupportedModelError, circuit_relevance  # noqa: E402
from purenn.arch.attention import AvgPoolDown, EfficientChannelAttention, SqueezeExcite  # noqa: E402
from purenn.cli import app as cli  # noqa: E402
from purenn.errors import FileFormatError  # noqa: E402
from purenn.io.architecture import describe_architecture  # noqa: E402
from purenn.io.format import read_config  # noqa: E402

from conftest import autograd_relevance, calibrate_bn, randomize_bn_affine  # noqa: E402

#: small timm ResNets built directly: SENet-154's layout (halved first convolution, 3x3 strided
#: downsample convolutions, deep stem, grouped SE blocks) at one block per stage
CUSTOM = {
    "senet-like": dict(block=timm.models.resnet.Bottleneck, layers=[1, 1, 2, 1], cardinality=8, base_width=8,
                       stem_type="deep", down_kernel_size=3, block_reduce_first=2, block_args={"attn_layer": "se"},
                       channels=(16, 32, 64, 128)),
}
SIZE = (37, 45)  # odd sizes: ceil-mode average pooling and output padding of the stride-2 convolutions


def timm_model(name: str, seed: int = 0, dtype=torch.float32, size=SIZE, **kwargs) -> nn.Module:
    """A timm model with random weights, random BatchNorm affine parameters (timm zero-initialises the
    last BatchNorm of every block, which would switch the main paths and their attention off) and
    statistics calibrated on random and all-zero images."""
    torch.manual_seed(seed)
    if name in CUSTOM:
        model = timm.models.resnet.ResNet(**CUSTOM[name], num_classes=kwargs.pop("num_classes", 5), **kwargs)
    else:
        model = timm.create_model(name, pretrained=False, num_classes=kwargs.pop("num_classes", 5), **kwargs)
    g = torch.Generator().manual_seed(seed + 1)
    randomize_bn_affine(model, g)
    # all-zero images among them keep a zero input (which export_onnx verifies) in a realistic range
    x = torch.cat([torch.rand(6, model.in_chans, *size, generator=g), torch.zeros(2, model.in_chans, *size)])
    model = calibrate_bn(model, x)
    return model.to(dtype)


def images(n: int, seed: int, dtype=torch.float32, size=SIZE, channels: int = 3) -> torch.Tensor:
    return torch.rand(n, channels, *size, generator=torch.Generator().manual_seed(seed), dtype=dtype)


# ------------------------------------------------------------------ replay
_BIG = pytest.mark.slow  # over a second each to build
REPLAY = ["resnet18", "resnet26", "resnet34", "resnet50", pytest.param("resnet101", marks=_BIG),
          pytest.param("resnet152", marks=_BIG), "resnet18d", "resnet50d", "resnet10t", "resnet50s", "seresnet50",
          "ecaresnet50d", "ecaresnet26t", "resnext50_32x4d", "seresnext26d_32x4d",
          pytest.param("wide_resnet50_2", marks=_BIG), "resnetrs50", "ecaresnetlight"]


@pytest.mark.parametrize("name", REPLAY)
def test_replay_is_bit_identical(name):
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, num_classes=3).eval()
    spec = ResNetSpec(model)
    assert spec.family.name == "timm"
    x = images(2, 1, size=(33, 29))
    with torch.no_grad():
        assert torch.equal(spec.forward(x), model(x))


def test_drop_path_and_drop_block_are_replayed_as_identities():
    model = timm_model("resnet26", drop_path_rate=0.2, drop_block_rate=0.2)
    assert any(type(m).__name__ == "DropPath" for m in model.modules())
    assert any(type(m).__name__ == "DropBlock2d" for m in model.modules())
    x = images(2, 3)
    with torch.no_grad():
        assert torch.equal(ResNetSpec(model).forward(x), model(x))


@pytest.mark.slow
def test_timm_is_not_imported_for_a_torchvision_model():
    import subprocess

    code = ("import torch, torchvision, sys; from purenn import ResNetSpec, circuit_relevance; "
            "from purenn.io.architecture import describe_architecture; import purenn.cli, purenn.cli.loaders; "
            "m = torchvision.models.resnet18().eval(); ResNetSpec(m); describe_architecture(m); "
            "circuit_relevance(m, torch.rand(1, 3, 32, 32), 'layer4', [0]); print('timm' in sys.modules)")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "False"


# ------------------------------------------------------------------ relevance against autograd
#: (model, what it covers)
FAMILIES = [
    ("resnet18", "BasicBlock, 7x7 stem"),
    ("resnet26", "Bottleneck"),
    ("resnet50d", "deep stem, average-pool downsample"),
    ("seresnet18", "SE in BasicBlocks"),
    ("seresnet50", "SE in Bottlenecks"),
    ("ecaresnet26t", "ECA, tiered stem, average-pool downsample"),
    ("seresnext26d_32x4d", "grouped convolutions, SE, average-pool downsample"),
    ("senet-like", "3x3 strided downsample convolutions, halved first convolution, grouped SE"),
]
#: (target, upstream): stage with a downsample, block with an identity skip, block with a downsample
TARGETS = [("layer2", "layer1"), ("layer3.1", "layer3.0"), ("layer4.0", "layer3")]


@pytest.fixture(scope="module")
def models64():
    return {name: timm_model(name, dtype=torch.float64) for name, _ in FAMILIES}


@pytest.mark.parametrize("name,what", FAMILIES)
def test_relevance_equals_autograd(models64, name, what):
    model = models64[name]
    x = images(2, 5, dtype=torch.float64)
    neurons = [0, 3, 17]
    for layer, up in TARGETS:
        ours = circuit_relevance(model, x, layer, neurons, upstream=up)
        ref = autograd_relevance(model, x, layer, up, neurons)
        assert ref.abs().sum() > 0  # the comparison is not between zeros
        torch.testing.assert_close(ours, ref, rtol=1e-9, atol=1e-9 * float(ref.abs().max()))


@pytest.mark.parametrize("name,cls", [("seresnet50", SqueezeExcite), ("ecaresnet26t", EfficientChannelAttention)])
def test_attention_gradient_needs_the_pooled_path(models64, monkeypatch, name, cls):
    """Only the direct term ``g * s`` of the attention's gradient is far from autograd, so the
    comparison above sees the term through the pooled path."""
    model = models64[name]
    x = images(2, 5, dtype=torch.float64)
    ref = autograd_relevance(model, x, "layer2", "layer1", [0, 3])
    monkeypatch.setattr(cls, "backward", lambda self, g, state: g * state[1][..., None, None])
    original = cls.backward_onehot
    monkeypatch.setattr(cls, "backward_onehot", lambda self, a, k, state: (original(self, a, k, state)[0],
                                                                            torch.zeros_like(state[1][:, :1])))
    direct_only = circuit_relevance(model, x, "layer2", [0, 3], upstream="layer1")
    assert (direct_only - ref).abs().max() > 1e-3 * ref.abs().max()


def test_attention_and_pool_steps_equal_autograd():
    g = torch.Generator().manual_seed(3)
    model = timm_model("seresnet18", dtype=torch.float64)
    eca = timm_model("ecaresnet26t", dtype=torch.float64)
    for attn in (ResNetSpec(model).blocks[2].attn, ResNetSpec(eca).blocks[3].attn):
        c = attn.fc2.out_channels if isinstance(attn, SqueezeExcite) else 256
        z = torch.randn(3, c, 5, 7, generator=g, dtype=torch.float64, requires_grad=True)
        gy = torch.randn(3, 2, c, 5, 7, generator=g, dtype=torch.float64)
        y, state = attn.forward(z)
        ours = attn.backward(gy, tuple(t.detach()[:, None] for t in state))
        for j in range(2):
            (ref,) = torch.autograd.grad(y, z, gy[:, j], retain_graph=True)
            torch.testing.assert_close(ours[:, j], ref, rtol=1e-12, atol=1e-14)
        # from a one-hot gradient e_k * a (k = neurons[j]): direct and pooled pieces, for masks shared
        # by the neurons (gating) and gathered per pair (fitting)
        neurons = torch.tensor([4, 0, 9])
        a = torch.rand(3, 3, 5, 7, generator=g, dtype=torch.float64)
        for layout in ("grid", "pair"):
            st = tuple(t.detach()[:, None] for t in state)
            if layout == "pair":  # pair j is sample j
                st, a_in = tuple(t.detach()[None] for t in state), a.diagonal().permute(2, 0, 1)[None]
            else:
                a_in = a
            direct, pooled = attn.backward_onehot(a_in, neurons, st)
            onehot = torch.nn.functional.one_hot(neurons, c).double()[None, :, :, None, None]
            dense = attn.backward(a_in[:, :, None] * onehot, st)
            torch.testing.assert_close(direct[:, :, None] * onehot + pooled[..., None, None], dense,
                                       rtol=1e-12, atol=1e-14)
    for ceil in (True, False):
        pool = AvgPoolDown(nn.AvgPool2d(2, 2, ceil_mode=ceil, count_include_pad=False))
        for hw in ((7, 9), (8, 6)):
            x = torch.randn(2, 3, *hw, generator=g, dtype=torch.float64, requires_grad=True)
            y = pool.forward(x)
            gy = torch.randn(y.shape, generator=g, dtype=torch.float64)
            (ref,) = torch.autograd.grad(y, x, gy)
            torch.testing.assert_close(pool.backward(gy, hw), ref, rtol=1e-12, atol=1e-14)


# ------------------------------------------------------------------ refusals
class _MyBottleneck(timm.models.resnet.Bottleneck):
    def forward(self, x):
        return super().forward(x) * 2


class _MyResNet(timm.models.resnet.ResNet):
    def forward(self, x):
        return super().forward(x).softmax(-1)


def _refusals():
    custom_block = timm.create_model("resnet26", pretrained=False)
    custom_block.layer2[1].__class__ = _MyBottleneck
    custom_forward = timm.create_model("resnet26", pretrained=False)
    custom_forward.__class__ = _MyResNet
    return [
        (timm.create_model("resnetaa50", pretrained=False), r"layer2\.0\.aa is a .*anti-aliasing"),
        (timm.create_model("resnet50_gn", pretrained=False), r"GroupNorm"),
        (timm.create_model("resnet18", pretrained=False, block_args={"attn_layer": "cbam"}), r"layer1\.0\.se is a "
         r"CbamModule"),
        (timm.create_model("resnet18", pretrained=False, act_layer="silu"), r"SiLU"),
        (custom_block, r"block layer2\.1 is a _MyBottleneck with its own forward"),
        (custom_forward, r"_MyResNet\.forward is not timm's ResNet\.forward"),
        (timm.create_model("resnet18", pretrained=False, block_args={"attn_layer": "ecam"}), r"EcaModule with a "
         r"configuration"),
        (timm.create_model("resnet26d", pretrained=False, output_stride=16), r"layer4\.0\.downsample\.0 is a "
         r"AvgPool2dSame"),
    ]


def test_unsupported_timm_models_are_refused_by_name_before_any_work():
    data = torch.rand(4, 3, 32, 32)
    for model, match in _refusals():
        with pytest.raises(UnsupportedModelError, match=match):
            ResNetSpec(model)
        with pytest.raises(UnsupportedModelError, match=match):
            purenn.purify_model(model, ["layer4"], data, n_refs=2, progress=False)
    with pytest.raises(UnsupportedModelError, match="not a timm ResNet"):
        ResNetSpec(timm.create_model("vgg11", pretrained=False))


# ------------------------------------------------------------------ purify, save, load
@pytest.fixture(scope="module")
def se_purified():
    model = timm_model("seresnet50", size=(32, 32), num_classes=4)
    data = images(24, 7, size=(32, 32))
    pm = purenn.purify_model(model, ["layer3.1", "layer4"], data, n_refs=6,
                             neurons={"layer3.1": [2, 4], "layer4": [1, 5, 9]}, progress=False)
    return model, pm, data


def test_purified_timm_model(se_purified):
    model, pm, data = se_purified
    x = images(5, 8, size=(32, 32))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        assert torch.equal(pm(x), model(x))
        gates = pm.gates(x)
        feats = pm.pure_features(x)
    assert gates["layer4"].shape == (5, 3) and feats["layer4"].shape == (5, 2048 + 3)
    # the gate is the nearest centroid of the relevance autograd gives (SE gradient included)
    pl = pm.pure_layer("layer4")
    r = autograd_relevance(copy.deepcopy(model).double(), x.double(), "layer4", "layer3", pl.neurons.tolist())
    d = ((r[:, :, None] - pl.centroids[None].double()) ** 2).sum(-1)
    assert torch.equal(gates["layer4"], d.argmin(-1))
    # suppressing a virtual neuron changes exactly the samples whose activation it carries
    c = int(gates["layer4"][0, 1])
    v = pm.virtual_index("layer4", channel=5, cluster=c)
    with pm.suppress("layer4", [v]), torch.no_grad():
        off, logits = pm(x), model(x)
    carried = feats["layer4"][:, v] > 0
    assert carried.any() and ((gates["layer4"][:, 1] == c) | ~carried).all()
    assert (off[carried] - logits[carried]).abs().amax(-1).min() > 0
    torch.testing.assert_close(off[~carried], logits[~carried])
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())  # caller's model unchanged


def test_save_load_rebuilds_from_the_timm_name(se_purified, tmp_path):
    model, pm, _ = se_purified
    pm.suppress("layer4", [pm.virtual_index("layer4", channel=1, cluster=0)])
    try:
        path = pm.save(tmp_path / "se.safetensors")
    finally:
        pm.restore("layer4")
    arch = read_config(path)["architecture"]
    assert arch["family"] == "timm.models.resnet.ResNet" and arch["timm_model"] == "seresnet50"
    assert arch["timm_kwargs"]["num_classes"] == 4 and arch["timm_kwargs"]["in_chans"] == 3
    assert arch["rebuildable"] and arch["attention"] == ["SqueezeExcite"]
    pm2 = purenn.load_purified(path)
    assert type(pm2.base_model) is timm.models.resnet.ResNet and pm2.base_model is not model
    assert pm2.base_model.pretrained_cfg["architecture"] == "seresnet50"
    x = images(4, 9, size=(32, 32))
    pm.suppress("layer4", [pm.virtual_index("layer4", channel=1, cluster=0)])
    try:
        with torch.no_grad():
            assert torch.equal(pm2(x), pm(x))
            for layer, g in pm.gates(x).items():
                assert torch.equal(pm2.gates(x)[layer], g)
    finally:
        pm.restore("layer4")
    # a skeleton of another timm architecture is refused, one of the same is used
    with pytest.raises(FileFormatError, match="does not fit"):
        purenn.load_purified(path, model=timm.create_model("seresnet50", pretrained=False, num_classes=5))
    skeleton = timm.create_model("seresnet50", pretrained=False, num_classes=4)
    with torch.no_grad():
        assert torch.equal(purenn.load_purified(path, model=skeleton)(x), pm2(x))


def test_load_without_timm_says_what_to_install(se_purified, tmp_path, monkeypatch):
    _, pm, _ = se_purified
    path = pm.save(tmp_path / "se.safetensors")
    monkeypatch.setitem(sys.modules, "timm", None)  # import timm now fails
    with pytest.raises(FileFormatError, match=r"purenn\[timm\].*model="):
        purenn.load_purified(path)


def test_timm_model_without_a_registry_name_needs_a_skeleton(tmp_path):
    torch.manual_seed(0)
    r = timm.models.resnet
    model = r.ResNet(r.BasicBlock, [1, 1, 1, 1], num_classes=3, stem_type="deep", avg_down=True).eval()
    model = calibrate_bn(model, torch.rand(6, 3, 32, 32))
    pm = purenn.purify_model(model, ["layer4"], torch.rand(8, 3, 32, 32), n_refs=4, neurons={"layer4": [0, 1]},
                             progress=False)
    arch = describe_architecture(model)
    assert arch["timm_model"] is None and not arch["rebuildable"]
    path = pm.save(tmp_path / "custom.safetensors")
    with pytest.raises(FileFormatError, match="model="):
        purenn.load_purified(path)
    skeleton = r.ResNet(r.BasicBlock, [1, 1, 1, 1], num_classes=3, stem_type="deep", avg_down=True)
    x = torch.rand(3, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(purenn.load_purified(path, model=skeleton)(x), pm(x))


def test_described_create_model_arguments_rebuild_the_structure():
    model = timm.create_model("resnet26", pretrained=False, num_classes=7, in_chans=1, drop_path_rate=0.1,
                              global_pool="max", output_stride=16)
    arch = describe_architecture(model)
    assert arch["timm_kwargs"] == {"num_classes": 7, "in_chans": 1, "global_pool": "max", "drop_rate": 0.0,
                                   "output_stride": 16, "drop_path_rate": 0.1}
    assert arch["rebuildable"]


# ------------------------------------------------------------------ ONNX
@pytest.mark.slow
@pytest.mark.parametrize("name,size", [("resnet50", (48, 48)), ("seresnet50", (49, 45)), ("ecaresnet26t", (49, 45))])
def test_onnx_runtime_parity(name, size, tmp_path):
    """export_onnx verifies ONNX Runtime against PyTorch (random batches and an all-zero batch) or
    raises; here the file is run again on new images against the base model and the gates."""
    ort = pytest.importorskip("onnxruntime")
    model = timm_model(name, size=size, num_classes=4)
    data = images(16, 11, size=size)
    pm = purenn.purify_model(model, ["layer3.1", "layer4"], data, n_refs=5,
                             neurons={"layer3.1": [2, 4], "layer4": [1, 5, 9]}, progress=False)
    report = purenn.export_onnx(pm, tmp_path / "m.onnx", input_shape=(3, *size), batch_sizes=(3,))
    assert report.ok
    session = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    x = images(4, 12, size=size)
    out = dict(zip([o.name for o in session.get_outputs()], session.run(None, {"input": x.numpy()})))
    with torch.no_grad():
        logits = model(x)
        gates = pm.gates(x)
    torch.testing.assert_close(torch.from_numpy(out["logits"]), logits, rtol=1e-4,
                               atol=1e-4 * float(logits.abs().max()))
    for layer, g in gates.items():
        assert (torch.from_numpy(out[f"gate.{layer}"]) == g).float().mean() >= 0.9  # ties aside


# ------------------------------------------------------------------ CLI
@pytest.fixture(scope="module")
def timm_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("timm_cli")
    rng = np.random.default_rng(0)
    for c, name in enumerate(("a", "b")):
        (root / "images" / name).mkdir(parents=True)
        for i in range(5):
            Image.fromarray((rng.random((36, 36, 3)) * 120 + 60 * c).astype(np.uint8)).save(
                root / "images" / name / f"{i}.png")
    model = timm_model("resnet18", size=(32, 32), num_classes=2)
    torch.save(model.state_dict(), root / "r18.pth")
    return root, model


def test_cli_purify_a_timm_checkpoint(capsys, timm_files):
    root, model = timm_files
    out = root / "pure.safetensors"
    code = cli.main(["purify", "timm:resnet18.a1_in1k", "-c", str(root / "r18.pth"), "--data", str(root / "images"),
                     "--image-size", "32", "--channels", "layer4:0,1", "--n-refs", "4", "-o", str(out), "-q"])
    assert code == 0, capsys.readouterr().err
    arch = read_config(out)["architecture"]
    assert (arch["timm_model"], arch["timm_tag"], arch["num_classes"]) == ("resnet18", "a1_in1k", 2)
    pm = purenn.load_purified(out)
    x = images(2, 13, size=(32, 32))
    with torch.no_grad():
        assert torch.equal(pm(x), model(x))
    code = cli.main(["inspect", str(out)])
    assert code == 0 and "base: timm resnet18.a1_in1k: BasicBlock blocks [2, 2, 2, 2]" in capsys.readouterr().out


@pytest.mark.parametrize("argv,code,fragment", [
    (["timm:resnet77"], 3, "not a ResNet of timm"),
    (["timm:vit_base_patch16_224", "--weights", "DEFAULT"], 3, "not a ResNet of timm"),
    (["timm:resnet18"], 3, "needs trained weights"),
    (["timm:resnet34", "-c", "{root}/r18.pth"], 3, "does not fit timm's resnet34"),
    (["timm:resnet18.a1_in1k", "--weights", "a2_in1k"], 3, "names its pretrained tag already"),
])
def test_cli_timm_errors(capsys, timm_files, argv, code, fragment):
    root, _ = timm_files
    argv = [a.format(root=root) for a in argv]
    got = cli.main(["purify", *argv, "--data", str(root / "images"), "-o", str(root / "x.safetensors"), "-q"])
    err = capsys.readouterr().err
    assert got == code and fragment in err, err


def test_cli_timm_weights_unreachable(capsys, timm_files, monkeypatch):
    root, _ = timm_files

    def offline(name, pretrained=False, **kwargs):
        if pretrained:
            raise OSError("no network")
        return create(name, pretrained=False, **kwargs)

    create = timm.create_model
    monkeypatch.setattr(timm, "create_model", offline)
    got = cli.main(["purify", "timm:resnet18", "--weights", "DEFAULT", "--data", str(root / "images"), "-o",
                    str(root / "x.safetensors"), "-q"])
    err = capsys.readouterr().err
    assert got == 3 and "could not fetch timm's pretrained weights" in err and "--checkpoint" in err


def test_cli_timm_missing(capsys, timm_files, monkeypatch):
    root, _ = timm_files
    monkeypatch.setitem(sys.modules, "timm", None)
    got = cli.main(["purify", "timm:resnet18", "-c", str(root / "r18.pth"), "--data", str(root / "images"), "-o",
                    str(root / "x.safetensors"), "-q"])
    assert got == 4 and 'purenn[timm]' in capsys.readouterr().err


@pytest.mark.parametrize("name", ["seresnet18", "ecaresnet26t"])
def test_fitting_pairs_equal_the_gate_grid(models64, name):
    """Fitting gathers masks and attention state per (sample, neuron) pair; gating shares them across
    neurons: both give the same relevance."""
    from purenn.attribution.relevance import grid_relevance, pair_relevance

    model = models64[name]
    spec = ResNetSpec(model)
    x = images(3, 6, dtype=torch.float64)
    up, pos = spec.position("layer2"), spec.position("layer3")
    with torch.no_grad():
        acts, recs = spec.run_until(x, {up, pos}, set(range(up + 1, pos + 1)))
    seg, blocks = [recs[j] for j in range(up + 1, pos + 1)], spec.segment(up, pos)
    neurons = torch.tensor([1, 6, 11])
    grid = grid_relevance(blocks, seg, acts[up], acts[pos], neurons)
    samples, chosen = torch.tensor([2, 0, 1, 2]), torch.tensor([11, 6, 1, 1])
    pairs = pair_relevance(blocks, seg, acts[up], acts[pos], samples, chosen, max_memory=1)
    torch.testing.assert_close(pairs, grid[samples, torch.tensor([2, 1, 0, 0])], rtol=1e-12, atol=1e-12)
