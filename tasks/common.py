"""Pieces the stage modules share: loaders from the prepared data, per-epoch logging, history files."""

from __future__ import annotations

import csv
import io
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import mlflow
import torch

from pruning.latency import LatencyCost, LatencyTable
from pruning.methods import Metric
from pruning.train import ResumeError, evaluate
from tasks import paths
from tasks.checkpoints import CheckpointError, load_resume, resume_path, save_resume
from tasks.config import Params
from tasks.datasets import example_input, load_split, make_loader, read_meta, split_batches
from tasks.io import atomic_path


class Data:
    """The prepared splits and their loaders for one stage."""

    def __init__(self, params: Params) -> None:
        self.params = params
        self.meta = read_meta(paths.PREPARED)
        self.example = example_input(self.meta)

    def loader(self, split: str, train: bool = False):
        p = self.params.data
        if p.num_workers == 0:
            return split_batches(paths.PREPARED, split, p.batch_size, train=train, seed=self.params.seed)
        ds = load_split(paths.PREPARED, split, train=train)
        return make_loader(ds, p.batch_size, shuffle=train, num_workers=p.num_workers, seed=self.params.seed)


def log_epoch(prefix: str):
    def on_epoch(epoch: int, metrics: dict[str, float]) -> None:
        mlflow.log_metrics({f"{prefix}.{k}": v for k, v in metrics.items()}, step=epoch)

    return on_epoch


def fit_resumable(
    stage: str, params: Params, sections: Sequence[str], inputs: Sequence[Path], train: Callable[..., list[dict[str, float]]], epochs: int
) -> tuple[list[dict[str, float]], int, Callable[[], None]]:
    """`train(resume=..., on_checkpoint=...)` (a call of `fit` or a function around it) checkpointed after every
    epoch to .emoprune/checkpoints/STAGE_<hash of sections and inputs>.pt, resuming from that file when it
    exists. Returns (history, epochs restored, a callback that removes the checkpoint: call it once the
    stage's outputs are written)."""
    ckpt = resume_path(stage, params, sections, inputs)
    state = load_resume(ckpt)
    resumed = state["epoch"] if state else 0
    if state:
        print(f"{stage}: resuming after epoch {resumed} of {epochs} from {ckpt}", flush=True)
    try:
        history = train(resume=state, on_checkpoint=lambda s: save_resume(s, ckpt))
    except ResumeError as err:
        raise CheckpointError(f"resume checkpoint {str(ckpt)!r}: {err}; delete it to start the stage over") from None
    return history, resumed, lambda: ckpt.unlink(missing_ok=True)


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


def cost_metric(params: Params, model: torch.nn.Module, example: torch.Tensor, root: Path | None = None) -> Metric:
    """prune.metric as the costs take it: 'flops' or 'params', or for 'latency' a LatencyCost over the table
    in params.latency (a relative path is under `root`, default the current folder: the project's), calibrated
    on `model` (the base; a rerun on this machine measures nothing)."""
    if params.prune.metric != "latency":
        return params.prune.metric
    lp = params.latency
    path = Path(lp.table).expanduser()
    path = path if path.is_absolute() or root is None else root / path
    table = LatencyTable(path, batch_size=lp.batch_size, threads=lp.threads, repeats=lp.repeats, precision=lp.precision)
    cost = LatencyCost(table).calibrate(model, example)
    print(f"latency: {table.key}; {table.measured} layer shapes measured for the calibration", flush=True)
    return cost
