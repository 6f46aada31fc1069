"""``purenn report`` and :func:`purenn.analysis.report.write_report`: the page's structure, its escaping, bad inputs,
the command's exit codes, and the page in a real browser (headless Chromium)."""

from __future__ import annotations

import gzip
import html.parser
import re
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

import purenn
from purenn import ConfigError, DataError, LayerError
from purenn.analysis.report import report_neurons, write_report
from purenn.cli import app as cli
from purenn.cli.datasets import planted_concepts, small_image_resnet

from conftest import calibrate_bn

#: class names that must reach the page as text, never as markup
HOSTILE = ['<script>alert("x")</script>', "a&b", "it's \"quoted\"", "<img src=x onerror=alert(1)>", "plain", "sixth"]
NEURONS = {"layer4": [0, 3, 7, 11], "layer3": [1, 2]}


@pytest.fixture(scope="module")
def case():
    """A tiny purified model (6 split neurons in two layers, one virtual neuron suppressed), its data and labels."""
    data = planted_concepts(40, classes=[0, 1, 2, 3, 4, 5], size=16, seed=0)
    torch.manual_seed(0)
    model = calibrate_bn(small_image_resnet(blocks=[1, 1, 1, 1], stem_stride=2, num_classes=3),
                         torch.rand(8, 1, 16, 16))
    pm = purenn.purify_model(model, ["layer4", "layer3"], data, n_refs=10, neurons=NEURONS, progress=False)
    pm.suppress("layer4", [pm.virtual_index("layer4", 3, 1)])
    return pm, data, data.fine.numpy()


@pytest.fixture(scope="module")
def report(case, tmp_path_factory) -> Path:
    pm, data, labels = case
    out = tmp_path_factory.mktemp("report") / "report"
    index = write_report(pm, data, out, labels=labels, class_names=HOSTILE, n_images=4, progress=False,
                         title="tiny <model> & co", data_description="planted <concepts>")
    assert index == out / "index.html"
    return out


