"""Throughput of fitting, one process against torchrun, and a projection for ImageNet.

Measures, for one purification (``purify_model`` on a calibrated random-weight ResNet):

- the reference pass (collection) in images/s and the relevance stage in (sample, neuron) pairs/s,
  each also as a FLOP rate (FLOPs counted by ``torch.utils.flop_counter``) next to the base
  model's own forward FLOP rate at the same batch size;
- the same run under ``torchrun --nproc_per_node=R`` (Gloo on CPU, NCCL on CUDA): wall times, and
  whether the result equals the single process's (reference indices, cluster labels, centroids);
- ``--precisions``: the relevance stage in bf16 (and tf32 on CUDA) against float32: its pairs/s and
  the share of gates that change on the data;
- a projection for ImageNet (1.28 M images, all 2048 ``layer4`` neurons of resnet50 at 224x224,
  100 references each), from FLOPs counted at 224x224 and the FLOP rates measured here.

    python benchmarks/bench_scale.py --smoke                 # under a minute (CI)
    python benchmarks/bench_scale.py                          # resnet50 layer4 at 64x64, a few minutes on 2 cores
    python benchmarks/bench_scale.py --device cuda --model resnet50 --size 224 --images 50000 \\
        --neurons 2048 --refs 100 --batch 256 --workers 8 --precisions float32,tf32,bf16

Writes a JSON file and a Markdown table (``--out``).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from _common import calibrated, count_flops, log  # noqa: E402

import purenn  # noqa: E402
import purenn.fit.plan as plan_mod
import purenn.fit.stages as purify_mod
from purenn.arch import ResNetSpec
from purenn.common.distributed import init_from_env, world_info
from purenn.fit.circuits import fit_circuits
from purenn.fit.cluster import CircuitKMeans
from purenn.fit.collect import References
from purenn.fit.data import DataSource

HERE = Path(__file__).parent
IMAGENET = {"images": 1_281_167, "neurons": 2048, "refs": 100, "size": 224, "model": "resnet50"}


def make_data(n: int, size: int) -> torch.Tensor:
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(7))


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


class StageTimer:
    """Wraps purify's stage functions to time them (and count relevance pairs) inside one call."""

    def __init__(self, device: str):
        self.times: dict[str, float] = {}
        self.device = device
        self.saved = {}

    def wrap(self, name: str, key: str):
        fn = getattr(purify_mod, name)
        self.saved[name] = fn

        def timed(*args, **kwargs):
            if name == "fit_circuits":  # did the relevance stage start from the cached upstream activations?
                cache = kwargs.get("cache")
                used = cache is not None and cache.complete and kwargs.get("checkpoint") is None
                self.times["cache_used"] = bool(used)
            sync(self.device)
            t = time.perf_counter()
            out = fn(*args, **kwargs)
            sync(self.device)
            self.times[key] = self.times.get(key, 0.0) + time.perf_counter() - t
            return out

        setattr(purify_mod, name, timed)

    def __enter__(self):
        self.wrap("collect_references", "collect_s")
        self.wrap("fit_circuits", "relevance_s")
        self.wrap("fit_by_neuron", "cluster_s")
        return self

    def __exit__(self, *exc):
        for name, fn in self.saved.items():
            setattr(purify_mod, name, fn)


def worker(args: argparse.Namespace, out: Path) -> None:
    """One purification (alone or as one rank under torchrun); rank 0 writes ``out`` (JSON + .pt)."""
    started = False
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.distributed.is_initialized():
        device, started = init_from_env(args.device)
    else:
        device = args.device
    rank, world = world_info()
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world) if args.threads == 0 else args.threads)
    if device.startswith("cuda") and not device[4:]:
        device = f"cuda:{torch.cuda.current_device()}"
    model = calibrated(args.model, args.size)
    x = make_data(args.images, args.size)
    neurons = {"layer4": list(range(args.neurons))}
    # warm-up (allocator, kernels, thread pools), untimed: a tiny run of the same stages
    purenn.purify_model(model, data=x[: 2 * args.batch], layers=["layer4"], n_refs=2, neurons={"layer4": [0, 1]},
                        batch_size=args.batch, device=device, progress=False)
    result: dict = {"world": world, "runs": {}}
    summaries = {}
    for precision in args.precisions.split(","):
        if precision == "tf32" and not device.startswith("cuda"):
            continue
        kw = dict(layers=["layer4"], n_refs=args.refs, neurons=neurons, batch_size=args.batch, device=device,
                  progress=False, precision=precision, workers=args.workers or None)
        with StageTimer(device) as timer:
            t = time.perf_counter()
            pm = purenn.purify_model(model, data=x, **kw)
            sync(device)
            timer.times["total_s"] = time.perf_counter() - t
        pl = pm.pure_layer("layer4")
        # gates (one segment backward per sample and neuron: costly) only in the single process, for precisions
        gates = pm.gates(x[: args.gate_images].to(device))["layer4"].cpu() if world == 1 else None
        summaries[precision] = {"ref_indices": pl.ref_indices.cpu(), "ref_clusters": pl.ref_clusters.cpu(),
                                "centroids": pl.centroids.cpu(), "gates": gates}
        result["runs"][precision] = timer.times
        log(f"rank {rank}/{world} {precision}: " + ", ".join(f"{k} {v:.2f}" for k, v in timer.times.items()
                                                              if k != "cache_used"))
    if rank == 0:
        torch.save(summaries, out.with_suffix(".pt"))
        out.write_text(json.dumps(result, indent=1))
    if started:
        torch.distributed.destroy_process_group()


