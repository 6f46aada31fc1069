"""The ``purenn`` command end to end on tiny models and data: every command, its outputs and its errors."""

from __future__ import annotations

import gzip
import json
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image
from safetensors.torch import save_file

from purenn import __version__
from purenn.cli import app as cli
from purenn.cli import inspect as inspect_command
from purenn.cli.datasets import planted_concepts, small_image_resnet

from conftest import calibrate_bn

COMMANDS = ("purify", "inspect", "export", "probe", "show")


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = cli.main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def write_idx(path: Path, array: np.ndarray) -> None:
    arr = np.ascontiguousarray(array, dtype=np.uint8)
    header = bytes([0, 0, 0x08, arr.ndim]) + struct.pack(f">{arr.ndim}I", *arr.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + arr.tobytes())


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    """An image folder, a resnet18 checkpoint (.pt and .safetensors), Fashion-MNIST-format IDX files and
    an adapted-stem checkpoint for them."""
    root = tmp_path_factory.mktemp("cli")
    rng = np.random.default_rng(0)
    for c, name in enumerate(("cat", "dog", "fish")):
        (root / "images" / name).mkdir(parents=True)
        for i in range(6):
            img = (rng.random((36, 36, 3)) * 120 + 60 * c).astype(np.uint8)
            Image.fromarray(img).save(root / "images" / name / f"{i}.png")
    torch.manual_seed(0)
    model = calibrate_bn(torchvision.models.resnet18(num_classes=3), torch.rand(8, 3, 32, 32))
    torch.save(model.state_dict(), root / "r18.pt")
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(root / "r18.safetensors"))

    fm = root / "fmnist"
    fm.mkdir()
    for split, n, prefix in (("train", 60, "train"), ("test", 20, "t10k")):
        ds = planted_concepts(n, seed=0 if split == "train" else 1)
        pixels = ((ds.images[:, 0] * 0.35 + 0.25).clamp(0, 1) * 255).round().numpy()
        write_idx(fm / f"{prefix}-images-idx3-ubyte.gz", pixels)
        write_idx(fm / f"{prefix}-labels-idx1-ubyte.gz", ds.fine.numpy())
    torch.manual_seed(0)
    small = calibrate_bn(small_image_resnet(blocks=[1, 1, 1, 1], stem_stride=2, num_classes=5),
                         torch.rand(8, 1, 28, 28))
    torch.save(small.state_dict(), root / "small.pt")
    return {"root": root, "images": root / "images", "pt": root / "r18.pt", "st": root / "r18.safetensors",
            "fmnist": fm, "small": root / "small.pt"}


@pytest.fixture(scope="module")
def purified(files) -> Path:
    out = files["root"] / "pure.safetensors"
    code = cli.main(["purify", "resnet18", "-c", str(files["pt"]), "--data", str(files["images"]), "--image-size",
                     "32", "--channels", "layer4:0,1,2", "--n-refs", "6", "-o", str(out), "-q"])
    assert code == 0 and out.is_file()
    return out


@pytest.fixture(scope="module")
def purified_fashion(files) -> Path:
    out = files["root"] / "fashion.safetensors"
    code = cli.main(["purify", "resnet18", "-c", str(files["small"]), "--blocks", "1,1,1,1", "--stem-stride", "2",
                     "--fashion-mnist", str(files["fmnist"]), "--layers", "layer4", "layer3",
                     "--channels", "layer4:3,5", "--channels", "layer3:1", "--n-refs", "10", "-o", str(out), "-q"])
    assert code == 0 and out.is_file()
    return out


# ------------------------------------------------------------------------------------------ help
def test_version(capsys):
    code, out, _ = run(capsys, "--version")
    assert code == 0 and out.strip() == f"purenn {__version__}"


@pytest.mark.parametrize("command", (None, *COMMANDS))
def test_help_lists_exit_codes(capsys, command):
    code, out, _ = run(capsys, *([command] if command else []), "--help")
    assert code == 0
    assert "exit codes:" in out and "130" in out
    for c, text in cli.EXIT_CODES.items():
        assert f"{c:<4} {text}"[:40] in " ".join(out.split("\n"))


