"""Polysemanticity-score and block-gate variants on the models of ``fashion_planted_seeds.py``, from a cache.

The full benchmark costs ~25 min per model; a variant of the score or of the gate costs seconds
once what it reads is on disk. Per seed model this script computes ONCE (``--cache``, one ``.npz``
per seed) the benchmark's fit references of every ``layer4`` channel and the held-out test
references of the evaluated (mixed) channels, with, at each reference:

- the raw (unnormalised) circuit relevance of the neuron on ``layer3`` (stage target ``layer4``)
  and on ``layer4.0`` (block target ``layer4.1``; ``layer4`` and ``layer4.1`` are the same
  activations of a ResNet-18, so the ``layer3`` circuit is also the block neuron's two-hop circuit);
- the neuron's own activation map, the pooled ``layer3``/``layer4.0`` activations;
- for the planted channels at block level, the relevance on ``layer4.0`` pooled to 2x2 positions;
- the fine labels (evaluation only) and the sets of mixed and planted neurons (``fashion_planted``).

It then evaluates, in seconds, label-free score variants (AUROC against the benchmark's "mixed"
neurons, its definition), SemanticLens-style scores on reference embeddings of stand-in embedders
(kept apart: an embedder trained on fine labels is an upper bound, not label-free), and block-level
gate variants (planted-pair ARI of the gate fitted on the fit references, on the held-out test
references). Variants are chosen on the even channels and reported on the odd ones too.
``--check`` (always on under ``--smoke``) compares the cached circuits with
``purenn.circuit_relevance`` and the offline gates with a ``purify_model`` on a few planted
neurons, and fails if they differ.

    python benchmarks/fashion_scores.py --seeds 0,1,2,3          # per untrained model ~50 min on 1 core
    python benchmarks/fashion_scores.py --seeds 0,1,2,3 --stage eval   # from the cache only, a few minutes
    python benchmarks/fashion_scores.py --smoke                  # tiny model and data, < 1 min (model cached)
    python benchmarks/fashion_scores.py --seeds 0 --check        # also: cache and offline gates vs the library

Results go to ``--out`` (default ``benchmarks/results/fashion_scores[_smoke]``).
"""

from __future__ import annotations

import argparse
import pickle
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from sklearn.metrics import adjusted_rand_score

sys.path.insert(0, str(Path(__file__).parent))
import fashion_planted as fp  # noqa: E402
from threadpoolctl import threadpool_limits  # noqa: E402

import purenn  # noqa: E402
from purenn.analysis.metrics import embedding_polysemanticity, paired_test, score_auroc
from purenn.attribution.relevance import pair_relevance
from purenn.cli.datasets import cache_dir, cached_classifier, small_image_resnet
from purenn.fit.cluster import CircuitKMeans, contrast_score

HERE = Path(__file__).resolve().parent
LEVELS = {"layer4": ("layer4", "layer3"), "layer4.1": ("layer4.1", "layer4.0")}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    own = argparse.ArgumentParser(add_help=False)
    own.add_argument("--seeds", default=None, help="comma-separated training seeds (default 0,1,2,3; smoke 0,1)")
    own.add_argument("--cache", default=None, help="directory of the per-seed .npz files")
    own.add_argument("--stage", default="all", choices=("cache", "eval", "all"))
    own.add_argument("--only", default=None,
                     help="evaluate only the score and gate variants whose names contain one of these "
                          "';'-separated strings")
    own.add_argument("--check", action="store_true",
                     help="compare the cache and the offline gates with the library on a few planted neurons")
    mine, rest = own.parse_known_args(argv)
    a = fp.parse_args(rest)
    a.seeds = [int(s) for s in (mine.seeds or ("0" if a.smoke else "0,1,2,3")).split(",") if s.strip()]
    a.score_levels = ("layer4",) if a.smoke else ("layer4", "layer4.1")
    a.score_limit = 64 if a.smoke else None  # scores of the first channels only (smoke: < 1 min)
    name = "fashion_scores_smoke" if a.smoke else "fashion_scores"
    a.cache = Path(mine.cache) if mine.cache else cache_dir() / name
    a.stage, a.check = mine.stage, mine.check or a.smoke
    a.only = [t for t in mine.only.split(";") if t] if mine.only else None
    if "--out" not in rest:
        a.out = HERE / "results" / ("fashion_scores_smoke" if a.smoke else "fashion_scores")
    return a