class _Page(html.parser.HTMLParser):
    """Tags and attributes of a page, for structural checks."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict[str, str]]] = []
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, {k: v or "" for k, v in attrs}))

    def all(self, tag: str, **attrs: str) -> list[dict[str, str]]:
        return [a for t, a in self.tags if t == tag and all(a.get(k) == v for k, v in attrs.items())]


def _table_body(text: str, table_id: str) -> str:
    m = re.search(rf'<table id="{table_id}".*?<tbody>(.*?)</tbody>', text, re.S)
    assert m, table_id
    return m.group(1)


def _rows(text: str, table_id: str) -> list[list[str]]:
    """Cells of each body row (their data-value when set, else their text)."""
    rows = []
    for row in re.findall(r"<tr[^>]*>(.*?)</tr>", _table_body(text, table_id), re.S):
        cells = []
        for attrs, content in re.findall(r"<td([^>]*)>(.*?)</td>", row, re.S):
            value = re.search(r'data-value="([^"]*)"', attrs)
            cells.append(value.group(1) if value else re.sub("<[^>]+>", "", content))
        rows.append(cells)
    return rows


# ------------------------------------------------------------------------------------------ structure
def test_page_structure(case, report):
    pm, _, _ = case
    text = (report / "index.html").read_text(encoding="utf-8")
    page = _Page(text)
    assert sorted(p.name for p in report.iterdir()) == ["img", "index.html"]
    imgs = page.all("img")
    assert imgs, "the page shows no reference image"
    for img in imgs:
        assert not re.match(r"[a-z]+:", img["src"]) and (report / img["src"]).is_file(), img["src"]
    assert {img["src"] for img in imgs} == {f"img/{p.name}" for p in (report / "img").iterdir()}
    # offline: one inline script, no external resource
    assert len(page.all("script")) == 1 and "src" not in page.all("script")[0]
    assert not page.all("link") and not re.search(r'(src|href)="(https?:)?//', text)
    # one table row per purified (split) neuron, highest score first, linking to its section
    split = [(name, ch, s) for name in pm.layers for ch, s, c in zip(
        pm.pure_layer(name).neurons.tolist(), pm.pure_layer(name).scores.tolist(),
        pm.pure_layer(name).n_clusters.tolist()) if c > 1]
    rows = _rows(text, "neurons-table")
    assert len(rows) == len(split) == sum(map(len, NEURONS.values()))
    assert [(r[0], int(r[1])) for r in rows] == [(n, c) for n, c, _ in sorted(split, key=lambda t: -t[2])]
    assert [float(r[2]) for r in rows] == sorted((s for _, _, s in split), reverse=True)
    for name, ch, _ in split:
        assert len(page.all("article", id=f"n-{name}-{ch}")) == 1
        assert f'href="#n-{name}-{ch}"' in text
    # per virtual neuron: its reference images (at most n_images, all of its cluster) in strength order
    for name, ch, _ in split:
        pl = pm.pure_layer(name)
        k = pl.neurons.tolist().index(ch)
        section = re.search(rf'<article class="neuron" id="n-{name}-{ch}">(.*?)</article>', text, re.S).group(1)
        shown = [int(s) for s in re.findall(r'src="img/s(\d+)\.png"', section)]
        expected = [int(i) for c in range(int(pl.n_clusters[k]))
                    for i in pl.ref_indices[k][pl.ref_clusters[k] == c][:4].tolist()]
        assert shown == expected
        assert section.count("<circle") == pl.ref_indices.shape[1]  # one point per reference in the embedding
    # the layers table and the suppressed virtual neurons
    layer_rows = _rows(text, "layers-table")
    assert [r[0] for r in layer_rows] == pm.layers
    for r in layer_rows:  # layer, upstream, gate, rule, skip-aware, channels, fitted, purified, ...
        pl = pm.pure_layer(r[0])
        assert r[1:4] == [pl.upstream, pl.gate, "gradient"] and int(r[7]) == int((pl.n_clusters > 1).sum())
    suppressed = _rows(text, "suppressed-table")
    assert [(r[0], int(r[1]), r[2]) for r in suppressed] == [("layer4", pm.virtual_index("layer4", 3, 1), "3.1")]
    assert 'class="vrow suppressed"' in text and text.count('<span class="off">suppressed</span>') == 1


def test_concept_shares_and_purity(case, report):
    pm, _, labels = case
    text = (report / "index.html").read_text(encoding="utf-8")
    pl = pm.pure_layer("layer4")
    k = pl.neurons.tolist().index(7)
    section = re.search(r'<article class="neuron" id="n-layer4-7">(.*?)</article>', text, re.S).group(1)
    tops = 0
    for c in range(2):
        refs = pl.ref_indices[k][pl.ref_clusters[k] == c].numpy()
        counts = np.bincount(labels[refs], minlength=len(HOSTILE))
        top = int(np.lexsort((np.arange(len(counts)), -counts))[0])
        tops += counts[top]
        share = f"{HOSTILE[top].replace('&', '&amp;').replace('<', '&lt;').replace('>', '&gt;')}" \
                .replace('"', "&quot;").replace("'", "&#x27;")
        assert f"classes of the {len(refs)} references: {share} {100 * counts[top] / len(refs):.0f}%" in section
    row = next(r for r in _rows(text, "neurons-table") if r[0] == "layer4" and r[1] == "7")
    assert float(row[6]) == pytest.approx(tops / pl.ref_indices.shape[1])


def test_text_is_escaped(report):
    text = (report / "index.html").read_text(encoding="utf-8")
    for name in HOSTILE[:4]:
        assert name not in text
    assert "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt;" in text
    assert "<title>tiny &lt;model&gt; &amp; co</title>" in text and "planted &lt;concepts&gt;" in text
    assert text.count("<script") == 1 and text.count("<img") == len(_Page(text).all("img"))


def test_top_layers_and_no_labels(case, tmp_path):
    pm, data, _ = case
    best = report_neurons(pm, top=2)
    index = write_report(pm, data, tmp_path / "r", top=2, progress=False)
    text = index.read_text(encoding="utf-8")
    rows = _rows(text, "neurons-table")
    assert [(r[0], int(r[1])) for r in rows] == best and len(rows) == 2
    assert "Label purity" not in text and "classes of the" not in text  # no labels: no concept shares
    assert "The 2 highest-scoring of 6 purified neurons" in text
    index = write_report(pm, data, tmp_path / "r3", layers=["layer3"], progress=False)
    assert {r[0] for r in _rows(index.read_text(encoding="utf-8"), "neurons-table")} == {"layer3"}


def test_rgb_tensor_data_without_centroids(tmp_path):
    """Colour images from a tensor through a DataLoader, a gate without circuit centroids, t-SNE."""
    from torch.utils.data import DataLoader

    from conftest import tiny_resnet

    model = tiny_resnet()
    data = torch.rand(12, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    pm = purenn.purify_model(model, ["layer4"], data, n_refs=6, neurons={"layer4": [0, 1]}, gate="activation",
                             progress=False)
    index = write_report(pm, DataLoader(data, batch_size=5), tmp_path / "r", embedding="tsne", progress=False)
    text = index.read_text(encoding="utf-8")
    assert len(_rows(text, "neurons-table")) == 2 and "centroids" not in text
    assert not re.search(r"\bnan\b|\binf\b", text, re.I)
    from PIL import Image

    files = sorted((tmp_path / "r" / "img").iterdir())
    assert files and all(Image.open(f).mode == "RGB" and Image.open(f).size == (32, 32) for f in files)


def test_callers_objects_unchanged(case, tmp_path):
    pm, data, labels = case
    state = {k: v.clone() for k, v in pm.state_dict().items()}
    images, lab = data.images.clone(), labels.copy()
    modes = [m.training for m in pm.modules()]
    write_report(pm, data, tmp_path / "r", labels=labels, progress=False)
    assert all(torch.equal(v, pm.state_dict()[k]) for k, v in state.items())
    assert torch.equal(images, data.images) and np.array_equal(lab, labels)
    assert modes == [m.training for m in pm.modules()]


# ------------------------------------------------------------------------------------------ writing
def test_replaces_an_earlier_report_but_nothing_else(case, tmp_path):
    pm, data, _ = case
    out = tmp_path / "r"
    write_report(pm, data, out, top=1, progress=False)
    write_report(pm, data, out, top=3, progress=False)  # an earlier report is replaced
    assert len(_rows((out / "index.html").read_text(encoding="utf-8"), "neurons-table")) == 3
    empty = tmp_path / "empty"
    empty.mkdir()
    write_report(pm, data, empty, top=1, progress=False)
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match="holds other files"):
        write_report(pm, data, other, progress=False)
    (out / "notes.txt").write_text("mine")  # a report folder with a file of the user's is not replaced either
    with pytest.raises(ConfigError, match="holds other files"):
        write_report(pm, data, out, progress=False)
    assert (other / "notes.txt").read_text() == "mine" and (out / "notes.txt").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "other", "r"]  # no temporary folder left


def test_a_failure_leaves_the_earlier_report(case, tmp_path, monkeypatch):
    import purenn.analysis.report as report_module

    pm, data, _ = case
    out = tmp_path / "r"
    write_report(pm, data, out, top=1, progress=False)
    before = (out / "index.html").read_text(encoding="utf-8")
    calls = []

    def broken(*args, **kwargs):
        if calls:
            raise RuntimeError("disk on fire")
        calls.append(1)
        return original(*args, **kwargs)

    original = report_module._collect
    monkeypatch.setattr(report_module, "_collect", broken)
    with pytest.raises(RuntimeError, match="disk on fire"):
        write_report(pm, data, out, top=3, progress=False)
    assert (out / "index.html").read_text(encoding="utf-8") == before
    assert [p.name for p in tmp_path.iterdir()] == ["r"]


@pytest.mark.parametrize("kwargs, error, match", [
    ({"pm": "not a model"}, ConfigError, "needs a PurifiedModel"),
    ({"n_images": 0}, ConfigError, "n_images"),
    ({"top": 0}, ConfigError, "top"),
    ({"embedding": "umap"}, ConfigError, "embedding"),
    ({"layers": ["layer2"]}, LayerError, "layer2"),
    ({"labels": [0, 1, 2]}, DataError, "3 entries but the data has 40"),
    ({"labels": np.full(40, 0.5)}, DataError, "integers"),
    ({"labels": np.full(40, -1)}, DataError, "non-negative"),
    ({"class_names": ["a", "b"]}, ConfigError, "need labels"),
    ({"data": "short"}, DataError, "taken from other data"),
    ({"data": "flipped"}, DataError, "reference images differ"),
    ({"out": "file"}, ConfigError, "it is a file"),
    ({"out": "missing/report"}, ConfigError, "does not exist"),
])
def test_bad_inputs(case, tmp_path, kwargs, error, match):
    pm, data, _ = case
    args = {"pm": pm, "data": data, "out": tmp_path / "r"}
    args.update(kwargs)
    if kwargs.get("data") == "short":
        args["data"] = data.images[:5]
    elif kwargs.get("data") == "flipped":  # as many samples, other images
        args["data"] = data.images.flip(-1)
    if kwargs.get("out") == "file":
        (tmp_path / "file").write_text("x")
        args["out"] = tmp_path / "file"
    elif kwargs.get("out"):
        args["out"] = tmp_path / kwargs["out"]
    with pytest.raises(error, match=match):
        write_report(progress=False, **args)
    assert sorted(p.name for p in tmp_path.iterdir()) in ([], ["file"])  # nothing written


# ------------------------------------------------------------------------------------------ command
def _write_idx(path: Path, array: np.ndarray) -> None:
    arr = np.ascontiguousarray(array, dtype=np.uint8)
    with gzip.open(path, "wb") as f:
        f.write(bytes([0, 0, 0x08, arr.ndim]) + struct.pack(f">{arr.ndim}I", *arr.shape) + arr.tobytes())


@pytest.fixture(scope="module")
def cli_files(tmp_path_factory) -> dict[str, Path]:
    """Fashion-MNIST-format IDX files of planted concepts and a model purified on them with ``purenn purify``."""
    root = tmp_path_factory.mktemp("report_cli")
    fm = root / "fmnist"
    fm.mkdir()
    for prefix, n, seed in (("train", 40, 0), ("t10k", 10, 1)):
        ds = planted_concepts(n, seed=seed)
        _write_idx(fm / f"{prefix}-images-idx3-ubyte.gz", ((ds.images[:, 0] * 0.35 + 0.25).clamp(0, 1) * 255).numpy())
        _write_idx(fm / f"{prefix}-labels-idx1-ubyte.gz", ds.fine.numpy())
    torch.manual_seed(0)
    small = calibrate_bn(small_image_resnet(blocks=[1, 1, 1, 1], stem_stride=2, num_classes=5),
                         torch.rand(8, 1, 28, 28))
    torch.save(small.state_dict(), root / "small.pt")
    pure = root / "pure.safetensors"
    assert cli.main(["purify", "resnet18", "-c", str(root / "small.pt"), "--blocks", "1,1,1,1", "--stem-stride", "2",
                     "--fashion-mnist", str(fm), "--channels", "layer4:3,5,9", "--n-refs", "8", "-o", str(pure),
                     "-q"]) == 0
    return {"root": root, "fmnist": fm, "pure": pure}


def _run(capsys, *argv) -> tuple[int, str, str]:
    code = cli.main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_command(capsys, cli_files, tmp_path):
    out = tmp_path / "report"
    code, stdout, err = _run(capsys, "report", cli_files["pure"], "--fashion-mnist", cli_files["fmnist"], "--out", out,
                             "-q")
    assert code == 0, err
    assert stdout.strip() == f"wrote {out / 'index.html'}" and err == ""
    text = (out / "index.html").read_text(encoding="utf-8")
    assert len(_rows(text, "neurons-table")) == 3 and "purenn report: pure.safetensors" in text
    assert "Fashion-MNIST train: 40 images" in text and "Label purity" in text
    code, stdout, _ = _run(capsys, "report", "--help")
    assert code == 0 and "offline" in stdout and "exit codes:" in stdout


@pytest.mark.parametrize("argv, match", [
    (["{root}/missing.safetensors", "--fashion-mnist", "{fmnist}"], "does not exist"),
    (["{pure}", "--fashion-mnist", "{fmnist}", "--out", "{root}/small.pt"], "is a file"),
    (["{pure}", "--fashion-mnist", "{fmnist}", "--out", "{root}/no/such/report"], "does not exist"),
    (["{pure}", "--fashion-mnist", "{fmnist}", "--limit", "5", "--out", "{tmp}/r"], "same data"),
    (["{pure}", "--fashion-mnist", "{root}/no-such-dir", "--out", "{tmp}/r"], "does not exist"),
    (["{pure}", "--fashion-mnist", "{fmnist}", "--layers", "layer2", "--out", "{tmp}/r"], "not purified"),
    (["{pure}", "--fashion-mnist", "{fmnist}", "--top", "0", "--out", "{tmp}/r"], "--top"),
    (["{pure}", "--fashion-mnist", "{fmnist}", "--n-images", "0", "--out", "{tmp}/r"], "--n-images"),
])
def test_command_bad_input_exits_3(capsys, cli_files, tmp_path, argv, match):
    fill = {"root": cli_files["root"], "fmnist": cli_files["fmnist"], "pure": cli_files["pure"], "tmp": tmp_path}
    code, _, err = _run(capsys, "report", *[a.format(**fill) for a in argv])
    assert code == 3 and match in err and "Traceback" not in err, err
    assert not (tmp_path / "r").exists()


def test_command_needs_data(capsys, cli_files):
    code, _, err = _run(capsys, "report", cli_files["pure"])
    assert code == 2 and "--fashion-mnist" in err


# ------------------------------------------------------------------------------------------ browser
def _browser():
    """A headless Chromium driven by Selenium through Debian's chromedriver, or a skip naming what is missing."""
    chromium = next((p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if p), None)
    driver = shutil.which("chromedriver")
    if chromium is None or driver is None:
        pytest.skip("Chromium or its chromedriver is not installed (Debian: apt-get install chromium chromium-driver)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1280,900",
                "--hide-scrollbars"):
        options.add_argument(arg)
    return webdriver.Chrome(service=Service(driver), options=options)


