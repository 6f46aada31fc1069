"""The joint-circuit gate: one relevance pass per input for all of a layer's purified neurons.

Invariants: the joint unit's relevance is the sum of the neurons' own circuits (every rule is
linear in the relevance it carries) and equals autograd's for the joint unit; the gate is the
nearest centroid of that one normalised vector; purify_concept with it keeps the logits until the
concept parts are suppressed; save/load and ONNX Runtime agree with PyTorch; purify_model refuses it.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import purenn
from purenn.arch import ResNetSpec
from purenn.attribution.relevance import grid_relevance, joint_relevance
from purenn.attribution.rules import RULES
from purenn.errors import ConfigError
from purenn.fit.concept import concept_virtual_indices, purify_concept
from purenn.model.gates import joint_circuit

from conftest import _output_of, _segment, calibrate_bn, randomize_bn_affine, tiny_resnet


def _stamp(x: torch.Tensor) -> torch.Tensor:
    x = x.clone()
    x[..., 1:6, 1:6] = 3.0
    return x


@pytest.fixture(scope="module")
def case():
    model = tiny_resnet(seed=4)
    g = torch.Generator().manual_seed(6)
    clean = torch.rand(16, 3, 32, 32, generator=g)
    return model, clean, _stamp(clean)


def _recorded(spec: ResNetSpec, x: torch.Tensor, upstream: str, layer: str):
    up, pos = spec.position(upstream), spec.position(layer)
    acts, recs = spec.run_until(x, {up, pos}, set(range(up + 1, pos + 1)))
    return spec.segment(up, pos), [recs[j] for j in range(up + 1, pos + 1)], acts[up], acts[pos]


@pytest.mark.parametrize("rule", list(RULES))
@pytest.mark.parametrize("block, upstream, layer", [("basic", "layer2", "layer3"), ("basic", "layer4.0", "layer4"),
                                                    ("bottleneck", "layer3", "layer4")])
def test_joint_relevance_is_the_sum_of_the_neurons_circuits(rule, block, upstream, layer):
    model = tiny_resnet(block, seed=1).double()
    spec = ResNetSpec(model)
    x = torch.rand(3, 3, 32, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    blocks, recs, a_up, a_t = _recorded(spec, x, upstream, layer)
    ks = torch.tensor([0, 3, 4, 17, a_t.shape[1] - 1])
    joint = joint_relevance(blocks, recs, a_up, a_t, ks, rule)
    each = grid_relevance(blocks, recs, a_up, a_t, ks, rule=rule)
    assert joint.shape == (3, a_up.shape[1])
    torch.testing.assert_close(joint, each.sum(dim=1), rtol=1e-9, atol=1e-12)
    assert joint.abs().sum() > 0


@pytest.mark.parametrize("rule", ["gradient", "epsilon"])
def test_joint_relevance_through_squeeze_excite_and_grouped_convs(rule):
    """timm's SE blocks (the attention's pooled path reaches every channel) and grouped convolutions
    take the dense first step: still the sum of the neurons' circuits."""
    timm = pytest.importorskip("timm", reason="timm is not installed (pip install 'purenn[timm]')")
    torch.manual_seed(0)
    model = timm.models.resnet.ResNet(block=timm.models.resnet.Bottleneck, layers=[1, 1, 2, 1], cardinality=8,
                                      base_width=8, block_args={"attn_layer": "se"}, channels=(16, 32, 64, 128),
                                      num_classes=3)
    randomize_bn_affine(model, torch.Generator().manual_seed(2))  # timm zero-initialises each block's last BN
    model = calibrate_bn(model, torch.rand(8, 3, 40, 40)).double()
    spec = ResNetSpec(model)
    assert any(b.attn is not None for b in spec.blocks)
    x = torch.rand(2, 3, 40, 40, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    for upstream, layer in (("layer2", "layer3"), ("layer3", "layer4")):
        blocks, recs, a_up, a_t = _recorded(spec, x, upstream, layer)
        ks = torch.tensor([1, 2, 7, a_t.shape[1] - 2])
        joint = joint_relevance(blocks, recs, a_up, a_t, ks, rule)
        torch.testing.assert_close(joint, grid_relevance(blocks, recs, a_up, a_t, ks, rule=rule).sum(dim=1),
                                   rtol=1e-9, atol=1e-12)
        assert joint.abs().sum() > 0


def test_joint_relevance_equals_autograd_of_the_joint_unit():
    model = tiny_resnet(seed=2).double()
    x = torch.rand(4, 3, 32, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    ks = [1, 5, 6, 40]
    a_up = _output_of(model, "layer3", x).requires_grad_(True)
    h = a_up
    for blk in _segment(model, "layer3", "layer4"):
        h = blk(h)
    start = torch.zeros_like(h)
    start[:, ks] = h[:, ks].detach().clamp(min=0)
    (g,) = torch.autograd.grad(h, a_up, start)
    expect = (g * a_up).sum(dim=(2, 3)).detach()
    spec = ResNetSpec(model)
    blocks, recs, up, a_t = _recorded(spec, x, "layer3", "layer4")
    torch.testing.assert_close(joint_relevance(blocks, recs, up, a_t, torch.tensor(ks)), expect, rtol=1e-9, atol=1e-12)


def test_skip_aware_joint_features_leave_out_every_purified_neuron_s_own_channel():
    model = tiny_resnet(seed=2)
    spec = ResNetSpec(model)
    blocks, recs, a_up, a_t = _recorded(spec, torch.rand(2, 3, 32, 32), "layer4.0", "layer4")
    ks = torch.tensor([2, 9, 11])
    feat = joint_circuit(blocks, recs, a_up, a_t, ks, skip_aware=True)
    raw = joint_relevance(blocks, recs, a_up, a_t, ks)
    assert (feat[:, ks] == 0).all() and raw[:, ks].abs().sum() > 0
    raw[:, ks] = 0
    torch.testing.assert_close(feat, raw / raw.abs().sum(dim=-1, keepdim=True), rtol=1e-5, atol=1e-8)


def test_concept_split_with_the_joint_gate(case, tmp_path):
    model, clean, stamped = case
    pm = purify_concept(model, "layer4", stamped, clean, neurons=12, gate="joint-circuit")
    pl = pm.pure_layer("layer4")
    assert pl.gate == "joint-circuit" and pl.centroids.shape == (12, 4, pl.centroids.shape[-1])
    x = torch.cat([clean, stamped])
    assert torch.equal(pm(x), model(x))  # nothing suppressed: the original logits

    # the gate is the nearest centroid of one normalised vector: the sum of the neurons' raw circuits
    spec = ResNetSpec(model)
    blocks, recs, a_up, a_t = _recorded(spec, x, pl.upstream, "layer4")
    raw = grid_relevance(blocks, recs, a_up, a_t, pl.neurons).sum(dim=1)
    if pl.skip_aware:
        raw[:, pl.neurons] = 0
    feat = raw / (raw.abs().sum(dim=-1, keepdim=True) + 1e-12)
    dist = ((feat[:, None, None] - pl.centroids[None]) ** 2).sum(-1)
    expect = dist.argmin(-1)
    gates = pm.gates(x)["layer4"]
    sorted_d = dist.sort(dim=-1).values
    clear = (sorted_d[..., 1] - sorted_d[..., 0]) > 1e-6 * sorted_d[..., 1].clamp(min=1e-12)
    assert torch.equal(gates[clear], expect[clear]) and clear.float().mean() > 0.9
    last = pl.n_clusters - 1
    assert (gates[len(clean):] == last).float().mean() > (gates[: len(clean)] == last).float().mean()

    with pm.suppress("layer4", concept_virtual_indices(pm, "layer4")):
        out = pm(x)
        hit = (gates == last).any(dim=1)
        assert torch.equal(out[~hit], model(x)[~hit]) and not torch.equal(out[hit], model(x)[hit])
        path = tmp_path / "joint.safetensors"
        pm.save(path)
    pm2 = purenn.load_purified(path)
    assert pm2.pure_layer("layer4").gate == "joint-circuit"
    assert torch.equal(pm2.gates(x)["layer4"], gates) and torch.equal(pm2(x), out)


@pytest.mark.parametrize("outputs", [("logits",), ("logits", "pure", "gate")])
def test_joint_gate_onnx_runtime_parity(case, tmp_path, outputs):
    model, clean, stamped = case
    pm = purify_concept(model, "layer4", stamped, clean, neurons=6, gate="joint-circuit")
    pm.suppress("layer4", concept_virtual_indices(pm, "layer4")[::2])
    report = purenn.export_onnx(pm, tmp_path / "joint.onnx", input_shape=(3, 32, 32), outputs=outputs,
                                inputs=torch.cat([clean[:4], stamped[:4]]))
    assert report.ok, report
    import onnxruntime as ort

    sess = ort.InferenceSession(str(tmp_path / "joint.onnx"), providers=["CPUExecutionProvider"])
    x = torch.cat([clean[4:], stamped[4:]])
    got = sess.run(None, {"input": x.numpy()})
    np.testing.assert_allclose(got[0], pm(x).detach().numpy(), rtol=1e-4, atol=1e-4)
    if "gate" in outputs:
        names = [o.name for o in sess.get_outputs()]
        gate = got[names.index("gate.layer4")]
        assert (gate == pm.gates(x)["layer4"].numpy()).mean() > 0.95  # exact ties aside


def test_no_nan_for_a_dead_joint_unit():
    model = tiny_resnet(seed=2)
    spec = ResNetSpec(model)
    blocks, recs, a_up, a_t = _recorded(spec, torch.rand(2, 3, 32, 32), "layer4.0", "layer4")
    feat = joint_circuit(blocks, recs, a_up, torch.zeros_like(a_t), torch.tensor([0, 1]))
    assert torch.equal(feat, torch.zeros_like(feat))


def test_purify_model_refuses_the_joint_gate():
    model = tiny_resnet()
    with pytest.raises(ConfigError, match="purify_concept's"):
        purenn.purify_model(model, ["layer4"], torch.rand(8, 3, 32, 32), n_refs=4, gate="joint-circuit")