# ----------------------------------------------------------------------------------------- cache
def _tables(spec, model, ds, ref_idx: np.ndarray, neurons: np.ndarray, spatial: set[int], a) -> dict:
    """Per (neuron, reference) pair: raw relevance on layer3 and layer4.0, own map; per distinct
    sample: pooled layer3/layer4.0 activations; 2x2-pooled layer4.0 relevance of ``spatial`` neurons."""
    p4, p3, p40 = spec.position("layer4"), spec.position("layer3"), spec.position("layer4.0")
    k, n = ref_idx.shape
    ids, inv = np.unique(ref_idx, return_inverse=True)
    inv = inv.reshape(k, n)
    sid, nid = inv.ravel(), np.repeat(np.arange(k), n)
    order = np.argsort(sid, kind="stable")
    out: dict[str, np.ndarray] = {}
    rel4 = np.zeros((k * n, spec.channels(p3)), np.float32)
    rel41 = np.zeros((k * n, spec.channels(p40)), np.float32)
    maps = None
    sp_rows = np.flatnonzero(np.isin(neurons[nid], sorted(spatial)))
    sp_pos = {int(r): i for i, r in enumerate(sp_rows)}
    sp = np.zeros((len(sp_rows), spec.channels(p40), 4), np.float32)
    up3 = np.zeros((len(ids), spec.channels(p3)), np.float32)
    up40 = np.zeros((len(ids), spec.channels(p40)), np.float32)
    bs = 256
    for s in range(0, len(ids), bs):
        x = ds.images[torch.as_tensor(ids[s : s + bs])]
        acts, recs = spec.run_until(x, {p3, p40, p4}, set(range(p3 + 1, p4 + 1)))
        up3[s : s + len(x)] = acts[p3].clamp(min=0).mean((-2, -1)).numpy()
        up40[s : s + len(x)] = acts[p40].clamp(min=0).mean((-2, -1)).numpy()
        lo, hi = np.searchsorted(sid[order], [s, s + len(x)])
        rows = order[lo:hi]
        if not len(rows):
            continue
        local = torch.as_tensor(sid[rows] - s)
        nn_ = torch.as_tensor(neurons[nid[rows]])
        for up, table in ((p3, rel4), (p40, rel41)):
            r = pair_relevance(spec.segment(up, p4), [recs[j] for j in range(up + 1, p4 + 1)], acts[up], acts[p4],
                               local, nn_, 512 * 2**20, "gradient")
            table[rows] = r.numpy()
        m = acts[p4][local, nn_].flatten(1).numpy()
        if maps is None:
            maps = np.zeros((k * n, m.shape[1]), np.float32)
        maps[rows] = m
        sp_sel = [i for i, r in enumerate(rows) if int(r) in sp_pos]
        if sp_sel:  # the gradient rule by autograd through the torchvision block, kept per position
            li, ni = local[sp_sel], nn_[sp_sel]
            with torch.enable_grad():
                a_up = acts[p40][li].detach().requires_grad_(True)
                y = model.layer4[-1](a_up)
                sel = y[torch.arange(len(li)), ni]
                (sel * sel.clamp(min=0).detach()).sum().backward()
            rmap = (a_up.grad * a_up).detach()
            pooled = torch.nn.functional.adaptive_avg_pool2d(rmap, 2).flatten(2) * (rmap.shape[-1] * rmap.shape[-2] / 4)
            sp[[sp_pos[int(rows[i])] for i in sp_sel]] = pooled.numpy()
    out["rel4"] = rel4.reshape(k, n, -1)
    out["rel41"] = rel41.reshape(k, n, -1)
    out["maps"] = maps.reshape(k, n, -1)
    out["up3"], out["up40"], out["inv"], out["ids"] = up3, up40, inv, ids
    out["sp_rows"], out["sp41"] = sp_rows, sp
    return out


def build_cache(a, train, test, seed: int) -> Path:
    path = a.cache / f"seed{seed}.npz"
    if path.is_file():
        fp.log(f"seed {seed}: cache {path} exists")
        return path
    a.seed = seed
    torch.manual_seed(seed)
    t = time.time()
    st = fp.prepare(a, train, test)
    if st is None:
        raise SystemExit(f"seed {seed}: no mixed neurons")
    model, spec = st.model, purenn.ResNetSpec(st.model)
    fit_idx = st.refs_fit.indices.numpy()[:, : a.n_refs]
    chans = np.array(st.channels)
    test_idx = st.refs_test.indices.numpy()[chans, : a.n_refs]
    fit_t = _tables(spec, model, st.fit, fit_idx, np.arange(len(fit_idx)), set(st.planted_ch), a)
    fp.log(f"seed {seed}: fit tables ({time.time() - t:.0f}s)")
    test_t = _tables(spec, model, test, test_idx, chans, set(st.planted_ch), a)
    # the check that the autograd relevance is the library's: its sum over positions is the raw relevance
    k = fit_t["sp_rows"][:50]
    err = np.abs(fit_t["sp41"][: len(k)].sum(-1) - fit_t["rel41"].reshape(-1, fit_t["rel41"].shape[-1])[k]).max()
    scale = np.abs(fit_t["rel41"]).max()
    if err > 1e-3 * scale:
        raise SystemExit(f"seed {seed}: spatial relevance does not sum to the library's ({err:.3g} vs {scale:.3g})")
    arrays = {"accuracy": st.acc, "channels": chans, "planted": np.array(st.planted_ch, dtype=np.int64),
              "mixed_fit": st.mixed_fit, "fit_idx": fit_idx, "test_idx": test_idx,
              "fit_fine": st.fit.fine.numpy()[fit_idx], "test_fine": test.fine.numpy()[test_idx]}
    arrays.update({f"fit_{k}": v for k, v in fit_t.items()})
    arrays.update({f"test_{k}": v for k, v in test_t.items()})
    a.cache.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.npz")
    np.savez(tmp, **arrays)
    tmp.replace(path)
    path.with_name(f"km_{path.stem}.pkl").unlink(missing_ok=True)  # k-means of an older cache
    fp.log(f"seed {seed}: cached {path} ({time.time() - t:.0f}s; {len(chans)} mixed, {len(st.planted_ch)} planted)")
    return path


