"""The base model divided into sub-networks, and the boundary features cached on disk (memory-mapped when read)."""
from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from pruning.divide import SubNetwork, divide
from tasks import paths
from tasks.checkpoints import load_model
from tasks.config import Params
from tasks.io import atomic_path


@dataclass
class Division:
    model: nn.Module
    meta: dict
    subnetworks: list[SubNetwork]
    head: nn.Module

    @property
    def k(self) -> int:
        return len(self.subnetworks)

    def example(self, k: int) -> torch.Tensor:
        """A one-sample input of sub-network k (1-based): X_{k-1}'s shape."""
        return torch.zeros(1, *self.subnetworks[k - 1].in_shape)


def load_division(params: Params) -> Division:
    """Divide a fresh copy of models/base.pt into `divide.k` sub-networks (deterministic: same cut every time)."""
    model, meta = load_model(paths.BASE)
    s = meta["image_size"]
    subs, head = divide(model, torch.zeros(1, 3, s, s), params.divide.k)
    return Division(model, meta, subs, head)


def feature_path(split: str, k: int) -> Path:
    return paths.FEATURES / f"{split}_x{k}.npy"


def label_path(split: str) -> Path:
    return paths.FEATURES / f"{split}_y.npy"


def save_array(array: torch.Tensor | np.ndarray, path: Path) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.save(f, np.ascontiguousarray(np.asarray(array)))


# CPython 3.11's ast.literal_eval, which parses every .npy header, is not thread-safe ("AST constructor
# recursion depth mismatch", fixed in later CPythons); the search loads features from parallel threads.
_NPY_LOCK = threading.Lock()


def load_array(path: Path, mmap: bool = True) -> np.ndarray:
    if not Path(path).is_file():
        raise FileNotFoundError(f"cached features missing ({path}): run the selectors stage first")
    with _NPY_LOCK:
        return np.load(path, mmap_mode="r" if mmap else None)


def load_feature(split: str, k: int) -> np.ndarray:
    """X_k of `split`, memory-mapped (read-only, paged in on use)."""
    return load_array(feature_path(split, k))


def load_labels(split: str) -> np.ndarray:
    return load_array(label_path(split), mmap=False)


def load_features(split: str, k_max: int) -> tuple[list[np.ndarray], np.ndarray]:
    """[X_0, ..., X_k_max] of `split` memory-mapped, and the labels."""
    return [load_feature(split, k) for k in range(k_max + 1)], load_labels(split)