def flops_per_unit(args: argparse.Namespace, model_name: str, size: int, batch: int) -> dict:
    """FLOPs per image of the base forward and of the reference pass, and per pair of the relevance
    stage (backward) plus per distinct reference sample (its segment forward), at ``size``."""
    model = calibrated(model_name, size)
    spec = ResNetSpec(model)
    pos = spec.position("layer4")
    up = spec.position(spec.default_upstream("layer4"))
    xb = make_data(batch, size)
    fwd = count_flops(lambda: model(xb)) / batch
    collect = count_flops(lambda: spec.run_until(xb, {pos})) / batch
    n_s = 2
    src = DataSource.from_data(make_data(n_s, size), n_s)
    plan = plan_mod.plan_layers(spec, ["layer4"], None, None, "auto")[0]

    def relevance(k: int) -> float:
        p = plan_mod.LayerPlan(plan.layer, plan.upstream, pos, up, tuple(range(k)), plan.skip_aware)
        idx = torch.arange(n_s).repeat(spec.channels(pos), 1)
        refs = {"layer4": References(indices=idx, values=torch.zeros(idx.shape))}
        return count_flops(lambda: fit_circuits(spec, src, [p], refs, n_s, batch_size=n_s, device=None,
                                                max_memory=1 << 30, progress=False))

    a_up = spec.run_until(xb, {up})[0][up]
    segment = count_flops(lambda: spec.run_until(a_up, {up, pos}, set(range(up + 1, pos + 1)), start=up)) / batch
    f1, f2 = relevance(4), relevance(12)
    per_pair = (f2 - f1) / (8 * n_s)
    per_sample = (f1 - 4 * n_s * per_pair) / n_s  # forward of the distinct reference samples
    return {"forward_per_image": fwd, "collect_per_image": collect, "relevance_per_pair": per_pair,
            "relevance_forward_per_sample": per_sample, "segment_forward_per_sample": segment}


def forward_rate(args: argparse.Namespace) -> float:
    """Images/s of the base model's forward at the benchmark's batch size (best of 3)."""
    model = calibrated(args.model, args.size).to(args.device)
    xb = make_data(args.batch, args.size).to(args.device)
    with torch.no_grad():
        model(xb)
        best = float("inf")
        for _ in range(3):
            sync(args.device)
            t = time.perf_counter()
            model(xb)
            sync(args.device)
            best = min(best, time.perf_counter() - t)
    return args.batch / best


def cluster_seconds_per_neuron(refs: int, dim: int, k: int = 4) -> float:
    x = np.random.default_rng(0).normal(size=(k, refs, dim)).astype(np.float32)
    t = time.perf_counter()
    CircuitKMeans(2).fit(x)
    return (time.perf_counter() - t) / k