def build_embedders(a, train, test) -> Path:
    """Stand-in embedders for the SemanticLens-style scores (no CLIP offline): embeddings of every
    fit image from raw pixels, and from two small ResNets trained on the training images that are
    not fit images (``n_fit..n_train``), one on the superclasses (no fine label seen) and one on the
    fine classes (an upper bound, not label-free)."""
    path = a.cache / "embedders.npz"
    if path.is_file():
        return path
    fit = train.head(a.n_fit)
    rest = train.subset(range(a.n_fit, len(train)))
    out = {"pixels": fit.images.flatten(1).numpy().astype(np.float32)}
    for target, n_cls in () if a.smoke else (("coarse", train.n_superclasses), ("fine", 10)):
        def build(n_cls=n_cls):
            return small_image_resnet(blocks=[1, 1, 1, 1], stem_stride=2, num_classes=n_cls, in_channels=1)

        with torch.enable_grad():
            m, _, hit = cached_classifier(f"fashion-scores-embedder-{target}", build, rest,
                                          config={"blocks": [1, 1, 1, 1], "stem_stride": 2, "smoke": a.smoke},
                                          epochs=1, batch_size=128, lr=2e-3, seed=0, target=target, progress=False)
        feats = []
        body = torch.nn.Sequential(*list(m.children())[:-1])  # up to the global average pool
        for s in range(0, len(fit), 500):
            feats.append(body(fit.images[s : s + 500]).flatten(1))
        key = "superclass ResNet" if target == "coarse" else "fine-class ResNet (upper bound)"
        out[key] = torch.cat(feats).numpy().astype(np.float32)
        pred = torch.cat([m(test.images[s : s + 500]).argmax(1) for s in range(0, len(test), 500)])
        acc = float((pred == (test.coarse if target == "coarse" else test.fine)).float().mean())
        fp.log(f"embedder {target}: {'loaded' if hit else 'trained'}; test accuracy {acc:.3f}")
    a.cache.mkdir(parents=True, exist_ok=True)
    np.savez(path, **out)
    return path


# ------------------------------------------------------------------------------------- features
EPS = 1e-12


def l1(x: np.ndarray) -> np.ndarray:
    return x / (np.abs(x).sum(-1, keepdims=True) + EPS)


def l2(x: np.ndarray) -> np.ndarray:
    return x / (np.linalg.norm(x, axis=-1, keepdims=True) + EPS)


def drop_self(rel: np.ndarray, neurons: np.ndarray) -> np.ndarray:
    """Zero the upstream channel with the neuron's own index (``rel`` is ``(K, n, C)`` or ``(K, n, C, P)``)."""
    out = rel.copy()
    out[np.arange(len(neurons)), :, neurons] = 0
    return out


def combine(*parts: tuple[np.ndarray, float]) -> np.ndarray:
    """Concatenation of unit-length (L2) parts, each times its weight (``purenn.model.gates.combine_features``)."""
    return np.concatenate([w * l2(p) for p, w in parts], axis=-1)


