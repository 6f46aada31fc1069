"""The fast modes of the scripts in export_examples/, each run as a user would: in a subprocess (slow: CI runs
them with ``-m slow``)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "export_examples"
pytestmark = pytest.mark.slow


def run_example(name: str, *args: str) -> str:
    res = subprocess.run([sys.executable, str(EXAMPLES / name), *args], capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, f"{name} failed:\n{res.stdout[-4000:]}\n{res.stderr[-4000:]}"
    assert "Traceback" not in res.stderr
    return res.stdout


@pytest.fixture(scope="module")
def fashion_run(tmp_path_factory) -> tuple[Path, str]:
    out = tmp_path_factory.mktemp("fashion")
    return out, run_example("fashion_mnist_end_to_end.py", "--fast", "--quiet", "--out-dir", str(out))


def test_purify_image_folder_fast(tmp_path):
    stdout = run_example("purify_image_folder.py", "--fast", "--out-dir", str(tmp_path))
    assert (tmp_path / "purified.safetensors").is_file() and (tmp_path / "purified.onnx").is_file()
    assert "ONNX Runtime matches PyTorch: True" in stdout


def test_fashion_mnist_end_to_end_fast(fashion_run):
    out, stdout = fashion_run
    for name in ("purified.safetensors", "model.onnx", "purified_suppressed.safetensors", "model_suppressed.onnx",
                 "test_data.npz"):
        assert (out / name).is_file(), name
    for step in ("[train]", "[purify]", "[export]", "[onnxruntime]", "[probe]", "[suppress]", "[done]"):
        assert step in stdout
    assert "FAIL" not in stdout

    import purenn

    pm = purenn.load_purified(out / "purified_suppressed.safetensors")
    assert any(r.suppressed for r in pm.virtual_neurons)  # the suppression survived save and load


def test_onnx_runtime_consumer_fast(fashion_run):
    out, _ = fashion_run
    stdout = run_example("onnx_runtime_consumer.py", "--fast", "--work-dir", str(out))  # reuses the files above
    assert "[gates]" in stdout and "[probe]" in stdout
    assert "torch imported: False" in stdout
