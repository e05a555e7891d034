"""Pieces the stage modules share: loaders from the prepared data, per-epoch logging, history files."""
from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Any

import mlflow
import torch

from pruning.train import evaluate
from tasks import paths
from tasks.config import Params
from tasks.datasets import example_input, load_split, make_loader, read_meta
from tasks.io import atomic_path


class Data:
    """The prepared splits and their loaders for one stage."""

    def __init__(self, params: Params) -> None:
        self.params = params
        self.meta = read_meta(paths.PREPARED)
        self.example = example_input(self.meta)

    def loader(self, split: str, train: bool = False):
        p = self.params.data
        ds = load_split(paths.PREPARED, split, train=train)
        return make_loader(ds, p.batch_size, shuffle=train, num_workers=p.num_workers, seed=self.params.seed)


def log_epoch(prefix: str):
    def on_epoch(epoch: int, metrics: dict[str, float]) -> None:
        mlflow.log_metrics({f"{prefix}.{k}": v for k, v in metrics.items()}, step=epoch)

    return on_epoch


def write_history(stage: str, history: list[dict[str, float]]) -> Path:
    path = paths.history_file(stage)
    buf = io.StringIO()
    if history:
        w = csv.DictWriter(buf, fieldnames=["epoch", *history[0].keys()])
        w.writeheader()
        for i, row in enumerate(history):
            w.writerow({"epoch": i, **row})
    else:
        buf.write("epoch,train_loss,train_acc,val_acc\n")
    with atomic_path(path) as tmp:
        tmp.write_text(buf.getvalue())
    return path


def accuracy(model: torch.nn.Module, loader, device) -> float:
    return evaluate(model, loader, device)["acc"]


def log_metrics_flat(metrics: dict[str, Any], prefix: str = "") -> None:
    flat = {}
    for k, v in metrics.items():
        if isinstance(v, dict):
            for k2, v2 in v.items():
                if isinstance(v2, (int, float)) and not isinstance(v2, bool):
                    flat[f"{prefix}{k}.{k2}"] = float(v2)
        elif isinstance(v, (int, float)) and not isinstance(v, bool):
            flat[f"{prefix}{k}"] = float(v)
    if flat:
        mlflow.log_metrics(flat)