class Seed:
    """One seed's cache, with the features the variants read (``kind`` ``fit`` or ``test``)."""

    def __init__(self, path: Path, seed: int, emb: dict | None, limit: int | None = None):
        z = np.load(path)
        self.seed = seed
        self.z = {k: z[k] for k in z.files}
        self.channels, self.planted = self.z["channels"], self.z["planted"]
        self.mixed_fit = self.z["mixed_fit"].astype(bool)
        self.emb = emb
        self.limit = limit
        self.km_file = path.with_name(f"km_{path.stem}.pkl")
        self._km: dict = pickle.loads(self.km_file.read_bytes()) if self.km_file.is_file() else {}

    def sfeat(self, name: str) -> np.ndarray:
        """Fit features of the neurons the scores are evaluated on (the first ``limit`` in a smoke run)."""
        return self.feature(name, "fit")[: self.limit]

    def neurons(self, kind: str) -> np.ndarray:
        return np.arange(len(self.mixed_fit)) if kind == "fit" else self.channels

    def feature(self, name: str, kind: str) -> np.ndarray:
        z, nr = self.z, self.neurons(kind)
        g = lambda k: z[f"{kind}_{k}"]  # noqa: E731
        per_ref = lambda per_sample: per_sample[g("inv")]  # noqa: E731
        c4, c41 = l1(g("rel4")), l1(drop_self(g("rel41"), nr))
        base = {
            "circuit": c4, "circuit L2": l2(g("rel4")), "map": g("maps"), "upstream pooled": per_ref(g("up3")),
            "block circuit": c41, "block circuit plain": l1(g("rel41")),
            "block circuit L2": l2(drop_self(g("rel41"), nr)),
            "block upstream pooled": per_ref(g("up40")),
        }
        if name in base:
            return base[name]
        if name.startswith("circuit+map "):
            return combine((c4, 1), (g("maps"), float(name.split()[-1])))
        if name.startswith("circuit+upstream "):
            return combine((c4, 1), (per_ref(g("up3")), float(name.split()[-1])))
        if name.startswith("block circuit+map "):
            return combine((c41, 1), (g("maps"), float(name.split()[-1])))
        if name.startswith("block circuit+upstream "):
            return combine((c41, 1), (per_ref(g("up40")), float(name.split()[-1])))
        if name.startswith("block circuit+hop "):  # the layer3 circuit of the same neuron (two blocks back)
            return combine((c41, 1), (c4, float(name.split()[-1])))
        if name.startswith("block circuit+hop+map "):
            w = float(name.split()[-1])
            return combine((c41, 1), (c4, 1), (g("maps"), w))
        if name.startswith("block 2x2"):
            return self.spatial(kind, name)
        if name.startswith("emb "):
            e = self.emb[name[4:]]
            return e[z[f"{kind}_idx"]]
        raise KeyError(name)

    def spatial(self, kind: str, name: str) -> np.ndarray:
        z, nr = self.z, self.neurons(kind)
        rows, sp = z[f"{kind}_sp_rows"], z[f"{kind}_sp41"]
        n = z[f"{kind}_rel41"].shape[1]
        out = np.zeros((len(nr), n, sp.shape[1] * sp.shape[2]), np.float32)
        kk, jj = rows // n, rows % n
        x = sp.copy()
        x[np.arange(len(rows)), nr[kk]] = 0  # skip-aware: the neuron's own channel, at every position
        out[kk, jj] = x.reshape(len(rows), -1)
        have = np.unique(kk)
        part = l1(out[have])
        if name.startswith("block 2x2+map "):
            part = combine((part, 1), (z[f"{kind}_maps"][have], float(name.split()[-1])))
        res = np.full((len(nr), n, part.shape[-1]), np.nan, np.float32)
        res[have] = part
        return res

    def kmeans(self, name: str, c: int = 2) -> tuple[np.ndarray, np.ndarray]:
        """k-means (CircuitKMeans, this seed's random_state) of every neuron's fit references: centres,
        labels; kept next to the cache (``km_seed<seed>.pkl``) so that a rerun of the evaluation reuses it."""
        key = (name, c, self.limit)
        if key not in self._km:
            km = CircuitKMeans(c, random_state=self.seed).fit(self.sfeat(name))
            self._km[key] = (km.centroids_, km.labels_)
            if self.km_file is not None:
                self.km_file.write_bytes(pickle.dumps(self._km))
        return self._km[key]


# ---------------------------------------------------------------------------------------- scores
def _per_neuron(x: np.ndarray, f: Callable[[np.ndarray], float]) -> np.ndarray:
    with threadpool_limits(1):
        return np.array([f(np.asarray(xi, np.float64)) for xi in x])


def contrast(d: Seed, name: str, c: int = 2) -> np.ndarray:
    cen, lab = d.kmeans(name, c)
    return np.array([contrast_score(ce, la) for ce, la in zip(cen, lab)])


def separation(d: Seed, name: str) -> np.ndarray:
    """SemanticLens's polysemanticity: 1 - clarity of the two k-means centres = 1 - their cosine."""
    cen, _ = d.kmeans(name)
    u = l2(cen)
    return 1 - (u[:, 0] * u[:, 1]).sum(-1)


def balance(d: Seed, name: str) -> np.ndarray:
    _, lab = d.kmeans(name)
    return 2 * np.minimum(lab.mean(1), 1 - lab.mean(1))


def split_r2(d: Seed, name: str) -> np.ndarray:
    """Share of the references' variance between the two k-means clusters."""
    x = d.sfeat(name).astype(np.float64)
    cen, lab = d.kmeans(name)
    tot = ((x - x.mean(1, keepdims=True)) ** 2).sum((1, 2))
    within = ((x - np.take_along_axis(cen, lab[..., None], 1)) ** 2).sum((1, 2))
    return 1 - within / np.maximum(tot, EPS)


