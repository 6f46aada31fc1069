import gzip
import struct

import numpy as np
import pytest
import torch

from purenn.cli.datasets import (
    FASHION_MNIST_CLASSES,
    SUPERCLASS_PAIRS,
    cached_classifier,
    concept_data,
    fashion_mnist,
    find_fashion_mnist,
    load_fashion_mnist,
    planted_concepts,
    read_idx,
    small_image_resnet,
    superclass_map,
)
from purenn.errors import ConfigError, DataError


def _write_idx(path, array, compress):
    codes = {np.uint8: 0x08, np.int32: 0x0C}
    header = bytes([0, 0, codes[array.dtype.type], array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    body = array.astype(array.dtype.newbyteorder(">")).tobytes()
    opener = gzip.open if compress else open
    with opener(path, "wb") as f:
        f.write(header + body)


def _fake_fashion(root, n_train=12, n_test=6, compress=True):
    rng = np.random.default_rng(0)
    sfx = ".gz" if compress else ""
    for split, n in (("train", n_train), ("t10k", n_test)):
        images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        _write_idx(root / f"{split}-images-idx3-ubyte{sfx}", images, compress)
        _write_idx(root / f"{split}-labels-idx1-ubyte{sfx}", (np.arange(n) % 10).astype(np.uint8), compress)


@pytest.mark.parametrize("compress", [True, False])
def test_read_idx_roundtrip(tmp_path, compress):
    a = np.arange(24, dtype=np.int32).reshape(2, 3, 4) - 5
    p = tmp_path / ("a.idx.gz" if compress else "a.idx")
    _write_idx(p, a, compress)
    out = read_idx(p)
    np.testing.assert_array_equal(out, a)
    assert out.dtype.byteorder in ("=", "<", "|")


def test_read_idx_errors(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        read_idx(tmp_path / "missing")
    (tmp_path / "bad").write_bytes(b"\x01\x02\x03\x04rest")
    with pytest.raises(DataError, match="magic"):
        read_idx(tmp_path / "bad")
    (tmp_path / "short").write_bytes(bytes([0, 0, 8, 1]) + struct.pack(">I", 10) + b"\x00" * 3)
    with pytest.raises(DataError, match="expected 10"):
        read_idx(tmp_path / "short")


@pytest.mark.parametrize("compress", [True, False])
def test_fashion_from_user_root(tmp_path, compress):
    _fake_fashion(tmp_path, compress=compress)
    images, labels = load_fashion_mnist("train", root=tmp_path)
    assert images.shape == (12, 28, 28) and images.dtype == np.uint8
    assert labels.tolist() == [i % 10 for i in range(12)]
    ds = fashion_mnist("test", root=tmp_path, limit=4)
    assert len(ds) == 4 and ds.images.shape == (4, 1, 28, 28) and ds.source == "fashion-mnist"
    assert ds.class_names == FASHION_MNIST_CLASSES
    x, coarse, fine = ds[3]
    assert int(coarse) == int(superclass_map()[int(fine)])


def test_fashion_env_var(tmp_path, monkeypatch):
    _fake_fashion(tmp_path)
    monkeypatch.setenv("PURENN_FASHION_MNIST", str(tmp_path))
    assert find_fashion_mnist() == tmp_path


def test_fashion_missing_says_how_to_install(tmp_path, monkeypatch):
    with pytest.raises(DataError, match="apt-get install dataset-fashion-mnist or pass root="):
        find_fashion_mnist(tmp_path)
    monkeypatch.setenv("PURENN_FASHION_MNIST", str(tmp_path / "nowhere"))
    with pytest.raises(DataError, match="nowhere"):
        load_fashion_mnist("test")
    # without Fashion-MNIST the demo data falls back to the synthetic concepts, but not for an explicit root
    ds = concept_data("test", limit=20)
    assert ds.source == "planted" and len(ds) == 20
    with pytest.raises(DataError):
        concept_data("test", root=tmp_path)
    with pytest.raises(ConfigError, match="split"):
        load_fashion_mnist("valid", root=tmp_path)


def test_superclass_pairing():
    sup = superclass_map(SUPERCLASS_PAIRS)
    assert sorted(np.bincount(sup).tolist()) == [2] * 5
    # the pairs join unrelated classes: no two tops, no two shoes in one superclass
    tops, shoes = {0, 2, 4, 6}, {5, 7, 9}
    for a, b in SUPERCLASS_PAIRS:
        assert not ({a, b} <= tops or {a, b} <= shoes)
    with pytest.raises(ConfigError, match="two superclasses"):
        superclass_map(((0, 1), (1, 2)), n_fine=3)
    with pytest.raises(ConfigError, match="in no superclass"):
        superclass_map(((0, 1),), n_fine=3)


def test_planted_concepts_deterministic_and_learnable_structure():
    a, b = planted_concepts(40, seed=3), planted_concepts(40, seed=3)
    assert torch.equal(a.images, b.images) and not torch.equal(a.images, planted_concepts(40, seed=4).images)
    assert np.bincount(a.fine.numpy()).tolist() == [4] * 10
    assert a.coarse.tolist() == superclass_map()[a.fine.numpy()].tolist()
    # class means differ: the concepts are visibly different
    means = torch.stack([a.images[a.fine == c].mean(0).flatten() for c in range(10)])
    assert torch.cdist(means, means).fill_diagonal_(float("inf")).min() > 1.0
    sub = planted_concepts(8, classes=[4, 7], size=12)
    assert sub.class_names == ("plus", "square") and sub.coarse.tolist() == [0] * 8
    assert sub.subset([1, 0]).fine.tolist() == [1, 0]
    for bad in ({"classes": [0, 0]}, {"classes": [11]}, {"classes": [0, 1, 2]}, {"size": 4}):
        with pytest.raises(ConfigError):
            planted_concepts(8, **bad)
    with pytest.raises(ConfigError):
        planted_concepts(0)


def test_small_image_resnet():
    m = small_image_resnet(num_classes=3)
    assert m.conv1.stride == (1, 1) and m.conv1.in_channels == 1
    assert m(torch.rand(1, 1, 28, 28)).shape == (1, 3)
    assert small_image_resnet(blocks=[1, 1, 1, 1], stem_stride=2)(torch.rand(2, 1, 16, 16)).shape == (2, 5)
    with pytest.raises(ConfigError):
        small_image_resnet(blocks=[1, 1])
    with pytest.raises(ConfigError):
        small_image_resnet("vgg11")
    with pytest.raises(ConfigError):
        small_image_resnet(stem_stride=3)


def test_cached_classifier(tmp_path):
    ds = planted_concepts(32, classes=[0, 1], size=12)

    def build():
        return small_image_resnet(blocks=[1, 1, 1, 1], stem_stride=2, num_classes=1)

    kw = {"epochs": 1, "batch_size": 16, "seed": 0, "progress": False, "directory": tmp_path}
    m1, path, hit1 = cached_classifier("tiny", build, ds, **kw)
    m2, path2, hit2 = cached_classifier("tiny", build, ds, **kw)
    assert (hit1, hit2) == (False, True) and path == path2 and path.is_file()
    for (k, a), b in zip(m1.state_dict().items(), m2.state_dict().values()):
        assert torch.equal(a, b), k
    assert not m2.training
    # another seed or other data is another cache entry
    _, path3, hit3 = cached_classifier("tiny", build, ds, **{**kw, "seed": 1})
    assert not hit3 and path3 != path
    _, path4, _ = cached_classifier("tiny", build, ds.subset(range(16)), **kw)
    assert path4 not in (path, path3)


@pytest.mark.parametrize("n_images", [8, 20, 36])  # 2, 5 and 9 steps: too few for a one-cycle warm-up
def test_train_classifier_with_few_steps(n_images):
    from purenn.cli.datasets import train_classifier

    ds = planted_concepts(n_images, classes=[0, 1], size=12)
    m = small_image_resnet(blocks=[1, 1, 1, 1], stem_stride=2, num_classes=1)
    before = [p.detach().clone() for p in m.parameters()]
    train_classifier(m, ds, epochs=1, batch_size=4, seed=0, progress=False)
    assert any(not torch.equal(a, b) for a, b in zip(before, m.parameters()))
    assert all(torch.isfinite(p).all() for p in m.parameters())
