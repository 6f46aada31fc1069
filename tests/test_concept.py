"""Concept-driven purification (purenn.fit.concept): channel ranking, centroids, gates, suppression."""

import copy

import pytest
import torch

import purenn
from purenn.errors import ConfigError, DataError, LayerError
from purenn.fit.concept import concept_gate_features, concept_virtual_indices, purify_concept, rank_concept_channels

from conftest import _output_of, autograd_relevance, tiny_resnet


def _stamp(x: torch.Tensor) -> torch.Tensor:
    x = x.clone()
    x[..., 1:6, 1:6] = 3.0
    return x


@pytest.fixture(scope="module")
def case():
    model = tiny_resnet(seed=3)
    g = torch.Generator().manual_seed(5)
    clean = torch.rand(12, 3, 32, 32, generator=g)
    return model, clean, _stamp(clean)


def test_rank_matches_mean_activation_difference(case):
    model, clean, stamped = case
    ranked = rank_concept_channels(model, "layer3", stamped, clean)
    by_hand = (_output_of(model, "layer3", stamped).mean(dim=(2, 3)).mean(0)
               - _output_of(model, "layer3", clean).mean(dim=(2, 3)).mean(0))
    torch.testing.assert_close(torch.from_numpy(ranked.effect).float(), by_hand, rtol=1e-5, atol=1e-6)
    assert ranked.channels == sorted(range(len(by_hand)), key=lambda c: (-ranked.effect[c], c))
    top = ranked.top(5)
    assert top == sorted(top) and len(top) == 5
    assert set(top) == set(ranked.channels[:5]) and all(ranked.effect[c] > 0 for c in top)


def test_centroids_are_mass_weighted_circuit_means(case):
    model, clean, stamped = case
    chans = rank_concept_channels(model, "layer4", stamped, clean).top(3)
    pm = purify_concept(model, "layer4", stamped, clean, neurons={"layer4": chans}, rest_clusters=1, gate="circuit")
    pl = pm.pure_layer("layer4")
    assert pl.neurons.tolist() == chans and pl.n_clusters.tolist() == [2, 2, 2]
    for group, cluster in ((clean, 0), (stamped, 1)):
        r = autograd_relevance(model.double(), group.double(), "layer4", "layer3", chans)  # (B, K, C_U)
        a = _output_of(model, "layer4", group.double())[:, chans].clamp(min=0).sum(dim=(2, 3))  # (B, K)
        model.float()
        expect = (r * a[:, :, None]).sum(0) / a.sum(0)[:, None]
        torch.testing.assert_close(pl.centroids[:, cluster].double(), expect, rtol=1e-4, atol=1e-6)
    assert int(pl.ref_counts.sum()) == 3 * (len(clean) + len(stamped))


def test_joint_centroids_are_mass_weighted_means_of_the_joint_circuit(case):
    """The default gate: every channel's centroids live on one vector per example, the L1-normalised
    sum of the chosen channels' own circuits, weighted by each channel's activation mass."""
    model, clean, stamped = case
    chans = rank_concept_channels(model, "layer4", stamped, clean).top(3)
    pm = purify_concept(model, "layer4", stamped, clean, neurons={"layer4": chans}, rest_clusters=1)
    pl = pm.pure_layer("layer4")
    assert pl.gate == "joint-circuit" and pl.n_clusters.tolist() == [2, 2, 2]
    for group, cluster in ((clean, 0), (stamped, 1)):
        m64 = copy.deepcopy(model).double()
        x = group.double()
        raw = _raw_joint(m64, x, chans)
        joint = raw / raw.abs().sum(-1, keepdim=True)
        a = _output_of(m64, "layer4", x)[:, chans].clamp(min=0).sum(dim=(2, 3))  # (B, K)
        expect = (joint[:, None] * a[:, :, None]).sum(0) / a.sum(0)[:, None]
        torch.testing.assert_close(pl.centroids[:, cluster].double(), expect, rtol=1e-4, atol=1e-6)


def _raw_joint(model, x, chans):
    """Autograd relevance of the joint unit: the gradient of sum_k e_k * clamp(a_k, 0) times a_up, summed."""
    a_up = _output_of(model, "layer3", x).requires_grad_(True)
    h = model.layer4(a_up)
    start = torch.zeros_like(h)
    start[:, chans] = h[:, chans].detach().clamp(min=0)
    (g,) = torch.autograd.grad(h, a_up, start)
    return (g * a_up).sum(dim=(2, 3)).detach()


