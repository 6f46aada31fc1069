"""The package's layout: layers without import cycles, a map in every sub-package, the staged
``purify_model``, and the module paths of the flat layout still working with a DeprecationWarning."""

from __future__ import annotations

import importlib
import inspect
import pkgutil
import warnings

import pytest
import torch

import purenn
from purenn.fit import pipeline, plan, stages

from conftest import tiny_resnet

grimp = pytest.importorskip("grimp", reason="grimp comes with import-linter (the dev extra)")

#: the one import from a lower layer to a higher one, at call time only: PurifiedModel.save reaches
#: the file format through a local import (DESIGN.md; named in pyproject's import-linter contract)
CALL_TIME = {("purenn.model.purified", "purenn.io.format")}
SUBPACKAGES = ("arch", "attribution", "model", "io", "fit", "analysis", "cli", "common")


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    found = []
    for root in sorted(edges):
        if root in index:
            continue
        work = [(root, iter(sorted(edges[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on.add(root)
        while work:
            v, children = work[-1]
            w = next(children, None)
            if w is not None:
                if w not in index:
                    index[w] = low[w] = len(index)
                    stack.append(w)
                    on.add(w)
                    work.append((w, iter(sorted(edges[w]))))
                elif w in on:
                    low[v] = min(low[v], index[w])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
            if low[v] == index[v]:
                comp = []
                while True:
                    w = stack.pop()
                    on.discard(w)
                    comp.append(w)
                    if w == v:
                        break
                if len(comp) > 1:
                    found.append(sorted(comp))
    return found


def test_the_cycle_finder_finds_a_planted_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_no_module_imports_another_that_imports_it_back():
    graph = grimp.build_graph("purenn", exclude_type_checking_imports=True)
    edges = {m: set(graph.find_modules_directly_imported_by(m)) for m in graph.modules}
    for a, b in CALL_TIME:
        assert b in edges[a], f"the named exception {a} -> {b} is gone: drop it from CALL_TIME and pyproject"
        edges[a].discard(b)
    assert _cycles(edges) == []


def test_every_layer_is_a_subpackage_that_says_what_it_holds():
    for name in SUBPACKAGES:
        module = importlib.import_module(f"purenn.{name}")
        assert hasattr(module, "__path__"), name
        assert module.__doc__ and len(module.__doc__.strip()) > 40, f"purenn.{name} has no map in its docstring"
    top = {m.name for m in pkgutil.iter_modules(purenn.__path__)}
    assert top == set(SUBPACKAGES) | {"errors", "_version", "_legacy", "__main__"}, top


def test_the_flat_layout_s_paths_still_work_and_warn():
    from purenn.fit.concept import purify_concept
    from purenn.model.purified import PurifiedModel

    with pytest.warns(DeprecationWarning, match="purenn.concept is now purenn.fit.concept"):
        old = importlib.import_module("purenn.concept")
    assert old.purify_concept is purify_concept
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        from purenn.surgery import PurifiedModel as OldPurifiedModel, PureLayer  # noqa: I001
        from purenn.rules import Epsilon
    assert OldPurifiedModel is PurifiedModel and PureLayer is purenn.PureLayer
    assert Epsilon is importlib.import_module("purenn.attribution.rules").Epsilon
    assert purenn.io.read_config is importlib.import_module("purenn.io.format").read_config
    with pytest.raises(AttributeError, match="no attribute 'not_a_name'"):
        old.not_a_name  # noqa: B018


def test_purify_model_and_make_plan_share_their_defaults():
    """The public signature and the plan's must not drift apart."""
    public = inspect.signature(pipeline.purify_model).parameters
    planned = inspect.signature(plan.make_plan).parameters
    assert list(public) == list(planned)
    assert {k: p.default for k, p in public.items()} == {k: p.default for k, p in planned.items()}


def test_the_stages_called_one_by_one_give_purify_model_s_result():
    model = tiny_resnet(seed=3)
    x = torch.rand(24, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    kw = dict(n_refs=6, neurons={"layer4": [0, 3, 7, 11, 20], "layer3": 2}, progress=False, seed=1)
    whole = purenn.purify_model(model, ["layer4", "layer3"], x, **kw)

    p = plan.make_plan(model, ["layer4", "layer3"], x, **kw)
    assert [lp.layer for lp in p.layers] == ["layer3", "layer4"]  # network order
    assert p.top == {"layer3": 2} and not p.owned and p.model is model
    collected = stages.collect_stage(p)
    features = stages.features_stage(p, collected)
    assert features["layer4"].shape[:2] == (5, 6)
    assert features["layer3"].shape[:2] == (model.layer3[-1].conv2.out_channels, 6)  # every channel, for the top 2
    fits = stages.cluster_stage(p, collected, features)
    assert len(fits["layer4"].keep) == 5 and len(fits["layer3"].keep) == 2
    staged = stages.build_stage(p, collected, fits)

    for layer in ("layer3", "layer4"):
        a, b = whole.pure_layer(layer), staged.pure_layer(layer)
        assert torch.equal(a.neurons, b.neurons) and torch.equal(a.centroids, b.centroids)
        assert torch.equal(a.n_clusters, b.n_clusters) and torch.equal(a.ref_indices, b.ref_indices)
    y = torch.rand(4, 3, 32, 32)
    assert torch.equal(whole(y), staged(y)) and torch.equal(whole(y), model(y))


def test_make_plan_refuses_before_any_heavy_work():
    model = tiny_resnet()

    class Counting(torch.utils.data.Dataset):
        reads = 0

        def __len__(self):
            return 50

        def __getitem__(self, i):
            Counting.reads += 1
            return torch.rand(3, 32, 32)

    with pytest.raises(purenn.ConfigError, match="n_clusters=9 exceeds n_refs=4"):
        plan.make_plan(model, ["layer4"], Counting(), n_refs=4, n_clusters=9)
    assert Counting.reads == 0
    p = plan.make_plan(model, ["layer4"], Counting(), n_refs=4, progress=False)
    assert Counting.reads <= 3 and p.n_refs == 4  # a first look at one sample, the forward check on two