_IMAGES = "return Array.from(document.images).map(i => i.complete ? i.naturalWidth : -1)"
_COLUMN = ("return Array.from(document.querySelectorAll('#neurons-table tbody tr'))"
           ".map(r => r.cells[arguments[0]].getAttribute('data-value') || r.cells[arguments[0]].textContent.trim())")


def test_in_a_browser(report, tmp_path):
    browser = _browser()
    try:
        browser.get((report / "index.html").resolve().as_uri())
        widths = browser.execute_script(_IMAGES)
        assert len(widths) == len(_Page((report / "index.html").read_text(encoding="utf-8")).all("img"))
        assert all(w > 0 for w in widths), widths  # every image loaded
        scores = [float(v) for v in browser.execute_script(_COLUMN, 2)]
        assert scores == sorted(scores, reverse=True) and len(set(scores)) > 1

        def click(label: str) -> None:
            browser.execute_script("Array.from(document.querySelectorAll('#neurons-table th button'))"
                                   ".find(b => b.textContent === arguments[0]).click()", label)

        click("Score")
        assert [float(v) for v in browser.execute_script(_COLUMN, 2)] == sorted(scores)
        click("Score")
        assert [float(v) for v in browser.execute_script(_COLUMN, 2)] == sorted(scores, reverse=True)
        rows = list(zip(browser.execute_script(_COLUMN, 0), map(int, browser.execute_script(_COLUMN, 1))))
        click("Channel")
        after = list(zip(browser.execute_script(_COLUMN, 0), map(int, browser.execute_script(_COLUMN, 1))))
        assert [c for _, c in after] == sorted(c for _, c in rows) and sorted(after) == sorted(rows)
        click("Layer")
        assert browser.execute_script(_COLUMN, 0) == ["layer3"] * len(NEURONS["layer3"]) + \
            ["layer4"] * len(NEURONS["layer4"])
        sort = browser.execute_script("return Array.from(document.querySelectorAll('#neurons-table th'))"
                                      ".map(h => h.getAttribute('aria-sort'))")
        assert sort[0] == "ascending" and sort.count(None) == len(sort) - 1
        shot = tmp_path / "report.png"
        assert browser.save_screenshot(str(shot))
        assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 10_000
        print(f"screenshot: {shot}")

        # the check can fail: a missing image is seen as one that did not load
        broken = tmp_path / "broken"
        shutil.copytree(report, broken)
        victim = sorted((broken / "img").iterdir())[0]
        victim.unlink()
        browser.get((broken / "index.html").resolve().as_uri())
        widths = browser.execute_script(_IMAGES)
        n_victim = (report / "index.html").read_text(encoding="utf-8").count(f'src="img/{victim.name}"')
        assert sum(w == 0 for w in widths) == n_victim >= 1
    finally:
        browser.quit()
