"""Resumable fits: a run killed (SIGKILL) during the reference pass or the relevance stage continues
where it stopped and writes the same file as an uninterrupted run; other arguments or data are refused."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

import purenn
from purenn.arch import ResNetSpec

HERE = Path(__file__).parent

sys.path.insert(0, str(HERE))
import _resume_worker  # noqa: E402


@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_thread):
    """The subprocesses run with OMP_NUM_THREADS=1; so does this process while these tests run."""


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """The uninterrupted run's file (with a checkpoint folder of its own)."""
    root = tmp_path_factory.mktemp("resume")
    _resume_worker.run(root / "ck", root / "uninterrupted.safetensors")
    return root / "uninterrupted.safetensors"


def killed_run(folder: Path, out: Path, when: str) -> None:
    env = dict(os.environ, PURENN_TEST_KILL_AFTER=when, PURENN_CHECKPOINT_INTERVAL="0", OMP_NUM_THREADS="1")
    run = subprocess.run([sys.executable, str(HERE / "_resume_worker.py"), str(folder), str(out)], env=env,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == -signal.SIGKILL, run.stderr[-2000:]
    assert not out.exists()


def same_file(a: Path, b: Path) -> bool:
    """Equal metadata and bit-equal tensors (the bytes of the JSON header can differ between processes:
    safetensors writes the metadata map in a per-process hash order)."""
    with safe_open(a, "pt") as fa, safe_open(b, "pt") as fb:
        return (fa.metadata() == fb.metadata() and set(fa.keys()) == set(fb.keys())
                and all(torch.equal(fa.get_tensor(k), fb.get_tensor(k)) for k in fa.keys()))


def counting(monkeypatch) -> list[int]:
    """Count the forward passes (``ResNetSpec.run_until`` calls) of this process."""
    calls = [0]
    original = ResNetSpec.run_until

    def run_until(self, *args, **kwargs):
        calls[0] += 1
        return original(self, *args, **kwargs)

    monkeypatch.setattr(ResNetSpec, "run_until", run_until)
    return calls


def upstream_batches(out: Path) -> int:
    """Forward passes of the default score's pooled upstream activations: a run with a checkpoint
    keeps no activation cache, so it runs the distinct references forward, in batches of 8."""
    import purenn

    return -(-len(torch.unique(purenn.load_purified(out).pure_layer("layer4").ref_indices)) // 8)


def test_killed_during_collection_resumes_to_the_same_file(tmp_path, reference, monkeypatch):
    killed_run(tmp_path / "ck", tmp_path / "out.safetensors", "collect:2")
    state = torch.load(tmp_path / "ck" / "collect.rank0.pt", weights_only=True)
    assert state["next"] == 16  # two batches of 8 were done when it died
    calls = counting(monkeypatch)
    _resume_worker.run(tmp_path / "ck", tmp_path / "out.safetensors")
    chunks = len(list((tmp_path / "ck" / "relevance").glob("chunk*.pt")))
    # the 4 remaining batches, every relevance chunk, the references' pooled upstream activations
    assert calls[0] == (6 - 2) + chunks + upstream_batches(tmp_path / "out.safetensors")
    assert same_file(tmp_path / "out.safetensors", reference)


def test_killed_during_relevance_resumes_to_the_same_file(tmp_path, reference, monkeypatch):
    killed_run(tmp_path / "ck", tmp_path / "out.safetensors", "relevance:2")
    done = sorted((tmp_path / "ck" / "relevance").glob("chunk*.pt"))
    assert len(done) == 2
    stamps = {p: p.stat().st_mtime_ns for p in done}
    calls = counting(monkeypatch)
    _resume_worker.run(tmp_path / "ck", tmp_path / "out.safetensors")
    chunks = len(list((tmp_path / "ck" / "relevance").glob("chunk*.pt")))
    # no reference pass, only the unfinished chunks (and the pooled upstream activations)
    assert chunks > 2 and calls[0] == chunks - 2 + upstream_batches(tmp_path / "out.safetensors")
    assert all(p.stat().st_mtime_ns == t for p, t in stamps.items())  # finished chunks were reused
    assert same_file(tmp_path / "out.safetensors", reference)


def test_same_result_as_without_checkpoints(tmp_path, reference):
    """Without a folder the activation cache is used: the same references, floats within 1e-5."""
    pm = _resume_worker.run(None, tmp_path / "plain.safetensors")
    ref = purenn.load_purified(reference)
    a, b = pm.pure_layer("layer4"), ref.pure_layer("layer4")
    assert torch.equal(a.ref_indices, b.ref_indices) and torch.equal(a.ref_clusters, b.ref_clusters)
    torch.testing.assert_close(a.centroids, b.centroids, rtol=1e-5, atol=1e-6)


def other_model():
    m = _resume_worker.model()
    with torch.no_grad():
        m.fc.bias.add_(1.0)
    return m


@pytest.mark.parametrize("change, what", [
    ({"n_refs": 5}, "arguments"),
    ({"seed": 1}, "arguments"),
    ({"rule": "epsilon"}, "arguments"),
    ({"data": _resume_worker.data()[:40]}, "data_length"),
    ({"data": _resume_worker.data().flip(0)}, "data_sha256"),
    ({"model": other_model()}, "model_sha256"),
])
def test_other_arguments_model_or_data_are_refused(reference, change, what):
    folder = reference.parent / "ck"  # the finished uninterrupted run's folder
    before = (folder / "run.json").read_text()
    with pytest.raises(purenn.ConfigError, match=f"holds a run with other [a-z_, ]*{what}"):
        _resume_worker.run(folder, None, **change)
    assert (folder / "run.json").read_text() == before


def test_a_file_is_not_a_checkpoint_folder(tmp_path):
    (tmp_path / "f").write_text("")
    with pytest.raises(purenn.ConfigError, match="not a folder"):
        _resume_worker.run(tmp_path / "f", None)


@pytest.mark.slow
def test_two_ranks_killed_during_relevance_resume_to_the_single_process_file(tmp_path, reference):
    """torchrun with 2 ranks, one rank SIGKILLed after its first relevance chunk (torchrun then stops
    the other), run again: the file equals the single-process uninterrupted run's."""
    def torchrun(extra_env):
        env = dict(os.environ, OMP_NUM_THREADS="1", **extra_env)
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               str(HERE / "_resume_worker.py"), str(tmp_path / "ck"), str(tmp_path / "out.safetensors")]
        return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)

    killed = torchrun({"PURENN_TEST_KILL_AFTER": "relevance:1", "PURENN_CHECKPOINT_INTERVAL": "0"})
    assert killed.returncode != 0 and not (tmp_path / "out.safetensors").exists()
    assert {p.name for p in (tmp_path / "ck").glob("collect.rank*.pt")} == {"collect.rank0.pt", "collect.rank1.pt"}
    assert 1 <= len(list((tmp_path / "ck" / "relevance").glob("chunk*.pt"))) <= 2
    resumed = torchrun({})
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert same_file(tmp_path / "out.safetensors", reference)
