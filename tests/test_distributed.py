"""torch.distributed: exact top-n merge, shards, and a 2-process Gloo run equal to one process."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from purenn.common.distributed import merge_top, rank_zero_write, shard_range, world_info
from purenn.fit.cluster import CircuitKMeans, fit_by_neuron
from purenn.fit.collect import TopK

HERE = Path(__file__).parent

sys.path.insert(0, str(HERE))
import _dist_worker  # noqa: E402


@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_thread):
    """The subprocesses run with OMP_NUM_THREADS=1; so does this process while these tests run."""


def test_merge_top_breaks_ties_by_index():
    v = torch.tensor([[1.0, 0.0], [3.0, -0.0], [3.0, 0.0], [2.0, 0.0]])
    i = torch.tensor([[7, 7], [9, 9], [4, 4], [1, 1]])
    mv, mi = merge_top(v, i, 3)
    assert mi[:, 0].tolist() == [4, 9, 1] and mv[:, 0].tolist() == [3.0, 3.0, 2.0]
    assert mi[:, 1].tolist() == [1, 4, 7]  # all equal (with -0.0): smallest indices


@pytest.mark.parametrize("batch", [1, 3, 4, 10])
def test_topk_with_ties_does_not_depend_on_batches(batch):
    g = torch.Generator().manual_seed(0)
    scores = torch.randint(0, 4, (10, 5), generator=g).float()  # many ties
    scores[:, 0] = 0  # a dead channel: every sample ties
    top = TopK(4)
    for s in range(0, 10, batch):
        top.update(scores[s : s + batch], s)
    # the reference rule: sort by (-score, index)
    for c in range(5):
        expected = sorted(range(10), key=lambda j: (-scores[j, c].item(), j))[:4]
        assert top.result().indices[c].tolist() == expected


def test_shards_cover_the_data_in_whole_batches():
    for n, bs, world in [(45, 8, 2), (45, 8, 3), (7, 8, 2), (100, 1, 7)]:
        spans = [shard_range(n, bs, rank=r, world=world) for r in range(world)]
        assert spans[0][0] == 0 and spans[-1][1] == n
        assert all(a[1] == b[0] for a, b in zip(spans, spans[1:]))
        assert all(lo % bs == 0 for lo, _ in spans)


def test_single_process_helpers_are_identities(tmp_path):
    assert world_info() == (0, 1)
    assert rank_zero_write(lambda: 5) == 5
    x = np.random.default_rng(0).normal(size=(3, 8, 4))
    km = CircuitKMeans("auto", max_clusters=3)
    fitted = fit_by_neuron(km, x)
    assert not hasattr(km, "centroids_")  # the caller's estimator is not changed
    ref = CircuitKMeans("auto", max_clusters=3).fit(x)
    assert np.array_equal(fitted.centroids_, ref.centroids_) and np.array_equal(fitted.labels_, ref.labels_)


def test_two_ranks_give_the_single_process_result(tmp_path):
    """A 2-process Gloo run (torchrun) against one process: same references and integer tensors,
    float tensors within 1e-5 relative (bit-identical here: every sample is computed in the same
    batch either way), the same saved file, and only rank 0 writes."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(HERE / "_dist_worker.py"), str(tmp_path)]
    run = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    _dist_worker.main(tmp_path)  # the single-process reference, in this process
    for case in _dist_worker.cases():
        one = torch.load(tmp_path / f"{case}.world1.rank0.pt")
        for rank in (0, 1):
            two = torch.load(tmp_path / f"{case}.world2.rank{rank}.pt")
            assert one.keys() == two.keys()
            for key, a in one.items():
                b = two[key]
                if a.is_floating_point():
                    torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5 * float(a.abs().max()), msg=key)
                else:
                    assert torch.equal(a, b), (case, rank, key)
            assert not (tmp_path / f"{case}.rank1.safetensors").exists()  # rank 1 wrote nothing
        f1, f2 = load_file(tmp_path / f"{case}.world1.safetensors"), load_file(tmp_path / f"{case}.world2.safetensors")
        assert f1.keys() == f2.keys()
        for key in f1:
            torch.testing.assert_close(f2[key], f1[key], rtol=1e-5, atol=0, msg=key)
    for rank in (0, 1):
        assert "map-style dataset" in (tmp_path / f"iterable.rank{rank}.txt").read_text()
        assert "rank(s) [1] differ from rank 0" in (tmp_path / f"mismatch.rank{rank}.txt").read_text()
        assert (tmp_path / f"few.rank{rank}.txt").read_text() == "(512, 5) [0, 1, 2, 3, 4]"
        assert (tmp_path / f"export.rank{rank}.txt").read_text() == f"True {tmp_path / 'export.onnx'}"
    assert (tmp_path / "export.onnx").is_file() and not (tmp_path / "export.rank1.onnx").exists()


@pytest.mark.slow
def test_torchrun_purify_command(tmp_path):
    """``torchrun --nproc_per_node=2 -m purenn purify ...`` writes one file (rank 0), equal to the
    single-process command's within 1e-5 relative, with the same references."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for c, name in enumerate(("cat", "dog")):
        (tmp_path / "images" / name).mkdir(parents=True)
        for i in range(9):
            Image.fromarray((rng.random((36, 36, 3)) * 120 + 60 * c).astype(np.uint8)).save(
                tmp_path / "images" / name / f"{i}.png")
    torch.save(_dist_worker.model().state_dict(), tmp_path / "r18.pt")
    args = ["purify", "resnet18", "-c", str(tmp_path / "r18.pt"), "--data", str(tmp_path / "images"),
            "--image-size", "32", "--channels", "layer4:0,5,9,13", "--n-refs", "5", "--batch-size", "4", "-q"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    one = subprocess.run([sys.executable, "-m", "purenn", *args, "-o", str(tmp_path / "one.safetensors")],
                         env=env, capture_output=True, text=True, timeout=300)
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          "-m", "purenn", *args, "-o", str(tmp_path / "two.safetensors")],
                         env=env, capture_output=True, text=True, timeout=300)
    assert one.returncode == 0 and two.returncode == 0, (one.stderr[-2000:], two.stderr[-2000:])
    assert two.stdout.count("saved ") == 1  # rank 0 alone reports
    f1, f2 = load_file(tmp_path / "one.safetensors"), load_file(tmp_path / "two.safetensors")
    assert f1.keys() == f2.keys()
    for key in f1:
        if f1[key].is_floating_point():
            torch.testing.assert_close(f2[key], f1[key], rtol=1e-5, atol=1e-5 * float(f1[key].abs().max()), msg=key)
        else:
            assert torch.equal(f1[key], f2[key]), key
