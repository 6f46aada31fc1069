import pytest
import torch

import purenn
from purenn.arch import ResNetSpec
from purenn.fit.circuits import fit_circuits
from purenn.fit.collect import ActivationCache, collect_references
from purenn.fit.data import DataSource
from purenn.fit.plan import plan_layers

from conftest import tiny_resnet


def _setup(cache_bytes):
    model = tiny_resnet("bottleneck", dtype=torch.float64)
    data = torch.rand(40, 3, 32, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    spec = ResNetSpec(model)
    plans = plan_layers(spec, ["layer4", "layer3"], {"layer4": [0, 5, 9]}, {"layer4": "layer2"}, "auto")
    src = DataSource.from_data(data, batch_size=7)
    cache = ActivationCache({p.up_position for p in plans}, cache_bytes)
    refs = collect_references(spec, src, {p.layer: p.position for p in plans}, 6, cache=cache,
                              channels={p.layer: list(p.neurons) for p in plans})
    out = fit_circuits(spec, src, plans, refs, 6, batch_size=5, device=None, max_memory=2**20, progress=False,
                       cache=cache)
    return model, data, plans, refs, cache, out


@pytest.mark.slow
def test_cached_and_recomputed_fits_agree_with_autograd():
    from conftest import autograd_relevance

    model, data, plans, refs, cache, cached = _setup(1 << 30)
    assert cache.complete and len(cache) > 0
    _, _, _, _, no_cache, recomputed = _setup(0)
    assert not no_cache.complete
    for p in plans:
        torch.testing.assert_close(cached[p.layer], recomputed[p.layer], rtol=1e-10, atol=1e-14)
        j = 1
        k = p.neurons[j]
        idx = refs[p.layer].indices[k]
        ref = autograd_relevance(model, data[idx], p.layer, p.upstream, [k], drop_self=p.skip_aware)[:, 0]
        torch.testing.assert_close(cached[p.layer][j], ref, rtol=1e-6, atol=1e-12)


@pytest.mark.slow
def test_cache_holds_only_current_candidates_and_gives_up_over_budget():
    _, _, plans, refs, cache, _ = _setup(1 << 30)
    members = set()
    for p in plans:
        members |= set(refs[p.layer].indices[list(p.neurons)].flatten().tolist())
    assert set(cache._store) == members
    _, _, _, _, small, _ = _setup(10_000)
    assert not small.complete and len(small) == 0


def test_purify_with_and_without_cache_is_identical():
    model = tiny_resnet()
    data = torch.rand(30, 3, 32, 32, generator=torch.Generator().manual_seed(4))
    kw = dict(n_refs=6, neurons={"layer4.1": [1, 2, 3]}, progress=False)
    a = purenn.purify_model(model, ["layer4.1"], data, **kw)
    b = purenn.purify_model(model, ["layer4.1"], data, cache_memory=0, **kw)
    torch.testing.assert_close(a.pure_layer("layer4.1").centroids, b.pure_layer("layer4.1").centroids)
