"""ONNX export: ONNX Runtime reproduces PyTorch (logits, pure features, gates) on deep models at an odd
input size, batch sizes 1 and 7 from one file, all-zero inputs; the verification report; bad arguments."""

from __future__ import annotations

import copy
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

import purenn
from purenn import circuit_relevance
from purenn.errors import ConfigError, ExportError
from purenn.io.files import TEMP_TAG
from purified_cases import CASE_PARAMS, SIZE, SUPPRESSED, images, purified

from conftest import tiny_resnet

SHAPE = (3, *SIZE)
README = Path(__file__).resolve().parents[1] / "README.md"


def run_onnx(path_or_session, x):
    session = path_or_session
    if not isinstance(session, ort.InferenceSession):
        session = ort.InferenceSession(str(path_or_session), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(None, {"input": x.numpy()})))


def torch_outputs(pm, x, pool="mean"):
    """logits, gates and pure features in one pass of the forward that pm(x), pm.gates(x) and
    pm.pure_features(x) run (every neuron gated)."""
    with torch.no_grad():
        return pm._run(x, all_gates=True, pool=pool)


def centroid_distances(model, pm, layer, x):
    """Squared distances (B, K, c) of each neuron's circuit to its centroids, from the public relevance API
    on the base model (upstream of both purified layers nothing is suppressed, so this is what pm sees)."""
    pl = pm.pure_layer(layer)
    r = circuit_relevance(model, x, layer, pl.neurons.tolist(), pl.upstream, skip_aware=pl.skip_aware)
    return ((r[:, :, None, :].double() - pl.centroids[None].double()) ** 2).sum(-1)


def assert_matches(model, pm, onnx_out, x, pool="mean", tie_rtol=1e-3):
    """logits and pure features within rtol 1e-4 (of the largest magnitude), gates equal except ties,
    everything finite. Returns the number of ties."""
    logits, gates, feats = torch_outputs(pm, x, pool)
    for name, value in onnx_out.items():
        assert np.isfinite(value).all(), name
    got = torch.from_numpy(onnx_out["logits"])
    torch.testing.assert_close(got, logits, rtol=1e-4, atol=1e-4 * float(logits.abs().max()))
    ties = 0
    for layer in pm.layers:
        pl = pm.pure_layer(layer)
        g_onnx = torch.from_numpy(onnx_out[f"gate.{layer}"])
        assert g_onnx.dtype == torch.int64 and g_onnx.shape == gates[layer].shape
        differ = g_onnx != gates[layer]
        if differ.any():
            dist = centroid_distances(model, pm, layer, x)
            for b, k in differ.nonzero().tolist():
                d_onnx, d_torch = dist[b, k, g_onnx[b, k]], dist[b, k, gates[layer][b, k]]
                assert abs(d_onnx - d_torch) <= tie_rtol * max(d_onnx, d_torch), (layer, b, k)  # a tie
                ties += 1
        keep = ~torch.cat([differ, torch.zeros_like(differ[:, :1])], dim=1)[:, pl.v_kpos]  # (B, V)
        ref = feats[layer]
        keep = keep.reshape(keep.shape + (1,) * (ref.ndim - 2)).expand_as(ref)
        got = torch.from_numpy(onnx_out[f"pure.{layer}"])
        assert got.shape == ref.shape
        torch.testing.assert_close(got * keep, ref * keep, rtol=1e-4, atol=1e-4 * float(ref.abs().max()))
    return ties


@pytest.fixture(scope="module", params=CASE_PARAMS)
def exported(request, tmp_path_factory):
    model, pm = purified(request.param)
    path = tmp_path_factory.mktemp("onnx") / f"{request.param}.onnx"
    report = purenn.export_onnx(pm, path, input_shape=SHAPE, batch_sizes=(1,))
    return request.param, model, pm, path, report


def test_onnx_runtime_matches_pytorch(exported):
    name, model, pm, path, report = exported
    onnx.checker.check_model(str(path), full_check=True)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert session.get_inputs()[0].name == "input"
    assert session.get_inputs()[0].shape == ["batch", *SHAPE]
    assert [o.name for o in session.get_outputs()] == ["logits", "pure.layer3.1", "pure.layer4",
                                                      "gate.layer3.1", "gate.layer4"]
    assert all(o.shape[0] == "batch" for o in session.get_outputs())
    ties, gates = 0, 0
    for x in (images(1, seed=40), images(7, seed=41), torch.zeros(7, *SHAPE)):  # one file, batch 1 and 7
        ties += assert_matches(model, pm, run_onnx(session, x), x)
        gates += x.shape[0] * 11
    assert ties <= 0.02 * gates


