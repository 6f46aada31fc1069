"""``score="contrast+upstream"``: the product of the circuit split's contrast and the contrast of
the references' pooled upstream activations, through purify_model, the file and the command."""

import numpy as np
import torch

import purenn

from conftest import _output_of, contrast_by_hand


def test_purify_scores_by_hand_from_the_upstream_activations(planted_model, tmp_path):
    model, train, _ = planted_model
    neurons = {"layer4": list(range(0, 512, 64))}
    kw = dict(n_refs=12, neurons=neurons, progress=False)
    pm = purenn.purify_model(model, ["layer4"], train, score="contrast+upstream", **kw)
    plain = purenn.purify_model(model, ["layer4"], train, score="contrast", **kw)
    pl, pp = pm.pure_layer("layer4"), plain.pure_layer("layer4")
    assert pl.score_kind == "contrast+upstream"
    torch.testing.assert_close(pl.centroids, pp.centroids)  # the gates do not depend on the score
    x = torch.stack([train[i][0] for i in range(len(train))])
    up = _output_of(model, "layer3", x).clamp(min=0).mean((-2, -1)).double().numpy()  # pooled, every sample
    factor = np.array([contrast_by_hand(up[idx]) for idx in pl.ref_indices.numpy()])
    np.testing.assert_allclose(pl.scores.numpy(), pp.scores.numpy() * factor, rtol=1e-4, atol=1e-6)
    # neurons=N ranks by this score; the file keeps what the scores are
    top = purenn.purify_model(model, ["layer4"], train, score="contrast+upstream", n_refs=12, neurons=3,
                              progress=False).pure_layer("layer4")
    every = purenn.purify_model(model, ["layer4"], train, score="contrast+upstream", n_refs=12,
                                progress=False).pure_layer("layer4")
    assert top.neurons.tolist() == np.sort(np.argsort(-every.scores.numpy(), kind="stable")[:3]).tolist()
    pm.save(tmp_path / "m.safetensors")
    back = purenn.load_purified(tmp_path / "m.safetensors")
    assert back.pure_layer("layer4").score_kind == "contrast+upstream"



def test_the_cached_and_the_recomputed_upstream_give_the_same_scores(planted_model, monkeypatch):
    """With the reference pass's activation cache (default) the pooled upstream activations come
    from it; without it (cache_memory=0) from a forward pass: the same scores either way."""
    model, train, _ = planted_model
    kw = dict(n_refs=10, neurons={"layer4": [1, 7, 40, 300]}, score="contrast+upstream", progress=False)
    import purenn.fit.stages

    def no_forward(*args, **kwargs):
        raise AssertionError("the cache holds every reference: no forward pass expected")

    with monkeypatch.context() as m:
        m.setattr(purenn.fit.stages, "fit_gate_features", no_forward)
        cached = purenn.purify_model(model, ["layer4"], train, **kw).pure_layer("layer4")
    fresh = purenn.purify_model(model, ["layer4"], train, cache_memory=0, **kw).pure_layer("layer4")
    torch.testing.assert_close(cached.scores, fresh.scores, rtol=1e-5, atol=1e-7)
    assert (cached.scores > 0).all()


def test_an_upstream_gate_reuses_its_features_for_the_score(planted_model):
    """With gate="upstream" the gate's features are the pooled upstream activations: the score's
    factor is the contrast of the same split, so the score is the square of the contrast score."""
    model, train, _ = planted_model
    kw = dict(n_refs=10, neurons={"layer4": [1, 7, 40, 300]}, gate="upstream", progress=False)
    both = purenn.purify_model(model, ["layer4"], train, score="contrast+upstream", **kw).pure_layer("layer4")
    one = purenn.purify_model(model, ["layer4"], train, score="contrast", **kw).pure_layer("layer4")
    torch.testing.assert_close(both.scores, one.scores**2, rtol=1e-5, atol=1e-7)
