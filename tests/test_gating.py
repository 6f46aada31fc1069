import numpy as np
import pytest
import torch

import purenn
from purenn.arch import ResNetSpec
from purenn.errors import ConfigError
from purenn.fit.cluster import CircuitKMeans, contrast_score
from purenn.model.gates import GATES, combine_features, gate_features, nearest_centroid

#: the gates purify_model offers (the joint circuit is purify_concept's: tests/test_joint_gate.py)
PURIFY_GATES = tuple(g for g in GATES if g != "joint-circuit")


def _acts(model, x, up="layer3", layer="layer4"):
    spec = ResNetSpec(model)
    pu, pl = spec.position(up), spec.position(layer)
    acts, _ = spec.run_until(x, {pu, pl})
    return acts[pu], acts[pl]


@pytest.fixture(scope="module")
def gated(planted_model):
    model, train, _ = planted_model
    chans = list(range(0, 512, 64))
    return {
        g: purenn.purify_model(model, ["layer4"], train, n_refs=16, neurons={"layer4": chans}, gate=g, progress=False)
        for g in PURIFY_GATES
    }


@pytest.mark.parametrize("gate", PURIFY_GATES)
def test_gates_keep_logits_and_match_their_definition(gated, planted_model, gate):
    model, train, test = planted_model
    pm = gated[gate]
    pl = pm.pure_layer("layer4")
    assert pl.gate == gate and pl.config()["gate"] == gate
    x = test.images[:24]
    with torch.no_grad():
        torch.testing.assert_close(pm(x), model(x), rtol=1e-5, atol=1e-6)
        g = pm.gates(x)["layer4"]
        a_up, a = _acts(model, x)
        if gate in ("activation", "upstream", "map"):
            feat = gate_features(gate, a_up, a, pl.neurons)
        else:
            feat = purenn.circuit_relevance(model, x, "layer4", pl.neurons.tolist())
            if gate == "circuit+map":
                feat = combine_features(feat, gate_features("map", a_up, a, pl.neurons), pl.gate_weight)
        expect = nearest_centroid(feat, pl.centroids, pl.n_clusters)
    assert (g == expect).float().mean() >= 0.99  # up to float ties between two formulas
    # on its own reference samples the gate reproduces the k-means labels it was fitted with
    with torch.no_grad():
        agree = np.mean([
            (pm.gates(train.images[pl.ref_indices[k]], neurons={"layer4": [c]})["layer4"][:, 0] == pl.ref_clusters[k])
            .float().mean().item()
            for k, c in enumerate(pl.neurons.tolist())
        ])
    assert agree >= 0.97


def test_activation_gate_centroids_live_in_target_space(gated):
    assert gated["activation"].pure_layer("layer4").centroids.shape[-1] == 512
    assert gated["upstream"].pure_layer("layer4").centroids.shape[-1] == 256
    assert gated["circuit"].pure_layer("layer4").centroids.shape[-1] == 256
    assert gated["map"].pure_layer("layer4").centroids.shape[-1] == 1  # 16x16 input -> 1x1 layer4 map
    assert gated["circuit+map"].pure_layer("layer4").centroids.shape[-1] == 257


@pytest.mark.parametrize("gate", ["activation", "circuit+map"])
def test_gate_survives_save_load(gated, planted_model, tmp_path, gate):
    _, _, test = planted_model
    pm = gated[gate]
    path = pm.save(tmp_path / "pm.safetensors")
    pm2 = purenn.load_purified(path)
    pl2 = pm2.pure_layer("layer4")
    assert pl2.gate == gate and pl2.gate_weight == pm.pure_layer("layer4").gate_weight
    x = test.images[:16]
    with torch.no_grad():
        assert torch.equal(pm2.gates(x)["layer4"], pm.gates(x)["layer4"])


def test_activation_gate_exports_to_onnx(gated, tmp_path):
    pytest.importorskip("onnxruntime")
    report = purenn.export_onnx(gated["activation"], tmp_path / "act.onnx", input_shape=(1, 16, 16))
    assert report.ok


def test_combine_features():
    c = torch.tensor([[3.0, 4.0], [0.0, 0.0]])
    e = torch.tensor([[0.0, 5.0], [1.0, 0.0]])
    out = combine_features(c, e, 2.0)
    torch.testing.assert_close(out, torch.tensor([[0.6, 0.8, 0.0, 2.0], [0.0, 0.0, 2.0, 0.0]]))


def test_contrast_score():
    lab = np.array([0] * 10 + [1] * 10)
    assert contrast_score(np.array([[1.0, 0], [0, 1]]), lab) == pytest.approx(1.0)
    assert contrast_score(np.array([[1.0, 0], [2, 0]]), lab) == pytest.approx(0.0, abs=1e-9)  # parallel centroids
    lopsided = np.array([0] * 18 + [1] * 2)
    assert contrast_score(np.array([[1.0, 0], [0, 1]]), lopsided) == pytest.approx(0.2)
    assert contrast_score(np.array([[1.0, 0], [0, 1]]), np.zeros(20, int)) == 0.0
    rng = np.random.default_rng(0)
    x = np.stack([
        np.concatenate([rng.normal(0, 0.05, (20, 4)) + [1, 0, 0, 0], rng.normal(0, 0.05, (20, 4)) + [0, 1, 0, 0]]),
        rng.normal(0, 0.05, (40, 4)) + [1, 1, 0, 0],
    ])
    km = CircuitKMeans(2, score="contrast").fit(x)
    assert km.scores_[0] > 0.9 > 0.1 > km.scores_[1]
    with pytest.raises(ConfigError, match="score"):
        CircuitKMeans(2, score="entropy").fit(x)


def test_gate_validation(planted_model):
    model, train, _ = planted_model
    kw = {"n_refs": 6, "progress": False, "neurons": {"layer4": [0]}}
    with pytest.raises(ConfigError, match="gate must be one of"):
        purenn.purify_model(model, ["layer4"], train, gate="gradient", **kw)
    with pytest.raises(ConfigError, match="gate_weight"):
        purenn.purify_model(model, ["layer4"], train, gate="circuit+map", gate_weight=-1, **kw)
    with pytest.raises(ConfigError, match="score must be"):
        purenn.purify_model(model, ["layer4"], train, score="gap", **kw)
    pm = purenn.purify_model(model, ["layer4"], train, score="contrast", **kw)
    assert 0 <= float(pm.pure_layer("layer4").scores[0]) <= 2