def test_suppression_is_baked_in(exported):
    name, model, pm, path, _ = exported
    x = images(2, seed=42)
    out = run_onnx(path, x)
    with torch.no_grad():
        base = model(x)
    assert (torch.from_numpy(out["logits"]) - base).abs().max() > 1e-3  # suppression changes the logits
    feats = out["pure.layer4"]
    for c, k in SUPPRESSED:
        assert np.all(feats[:, pm.virtual_index("layer4", c, k)] == 0)
    meta = json.loads(onnx.load(str(path), load_external_data=False).metadata_props[0].value)
    layer4 = [e for e in meta["layers"] if e["layer"] == "layer4"][0]
    assert layer4["suppressed"] == [pm.virtual_index("layer4", c, k) for c, k in SUPPRESSED]


def test_report(exported):
    name, model, pm, path, report = exported
    assert report.ok is True and report.path == path and path.is_file()
    assert report.exporter == "torchscript" and report.opset == purenn.io.onnx.DEFAULT_OPSET
    assert report.input_shape == SHAPE and report.pool == "mean"
    assert report.file_bytes == path.stat().st_size
    assert [c.name for c in report.checks] == ["random b=1", "zeros b=1"]
    assert report.providers == ("CPUExecutionProvider",)
    assert set(report.max_abs_features) == set(report.gate_agreement) == {"layer3.1", "layer4"}
    assert 0 < report.max_abs_logits < 1e-3 and all(c.finite for c in report.checks)
    assert all(v >= 0.98 for v in report.gate_agreement.values())
    assert name in report.summary() and "FAIL" not in report.summary()
    summary = report.summary()  # every figure explained
    assert "rel: relative to the\n  largest magnitude, ok below 1e-04" in summary and "gates equal: share of" in summary
    assert f"(rel {report.checks[0].rel_logits:.1e})" in summary
    assert not list(path.parent.glob(f".*{TEMP_TAG}*"))  # no temporary file left
    graph = onnx.load(str(path), load_external_data=False)
    assert graph.opset_import[0].version == purenn.io.onnx.DEFAULT_OPSET


# ------------------------------------------------------------------------------------------ small models


@pytest.fixture(scope="module")
def tiny():
    model = tiny_resnet()
    pm = purenn.purify_model(model, ["layer4", "layer3"], images(16, seed=1, size=(32, 32)), n_refs=5,
                             neurons={"layer4": list(range(8)), "layer3": [0, 3]}, progress=False)
    return model, pm


@pytest.mark.parametrize("pool", ["max", None])
def test_pooling_options(tiny, tmp_path, pool):
    model, pm = tiny
    path = tmp_path / "tiny.onnx"
    report = purenn.export_onnx(pm, path, input_shape=(3, 33, 47), pool=pool, batch_sizes=(2,), opset=20)
    assert report.ok and report.opset == 20
    x = images(3, seed=9, size=(33, 47))
    out = run_onnx(path, x)
    assert assert_matches(model, pm, out, x, pool=pool) == 0
    expected = (3, pm.pure_layer("layer4").n_virtual) + (() if pool else (2, 2))
    assert out["pure.layer4"].shape == expected


def test_chunked_relevance_is_batch_independent(tiny, tmp_path):
    """With a tiny budget every neuron is its own relevance chunk in the graph; chunks are sized per
    sample, so the graph traced at one batch size is right at others."""
    model, pm = tiny
    small, default = tmp_path / "chunked.onnx", tmp_path / "default.onnx"
    assert purenn.export_onnx(pm, small, input_shape=(3, 32, 32), max_memory=1, batch_sizes=(1, 5)).ok
    purenn.export_onnx(pm, default, input_shape=(3, 32, 32), verify=False)
    assert pm.max_memory == purenn.attribution.relevance.DEFAULT_MAX_MEMORY  # restored after export

    def transposed_convs(path):
        return sum(n.op_type == "ConvTranspose" for n in onnx.load(str(path)).graph.node)

    assert transposed_convs(small) > transposed_convs(default)
    for b in (1, 6):
        x = images(b, seed=20 + b, size=(32, 32))
        assert assert_matches(model, pm, run_onnx(small, x), x) == 0


