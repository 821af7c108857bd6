"""Data: scikit-learn's bundled digits (the default; no download), CIFAR-10/100 from a local folder in the standard
python-pickle format, kdfast's generated shapes segmentation set (per-pixel targets; no download), an in-memory
loader with seeded shuffling and DDP sharding, and CIFAR's random-crop + flip augmentation written in torch (kdfast
does not need torchvision)."""
from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from .safe_pickle import PickleFileError, load_data_pickle

SHAPE_CLASSES = ("background", "circle", "square", "triangle")


def make_shapes(n: int, size: int = 32, *, seed: int = 0, max_shapes: int = 3):
    """(images (n, 3, size, size) float32 in [0, 1], labels (n, size, size) int64). Colours are drawn
    independently of the class, so a network must recognise the shape, not its colour; later shapes occlude
    earlier ones."""
    g = torch.Generator().manual_seed(seed)
    ys, xs = torch.meshgrid(torch.arange(size, dtype=torch.float32), torch.arange(size, dtype=torch.float32),
                            indexing="ij")
    images = 0.1 * torch.rand(n, 3, size, size, generator=g) + 0.2 * torch.rand(n, 3, 1, 1, generator=g)
    labels = torch.zeros(n, size, size, dtype=torch.int64)
    for i in range(n):
        for _ in range(int(torch.randint(1, max_shapes + 1, (), generator=g))):
            cls = int(torch.randint(1, 4, (), generator=g))
            r = size * (0.1 + 0.15 * float(torch.rand((), generator=g)))
            cy, cx = (r + (size - 2 * r) * torch.rand(2, generator=g)).tolist()
            dy, dx = ys - cy, xs - cx
            if cls == 1:
                mask = dy.square() + dx.square() <= r * r
            elif cls == 2:
                mask = (dy.abs() <= r * 0.8) & (dx.abs() <= r * 0.8)
            else:  # upward triangle with apex at (cy - r, cx) and base on y = cy + r / 2
                mask = (dy <= r / 2) & (dx.abs() <= (dy + r) / 1.5 * 0.866)
            colour = 0.4 + 0.6 * torch.rand(3, 1, generator=g)
            images[i][:, mask] = colour.expand(3, int(mask.sum()))
            labels[i][mask] = cls
    return images.clamp(0, 1), labels


class ShapesDataset(torch.utils.data.TensorDataset):
    """make_shapes as a Dataset of (image, label map) pairs."""

    num_classes = len(SHAPE_CLASSES)

    def __init__(self, n: int, size: int = 32, *, seed: int = 0, max_shapes: int = 3):
        super().__init__(*make_shapes(n, size, seed=seed, max_shapes=max_shapes))


DATASETS = ("digits", "cifar10", "cifar100", "shapes")
DENSE_DATASETS = ("shapes",)  # per-pixel targets (B, H, W): segmentation
LOCAL_DATASETS = ("digits", *DENSE_DATASETS)  # kdfast's small sets, shipped or generated: no --data-root
AUGMENTATIONS = ("none", "shift", "crop_flip")
UNLABELLED = -100  # the target of a transfer-set example without a label (cross-entropy's ignore_index)


@dataclass
class Split:
    """Images (N, C, H, W) and int64 targets (UNLABELLED where there is no label). Float images are used as they
    are; uint8 images (CIFAR: a quarter of the memory) are scaled to [0, 1] batch by batch, augmented, then
    normalised with the per-channel mean and std."""
    images: torch.Tensor
    targets: torch.Tensor
    mean: tuple | None = None
    std: tuple | None = None

    def __len__(self):
        return len(self.targets)

    def subset(self, index) -> "Split":
        index = torch.as_tensor(index, dtype=torch.long)
        return Split(self.images[index], self.targets[index], self.mean, self.std)

    def relabel(self, targets: torch.Tensor) -> "Split":
        return Split(self.images, targets, self.mean, self.std)

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        if self.mean is None:
            return x
        return (x - torch.tensor(self.mean).view(1, -1, 1, 1)) / torch.tensor(self.std).view(1, -1, 1, 1)


@dataclass
class Dataset:
    name: str
    train: Split
    test: Split
    num_classes: int
    augment: str  # "crop_flip" (CIFAR), "shift" (digits) or "none"

    @property
    def in_channels(self) -> int:
        return self.train.images.shape[1]

    @property
    def dense(self) -> bool:
        return self.train.targets.dim() > 1


def load_digits() -> Dataset:
    """The 1,797 8x8 digits of scikit-learn (shipped with it), scaled to [0, 1], split 1,297 train / 500 test by a
    fixed stratified shuffle (the same on every machine)."""
    from sklearn.datasets import load_digits as sk_digits
    bunch = sk_digits()
    images = torch.tensor(bunch.images, dtype=torch.float32).unsqueeze(1) / 16.0
    targets = torch.tensor(bunch.target, dtype=torch.long)
    test = stratified_indices(targets, 50, seed=0)
    train = torch.tensor(sorted(set(range(len(targets))) - set(test.tolist())), dtype=torch.long)
    return Dataset("digits", Split(images[train], targets[train]), Split(images[test], targets[test]), 10, "shift")


