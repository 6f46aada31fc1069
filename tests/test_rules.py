"""Relevance rules (purenn.attribution.rules) against zennit's LRP attribution with its ResNet canonizer."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from torch import nn

import purenn
from purenn.attribution.rules import RULES, AlphaBeta, Epsilon, Gamma, get_rule, rule_from_config
from purenn.errors import ConfigError, FileFormatError

from conftest import _output_of, _segment, tiny_resnet

LRP_RULES = ["epsilon", "zplus", "alpha2beta1", "gamma"]

# (block type, groups, width, layer, upstream, what it covers)
CASES = [
    ("basic", 1, 64, "layer2.1", "layer2.0", "BasicBlock, 1 block, identity skip"),
    ("basic", 1, 64, "layer2", "layer1", "BasicBlock, 2 blocks, downsample"),
    ("bottleneck", 1, 64, "layer4.1", "layer4.0", "Bottleneck, 1 block, identity skip"),
    ("bottleneck", 1, 64, "layer2", "layer1", "Bottleneck, 2 blocks, downsample"),
    ("bottleneck", 1, 64, "layer1", "maxpool", "Bottleneck, from the stem, stride-1 downsample"),
    ("bottleneck", 4, 8, "layer2", "layer1", "grouped (ResNeXt) Bottleneck, 2 blocks, downsample"),
    ("bottleneck", 4, 8, "layer3.0", "layer2.0", "grouped, 2 blocks, identity then downsample"),
]


def _zennit_rule(name: str):
    from zennit import rules

    return {
        "epsilon": rules.Epsilon,
        "zplus": rules.ZPlus,
        "alpha2beta1": lambda: rules.AlphaBeta(alpha=2.0, beta=1.0),
        "gamma": rules.Gamma,
    }[name]()


def zennit_circuits(model, x, layer, upstream, neurons, rule, exact_bn=True, eps=1e-12, canonizer=None,
                    layer_map=()):
    """The circuit zennit-crp's CondAttribution records at the upstream layer, from zennit itself.

    The segment (a deep copy; canonizers change modules) runs under zennit's ``ResNetCanonizer``
    and a composite with ``rule`` on every ``Conv2d`` and zennit's base layer map (ReLU and
    BatchNorm pass, the residual ``Sum`` splits in proportion); the initial relevance is
    ``clamp(a_k, 0)`` in channel k at the target, and the relevance arriving at the upstream
    activation is summed over space and L1-normalised. zennit's merged BatchNorm keeps its ``eps``
    (so each computes ``x / sqrt(1 + eps)``); ``exact_bn`` sets it to 0 after merging. ``canonizer``
    replaces the ``ResNetCanonizer`` (timm blocks: :func:`timm_canonizer`), ``layer_map`` comes first
    in the composite's layer map.
    """
    from zennit.attribution import Gradient
    from zennit.canonizers import SequentialMergeBatchNorm
    from zennit.composites import LayerMapComposite, layer_map_base
    from zennit.core import Composite
    from zennit.torchvision import ResNetCanonizer
    from zennit.types import Convolution

    model = copy.deepcopy(model)
    a_up = _output_of(model, upstream, x)
    seg = nn.Sequential(*_segment(model, upstream, layer))
    canonizer = ResNetCanonizer() if canonizer is None else canonizer
    if rule == "gradient":
        composite = Composite(canonizers=[canonizer])
    else:
        layer_map = [*layer_map, *layer_map_base(), (Convolution, _zennit_rule(rule))]
        composite = LayerMapComposite(layer_map=layer_map, canonizers=[canonizer])
    assert any(isinstance(c, SequentialMergeBatchNorm) for c in canonizer.canonizers)
    out = []
    for k in neurons:
        def init(o, k=k):
            t = torch.zeros_like(o)
            t[:, k] = o[:, k].clamp(min=0)
            return t

        bns = [m for m in seg.modules() if isinstance(m, nn.BatchNorm2d)]
        kept = [m.eps for m in bns]
        with Gradient(seg, composite) as attributor:
            if exact_bn:  # after merging: the neutralised BatchNorm becomes the identity
                for m in bns:
                    m.eps = 0.0
            _, rel = attributor(a_up, init)
        for m, e in zip(bns, kept):  # the next merge uses the model's eps again
            m.eps = e
        r = (rel * a_up if rule == "gradient" else rel).sum(dim=(2, 3)).detach()
        out.append(r / (r.abs().sum(-1, keepdim=True) + eps))
    return torch.stack(out, dim=1)


@pytest.fixture(scope="module")
def models():
    return {
        (block, groups, width): tiny_resnet(block, seed=3, dtype=torch.float64, groups=groups, width=width)
        for block, groups, width, *_ in CASES
    }


@pytest.mark.parametrize("rule", ["gradient", *LRP_RULES])
@pytest.mark.parametrize("block,groups,width,layer,upstream,what", CASES)
def test_rule_equals_zennit(models, rule, block, groups, width, layer, upstream, what):
    model = models[(block, groups, width)]
    before = copy.deepcopy(model.state_dict())
    x = torch.rand(2, 3, 37, 45, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    neurons = [0, 5, 17]
    ours = purenn.circuit_relevance(model, x, layer, neurons, upstream=upstream, rule=rule)
    ref = zennit_circuits(model, x, layer, upstream, neurons, rule)
    assert ref.abs().sum() > 0 and torch.isfinite(ref).all()
    torch.testing.assert_close(ours, ref, rtol=1e-7, atol=1e-10)
    # the caller's model is untouched
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


@pytest.mark.parametrize("rule", LRP_RULES)
def test_zennit_kept_bn_eps_is_a_small_difference(models, rule):
    """zennit as it is (merged BatchNorm keeps eps): off by ~1e-5 relative, not more."""
    model = models[("bottleneck", 1, 64)]
    x = torch.rand(2, 3, 37, 45, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    ours = purenn.circuit_relevance(model, x, "layer2", [0, 5], upstream="layer1", rule=rule)
    ref = zennit_circuits(model, x, "layer2", "layer1", [0, 5], rule, exact_bn=False)
    diff = (ours - ref).abs().max()
    assert 0 < diff < 1e-3 * ref.abs().max()


def test_rules_differ_from_each_other(models):
    """The rules are not the same function under other names."""
    model = models[("basic", 1, 64)]
    x = torch.rand(2, 3, 37, 45, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    rs = {r: purenn.circuit_relevance(model, x, "layer2", [1, 2], upstream="layer1", rule=r) for r in RULES}
    names = list(rs)
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            assert (rs[a] - rs[b]).abs().max() > 1e-4, (a, b)


@pytest.mark.parametrize("rule", ["gradient", *LRP_RULES])
def test_dead_neuron_gives_zeros_not_nan(rule):
    model = tiny_resnet("basic", seed=0)
    with torch.no_grad():  # channel 3 of layer2.1 never fires: its output is relu(negative)
        blk = model.layer2[1]
        blk.bn2.weight[3] = 0.0
        blk.bn2.bias[3] = -1e4
    x = torch.rand(3, 3, 32, 32)
    r = purenn.circuit_relevance(model, x, "layer2.1", [3, 4], upstream="layer2.0", rule=rule)
    assert torch.isfinite(r).all()
    assert torch.equal(r[:, 0], torch.zeros_like(r[:, 0]))
    assert r[:, 1].abs().sum() > 0
    zero = purenn.circuit_relevance(model, torch.zeros(2, 3, 32, 32), "layer2", [0, 1], rule=rule)
    assert torch.isfinite(zero).all()


def test_rule_names_and_objects():
    assert get_rule("gamma") == Gamma() and get_rule(Epsilon(0.5)).epsilon == 0.5
    with pytest.raises(ConfigError, match="alpha2beta1"):
        get_rule("lrp")
    with pytest.raises(ConfigError):
        AlphaBeta(alpha=1.0, beta=1.0)
    assert rule_from_config(Epsilon(0.5).config()) == Epsilon(0.5)
    assert rule_from_config("zplus").config() == "zplus"
    with pytest.raises(ConfigError):
        rule_from_config({"name": "epsilon", "eps": 1})
    model = tiny_resnet("basic")
    with pytest.raises(ConfigError, match="unknown relevance rule"):
        purenn.circuit_relevance(model, torch.rand(1, 3, 32, 32), "layer4", [0], rule="lrp")


def test_rule_parameter_is_used(models):
    model = models[("basic", 1, 64)]
    x = torch.rand(2, 3, 37, 45, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    a = purenn.circuit_relevance(model, x, "layer2", [1], upstream="layer1", rule=Epsilon(epsilon=1.0))
    b = purenn.circuit_relevance(model, x, "layer2", [1], upstream="layer1", rule="epsilon")
    assert (a - b).abs().max() > 1e-4


def test_unknown_rule_in_file(tmp_path):
    from safetensors import safe_open
    from safetensors.torch import save_file

    model = tiny_resnet("basic")
    data = torch.rand(24, 3, 32, 32)
    pm = purenn.purify_model(model, ["layer4"], data, n_refs=6, neurons={"layer4": [0, 1]}, rule="zplus",
                             progress=False)
    path = pm.save(tmp_path / "m.safetensors")
    pm2 = purenn.load_purified(path)
    assert pm2.pure_layer("layer4").rule == get_rule("zplus")
    x = data[:5]
    assert torch.equal(pm2.gates(x)["layer4"], pm.gates(x)["layer4"])
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    config = json.loads(meta["purenn"])
    assert config["layers"][0]["config"]["rule"] == "zplus"
    config["layers"][0]["config"]["rule"] = "lrp"
    meta["purenn"] = json.dumps(config)
    save_file(tensors, str(tmp_path / "bad.safetensors"), metadata=meta)
    with pytest.raises(FileFormatError, match="'rule' is 'lrp'; it must be one of 'gradient', 'epsilon'"):
        purenn.load_purified(tmp_path / "bad.safetensors", verify=False)
    config["layers"][0]["config"]["rule"] = {"name": "epsilon", "epsilon": 0.5}  # a parametrised rule loads
    meta["purenn"] = json.dumps(config)
    save_file(tensors, str(tmp_path / "eps.safetensors"), metadata=meta)
    assert purenn.load_purified(tmp_path / "eps.safetensors", verify=False).pure_layer("layer4").rule == Epsilon(0.5)


def _nearest(r, pl):
    d = ((r[:, :, None, :].double() - pl.centroids[None].double()) ** 2).sum(-1)
    valid = torch.arange(d.shape[-1])[None] < pl.n_clusters[:, None]
    return torch.where(valid[None], d, torch.full_like(d, float("inf"))).argmin(-1)


@pytest.mark.parametrize("rule", ["gamma", pytest.param("epsilon", marks=pytest.mark.slow)])
def test_onnx_runtime_gates_equal_pytorch_under_an_lrp_rule(tmp_path, rule):
    import onnxruntime as ort

    model = tiny_resnet("bottleneck", seed=1)
    data = torch.rand(40, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    neurons = {"layer4": list(range(0, 2048, 128)), "layer2.1": list(range(0, 512, 64))}
    pm = purenn.purify_model(model, ["layer4", "layer2.1"], data, n_refs=8, neurons=neurons, rule=rule,
                             progress=False)
    report = purenn.export_onnx(pm, tmp_path / "m.onnx", input_shape=(3, 32, 32))
    assert report.ok and all(v == 1.0 for v in report.gate_agreement.values())
    session = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    meta = json.loads(session.get_modelmeta().custom_metadata_map["purenn"])
    assert [e["rule"] for e in meta["layers"]] == [rule, rule]
    x = torch.rand(16, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    out = dict(zip([o.name for o in session.get_outputs()], session.run(None, {"input": x.numpy()})))
    gates = pm.gates(x)
    for layer in pm.layers:
        pl = pm.pure_layer(layer)
        assert torch.equal(torch.from_numpy(out[f"gate.{layer}"]), gates[layer])
        # the gate is the rule's: the public relevance under the rule gives it, the gradient's differs
        r = purenn.circuit_relevance(model, x, layer, pl.neurons.tolist(), pl.upstream, skip_aware=pl.skip_aware,
                                     rule=rule)
        assert torch.equal(_nearest(r, pl), gates[layer])
    r = purenn.circuit_relevance(model, x, "layer4", pm.pure_layer("layer4").neurons.tolist(), "layer3", rule=rule)
    r_grad = purenn.circuit_relevance(model, x, "layer4", pm.pure_layer("layer4").neurons.tolist(), "layer3",
                                      rule="gradient")
    if rule == "gamma":  # (epsilon is close to gradient x input where layer4 is 1x1, as here)
        assert (r_grad - r).abs().max() > 1e-3
        assert not torch.equal(_nearest(r_grad, pm.pure_layer("layer4")), gates["layer4"])


def test_cli_purify_rule(tmp_path, capsys):
    import numpy as np
    from PIL import Image

    from purenn.cli import app as cli

    rng = np.random.default_rng(0)
    for c in range(2):
        (tmp_path / "images" / f"c{c}").mkdir(parents=True)
        for i in range(4):
            img = Image.fromarray((rng.random((32, 32, 3)) * 200).astype(np.uint8))
            img.save(tmp_path / "images" / f"c{c}" / f"{i}.png")
    torch.save(tiny_resnet("basic").state_dict(), tmp_path / "tiny.pt")
    out = tmp_path / "pure.safetensors"
    argv = ["purify", "resnet18", "-c", tmp_path / "tiny.pt", "--blocks", "1,2,1,2", "--data", tmp_path / "images",
            "--image-size", "32", "--channels", "layer4:0,1", "--n-refs", "3", "--rule", "alpha2beta1", "-o", out, "-q"]
    assert cli.main([str(a) for a in argv]) == 0
    capsys.readouterr()
    assert purenn.load_purified(out).pure_layer("layer4").rule == AlphaBeta()
    assert cli.main(["inspect", str(out), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["layers"][0]["rule"] == "alpha2beta1"
    assert cli.main(["inspect", str(out)]) == 0
    assert "alpha2beta1" in capsys.readouterr().out
    assert cli.main([str(a) for a in argv[:-5]] + ["--rule", "lrp", "-o", str(out)]) == 2
    assert "invalid choice: 'lrp'" in capsys.readouterr().err


def test_purify_concept_centroids_are_mass_weighted_zennit_circuits():
    from purenn.fit.concept import purify_concept

    model = tiny_resnet(seed=3)
    clean = torch.rand(6, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    stamped = clean.clone()
    stamped[..., 1:6, 1:6] = 3.0
    chans = [1, 4]
    pm = purify_concept(model, "layer4", stamped, clean, neurons={"layer4": chans}, rest_clusters=1, rule="zplus",
                        gate="circuit")
    pl = pm.pure_layer("layer4")
    assert pl.rule == get_rule("zplus")
    m64 = copy.deepcopy(model).double()
    for group, cluster in ((clean, 0), (stamped, 1)):
        r = zennit_circuits(m64, group.double(), "layer4", "layer3", chans, "zplus")
        a = _output_of(m64, "layer4", group.double())[:, chans].clamp(min=0).sum(dim=(2, 3))
        expect = (r * a[:, :, None]).sum(0) / a.sum(0)[:, None]
        torch.testing.assert_close(pl.centroids[:, cluster].double(), expect, rtol=1e-4, atol=1e-6)


def test_timm_resnet18_takes_the_rules_as_torchvision_does():
    """A timm resnet18 holds torchvision's state_dict layout: under every rule its relevance equals the
    torchvision model's with the same weights (which the tests above hold against zennit)."""
    timm = pytest.importorskip("timm")
    import torchvision

    from conftest import calibrate_bn

    torch.manual_seed(0)
    tm = timm.create_model("resnet18", pretrained=False, num_classes=3)
    tm = calibrate_bn(tm, torch.rand(8, 3, 32, 32)).double()
    tv = torchvision.models.resnet18(num_classes=3).double().eval()
    tv.load_state_dict(tm.state_dict())
    x = torch.rand(2, 3, 40, 40, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    for rule in LRP_RULES:
        a = purenn.circuit_relevance(tm, x, "layer3", [0, 7], rule=rule)
        b = purenn.circuit_relevance(tv, x, "layer3", [0, 7], rule=rule)
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


# ------------------------------------------------------------------ timm blocks against zennit
class ConstantGate(nn.Module):
    """``y = x * gate`` with ``gate`` a detached tensor set right before each call: a constant to zennit."""

    def forward(self, x):
        return x * self.gate


def timm_canonizer():
    """zennit's ``ResNetCanonizer`` for timm blocks: ``SequentialMergeBatchNorm`` (timm registers each
    convolution right before its BatchNorm, the downsample's too), timm's BasicBlock/Bottleneck forward
    with the residual sum through a ``zennit.layer.Sum`` module (zennit's ``Norm`` rule splits it), and
    SE/ECA forwards that multiply by their gate *detached*, through a :class:`ConstantGate` module.

    Detaching is the modelling choice purenn documents for LRP rules: the gate is a constant, all
    relevance goes through the signal path and none into the gate branch ("signal takes all", Arras
    et al. 2017 for LSTM gates, Ali et al. 2022 for attention), so relevance is conserved. zennit
    passes relevance from hook to hook as the gradient, so a plain ``x * gate.detach()`` would scale
    it by the gate; the multiplication is therefore a module, which the composite gives zennit's
    ``Pass`` rule (``R_x = R_y``). An ``AvgPool2d`` in a downsample gets zennit's ``Norm`` rule from
    ``layer_map_base``, as in zennit's own composites.
    """
    import timm
    from zennit.canonizers import AttributeCanonizer, CompositeCanonizer, SequentialMergeBatchNorm
    from zennit.layer import Sum

    r = timm.models.resnet

    def bottleneck(self, x):
        shortcut = x
        x = self.act1(self.bn1(self.conv1(x)))
        x = self.aa(self.act2(self.drop_block(self.bn2(self.conv2(x)))))
        x = self.bn3(self.conv3(x))
        if self.se is not None:
            x = self.se(x)
        if self.downsample is not None:
            shortcut = self.downsample(shortcut)
        return self.act3(self.canonizer_sum(torch.stack([shortcut, x], dim=-1)))

    def basic(self, x):
        shortcut = x
        x = self.aa(self.act1(self.drop_block(self.bn1(self.conv1(x)))))
        x = self.bn2(self.conv2(x))
        if self.se is not None:
            x = self.se(x)
        if self.downsample is not None:
            shortcut = self.downsample(shortcut)
        return self.act2(self.canonizer_sum(torch.stack([shortcut, x], dim=-1)))

    def se(self, x):
        s = self.gate(self.fc2(self.act(self.bn(self.fc1(x.mean((2, 3), keepdim=True))))))
        self.canonizer_gate.gate = s.detach()
        return self.canonizer_gate(x)

    def eca(self, x):
        s = self.gate(self.conv(x.mean((2, 3)).view(x.shape[0], 1, -1))).view(x.shape[0], -1, 1, 1)
        self.canonizer_gate.gate = s.detach()
        return self.canonizer_gate(x)

    def attributes(name, module):
        for cls, forward, extra, new in ((r.Bottleneck, bottleneck, "canonizer_sum", Sum),
                                         (r.BasicBlock, basic, "canonizer_sum", Sum),
                                         (timm.layers.SEModule, se, "canonizer_gate", ConstantGate),
                                         (timm.layers.EcaModule, eca, "canonizer_gate", ConstantGate)):
            if type(module) is cls:
                return {"forward": forward.__get__(module), extra: new()}
        return None

    return CompositeCanonizer((SequentialMergeBatchNorm(), AttributeCanonizer(attributes)))


def timm_zennit_circuits(model, x, layer, upstream, neurons, rule):
    from zennit.rules import Pass

    return zennit_circuits(model, x, layer, upstream, neurons, rule, canonizer=timm_canonizer(),
                           layer_map=[(ConstantGate, Pass())])


def timm_small(block: str, seed: int = 0, dtype=torch.float64, **kwargs) -> nn.Module:
    """A small timm ResNet with random BatchNorm affine parameters (timm zero-initialises each
    block's last BatchNorm) and statistics calibrated on random images."""
    timm = pytest.importorskip("timm")
    from conftest import calibrate_bn, randomize_bn_affine

    torch.manual_seed(seed)
    r = timm.models.resnet
    cls, channels = (r.BasicBlock, (16, 32, 48, 64)) if block == "basic" else (r.Bottleneck, (8, 16, 24, 32))
    model = r.ResNet(cls, [1, 2, 1, 1], num_classes=3, channels=channels, stem_width=16, **kwargs)
    g = torch.Generator().manual_seed(seed + 1)
    randomize_bn_affine(model, g)
    return calibrate_bn(model, torch.rand(8, 3, 37, 45, generator=g)).to(dtype)


#: (block, timm ResNet arguments, what it covers)
TIMM_CASES = [
    ("basic", {}, "plain BasicBlock (resnet18/34)"),
    ("bottleneck", {}, "plain Bottleneck (resnet26/50)"),
    ("basic", {"stem_type": "deep", "avg_down": True}, "BasicBlock, average-pool downsample (resnet18d)"),
    ("bottleneck", {"stem_type": "deep", "avg_down": True}, "Bottleneck, average-pool downsample (resnet26d/50d)"),
    ("basic", {"block_args": {"attn_layer": "se"}}, "SE BasicBlock (seresnet18)"),
    ("bottleneck", {"block_args": {"attn_layer": "se"}}, "SE Bottleneck (seresnet50)"),
    ("bottleneck", {"stem_type": "deep", "avg_down": True, "block_args": {"attn_layer": "eca"}},
     "ECA Bottleneck, average-pool downsample (ecaresnet50d)"),
    ("bottleneck", {"stem_type": "deep", "avg_down": True, "block_args": {"attn_layer": "se"}, "cardinality": 4,
                    "base_width": 8}, "grouped SE Bottleneck, average-pool downsample (seresnext26d)"),
]
#: (target, upstream): from the stem (stride-1 downsample, no pooling), 2 blocks with a strided
#: downsample and an identity skip, 1 block from odd sizes 5x6 (ceil-mode pooling windows)
TIMM_TARGETS = [("layer1", "maxpool"), ("layer2", "layer1"), ("layer3", "layer2")]


@pytest.fixture(scope="module")
def timm_models():
    return [timm_small(block, seed=i, **kwargs) for i, (block, kwargs, _) in enumerate(TIMM_CASES)]


@pytest.mark.parametrize("rule", LRP_RULES)
@pytest.mark.parametrize("case", range(len(TIMM_CASES)), ids=[what for *_, what in TIMM_CASES])
def test_rule_equals_zennit_on_timm_blocks(timm_models, rule, case):
    model = timm_models[case]
    before = copy.deepcopy(model.state_dict())
    x = torch.rand(2, 3, 37, 45, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    for layer, upstream in TIMM_TARGETS:
        neurons = [0, 5, 11]
        ours = purenn.circuit_relevance(model, x, layer, neurons, upstream=upstream, rule=rule)
        ref = timm_zennit_circuits(model, x, layer, upstream, neurons, rule)
        assert ref.abs().sum() > 0 and torch.isfinite(ref).all()
        torch.testing.assert_close(ours, ref, rtol=1e-9, atol=1e-12)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


@pytest.mark.parametrize("case", [5, 6], ids=["SE", "ECA and average-pool downsample"])
def test_lrp_rule_purifies_gates_and_exports_timm_blocks(tmp_path, case):
    """rule="epsilon" on small timm SE and ECA/-d models: same logits, the gates are the nearest centroids
    of the rule's circuits, and ONNX Runtime gives the same gates as PyTorch."""
    import onnxruntime as ort

    block, kwargs, _ = TIMM_CASES[case]
    model = timm_small(block, seed=case, dtype=torch.float32, **kwargs)
    data = torch.rand(24, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    # layer2: a downsample block (pooled for ECA) below the target block; layer3: the target's own downsample
    neurons = {"layer2": [0, 3, 7, 12], "layer3": [1, 4, 9]}
    pm = purenn.purify_model(model, ["layer2", "layer3"], data, n_refs=6, neurons=neurons, rule="epsilon",
                             progress=False)
    x = torch.rand(8, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert torch.equal(pm(x), model(x))
        gates = pm.gates(x)
    for layer in pm.layers:
        pl = pm.pure_layer(layer)
        r = purenn.circuit_relevance(model, x, layer, pl.neurons.tolist(), pl.upstream, rule="epsilon")
        assert torch.equal(_nearest(r, pl), gates[layer])
    report = purenn.export_onnx(pm, tmp_path / "m.onnx", input_shape=(3, 32, 32))
    assert report.ok and all(v == 1.0 for v in report.gate_agreement.values())
    session = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    out = dict(zip([o.name for o in session.get_outputs()], session.run(None, {"input": x.numpy()})))
    for layer in pm.layers:
        assert torch.equal(torch.from_numpy(out[f"gate.{layer}"]), gates[layer])


def test_lrp_rules_refuse_other_block_parts_by_name():
    """The LRP steps hold for SE, ECA and the average pooling; any other attention or pooling a block
    description might carry is refused by name, not computed wrongly (the gradient takes it)."""
    from dataclasses import replace

    from purenn.attribution.rules import block_factors

    class OtherGate:
        pass

    spec = purenn.ResNetSpec(timm_small("basic", block_args={"attn_layer": "se"}))
    with torch.no_grad():
        _, recs = spec.run_until(torch.rand(1, 3, 32, 32, dtype=torch.float64), set(), {1})
    for part in ("attn", "down_pool"):
        blk = replace(spec.blocks[0], **{part: OtherGate()})
        with pytest.raises(ConfigError, match="'gamma' rule has no LRP step for the OtherGate of block layer1.0"):
            block_factors(Gamma(), blk, recs[1], torch.float64)
        assert block_factors(get_rule("gradient"), blk, recs[1], torch.float64)["pool"] is None
