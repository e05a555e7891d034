"""The base model divided into sub-networks, the boundary features cached on disk (held in memory when the
whole cache fits `resources.memory_budget_mb`, memory-mapped otherwise), and the memory estimates behind that."""

from __future__ import annotations

import copy
import math
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from pruning.divide import SubNetwork, divide
from pruning.methods import method_spec
from tasks import paths
from tasks.checkpoints import load_model
from tasks.config import Params
from tasks.io import atomic_path, read_json

FEATURE_INDEX = paths.FEATURES / "index.json"  # written by the selectors stage: sizes and the in-memory decision
SCORER_BATCH = 256  # pruning.search.Scorer's batch size: the search's largest tensors are batches of this many samples
MB = 1024**2


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


# The last division made in this process, by (base file, its size and time, divide.k). A model that no family
# rule knows is divided from its torch.fx trace, and tracing patches torch.nn.Module.__call__ for every thread:
# a model run in another thread meanwhile (the search's sub-network tasks) would be traced instead of run.
# So the base model is divided once, under this lock, and each caller gets a deep copy.
_DIVIDED: dict[tuple, Division] = {}
_DIVIDING = threading.Lock()


def load_division(params: Params) -> Division:
    """A private copy of models/base.pt divided into `divide.k` sub-networks (deterministic: same cut every
    time): tasks may run in parallel threads."""
    path = paths.BASE.resolve()
    if not path.is_file():
        load_model(paths.BASE)  # raises the CheckpointError that says so
    stat = path.stat()
    key = (str(path), stat.st_size, stat.st_mtime_ns, params.divide.k)
    with _DIVIDING:
        if key not in _DIVIDED:
            model, meta = load_model(paths.BASE)
            s = meta["image_size"]
            subs, head = divide(model, torch.zeros(1, 3, s, s), params.divide.k)
            _DIVIDED.clear()
            _DIVIDED[key] = Division(model, meta, subs, head)
        return copy.deepcopy(_DIVIDED[key])


@dataclass(frozen=True)
class MemoryPlan:
    """Estimated peak memory (bytes) of the feature cache and of the work around it, against the budget."""

    budget: int
    features: int  # X_0..X_K of the cached train and val samples, float32
    per_sample: int  # one sample's X_0..X_K
    caching: int  # one data batch through the network while the cache is written (plus the model)
    search: int  # the searches that run at once, each on 256-sample batches of its boundary features
    searches: int  # how many run at once

    @property
    def floor(self) -> int:
        """What the run needs at once even with every feature on disk."""
        return max(self.caching, self.search)

    @property
    def in_memory(self) -> bool:
        return self.features + self.floor <= self.budget

    def chunk_rows(self, batch_size: int, total: int) -> int:
        """Samples cached per pass: all of them in memory, else as many whole batches as half the spare budget holds."""
        if self.in_memory:
            return total
        spare = max(0, self.budget - self.caching) // 2
        return min(total, max(batch_size, spare // max(1, self.per_sample) // batch_size * batch_size))


def _param_bytes(module: nn.Module) -> int:
    return 4 * sum(t.numel() for t in (*module.parameters(), *module.buffers()))


def memory_plan(params: Params, division: Division) -> MemoryPlan:
    """The estimates `resources.memory_budget_mb` is held against (float32 everywhere; an estimate, not a measurement)."""
    subs = division.subnetworks
    sizes = [math.prod(subs[0].in_shape), *(math.prod(s.out_shape) for s in subs)]
    per_sample = 4 * sum(sizes)
    model = _param_bytes(division.model)
    caching = model + 2 * params.data.batch_size * per_sample  # the batch's features plus activations in flight
    search = method_spec(params.prune.method).search
    if search == "subnetworks":
        each = max(2 * _param_bytes(s.module) + 2 * SCORER_BATCH * 4 * (math.prod(s.in_shape) + math.prod(s.out_shape)) for s in subs)
        searches = min(params.orchestration.workers or division.k, division.k)
    elif search == "network":
        each, searches = 2 * model + 2 * SCORER_BATCH * 4 * (sizes[0] + max(sizes)), 1
    else:  # one-shot baselines do not search
        each, searches = 0, 0
    return MemoryPlan(
        budget=params.resources.memory_budget_mb * MB,
        features=(params.divide.cache_train + params.divide.cache_val) * per_sample,
        per_sample=per_sample,
        caching=caching,
        search=each * searches,
        searches=searches,
    )


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


def features_in_memory() -> bool:
    """The selectors stage's decision: the whole cache fits the memory budget (else it stays memory-mapped on disk)."""
    return FEATURE_INDEX.is_file() and bool(read_json(FEATURE_INDEX).get("in_memory", False))


def load_feature(split: str, k: int) -> np.ndarray:
    """X_k of `split`: read into memory when the cache fits the budget, else memory-mapped (read-only, paged in on use)."""
    return load_array(feature_path(split, k), mmap=not features_in_memory())


def load_labels(split: str) -> np.ndarray:
    return load_array(label_path(split), mmap=False)


def load_features(split: str, k_max: int) -> tuple[list[np.ndarray], np.ndarray]:
    """[X_0, ..., X_k_max] of `split` memory-mapped, and the labels."""
    return [load_feature(split, k) for k in range(k_max + 1)], load_labels(split)