def test_gate_separates_and_suppression_only_touches_concept_inputs(case):
    model, clean, stamped = case
    pm = purify_concept(model, "layer4", stamped, clean, neurons=8, rest_clusters=1)
    x = torch.cat([clean, stamped])
    assert torch.equal(pm(x), model(x))  # nothing suppressed: the original logits
    feats, _ = concept_gate_features(model, x, "layer4", pm.pure_layer("layer4").neurons.tolist())
    pl = pm.pure_layer("layer4")
    d = ((feats[:, :, None] - pl.centroids[None]) ** 2).sum(-1)
    gates = pm.gates(x)["layer4"]
    assert torch.equal(gates, d.argmin(-1))  # the gate is the nearest centroid of those features
    assert gates[len(clean):].float().mean() > gates[: len(clean)].float().mean()
    idx = concept_virtual_indices(pm, "layer4")
    assert len(idx) == 8 and all(pm.virtual_neurons[i].cluster == 1 for i in idx)
    with pm.suppress("layer4", idx):
        out = pm(x)
        untouched = (gates == 0).all(dim=1)  # inputs whose gates all chose the rest
        assert torch.equal(out[untouched], model(x)[untouched])
        assert not torch.allclose(out[~untouched], model(x)[~untouched])
    assert torch.equal(pm(x), model(x))


def test_two_layers_save_load_roundtrip(case, tmp_path):
    model, clean, stamped = case
    before = {k: v.clone() for k, v in model.state_dict().items()}
    pm = purify_concept(model, ["layer3", "layer4"], stamped, clean, neurons={"layer3": 4, "layer4": 6},
                        gate="circuit+map")
    assert pm.layers == ["layer3", "layer4"]
    pm.suppress("layer4", concept_virtual_indices(pm, "layer4"))
    pm.save(tmp_path / "c.safetensors")
    pm2 = purenn.load_purified(tmp_path / "c.safetensors", model=tiny_resnet(seed=99))
    x = torch.cat([clean, stamped])
    assert torch.equal(pm2(x), pm(x))
    assert torch.equal(pm2.gates(x)["layer3"], pm.gates(x)["layer3"])
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    # the scores are the concept's effect, and the file says so (inspect, report and figures label them)
    assert [pm2.pure_layer(n).score_kind for n in pm2.layers] == ["concept", "concept"]


def test_inspect_names_the_concept_effect(case, tmp_path, capsys):
    from purenn.cli import app as cli

    model, clean, stamped = case
    pm = purify_concept(model, "layer4", stamped, clean, neurons=3)
    pm.save(tmp_path / "c.safetensors")
    assert cli.main(["inspect", str(tmp_path / "c.safetensors")]) == 0
    out = capsys.readouterr().out
    assert "most polysemantic" not in out
    assert "score (layer4): the concept's effect on the neuron's activation mass" in out
    from purenn.analysis.report import _score_note

    assert "layer4: the concept&#x27;s effect" in _score_note(pm) and "polysemantic" not in _score_note(pm)


def test_bad_inputs(case):
    model, clean, stamped = case
    with pytest.raises(DataError, match="concept"):
        purify_concept(model, "layer4", None, clean)
    with pytest.raises(DataError, match="other holds no"):
        purify_concept(model, "layer4", stamped, clean[:0])
    with pytest.raises(LayerError, match="not being purified"):
        purify_concept(model, "layer4", stamped, clean, neurons={"layer3": 4})
    with pytest.raises(ConfigError, match="0..511"):
        purify_concept(model, "layer4", stamped, clean, neurons={"layer4": [512]})
    with pytest.raises(ConfigError, match="neurons"):
        purify_concept(model, "layer4", stamped, clean, neurons="many")
    with pytest.raises(ConfigError, match="move the model"):
        purify_concept(model, "layer4", stamped, clean, neurons=2, device="meta")
    with pytest.raises(LayerError):
        rank_concept_channels(model, "layer9", stamped, clean)
    with pytest.raises(DataError, match="no channel"):
        purify_concept(model, "layer4", clean, clean, neurons=4)  # no effect at all
    pm = purify_concept(model, "layer4", stamped, clean, neurons=2)
    with pytest.raises(ConfigError, match="unload"):
        purify_concept(pm, "layer4", stamped, clean)


def test_rank_keeps_the_callers_mode(case):
    model, clean, stamped = case
    model.train()
    try:
        rank_concept_channels(model, "layer4", stamped, clean)
        assert model.training and all(m.training for m in model.modules())
    finally:
        model.eval()


def test_shortcut_metrics_by_hand():
    from purenn.analysis.unlearn import shortcut_metrics

    class Fixed(torch.nn.Module):  # predicts the class stored in the image's first pixel
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))

        def forward(self, x):
            return torch.nn.functional.one_hot(x[:, 0, 0, 0].long(), 3).float() + self.w

    y = torch.tensor([0, 0, 1, 1, 2, 2])
    clean = torch.zeros(6, 1, 2, 2)
    clean[:, 0, 0, 0] = torch.tensor([0.0, 1, 1, 2, 2, 0])  # 3 of 6 right; 1 of 4 others -> class 0
    stamped = torch.zeros(6, 1, 2, 2)  # every stamped image -> class 0
    m = shortcut_metrics(Fixed(), clean, y, stamped, y, target=0)
    assert m == pytest.approx({"reliance": 1.0 - 0.25, "acc": 3 / 6, "acc_target": 0.5})
    with pytest.raises(DataError, match="other than"):
        shortcut_metrics(Fixed(), clean[:2], y[:2], stamped[:2], y[:2], target=0)
    with pytest.raises(ConfigError, match="target"):
        shortcut_metrics(Fixed(), clean, y, stamped, y, target=-1)