def stratified_indices(targets: torch.Tensor, per_class: int, seed: int) -> torch.Tensor:
    """Sorted indices of `per_class` examples of each class, chosen by a seeded permutation."""
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(targets), generator=g)
    picked = [order[targets[order] == c][:per_class] for c in range(int(targets.max()) + 1)]
    return torch.sort(torch.cat(picked)).values


def stratified_split(split: Split, per_class: int, seed: int):
    """(picked, rest): `per_class` labelled examples of each class, and everything else."""
    picked = stratified_indices(split.targets, per_class, seed)
    mask = torch.ones(len(split), dtype=torch.bool)
    mask[picked] = False
    return split.subset(picked), split.subset(mask.nonzero().flatten())


def few_labels(split: Split, per_class: int, seed: int) -> Split:
    """The same images with the labels of only `per_class` examples per class kept, the others UNLABELLED: a
    transfer set for distillation with few labels."""
    keep = torch.zeros(len(split), dtype=torch.bool)
    keep[stratified_indices(split.targets, per_class, seed)] = True
    return _keep_labels(split, keep)


def _keep_labels(split: Split, keep: torch.Tensor) -> Split:
    """The split with every target of the examples where `keep` (N,) is False made UNLABELLED."""
    keep = keep.view(-1, *([1] * (split.targets.dim() - 1)))
    return split.relabel(torch.where(keep, split.targets, torch.full_like(split.targets, UNLABELLED)))


def load_shapes(train: int = 512, test: int = 128, size: int = 24, seed: int = 0) -> Dataset:
    """make_shapes as a segmentation data set: `train` + `test` images of size x size pixels drawn
    from one seed, the first `train` for training (the same split on every machine for a given seed)."""
    x, y = make_shapes(train + test, size, seed=seed)
    return Dataset("shapes", Split(x[:train], y[:train]), Split(x[train:], y[train:]), len(SHAPE_CLASSES), "none")


def labelled_fraction(split: Split, fraction: float) -> Split:
    """The same images with the labels of only the first round(fraction * N) kept, every pixel of the others
    UNLABELLED: a segmentation transfer set (shapes images are independent draws, so the first are a random
    sample)."""
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    return _keep_labels(split, torch.arange(len(split)) < int(round(fraction * len(split))))


_CIFAR_LAYOUT = {
    "cifar10": ("cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)], ["test_batch"], b"labels", 10),
    "cifar100": ("cifar-100-python", ["train"], ["test"], b"fine_labels", 100),
}
_CIFAR_MEAN = {"cifar10": (0.4914, 0.4822, 0.4465), "cifar100": (0.5071, 0.4865, 0.4409)}
_CIFAR_STD = {"cifar10": (0.2470, 0.2435, 0.2616), "cifar100": (0.2673, 0.2564, 0.2762)}


def load_cifar(name: str, root) -> Dataset:
    """CIFAR-10/100 from `root`, either the folder the official archive unpacks to (cifar-10-batches-py,
    cifar-100-python) or a folder that contains it. Kept as uint8; batches are normalised per channel with the
    usual mean and std after augmentation (as torchvision's RandomCrop, Flip, ToTensor, Normalize would)."""
    if name not in _CIFAR_LAYOUT:
        raise ValueError(f"unknown CIFAR data set {name!r}; expected one of {', '.join(_CIFAR_LAYOUT)}")
    folder, train_files, test_files, label_key, classes = _CIFAR_LAYOUT[name]
    root = os.fspath(root)
    candidates = [os.path.join(root, folder), root]
    base = next((c for c in candidates if all(os.path.isfile(os.path.join(c, f)) for f in train_files + test_files)),
                None)
    if base is None:
        raise FileNotFoundError(
            f"{name} not found: looked in {candidates[0]} and {candidates[1]} for the python-pickle files "
            f"{', '.join(train_files + test_files)} (the 'CIFAR python version' archive from "
            f"https://www.cs.toronto.edu/~kriz/cifar.html, unpacked; each file a pickled dict with b'data' "
            f"(N x 3072 uint8) and {label_key!r})")
    def read(files):
        data, labels = [], []
        for f in files:
            x, y = _cifar_batch(os.path.join(base, f), label_key, classes)
            data.append(x)
            labels.append(y)
        return Split(torch.cat(data), torch.cat(labels), _CIFAR_MEAN[name], _CIFAR_STD[name])

    return Dataset(name, read(train_files), read(test_files), classes, "crop_flip")


def _cifar_batch(path: str, label_key: bytes, classes: int):
    """(images (N, 3, 32, 32) uint8, labels (N,) int64) of one CIFAR batch file, read without running code;
    PickleFileError naming the file when it is not a batch of this layout."""
    batch = load_data_pickle(path)
    if not isinstance(batch, dict) or b"data" not in batch or label_key not in batch:
        keys = ", ".join(map(repr, list(batch)[:6])) if isinstance(batch, dict) else type(batch).__name__
        raise PickleFileError(f"{path}: not a CIFAR batch of this layout (expected a dict with b'data' and "
                              f"{label_key!r}; found {keys})")
    data, labels = batch[b"data"], batch[label_key]
    if not (isinstance(data, np.ndarray) and data.dtype == np.uint8 and data.ndim == 2 and data.shape[1] == 3072):
        what = f"{data.dtype} array of shape {data.shape}" if isinstance(data, np.ndarray) else type(data).__name__
        raise PickleFileError(f"{path}: b'data' must be an N x 3072 uint8 array, found a {what}")
    if not (isinstance(labels, (list, tuple, np.ndarray)) and len(labels) == len(data)
            and all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) and 0 <= v < classes
                    for v in labels)):
        raise PickleFileError(f"{path}: {label_key!r} must hold {len(data)} class indices in [0, {classes})")
    return torch.from_numpy(data.copy()).view(-1, 3, 32, 32), torch.tensor([int(v) for v in labels])


