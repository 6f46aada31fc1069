"""Labelled image data with known polysemanticity: Fashion-MNIST superclasses and a synthetic twin.

Training a classifier on *superclasses* that are unions of two unrelated fine classes makes its
late neurons polysemantic in a known way: a neuron that serves a superclass tends to respond to
both of its fine classes. The fine labels then tell whether purification separated them.

- :func:`load_fashion_mnist` reads Fashion-MNIST's IDX files (``.gz`` or raw) from ``root``, the
  directory in ``$PURENN_FASHION_MNIST``, or the Debian package ``dataset-fashion-mnist``
  (``/usr/share/datasets/fashion-mnist``).
- :func:`planted_concepts` renders a small synthetic dataset of ten shape/texture concepts with
  the same superclass pairing, for tests and for machines without Fashion-MNIST.
- :func:`small_image_resnet` builds a torchvision ResNet with a stem adapted to small images, and
  :func:`train_classifier` / :func:`cached_classifier` train it with a fixed seed, caching the
  weights (safetensors) under ``$PURENN_CACHE`` or ``~/.cache/purenn``.

Example:
    >>> from purenn.cli.datasets import planted_concepts
    >>> ds = planted_concepts(40, seed=0)
    >>> x, coarse, fine = ds[0]
    >>> tuple(x.shape), ds.class_names[int(fine)], int(coarse) == int(ds.superclass_of[fine])
    ((1, 28, 28), 'h-stripes', True)
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import struct
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
import torchvision
from torch import Tensor, nn
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from purenn.common.checks import check_int
from purenn.errors import ConfigError, DataError

__all__ = [
    "FASHION_MNIST_CLASSES",
    "PLANTED_CLASSES",
    "SUPERCLASS_PAIRS",
    "DEFAULT_FASHION_DIRS",
    "ConceptDataset",
    "read_idx",
    "find_fashion_mnist",
    "load_fashion_mnist",
    "fashion_mnist",
    "planted_concepts",
    "concept_data",
    "superclass_map",
    "small_image_resnet",
    "train_classifier",
    "cached_classifier",
    "cache_dir",
]

FASHION_MNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)
PLANTED_CLASSES = (
    "h-stripes", "v-stripes", "disk", "ring", "plus", "cross", "checker", "square", "dots", "triangle",
)
#: superclass ``s`` is the union of fine classes ``SUPERCLASS_PAIRS[s]``; the two are unrelated:
#: (T-shirt, Ankle boot), (Pullover, Sandal), (Dress, Bag), (Coat, Sneaker), (Shirt, Trouser).
SUPERCLASS_PAIRS: tuple[tuple[int, int], ...] = ((0, 9), (2, 5), (3, 8), (4, 7), (6, 1))
DEFAULT_FASHION_DIRS = ("/usr/share/datasets/fashion-mnist",)
_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
_FASHION_STATS = (0.2860, 0.3530)
_PLANTED_STATS = (0.25, 0.35)


def superclass_map(pairs: Sequence[Sequence[int]] = SUPERCLASS_PAIRS, n_fine: int = 10) -> np.ndarray:
    """``(n_fine,)`` superclass of each fine class; every fine class must be in exactly one group.

    Example:
        >>> superclass_map(((0, 1), (2, 3)), n_fine=4).tolist()
        [0, 0, 1, 1]
    """
    out = np.full(n_fine, -1, dtype=np.int64)
    for s, group in enumerate(pairs):
        for f in group:
            if not 0 <= int(f) < n_fine or out[int(f)] != -1:
                raise ConfigError(f"fine class {f!r} is out of range 0..{n_fine - 1} or in two superclasses.")
            out[int(f)] = s
    if (out < 0).any():
        raise ConfigError(f"fine classes {np.flatnonzero(out < 0).tolist()} are in no superclass.")
    return out


class ConceptDataset(Dataset):
    """Images with a fine label and a superclass label; items are ``(x, coarse, fine)``.

    Args:
        images: ``(N, 1, H, W)`` float images, already normalised.
        fine: ``(N,)`` fine class of each image.
        pairs: the superclass grouping of the fine classes.
        class_names: names of the fine classes.
        source: where the images came from (``"fashion-mnist"`` or ``"planted"``).

    Attributes:
        coarse: ``(N,)`` superclass of each image; ``superclass_of``: superclass of each fine class.
    """

    def __init__(
        self,
        images: Tensor,
        fine: Tensor,
        *,
        pairs: Sequence[Sequence[int]] = SUPERCLASS_PAIRS,
        class_names: Sequence[str] = FASHION_MNIST_CLASSES,
        source: str = "",
    ) -> None:
        if images.ndim != 4 or len(images) != len(fine):
            raise DataError(f"images must be (N, C, H, W) with one label each, got {tuple(images.shape)}, {len(fine)}.")
        self.images = images
        self.fine = torch.as_tensor(fine, dtype=torch.long)
        self.pairs = tuple(tuple(int(f) for f in p) for p in pairs)
        self.class_names = tuple(class_names)
        self.superclass_of = torch.as_tensor(superclass_map(self.pairs, len(self.class_names)))
        self.coarse = self.superclass_of[self.fine]
        self.source = source

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor, Tensor]:
        return self.images[i], self.coarse[i], self.fine[i]

    @property
    def n_superclasses(self) -> int:
        return len(self.pairs)

    def subset(self, indices: Sequence[int] | Tensor | np.ndarray) -> ConceptDataset:
        """A new dataset holding the given samples (in that order)."""
        idx = torch.as_tensor(np.asarray(indices), dtype=torch.long)
        return ConceptDataset(
            self.images[idx], self.fine[idx], pairs=self.pairs, class_names=self.class_names, source=self.source
        )

    def head(self, n: int | None) -> ConceptDataset:
        """The first ``n`` samples (all for ``None``)."""
        return self if n is None or n >= len(self) else self.subset(range(n))

    def superclass_names(self) -> list[str]:
        return ["+".join(self.class_names[f] for f in p) for p in self.pairs]


# ---------------------------------------------------------------------------------------------- IDX
def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read an IDX file (the MNIST format), gzip-compressed or raw, into a numpy array.

    Raises:
        DataError: the file is missing, truncated or not in IDX format.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"IDX file {str(path)!r} does not exist.")
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except OSError as e:
        raise DataError(f"cannot read IDX file {str(path)!r}: {e}") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise DataError(f"{str(path)!r} is not an IDX file (bad magic number).")
    ndim = raw[3]
    if len(raw) < 4 + 4 * ndim:
        raise DataError(f"{str(path)!r} is truncated (header).")
    shape = struct.unpack(f">{ndim}I", raw[4 : 4 + 4 * ndim])
    dtype = np.dtype(_IDX_DTYPES[raw[2]])
    count = int(np.prod(shape)) if ndim else 0
    body = raw[4 + 4 * ndim :]
    if len(body) != count * dtype.itemsize:
        raise DataError(f"{str(path)!r} holds {len(body)} data bytes, expected {count * dtype.itemsize} for {shape}.")
    return np.frombuffer(body, dtype=dtype).reshape(shape).astype(dtype.newbyteorder("="))


def _candidates(root: str | os.PathLike | None) -> list[Path]:
    if root is not None:
        return [Path(root)]
    env = os.environ.get("PURENN_FASHION_MNIST")
    return [Path(env)] if env else [Path(d) for d in DEFAULT_FASHION_DIRS]


def _resolve(directory: Path, stem: str) -> Path | None:
    for name in (stem + ".gz", stem):
        if (directory / name).is_file():
            return directory / name
    return None


def find_fashion_mnist(root: str | os.PathLike | None = None) -> Path:
    """The directory holding Fashion-MNIST's four IDX files (``.gz`` or raw).

    Searched: ``root`` if given, else ``$PURENN_FASHION_MNIST``, else the Debian location.

    Raises:
        DataError: not found; the message says how to install it.
    """
    tried = _candidates(root)
    for d in tried:
        if all(_resolve(d, stem) is not None for pair in _FILES.values() for stem in pair):
            return d
    raise DataError(
        f"Fashion-MNIST not found in {[str(d) for d in tried]}: apt-get install dataset-fashion-mnist "
        "or pass root= (a directory with train-images-idx3-ubyte[.gz] and the other three IDX files), "
        "or set PURENN_FASHION_MNIST."
    )


def load_fashion_mnist(split: str = "train", root: str | os.PathLike | None = None) -> tuple[np.ndarray, np.ndarray]:
    """``(images uint8 (N, 28, 28), labels int64 (N,))`` of one split (``"train"`` or ``"test"``).

    Example:
        >>> images, labels = load_fashion_mnist("test")      # doctest: +SKIP
        >>> images.shape, labels[:3].tolist()                # doctest: +SKIP
        ((10000, 28, 28), [9, 2, 1])
    """
    if split not in _FILES:
        raise ConfigError(f"split must be 'train' or 'test', got {split!r}.")
    d = find_fashion_mnist(root)
    images = read_idx(_resolve(d, _FILES[split][0]))
    labels = read_idx(_resolve(d, _FILES[split][1])).astype(np.int64)
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise DataError(f"Fashion-MNIST {split} files in {str(d)!r} disagree: {images.shape} vs {labels.shape}.")
    if labels.min() < 0 or labels.max() > 9:
        raise DataError(f"Fashion-MNIST {split} labels in {str(d)!r} are outside 0..9.")
    return images, labels


def fashion_mnist(
    split: str = "train",
    *,
    root: str | os.PathLike | None = None,
    limit: int | None = None,
    pairs: Sequence[Sequence[int]] = SUPERCLASS_PAIRS,
) -> ConceptDataset:
    """Fashion-MNIST as a :class:`ConceptDataset` (normalised ``(1, 28, 28)`` images, fine and
    superclass labels); ``limit`` keeps the first ``limit`` images."""
    images, labels = load_fashion_mnist(split, root)
    if limit is not None:
        images, labels = images[:limit], labels[:limit]
    mean, std = _FASHION_STATS
    x = (torch.from_numpy(images.astype(np.float32) / 255.0)[:, None] - mean) / std
    return ConceptDataset(x, torch.from_numpy(labels), pairs=pairs, class_names=FASHION_MNIST_CLASSES,
                          source="fashion-mnist")


# ------------------------------------------------------------------------------------ synthetic
def _render(cls: np.ndarray, rng: np.random.Generator, size: int) -> np.ndarray:
    n = len(cls)
    grid = np.arange(size, dtype=np.float32) - (size - 1) / 2
    scale = rng.uniform(0.8, 1.15, n).astype(np.float32)[:, None, None] * (size / 28)
    shift = rng.uniform(-2.5, 2.5, (n, 2)).astype(np.float32) * (size / 28)
    u = (grid[None, None, :] - shift[:, 0, None, None]) / scale
    v = (grid[None, :, None] - shift[:, 1, None, None]) / scale
    r = np.sqrt(u**2 + v**2)
    box = (np.abs(u) < 9) & (np.abs(v) < 9)
    shapes = [
        box & (np.sin(2 * np.pi * v / 6) > 0),  # h-stripes
        box & (np.sin(2 * np.pi * u / 6) > 0),  # v-stripes
        r < 8,  # disk
        (r > 5.5) & (r < 9),  # ring
        ((np.abs(u) < 2) & (np.abs(v) < 9)) | ((np.abs(v) < 2) & (np.abs(u) < 9)),  # plus
        ((np.abs(u - v) < 2.5) | (np.abs(u + v) < 2.5)) & (r < 10.5),  # cross
        box & ((np.floor(u / 4.5) + np.floor(v / 4.5)) % 2 == 0),  # checker
        (np.maximum(np.abs(u), np.abs(v)) > 6) & (np.maximum(np.abs(u), np.abs(v)) < 9),  # square
        box & (((u % 6) - 3) ** 2 + ((v % 6) - 3) ** 2 < 3.5),  # dots
        (v > -8) & (v < 8) & (np.abs(u) < (v + 8) / 2),  # triangle
    ]
    img = np.zeros((n, size, size), dtype=np.float32)
    for c, mask in enumerate(shapes):
        sel = cls == c
        img[sel] = mask[sel]
    img *= rng.uniform(0.6, 1.0, (n, 1, 1)).astype(np.float32)
    img += rng.normal(0, 0.12, img.shape).astype(np.float32)
    return np.clip(img, 0, 1)


def planted_concepts(
    n: int = 2000,
    *,
    seed: int = 0,
    size: int = 28,
    classes: Sequence[int] | None = None,
    pairs: Sequence[Sequence[int]] | None = None,
) -> ConceptDataset:
    """A synthetic dataset of ten shape/texture concepts with random position, scale, contrast and
    noise; balanced over ``classes`` (default all ten) and grouped into superclasses by ``pairs``.

    With ``classes``, fine labels are renumbered ``0..len(classes)-1`` in the given order, and
    ``pairs`` (default: consecutive pairs) refers to the new numbers.

    Example:
        >>> ds = planted_concepts(8, classes=[0, 2, 1, 3], size=16)   # stripes+disk, v-stripes+ring
        >>> ds.images.shape, ds.coarse.tolist()
        (torch.Size([8, 1, 16, 16]), [0, 0, 1, 1, 0, 0, 1, 1])
    """
    n = check_int("n", n, 1)
    size = check_int("size", size, 8)
    chosen = list(range(10)) if classes is None else [int(c) for c in classes]
    if not chosen or len(set(chosen)) != len(chosen) or not all(0 <= c < 10 for c in chosen):
        raise ConfigError(f"classes must be distinct concept ids in 0..9, got {classes!r}.")
    if pairs is None:
        if classes is None:
            pairs = SUPERCLASS_PAIRS
        else:
            if len(chosen) % 2:
                raise ConfigError("an odd number of classes needs explicit pairs=.")
            pairs = [(i, i + 1) for i in range(0, len(chosen), 2)]
    rng = np.random.default_rng(seed)
    fine = np.arange(n) % len(chosen)
    img = _render(np.asarray(chosen)[fine], rng, size)
    mean, std = _PLANTED_STATS
    x = (torch.from_numpy(img)[:, None] - mean) / std
    return ConceptDataset(x, torch.from_numpy(fine), pairs=pairs, class_names=[PLANTED_CLASSES[c] for c in chosen],
                          source="planted")


def concept_data(
    split: str = "train", *, root: str | os.PathLike | None = None, limit: int | None = None, synthetic_n: int = 6000
) -> ConceptDataset:
    """Fashion-MNIST when its files are found, else :func:`planted_concepts` (``synthetic_n``
    images, a different seed per split); ``dataset.source`` says which."""
    try:
        return fashion_mnist(split, root=root, limit=limit)
    except DataError:
        if root is not None:
            raise
    n = synthetic_n if limit is None else min(limit, synthetic_n)
    return planted_concepts(n, seed=0 if split == "train" else 1)


# ---------------------------------------------------------------------------------------- models
def small_image_resnet(
    arch: str = "resnet18",
    *,
    num_classes: int = 5,
    in_channels: int = 1,
    blocks: Sequence[int] | None = None,
    stem_stride: int = 1,
) -> torchvision.models.ResNet:
    """A torchvision ResNet with a stem for small images: 3x3 convolution, no max-pool.

    Args:
        arch: a torchvision builder name (``"resnet18"``, ``"resnet34"``, ...), used when ``blocks`` is None.
        num_classes: outputs of the classifier.
        in_channels: image channels (1 for Fashion-MNIST).
        blocks: basic blocks per stage, e.g. ``[1, 1, 1, 1]`` for a fast small model.
        stem_stride: stride of the stem convolution (1 keeps 28x28 at ``layer1``, 2 halves it).

    Example:
        >>> m = small_image_resnet(blocks=[1, 1, 1, 1], stem_stride=2)
        >>> m(torch.rand(2, 1, 28, 28)).shape
        torch.Size([2, 5])
    """
    if blocks is not None:
        if len(blocks) != 4 or not all(isinstance(b, int) and b >= 1 for b in blocks):
            raise ConfigError(f"blocks must be four positive integers, got {blocks!r}.")
        model = torchvision.models.ResNet(torchvision.models.resnet.BasicBlock, list(blocks), num_classes=num_classes)
    else:
        builder = getattr(torchvision.models, arch, None)
        if builder is None or not arch.startswith(("resnet", "wide_resnet", "resnext")):
            raise ConfigError(f"unknown ResNet builder {arch!r}.")
        model = builder(num_classes=num_classes)
    if stem_stride not in (1, 2):
        raise ConfigError(f"stem_stride must be 1 or 2, got {stem_stride!r}.")
    model.conv1 = nn.Conv2d(in_channels, model.conv1.out_channels, 3, stem_stride, 1, bias=False)
    model.maxpool = nn.Identity()
    return model


def train_classifier(
    model: nn.Module,
    dataset: ConceptDataset,
    *,
    target: str = "coarse",
    epochs: int = 1,
    batch_size: int = 128,
    lr: float = 2e-3,
    weight_decay: float = 1e-4,
    seed: int = 0,
    progress: bool = True,
) -> nn.Module:
    """Train ``model`` on ``dataset`` (AdamW, one-cycle schedule, fixed seed) and return it in eval mode.

    Args:
        model: the network to train (changed in place).
        dataset: the training images and labels.
        target: ``"coarse"`` (superclasses) or ``"fine"``.
        epochs: passes over the data.
        batch_size: images per step.
        lr: peak learning rate of the one-cycle schedule.
        weight_decay: AdamW weight decay.
        seed: seeds the shuffling and any randomness in the model.
        progress: show a progress bar.

    Example:
        >>> ds = planted_concepts(64, size=16)
        >>> m = train_classifier(small_image_resnet(blocks=[1, 1, 1, 1], stem_stride=2), ds, progress=False)
        >>> m.training
        False
    """
    if target not in ("coarse", "fine"):
        raise ConfigError(f"target must be 'coarse' or 'fine', got {target!r}.")
    epochs = check_int("epochs", epochs, 1)
    y_all = dataset.coarse if target == "coarse" else dataset.fine
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    steps = epochs * ((len(dataset) + batch_size - 1) // batch_size)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    if steps >= 10:
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.2)
    else:  # too few steps for a warm-up phase (OneCycleLR divides by its length)
        sched = torch.optim.lr_scheduler.ConstantLR(opt, factor=1.0, total_iters=0)
    model.train()
    bar = tqdm(total=steps, desc="train", unit="step", disable=not progress, leave=False)
    for _ in range(epochs):
        order = torch.randperm(len(dataset), generator=gen)
        for s in range(0, len(order), batch_size):
            idx = order[s : s + batch_size]
            loss = nn.functional.cross_entropy(model(dataset.images[idx]), y_all[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.3f}")
    bar.close()
    return model.eval()


def cache_dir() -> Path:
    """Where trained weights are cached: ``$PURENN_CACHE`` or ``~/.cache/purenn``."""
    return Path(os.environ.get("PURENN_CACHE") or Path.home() / ".cache" / "purenn")


def _fingerprint(dataset: ConceptDataset) -> str:
    h = hashlib.sha1()
    h.update(dataset.images.numpy().tobytes())
    h.update(dataset.fine.numpy().tobytes())
    h.update(repr(dataset.pairs).encode())
    return h.hexdigest()[:16]


def cached_classifier(
    name: str,
    build: Callable[[], nn.Module],
    dataset: ConceptDataset,
    *,
    config: dict | None = None,
    directory: str | os.PathLike | None = None,
    progress: bool = True,
    **train_kwargs,
) -> tuple[nn.Module, Path, bool]:
    """Train ``build()`` on ``dataset`` with :func:`train_classifier`, or load it from the cache.

    The cache key covers ``name``, ``config``, the training options and a fingerprint of the data.
    The weights file records the model's architecture (``"purenn_architecture"``, see
    :func:`purenn.cli.loaders.save_checkpoint`), so ``purenn purify ARCH --checkpoint FILE`` rebuilds it exactly.

    Returns:
        ``(model in eval mode, weights path, whether it came from the cache)``.
    """
    from safetensors import safe_open
    from safetensors.torch import load_file
    from safetensors.torch import save as safetensors_save

    from purenn.common.choices import ARCH_KEY
    from purenn.io.architecture import describe_architecture
    from purenn.io.files import write_chunks

    key = json.dumps({"name": name, "config": config or {}, "train": train_kwargs, "data": _fingerprint(dataset)},
                     sort_keys=True, default=str)
    digest = hashlib.sha1(key.encode()).hexdigest()[:12]
    path = Path(directory) if directory is not None else cache_dir()
    file = path / f"{name}-{digest}.safetensors"
    torch.manual_seed(int(train_kwargs.get("seed", 0)))
    model = build()

    def write() -> None:
        arch = json.dumps(describe_architecture(model), separators=(",", ":"))
        state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
        write_chunks(file, [safetensors_save(state, metadata={"format": "pt", "key": key, ARCH_KEY: arch})])

    if file.is_file():
        state = load_file(str(file))
        model.load_state_dict(state, strict=True)
        model.eval()
        with safe_open(str(file), framework="pt") as f:
            recorded = ARCH_KEY in (f.metadata() or {})
        if not recorded:  # cached before checkpoints recorded their architecture
            write()
        return model, file, True
    model = train_classifier(model, dataset, progress=progress, **train_kwargs)
    path.mkdir(parents=True, exist_ok=True)
    write()
    return model, file, False
