"""Stage selectors: divide the base model, cache its boundary features, train one frozen selector per inner boundary."""
from __future__ import annotations

import time

import mlflow
import numpy as np
import torch
from torch.utils.data import Subset

from pruning.divide import boundary_features
from pruning.selectors import selector_accuracy, train_selector
from pruning.train import resolve_device
from tasks import paths
from tasks.common import Data, log_metrics_flat
from tasks.config import Params
from tasks.datasets import load_split, make_loader
from tasks.division import feature_path, label_path, load_division, load_feature, load_labels, save_array
from tasks.io import atomic_json, atomic_torch_save
from tasks.tracking import stage_run


def _cache(params: Params, division, split: str, n: int, device) -> tuple[list[torch.Tensor], torch.Tensor]:
    ds = load_split(paths.PREPARED, split, train=False)  # no augmentation: features of the images as they are
    rng = np.random.default_rng(params.seed)
    # a seeded random subset: prepared splits are ordered (an ImageFolder by class), the first n would be one class
    idx = np.sort(rng.permutation(len(ds))[: min(n, len(ds))])
    loader = make_loader(Subset(ds, idx.tolist()), params.data.batch_size, shuffle=False, num_workers=params.data.num_workers)
    return boundary_features(division.subnetworks, loader, device=device, max_samples=len(idx))


def run(params: Params) -> dict:
    data = Data(params)
    device = resolve_device(params.device)
    division = load_division(params)
    with stage_run(params, "selectors", ("divide", "selectors")):
        start = time.perf_counter()
        for split, n in (("train", params.divide.cache_train), ("val", params.divide.cache_val)):
            feats, labels = _cache(params, division, split, n, device)
            for k, x in enumerate(feats):
                save_array(x, feature_path(split, k))
            save_array(labels, label_path(split))
        nc = data.meta["num_classes"]
        states, out = {}, {"k": division.k, "subnetworks": []}
        for sub in division.subnetworks:
            k = sub.index
            xtr, ytr = load_feature("train", k), load_labels("train")
            xva, yva = load_feature("val", k), load_labels("val")
            if k < division.k:
                s = params.selectors
                g = train_selector(xtr, ytr, nc, epochs=s.epochs, lr=s.lr, batch_size=s.batch_size, seed=params.seed + k, device=device)
                states[k] = {"in_channels": int(xtr.shape[1]), "num_classes": nc, "state_dict": {n: t.cpu() for n, t in g.state_dict().items()}}
                acc = selector_accuracy(g, xva, yva, device=device)
            else:  # the last boundary's selector is the model's own head
                acc = selector_accuracy(division.head, xva, yva, device=device)
            out["subnetworks"].append({"k": k, "blocks": sub.block_names, "flops": sub.flops, "params": sub.params,
                                       "in_shape": list(sub.in_shape), "out_shape": list(sub.out_shape), "selector_val_acc": acc})
            mlflow.log_metric(f"selector.s{k}.val_acc", acc)
        out["cached"] = {"train": int(len(load_labels("train"))), "val": int(len(load_labels("val")))}
        out["seconds"] = time.perf_counter() - start
        atomic_torch_save(states, paths.SELECTORS)
        log_metrics_flat({"seconds": out["seconds"]}, "selectors.")
        atomic_json(out, paths.metrics_file("selectors"))
        return out