def launch(args: argparse.Namespace, ranks: int, out: Path) -> float:
    cmd = [sys.executable, __file__, "--worker", str(out), *args.forward]
    if ranks > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}", *cmd[1:]]
    t = time.perf_counter()
    subprocess.run(cmd, check=True)
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="resnet50")
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--images", type=int, default=512)
    ap.add_argument("--neurons", type=int, default=256, help="layer4 neurons fitted (the first N)")
    ap.add_argument("--refs", type=int, default=20)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--workers", type=int, default=0)
    ap.add_argument("--ranks", type=int, default=2, help="processes of the torchrun run (0: skip it)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per process (0: cores / ranks; default 1, "
                    "so R ranks use R cores and the ideal R-rank time is 1/R of one process)")
    ap.add_argument("--precisions", default="float32,bf16")
    ap.add_argument("--gate-images", type=int, default=32, help="samples on which gate changes are counted")
    ap.add_argument("--smoke", action="store_true", help="resnet18, 32x32, 64 images: under a minute")
    ap.add_argument("--out", default=None, help="folder for scale.json and scale.md (default: a temporary one)")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.smoke:
        args.model, args.size, args.images, args.neurons, args.refs, args.batch = "resnet18", 32, 64, 32, 8, 16
        args.gate_images = 64
    args.forward = [f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items()
                    if k not in ("worker", "smoke", "out", "forward") and v is not None]
    if args.worker:
        worker(args, Path(args.worker))
        return

    torch.set_num_threads(max(1, (os.cpu_count() or 1) // max(1, args.ranks)) if args.threads == 0 else args.threads)
    out_dir = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="purenn-scale-"))
    out_dir.mkdir(parents=True, exist_ok=True)
    log(f"{args.model} layer4, {args.neurons} neurons x {args.refs} refs, {args.images} images "
        f"{args.size}x{args.size}, batch {args.batch}, {args.device}")
    fl = flops_per_unit(args, args.model, args.size, args.batch)
    fwd_ips = forward_rate(args)
    log(f"base forward: {fwd_ips:.1f} img/s, {fl['forward_per_image'] * fwd_ips / 1e9:.2f} GFLOP/s")

    walls, res, sums = {}, {}, {}
    for ranks in [1] + ([args.ranks] if args.ranks > 1 else []):
        path = out_dir / f"world{ranks}.json"
        walls[str(ranks)] = launch(args, ranks, path)
        res[ranks] = json.loads(path.read_text())
        sums[ranks] = torch.load(path.with_suffix(".pt"))
        path.with_suffix(".pt").unlink()  # the compared tensors; the report keeps the comparison
    one = res[1]["runs"]["float32"]
    pairs = args.neurons * args.refs
    distinct = int(torch.unique(sums[1]["float32"]["ref_indices"]).numel())
    collect_ips = args.images / one["collect_s"]
    rel_pps = pairs / one["relevance_s"]
    fwd_rate = fl["forward_per_image"] * fwd_ips
    collect_rate = fl["collect_per_image"] * collect_ips
    # forwards of the relevance stage: the segment only when it started from the cached activations
    per_sample = fl["segment_forward_per_sample"] if one.get("cache_used") else fl["relevance_forward_per_sample"]
    rel_flops = pairs * fl["relevance_per_pair"] + distinct * per_sample
    rel_rate = rel_flops / one["relevance_s"]
    report = {
        "config": {k: getattr(args, k) for k in ("model", "size", "images", "neurons", "refs", "batch", "device",
                                                 "workers", "ranks", "smoke")},
        "torch_threads_per_process": "cores / ranks" if args.threads == 0 else args.threads,
        "flops": fl, "base_forward_img_s": fwd_ips, "base_forward_gflop_s": fwd_rate / 1e9,
        "collect_img_s": collect_ips, "collect_gflop_s": collect_rate / 1e9,
        "relevance_pairs_s": rel_pps, "relevance_gflop_s": rel_rate / 1e9, "distinct_ref_samples": distinct,
        "relevance_flops_counted": "a segment backward per pair + the " + ("segment" if one.get("cache_used") else
                                                                             "full") + " forward per distinct sample",
        "stages_1_process": one, "launch_wall_s": walls,
    }
    if args.ranks > 1:
        two, a, b = res[args.ranks]["runs"]["float32"], sums[1]["float32"], sums[args.ranks]["float32"]
        report["stages_torchrun"] = two
        report["torchrun_equal"] = {
            "ref_indices_equal": bool(torch.equal(a["ref_indices"], b["ref_indices"])),
            "ref_clusters_equal": bool(torch.equal(a["ref_clusters"], b["ref_clusters"])),
            "centroids_max_rel_diff": float((a["centroids"] - b["centroids"]).abs().max()
                                            / a["centroids"].abs().max()),
        }
    for p, s in sums[1].items():
        if p != "float32":
            report.setdefault("precision", {})[p] = {
                "relevance_pairs_s": pairs / res[1]["runs"][p]["relevance_s"],
                "gates_changed": float((s["gates"] != sums[1]["float32"]["gates"]).float().mean()),
                "ref_clusters_changed": float((s["ref_clusters"] != sums[1]["float32"]["ref_clusters"]).float().mean()),
            }
    # ImageNet projection: FLOPs at 224x224 over the FLOP rates measured here
    big = flops_per_unit(args, IMAGENET["model"], IMAGENET["size"], 1) if not args.smoke else None
    if big is not None:
        n_pairs = IMAGENET["neurons"] * IMAGENET["refs"]
        c_s = IMAGENET["images"] * big["collect_per_image"] / collect_rate
        r_s = (n_pairs * big["relevance_per_pair"] + n_pairs * big["relevance_forward_per_sample"]) / rel_rate
        k_s = IMAGENET["neurons"] * cluster_seconds_per_neuron(IMAGENET["refs"], 1024)
        report["imagenet_projection"] = {
            **IMAGENET, "flops_224": big, "assumes": "every reference a distinct sample (an upper bound); FLOP rates "
            "as measured here at the benchmark's size; clustering one process",
            "collect_h": c_s / 3600, "relevance_h": r_s / 3600, "cluster_h": k_s / 3600,
            "collect_tflop": IMAGENET["images"] * big["collect_per_image"] / 1e12,
            "relevance_tflop": n_pairs * (big["relevance_per_pair"] + big["relevance_forward_per_sample"]) / 1e12,
        }
    (out_dir / "scale.json").write_text(json.dumps(report, indent=1))
    (out_dir / "scale.md").write_text(table(report))
    print(table(report))
    log(f"wrote {out_dir / 'scale.json'} and scale.md")


