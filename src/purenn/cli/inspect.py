"""``purenn inspect``: a purified file's config, layers and most polysemantic neurons (text or JSON)."""

from __future__ import annotations

import argparse
import json
from typing import Any

from purenn.cli.common import (
    EXIT_OK,
    load_purified_file,
    table,
)
from purenn.common.choices import CONCEPT_SCORE, score_text


# ============================================================================================ output
def _rule_text(config: Any) -> str:
    """A rule config as text: its name, with parameters when they are not zennit's defaults."""
    from purenn.attribution.rules import rule_text

    return rule_text(config)


def _neuron_rows(pm: Any, top: int) -> list[dict[str, Any]]:
    rows = []
    for name in pm.layers:
        pl = pm.pure_layer(name)
        counts, w = pl.ref_counts.tolist(), pl.merge_weight.tolist()
        for k, (ch, score, n_cl) in enumerate(zip(pl.neurons.tolist(), pl.scores.tolist(), pl.n_clusters.tolist())):
            virtual = []
            for c in range(n_cl):
                v = int(pl.channel_slots[ch, c])
                virtual.append({"name": f"{ch}.{c}", "index": v, "n_refs": counts[k][c], "suppressed": w[v] == 0})
            rows.append({"layer": name, "channel": ch, "score": round(float(score), 4), "n_clusters": n_cl,
                         "virtual": virtual})
    rows.sort(key=lambda r: -r["score"])
    return rows[:top]


def run(args: argparse.Namespace) -> int:
    from purenn.io.format import read_config

    pm = load_purified_file(args.model)
    config = read_config(args.model)
    arch = config.get("architecture", {})
    layers = []
    for name in pm.layers:
        pl = pm.pure_layer(name)
        layers.append({"layer": name, "upstream": pl.upstream, "gate": pl.gate, "rule": pl.rule.config(),
                       "skip_aware": pl.skip_aware, "score_kind": pl.score_kind,
                       "channels": pl.channels, "fitted": len(pl.neurons), "split": int((pl.n_clusters > 1).sum()),
                       "virtual": pl.n_virtual, "suppressed": int((pl.merge_weight == 0).sum())})
    neurons = _neuron_rows(pm, args.top)
    if args.json:
        print(json.dumps({"file": args.model, "purenn_version": config.get("purenn_version"),
                          "format_version": config.get("format_version"), "architecture": arch, "layers": layers,
                          "top_neurons": neurons}, indent=2))
        return EXIT_OK
    stem = arch.get("stem") or {}
    kernel = "x".join(map(str, stem.get("kernel_size", [])))
    pool = "+ max-pool" if stem.get("maxpool") else "without max-pool"
    print(f"file: {args.model}  (purenn {config.get('purenn_version')}, format {config.get('format_version')})")
    if str(arch.get("family", "")).startswith("timm"):
        name = ".".join(str(p) for p in (arch.get("timm_model") or "custom timm ResNet", arch.get("timm_tag")) if p)
        attention = f" with {', '.join(arch['attention'])}" if arch.get("attention") else ""
        print(f"base: timm {name}: {arch.get('block')} blocks {arch.get('layers')}{attention}, "
              f"{arch.get('num_classes')} classes, {arch.get('in_channels')} input channel(s)")
    else:
        print(f"base: {arch.get('builder') or 'custom ResNet'}: {arch.get('block')} blocks {arch.get('layers')}, "
              f"{arch.get('num_classes')} classes, {arch.get('in_channels')} input channel(s), stem {kernel} "
              f"stride {(stem.get('stride') or ['?'])[0]} {pool}")
    print()
    print(table([[r["layer"], r["upstream"], r["gate"], _rule_text(r["rule"]), "yes" if r["skip_aware"] else "no",
                   r["channels"], r["fitted"], r["split"], r["virtual"], r["suppressed"]] for r in layers],
                 ["layer", "upstream", "gate", "rule", "skip-aware", "channels", "fitted", "purified", "virtual",
                  "suppressed"]))
    print("  rule: the relevance rule of the circuits (gradient: PURE's; the others are zennit's LRP rules)\n"
          "  fitted: channels kept after clustering their references' circuits\n"
          "  purified: fitted channels split into 2 or more virtual neurons\n"
          "  virtual: the layer's virtual neurons (the purified channels' parts, plus one per channel left whole)\n"
          "  suppressed: virtual neurons switched off")
    print()
    kinds = {r["score_kind"] for r in layers}
    what = "most polysemantic neurons" if CONCEPT_SCORE not in kinds else "purified neurons, highest score first"
    print(f"{what} (top {len(neurons)} by score):")
    rows = [[r["layer"], r["channel"], f"{r['score']:.4f}", "  ".join(
        f"{v['name']}=v{v['index']}:{v['n_refs']}{' (off)' if v['suppressed'] else ''}" for v in r["virtual"])]
        for r in neurons]
    print(table(rows, ["layer", "channel", "score", "virtual neurons"]))
    for kind in sorted(kinds, key=str):
        where = ", ".join(r["layer"] for r in layers if r["score_kind"] == kind)
        print(f"  score ({where}): {score_text(kind)}" + {
            "contrast": ", from the clusters of the references' circuits: how balanced and how different they are, "
                        "0 to 1",
            "silhouette": ", the silhouette of the references' circuits in their clusters, -1 to 1",
            "contrast+upstream": ": how balanced and how different the clusters of the references' circuits are, "
                                 "times the same for their pooled upstream activations, 0 to 1",
            CONCEPT_SCORE: " (concept minus other examples); not a polysemanticity score"}.get(kind, ""))
    print("  virtual neurons: CHANNEL.CLUSTER=vINDEX:REFERENCES; INDEX is the position in the layer's pure features, "
          "(off) = suppressed")
    data = (config.get("reference_data") or {}).get("options")
    if data:
        print(f"\nreference samples from: {data['flags']} ({data['description']}); show needs the same data options")
    return EXIT_OK


def add_parser(sub: Any, epilog: str, fmt: Any) -> None:
    """Add the ``inspect`` sub-command to the ``purenn`` parser."""
    p = sub.add_parser("inspect", help="show a purified model's config, layers and most polysemantic neurons",
                       epilog=epilog, formatter_class=fmt)
    p.add_argument("model", help="purified .safetensors file")
    p.add_argument("--top", type=int, default=10, metavar="N", help="neurons in the table (default 10)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=run)