def silhouette(d: Seed, name: str) -> np.ndarray:
    from sklearn.metrics import silhouette_score
    x = d.sfeat(name)
    _, lab = d.kmeans(name)
    out = np.zeros(len(x))
    for i in range(len(x)):
        if len(np.unique(lab[i])) == 2 and np.ptp(x[i], axis=0).max() > 0:
            out[i] = silhouette_score(x[i], lab[i])
    return out


def gap(d: Seed, name: str) -> np.ndarray:
    """Silhouette of the 2-split minus that of the same k-means on a Gaussian null (CircuitKMeans 'auto')."""
    return CircuitKMeans("auto", max_clusters=2, min_gap=-9, random_state=d.seed).fit(d.sfeat(name)).gaps_


def clarity_poly(d: Seed, name: str) -> np.ndarray:
    """1 - SemanticLens clarity of the references themselves (mean pairwise cosine)."""
    u = l2(d.sfeat(name).astype(np.float64))
    n = u.shape[1]
    return 1 - ((u.mean(1) ** 2).sum(-1) - 1 / n) * n / (n - 1)


def pc1(d: Seed, name: str) -> np.ndarray:
    """Explained-variance share of the first principal component of the references."""
    def f(x):
        s = np.linalg.svd(x - x.mean(0), compute_uv=False) ** 2
        return s[0] / max(s.sum(), EPS)
    return _per_neuron(d.sfeat(name), f)


def bimodality(d: Seed, name: str) -> np.ndarray:
    """Sarle's bimodality coefficient (skew^2 + 1) / kurtosis of the projections on the first PC."""
    def f(x):
        xc = x - x.mean(0)
        _, _, vt = np.linalg.svd(xc, full_matrices=False)
        p = xc @ vt[0]
        sd = p.std()
        if sd <= 0:
            return 0.0
        z = p / sd
        return ((z ** 3).mean() ** 2 + 1) / (z ** 4).mean()
    return _per_neuron(d.sfeat(name), f)


def eigengap(d: Seed, name: str) -> np.ndarray:
    """lambda_2 / lambda_1 of the references' cosine-similarity matrix (clipped at 0): two blocks -> ~1."""
    def f(x):
        u = l2(x)
        s = np.clip(u @ u.T, 0, None)
        ev = np.linalg.eigvalsh(s)[::-1]
        return ev[1] / max(ev[0], EPS)
    return _per_neuron(d.sfeat(name), f)


def rank(x: np.ndarray) -> np.ndarray:
    return np.argsort(np.argsort(x, kind="stable"), kind="stable") / max(len(x) - 1, 1)


SCORE_VARIANTS: dict[str, Callable[[Seed, str], np.ndarray]] = {
    # the library's two scores
    "silhouette": lambda d, lv: silhouette(d, lv),
    "contrast (default)": lambda d, lv: contrast(d, lv),
    # other features, same score
    "contrast, L2 circuits": lambda d, lv: contrast(d, "circuit L2" if lv == "circuit" else "block circuit L2"),
    "contrast, circuit+map 0.5": lambda d, lv: contrast(d, ("" if lv == "circuit" else "block ") + "circuit+map 0.5"),
    "contrast, circuit+upstream 0.5": lambda d, lv: contrast(d, "circuit+upstream 0.5") if lv == "circuit" else None,
    "contrast, upstream pooled": lambda d, lv: contrast(d, "upstream pooled" if lv == "circuit"
                                                        else "block upstream pooled"),
    "contrast, 3 clusters": lambda d, lv: contrast(d, lv, 3),
    # the parts of contrast
    "separation 1 - cos (SemanticLens formula on circuits)": lambda d, lv: separation(d, lv),
    "balance": lambda d, lv: balance(d, lv),
    # other label-free statistics
    "between/total variance of the split": lambda d, lv: split_r2(d, lv),
    "silhouette gap over a Gaussian null": lambda d, lv: gap(d, lv),
    "1 - clarity (mean pairwise cosine)": lambda d, lv: clarity_poly(d, lv),
    "PC1 variance share": lambda d, lv: pc1(d, lv),
    "bimodality coefficient on PC1": lambda d, lv: bimodality(d, lv),
    "eigengap lambda2/lambda1 of cosine similarity": lambda d, lv: eigengap(d, lv),
    # combinations (tried on seed 0's even channels after the rows above)
    "contrast x contrast on upstream pooled": lambda d, lv: contrast(d, lv) * contrast(
        d, "upstream pooled" if lv == "circuit" else "block upstream pooled"),
    "rank mean of contrast, contrast on upstream pooled, eigengap": lambda d, lv: rank(contrast(d, lv)) + rank(
        contrast(d, "upstream pooled" if lv == "circuit" else "block upstream pooled")) + rank(eigengap(d, lv)),
    "separation x balance^2": lambda d, lv: separation(d, lv) * balance(d, lv) ** 2,
}