def test_entry_point_in_a_subprocess():
    exe = shutil.which("purenn")  # the console script when installed, else python -m purenn
    cmd = [exe] if exe is not None else [sys.executable, "-m", "purenn"]
    res = subprocess.run([*cmd, "inspect", "missing.safetensors"], capture_output=True, text=True, timeout=300)
    assert res.returncode == 3 and "does not exist" in res.stderr and "Traceback" not in res.stderr


# ------------------------------------------------------------------------------------------ commands
def test_inspect(capsys, purified):
    code, out, _ = run(capsys, "inspect", purified)
    assert code == 0
    assert "resnet18" in out and "most polysemantic" in out
    assert "layer4  layer3" in out
    assert "score (layer4): polysemanticity (contrast+upstream score): how balanced and how different" in out
    code, out, _ = run(capsys, "inspect", purified, "--json", "--top", "2")
    info = json.loads(out)
    assert info["architecture"]["builder"] == "resnet18" and info["architecture"]["num_classes"] == 3
    (layer,) = info["layers"]
    assert layer["fitted"] == 3 and layer["virtual"] == 512 + 3 and layer["score_kind"] == "contrast+upstream"
    scores = [r["score"] for r in info["top_neurons"]]
    assert len(scores) == 2 and scores == sorted(scores, reverse=True)
    row = info["top_neurons"][0]
    assert [v["name"] for v in row["virtual"]] == [f"{row['channel']}.0", f"{row['channel']}.1"]
    assert sum(v["n_refs"] for v in row["virtual"]) == 6


def test_purify_with_the_upstream_score(capsys, files):
    out = files["root"] / "up.safetensors"
    code, _, _ = run(capsys, "purify", "resnet18", "-c", files["pt"], "--data", files["images"], "--image-size",
                     "32", "--channels", "layer4:0,1,2", "--n-refs", "6", "--score", "contrast+upstream",
                     "-o", out, "-q")
    assert code == 0
    code, out_text, _ = run(capsys, "inspect", out, "--json")
    (layer,) = json.loads(out_text)["layers"]
    assert code == 0 and layer["score_kind"] == "contrast+upstream"
    code, _, err = run(capsys, "purify", "resnet18", "-c", str(files["pt"]), "--data", str(files["images"]),
                       "--score", "upstream", "-o", str(files["root"] / "bad.safetensors"))
    assert code == 2 and "invalid choice" in err and "contrast+upstream" in err


def test_purify_from_safetensors_checkpoint_and_from_a_purified_file(capsys, files, purified, tmp_path):
    out = tmp_path / "a.safetensors"
    code, stdout, _ = run(capsys, "purify", "resnet18", "-c", files["st"], "--data", files["images"], "--image-size",
                          "32", "--limit", "12", "--channels", "layer3.1:4", "--n-refs", "5", "--n-clusters", "3",
                          "-o", out, "-q")
    assert code == 0 and "layer3.1: 1 of 256 channels purified into 3 virtual neurons; the layer has 258" in stdout
    again = tmp_path / "b.safetensors"
    code, stdout, _ = run(capsys, "purify", purified, "--data", files["images"], "--image-size", "32",
                          "--channels", "layer4:7", "--n-refs", "6", "--n-clusters", "auto", "-o", again, "-q")
    assert code == 0 and again.is_file()
    import purenn

    a, b = purenn.load_purified(purified), purenn.load_purified(again)
    sa, sb = a.base_model.state_dict(), b.base_model.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    assert b.pure_layer("layer4").neurons.tolist() == [7] and 1 <= int(b.pure_layer("layer4").n_clusters[0]) <= 4


