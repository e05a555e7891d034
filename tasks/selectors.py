"""Stage selectors: divide the base model, cache its boundary features, train one frozen selector per inner boundary."""

from __future__ import annotations

import time
from contextlib import ExitStack
from itertools import islice
from typing import Any

import mlflow
import numpy as np
from torch.utils.data import Subset

from pruning.counting import counting
from pruning.divide import boundary_features
from pruning.emodir import SelectorSettings, train_selectors
from pruning.selectors import selector_accuracy
from pruning.train import resolve_device
from tasks import paths
from tasks.common import Data, log_metrics_flat
from tasks.config import Params
from tasks.datasets import load_split, make_loader
from tasks.division import FEATURE_INDEX, MB, MemoryPlan, feature_path, label_path, load_division, load_feature, load_labels, memory_plan
from tasks.io import atomic_json, atomic_path, atomic_torch_save
from tasks.tracking import stage_run


def _cache(params: Params, division, split: str, n: int, device, plan: MemoryPlan) -> None:
    """Write X_0..X_K and the labels of a seeded subset of `split` to artifacts/features, a chunk of batches at a
    time (one chunk when the cache fits the memory budget), each file atomically."""
    ds = load_split(paths.PREPARED, split, train=False)  # no augmentation: features of the images as they are
    rng = np.random.default_rng(params.seed)
    # a seeded random subset: prepared splits are ordered (an ImageFolder by class), the first n would be one class
    size = len(ds)  # type: ignore[arg-type]  # every split's Dataset has a length
    idx = np.sort(rng.permutation(size)[: min(n, size)])
    bs = params.data.batch_size
    loader = iter(make_loader(Subset(ds, idx.tolist()), bs, shuffle=False, num_workers=params.data.num_workers))
    per_chunk = -(-plan.chunk_rows(bs, len(idx)) // bs)  # whole batches: every sample lands in the same batch as in one pass
    files = [feature_path(split, k) for k in range(division.k + 1)] + [label_path(split)]
    with ExitStack() as stack:
        tmps = [stack.enter_context(atomic_path(f)) for f in files]
        arrays: list[np.memmap] = []
        row = 0
        while batches := list(islice(loader, per_chunk)):
            feats, labels = boundary_features(division.subnetworks, batches, device=device)
            assert labels is not None  # batches of (images, labels)
            for i, t in enumerate([*feats, labels]):
                a = t.numpy()
                if len(arrays) <= i:
                    arrays.append(np.lib.format.open_memmap(tmps[i], mode="w+", dtype=a.dtype, shape=(len(idx), *a.shape[1:])))
                arrays[i][row : row + len(a)] = a
            row += len(labels)
        for a in arrays:
            a.flush()
        del arrays


def run(params: Params) -> dict:
    data = Data(params)
    device = resolve_device(params.device)
    division = load_division(params)
    with stage_run(params, "selectors", ("divide", "selectors")), counting() as images:
        start = time.perf_counter()
        plan = memory_plan(params, division)
        where = "in memory" if plan.in_memory else "memory-mapped from disk"
        print(f"selectors: feature cache about {plan.features / MB:,.0f} MB, budget {plan.budget / MB:,.0f} MB: held {where}", flush=True)
        for split, n in (("train", params.divide.cache_train), ("val", params.divide.cache_val)):
            cache_start = time.perf_counter()
            _cache(params, division, split, n, device, plan)
            print(
                f"selectors: {split} features cached at {division.k + 1} boundaries ({time.perf_counter() - cache_start:.1f} s)", flush=True
            )
        atomic_json(
            {
                "schema_version": 1,
                "in_memory": plan.in_memory,
                "feature_mb": plan.features / MB,
                "budget_mb": params.resources.memory_budget_mb,
            },
            FEATURE_INDEX,
        )
        nc = data.meta["num_classes"]
        states: dict[int, dict] = {}
        out: dict[str, Any] = {"k": division.k, "subnetworks": []}
        train_features = [load_feature("train", k) for k in range(division.k + 1)]  # memory-mapped: read as used
        selectors = train_selectors(
            division.subnetworks,
            division.head,
            train_features,
            load_labels("train"),
            nc,
            SelectorSettings(**params.selectors.model_dump()),
            seed=params.seed,
            device=device,
            on_trained=lambda k, s: print(
                f"selectors: g_{k} of {division.k - 1} trained ({params.selectors.epochs} epochs, {s:.1f} s)", flush=True
            ),
        )
        for sub, g in zip(division.subnetworks, selectors):  # the last one is the model's own head
            k = sub.index
            xva, yva = load_feature("val", k), load_labels("val")
            if k < division.k:
                states[k] = {
                    "in_channels": int(train_features[k].shape[1]),
                    "num_classes": nc,
                    "state_dict": {n: t.cpu() for n, t in g.state_dict().items()},
                }
            acc = selector_accuracy(g, xva, yva, device=device)
            out["subnetworks"].append(
                {
                    "k": k,
                    "blocks": sub.block_names,
                    "flops": sub.flops,
                    "params": sub.params,
                    "in_shape": list(sub.in_shape),
                    "out_shape": list(sub.out_shape),
                    "selector_val_acc": acc,
                }
            )
            mlflow.log_metric(f"selector.s{k}.val_acc", acc)
        out["cached"] = {"train": int(len(load_labels("train"))), "val": int(len(load_labels("val")))}
        out["seconds"] = time.perf_counter() - start
        out.update(images.as_metrics())  # caching the features, training the selectors and scoring them
        atomic_torch_save(states, paths.SELECTORS)
        log_metrics_flat({"seconds": out["seconds"], **images.as_metrics()}, "selectors.")
        atomic_json(out, paths.metrics_file("selectors"))
        return out
