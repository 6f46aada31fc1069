"""How fitting time and memory grow with the number of neurons and of reference samples.

Runs ``bench_fit.py`` (purenn only, no reference, no FLOP count) once per setting, each in a fresh
process so that its peak RSS is its own, and writes a table: stage times, time per (sample,
neuron) pair, peak RSS and the part the fit added, and the size of the circuit features
(``neurons x refs x C_U`` floats, which the fit returns and must hold).

glibc's allocator keeps much of the memory a process frees, so the peak RSS of a normal run
overstates the memory the fit holds at any one time. ``--live-memory`` runs each setting with
``MALLOC_MMAP_THRESHOLD_=131072`` (every allocation of 128 KiB or more mapped and unmapped on its
own), so that the peak RSS follows the live tensors; it also makes the fit slower.

    python benchmarks/bench_fit_scaling.py                      # resnet50 layer4, 64x64, 1,000 images
    python benchmarks/bench_fit_scaling.py --size 112 --neurons 256,512,1024,2048 --refs 100
    python benchmarks/bench_fit_scaling.py --smoke              # seconds
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).parent
COLUMNS = (
    "neurons", "refs", "distinct_ref_samples", "purenn_collect_s", "purenn_relevance_s", "purenn_cluster_etc_s",
    "purenn_total_fit_s", "relevance_ms_per_pair", "peak_rss_mb", "fit_added_rss_mb", "circuit_features_mb",
)


def run_one(common: list[str], neurons: int, refs: int, live_memory: bool = False) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "res.json"
        cmd = [sys.executable, str(HERE / "bench_fit.py"), *common, "--neurons", str(neurons), "--refs", str(refs),
               "--skip-reference", "--no-flops", "--json", str(out)]
        env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072"} if live_memory else None
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, env=env)
        res = json.loads(out.read_text())
    res["relevance_ms_per_pair"] = round(1e3 * res["purenn_relevance_s"] / (neurons * refs), 3)
    return res


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="resnet50")
    p.add_argument("--layer", default="layer4")
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--data", type=int, default=1000)
    p.add_argument("--neurons", default="256,512,1024", help="neuron counts, at the largest --refs")
    p.add_argument("--refs", default="25,50,100", help="reference counts, at the smallest --neurons")
    p.add_argument("--live-memory", action="store_true", help="peak RSS that follows the live tensors (slower)")
    p.add_argument("--smoke", action="store_true")
    p.add_argument("--out", default=None, help="folder for results.json and results.md")
    a = p.parse_args(argv)
    if a.smoke:
        a.model, a.size, a.data, a.neurons, a.refs = "resnet18", 32, 40, "8,16", "4,8"
    neurons = [int(v) for v in a.neurons.split(",")]
    refs = [int(v) for v in a.refs.split(",")]
    settings = [(n, max(refs)) for n in neurons] + [(min(neurons), r) for r in refs if r != max(refs)]
    common = ["--model", a.model, "--layer", a.layer, "--size", str(a.size), "--data", str(a.data)]
    rows = []
    for n, r in sorted(settings):
        row = run_one(common, n, r, a.live_memory)
        rows.append(row)
        print(json.dumps({k: row[k] for k in COLUMNS}))
    md = [f"`python benchmarks/bench_fit_scaling.py {' '.join(argv or sys.argv[1:])}`".replace(" `", "`"), "",
          f"{a.model} `{a.layer}`, {a.size}x{a.size}, references among {a.data} images, "
          f"max_memory {rows[0]['max_memory_mb']} MiB, {rows[0]['torch_threads']} threads"
          + (", MALLOC_MMAP_THRESHOLD_=131072" if a.live_memory else ""), "",
          "| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    md += ["| " + " | ".join(str(row[k]) for k in COLUMNS) + " |" for row in rows]
    print("\n".join(md))
    if a.out:
        out = Path(a.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "results.json").write_text(json.dumps(rows, indent=2))
        (out / "results.md").write_text("\n".join(md) + "\n")
    return rows


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