#: the score variants also evaluated at block level (the AUROC target is at ``layer4``)
BLOCK_SCORES = ("silhouette", "contrast (default)", "contrast, circuit+map 0.5", "contrast, upstream pooled",
                "contrast x contrast on upstream pooled",
                "eigengap lambda2/lambda1 of cosine similarity", "1 - clarity (mean pairwise cosine)")


def embed_variants(emb_names) -> dict:
    out = {}
    for e in emb_names:
        out[f"SemanticLens 1 - cos, {e}"] = lambda d, lv, e=e: embedding_polysemanticity(
            d.sfeat(f"emb {e}"), score="semanticlens", random_state=d.seed)
        out[f"contrast, {e}"] = lambda d, lv, e=e: embedding_polysemanticity(d.sfeat(f"emb {e}"), random_state=d.seed)
    return out


def auroc_split(scores: np.ndarray, truth: np.ndarray) -> dict:
    ch = np.arange(len(truth))
    out = {}
    for part, sel in (("even", ch % 2 == 0), ("odd", ch % 2 == 1), ("all", ch >= 0)):
        try:
            out[part] = score_auroc(scores[sel], truth[sel])
        except Exception:  # a tiny smoke model may have no mixed neuron among a half
            out[part] = float("nan")
    return out


# ----------------------------------------------------------------------------------------- gates
GATE_VARIANTS = {
    "layer4.1": [
        "block circuit plain", "block circuit", "block circuit+map 0.5",
        "block circuit+map 0.25", "block circuit+map 0.75", "block circuit+map 1.0",
        "block circuit+map 1.5", "block circuit+map 2.0", "block circuit+upstream 0.5", "block circuit+upstream 1.0",
        "block circuit L2",
        "block circuit+hop 0.5", "block circuit+hop 1.0", "block circuit+hop+map 0.5",
        "block 2x2", "block 2x2+map 0.5",
        "map", "block upstream pooled",
    ],
    "layer4": ["circuit", "circuit+map 0.5", "circuit+map 1.0", "map", "upstream pooled"],
}
GATE_LABELS = {
    "block circuit plain": "PURE circuit, plain", "block circuit": "circuit, skip-aware (default)",
    "block circuit L2": "circuit skip-aware, L2-normalised", "map": "own activation map (baseline)",
    "block upstream pooled": "upstream pooled `layer4.0` (baseline)",
    "upstream pooled": "upstream pooled `layer3` (baseline)",
    "circuit": "PURE circuit (default)",
}


def gate_label(name: str) -> str:
    if name in GATE_LABELS:
        return GATE_LABELS[name]
    w = name.split()[-1]
    if name.startswith("block circuit+map"):
        return f"circuit+map, skip-aware, map weight {w}"
    if name.startswith("block circuit+upstream"):
        return f"skip-aware circuit + pooled `layer4.0` activations, weight {w}"
    if name.startswith("block circuit+hop+map"):
        return f"skip-aware circuit + `layer3` circuit + map {w}"
    if name.startswith("block circuit+hop"):
        return f"skip-aware circuit + `layer3` circuit, weight {w}"
    if name == "block 2x2":
        return "skip-aware circuit on 2x2 positions"
    if name.startswith("block 2x2+map"):
        return f"skip-aware 2x2 circuit + map {w}"
    if name.startswith("circuit+map"):
        return f"circuit+map {w}"
    return name


def gate_ari(d: Seed, name: str) -> dict[int, float]:
    """Planted-pair ARI of the gate ``name`` per planted channel: k-means on the fit references
    (CircuitKMeans, the seed as random_state), nearest centroid on the held-out test references."""
    fit, test = d.feature(name, "fit"), d.feature(name, "test")
    pos = {int(c): i for i, c in enumerate(d.channels)}
    out = {}
    for c in d.planted:
        c = int(c)
        xf, xt = fit[c], test[pos[c]]
        km = CircuitKMeans(2, random_state=d.seed).fit(xf[None])
        g = km.predict(xt[:, None])[:, 0]
        y = d.z["test_fine"][pos[c]]
        mix = np.bincount(y, minlength=10)
        pair = np.argsort(-mix, kind="stable")[:2]
        sel = np.isin(y, pair)
        out[c] = float(adjusted_rand_score(y[sel], g[sel]))
    return out


