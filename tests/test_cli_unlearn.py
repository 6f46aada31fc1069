"""``purenn unlearn`` end to end on a tiny model and image folders, and its errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image

import purenn
from purenn.cli import app as cli

from conftest import calibrate_bn

CLASSES = ("cat", "dog", "fish")


def _save(folder: Path, images: np.ndarray) -> None:
    folder.mkdir(parents=True)
    for i, img in enumerate(images):
        Image.fromarray(img).save(folder / f"{i}.png")


def _stamp(images: np.ndarray) -> np.ndarray:
    out = images.copy()
    out[:, 2:10, 2:10] = 255
    return out


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("unlearn")
    rng = np.random.default_rng(0)
    clean = (rng.random((12, 32, 32, 3)) * 200).astype(np.uint8)
    _save(root / "examples" / "other", clean)
    _save(root / "examples" / "concept", _stamp(clean))
    for c, name in enumerate(CLASSES):
        imgs = (rng.random((4, 32, 32, 3)) * 120 + 60 * c).astype(np.uint8)
        _save(root / "eval" / name, imgs)
        _save(root / "eval_stamped" / name, _stamp(imgs))
    torch.manual_seed(0)
    model = calibrate_bn(torchvision.models.resnet18(num_classes=3), torch.rand(8, 3, 32, 32))
    torch.save(model.state_dict(), root / "r18.pt")
    return {"root": root, "pt": root / "r18.pt"}


def _examples_tensors(root: Path) -> tuple[torch.Tensor, torch.Tensor]:
    from purenn.cli.loaders import load_data

    data = load_data(folder=str(root), image_size=32)
    x = torch.stack([data.dataset[i][0] for i in range(len(data.dataset))])
    y = torch.as_tensor(data.labels)
    return x[y == data.class_names.index("concept")], x[y == data.class_names.index("other")]


def run(capsys, *argv: object) -> tuple[int, str, str]:
    code = cli.main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_unlearn_writes_a_suppressed_model_and_reports(files, capsys):
    out = files["root"] / "unlearned.safetensors"
    code, stdout, err = run(capsys, "unlearn", "resnet18", "-c", files["pt"], "--examples", files["root"] / "examples",
                            "--image-size", 32, "--neurons", 8, "--eval", files["root"] / "eval", "--eval-concept",
                            files["root"] / "eval_stamped", "--target", "dog", "-o", out)
    assert code == 0, err
    # an untrained model on these images: the accuracy is printed, and the warning says to check the checkpoint
    assert "model accuracy on 12 samples of this data (classes)" in err and "near chance level" in err
    ranked = purenn.fit.concept.rank_concept_channels(
        purenn.load_purified(out).base_model, "layer4", *_examples_tensors(files["root"] / "examples"), target=1)
    assert purenn.load_purified(out).pure_layer("layer4").neurons.tolist() == ranked.top(8)
    assert "8 channels split into 3 rest and 1 concept" in stdout and "suppressed (purenn)" in stdout
    assert "whole channels off" in stdout
    assert "nan" not in stdout.lower()  # undefined figures (no reliance on random images) are written n/a
    pm = purenn.load_purified(out)
    pl = pm.pure_layer("layer4")
    assert len(pl.neurons) == 8 and pl.n_clusters.tolist() == [4] * 8  # 3 rest + 1 concept
    suppressed = [v for v in pm.virtual_neurons if v.suppressed]
    assert len(suppressed) == 8 and all(v.cluster == 3 for v in suppressed)
    # the original model is the file's base model: with the suppressions lifted, logits equal it
    base = torchvision.models.resnet18(num_classes=3)
    base.load_state_dict(torch.load(files["pt"], weights_only=True))
    x = torch.rand(2, 3, 32, 32)
    pm.restore()
    assert torch.equal(pm(x), base.eval()(x))


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--neurons", "0"], "--neurons"),
        (["--rest-clusters", "0"], "--rest-clusters"),
        (["--eval", "EVAL"], "both --eval and --eval-concept"),
        (["--eval", "EVAL", "--eval-concept", "STAMPED"], "needs --target"),
        (["--target", "dog"], "as an index"),
        (["--eval", "EVAL", "--eval-concept", "STAMPED", "--target", "horse"], "not a class"),
        (["--examples", "EVAL"], "concept/ and other/"),
        (["--layers", "layer9"], "layer9"),
        (["-o", "out.onnx"], ".safetensors"),
    ],
)
def test_unlearn_bad_inputs(files, capsys, extra, message):
    root = files["root"]
    args = ["unlearn", "resnet18", "-c", files["pt"], "--examples", root / "examples", "--image-size", 32,
            "--neurons", 4, "-o", root / "bad.safetensors"]
    subst = {"EVAL": str(root / "eval"), "STAMPED": str(root / "eval_stamped")}
    args += [subst.get(e, e) for e in extra]
    code, _, err = run(capsys, *args)
    assert code == 3 and message in err, err
    assert not (root / "bad.safetensors").exists()
