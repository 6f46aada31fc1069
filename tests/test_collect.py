import torch

from purenn.arch import ResNetSpec
from purenn.fit.collect import TopK, collect_references
from purenn.fit.data import DataSource

from conftest import tiny_resnet


def test_running_topk_equals_global_topk():
    g = torch.Generator().manual_seed(0)
    scores = torch.rand(103, 9, generator=g)
    top = TopK(7)
    for s in range(0, 103, 10):
        top.update(scores[s : s + 10], s)
    res = top.result()
    ref_vals, ref_idx = torch.topk(scores, 7, dim=0)
    assert torch.equal(res.values, ref_vals.t())
    assert torch.equal(res.indices, ref_idx.t())


def test_collect_matches_brute_force_for_all_layers():
    model = tiny_resnet()
    data = torch.rand(37, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    spec = ResNetSpec(model)
    pos = {"layer2": spec.position("layer2"), "layer4.0": spec.position("layer4.0")}
    refs = collect_references(spec, DataSource.from_data(data, batch_size=8), pos, 5)
    acts, _ = spec.run_until(data, set(pos.values()))
    for name, p in pos.items():
        smax = acts[p].amax(dim=(-2, -1))
        vals, _ = torch.topk(smax, 5, dim=0)
        # same top values; the chosen samples really have them (ties, e.g. dead channels, may pick others)
        torch.testing.assert_close(refs[name].values, vals.t())
        torch.testing.assert_close(torch.gather(smax.t(), 1, refs[name].indices), vals.t())
        assert all(len(set(row)) == 5 for row in refs[name].indices.tolist())