def test_exact_ties_pick_the_first_cluster(tiny, tmp_path):
    """Two equal centroids tie exactly; ONNX ArgMin, like torch.argmin, then picks the first."""
    model, pm = tiny
    pm = copy.deepcopy(pm)
    pl = pm.pure_layer("layer4")
    with torch.no_grad():
        pl.centroids[2, 0] = pl.centroids[2, 1]
    path = tmp_path / "tie.onnx"
    report = purenn.export_onnx(pm, path, input_shape=(3, 32, 32), batch_sizes=(3,))
    assert report.ok and all(c.gate_mismatches["layer4"] == 0 for c in report.checks)
    argmins = [n for n in onnx.load(str(path)).graph.node if n.op_type == "ArgMin"]
    assert argmins and all(a.i == 0 for n in argmins for a in n.attribute if a.name == "select_last_index")
    x = images(3, seed=30, size=(32, 32))
    out = run_onnx(path, x)
    assert np.all(out["gate.layer4"][:, 2] == 0) and torch.all(pm.gates(x)["layer4"][:, 2] == 0)


def test_dead_neuron_gives_no_nan(tmp_path):
    """An all-zero circuit normalises to zeros (relevance / (sum |relevance| + eps)), not 0/0: the
    gate then picks the centroid of smallest norm, in ONNX Runtime as in PyTorch."""
    model = tiny_resnet(seed=3)
    pm = purenn.purify_model(model, ["layer4"], images(16, seed=2, size=(32, 32)), n_refs=5,
                             neurons={"layer4": list(range(16))}, progress=False)
    pl = pm.pure_layer("layer4")
    norms = (pl.centroids**2).sum(-1)
    k = int(torch.nonzero(norms[:, 1] < norms[:, 0])[0])  # a neuron whose dead-circuit gate is 1, not 0
    channel = int(pl.neurons[k])
    with torch.no_grad():
        model.layer4[-1].bn2.bias[channel] = -1e4  # kill the channel after fitting
    x = images(4, seed=7, size=(32, 32))
    store = {}
    model.layer4.register_forward_hook(lambda m, i, o: store.__setitem__("a", o))
    with torch.no_grad():
        model(x)
    assert torch.all(store["a"][:, channel] == 0)
    assert torch.all(pm.gates(x)["layer4"][:, k] == 1)
    path = tmp_path / "dead.onnx"
    assert purenn.export_onnx(pm, path, input_shape=(3, 32, 32), batch_sizes=(4,)).ok
    out = run_onnx(path, x)
    assert np.all(out["gate.layer4"][:, k] == 1)
    assert assert_matches(model, pm, out, x) == 0


def test_user_inputs_and_failed_verification(tiny, tmp_path, monkeypatch):
    model, pm = tiny
    path = tmp_path / "tiny.onnx"
    user = [torch.randn(5, 3, 32, 32, generator=torch.Generator().manual_seed(0)), np.zeros((3, 32, 32), "f")]
    report = purenn.export_onnx(pm, path, input_shape=(3, 32, 32), batch_sizes=(1, 3), inputs=user)
    assert [c.name for c in report.checks] == ["random b=1", "random b=3", "zeros b=3", "inputs[0] b=5",
                                               "inputs[1] b=1"]
    assert report.ok
    path.unlink()

    real = ort.InferenceSession

    class Broken:  # a runtime that returns slightly wrong logits, or flipped gates
        def __init__(self, *args, **kwargs):
            self.session = real(*args, **kwargs)

        def __getattr__(self, name):
            return getattr(self.session, name)

        def run(self, names, feed):
            out = self.session.run(names, feed)
            if mode == "logits":
                out[0] = out[0] + 1e-2
            else:
                out[-1] = 1 - out[-1]
            return out

    monkeypatch.setattr(ort, "InferenceSession", Broken)
    for mode in ("logits", "gates"):
        with pytest.raises(ExportError, match="does not reproduce"):
            purenn.export_onnx(pm, path, input_shape=(3, 32, 32), batch_sizes=(2,))
        assert list(tmp_path.iterdir()) == []  # nothing written
        report = purenn.export_onnx(pm, path, input_shape=(3, 32, 32), batch_sizes=(2,), strict=False)
        assert report.ok is False and path.is_file() and "FAIL" in report.summary()
        if mode == "gates":
            assert sum(c.gate_errors["layer4"] for c in report.checks) > 0
        else:
            assert report.max_abs_logits == pytest.approx(1e-2, rel=1e-2)
        path.unlink()


