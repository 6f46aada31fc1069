"""The demo: it explains, writes a figure and files, and the purenn commands it prints work on those files."""

from __future__ import annotations

import gzip
import inspect
import shlex
import struct
from pathlib import Path

import numpy as np
import pytest

from purenn import purify_model
from purenn.cli import app as cli
from purenn.cli import demo
from purenn.cli.datasets import planted_concepts
from purenn.fit.cluster import CircuitKMeans


def write_idx(path: Path, array: np.ndarray) -> None:
    arr = np.ascontiguousarray(array, dtype=np.uint8)
    header = bytes([0, 0, 0x08, arr.ndim]) + struct.pack(f">{arr.ndim}I", *arr.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + arr.tobytes())


def test_one_default_score_in_the_api_the_command_and_the_demo():
    api = inspect.signature(purify_model).parameters["score"].default
    kmeans = inspect.signature(CircuitKMeans).parameters["score"].default
    command = cli.build_parser().parse_args(["purify", "resnet18", "--data", "x"]).score
    assert api == command == demo.DEMO_SETTINGS["score"] == "contrast+upstream"
    assert kmeans == "contrast"  # the estimator sees circuits only


@pytest.fixture(scope="module")
def fashion_dir(tmp_path_factory) -> Path:
    """Fashion-MNIST-format IDX files of 120 training and 40 test images of the planted concepts."""
    root = tmp_path_factory.mktemp("fmnist")
    for n, prefix, seed in ((120, "train", 0), (40, "t10k", 1)):
        ds = planted_concepts(n, seed=seed)
        pixels = ((ds.images[:, 0] * 0.35 + 0.25).clamp(0, 1) * 255).round().numpy()
        write_idx(root / f"{prefix}-images-idx3-ubyte.gz", pixels)
        write_idx(root / f"{prefix}-labels-idx1-ubyte.gz", ds.fine.numpy())
    return root


@pytest.mark.slow
def test_demo_explains_and_its_printed_commands_work(fashion_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("PURENN_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "demo"
    assert demo.main(["--root", str(fashion_dir), "--neurons", "2", "--out-dir", str(out), "-q"]) == 0
    stdout = capsys.readouterr().out
    for word in ("virtual neuron ", "references ", "score ", "circuit "):
        assert f"\n  {word}" in stdout, word
    assert "2 of 512 channels purified into 4 virtual neurons; the layer has 514 virtual neurons" in stdout
    figure = next(line.split()[1] for line in stdout.splitlines() if line.startswith("figure: "))
    assert Path(figure).is_file() and Path(figure).parent == out
    assert (out / "model.safetensors").is_file() and (out / "purified.safetensors").is_file()

    commands = [shlex.split(line.split("   #")[0])[1:] for line in stdout.splitlines()
                if line.startswith("  ") and Path(line.split()[0]).name == "purenn"]
    assert [c[0] for c in commands] == ["inspect", "export", "show", "probe", "purify"]
    for argv in commands:
        code = cli.main(argv + (["-q"] if argv[0] != "inspect" else []))
        captured = capsys.readouterr()
        assert code == 0, (argv, captured.err)
    assert (out / "show.png").is_file() and (out / "purified.onnx").is_file()
    assert (out / "again.safetensors").is_file()
    # the model rebuilt from the demo's checkpoint is the demo's model: the same references and clusters
    import purenn

    a, b = purenn.load_purified(out / "purified.safetensors"), purenn.load_purified(out / "again.safetensors")
    la, lb = a.pure_layer("layer4"), b.pure_layer("layer4")
    assert la.neurons.tolist() == lb.neurons.tolist()
    assert la.ref_indices.tolist() == lb.ref_indices.tolist()