def test_shortcut_report_compares_with_whole_channels(case):
    from purenn.analysis.unlearn import shortcut_report

    model, clean, stamped = case
    y = model(clean).argmax(1)
    target = int(model(stamped).argmax(1).mode().values)
    pm = purify_concept(model, "layer4", stamped, clean, neurons=16)
    with pytest.raises(DataError, match="no suppressed"):
        shortcut_report(pm, clean, y, stamped, y, target)
    pm.suppress("layer4", concept_virtual_indices(pm, "layer4"))
    w = pm.pure_layer("layer4").merge_weight.clone()
    rep = shortcut_report(pm, clean, y, stamped, y, target)
    assert torch.equal(pm.pure_layer("layer4").merge_weight, w)  # left as it was
    assert rep.before["acc"] == 1.0  # labels are the original model's own predictions
    chans = pm.pure_layer("layer4").neurons.tolist()
    ablated = model.layer4.register_forward_hook(lambda m, i, o: o.index_fill(1, torch.tensor(chans), 0.0))
    try:
        from purenn.analysis.unlearn import shortcut_metrics

        assert rep.whole == pytest.approx(shortcut_metrics(model, clean, y, stamped, y, target))
    finally:
        ablated.remove()
    assert "whole channels off" in rep.summary()


def test_rank_by_target_is_logit_margin_contribution(case):
    model, clean, stamped = case
    ranked = rank_concept_channels(model, "layer4", stamped, clean, target=2)
    w = model.fc.weight.detach().double()
    w_margin = w[2] - w.mean(dim=0)
    delta = (_output_of(model, "layer4", stamped).mean(dim=(2, 3)).mean(0)
             - _output_of(model, "layer4", clean).mean(dim=(2, 3)).mean(0)).double()
    torch.testing.assert_close(torch.from_numpy(ranked.effect), w_margin * delta, rtol=1e-4, atol=1e-7)
    early = rank_concept_channels(model, "layer3", stamped, clean, target=2)  # through layer4 by autograd
    assert len(early.effect) == 256 and early.channels[0] == int(early.effect.argmax())
    with pytest.raises(ConfigError, match="target"):
        rank_concept_channels(model, "layer4", stamped, clean, target=3)
    pm = purify_concept(model, "layer4", stamped, clean, neurons=4, target=2)
    assert pm.pure_layer("layer4").neurons.tolist() == ranked.top(4)


def test_rest_clusters(case):
    from sklearn.cluster import KMeans

    model, clean, stamped = case
    pm = purify_concept(model, "layer4", stamped, clean, neurons={"layer4": [5, 9]}, rest_clusters=3, seed=1)
    pl = pm.pure_layer("layer4")
    assert pl.n_clusters.tolist() == [4, 4]
    idx = concept_virtual_indices(pm, "layer4")
    assert [pm.virtual_neurons[i].cluster for i in idx] == [3, 3]
    feats, mass = concept_gate_features(model, clean, "layer4", [5, 9])
    km = KMeans(n_clusters=3, n_init=4, random_state=1).fit(feats[:, 0].double().numpy(),
                                                              sample_weight=mass[:, 0].double().numpy())
    torch.testing.assert_close(pl.centroids[0, :3].double(), torch.from_numpy(km.cluster_centers_), rtol=1e-4,
                               atol=1e-6)
    x = torch.cat([clean, stamped])
    assert torch.equal(pm(x), model(x))
    with pytest.raises(ConfigError, match="rest_clusters"):
        purify_concept(model, "layer4", stamped, clean, neurons=2, rest_clusters=0)


def test_shortcut_summary_writes_undefined_figures_as_na():
    from purenn.analysis.unlearn import ShortcutReport

    m = {"reliance": 0.0, "acc": 0.5, "acc_target": float("nan")}
    rep = ShortcutReport(target=1, before=m, after=dict(m), whole=dict(m))
    text = rep.summary()
    assert "nan" not in text.lower() and text.count("n/a") == 3 + 2 + 1  # acc of target, removed, the note
    assert "does not rely on the concept" in text
    ok = ShortcutReport(target=1, before={**m, "reliance": 0.4, "acc_target": 0.9},
                        after={**m, "reliance": 0.1, "acc_target": 0.8},
                        whole={**m, "reliance": 0.0, "acc_target": 0.2})
    assert " 75.0% " in ok.summary() and "100.0%" in ok.summary() and "n/a" not in ok.summary()
