"""Stage pretrain: train the unpruned model (or load the user's weights) and save models/base.pt.

Training checkpoints after every epoch under .emoprune/checkpoints/; a rerun after a kill resumes there and
ends with the same model as an uninterrupted run. The checkpoint is removed once the outputs are written."""

from __future__ import annotations

import functools
import time

import mlflow

from pruning.channels import count_flops_params
from pruning.models import build_model
from pruning.train import TrainConfig, fit, layout_name, resolve_device, resolve_precision, seed_everything, training_layout
from tasks import paths
from tasks.checkpoints import load_user_weights, save_model
from tasks.common import Data, accuracy, fit_resumable, log_epoch, log_metrics_flat, write_history
from tasks.config import Params
from tasks.io import atomic_json
from tasks.tracking import stage_run


def run(params: Params) -> dict:
    data = Data(params)
    device = resolve_device(params.device)
    nc = data.meta["num_classes"]
    with stage_run(params, "pretrain", ("data", "model", "pretrain")):
        seed_everything(params.seed)
        start = time.perf_counter()
        resumed, done = 0, lambda: None  # loaded weights: nothing trained, nothing to resume
        if params.model.checkpoint:
            model = load_user_weights(params.model.checkpoint, params.model.name, nc)
            history: list[dict] = []
        else:
            model = build_model(params.model.name, nc)
            cfg = TrainConfig(**params.pretrain.model_dump())
            train = functools.partial(
                fit,
                model,
                data.loader("train", train=True),
                cfg,
                device,
                val_loader=data.loader("val"),
                on_epoch=log_epoch("pretrain"),
                description="pretrain",
            )
            history, resumed, done = fit_resumable(
                "pretrain", params, ("seed", "device", "data", "model", "pretrain"), [paths.PREPARED / "meta.json"], train, cfg.epochs
            )
        model.to(device)
        flops, n_params = count_flops_params(model.cpu(), data.example)
        model.to(device)
        out = {
            "val_acc": accuracy(model, data.loader("val"), device),
            "test_acc": accuracy(model, data.loader("test"), device),
            "flops": flops,
            "params": n_params,
            "epochs": len(history),
            "resumed_from_epoch": resumed,
            "seconds": time.perf_counter() - start,
            "from_checkpoint": bool(params.model.checkpoint),
            "layout": None if params.model.checkpoint else layout_name(training_layout(model, params.pretrain.channels_last)),
            "precision": None if params.model.checkpoint else resolve_precision(params.pretrain.precision, device),  # auto resolved
        }
        save_model(model.cpu(), paths.BASE, name=params.model.name, num_classes=nc, image_size=data.meta["image_size"])
        write_history("pretrain", history)
        log_metrics_flat(out, "base.")
        mlflow.log_artifact(str(paths.BASE), "models")
        atomic_json(out, paths.metrics_file("pretrain"))
        done()
        return out
