"""Start-up of the ``purenn`` command and of ``import purenn``: heavy modules load only where used.

Each check runs in a fresh interpreter, since this test session has imported torch already.
"""

from __future__ import annotations

import shutil
import subprocess
import sys

import pytest

import purenn

HEAVY = ("torch", "torchvision", "sklearn", "onnx", "onnxruntime", "matplotlib")


def _loaded_heavy(code: str) -> list[str]:
    """Run ``code`` in a fresh interpreter and return the heavy modules it left in ``sys.modules``."""
    probe = f"{code}\nimport sys\nprint(' '.join(m for m in {HEAVY!r} if m in sys.modules))"
    res = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    return res.stdout.split()


@pytest.mark.parametrize("code", (
    "import purenn.cli",
    "import purenn.cli; purenn.cli.app.build_parser()",
    "import purenn; purenn.__version__",
    "from purenn import PurennError, ConfigError, __version__",
))
def test_no_heavy_imports(code):
    assert _loaded_heavy(code) == []


@pytest.mark.parametrize("argv", (["--version"], ["--help"]))
def test_version_and_help_in_a_subprocess(argv):
    exe = shutil.which("purenn")  # the console script when installed, else python -m purenn
    cmd = [exe] if exe is not None else [sys.executable, "-m", "purenn"]
    res = subprocess.run([*cmd, *argv], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0 and res.stderr == ""
    if argv == ["--version"]:
        assert res.stdout.strip() == f"purenn {purenn.__version__}"
    else:
        assert res.stdout.startswith("usage: purenn") and "exit codes:" in res.stdout


def test_lazy_public_names():
    for name in purenn.__all__:
        assert getattr(purenn, name) is not None, name
    assert set(purenn.__all__) <= set(dir(purenn))
    from purenn import PurifiedModel, export_onnx
    from purenn.io.onnx import export_onnx as direct
    from purenn.model.purified import PurifiedModel as defined

    assert PurifiedModel is defined and export_onnx is direct
    namespace: dict = {}
    exec("from purenn import *", namespace)
    assert set(purenn.__all__) <= set(namespace)


def test_submodules_as_attributes_and_unknown_names():
    assert purenn.io.onnx.DEFAULT_OPSET >= 13  # ``import purenn`` then purenn.<submodule>, as before
    from purenn.common.choices import GATES, SCORES
    from purenn.fit.cluster import SCORES as cluster_scores
    from purenn.model.gates import GATES as gating_gates

    assert GATES is gating_gates and SCORES is cluster_scores
    with pytest.raises(AttributeError, match="no attribute 'not_a_name'"):
        purenn.not_a_name  # noqa: B018
