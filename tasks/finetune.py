"""Stage finetune: train the pruned model with cross-entropy and, optionally, distillation from the unpruned one.

Checkpoints after every epoch under .emoprune/checkpoints/ and resumes there when rerun after a kill."""

from __future__ import annotations

import functools
import time

import mlflow

from pruning.emodir import FinetuneSettings, finetune
from pruning.train import layout_name, resolve_device, resolve_precision, seed_everything, training_layout
from tasks import paths
from tasks.checkpoints import load_model, save_model
from tasks.common import Data, accuracy, fit_resumable, log_epoch, log_metrics_flat, write_history
from tasks.config import Params
from tasks.io import atomic_json
from tasks.tracking import stage_run


def run(params: Params) -> dict:
    data = Data(params)
    device = resolve_device(params.device)
    model, meta = load_model(paths.PRUNED_INIT)
    teacher = None
    p = params.finetune
    if p.kd != "none":
        teacher, _ = load_model(paths.BASE)
    with stage_run(params, "finetune", ("finetune",)):
        seed_everything(params.seed)
        start = time.perf_counter()
        train = functools.partial(
            finetune,
            model,
            teacher,
            data.loader("train", train=True),
            device,
            FinetuneSettings(**p.model_dump()),
            val_loader=data.loader("val"),
            on_epoch=log_epoch("finetune"),
            description="finetune",
        )
        history, resumed, done = fit_resumable(
            "finetune",
            params,
            ("seed", "device", "finetune"),
            [paths.PREPARED / "meta.json", paths.PRUNED_INIT, paths.BASE],
            train,
            p.epochs,
        )
        out = {
            "val_acc": accuracy(model, data.loader("val"), device),
            "test_acc": accuracy(model, data.loader("test"), device),
            "epochs": p.epochs,
            "kd": p.kd,
            "layout": layout_name(training_layout(model, p.channels_last)),  # NHWC or NCHW, as `fit` trained it
            "precision": resolve_precision(p.precision, device),  # bf16 or fp32, as `fit` trained (auto resolved)
            "resumed_from_epoch": resumed,
            "seconds": time.perf_counter() - start,
        }
        save_model(
            model.cpu(),
            paths.PRUNED,
            name=meta["model"],
            num_classes=meta["num_classes"],
            image_size=meta["image_size"],
            scheme=meta["scheme"],
        )
        write_history("finetune", history)
        log_metrics_flat(out, "pruned.")
        mlflow.log_artifact(str(paths.PRUNED), "models")
        atomic_json(out, paths.metrics_file("finetune"))
        done()
        return out
