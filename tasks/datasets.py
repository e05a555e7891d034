"""Data sources (digits, CIFAR-10/100, any ImageFolder), the fixed-seed splits, and the loaders every stage uses."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, Subset

from tasks.config import DataParams
from tasks.io import atomic_json, atomic_torch_save, read_json
from tasks.sources import listing

if TYPE_CHECKING:  # torchvision takes seconds to import; stages reading decoded tensors never need it
    from torchvision.transforms import v2

META_SCHEMA = 1
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
# Above this many bytes of decoded uint8 pixels an ImageFolder is read from disk each epoch instead.
MATERIALIZE_LIMIT_BYTES = 4 * 1024**3


class DataError(ValueError):
    """A data source that cannot be read; the message names the path or value and what was expected."""


def _stratified(labels: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    idx = np.arange(len(labels))
    from sklearn.model_selection import train_test_split  # a second of import, for the prepare stage only

    keep, carve = train_test_split(idx, test_size=fraction, stratify=labels, random_state=seed)
    return np.sort(keep), np.sort(carve)


def _digits(p: DataParams, seed: int) -> dict[str, Any]:
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.from_numpy(d.images).float().unsqueeze(1) / 16.0  # 8x8 in [0, 1]
    x = F.interpolate(x, size=(p.image_size, p.image_size), mode="bilinear", align_corners=False)
    x = (x.clamp(0, 1) * 255).round().to(torch.uint8).repeat(1, 3, 1, 1)
    y = torch.from_numpy(d.target).long()
    # digits ships one pool of 1,797 images: carve a stratified test split first, then val from the rest.
    train_idx, test_idx = _stratified(y.numpy(), p.test_fraction, seed)
    return {
        "classes": [str(c) for c in d.target_names],
        "train": (x[train_idx], y[train_idx]),
        "test": (x[test_idx], y[test_idx]),
    }


def _cifar(p: DataParams) -> dict[str, Any]:
    from torchvision import datasets

    cls = datasets.CIFAR10 if p.source == "cifar10" else datasets.CIFAR100
    if p.root is None:
        raise DataError(f"data.root is required for data.source={p.source!r}: a folder holding (or to hold) the torchvision copy")
    try:
        train, test = cls(p.root, train=True, download=p.download), cls(p.root, train=False, download=p.download)
    except RuntimeError as err:
        raise DataError(
            f"data.root={p.root!r} holds no readable {p.source} ({err}); put torchvision's copy there, "
            f"set data.download: true where the internet is reachable, or use data.source: imagefolder"
        ) from None

    def arrays(ds) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.from_numpy(np.asarray(ds.data)).permute(0, 3, 1, 2).contiguous()
        if x.shape[-1] != p.image_size:
            x = (
                F.interpolate(x.float(), size=(p.image_size, p.image_size), mode="bilinear", antialias=True)
                .round()
                .clamp(0, 255)
                .to(torch.uint8)
            )
        return x, torch.as_tensor(ds.targets, dtype=torch.long)

    return {"classes": list(train.classes), "train": arrays(train), "test": arrays(test)}


def _imagefolder_dirs(p: DataParams) -> tuple[Path, Path]:
    if p.root is None:
        raise DataError("data.root is required for data.source='imagefolder': a folder with train/ and val/ or test/ class folders")
    root = Path(p.root)
    train = root / "train"
    test = next((root / n for n in ("test", "val") if (root / n).is_dir()), None)
    if not train.is_dir() or test is None:
        raise DataError(
            f"data.root={p.root!r} must hold train/ and val/ or test/ class folders (found: {sorted(x.name for x in root.iterdir()) if root.is_dir() else 'no such folder'})"
        )
    return train, test


def _read_folder(folder: Path, size: int, workers: int) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    from torchvision.datasets import ImageFolder
    from torchvision.transforms import v2

    tf = v2.Compose([v2.PILToTensor(), v2.Resize(size, antialias=True), v2.CenterCrop(size)])
    ds = ImageFolder(str(folder), transform=tf)
    loader = DataLoader(ds, batch_size=512, num_workers=workers)
    xs, ys = zip(*loader)
    return torch.cat(xs), torch.cat(ys), list(ds.classes)


def _fingerprint(*tensors: torch.Tensor) -> str:
    h = hashlib.sha256()
    for t in tensors:
        h.update(t.contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def _augment_kind(p: DataParams) -> str:
    if p.augment != "auto":
        return p.augment
    return {"digits": "crop"}.get(p.source, "crop-flip" if p.image_size <= 64 else "imagenet")


def prepare(p: DataParams, seed: int, out_dir: Path) -> dict[str, Any]:
    """Read the source, make the fixed-seed stratified val split (and a train subset if asked), write
    `out_dir/{train,val,test}.pt` (uint8 images) or, for a large ImageFolder, `splits.json` of indices, and `meta.json`."""
    materialize = p.materialize
    if p.source == "digits":
        raw = _digits(p, seed)
    elif p.source in ("cifar10", "cifar100"):
        raw = _cifar(p)
    else:
        train_dir, test_dir = _imagefolder_dirs(p)
        if materialize == "auto":
            n = sum(1 for f in train_dir.rglob("*") if f.is_file()) + sum(1 for f in test_dir.rglob("*") if f.is_file())
            materialize = "yes" if n * 3 * p.image_size**2 <= MATERIALIZE_LIMIT_BYTES else "no"
        if materialize == "no":
            return _prepare_streaming(p, seed, out_dir, train_dir, test_dir)
        xtr, ytr, classes = _read_folder(train_dir, p.image_size, p.num_workers)
        xte, yte, test_classes = _read_folder(test_dir, p.image_size, p.num_workers)
        if test_classes != classes:
            raise DataError(f"{test_dir} has classes {test_classes}, but {train_dir} has {classes}")
        raw = {"classes": classes, "train": (xtr, ytr), "test": (xte, yte)}
    x, y = raw["train"]
    train_idx, val_idx = _stratified(y.numpy(), p.val_fraction, seed)
    if p.limit_train is not None and p.limit_train < len(train_idx):
        from sklearn.model_selection import train_test_split

        keep, _ = train_test_split(train_idx, train_size=p.limit_train, stratify=y[train_idx].numpy(), random_state=seed)
        train_idx = np.sort(keep)
    splits = {"train": (x[train_idx], y[train_idx]), "val": (x[val_idx], y[val_idx]), "test": raw["test"]}
    xt = splits["train"][0].float() / 255
    mean = xt.mean(dim=(0, 2, 3)).tolist()
    std = xt.std(dim=(0, 2, 3)).clamp_min(1e-3).tolist()
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, (xs, ys) in splits.items():
        atomic_torch_save({"images": xs.contiguous(), "labels": ys.contiguous()}, out_dir / f"{name}.pt")
    meta = {
        "schema_version": META_SCHEMA,
        "source": p.source,
        "root": p.root,
        "materialized": True,
        "classes": raw["classes"],
        "num_classes": len(raw["classes"]),
        "image_size": p.image_size,
        "mean": mean,
        "std": std,
        "augment": _augment_kind(p),
        "counts": {k: len(v[1]) for k, v in splits.items()},
        "fingerprint": _fingerprint(*(t for pair in splits.values() for t in pair)),
    }
    atomic_json(meta, out_dir / "meta.json")
    return meta


def _prepare_streaming(p: DataParams, seed: int, out_dir: Path, train_dir: Path, test_dir: Path) -> dict[str, Any]:
    from torchvision.datasets import ImageFolder

    train, test = ImageFolder(str(train_dir)), ImageFolder(str(test_dir))
    y = np.asarray(train.targets)
    train_idx, val_idx = _stratified(y, p.val_fraction, seed)
    if p.limit_train is not None and p.limit_train < len(train_idx):
        from sklearn.model_selection import train_test_split

        keep, _ = train_test_split(train_idx, train_size=p.limit_train, stratify=y[train_idx], random_state=seed)
        train_idx = np.sort(keep)
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_json({"train": train_idx.tolist(), "val": val_idx.tolist()}, out_dir / "splits.json")
    files = hashlib.sha256("\n".join(f"{s}:{os.path.getsize(s)}" for s, _ in train.samples + test.samples).encode())
    meta = {
        "schema_version": META_SCHEMA,
        "source": p.source,
        "root": p.root,
        "materialized": False,
        "classes": list(train.classes),
        "num_classes": len(train.classes),
        "image_size": p.image_size,
        "mean": list(IMAGENET_MEAN),
        "std": list(IMAGENET_STD),
        "augment": _augment_kind(p),
        "counts": {"train": len(train_idx), "val": len(val_idx), "test": len(test)},
        "fingerprint": files.hexdigest()[:16],
        # read from disk every epoch, so an image edited in place (same name and size) must change this file too
        "files": listing([train_dir, test_dir])["digest"],
        "dirs": {"train": str(train_dir), "test": str(test_dir)},
    }
    atomic_json(meta, out_dir / "meta.json")
    return meta


class TensorImages(Dataset):
    """uint8 images held in memory, converted (and augmented) per sample."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, transform: v2.Transform) -> None:
        self.images, self.labels, self.transform = images, labels, transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        return self.transform(self.images[i]), self.labels[i]