def test_fashion_mnist_adapted_stem_show_and_probe(capsys, files, purified_fashion, tmp_path):
    import purenn

    pm = purenn.load_purified(purified_fashion)
    assert pm.layers == ["layer3", "layer4"] and isinstance(pm.base_model.maxpool, torch.nn.Identity)
    assert pm.base_model.conv1.stride == (2, 2) and pm.base_model.conv1.in_channels == 1
    fig = tmp_path / "neuron.png"
    code, out, _ = run(capsys, "show", purified_fashion, "--fashion-mnist", files["fmnist"], "--layer", "layer4",
                       "--neuron", "5", "--n-images", "3", "-o", fig, "-q")
    assert code == 0 and "layer4 neuron 5" in out
    with Image.open(fig) as im:
        im.load()
        assert im.format == "PNG" and im.width > 300 and im.height > 200
    code, out, _ = run(capsys, "probe", purified_fashion, "--fashion-mnist", files["fmnist"], "--split", "test",
                       "--labels", "coarse", "--layer", "layer3", "--json", "-q")
    assert code == 0
    res = json.loads(out)
    assert res["layer"] == "layer3" and res["labels"] == "coarse" and res["n_train"] + res["n_test"] == 20
    assert res["pure"]["features"] == res["original"]["features"] + 1
    assert 0 <= res["pure"]["accuracy"] <= 1


def test_show_default_neuron_and_tsne(capsys, files, purified):
    fig = files["root"] / "default.png"
    code, out, _ = run(capsys, "show", purified, "--data", files["images"], "--image-size", "32", "--embedding",
                       "tsne", "-o", fig, "-q")
    assert code == 0
    import purenn

    pl = purenn.load_purified(purified).pure_layer("layer4")
    best = int(pl.neurons[int(pl.scores.argmax())])
    assert f"layer4 neuron {best}" in out
    with Image.open(fig) as im:
        im.load()
        assert im.format == "PNG"


def test_export_and_probe_the_onnx_file(capsys, files, purified, tmp_path):
    onnx_path = tmp_path / "pure.onnx"
    code, out, _ = run(capsys, "export", purified, onnx_path, "--input-shape", "3,32,32", "-q")
    assert code == 0 and onnx_path.is_file()
    assert "verified with ONNX Runtime" in out and "FAIL" not in out
    assert "logits, pure.layer4, gate.layer4" in out
    code, out, _ = run(capsys, "probe", onnx_path, "--data", files["images"], "--image-size", "32", "--json", "-q")
    assert code == 0
    from_onnx = json.loads(out)
    code, out, _ = run(capsys, "probe", purified, "--data", files["images"], "--image-size", "32", "--json", "-q")
    from_torch = json.loads(out)
    assert from_onnx["pure"]["features"] == from_torch["pure"]["features"] == 515
    assert abs(from_onnx["pure"]["accuracy"] - from_torch["pure"]["accuracy"]) <= 1 / from_torch["n_test"]
    code, out, err = run(capsys, "probe", onnx_path, "--data", files["images"], "--image-size", "40")
    assert code == 3 and "--image-size 32" in err


def test_export_logits_only(capsys, purified, tmp_path):
    onnx_path = tmp_path / "lean.onnx"
    code, out, _ = run(capsys, "export", purified, onnx_path, "--input-shape", "3,32,32", "--outputs", "logits", "-q")
    assert code == 0 and onnx_path.is_file()
    assert "verified with ONNX Runtime" in out and "FAIL" not in out
    assert "outputs: logits\n" in out
    import onnxruntime as ort

    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    assert [o.name for o in session.get_outputs()] == ["logits"]


# ------------------------------------------------------------------------------------------ errors
@pytest.fixture(scope="module")
def bad_inputs(files) -> dict[str, Path]:
    root = files["root"] / "bad"
    (root / "empty").mkdir(parents=True)
    (root / "corrupt" / "a").mkdir(parents=True)
    shutil.copy(files["images"] / "cat" / "0.png", root / "corrupt" / "a" / "0.png")
    (root / "corrupt" / "a" / "1.png").write_bytes(b"not an image")
    (root / "notes.txt").write_text("hello")
    torch.save(torchvision.models.resnet18(num_classes=3), root / "whole_model.pt")
    return {"empty": root / "empty", "corrupt": root / "corrupt", "text": root / "notes.txt",
            "pickled": root / "whole_model.pt", "root": root}


