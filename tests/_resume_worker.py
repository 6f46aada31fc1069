"""Run as ``python tests/_resume_worker.py CHECKPOINT_DIR OUT`` by tests/test_resume.py: one small
purification with a checkpoint folder (the test kills it through ``PURENN_TEST_KILL_AFTER``)."""

from __future__ import annotations

import sys

import torch

import purenn
from _dist_worker import model  # the same small calibrated resnet18 as the distributed tests


def data() -> torch.Tensor:
    return torch.rand(48, 3, 32, 32, generator=torch.Generator().manual_seed(2))


KWARGS = dict(layers=["layer4"], n_refs=6, batch_size=8, progress=False, neurons={"layer4": list(range(0, 512, 32))})


def run(checkpoint_dir, out, **overrides):
    m, x = overrides.pop("model", None) or model(), overrides.pop("data", data())
    pm = purenn.purify_model(m, data=x, **{**KWARGS, **overrides}, checkpoint_dir=checkpoint_dir)
    if out is not None:
        pm.save(out)
    return pm


if __name__ == "__main__":
    import os

    if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # under torchrun
        torch.distributed.init_process_group("gloo")
    run(sys.argv[1], sys.argv[2])
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
