"""Options of the scale path that run without a GPU: precision, data-loading workers, progress bars."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import TensorDataset

import purenn
from _resume_worker import data, model
from purenn.arch import ResNetSpec
from purenn.attribution import precision as prec
from purenn.common.progress import stage_bar
from purenn.fit.circuits import fit_circuits
from purenn.fit.collect import collect_references
from purenn.fit.data import DataSource
from purenn.fit.plan import plan_layers

KW = dict(layers=["layer4"], n_refs=6, batch_size=8, neurons={"layer4": list(range(0, 512, 64))})


@pytest.fixture(scope="module")
def base():
    m, x = model(), data()
    return m, x, purenn.purify_model(m, data=x, progress=False, **KW)


@pytest.mark.parametrize("value, match", [
    ("tf32", "needs a CUDA device"), ("fp16", "must be one of"), (None, "must be one of"),
])
def test_precision_refused_on_cpu_or_unknown(base, value, match):
    m, x, _ = base
    with pytest.raises(purenn.ConfigError, match=match):
        purenn.purify_model(m, data=x, progress=False, precision=value, **KW)


def test_bf16_relevance_is_close_to_float32(base):
    """bf16 runs on CPU (autocast, backward only): circuits within 2 % of float32 (relative L2 per
    circuit), the same references, most gates unchanged, logits untouched."""
    m, x, pm32 = base
    spec, src = ResNetSpec(m), DataSource.from_data(x, 8)
    plans = plan_layers(spec, ["layer4"], KW["neurons"], None, "auto")
    refs = collect_references(spec, src, {"layer4": plans[0].position}, 6)
    circuits = {
        p: fit_circuits(spec, src, plans, refs, 6, batch_size=8, device=None, max_memory=1 << 28, progress=False,
                        precision=p)["layer4"]
        for p in ("float32", "bf16")
    }
    a, b = circuits["float32"], circuits["bf16"]
    err = (a - b).norm(dim=-1) / a.norm(dim=-1)
    assert b.dtype == torch.float32 and 0 < err.max() < 0.02
    pm16 = purenn.purify_model(m, data=x, progress=False, precision="bf16", **KW)
    assert torch.equal(pm32.pure_layer("layer4").ref_indices, pm16.pure_layer("layer4").ref_indices)
    assert (pm32.gates(x)["layer4"] == pm16.gates(x)["layer4"]).float().mean() >= 0.6
    torch.testing.assert_close(pm16(x), m(x))  # logits unchanged whatever the fit's precision


def test_tf32_context_sets_and_restores_the_flags(monkeypatch):
    monkeypatch.setattr(prec, "check_precision", lambda p, d: p)  # no GPU here: test the switch itself
    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    with pytest.raises(KeyError):
        with prec.relevance_precision("tf32", "cuda"):
            assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
            raise KeyError("an error inside")
    assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) == before


def test_cuda_refused_without_a_gpu(base):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    m, x, _ = base
    with pytest.raises(purenn.ConfigError, match="not available"):
        purenn.purify_model(m, data=x, progress=False, device="cuda", **KW)


def test_workers_give_the_same_result(base):
    m, x, pm = base
    ds = TensorDataset(x, torch.zeros(len(x)))
    pm2 = purenn.purify_model(m, data=ds, progress=False, workers=2, **KW)
    a, b = pm.pure_layer("layer4"), pm2.pure_layer("layer4")
    assert torch.equal(a.ref_indices, b.ref_indices) and torch.equal(a.centroids, b.centroids)
    with pytest.raises(purenn.ConfigError, match="workers"):
        purenn.purify_model(m, data=ds, progress=False, workers=-1, **KW)


def test_progress_bars_show_rates_per_stage(base, capsys):
    m, x, _ = base
    purenn.purify_model(m, data=x, progress=True, **KW)
    err = capsys.readouterr().err
    for text in ("collect references", "img/s", "circuit relevance", "pair/s", "cluster circuits", "<"):
        assert text in err, text  # "<" precedes tqdm's remaining-time estimate
    purenn.purify_model(m, data=x, progress=False, **KW)
    assert capsys.readouterr().err == ""


def test_stage_bar_names_rank_share(capsys):
    bar = stage_bar("circuit relevance", 10, "pair", enabled=True, world=4)
    bar.update(10)
    bar.close()
    assert "circuit relevance (rank 0 of 4)" in capsys.readouterr().err


def test_command_options(tmp_path, capsys):
    """``purenn purify --precision tf32`` is refused on CPU with the reason; ``--checkpoint-dir`` and
    ``--workers`` run, and a second identical command accepts the folder and gives the same tensors."""
    import numpy as np
    from PIL import Image
    from safetensors.torch import load_file

    from purenn.cli import app as cli

    rng = np.random.default_rng(0)
    for c, name in enumerate(("a", "b")):
        (tmp_path / "images" / name).mkdir(parents=True)
        for i in range(6):
            Image.fromarray((rng.random((36, 36, 3)) * 120 + 60 * c).astype(np.uint8)).save(
                tmp_path / "images" / name / f"{i}.png")
    torch.save(model().state_dict(), tmp_path / "r18.pt")
    args = ["purify", "resnet18", "-c", str(tmp_path / "r18.pt"), "--data", str(tmp_path / "images"),
            "--image-size", "32", "--channels", "layer4:0,7", "--n-refs", "4", "--batch-size", "4", "-q"]
    assert cli.main([*args, "--precision", "tf32", "-o", str(tmp_path / "x.safetensors")]) == 3
    assert "needs a CUDA device" in capsys.readouterr().err
    ck = ["--checkpoint-dir", str(tmp_path / "ck"), "--workers", "1"]
    assert cli.main([*args, *ck, "-o", str(tmp_path / "one.safetensors")]) == 0
    assert (tmp_path / "ck" / "run.json").is_file() and any((tmp_path / "ck" / "relevance").iterdir())
    assert cli.main([*args, *ck, "-o", str(tmp_path / "two.safetensors")]) == 0
    one, two = load_file(tmp_path / "one.safetensors"), load_file(tmp_path / "two.safetensors")
    assert all(torch.equal(one[k], two[k]) for k in one)