ERRORS = [
    # (argv with placeholders, exit code, message fragment)
    (["purify", "resnet18", "-c", "{root}/missing.pt", "--data", "{images}"], 3, "does not exist"),
    (["purify", "resnet34", "-c", "{pt}", "--data", "{images}"], 3, "wrong architecture"),
    (["purify", "resnet50", "-c", "{st}", "--data", "{images}"], 3, "not a Bottleneck ResNet"),
    (["purify", "vgg16", "-c", "{pt}", "--data", "{images}"], 3, "unknown architecture"),
    (["purify", "resnet18", "--data", "{images}"], 3, "needs trained weights"),
    (["purify", "{pt}", "--data", "{images}"], 3, "give the architecture first"),
    (["purify", "{st}", "--data", "{images}"], 3, "plain weights"),
    (["purify", "resnet18", "-c", "{text}", "--data", "{images}"], 3, "not a PyTorch checkpoint"),
    (["purify", "resnet18", "-c", "{pickled}", "--data", "{images}"], 3, "state_dict"),
    (["purify", "resnet18", "-c", "{pt}", "--data", "{root}/nowhere"], 3, "does not exist"),
    (["purify", "resnet18", "-c", "{pt}", "--data", "{empty}"], 3, "one sub-folder per class"),
    (["purify", "resnet18", "-c", "{pt}", "--data", "{text}"], 3, "is a file"),
    (["purify", "resnet18", "-c", "{pt}", "--data", "{corrupt}", "--image-size", "32", "--n-refs", "2",
      "--channels", "layer4:0"], 3, "1.png"),
    (["purify", "resnet18", "-c", "{pt}", "--fashion-mnist", "{root}/nowhere"], 3, "IDX files"),
    (["purify", "resnet18", "-c", "{pt}", "--data", "{images}", "--layers", "layer9"], 3, "unknown layer"),
    (["purify", "resnet18", "-c", "{pt}", "--data", "{images}", "--channels", "layer4:x"], 3, "LAYER:C1,C2"),
    (["purify", "resnet18", "-c", "{pt}", "--data", "{images}", "--layers", "layer4", "--neurons", "layer3:4"], 3,
     "not among --layers"),
    (["purify", "resnet18", "-c", "{pt}", "--data", "{images}", "-o", "{root}/x.pt"], 3, "must end in .safetensors"),
    (["purify", "resnet18", "-c", "{pt}", "--data", "{images}", "-o", "{root}/no/x.safetensors"], 3,
     "does not exist"),
    (["purify", "resnet18", "-c", "{pt}", "--data", "{images}", "--n-refs", "500"], 3, "fewer than n_refs"),
    (["purify", "resnet18", "-c", "{pt}", "--data", "{images}", "--device", "gpu0"], 3, "not a device"),
    (["purify", "resnet18", "-c", "{pt}"], 2, "--data"),
    (["purify", "resnet18", "-c", "{pt}", "--data", "{images}", "--n-clusters", "many"], 2, "'auto'"),
    (["purify", "resnet18", "-c", "{pt}", "--data", "{images}", "--blocks", "1,2"], 2, "four positive integers"),
    (["inspect", "{root}/missing.safetensors"], 3, "does not exist"),
    (["inspect", "{st}"], 3, "not a purenn model"),
    (["inspect", "{text}"], 3, "not a readable safetensors file"),
    (["inspect", "{pure}", "--frobnicate"], 2, "unrecognized arguments"),
    (["export", "{pure}", "{root}/x.onnx"], 2, "--input-shape"),
    (["export", "{pure}", "{root}/x.onnx", "--input-shape", "3,32"], 2, "C,H,W"),
    (["export", "{pure}", "{root}/x.onnx", "--input-shape", "1,32,32"], 3, "channels"),
    (["export", "{pure}", "{root}/x.txt", "--input-shape", "3,32,32"], 3, "must end in .onnx"),
    (["export", "{pure}", "{root}/no/x.onnx", "--input-shape", "3,32,32"], 3, "does not exist"),
    (["export", "{pure}", "{root}/x.onnx", "--input-shape", "3,32,32", "--outputs", "logits,probs"], 3,
     "allowed: 'logits', 'pure', 'gate'"),
    (["export", "{pure}", "{root}/x.onnx", "--input-shape", "3,32,32", "--outputs", "gate"], 3,
     "must contain 'logits'"),
    (["show", "{pure}", "--data", "{images}", "--neuron", "99"], 3, "not a purified channel"),
    (["show", "{pure}", "--data", "{images}", "--layer", "layer2"], 3, "not purified"),
    (["show", "{pure}", "--data", "{images}", "--image-size", "32", "--limit", "2"], 3, "same data"),
    (["probe", "{root}/missing.onnx", "--data", "{images}"], 3, "does not exist"),
    (["probe", "{pure}", "--data", "{images}", "--test-fraction", "2"], 3, "between 0 and 1"),
]