def test_bad_arguments(tiny, tmp_path):
    model, pm = tiny
    path = tmp_path / "x.onnx"
    cases = [
        (dict(input_shape=(1, 32, 32)), "input_shape has 1 channels but the model's conv1 takes 3"),
        (dict(input_shape=(3, 32)), "input_shape must be"),
        (dict(pool="sum"), "pool must be one of"),
        (dict(exporter="dynamo"), "exporter must be one of"),
        (dict(opset=9), "opset must be an int in 13..20"),
        (dict(max_memory=0), "max_memory must be a positive"),
        (dict(batch_sizes=(0,)), "batch_sizes must be"),
        (dict(inputs=torch.rand(2, 3, 31, 32)), r"inputs\[0\] has shape \(2, 3, 31, 32\)"),
    ]
    for kwargs, message in cases:
        kwargs.setdefault("input_shape", (3, 32, 32))
        with pytest.raises(ConfigError, match=message):
            purenn.export_onnx(pm, path, **kwargs)
    with pytest.raises(ConfigError, match="needs a PurifiedModel"):
        purenn.export_onnx(model, path, input_shape=(3, 32, 32))
    with pytest.raises(ConfigError, match="is a directory"):
        purenn.export_onnx(pm, tmp_path, input_shape=(3, 32, 32))
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------------------------------ outputs


def op_counts(path) -> dict[str, int]:
    counts: dict[str, int] = {}
    for node in onnx.load(str(path)).graph.node:
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return counts


def test_logits_only_export_of_an_unlearned_model(tmp_path):
    """The logits-only graph computes pm(x), suppression included, and nothing else."""
    model, pm = purified("resnet18")
    path = tmp_path / "unlearned.onnx"
    report = purenn.export_onnx(pm, path, input_shape=SHAPE, outputs=("logits",), batch_sizes=(1, 3))
    assert report.ok and report.outputs == ("logits",)
    assert all(not c.max_abs_features and not c.gate_count for c in report.checks)
    assert "|dfeatures|" not in report.summary() and "outputs=logits," in report.summary()
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert [o.name for o in session.get_outputs()] == ["logits"]
    assert session.get_outputs()[0].shape[0] == "batch"
    x = images(5, seed=43)
    got = torch.from_numpy(run_onnx(session, x)["logits"])
    with torch.no_grad():
        want, base = pm(x), model(x)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4 * float(want.abs().max()))
    assert (got - base).abs().max() > 1e-3  # the suppression is baked in
    meta = json.loads(onnx.load(str(path), load_external_data=False).metadata_props[0].value)
    assert meta["outputs"] == ["logits"]
    gated = {e["layer"]: e["gated"] for e in meta["layers"]}
    assert gated == {"layer4": [16], "layer3.1": []}  # channel 8 is off whatever its gate: only 16 gates


def test_logits_only_graph_gates_only_suppressed_neurons(tiny, tmp_path):
    """One neuron with a suppressed virtual neuron: with one relevance chunk per neuron (max_memory=1) the
    logits-only graph has one gate where the full graph has one per purified neuron (8 + 2), and the
    transposed convolutions of one layer4 segment backward where the full graph has 8 of them (+ 2 of layer3)."""
    model, pm = tiny
    full, lean = tmp_path / "full.onnx", tmp_path / "lean.onnx"
    with pm.suppress("layer4", [pm.virtual_index("layer4", 2, 1)]):
        assert purenn.export_onnx(pm, full, input_shape=(3, 32, 32), max_memory=1, verify=False).ok is None
        report = purenn.export_onnx(pm, lean, input_shape=(3, 32, 32), outputs=["logits"], max_memory=1,
                                    batch_sizes=(2,))
        assert report.ok
    n_full, n_lean = op_counts(full), op_counts(lean)
    assert n_full["ArgMin"] == 10 and n_lean["ArgMin"] == 1
    assert n_lean["ConvTranspose"] >= 1 and n_full["ConvTranspose"] >= 8 * n_lean["ConvTranspose"]
    assert sum(n_lean.values()) < sum(n_full.values()) / 3


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_logits_only_graph_without_suppression_is_the_base_model(tiny, tmp_path):
    model, pm = tiny
    path, base_path = tmp_path / "lean.onnx", tmp_path / "base.onnx"
    assert purenn.export_onnx(pm, path, input_shape=(3, 32, 32), outputs=("logits",), batch_sizes=(2,)).ok
    with torch.no_grad():
        torch.onnx.export(model, (torch.rand(2, 3, 32, 32),), str(base_path), dynamo=False,
                          input_names=["input"], output_names=["logits"])
    counts, base = op_counts(path), op_counts(base_path)
    assert "ArgMin" not in counts and "ConvTranspose" not in counts
    assert counts["Conv"] == base["Conv"]
    x = images(3, seed=44, size=(32, 32))
    with torch.no_grad():
        want = model(x)
    torch.testing.assert_close(torch.from_numpy(run_onnx(path, x)["logits"]), want, rtol=1e-4,
                               atol=1e-4 * float(want.abs().max()))