def _transform(meta: dict[str, Any], train: bool, from_pil: bool) -> v2.Transform:
    from torchvision.transforms import v2

    size = meta["image_size"]
    head: list[v2.Transform] = [v2.PILToTensor()] if from_pil else []
    kind = meta["augment"] if train else "none"
    if from_pil and kind != "imagenet":
        head.append(v2.Resize(size, antialias=True))
        head.append(v2.CenterCrop(size))
    aug: list[v2.Transform] = []
    if kind in ("crop", "crop-flip"):
        aug.append(v2.RandomCrop(size, padding=size // 8))
    if kind == "crop-flip":
        aug.append(v2.RandomHorizontalFlip())
    if kind == "imagenet":
        aug = [v2.RandomResizedCrop(size, antialias=True), v2.RandomHorizontalFlip()]
    elif from_pil and not train and meta["augment"] == "imagenet":
        head += [v2.Resize(int(size * 256 / 224), antialias=True), v2.CenterCrop(size)]
    tail = [v2.ToDtype(torch.float32, scale=True), v2.Normalize(meta["mean"], meta["std"])]
    return v2.Compose(head + aug + tail)


def read_meta(prepared: Path) -> dict[str, Any]:
    meta_path = Path(prepared) / "meta.json"
    if not meta_path.is_file():
        raise DataError(f"{meta_path} is missing: run the prepare stage first (emoprune stage prepare)")
    meta = read_json(meta_path)
    if meta.get("schema_version") != META_SCHEMA:
        raise DataError(f"{meta_path} has schema_version {meta.get('schema_version')!r}; this version reads {META_SCHEMA}: rerun prepare")
    return meta


def load_split(prepared: Path, split: str, train: bool = False) -> Dataset:
    """The `split` ('train', 'val' or 'test') as a Dataset of normalised float tensors; `train` turns augmentation on."""
    prepared = Path(prepared)
    meta = read_meta(prepared)
    if meta["materialized"]:
        blob = torch.load(prepared / f"{split}.pt", weights_only=True)
        return TensorImages(blob["images"], blob["labels"], _transform(meta, train, from_pil=False))
    from torchvision.datasets import ImageFolder

    tf = _transform(meta, train, from_pil=True)
    if split == "test":
        return ImageFolder(meta["dirs"]["test"], transform=tf)
    idx = read_json(prepared / "splits.json")[split]
    return Subset(ImageFolder(meta["dirs"]["train"], transform=tf), idx)


class TensorBatches:
    """Batches of uint8 images held in memory, augmented and normalised a whole batch at a time.

    The per-image transform pipeline cost about as much CPU as a ResNet-20 training step; here a batch's
    random crops (zero padding of size/8, as `v2.RandomCrop`) and flips are one gather. Shuffling and
    augmentation draw from `generator`, which training checkpoints save and restore.
    """

    def __init__(
        self, images: torch.Tensor, labels: torch.Tensor, meta: dict[str, Any], batch_size: int, train: bool = False, seed: int = 0
    ) -> None:
        kind = meta["augment"] if train else "none"
        if kind not in ("none", "crop", "crop-flip"):
            raise ValueError(f"TensorBatches augments with none, crop or crop-flip, not {kind!r}")
        self.images, self.labels, self.batch_size, self.train, self.kind = images, labels, batch_size, train, kind
        self.mean = torch.tensor(meta["mean"]).view(1, -1, 1, 1) * 255
        self.std = torch.tensor(meta["std"]).view(1, -1, 1, 1) * 255
        self.generator = torch.Generator()
        self.generator.manual_seed(seed)
        self.dataset = self  # what DataLoader-style callers look up for the sample count

    def __len__(self) -> int:
        return -(-len(self.labels) // self.batch_size)

    def _augment(self, x: torch.Tensor) -> torch.Tensor:
        n, _, h, w = x.shape
        if self.kind in ("crop", "crop-flip"):
            pad = h // 8
            padded = F.pad(x, (pad, pad, pad, pad))
            dy = torch.randint(0, 2 * pad + 1, (n, 1, 1, 1), generator=self.generator)
            dx = torch.randint(0, 2 * pad + 1, (n, 1, 1, 1), generator=self.generator)
            rows = (dy + torch.arange(h).view(1, 1, h, 1)).expand(n, x.shape[1], h, w + 2 * pad)
            x = padded.gather(2, rows)
            cols = (dx + torch.arange(w).view(1, 1, 1, w)).expand(n, x.shape[1], h, w)
            x = x.gather(3, cols)
        if self.kind == "crop-flip":
            flip = torch.rand(n, generator=self.generator) < 0.5
            x = torch.where(flip.view(n, 1, 1, 1), x.flip(3), x)
        return x

    def __iter__(self):
        n = len(self.labels)
        order = torch.randperm(n, generator=self.generator) if self.train else torch.arange(n)
        for i in range(0, n, self.batch_size):
            idx = order[i : i + self.batch_size]
            x = self.images[idx]
            if self.train:
                x = self._augment(x)
            yield (x.float() - self.mean) / self.std, self.labels[idx]


def split_batches(prepared: Path, split: str, batch_size: int, train: bool = False, seed: int = 0):
    """The fastest loader for `split`: `TensorBatches` for decoded images with crop/flip augmentation, else a
    DataLoader over `load_split` (images read from disk, or the ImageNet-style random-resized crops)."""
    prepared = Path(prepared)
    meta = read_meta(prepared)
    if meta["materialized"] and (meta["augment"] in ("none", "crop", "crop-flip") or not train):
        blob = torch.load(prepared / f"{split}.pt", weights_only=True)
        return TensorBatches(blob["images"], blob["labels"], meta, batch_size, train=train, seed=seed)
    return make_loader(load_split(prepared, split, train=train), batch_size, shuffle=train, seed=seed)


def make_loader(ds: Dataset, batch_size: int, shuffle: bool, num_workers: int = 0, seed: int = 0) -> DataLoader:
    g = torch.Generator()
    g.manual_seed(seed)
    return DataLoader(
        ds,
        batch_size=batch_size,
        shuffle=shuffle,
        num_workers=num_workers,
        generator=g,
        drop_last=False,
        pin_memory=torch.cuda.is_available(),
        persistent_workers=num_workers > 0,
    )


def example_input(meta: dict[str, Any]) -> torch.Tensor:
    s = meta["image_size"]
    return torch.zeros(1, 3, s, s)