@pytest.mark.parametrize("argv, code, fragment", ERRORS, ids=[" ".join(e[0][:3]) + f" #{i}" for i, e in
                                                              enumerate(ERRORS)])
def test_errors(capsys, files, bad_inputs, purified, argv, code, fragment):
    names = {**{k: str(v) for k, v in files.items()}, **{k: str(v) for k, v in bad_inputs.items()},
             "pure": str(purified)}
    got, out, err = run(capsys, *[a.format(**names) for a in argv], "-q" if argv[0] != "inspect" else "--top=3")
    assert got == code, err
    assert fragment in err
    assert "Traceback" not in err and "unexpected" not in err


def test_missing_matplotlib_exit_code(capsys, files, purified, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    code, _, err = run(capsys, "show", purified, "--data", files["images"], "--image-size", "32", "-q")
    assert code == 4 and 'pip install "purenn[viz]"' in err


@pytest.mark.parametrize("exc, code", [(RuntimeError("boom"), 1), (KeyboardInterrupt(), 130)])
def test_unexpected_and_interrupted(capsys, purified, monkeypatch, exc, code):
    def fail(args):
        raise exc

    monkeypatch.setattr(inspect_command, "run", fail)
    got, _, err = run(capsys, "inspect", purified)
    assert got == code
    if code == 1:
        assert "unexpected RuntimeError: boom" in err and "--traceback" in err and "Traceback" not in err
        got, _, err = run(capsys, "--traceback", "inspect", purified)
        assert got == 1 and "Traceback" in err


# ------------------------------------------------------------------------------------------ no silent mismatches
@pytest.fixture(scope="module")
def recorded(files) -> Path:
    """The adapted-stem (stride 2) model of ``files["small"]`` saved with its architecture (save_checkpoint)."""
    from purenn.cli.loaders import load_checkpoint_model, save_checkpoint

    model = load_checkpoint_model("resnet18", files["small"], blocks=[1, 1, 1, 1], stem_stride=2)
    return save_checkpoint(model, files["root"] / "recorded.safetensors")


def test_checkpoint_records_its_architecture_and_purify_rebuilds_it(capsys, files, recorded, tmp_path):
    out = tmp_path / "p.safetensors"
    code, _, err = run(capsys, "purify", "resnet18", "-c", recorded, "--blocks", "1,1,1,1", "--fashion-mnist",
                       files["fmnist"], "--channels", "layer4:3,5", "--n-refs", "6", "-o", out, "-q")
    assert code == 0, err
    import purenn
    from purenn.cli.loaders import load_checkpoint_model, save_checkpoint

    original = load_checkpoint_model("resnet18", files["small"], blocks=[1, 1, 1, 1], stem_stride=2)
    base = purenn.load_purified(out).base_model
    assert base.conv1.stride == (2, 2) and isinstance(base.maxpool, torch.nn.Identity)
    x = torch.rand(4, 1, 28, 28)
    assert torch.equal(base(x), original(x))
    # a .pt written by save_checkpoint records it too
    pt = save_checkpoint(original, tmp_path / "m.pt")
    assert load_checkpoint_model("resnet18", pt, blocks=[1, 1, 1, 1]).conv1.stride == (2, 2)


def test_an_ambiguous_stem_is_refused(capsys, files, recorded):
    code, _, err = run(capsys, "purify", "resnet18", "-c", files["small"], "--blocks", "1,1,1,1", "--fashion-mnist",
                       files["fmnist"], "--channels", "layer4:3", "--n-refs", "6", "-q")
    assert code == 3 and "--stem-stride 1 or --stem-stride 2" in err and "3x3 stem" in err
    code, _, err = run(capsys, "purify", "resnet18", "-c", recorded, "--blocks", "1,1,1,1", "--stem-stride", "1",
                       "--fashion-mnist", files["fmnist"], "-q")
    assert code == 3 and "records a stem stride of 2" in err


def test_a_model_at_chance_level_is_warned_about(capsys, files, tmp_path):
    # an untrained model: at chance, a warning (even with -q)
    code, _, err = run(capsys, "purify", "resnet18", "-c", files["small"], "--blocks", "1,1,1,1", "--stem-stride",
                       "2", "--fashion-mnist", files["fmnist"], "--channels", "layer4:3", "--n-refs", "6", "-q",
                       "-o", tmp_path / "b.safetensors")
    assert code == 0 and "warning: the model is near chance level on this data" in err and "--stem-stride" in err


@pytest.mark.slow
def test_a_trained_model_is_not_warned_about(capsys, files, tmp_path):
    from purenn.cli.datasets import train_classifier
    from purenn.cli.loaders import load_data, save_checkpoint

    data = load_data(fashion_mnist=str(files["fmnist"]), in_channels=1)
    torch.manual_seed(0)
    model = small_image_resnet(blocks=[1, 1, 1, 1], stem_stride=2, num_classes=5)
    model = train_classifier(model, data.dataset, epochs=15, batch_size=12, lr=3e-3, progress=False)
    ckpt = save_checkpoint(model, tmp_path / "trained.safetensors")
    code, _, err = run(capsys, "purify", "resnet18", "-c", ckpt, "--blocks", "1,1,1,1", "--fashion-mnist",
                       files["fmnist"], "--channels", "layer4:3", "--n-refs", "6", "-o", tmp_path / "a.safetensors")
    assert code == 0 and "model accuracy on 60 samples of this data (superclasses)" in err
    assert "near chance" not in err


def test_show_and_probe_refuse_other_data(capsys, files, purified, purified_fashion, tmp_path):
    code, out, _ = run(capsys, "inspect", purified_fashion)
    assert code == 0 and f"reference samples from: --fashion-mnist {files['fmnist']} --split train" in out
    fig = tmp_path / "x.png"
    code, _, err = run(capsys, "show", purified_fashion, "--fashion-mnist", files["fmnist"], "--split", "test",
                       "--limit", "20", "-o", fig, "-q")  # 20 test images: another count
    assert code == 3 and f"purified on --fashion-mnist {files['fmnist']} --split train" in err and not fig.exists()
    # the same count, other images (another normalisation)
    code, _, err = run(capsys, "show", purified, "--data", files["images"], "--image-size", "32", "--mean", "0", "0",
                       "0", "--std", "1", "1", "1", "-o", fig, "-q")
    assert code == 3 and "reference images differ" in err and f"--data {files['images']} --image-size 32" in err
    # probe: other samples are fine, other preprocessing is not
    code, _, err = run(capsys, "probe", purified, "--data", files["images"], "--image-size", "40", "-q")
    assert code == 3 and "preprocessed otherwise" in err and "input shape [3, 32, 32] vs [3, 40, 40]" in err
