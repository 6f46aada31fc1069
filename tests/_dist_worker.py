"""Run by ``torchrun --nproc_per_node=N tests/_dist_worker.py OUT`` from tests/test_distributed.py.

Every rank purifies the same small model (see ``cases()``) and writes what it got to
``OUT/<case>.rank<r>.pt``; rank 0's ``pm.save`` writes ``OUT/<case>.safetensors`` and the other
ranks' calls must write nothing (each asks to save to ``OUT/<case>.rank<r>.safetensors``).
Run without torchrun it is the single-process reference (files ``...rank0.pt`` of a world of 1).
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torchvision

import purenn
from purenn.common.distributed import world_info


def model() -> torch.nn.Module:
    torch.manual_seed(0)
    m = torchvision.models.resnet18(num_classes=5)
    for mod in m.modules():  # BatchNorm statistics that keep activations in a realistic range
        if isinstance(mod, torch.nn.BatchNorm2d):
            mod.reset_running_stats()
            mod.momentum = None
    m.train()
    with torch.no_grad():
        m(torch.rand(16, 3, 32, 32, generator=torch.Generator().manual_seed(1)))
    return m.eval()


def data() -> torch.Tensor:
    x = torch.rand(45, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    x[40:] = x[3]  # duplicates: equal activations, so ties the merge must break by data index
    return x


def cases() -> dict[str, dict]:
    common = dict(layers=["layer3", "layer4"], n_refs=6, batch_size=8, progress=False,
                  neurons={"layer3": list(range(0, 256, 16)), "layer4": list(range(0, 512, 32))})
    return {
        "cached": dict(common, n_clusters=2),
        "recompute": dict(common, n_clusters="auto", max_clusters=3, cache_memory=0, score="contrast+upstream"),
    }


def summary(pm) -> dict[str, torch.Tensor]:
    out = {}
    for name in pm.layers:
        pl = pm.pure_layer(name)
        for key in ("centroids", "n_clusters", "scores", "ref_counts", "ref_indices", "ref_clusters", "neurons"):
            out[f"{name}.{key}"] = getattr(pl, key).detach().cpu().clone()
    return out


def main(out: Path) -> None:
    started = False
    if "WORLD_SIZE" in __import__("os").environ and not dist.is_initialized():
        dist.init_process_group("gloo")
        started = True
    rank, world = world_info()
    m, x = model(), data()
    for case, kwargs in cases().items():
        pm = purenn.purify_model(m, data=x, **kwargs)
        torch.save(summary(pm), out / f"{case}.world{world}.rank{rank}.pt")
        target = out / f"{case}.world{world}.safetensors" if rank == 0 else out / f"{case}.rank{rank}.safetensors"
        pm.save(target)
        if case == "cached" and world > 1:  # export: rank 0 writes, rank 1 gets rank 0's report
            onnx = out / ("export.onnx" if rank == 0 else f"export.rank{rank}.onnx")
            report = purenn.export_onnx(pm, onnx, input_shape=(3, 32, 32), batch_sizes=(2,))
            (out / f"export.rank{rank}.txt").write_text(f"{report.ok} {report.path}")
    if world > 1:  # fewer samples than n_refs (3 batches of 2 over 2 ranks): every sample, no padding
        from purenn.arch import ResNetSpec
        from purenn.fit.collect import collect_references
        from purenn.fit.data import DataSource

        few = collect_references(ResNetSpec(m), DataSource.from_data(x[:5], 2), {"layer4": 8}, 8)["layer4"]
        (out / f"few.rank{rank}.txt").write_text(f"{tuple(few.indices.shape)} {sorted(few.indices[0].tolist())}")
    if world > 1:  # ranks given different arguments are refused, on every rank alike
        try:
            purenn.purify_model(m, data=x, layers=["layer4"], n_refs=3 + rank, neurons={"layer4": [0]},
                                progress=False)
            msg = "no error"
        except purenn.PurennError as e:
            msg = str(e)
        (out / f"mismatch.rank{rank}.txt").write_text(msg)
        # an iterable dataset is refused with a purenn error on every rank
        class Stream(torch.utils.data.IterableDataset):
            def __iter__(self):
                return iter(x)

        try:
            purenn.purify_model(m, data=Stream(), n_refs=2, progress=False)
            msg = "no error"
        except purenn.PurennError as e:
            msg = str(e)
        (out / f"iterable.rank{rank}.txt").write_text(msg)
    if started:
        dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