def check_against_library(a, train, test, d: Seed, n: int = 4) -> list[str]:
    """The cache and the offline gates against the library on the first ``n`` planted neurons:
    circuits of ``purenn.circuit_relevance``, gates of a ``purify_model`` at ``layer4.1`` and its
    ``score="contrast+upstream"`` at ``layer4``."""
    a.seed = d.seed
    model = fp.load_model(a, train)
    fit, z = train.head(a.n_fit), d.z
    pl = [int(c) for c in d.planted[:n]]
    lines, bad = [], False
    for c in pl:
        x = fit.images[torch.as_tensor(z["fit_idx"][c])]
        for level, up, key in (("layer4", "layer3", "fit_rel4"), ("layer4.1", "layer4.0", "fit_rel41")):
            r = purenn.circuit_relevance(model, x, layer=level, neurons=[c], upstream=up)[:, 0].numpy()
            err = float(np.abs(r - l1(z[key][c])).max())
            bad |= err > 1e-5 * float(np.abs(r).max() + EPS) * 100
            lines.append(f"circuit {level} neuron {c}: max |library - cache| {err:.2g}")
    sub = fit.subset(torch.unique(torch.as_tensor(z["fit_idx"][pl])).tolist())
    chans = d.channels.tolist()
    for gate, name in (("circuit", "block circuit"), ("circuit+map", "block circuit+map 0.5")):
        pm = purenn.purify_model(model, ["layer4.1"], sub, n_refs=z["fit_idx"].shape[1], neurons={"layer4.1": pl},
                                 gate=gate, skip_aware=True, seed=d.seed, progress=False)
        offline = gate_ari(d, name)
        for c in pl:
            ti = z["test_idx"][chans.index(c)]
            g = pm.gates(test.images[torch.as_tensor(ti)], neurons={"layer4.1": [c]})["layer4.1"][:, 0].numpy()
            y = test.fine.numpy()[ti]
            sel = np.isin(y, np.argsort(-np.bincount(y, minlength=10), kind="stable")[:2])
            lib = adjusted_rand_score(y[sel], g[sel])
            lines.append(f"gate {gate} layer4.1 neuron {c}: ARI pair library {lib:.4f}, offline {offline[c]:.4f}")
            bad |= abs(lib - offline[c]) > 1e-9
    # the score variant the library offers: purify_model's score="contrast+upstream" against the
    # offline "contrast x contrast on upstream pooled" (k-means per neuron, so a subset of neurons is exact)
    pm = purenn.purify_model(model, ["layer4"], sub, n_refs=z["fit_idx"].shape[1], neurons={"layer4": pl},
                             score="contrast+upstream", seed=d.seed, progress=False)
    lib = pm.pure_layer("layer4").scores.numpy()
    offline = np.ones(len(pl))
    for name in ("circuit", "upstream pooled"):
        offline *= CircuitKMeans(2, random_state=d.seed).fit(d.feature(name, "fit")[pl]).scores_
    err = float(np.abs(lib - offline).max())
    lines.append(f"score contrast+upstream layer4 neurons {pl}: max |library - offline| {err:.2g}")
    bad |= err > 1e-4
    if bad:
        raise SystemExit("the cache or the offline gates disagree with the library:\n" + "\n".join(lines))
    return lines


# ------------------------------------------------------------------------------------- reporting
def msd(v: list[float]) -> str:
    v = [x for x in v if np.isfinite(x)]
    if not v:
        return "n/a"
    return f"{np.mean(v):.3f} ± {np.std(v, ddof=1):.3f}" if len(v) > 1 else f"{v[0]:.3f}"


def boot_note(seeds: list[Seed], lv: str, draws: int = 2000) -> str:
    """Bootstrap (over neurons, per model) of the AUROC gain of contrast x contrast on upstream pooled."""
    up = "upstream pooled" if lv == "circuit" else "block upstream pooled"
    out = []
    for d in seeds:
        a0 = contrast(d, lv)
        b0 = a0 * contrast(d, up)
        t = d.mixed_fit[: d.limit]
        rng = np.random.default_rng(d.seed)
        diffs = []
        for _ in range(draws):
            i = rng.integers(0, len(t), len(t))
            if t[i].any() and not t[i].all():
                diffs.append(score_auroc(b0[i], t[i]) - score_auroc(a0[i], t[i]))
        lo, hi = np.percentile(diffs, [2.5, 97.5])
        out.append(f"seed {d.seed}: {score_auroc(b0, t) - score_auroc(a0, t):+.3f} [{lo:+.3f}, {hi:+.3f}]")
    return ("AUROC gain of contrast x contrast on upstream pooled over contrast, with a 95% bootstrap "
            "interval over neurons: " + "; ".join(out) + ".")