def table(r: dict) -> str:
    c = r["config"]
    lines = [
        f"{c['model']} layer4, {c['neurons']} neurons x {c['refs']} refs, {c['images']} images {c['size']}x{c['size']},"
        f" batch {c['batch']}, {c['device']}",
        "",
        "| stage | throughput | GFLOP/s | vs base forward FLOP rate |",
        "|---|---|---|---|",
        f"| base model forward | {r['base_forward_img_s']:.1f} img/s | {r['base_forward_gflop_s']:.2f} | 1.00 |",
        f"| reference pass (collection) | {r['collect_img_s']:.1f} img/s | {r['collect_gflop_s']:.2f} | "
        f"{r['collect_gflop_s'] / r['base_forward_gflop_s']:.2f} |",
        f"| relevance | {r['relevance_pairs_s']:.1f} pairs/s | {r['relevance_gflop_s']:.2f} | "
        f"{r['relevance_gflop_s'] / r['base_forward_gflop_s']:.2f} |",
        "",
        f"relevance FLOPs: {r['relevance_flops_counted']} ({r['distinct_ref_samples']} distinct reference samples)",
        "",
    ]
    one = r["stages_1_process"]
    if "stages_torchrun" in r:
        two = r["stages_torchrun"]
        lines += ["| run | collect s | relevance s | cluster s | purify_model s | launch wall s |",
                  "|---|---|---|---|---|---|"]
        for name, s, w in (("1 process", one, r["launch_wall_s"]["1"]),
                           (f"torchrun {c['ranks']} ranks", two, r["launch_wall_s"][str(c["ranks"])])):
            lines.append(f"| {name} | {s['collect_s']:.2f} | {s['relevance_s']:.2f} | {s['cluster_s']:.2f} | "
                         f"{s['total_s']:.2f} | {w:.1f} |")
        e = r["torchrun_equal"]
        eff = one["total_s"] / (c["ranks"] * two["total_s"])
        lines += ["", f"parallel efficiency of purify_model (1-process time / (ranks x torchrun time)): {eff:.2f}"]
        lines += ["", f"torchrun vs 1 process: reference indices equal {e['ref_indices_equal']}, cluster labels equal "
                  f"{e['ref_clusters_equal']}, centroids max relative difference "
                  f"{e['centroids_max_rel_diff']:.1e}", ""]
    for p, v in r.get("precision", {}).items():
        lines.append(f"{p} relevance: {v['relevance_pairs_s']:.1f} pairs/s; gates changed vs float32: "
                     f"{100 * v['gates_changed']:.2f} %; reference cluster labels changed: "
                     f"{100 * v['ref_clusters_changed']:.2f} %")
    if "imagenet_projection" in r:
        p = r["imagenet_projection"]
        lines += ["", f"ImageNet projection ({p['images']:,} images, {p['neurons']} layer4 neurons x {p['refs']} refs, "
                  f"resnet50 {p['size']}x{p['size']}; {p['assumes']}):",
                  f"collection {p['collect_tflop']:.0f} TFLOP -> {p['collect_h']:.1f} h; relevance "
                  f"{p['relevance_tflop']:.0f} TFLOP -> {p['relevance_h']:.1f} h; clustering {p['cluster_h']:.2f} h"]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