def load_dataset(name: str, root=None, **sizes) -> Dataset:
    """A data set by name; `sizes` are load_shapes' train, test and size (shapes only)."""
    if sizes and name != "shapes":
        raise ValueError(f"{name} has no size options (given: {', '.join(sizes)}); only shapes has")
    if name == "shapes":
        return load_shapes(**sizes)
    if name == "digits":
        return load_digits()
    if name in _CIFAR_LAYOUT:
        if root is None:
            raise ValueError(f"{name} needs a data folder (--data-root DIR): kdfast does not download data")
        return load_cifar(name, root)
    raise ValueError(f"unknown data set {name!r}; available: {', '.join(DATASETS)}")


def random_crop_flip(x: torch.Tensor, generator: torch.Generator, padding: int = 4, flip: bool = True):
    """Per image: a random crop of the zero-padded image back to its size, then a horizontal flip with
    probability 1/2 (the standard CIFAR augmentation), all from `generator`."""
    b, c, h, w = x.shape
    padded = F.pad(x, (padding,) * 4)
    dy = torch.randint(0, 2 * padding + 1, (b,), generator=generator)
    dx = torch.randint(0, 2 * padding + 1, (b,), generator=generator)
    rows = (dy[:, None] + torch.arange(h))[:, None, :, None]
    cols = (dx[:, None] + torch.arange(w))[:, None, None, :]
    out = padded[torch.arange(b)[:, None, None, None], torch.arange(c)[None, :, None, None], rows, cols]
    if flip:
        mirror = torch.rand(b, generator=generator) < 0.5
        out = torch.where(mirror[:, None, None, None], out.flip(-1), out)
    return out


def augment(x: torch.Tensor, kind: str, generator: torch.Generator) -> torch.Tensor:
    if kind == "crop_flip":
        return random_crop_flip(x, generator, 4, True)
    if kind == "shift":  # digits: shift by up to one pixel; a flip would change what a digit is
        return random_crop_flip(x, generator, 1, False)
    return x


class Loader:
    """Batches of an in-memory Split. Epoch e's order and augmentation come from a generator seeded with
    (seed, e), so a resumed run sees the same batches as an uninterrupted one. With world_size > 1 each global
    batch of batch_size examples is cut into world_size equal contiguous shards and this rank gets its own
    (a last partial batch is dropped then, so every shard has the same size and DDP's average of the shards'
    mean gradients is the mean gradient of the global batch, as in one process)."""

    def __init__(self, split: Split, batch_size: int, *, shuffle: bool = False, augment: str = "none",
                 seed: int = 0, drop_last: bool = False, rank: int = 0, world_size: int = 1):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if augment not in AUGMENTATIONS:
            raise ValueError(f"augment must be one of {', '.join(AUGMENTATIONS)}, got {augment!r}")
        if batch_size % world_size:
            raise ValueError(f"batch_size={batch_size} must be a multiple of the world size {world_size}")
        self.split, self.batch_size, self.shuffle, self.kind = split, batch_size, shuffle, augment
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.drop_last = drop_last or world_size > 1
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self):
        n = len(self.split)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        n = len(self.split)
        order = torch.randperm(n, generator=g) if self.shuffle else torch.arange(n)
        for i in range(len(self)):
            index = order[i * self.batch_size:(i + 1) * self.batch_size]
            x = self.split.images[index]
            x = x.float() / 255.0 if x.dtype == torch.uint8 else x
            x = self.split.normalize(augment(x, self.kind, g))
            y = self.split.targets[index]
            if self.world_size > 1:
                x, y = x.chunk(self.world_size)[self.rank], y.chunk(self.world_size)[self.rank]
            yield x, y