def evaluate(a, seeds: list[Seed]) -> tuple[dict, str]:
    emb_names = list(seeds[0].emb) if seeds[0].emb else []
    variants = {**SCORE_VARIANTS, **embed_variants(emb_names)}
    res: dict = {"scores": {}, "gates": {}}
    lines = [f"Seeds {[d.seed for d in seeds]}; mixed (fit) neurons "
             f"{', '.join(str(int(d.mixed_fit.sum())) for d in seeds)}; planted "
             f"{', '.join(str(len(d.planted)) for d in seeds)}.", ""]
    for level, lv in (("layer4", "circuit"), ("layer4.1", "block circuit")):
        if level not in a.score_levels:
            continue
        lines += [f"Score AUROC at `{level}` against mixed neurons (selection: even channels; held out: odd).", "",
                  "| score | even (selection) | odd (held out) | all | all, per seed |", "|---|---|---|---|---|"]
        for name, f in variants.items():
            if level == "layer4.1" and name not in BLOCK_SCORES or a.only and not any(t in name for t in a.only):
                continue
            t = time.time()
            per = []
            for d in seeds:
                s = f(d, lv)
                if s is None:
                    break
                per.append(auroc_split(np.asarray(s, float), d.mixed_fit[: d.limit]))
            if len(per) < len(seeds):
                continue
            res["scores"][f"{level} | {name}"] = per
            cols = [msd([p[k] for p in per]) for k in ("even", "odd", "all")]
            each = " / ".join(f"{p['all']:.3f}" for p in per)
            lines.append(f"| {name} | {' | '.join(cols)} | {each} |")
            fp.log(f"score {level} | {name}: {cols} ({time.time() - t:.0f}s)")
        if f"{level} | contrast x contrast on upstream pooled" in res["scores"]:
            lines += ["", boot_note(seeds, lv)]
        lines.append("")
    for level, names in GATE_VARIANTS.items():
        names = [n for n in names if not a.only or any(t in n for t in a.only)]
        if not names:
            continue
        lines += [f"Planted-pair ARI of the gate at `{level}` on held-out test references (mean over planted "
                  "neurons per model, then mean ± sd over models; selection: even channels).", "",
                  "| gate | even (selection) | odd (held out) | all | all, per seed | p vs own map (pooled) |",
                  "|---|---|---|---|---|---|"]
        for name in names:
            t = time.time()
            per = [gate_ari(d, name) for d in seeds]
            res["gates"][f"{level} | {name}"] = [{str(k): v for k, v in p.items()} for p in per]
            parts = {k: [float(np.mean([v for c, v in p.items() if sel(c)])) if any(sel(c) for c in p) else np.nan
                         for p in per]
                     for k, sel in (("even", lambda c: c % 2 == 0), ("odd", lambda c: c % 2 == 1),
                                    ("all", lambda c: True))}
            cols = [msd(parts[k]) for k in ("even", "odd", "all")]
            each = " / ".join(f"{v:.3f}" for v in parts["all"])
            p = ""
            if name != "map":  # one-sided Wilcoxon over the planted neurons of all models, against the own map
                own = [gate_ari(d, "map") for d in seeds]
                x = [v for pp in per for v in pp.values()]
                y = [o[c] for pp, o in zip(per, own) for c in pp]
                p = f"{paired_test(x, y):.2g}" if len(x) >= 2 else ""
            lines.append(f"| {gate_label(name)} | {' | '.join(cols)} | {each} | {p} |")
            fp.log(f"gate {level} | {name}: {cols} ({time.time() - t:.0f}s)")
        lines.append("")
    return res, "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    torch.set_grad_enabled(False)
    a.out.mkdir(parents=True, exist_ok=True)
    train, test = fp.load_data(a)
    if a.stage in ("cache", "all"):
        for i, seed in enumerate(a.seeds):
            build_cache(a, train, test, seed)
            if i == 0:  # the first model's cache first: variants can be tried on it while the others train
                build_embedders(a, train, test)
    if a.stage == "cache":
        return 0
    z = np.load(a.cache / "embedders.npz")
    emb = {k: z[k] for k in z.files}
    paths = {s: a.cache / f"seed{s}.npz" for s in a.seeds}
    seeds = [Seed(p, s, emb, a.score_limit) for s, p in paths.items() if p.is_file()]
    if len(seeds) < len(a.seeds):
        fp.log(f"only seeds {[d.seed for d in seeds]} are cached")
    res, md = evaluate(a, seeds)
    if a.check:
        checks = check_against_library(a, train, test, seeds[0])
        for line in checks:
            fp.log(line)
        res["check_against_library"] = checks
        md += "\nCheck against the library (first planted neurons of the first seed):\n\n" + \
            "\n".join(f"- {line}" for line in checks) + "\n"
    print(md)
    cmd = "python benchmarks/fashion_scores.py" + (" --smoke" if a.smoke else "") + \
        f" --seeds {','.join(str(d.seed) for d in seeds)}" + (" --check" if a.check and not a.smoke else "")
    fp.write_results(a, cmd, md, res)
    return 0


if __name__ == "__main__":
    sys.exit(main())