@pytest.mark.parametrize("outputs", [("logits", "pure"), ("gate", "logits")])
def test_partial_outputs(tiny, tmp_path, outputs):
    model, pm = tiny
    path = tmp_path / "partial.onnx"
    report = purenn.export_onnx(pm, path, input_shape=(3, 32, 32), outputs=outputs, batch_sizes=(2,))
    kind = "pure" if "pure" in outputs else "gate"
    names = ["logits", *[f"{kind}.{layer}" for layer in pm.layers]]
    assert report.ok and list(report.outputs) == names
    assert bool(report.checks[0].max_abs_features) == (kind == "pure")
    assert bool(report.checks[0].gate_count) == (kind == "gate")
    x = images(3, seed=45, size=(32, 32))
    out = run_onnx(path, x)
    assert list(out) == names
    logits, gates, feats = torch_outputs(pm, x)
    ref = feats if kind == "pure" else gates
    for layer in pm.layers:
        torch.testing.assert_close(torch.from_numpy(out[f"{kind}.{layer}"]), ref[layer], rtol=1e-4,
                                   atol=1e-4 * float(ref[layer].abs().max()))
    meta = json.loads(onnx.load(str(path), load_external_data=False).metadata_props[0].value)
    assert meta["outputs"] == names


def test_near_ties_without_gate_output(tiny):
    """Without a gate output, pure features are compared leaving out neurons whose two nearest centroids
    tie; two equal centroids make every sample a tie for that neuron."""
    model, pm = tiny
    pm = copy.deepcopy(pm)
    pl = pm.pure_layer("layer4")
    with torch.no_grad():
        pl.centroids[2, 1] = pl.centroids[2, 0]
    x = images(4, seed=46, size=(32, 32))
    gates = pm.gates(x)["layer4"].numpy()
    ties = purenn.io.onnx._near_ties(pm, x, "layer4", gates, 1e-3)
    assert ties.shape == gates.shape and ties[:, 2].all()


@pytest.mark.parametrize("gate", ["circuit", "circuit+map", "map", "upstream"])
def test_gate_distances_choose_the_models_gates(gate):
    """The distances the export check uses for near ties come from the same features as the gate, for
    every gate kind (the nearest centroid is the model's gate)."""
    pm = purenn.purify_model(tiny_resnet(), ["layer4"], images(12, seed=3, size=(32, 32)), n_refs=5,
                             neurons={"layer4": list(range(6))}, gate=gate, progress=False)
    x = images(5, seed=47, size=(32, 32))
    dist = purenn.io.onnx._gate_distances(pm, x, "layer4")
    assert dist.shape == (5, 6, pm.pure_layer("layer4").centroids.shape[1])
    assert torch.equal(dist.argmin(dim=-1), pm.gates(x)["layer4"][:, :6].cpu())


def test_bad_outputs(tiny, tmp_path):
    model, pm = tiny
    path = tmp_path / "x.onnx"
    for outputs in ("logits", ("pure", "gate"), (), ("logits", "probs"), ["logits", "logits"], ("logits", 1)):
        with pytest.raises(ConfigError, match="'logits', 'pure', 'gate'"):
            purenn.export_onnx(pm, path, input_shape=(3, 32, 32), outputs=outputs)
    assert list(tmp_path.iterdir()) == []
    assert purenn.io.onnx.check_outputs(["gate", "logits"]) == ("logits", "gate")


def test_readme_snippet_runs_without_torch(tiny, tmp_path):
    """The README's ONNX Runtime snippet runs with onnxruntime and numpy only (torch cannot be imported)."""
    model, pm = tiny
    purenn.export_onnx(pm, tmp_path / "pure.onnx", input_shape=(3, 40, 40), verify=False)
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    snippet = [b for b in blocks if "custom_metadata_map" in b]
    assert len(snippet) == 1, "README needs one ONNX Runtime snippet"
    code = "import sys\nsys.modules['torch'] = None\n" + snippet[0] + (
        "\nassert out['logits'].shape == (8, 3) and out['gate.layer4'].dtype == np.int64"
        "\nassert out['pure.layer4'].shape == (8, 520)\nprint('ok')\n"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().endswith("ok")
