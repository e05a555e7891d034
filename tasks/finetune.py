"""Stage finetune: train the pruned model with cross-entropy and, optionally, distillation from the unpruned one.

Checkpoints after every epoch under .emoprune/checkpoints/ and resumes there when rerun after a kill."""
from __future__ import annotations

import time

import mlflow

from pruning.distill import Distiller, DynamicKDLoss, KDLoss
from pruning.train import TrainConfig, resolve_device, seed_everything
from tasks import paths
from tasks.checkpoints import load_model, save_model
from tasks.common import Data, accuracy, fit_resumable, log_epoch, log_metrics_flat, write_history
from tasks.config import FinetuneParams, Params
from tasks.io import atomic_json
from tasks.tracking import stage_run


def distiller(p: FinetuneParams) -> Distiller:
    if p.kd == "kd":
        return KDLoss(p.kd_temperature, p.kd_alpha)
    if p.kd == "dynamickd":
        return DynamicKDLoss(p.kd_temperature, p.kd_alpha)
    return Distiller()


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
        cfg = TrainConfig(epochs=p.epochs, lr=p.lr, momentum=p.momentum, weight_decay=p.weight_decay)
        history, resumed, done = fit_resumable(
            "finetune", params, ("seed", "device", "finetune"), [paths.PREPARED / "meta.json", paths.PRUNED_INIT, paths.BASE],
            model, data.loader("train", train=True), cfg, device, loss_fn=distiller(p), teacher=teacher,
            val_loader=data.loader("val"), on_epoch=log_epoch("finetune"), description="finetune")
        out = {
            "val_acc": accuracy(model, data.loader("val"), device),
            "test_acc": accuracy(model, data.loader("test"), device),
            "epochs": p.epochs,
            "kd": p.kd,
            "resumed_from_epoch": resumed,
            "seconds": time.perf_counter() - start,
        }
        save_model(model.cpu(), paths.PRUNED, name=meta["model"], num_classes=meta["num_classes"],
                   image_size=meta["image_size"], scheme=meta["scheme"])
        write_history("finetune", history)
        log_metrics_flat(out, "pruned.")
        mlflow.log_artifact(str(paths.PRUNED), "models")
        atomic_json(out, paths.metrics_file("finetune"))
        done()
        return out
